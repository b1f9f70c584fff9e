"""Python CPU tests of epcomm._torch_ops, the optional module that makes the Python layer's output
tensors in C++ (python/torch_ops/torch_ops.cpp), and of epcomm._alloc, which chooses it or the Python
path. Skipped where PyTorch is not installed or the module was not built (no PyTorch with headers
when the build was configured).

    PYTHONPATH=python python -m pytest tests/python/test_cpu_torch_ops.py
"""

import ctypes
import os
import random
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _cpu_stand_ins import need_torch, torch  # noqa: E402
from _runner import raises, run_tests, skip  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON_DIR = os.path.join(os.path.dirname(os.path.dirname(HERE)), "python")


def _ops():
    need_torch()
    try:
        from epcomm import _torch_ops
    except ImportError as e:
        skip(f"epcomm._torch_ops not built (no PyTorch with C++ headers when the build was configured): {e}")
    return _torch_ops


def _random_spec(rng):
    dtype = rng.choice([torch.bfloat16, torch.float32, torch.int32, torch.int64, torch.bool, torch.uint8])
    shape = tuple(rng.randint(0, 5) for _ in range(rng.randint(0, 4)))
    if shape and rng.random() < 0.4:  # a permuted dense layout, as the LL scales are
        order = list(range(len(shape)))
        rng.shuffle(order)
        strides, acc = [0] * len(shape), 1
        for d in reversed(order):
            strides[d] = acc
            acc *= max(shape[d], 1)
        return (dtype, shape, tuple(strides))
    return (dtype, shape)


def _span_bytes(t):
    """Bytes from a (non-empty) tensor's first element to the end of its last."""
    return (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()


def test_empty_makes_what_torch_empty_makes():
    ops = _ops()
    seed = random.randrange(1 << 30)
    print(f"test_empty_makes_what_torch_empty_makes: seed {seed}")
    rng = random.Random(seed)
    for case in range(400):
        specs = tuple(None if rng.random() < 0.15 else _random_spec(rng) for _ in range(rng.randint(0, 6)))
        shared = case % 2 == 1
        got = ops.empty(-1, specs, shared)
        assert isinstance(got, tuple) and len(got) == len(specs)
        for spec, t in zip(specs, got):
            if spec is None:
                assert t is None
                continue
            want = (torch.empty(spec[1], dtype=spec[0]) if len(spec) == 2
                    else torch.empty_strided(spec[1], spec[2], dtype=spec[0]))
            assert (t.dtype, t.shape, t.stride(), t.device) == (want.dtype, want.shape, want.stride(), want.device), \
                (seed, spec, t.stride())
            assert not t.requires_grad and t._base is None
            # Memory of its own, all of it writable: random values round-trip.
            values = torch.randint(0, 2 if spec[0] == torch.bool else 100, spec[1]).to(spec[0])
            t.copy_(values)
            assert torch.equal(t, values)
        if shared:  # one block; every tensor at an aligned offset, none overlapping another
            made = [t for t in got if t is not None and t.numel() > 0]
            base = min((t.data_ptr() for t in made), default=0)
            spans = sorted((t.data_ptr(), t.data_ptr() + _span_bytes(t)) for t in made)
            for (b0, e0), (b1, _) in zip(spans, spans[1:]):
                assert e0 <= b1, (seed, specs)
            for t in made:
                assert (t.data_ptr() - base) % 256 == 0 and t.storage_offset() * t.element_size() == t.data_ptr() - base
    # Distinct storages, even for identical specs; one with shared.
    a, b = ops.empty(-1, ((torch.int32, (4,)), (torch.int32, (4,))))
    assert a.data_ptr() != b.data_ptr()
    a, b = ops.empty(-1, ((torch.int32, (4,)), (torch.int64, (4,))), True)
    assert b.data_ptr() - a.data_ptr() == 256 and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() \
        if hasattr(a, "untyped_storage") else b.data_ptr() - a.data_ptr() == 256


def test_empty_grouped_makes_one_allocation_per_group():
    """empty_grouped (the normal dispatch's receive tensors): each group as empty(shared=True) makes
    it, one storage per group (one tensor alone: its own, as without shared), in one flat tuple."""
    ops = _ops()
    from epcomm import _alloc
    seed = random.randrange(1 << 30)
    print(f"test_empty_grouped_makes_one_allocation_per_group: seed {seed}")
    rng = random.Random(seed)
    storage = (lambda t: t.untyped_storage().data_ptr()) if hasattr(torch.Tensor, "untyped_storage") else \
        (lambda t: t.storage().data_ptr())
    for _ in range(200):
        groups = tuple(tuple(None if rng.random() < 0.15 else _random_spec(rng) for _ in range(rng.randint(0, 4)))
                       for _ in range(rng.randint(0, 4)))
        got = _alloc.empty_grouped(torch.device("cpu"), groups)
        flat = [spec for group in groups for spec in group]
        assert len(got) == len(flat)
        k, blocks = 0, []
        for group in groups:
            want = ops.empty(-1, group, True)
            made = got[k:k + len(group)]
            k += len(group)
            for t, w in zip(made, want):
                assert (t is None) == (w is None), (seed, group)
                if t is not None:
                    assert (t.dtype, t.shape, t.stride()) == (w.dtype, w.shape, w.stride()), (seed, group)
            sized = [t for t in made if t is not None and t.numel() > 0]
            if len(sized) > 1:
                assert len({storage(t) for t in sized}) == 1, (seed, group)  # one allocation for the group
            blocks += [storage(t) for t in sized[:1]]
        assert len(set(blocks)) == len(blocks), seed  # groups do not share one
    raises(TypeError, lambda: ops.empty_grouped(-1, ([(torch.int32, (2,))],)), "groups[0]")
    raises(ValueError, lambda: ops.empty_grouped(-1, (((torch.int32, (2,)),), ((torch.int32, (-1,)),))), "specs[1]")


def test_bad_specs_raise_naming_the_item():
    ops = _ops()
    raises(ValueError, lambda: ops.empty(-1, ((torch.int32, (2,)), (torch.int32, (3, -1)))), "specs[1]", "shape[1]",
           "negative")
    raises(TypeError, lambda: ops.empty(-1, (("int32", (2,)),)), "specs[0][0]", "torch.dtype")
    raises(TypeError, lambda: ops.empty(-1, ((torch.int32,),)), "specs[0]", "(dtype, shape)")
    raises(TypeError, lambda: ops.empty(-1, ((torch.int32, [2]),)), "specs[0] shape", "tuple of ints")
    raises(ValueError, lambda: ops.empty(-1, ((torch.int32, (2, 2), (1,)),)), "2 dimensions and 1 strides")
    raises(ValueError, lambda: ops.empty(-1, ((torch.int32, (1,) * 9),)), "9 dimensions")
    raises(TypeError, lambda: ops.empty(-1, [(torch.int32, (2,))]))  # specs must be a tuple
    raises(TypeError, lambda: ops.first_rows((torch.zeros(2), 5), 1), "tensors[1]", "not a tensor")
    raises(ValueError, lambda: ops.first_rows((torch.zeros(2),), -1), "negative")


def test_first_rows_cuts_in_place_and_keeps_the_data():
    ops = _ops()
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    for rows in (0, 1, 37, 64):
        reserved = (torch.randn(64, 8, generator=g), None, torch.randint(0, 9, (64,), generator=g).int(),
                    torch.randint(0, 9, (64, 3), generator=g))
        before = [None if t is None else (t.clone(), t.data_ptr(), t.storage().size()) for t in reserved]
        out = ops.first_rows(reserved, rows)
        assert out is reserved  # the same objects, changed in place
        for t, b in zip(out, before):
            if t is None:
                continue
            full, ptr, storage = b
            assert t.shape == (rows,) + full.shape[1:] and t.is_contiguous()
            assert t.storage().size() == storage and (rows == 0 or t.data_ptr() == ptr)
            assert torch.equal(t, full[:rows])


def _status_in_subprocess(env_extra, before_import=""):
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR, PYTHONDONTWRITEBYTECODE="1", **env_extra)
    code = f"import torch\n{before_import}\nimport epcomm._alloc as a\nprint(a.status())\nprint(a.empty.__name__)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()


_MOVED = [d for d in (torch and (torch.bfloat16, torch.float32, torch.int32, torch.int64, torch.bool,
                                 getattr(torch, "float8_e4m3fn", None))) or () if d is not None]
_DTYPES = _MOVED + ([torch.uint8, torch.float16] if torch else [])


def _random_tensor(rng):
    """A tensor of random dtype (some epcomm does not move), rank, layout and storage offset."""
    dtype = rng.choice(_DTYPES)
    shape = [rng.randint(1, 5) for _ in range(rng.randint(0, 6))]
    device = "cuda" if torch.cuda.is_available() and rng.random() < 0.5 else "cpu"  # on a GPU host: both
    t = torch.empty([n + 1 for n in shape], dtype=dtype, device=device)
    t = t[tuple(slice(1, None) if rng.random() < 0.5 else slice(0, n) for n in shape)]  # offsets, strides
    if t.dim() >= 2 and rng.random() < 0.4:
        t = t.transpose(0, t.dim() - 1)
    return t


class _Facts(ctypes.Structure):  # struct EpcommTensorFacts (python/src/tensor_reader.h)
    _fields_ = [("data", ctypes.c_void_p), ("dtype", ctypes.c_int), ("ndim", ctypes.c_int), ("device", ctypes.c_int),
                ("shape", ctypes.c_int64 * 8), ("strides", ctypes.c_int64 * 8)]


def _reader_function(capsule):
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    address = get(capsule, b"epcomm._torch_ops.tensor_reader.v1")
    return ctypes.CFUNCTYPE(ctypes.c_int, ctypes.py_object, ctypes.POINTER(_Facts))(address)


def _facts(t):
    """What the binding reads of t: (data, dtype, shape, strides, device), or the error it raises."""
    from epcomm import _epcomm
    try:
        return _epcomm._view_facts(t)
    except _epcomm.ArgumentError as e:
        return "ArgumentError: " + str(e)


def test_tensor_reader_reads_what_the_python_path_reads():
    """The binding's C++ reader of torch.Tensor arguments (tensor_reader.h) against its Python path
    (five attribute calls), tensor by tensor: pointer, dtype, shape, strides, device, and the same
    error where epcomm refuses the tensor (other dtypes, more dimensions than it takes)."""
    _ops()
    from epcomm import _alloc, _epcomm  # noqa: F401 -- _alloc sets the reader
    assert _epcomm._tensor_reader_set()
    seed = random.randrange(1 << 30)
    print(f"test_tensor_reader_reads_what_the_python_path_reads: seed {seed}")
    rng = random.Random(seed)
    tensors = [_random_tensor(rng) for _ in range(300)]
    tensors.append(torch.nn.Parameter(torch.ones(3, 2)))  # read by the reader too
    tensors.append(torch.ones(4, 2, dtype=torch.bfloat16).T)

    class Sub(torch.Tensor):  # a subclass: the reader declines, the Python path reads it
        pass
    tensors.append(torch.ones(2, 3).as_subclass(Sub))
    with_reader = [_facts(t) for t in tensors]
    _epcomm._set_tensor_reader(None)
    try:
        assert not _epcomm._tensor_reader_set()
        without = [_facts(t) for t in tensors]
    finally:
        _epcomm._set_tensor_reader(_alloc._OPS.tensor_reader)
    for t, a, b in zip(tensors, with_reader, without):
        assert a == b, (t.dtype, t.shape, t.stride(), a, b)
    read = sum(1 for a in with_reader if isinstance(a, tuple))
    assert 50 < read < len(tensors), read  # both kinds were exercised
    assert with_reader[-2][0] == tensors[-2].data_ptr() and with_reader[-2][3] == (1, 2)
    # The reader itself, called as the binding calls it: it read (1) the plain tensors epcomm takes.
    reader = _reader_function(_alloc._OPS.tensor_reader)
    moved = set(_MOVED)
    for t in tensors:
        facts = _Facts()
        got = reader(t, ctypes.byref(facts))
        want = type(t) in (torch.Tensor, torch.nn.Parameter) and t.dtype in moved and t.dim() <= 8
        assert got == int(want), (type(t), t.dtype, t.dim(), got)
        if got:
            assert facts.data == t.data_ptr() and facts.ndim == t.dim() and facts.device == t.get_device()
            assert tuple(facts.shape[:t.dim()]) == tuple(t.shape) and tuple(facts.strides[:t.dim()]) == t.stride()
    raises(ValueError, lambda: _epcomm._set_tensor_reader(7))  # anything but the reader's capsule is refused
    assert _epcomm._tensor_reader_set()  # and the reader set before stays


# EpcommTensorDtype codes (tensor_reader.h) of the torch dtypes.
_CODES = [(torch.bfloat16, 0), (getattr(torch, "float8_e4m3fn", None), 1), (torch.float32, 2), (torch.int32, 3),
          (torch.int64, 4), (torch.bool, 5)] if torch else []


def test_tensor_allocator_makes_what_empty_makes():
    """The allocator the eager low-latency calls make their outputs with (tensor_allocator.v1,
    called through the binding as they call it): the tensors ops.empty makes for the same specs,
    data pointers as their data_ptr(), one aligned block with shared; bad specs raise."""
    ops = _ops()
    from epcomm import _alloc, _epcomm  # noqa: F401 -- _alloc sets the allocator
    assert _epcomm._tensor_allocator_set()
    seed = random.randrange(1 << 30)
    print(f"test_tensor_allocator_makes_what_empty_makes: seed {seed}")
    rng = random.Random(seed)
    codes = [(d, c) for d, c in _CODES if d is not None]
    for case in range(300):
        specs, want_specs = [], []
        for _ in range(rng.randint(1, 5)):
            dtype, code = rng.choice(codes)
            spec = _random_spec(rng)
            shape, strides = spec[1], (list(spec[2]) if len(spec) == 3 else [])
            specs.append((code, list(shape), strides))
            want_specs.append((dtype, shape) + ((tuple(strides),) if strides else ()))
        shared = case % 2 == 1
        got, ptrs = _epcomm._allocate_for_test(-1, specs, shared)
        want = ops.empty(-1, tuple(want_specs), shared)
        assert len(got) == len(specs) == len(ptrs)
        for t, w, p in zip(got, want, ptrs):
            assert (t.dtype, t.shape, t.stride(), t.device) == (w.dtype, w.shape, w.stride(), w.device), (seed, specs)
            assert p == t.data_ptr() and not t.requires_grad
            if t.numel():
                values = torch.randint(0, 2 if t.dtype == torch.bool else 100, tuple(t.shape)).to(t.dtype)
                t.copy_(values)
                assert torch.equal(t, values)
        if shared:
            made = [t for t in got if t.numel() > 0]
            spans = sorted((t.data_ptr(), t.data_ptr() + _span_bytes(t)) for t in made)
            for (b0, e0), (b1, _) in zip(spans, spans[1:]):
                assert e0 <= b1, (seed, specs)
    raises(ValueError, lambda: _epcomm._allocate_for_test(-1, [(3, [2, -1], [])], False), "negative")
    raises(ValueError, lambda: _epcomm._allocate_for_test(-1, [(9, [2], [])], False), "dtype 9")
    raises(ValueError, lambda: _epcomm._set_tensor_allocator(_alloc._OPS.tensor_reader))  # the wrong capsule
    assert _epcomm._tensor_allocator_set()


def test_direct_alloc_switch_and_the_stream_reader():
    """_set_direct_alloc (PyTorch's CUDA factory without the dispatcher, where built with CUDA)
    returns the setting before and changes nothing CPU tensors get; _torch_ops.current_stream exists
    exactly where the module was built against PyTorch with CUDA, and the binding takes it or None
    (never another capsule). Buffer's fast calls are made only over a real Runtime: a stand-in gets
    None (the Python path)."""
    ops = _ops()
    from epcomm import _alloc, _epcomm  # _alloc hands the capsules over
    assert _alloc._OPS is ops
    from epcomm.event import EventOverlap
    from epcomm.handle import LowLatencyHandle
    before = ops._set_direct_alloc(False)
    try:
        assert ops._set_direct_alloc(True) is False and ops._set_direct_alloc(True) is True
        for direct in (False, True):
            ops._set_direct_alloc(direct)
            a, b = ops.empty(-1, ((torch.float32, (3, 5)), (torch.int64, (2,))), True)
            assert (a.shape, a.dtype, b.shape, b.dtype) == ((3, 5), torch.float32, (2,), torch.int64)
    finally:
        ops._set_direct_alloc(before)
    assert hasattr(ops, "current_stream") == bool(ops.direct_alloc_built)
    raises(ValueError, lambda: _epcomm._set_current_stream_reader(ops.tensor_reader))  # the wrong capsule
    _epcomm._set_current_stream_reader(None)
    _epcomm._set_current_stream_reader(getattr(ops, "current_stream", None))
    assert _epcomm._low_latency_fast_calls(object(), LowLatencyHandle, EventOverlap, lambda: 0) is None


def test_alloc_chooses_the_module_only_when_it_matches():
    _ops()
    status, fn = _status_in_subprocess({})
    assert status.startswith("epcomm._torch_ops") and fn == "empty", status
    status, fn = _status_in_subprocess({"EPCOMM_TORCH_OPS": "0"})
    assert status == "EPCOMM_TORCH_OPS=0" and fn == "_python_empty", status
    # Another PyTorch than the one it was built for: never called.
    status, fn = _status_in_subprocess({}, "torch.__version__ = '0.0.1-other'")
    assert "was built for PyTorch" in status and "0.0.1-other" in status and fn == "_python_empty", status


def test_python_layer_over_a_host_core_without_the_module():
    """The host-core tests (real outputs against the reference) run in this process with the
    module; here again with EPCOMM_TORCH_OPS=0, so both paths are checked."""
    _ops()
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR, PYTHONDONTWRITEBYTECODE="1", EPCOMM_TORCH_OPS="0")
    done = subprocess.run([sys.executable, os.path.join(HERE, "test_cpu_host_core.py")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FAIL" not in done.stdout and done.stdout.count("PASS") >= 4, done.stdout


if __name__ == "__main__":
    run_tests(globals())
