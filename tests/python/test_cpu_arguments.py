"""Python CPU tests of the torch layer without PyTorch or a GPU: the argument helpers, handles
and events, the argument checks of every call (ValueError naming the argument before anything
reaches the core), the shrink-mode mask calls, reset, the receive hook, a Buffer made without torch
or a GPU failing clearly, the stream Buffer() gives the core, and test_exit.py's output rule.

    PYTHONPATH=python python -m pytest tests/python/test_cpu_arguments.py
    PYTHONPATH=python python tests/python/test_cpu_arguments.py     (without pytest: its own runner)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _cpu_stand_ins import (FakeTensor, NoCore, checks_buffer, fake_buffer,  # noqa: E402
                            single_process_group, torch)
from _runner import raises, run_tests, skip  # noqa: E402

import epcomm  # noqa: E402
from epcomm import _epcomm  # noqa: E402
from epcomm._args import (check_bool, check_handle, check_int, check_low_latency_handle,  # noqa: E402
                          check_tensor, event_of, split_x, unpack_bias)
from epcomm._low_latency import RecvHook  # noqa: E402
from epcomm.event import EventOverlap  # noqa: E402
from epcomm.handle import DispatchHandle, HandleMeta, LowLatencyHandle  # noqa: E402


# ---------------------------------------------------------------------------- helpers, handles, events
def test_argument_helpers():
    assert check_int("n", 5, lo=0) == 5
    raises(ValueError, lambda: check_int("num_worst_tokens", -1, lo=0), "num_worst_tokens = -1")
    raises(ValueError, lambda: check_int("expert_alignment", 1.5), "expert_alignment", "float")
    raises(ValueError, lambda: check_int("hidden", True), "hidden")
    assert check_bool("async_finish", False) is False and check_bool("x", 1) is True
    raises(ValueError, lambda: check_bool("async_finish", "yes"), "async_finish")
    raises(ValueError, lambda: check_tensor("topk_idx", None), "topk_idx", "None")
    raises(ValueError, lambda: check_tensor("topk_idx", [1, 2]), "topk_idx", "list")
    raises(ValueError, lambda: check_tensor("x", FakeTensor((2, 3, 4)), ndim=2), "x", "2 dimensions")
    x, s = FakeTensor((4, 256)), FakeTensor((4, 2), "torch.float32")
    assert split_x(x) == (x, None) and split_x((x, s)) == (x, s)
    raises(ValueError, lambda: split_x((x,)), "x", "pair")
    raises(ValueError, lambda: split_x((x, None)), "x_scales")
    assert unpack_bias(None) == (None, None) and unpack_bias(x) == (x, None) and unpack_bias((None, x)) == (None, x)
    raises(ValueError, lambda: unpack_bias((x, x, x)), "bias")


def test_handle_shape():
    meta = HandleMeta(10, 10, 1, 32, 7, 64)
    h = DispatchHandle("rpm", "co", "src", "in_rank", meta)
    assert h[0] == "rpm" and isinstance(h, tuple) and len(h) == 5
    assert check_handle(h) is h
    rebuilt = check_handle(tuple(h[:4]) + (tuple(meta),))  # a handle that lost its class (e.g. pickled)
    assert rebuilt.meta.num_tokens == 7 and rebuilt.rank_prefix_matrix == "rpm"
    for bad in (None, (1, 2, 3), ("a", "b", "c", "d", (1, 2))):
        raises(ValueError, lambda: check_handle(bad), "handle")


def test_events():
    assert event_of(None) is None
    assert event_of(EventOverlap()) is None  # an empty overlap means no event, as in DeepEP
    raises(ValueError, lambda: event_of(42), "previous_event")
    raises(RuntimeError, lambda: EventOverlap().current_stream_wait(), "async_finish")

    class FakeHandle:
        waits = 0

        def current_stream_wait(self):
            FakeHandle.waits += 1

    with EventOverlap(FakeHandle(), extra_tensors=(1,)) as overlap:
        assert FakeHandle.waits == 0 and overlap.extra_tensors == (1,)
    assert FakeHandle.waits == 1
    with EventOverlap():  # no event: nothing to wait for
        pass


def test_low_latency_handle_shape():
    h = LowLatencyHandle("src", "range", 128, 7168, 288, 1)
    assert isinstance(h, tuple) and len(h) == 6 and h[0] == "src" and h[5] == 1
    src_info, layout_range, tmax, hidden, num_experts, _ = h  # DeepEP code unpacks the first five the same way
    assert (tmax, hidden, num_experts) == (128, 7168, 288)
    assert check_low_latency_handle(h) is h
    rebuilt = check_low_latency_handle(["src", "range", 128, 7168, 288, 0])  # lost its class
    assert isinstance(rebuilt, LowLatencyHandle) and rebuilt.buffer_index == 0
    raises(ValueError, lambda: check_low_latency_handle(tuple(h[:5])), "handle", "buffer_index")
    raises(ValueError, lambda: check_low_latency_handle(("a", "b", 1.5, 7168, 288, 0)), "handle")
    raises(ValueError, lambda: check_low_latency_handle(("a", "b", True, 7168, 288, 0)), "handle")
    raises(ValueError, lambda: check_low_latency_handle(None), "handle", "NoneType")


# ---------------------------------------------------------------------------- argument checks before the core
def test_low_latency_argument_checks():
    b = fake_buffer(NoCore())
    x, idx = FakeTensor((8, 1024)), FakeTensor((8, 4), "torch.int64")

    def d(**kw):
        args = dict(x=x, topk_idx=idx, num_max_dispatch_tokens_per_rank=16, num_experts=32)
        args.update(kw)
        return lambda: b.low_latency_dispatch(**args)

    for fn, fragments in [
        (d(x=FakeTensor((2, 8, 1024))), ("x", "2 dimensions")),
        (d(x=[1, 2]), ("x", "list")),
        (d(topk_idx=FakeTensor((8,))), ("topk_idx",)),
        (d(num_max_dispatch_tokens_per_rank=0), ("num_max_dispatch_tokens_per_rank",)),
        (d(num_max_dispatch_tokens_per_rank="16"), ("num_max_dispatch_tokens_per_rank",)),
        (d(num_max_dispatch_tokens_per_rank=5000), ("num_max_dispatch_tokens_per_rank",)),
        (d(num_experts=0), ("num_experts",)),
        (d(num_experts=30), ("num_experts", "divisible")),
        (d(x=FakeTensor((8, 1000))), ("hidden", "128")),
        (d(cumulative_local_expert_recv_stats=FakeTensor((8, 1))), ("cumulative_local_expert_recv_stats",)),
        (d(dispatch_wait_recv_cost_stats=3), ("dispatch_wait_recv_cost_stats",)),
        (d(use_fp8="yes"), ("use_fp8",)),
        (d(round_scale=2), ("round_scale",)),
        (d(use_ue8m0=None), ("use_ue8m0",)),
        (d(async_finish=True, return_recv_hook=True), ("async_finish", "return_recv_hook")),
    ]:
        raises(ValueError, fn, *fragments)

    y, w = FakeTensor((8, 64, 1024)), FakeTensor((8, 4), "torch.float32")
    h = LowLatencyHandle(FakeTensor((8, 64), "torch.int32"), FakeTensor((8, 4), "torch.int64"), 16, 1024, 32, 0)

    def c(**kw):
        args = dict(x=y, topk_idx=idx, topk_weights=w, handle=h)
        args.update(kw)
        return lambda: b.low_latency_combine(**args)

    for fn, fragments in [
        (c(x=FakeTensor((64, 1024))), ("x", "3 dimensions")),
        (c(topk_idx=FakeTensor((8,))), ("topk_idx",)),
        (c(topk_weights=None), ("topk_weights",)),
        (c(handle=tuple(h[:5])), ("handle", "buffer_index")),
        (c(handle=h._replace(hidden=100)), ("hidden",)),
        (c(handle=h._replace(num_experts=30)), ("num_experts",)),
        (c(out=FakeTensor((8,))), ("out",)),
        (c(combine_wait_recv_cost_stats=FakeTensor((4, 1))), ("combine_wait_recv_cost_stats",)),
        (c(zero_copy="no"), ("zero_copy",)),
        (c(use_logfmt=1.0), ("use_logfmt",)),
        (c(async_finish=True, return_recv_hook=True), ("return_recv_hook",)),
    ]:
        raises(ValueError, fn, *fragments)
    raises(ValueError, lambda: b.get_next_low_latency_combine_buffer((1, 2, 3)), "handle")
    raises(ValueError, lambda: b.clean_low_latency_buffer(16, 0, 32), "hidden")
    raises(ValueError, lambda: b.low_latency_update_mask_buffer(-1), "rank_to_mask")
    raises(ValueError, lambda: b.low_latency_update_mask_buffer(0, "yes"), "mask")
    raises(ValueError, lambda: b.low_latency_query_mask_buffer([0, 0]), "mask_status")
    raises(ValueError, lambda: b.get_local_buffer_tensor(None, offset=-1), "offset")
    raises(ValueError, lambda: b.get_local_buffer_tensor(None, use_rdma_buffer="yes"), "use_rdma_buffer")

    # A destroyed buffer says so before anything else.
    gone = fake_buffer(None)
    for fn in (lambda: gone.low_latency_dispatch(x, idx, 16, 32), lambda: gone.low_latency_combine(y, idx, w, h),
               lambda: gone.clean_low_latency_buffer(16, 1024, 32), lambda: gone.get_next_low_latency_combine_buffer(h),
               lambda: gone.low_latency_update_mask_buffer(0), lambda: gone.low_latency_query_mask_buffer(x),
               gone.low_latency_clean_mask_buffer, lambda: gone.get_local_buffer_tensor(None)):
        raises(RuntimeError, fn, "destroy")


def test_normal_argument_checks_before_the_core():
    """docs/contract.md §6 on the Python side, normal mode: every bad value the Python layer can see
    raises ValueError naming the argument before anything reaches the core (so the buffer is
    untouched); type and shape rules of the tensors themselves are the core's (GPU tests)."""
    b = checks_buffer(NoCore())
    x, x8, s = FakeTensor((8, 256)), FakeTensor((8, 256), "torch.float8_e4m3fn"), FakeTensor((8, 2), "torch.float32")
    idx, w = FakeTensor((8, 4), "torch.int64"), FakeTensor((8, 4), "torch.float32")
    layout = dict(num_tokens_per_rank=FakeTensor((4,), "torch.int32"), is_token_in_rank=FakeTensor((8, 4), "torch.bool"),
                  num_tokens_per_expert=FakeTensor((16,), "torch.int32"))
    h = DispatchHandle("rpm", "co", "src", "in_rank", HandleMeta(10, 10, 1, 32, 8, 16))

    def d(**kw):
        args = dict(x=x, topk_idx=idx, topk_weights=w, **layout)
        args.update(kw)
        return lambda: b.dispatch(**args)

    def c(**kw):
        args = dict(x=FakeTensor((10, 256)), handle=h)
        args.update(kw)
        return lambda: b.combine(**args)

    cases = [
        (lambda: b.get_dispatch_layout([1, 2], 16), ("topk_idx", "list")),
        (lambda: b.get_dispatch_layout(FakeTensor((8,), "torch.int64"), 16), ("topk_idx", "2 dimensions")),
        (lambda: b.get_dispatch_layout(idx, 0), ("num_experts",)),
        (lambda: b.get_dispatch_layout(idx, "16"), ("num_experts",)),
        (lambda: b.get_dispatch_layout(idx, 16, async_finish="yes"), ("async_finish",)),
        (lambda: b.get_dispatch_layout(idx, 16, allocate_on_comm_stream=2), ("allocate_on_comm_stream",)),
        (lambda: b.get_dispatch_layout(idx, 16, previous_event=42), ("previous_event",)),
        (d(x=[1, 2]), ("x",)),
        (d(x=(x8,)), ("x", "pair")),
        (d(x=(x8, None)), ("x_scales",)),
        (d(x=(x8, s, s)), ("x",)),
        (d(config="fast"), ("config",)),
        (d(expert_alignment=0), ("expert_alignment",)),
        (d(expert_alignment=1.5), ("expert_alignment",)),
        (d(num_worst_tokens=-1), ("num_worst_tokens",)),
        (d(async_finish="yes"), ("async_finish",)),
        (d(allocate_on_comm_stream=None), ("allocate_on_comm_stream",)),
        (d(previous_event=42), ("previous_event",)),
        (d(num_tokens_per_rank=None), ("num_tokens_per_rank",)),
        (d(topk_idx=FakeTensor((8,), "torch.int64")), ("topk_idx",)),
        (d(handle=h), ("topk_idx", "cached")),
        (d(handle=(1, 2, 3), topk_idx=None, topk_weights=None), ("handle",)),
        (c(x=[1]), ("x",)),
        (c(x=FakeTensor((10, 4, 256))), ("x", "2 dimensions")),
        (c(handle=(1, 2, 3)), ("handle",)),
        (c(handle=None), ("handle",)),
        (c(topk_weights=FakeTensor((10,), "torch.float32")), ("topk_weights",)),
        (c(bias=(x, x, x)), ("bias",)),
        (c(config=3), ("config",)),
        (c(async_finish=2), ("async_finish",)),
        (c(previous_event="event"), ("previous_event",)),
    ]
    for fn, fragments in cases:
        raises(ValueError, fn, *fragments)


class _MaskRuntime:
    """Records what the Python layer passes to the core's shrink-mode calls."""

    def __init__(self):
        self.calls = []

    def low_latency_update_mask_buffer(self, rank, mask, stream):
        self.calls.append(("update", rank, mask, stream))

    def low_latency_query_mask_buffer(self, mask_status, stream):
        self.calls.append(("query", mask_status, stream))

    def low_latency_clean_mask_buffer(self, stream):
        self.calls.append(("clean", stream))


def test_shrink_mask_api():
    """The shrink-mode mask calls reach the core with DeepEP's arguments and the current stream; a
    bad value raises ValueError naming the argument and reaches nothing, and the next call works."""
    rt = _MaskRuntime()
    b = checks_buffer(rt, num_ranks=4)
    status = FakeTensor((4,), "torch.int32")
    b.low_latency_update_mask_buffer(2, True)
    b.low_latency_update_mask_buffer(2)  # DeepEP's default: mask=False unmasks
    b.low_latency_query_mask_buffer(status)
    b.low_latency_clean_mask_buffer()
    assert rt.calls == [("update", 2, True, 0), ("update", 2, False, 0), ("query", status, 0), ("clean", 0)]
    for fn, fragments in [
        (lambda: b.low_latency_update_mask_buffer(4, True), ("rank_to_mask", "[0, 4)")),
        (lambda: b.low_latency_update_mask_buffer(-1, True), ("rank_to_mask",)),
        (lambda: b.low_latency_update_mask_buffer(1.0, True), ("rank_to_mask",)),
        (lambda: b.low_latency_update_mask_buffer(1, "yes"), ("mask",)),
        (lambda: b.low_latency_query_mask_buffer(None), ("mask_status",)),
        (lambda: b.low_latency_query_mask_buffer(FakeTensor((4, 1), "torch.int32")), ("mask_status",)),
    ]:
        before = len(rt.calls)
        raises(ValueError, fn, *fragments)
        assert len(rt.calls) == before, "a bad argument reached the core"
        b.low_latency_update_mask_buffer(1, True)
        assert rt.calls[-1] == ("update", 1, True, 0)
    # enable_shrink reaches the core's constructor (which then fails for want of a GPU here).
    if _epcomm.device_count() == 0:
        uid = _epcomm.get_unique_id()
        raises(RuntimeError, lambda: _epcomm.Runtime(uid, 1, 0, 0, 1 << 20, enable_shrink=True), "no CUDA device")


def test_reset_reaches_the_core():
    """Buffer.reset() (an epcomm extension: the collective way back after a failed call) is the
    core's reset; a destroyed buffer says so instead."""
    class _ResetRuntime:
        def __init__(self):
            self.resets = 0

        def reset(self):
            self.resets += 1

    rt = _ResetRuntime()
    b = checks_buffer(rt, num_ranks=2)
    b.reset()
    b.reset()
    assert rt.resets == 2
    assert hasattr(_epcomm.Runtime, "reset")
    b.runtime = None
    raises(RuntimeError, b.reset, "destroyed")


def test_recv_hook_object():
    class FakeCall:
        recv_pending, received = True, 0

        def recv(self):
            FakeCall.received += 1
            FakeCall.recv_pending = False

    hook = RecvHook(FakeCall(), ("tensors",), "low_latency_dispatch")
    assert "pending" in repr(hook)
    assert hook() is None and FakeCall.received == 1
    assert "received" in repr(hook)


def test_buffer_without_torch_or_gpu_fails_clearly():
    if torch is None:
        raises(RuntimeError, lambda: epcomm.Buffer(None), "PyTorch")
        raises(RuntimeError, lambda: epcomm.Buffer.capture(), "PyTorch")
        return
    if torch.cuda.is_available():
        skip("a GPU is visible")
    raises(ValueError, lambda: epcomm.Buffer(None), "group")
    raises(ValueError, lambda: epcomm.Buffer(object(), num_nvl_bytes=-1), "num_nvl_bytes")
    with single_process_group() as group:
        raises(RuntimeError, lambda: epcomm.Buffer(group, num_nvl_bytes=1 << 20), "no CUDA GPU")


# ---------------------------------------------------------------------------- clean exit (test_exit.py's CPU side)
def test_exit_output_rule_catches_the_abort():
    """test_exit.py's output rule flags the abort it exists for and lets a clean run through."""
    from _exit_check import noise_lines, problems

    seen = ("exit-worker rank 0: every call matched the reference (exit)\n"
            "terminate called after throwing an instance of 'c10::AcceleratorError'\n"
            "  what():  CUDA error: context is destroyed\n"
            "Exception raised from insert_events at /pytorch/c10/cuda/CUDACachingAllocator.cpp:3726\n")
    assert len(noise_lines(seen)) == 2
    assert noise_lines("CUDA error: invalid device context") != []
    clean = "exit-worker rank 1: every call matched the reference (destroy)\n"
    assert noise_lines(clean) == [] and problems([(0, clean)]) == []
    assert len(problems([(0, clean), (-6, seen), (None, ""), (0, "no done line")])) == 3


class _PoolStream:
    """Stands in for torch.cuda.Stream (a stream of PyTorch's pool)."""
    made = []

    def __init__(self, device=None, priority=0):
        self.device, self.cuda_stream = device, 0x5000 + len(_PoolStream.made)
        _PoolStream.made.append(self)


def test_buffer_gives_the_core_a_pool_stream():
    """Buffer() makes its communication stream with torch.cuda.Stream (PyTorch's pool: never
    destroyed, so the caching allocator may record events on it after the buffer is gone), hands
    that stream to the core and record_streams on the same one. Before, it wrapped the core's own
    stream, which died with the buffer (test_exit.py)."""
    import types

    from epcomm import buffer as buffer_module

    made = {}

    class _Runtime:
        num_nodes, max_tokens_per_rank = 1, 4096

        def __init__(self, *args, **kwargs):
            made.update(kwargs, args=args)

        @property
        def comm_stream(self):
            raise AssertionError("the Python layer must not wrap a stream the core owns")

    def all_gather_object(objects, obj, group):
        objects[:] = [obj] * len(objects)

    fake_torch = types.SimpleNamespace(
        cuda=types.SimpleNamespace(is_available=lambda: True, current_device=lambda: 0, Stream=_PoolStream),
        device=lambda kind, index: (kind, index),
        distributed=types.SimpleNamespace(all_gather_object=all_gather_object))

    class _Group:
        def rank(self):
            return 0

        def size(self):
            return 1

    saved = buffer_module.require_torch, _epcomm.Runtime, _epcomm.get_unique_id
    buffer_module.require_torch = lambda what: fake_torch
    _epcomm.Runtime, _epcomm.get_unique_id = _Runtime, lambda: b"u" * 128
    try:
        _PoolStream.made.clear()
        b = epcomm.Buffer(_Group(), num_nvl_bytes=1 << 20, explicitly_destroy=True)
    finally:
        buffer_module.require_torch, _epcomm.Runtime, _epcomm.get_unique_id = saved
    assert len(_PoolStream.made) == 1, "one stream from the pool"
    pool = _PoolStream.made[0]
    assert made["comm_stream"] == pool.cuda_stream, "the core must run on the pool stream"
    assert b._comm_stream is pool, "the Python layer must record_stream on the same stream"
    assert pool.device == ("cuda", 0)
    assert "comm_stream" in _epcomm.Runtime.__init__.__doc__, "the core's constructor takes the stream"


# ---------------------------------------------------------------------------- without pytest
if __name__ == "__main__":
    run_tests(globals())
