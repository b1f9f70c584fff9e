"""epcomm: MoE expert-parallel dispatch / combine over NVLink (and NCCL GIN across nodes).

A drop-in for DeepEP's legacy API: ``import epcomm as deep_ep`` and ``deep_ep.Buffer(group, ...)``
behaves as docs/contract.md §4 says. The C++ core is ``epcomm._epcomm`` (no PyTorch needed to import
it); the torch-facing layer is ``epcomm.buffer``.
"""

from ._compat import torch  # first: libepcomm then binds to the CUDA runtime and NCCL torch loaded

from . import _epcomm
from ._epcomm import ArgumentError, Config, Error, TimeoutError  # noqa: A004 -- epcomm.TimeoutError
from .buffer import Buffer
from .event import EventHandle, EventOverlap
from .handle import DispatchHandle, HandleMeta, LowLatencyHandle

# DeepEP exports the dtype of topk_idx; None where PyTorch is not installed.
topk_idx_t = torch.int64 if torch is not None else None

__version__ = _epcomm.__version__
__all__ = ["ArgumentError", "Buffer", "Config", "DispatchHandle", "Error", "EventHandle", "EventOverlap", "HandleMeta",
           "LowLatencyHandle", "TimeoutError", "topk_idx_t"]
