"""Argument checks of the Python layer. Each failure raises epcomm.ArgumentError (a ValueError) that
names the argument, the value and the rule, before anything is launched. Torch-free (duck-typed),
so they are tested where there is no torch; the C++ core checks dtypes, shapes and devices."""

import operator

from ._epcomm import ArgumentError, Config, Event
from .handle import DispatchHandle, HandleMeta, LowLatencyHandle


INT32_MAX, INT64_MAX = (1 << 31) - 1, (1 << 63) - 1


def check_int(name, value, lo=None, hi=INT32_MAX) -> int:
    """An integer in [lo, hi]; hi defaults to the C++ core's int (sizes in bytes pass INT64_MAX)."""
    if type(value) is int and (lo is None or value >= lo) and (hi is None or value <= hi):
        return value  # the common case, as the checks below would return it
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ArgumentError(f"{name}: expected an integer, got {type(value).__name__} {value!r}")
    v = operator.index(value)
    if lo is not None and v < lo:
        raise ArgumentError(f"{name} = {v} must be >= {lo}")
    if hi is not None and v > hi:
        raise ArgumentError(f"{name} = {v} must be <= {hi}")
    return v


def check_bool(name, value) -> bool:
    if value is True or value is False:
        return value
    if type(value).__name__ in ("bool_", "bool") or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise ArgumentError(f"{name}: expected True or False, got {type(value).__name__} {value!r}")


def check_tensor(name, t, ndim=None, allow_none=False):
    if t is None:
        if allow_none:
            return None
        raise ArgumentError(f"{name}: a tensor is required, got None")
    if not (hasattr(t, "data_ptr") and hasattr(t, "dim")):
        raise ArgumentError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ArgumentError(f"{name}: expected {ndim} dimensions, got shape {list(t.shape)}")
    return t


def check_config(name, config) -> Config:
    if not isinstance(config, Config):
        raise ArgumentError(f"{name}: expected an epcomm.Config, got {type(config).__name__}")
    return config


def split_x(x):
    """BF16 ``x`` or the FP8 pair ``(x_e4m3, scales)`` -> ``(x, scales or None)``."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ArgumentError(
                f"x: FP8 input is a pair (x_e4m3 [T, hidden], scales [T, S] float32 or int32), got {len(x)} items")
        return check_tensor("x", x[0], ndim=2), check_tensor("x_scales", x[1], ndim=2)
    return check_tensor("x", x, ndim=2), None


def unpack_bias(bias):
    """None, one tensor, or a pair (either may be None) -> (bias0, bias1)."""
    if bias is None:
        return None, None
    if isinstance(bias, (tuple, list)):
        if len(bias) != 2:
            raise ArgumentError(f"bias: expected a tensor or a pair of tensors, got {len(bias)} items")
        return (check_tensor("bias[0]", bias[0], ndim=2, allow_none=True),
                check_tensor("bias[1]", bias[1], ndim=2, allow_none=True))
    return check_tensor("bias", bias, ndim=2), None


def check_handle(handle, name="handle") -> DispatchHandle:
    if isinstance(handle, DispatchHandle):
        return handle
    if isinstance(handle, (tuple, list)) and len(handle) == 5:
        meta = handle[4]
        if isinstance(meta, (tuple, list)) and len(meta) == len(HandleMeta._fields):
            return DispatchHandle(handle[0], handle[1], handle[2], handle[3], HandleMeta(*meta))
    raise ArgumentError(f"{name}: expected the handle an epcomm dispatch returned "
                        f"(rank_prefix_matrix, chunk_offset, recv_src_idx, is_token_in_rank, meta), "
                        f"got {type(handle).__name__}")


def check_low_latency_handle(handle, name="handle") -> LowLatencyHandle:
    if isinstance(handle, LowLatencyHandle):
        return handle
    if isinstance(handle, (tuple, list)) and len(handle) == len(LowLatencyHandle._fields):
        ints = handle[2:]
        if all(not isinstance(v, bool) and hasattr(v, "__index__") for v in ints):
            return LowLatencyHandle(handle[0], handle[1], *(int(v) for v in ints))
    what = f"{len(handle)} items" if isinstance(handle, (tuple, list)) else type(handle).__name__
    raise ArgumentError(f"{name}: expected the handle epcomm's low_latency_dispatch returned (src_info, layout_range, "
                        f"num_max_dispatch_tokens_per_rank, hidden, num_experts, buffer_index), got {what}"
                        + (" (a 5-item DeepEP handle lacks buffer_index)" if what == "5 items" else ""))


def event_of(previous_event):
    """What the core waits for: None, an epcomm Event, or a cudaEvent_t integer.

    Takes an EventOverlap (an empty one means "no event", as in DeepEP), an EventHandle, an
    epcomm._epcomm.Event, or a recorded torch.cuda.Event."""
    if previous_event is None:
        return None
    ev = getattr(previous_event, "event", previous_event)  # EventOverlap -> its EventHandle
    if ev is None:
        return None
    ev = getattr(ev, "native", ev)  # EventHandle -> epcomm._epcomm.Event
    if isinstance(ev, Event):
        return ev
    raw = getattr(ev, "cuda_event", None)  # torch.cuda.Event
    if isinstance(raw, int) and raw != 0:
        return raw
    raise ArgumentError(f"previous_event: expected an EventOverlap from epcomm or a recorded torch.cuda.Event, "
                        f"got {type(previous_event).__name__}")
