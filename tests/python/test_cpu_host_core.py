"""Python CPU tests of the Python layer over a core on host memory, with PyTorch on the CPU
(skipped where it is not installed): memory the core hands out keeps its owner alive, the local
and combine buffer views, low-latency dispatch / combine (hooks, zero copy, out=) over a host core,
and normal-mode dispatch reserving its receive tensors before the count exchange.

    PYTHONPATH=python python -m pytest tests/python/test_cpu_host_core.py
    PYTHONPATH=python python tests/python/test_cpu_host_core.py     (without pytest: its own runner)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _cpu_stand_ins import fake_buffer, host_view, need_torch, torch  # noqa: E402
from _runner import raises, run_tests  # noqa: E402

import epcomm  # noqa: E402
from epcomm import _epcomm  # noqa: E402
from epcomm.handle import LowLatencyHandle  # noqa: E402


# ---------------------------------------------------------------------------- memory views
class _MemoryRuntime:
    """Runtime stand-in whose local buffers are host memory (what get_local_buffer_tensor and
    get_next_low_latency_combine_buffer wrap)."""

    def __init__(self):
        self.memory = torch.arange(512, dtype=torch.int64).to(torch.uint8)

    def local_buffer(self, rdma):
        return self.memory.data_ptr() + (256 if rdma else 0), 256

    def next_combine_buffer(self, src_info, layout_range, tmax, hidden, num_experts, buffer_index):
        assert (tmax, hidden, num_experts, buffer_index) == (2, 32, 4, 1)
        return self.memory.data_ptr() + 128, 2 * 2 * 32 * 2, (2, 2, 32)


def test_wrap_memory_keeps_its_owner():
    need_torch()
    import gc
    import weakref

    from torch.utils.dlpack import from_dlpack

    class Owner:
        pass

    data = torch.arange(16, dtype=torch.int32)
    owner = Owner()
    alive = weakref.ref(owner)
    t = from_dlpack(_epcomm.wrap_memory(data.data_ptr(), 64, -1, owner))
    del owner
    gc.collect()
    assert t.dtype == torch.uint8 and t.shape == (64,) and t.data_ptr() == data.data_ptr()
    assert torch.equal(t.view(torch.int32), data)
    part = t.view(torch.int32)[3:5]
    del t
    gc.collect()
    assert alive() is not None and part.tolist() == [3, 4]
    del part
    gc.collect()
    assert alive() is None
    unused = _epcomm.wrap_memory(data.data_ptr(), 64, -1, Owner())  # a capsule nobody consumed frees itself
    del unused
    raises(ValueError, lambda: _epcomm.wrap_memory(0, 8, -1, None), "ptr")
    raises(ValueError, lambda: _epcomm.wrap_memory(data.data_ptr(), -1, -1, None), "nbytes")


def _local_buffer_errors(b):
    raises(ValueError, lambda: b.get_local_buffer_tensor(torch.int32, offset=2), "offset", "multiple of 4")
    raises(ValueError, lambda: b.get_local_buffer_tensor(torch.int32, offset=260), "offset")
    raises(ValueError, lambda: b.get_local_buffer_tensor(torch.int32, size=(65,)), "size")
    raises(ValueError, lambda: b.get_local_buffer_tensor("float32"), "dtype")


def test_local_buffer_and_combine_buffer_views():
    need_torch()
    import gc
    import weakref

    rt = _MemoryRuntime()
    b = fake_buffer(rt, num_ranks=2, device=torch.device("cpu"))
    whole = b.get_local_buffer_tensor(torch.int16, use_rdma_buffer=True)
    assert whole.dtype == torch.int16 and whole.numel() == 128 and whole.data_ptr() == rt.memory.data_ptr() + 256
    assert torch.equal(whole, rt.memory[256:].view(torch.int16))
    part = b.get_local_buffer_tensor(torch.uint8, size=torch.Size([2, 3]), offset=4)
    assert torch.equal(part, rt.memory[4:10].view(2, 3))
    assert b.get_local_buffer_tensor(torch.int32, size=(64,)).numel() == 64
    assert b.get_local_buffer_tensor(torch.uint8, size=7, offset=249).numel() == 7
    assert b.get_local_buffer_tensor(torch.uint8, offset=256).numel() == 0
    _local_buffer_errors(b)
    part[0, 0] = 200
    assert int(rt.memory[4]) == 200  # a view, not a copy

    view = b.get_next_low_latency_combine_buffer(LowLatencyHandle(None, None, 2, 32, 4, 1))
    assert view.dtype == torch.bfloat16 and view.shape == (2, 2, 32)
    assert view.data_ptr() == rt.memory.data_ptr() + 128
    alive = weakref.ref(b)
    del b, whole, part
    gc.collect()
    assert alive() is not None  # the view keeps its Buffer
    del view
    gc.collect()
    assert alive() is None


# ---------------------------------------------------------------------------- low-latency mode over a host core
class _HostLowLatencyCall:
    def __init__(self, buffer_index, receive, hook):
        self.event, self.buffer_index, self._receive, self.recv_pending = None, buffer_index, receive, hook
        if not hook:
            receive()

    def recv(self):
        assert self.recv_pending, "the hook ran twice"
        self._receive()
        self.recv_pending = False


class _HostLowLatencyRuntime:
    """docs/contract.md §3.3 for one rank on host memory, BF16 only, called exactly as the Python layer calls
    epcomm._epcomm.Runtime (positional arguments, outputs as data pointers): the Python layer's
    allocation, argument order, handle, hooks, zero_copy and out= are checked without a GPU. Rows of
    an expert arrive shuffled, as a GPU may deliver them."""

    def __init__(self):
        self.next_buffer, self.combine_buffers = 0, {}

    def low_latency_dispatch(self, x, topk_idx, tmax, num_experts, cum_stats, wait_stats, use_fp8, round_scale,
                             use_ue8m0, recv_x, recv_x_scales, recv_count, src_info, layout_range, stream,
                             async_finish, return_recv_hook):
        assert not use_fp8 and recv_x_scales is None and stream == 0 and not async_finish
        EL, H = num_experts, x.size(1)
        rx = host_view(recv_x, (EL, tmax, H), torch.bfloat16)
        count = host_view(recv_count, (EL,), torch.int32)
        src = host_view(src_info, (EL, tmax), torch.int32)
        ranges = host_view(layout_range, (EL, 1), torch.int64)
        gen = torch.Generator().manual_seed(self.next_buffer)

        def receive():
            for e in range(EL):
                tokens = (topk_idx == e).nonzero()[:, 0]
                tokens = tokens[torch.randperm(tokens.numel(), generator=gen)]
                n = tokens.numel()
                rx[e, :n], src[e, :n], ranges[e, 0], count[e] = x[tokens], tokens.int(), n, n
            if cum_stats is not None:
                cum_stats.add_(count)

        self.next_buffer ^= 1
        return _HostLowLatencyCall(self.next_buffer ^ 1, receive, return_recv_hook)

    def low_latency_combine(self, x, topk_idx, topk_weights, src_info, layout_range, tmax, hidden, num_experts,
                            buffer_index, out, wait_stats, use_logfmt, zero_copy, stream, async_finish,
                            return_recv_hook):
        T, K = topk_idx.shape
        out = host_view(out, (T, hidden), torch.bfloat16) if isinstance(out, int) else out
        y = self.combine_buffers[buffer_index] if zero_copy else x

        def receive():
            acc = torch.zeros(T, hidden)
            for t in range(T):
                for k in range(K):
                    e = int(topk_idx[t, k])
                    if e >= 0:
                        slot = int((src_info[e] == t).nonzero()[0])
                        acc[t] = acc[t] + topk_weights[t, k] * y[e, slot].float()
            out.copy_(acc.to(torch.bfloat16))

        return _HostLowLatencyCall(buffer_index, receive, return_recv_hook)

    def next_combine_buffer(self, src_info, layout_range, tmax, hidden, num_experts, buffer_index):
        y = self.combine_buffers.setdefault(buffer_index, torch.zeros(num_experts, tmax, hidden,
                                                                      dtype=torch.bfloat16))
        return y.data_ptr(), y.numel() * 2, (num_experts, tmax, hidden)


def test_low_latency_python_layer_over_a_host_core():
    need_torch()
    import _reference as ref

    b = fake_buffer(_HostLowLatencyRuntime(), num_ranks=1, device=torch.device("cpu"))
    T, H, K, E, tmax = 12, 256, 4, 8, 16
    g = torch.Generator().manual_seed(4)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    topk, w = ref.random_topk(T, K, E, g, drop=0.2), torch.rand(T, K, generator=g)
    cum = torch.zeros(E, dtype=torch.int32)
    factor = ref.expert_scale(E)
    want = ref.ll_combine(topk, w, lambda k: ref.ll_expert(x.float(), factor[topk[:, k].clamp(min=0)].unsqueeze(1)))
    buffers, rounds = [], 0
    for hook in (False, True):
        for zero_copy in (False, True):
            for use_out in (False, True):
                what = f"hook={hook} zero_copy={zero_copy} out={use_out}"
                recv, count, handle, event, recv_hook = b.low_latency_dispatch(
                    x, topk, tmax, E, cumulative_local_expert_recv_stats=cum, use_fp8=False, return_recv_hook=hook)
                assert event.event is None and (recv_hook is not None) == hook, what
                if hook:
                    assert recv_hook() is None
                    raises(AssertionError, recv_hook, "twice")
                assert recv.shape == (E, tmax, H) and recv.dtype == torch.bfloat16, what
                assert isinstance(handle, LowLatencyHandle) and handle[2:5] == (tmax, H, E), what
                assert handle.src_info.shape == (E, tmax) and handle.layout_range.shape == (E, 1), what
                assert count.tolist() == [int((topk == e).sum()) for e in range(E)], what
                buffers.append(handle.buffer_index)
                y = torch.stack([ref.ll_expert(recv[e].float(), factor[e]) for e in range(E)])
                if zero_copy:
                    view = b.get_next_low_latency_combine_buffer(handle)
                    assert view.shape == (E, tmax, H) and view.dtype == torch.bfloat16
                    view.copy_(y)
                    y = view
                out = torch.empty(T, H, dtype=torch.bfloat16) if use_out else None
                cx, event, recv_hook = b.low_latency_combine(y, topk, w, handle, zero_copy=zero_copy,
                                                             return_recv_hook=hook, out=out)
                if hook:
                    recv_hook()
                assert cx is out if use_out else cx.shape == (T, H), what
                assert torch.equal(cx.float(), want.to(torch.bfloat16).float()), what
                rounds += 1
    assert buffers == [0, 1] * (rounds // 2)
    assert cum.tolist() == [rounds * int((topk == e).sum()) for e in range(E)]


# ---------------------------------------------------------------------------- normal mode over a host core
class _HostDispatchCall:
    """DispatchCall of a one-rank group on host memory: the rows that arrive are this rank's tokens
    with is_token_in_rank[:, 0], in order. Like the extension, it runs the data phase inside
    dispatch_prepare when the reserved outputs have room, and otherwise waits for run()."""

    def __init__(self, runtime, x, topk_idx, topk_weights, in_rank, num_worst_tokens, reserved):
        self.runtime, self.x, self.topk_idx, self.topk_weights = runtime, x, topk_idx, topk_weights
        self.src = in_rank[:, 0].nonzero().flatten()
        self.num_rows = num_worst_tokens or self.src.numel()
        self.num_recv_tokens_per_expert = [] if num_worst_tokens else [self.src.numel()]
        self.meta_value = (-1 if num_worst_tokens else self.src.numel(), self.num_rows, 1, 32, x.size(0), 1)
        self.ran = False
        if reserved is not None and self.num_rows <= reserved[5]:
            self._move(*reserved[:5])
            runtime.launches.append("prepare+data")
        else:
            runtime.launches.append("prepare")

    def _move(self, recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, recv_src_idx):
        assert not self.ran, "the data phase ran twice"
        rows, n, K = self.num_rows, self.src.numel(), 0 if self.topk_idx is None else self.topk_idx.size(1)
        host_view(recv_x, (rows, self.x.size(1)), self.x.dtype)[:n] = self.x[self.src]
        host_view(recv_src_idx, (rows,), torch.int32)[:n] = self.src.int()
        if recv_topk_idx is not None:
            host_view(recv_topk_idx, (rows, K), torch.int64)[:n] = self.topk_idx[self.src]
        if recv_topk_weights is not None:
            w = self.topk_weights[self.src]
            host_view(recv_topk_weights, (rows, K), torch.float32)[:n] = torch.where(
                self.topk_idx[self.src] >= 0, w, torch.zeros_like(w))
        assert recv_x_scales is None
        self.ran = True

    def take_event(self):
        return None

    def run(self, *outputs):
        assert all(o is None or isinstance(o, int) for o in outputs)
        self._move(*outputs)
        self.runtime.launches.append("run")
        return None

    @property
    def meta(self):
        assert self.ran
        return self.meta_value


class _HostNormalRuntime:
    def __init__(self):
        self.launches, self.reserved = [], []

    def chunk_offset_stride(self, config):
        return 4

    def dispatch_prepare(self, x, x_scales, topk_idx, topk_weights, ntpr, in_rank, ntpe, alignment, num_worst_tokens,
                         config, rank_prefix_matrix, chunk_offset, stream, previous_event, async_finish, reserved):
        assert x_scales is None and stream == 0 and previous_event is None and not async_finish
        self.reserved.append(None if reserved is None else reserved[5])
        return _HostDispatchCall(self, x, topk_idx, topk_weights, in_rank, num_worst_tokens, reserved)


def test_dispatch_reserves_receive_tensors_before_the_count_exchange():
    need_torch()
    import _reference as ref

    rt = _HostNormalRuntime()
    b = fake_buffer(rt, num_ranks=1, device=torch.device("cpu"))
    H, K, E = 64, 2, 4
    g = torch.Generator().manual_seed(5)

    def dispatch(T, drop, **kw):
        x = torch.randn(T, H, generator=g).to(torch.bfloat16)
        topk, w = ref.random_topk(T, K, E, g, drop=drop, nowhere=drop), torch.rand(T, K, generator=g)
        ntpr, ntpe, in_rank = ref.layout(topk, E, 1)
        recv, ridx, rw, counts, handle, event = b.dispatch(x, num_tokens_per_rank=ntpr, is_token_in_rank=in_rank,
                                                           num_tokens_per_expert=ntpe, topk_idx=topk, topk_weights=w,
                                                           **kw)
        src = in_rank[:, 0].nonzero().flatten()
        n, rows = src.numel(), handle.meta.num_rows
        assert event.event is None and rows == kw.get("num_worst_tokens", n)
        want_w = torch.where(topk[src] >= 0, w[src], torch.zeros_like(w[src]))
        for got, want in ((recv, x[src]), (ridx, topk[src]), (rw, want_w), (handle.recv_src_idx, src.int())):
            assert got.shape[0] == rows and got.is_contiguous() and got._base is None
            assert torch.equal(got[:n], want)
        return recv, handle

    # The first dispatch has nothing to size a reservation by: allocated after the counts.
    recv, handle = dispatch(300, 0.5)
    rows0 = handle.meta.num_rows
    assert rt.reserved == [None] and rt.launches == ["prepare", "run"]
    assert recv.storage().size() == rows0 * H  # exactly the rows received
    # Then the peak of recent row counts + 1/32, rounded up to 128 rows; the data phase runs inside
    # dispatch_prepare, and the tensors have exactly the rows received.
    recv, handle = dispatch(200, 0.5)
    reserve = -(-(rows0 + rows0 // 32) // 128) * 128
    assert rt.reserved[-1] == reserve and rt.launches[2:] == ["prepare+data"]
    assert recv.storage().size() == reserve * H and recv.shape == (handle.meta.num_rows, H)
    recv.mul_(2)  # an ordinary tensor: in-place ops work
    # More rows than reserved: allocated after the counts, exactly.
    recv, handle = dispatch(600, 0.0)
    assert handle.meta.num_rows > reserve and recv.storage().size() == handle.meta.num_rows * H
    assert rt.launches[3:] == ["prepare", "run"]
    big = handle.meta.num_rows
    assert dispatch(10, 0.0)[0].storage().size() == -(-(big + big // 32) // 128) * 128 * H
    # num_worst_tokens: exactly that many rows, reserved up front.
    recv, handle = dispatch(50, 0.2, num_worst_tokens=77)
    assert rt.reserved[-1] == 77 and recv.shape == (77, H) and handle.meta.num_recv_tokens == -1
    assert rt.launches[-1] == "prepare+data"
    # The reservation follows the last RESERVE_WINDOW dispatches; switched off, nothing is reserved.
    for _ in range(epcomm.Buffer.RESERVE_WINDOW):
        dispatch(20, 0.0)
    assert rt.reserved[-1] == 128
    epcomm.Buffer.reserve_recv_rows = False
    try:
        recv, handle = dispatch(20, 0.0)
        assert rt.reserved[-1] is None and recv.storage().size() == 20 * H
    finally:
        epcomm.Buffer.reserve_recv_rows = True


# ---------------------------------------------------------------------------- without pytest
if __name__ == "__main__":
    run_tests(globals())
