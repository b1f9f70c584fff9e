"""Fresh output tensors, several per call, for the Python layer.

``empty(device, specs, shared=False)`` returns a tuple of new tensors (or None) for ``specs``, items
None or ``(dtype, shape)`` or ``(dtype, shape, strides)``. Where the optional module
``epcomm._torch_ops`` was built (python/CMakeLists.txt: the build's interpreter had PyTorch with its
headers) and matches the PyTorch imported now, the tensors are made in C++ (``at::empty``: the
caching allocator's own ~3 us per call on an H100 host, BENCHMARKS run 80, without Python's
argument parsing on top; CUDA tensors straight from PyTorch's CUDA factory, ``at::detail::empty_cuda``,
where PyTorch has CUDA: the same allocator without the dispatcher); otherwise by ``torch.empty`` /
``torch.empty_strided`` from here. With
``shared`` the module makes them in one allocation (tensors of their own over one storage, each at a
256-byte aligned offset): for outputs that live and die together, one allocator call instead of one
each. The tensors are fresh storage from PyTorch's allocator on the current stream either way.

``empty_grouped(device, groups)``: one ``empty(..., shared=True)`` per group, concatenated.

``first_rows(tensors, rows)`` cuts reserved receive tensors to the rows that arrived, in place
(``resize_``: one op per tensor, in C++ with the module).

With the module, the binding also reads torch.Tensor arguments in C++ (its ``tensor_reader``,
python/src/tensor_reader.h: pointer, dtype, shape, strides and device from the TensorImpl) instead
of through five Python calls per tensor (~1 us each tensor on this project's CPU host), and the
eager low-latency calls make their outputs in C++ through its ``tensor_allocator`` (the same
tensors ``empty`` makes), arguments to launch in one call (epcomm/_low_latency.py).

``EPCOMM_TORCH_OPS=0`` in the environment (read at import) keeps the Python path for both;
``status()`` says which path is in use and why.
"""

import os

from . import _epcomm
from ._compat import torch


def _load():
    if torch is None:
        return None, "no PyTorch"
    if os.environ.get("EPCOMM_TORCH_OPS", "1").strip() == "0":
        return None, "EPCOMM_TORCH_OPS=0"
    try:
        from . import _torch_ops
    except ImportError as e:
        return None, f"epcomm._torch_ops not built or not loadable ({e})"
    if _torch_ops.torch_version != torch.__version__:
        # Another PyTorch's ABI could crash instead of raising: never call it.
        return None, (f"epcomm._torch_ops was built for PyTorch {_torch_ops.torch_version}, this is "
                      f"{torch.__version__} (rebuild epcomm)")
    return _torch_ops, f"epcomm._torch_ops (PyTorch {torch.__version__})"


_OPS, _STATUS = _load()


def status() -> str:
    """Which path makes the output tensors: ``epcomm._torch_ops (...)`` or why not."""
    return _STATUS


def _python_empty(device, specs, shared=False) -> tuple:  # shared: a hint only the module takes
    out = []
    for spec in specs:
        if spec is None:
            out.append(None)
        elif len(spec) == 2:
            out.append(torch.empty(spec[1], dtype=spec[0], device=device))
        else:
            out.append(torch.empty_strided(spec[1], spec[2], dtype=spec[0], device=device))
    return tuple(out)


def _python_first_rows(tensors: tuple, rows: int) -> tuple:
    # A tensor of its own over the same storage (not a view, so autograd and in-place ops treat it
    # as any fresh tensor; the storage keeps the reserved size: resize_ never shrinks a storage).
    return tuple(t if t is None or t.size(0) == rows else t.resize_((rows,) + t.shape[1:]) for t in tensors)


def _python_empty_grouped(device, groups) -> tuple:
    return tuple(t for group in groups for t in _python_empty(device, group))


if _OPS is not None:
    _epcomm._set_tensor_reader(_OPS.tensor_reader)
    # A module built before the allocator existed (a stale build beside a newer _epcomm) has none:
    # the eager calls then decline, and the Python layer allocates through `empty`.
    _epcomm._set_tensor_allocator(getattr(_OPS, "tensor_allocator", None))
    # PyTorch's current stream read in C++ (only where _torch_ops was built against PyTorch with
    # CUDA; the eager calls ask Python otherwise). A _epcomm older than the reader has no setter.
    if hasattr(_epcomm, "_set_current_stream_reader"):
        _epcomm._set_current_stream_reader(getattr(_OPS, "current_stream", None))
    _ops_empty = _OPS.empty
    first_rows = _OPS.first_rows

    def empty(device, specs, shared=False) -> tuple:
        """Fresh tensors on ``device`` (a torch.device, CUDA or CPU), one per item of ``specs``;
        ``shared``: one allocation for all of them (outputs that live and die together)."""
        return _ops_empty(-1 if device.type == "cpu" else device.index, specs, shared)

    _ops_empty_grouped = getattr(_OPS, "empty_grouped", None)

    def empty_grouped(device, groups) -> tuple:
        """Fresh tensors for ``groups`` (tuples of specs), each group in one allocation (tensors that
        live and die together), all of them in order in one tuple."""
        index = -1 if device.type == "cpu" else device.index
        if _ops_empty_grouped is None:  # a module built before empty_grouped
            return tuple(t for group in groups for t in _ops_empty(index, group, True))
        return _ops_empty_grouped(index, groups)
else:
    empty, empty_grouped, first_rows = _python_empty, _python_empty_grouped, _python_first_rows
