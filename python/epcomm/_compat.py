"""PyTorch is optional at import time: the C++ module and the torch-free helpers work without it (CI
has no torch); everything that touches tensors, streams or process groups asks for it here."""

try:
    import torch
    _TORCH_ERROR = None
except ImportError as e:  # only a missing torch; a broken install raises as usual
    torch = None
    _TORCH_ERROR = e


def require_torch(what: str):
    """Returns the torch module, or raises RuntimeError saying that `what` needs PyTorch."""
    if torch is None:
        raise RuntimeError(f"{what} needs PyTorch, and PyTorch is not installed (import torch: {_TORCH_ERROR})")
    return torch
