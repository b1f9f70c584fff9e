"""Stand-ins for what the Python CPU tests (test_cpu_*.py) cannot have: PyTorch where it is not
installed (need_torch skips), a tensor without torch (FakeTensor), a Buffer without a GPU or a group
(fake_buffer, checks_buffer) over a core that must not be reached (NoCore), a gloo group of one
process, and tensors over host memory the Python layer passes to the core as pointers."""

import collections
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _runner import skip  # noqa: E402

import epcomm  # noqa: E402
from epcomm import _epcomm  # noqa: E402

try:
    import torch
except ImportError:
    torch = None


def need_torch():
    if torch is None:
        skip("PyTorch is not installed")


class FakeTensor:
    """Just what the core reads from a tensor (duck typing, no torch)."""

    def __init__(self, shape, dtype="torch.bfloat16", ptr=0x1000, strides=None, device=0):
        self.shape, self.dtype, self._ptr, self._device = tuple(shape), dtype, ptr, device
        if strides is None:
            strides, acc = [], 1
            for n in reversed(self.shape):
                strides.insert(0, acc)
                acc *= n
        self._strides = tuple(strides)

    def data_ptr(self):
        return self._ptr

    def stride(self):
        return self._strides

    def get_device(self):
        return self._device

    def dim(self):
        return len(self.shape)

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[dim]


class NoCore:
    """A Runtime stand-in that fails the test if the Python layer reaches the core."""

    def __getattr__(self, name):
        def reached(*args, **kwargs):
            raise AssertionError(f"the argument error was not caught before Runtime.{name}")
        return reached


def fake_buffer(runtime, num_ranks=4, device=None):
    """A Buffer without a GPU or a group: only what the Python layer reads (tests of the checks)."""
    b = object.__new__(epcomm.Buffer)
    b.runtime, b.group_size, b._ll_shapes, b._device = runtime, num_ranks, set(), device
    b._num_nodes, b._chunk_offset_strides, b._default_configs = 1, {}, {}
    b._max_recv_rows = num_ranks * 65536
    b._recent_rows = collections.deque(maxlen=epcomm.Buffer.RESERVE_WINDOW)
    return b


class CpuDevice:
    """What the Python layer reads of a torch.device when there is no torch: a host stand-in."""
    type, index = "cpu", None


def checks_buffer(runtime, num_ranks=4):
    """fake_buffer plus the normal-mode state the Python layer reads before it reaches the core."""
    b = fake_buffer(runtime, num_ranks=num_ranks, device=CpuDevice())
    b._num_nodes, b._chunk_offset_strides, b._default_configs = 1, {}, {}
    return b


class single_process_group:
    """A gloo group of one process, for code that wants a torch.distributed group."""

    def __enter__(self):
        import torch.distributed as dist

        self.owned = not dist.is_initialized()
        if self.owned:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        return dist.group.WORLD

    def __exit__(self, *exc):
        import torch.distributed as dist

        if self.owned:
            dist.destroy_process_group()


def host_view(ptr, shape, dtype):
    """A tensor over host memory the Python layer allocated and passed to the core as a pointer."""
    from torch.utils.dlpack import from_dlpack

    numel = 1
    for n in shape:
        numel *= n
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    return from_dlpack(_epcomm.wrap_memory(ptr, nbytes, -1, None)).view(dtype).view(shape)


class NullCall:
    """What a core call returns (LowLatencyCall / DispatchCall), doing nothing: no event, the data
    phase "already ran", the hook's receive half a no-op."""

    event, buffer_index, recv_pending, ran = None, 0, False, True

    def __init__(self, num_rows=0, meta=None, hook=False):
        self.num_rows, self.meta, self.recv_pending = num_rows, meta, hook
        self.num_recv_tokens_per_expert = [num_rows]

    def recv(self):
        self.recv_pending = False

    def take_event(self):
        return None

    def run(self, *outputs):
        return None


class NullRuntime:
    """A Runtime stand-in that takes every call the Python layer makes, with the same arguments, and
    does nothing: the Python layer's own host time (checks, allocations, handles) can be timed
    without a GPU (bench_host_cpu.py). Normal dispatch reports `rows` received rows."""

    max_tokens_per_rank, num_nodes = 65536, 1

    def __init__(self, rows=0, num_experts=1):
        self.rows, self.meta = rows, (rows, rows, 1, 32, rows, num_experts)
        self.ll_call = NullCall()  # made once: the stand-in's own time stays out of the figures

    def low_latency_dispatch(self, x, topk_idx, tmax, num_experts, cum_stats, wait_stats, use_fp8, round_scale,
                             use_ue8m0, recv_x, recv_x_scales, recv_count, src_info, layout_range, stream,
                             async_finish, return_recv_hook):
        return NullCall(hook=True) if return_recv_hook else self.ll_call

    def low_latency_combine(self, x, topk_idx, topk_weights, src_info, layout_range, tmax, hidden, num_experts,
                            buffer_index, out, wait_stats, use_logfmt, zero_copy, stream, async_finish,
                            return_recv_hook):
        return NullCall(hook=True) if return_recv_hook else self.ll_call

    def get_dispatch_layout(self, topk_idx, num_experts, ntpr, ntprr, ntpe, in_rank, stream, prev, async_finish):
        return None

    def chunk_offset_stride(self, config):
        return 4

    def dispatch_prepare(self, x, x_scales, topk_idx, topk_weights, ntpr, in_rank, ntpe, alignment, num_worst_tokens,
                         config, rank_prefix_matrix, chunk_offset, stream, previous_event, async_finish, reserved):
        call = NullCall(self.rows, self.meta)
        call.ran = reserved is not None and self.rows <= reserved[-1]
        return call

    def cached_dispatch(self, x, x_scales, rank_prefix_matrix, chunk_offset, recv_src_idx, is_token_in_rank, meta,
                        recv_x, recv_x_scales, config, stream, previous_event, async_finish):
        return None

    def combine(self, x, topk_weights, bias0, bias1, rank_prefix_matrix, chunk_offset, recv_src_idx, is_token_in_rank,
                meta, combined_x, combined_topk_weights, config, stream, previous_event, async_finish):
        return None
