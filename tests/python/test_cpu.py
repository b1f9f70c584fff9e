"""Python tests that need no GPU (CI): the extension builds and imports, Config and its hints, the
dtype and tensor-view mapping, error translation, the argument checks of the torch layer, the
DeepEP-compatible signatures (docs/contract.md §4), and a Buffer made without a GPU failing with a
clear message. Parts that need PyTorch skip with a visible reason where it is not installed; where
it is (CPU-only is enough), the torch references of the GPU tests and the MoE example's autograd
wiring are checked too.

    PYTHONPATH=python python -m pytest tests/python/test_cpu.py    (or: python tests/python/test_cpu.py)
"""

import collections
import inspect
import os
import pickle
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _runner import raises, run_tests, skip  # noqa: E402

import epcomm
from epcomm import _epcomm
from epcomm._args import (check_bool, check_handle, check_int, check_low_latency_handle, check_tensor, event_of,
                          split_x, unpack_bias)
from epcomm._low_latency import RecvHook
from epcomm.event import EventOverlap
from epcomm.handle import DispatchHandle, HandleMeta, LowLatencyHandle

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


# ---------------------------------------------------------------------------- the extension
def test_extension_imports():
    assert epcomm.__version__ == _epcomm.__version__
    assert epcomm.Buffer.is_sm90_compiled() is ("90" in _epcomm.cuda_architectures)
    assert isinstance(_epcomm.nccl_version(), int) and _epcomm.nccl_version() >= 22800
    assert _epcomm.device_count() >= 0
    assert {"Buffer", "Config", "EventOverlap", "topk_idx_t"} <= set(dir(epcomm))
    assert epcomm.topk_idx_t is (None if torch is None else torch.int64)


def test_config_positional_order_and_fields():
    c = epcomm.Config(20, 6, 256, 6, 128)  # DeepEP's positional order
    assert (c.num_sms, c.nvl_chunk_size, c.nvl_buffer_size, c.rdma_chunk_size, c.rdma_buffer_size) == (20, 6, 256, 6, 128)
    assert (c.num_max_nvl_chunked_send_tokens, c.num_max_nvl_chunked_recv_tokens) == (6, 256)
    assert c.chunk_tokens == 8  # clamped into what the kernels support
    kw = epcomm.Config(num_sms=24, nvl_chunk_size=32, nvl_buffer_size=128, rdma_chunk_size=16, rdma_buffer_size=64)
    assert "rdma_buffer_size=64" in repr(kw)
    back = pickle.loads(pickle.dumps(kw))
    assert repr(back) == repr(kw)
    for bad in ((0, 32, 128), (24, 0, 128), (24, 32, -1), (24, 32, 128, 0), (24, 32, 128, 16, 0)):
        raises(ValueError, lambda: epcomm.Config(*bad), "must be positive")
    e = raises(ValueError, lambda: epcomm.Config(0, 32, 128), "num_sms")
    assert isinstance(e, epcomm.ArgumentError) and isinstance(e, epcomm.Error)


def test_config_hints():
    for R in (1, 2, 4, 8):
        d, c = epcomm.Buffer.get_dispatch_config(R), epcomm.Buffer.get_combine_config(R)
        assert d.num_sms == c.num_sms == epcomm.Buffer.num_sms
        small, big = d.get_nvl_buffer_size_hint(1024 * 2, R), d.get_nvl_buffer_size_hint(7168 * 2, R)
        assert 0 < small <= big
        assert c.get_nvl_buffer_size_hint(7168 * 2, R) > 0
        # No network memory inside one node (DeepEP's rule); across nodes some.
        assert d.get_rdma_buffer_size_hint(7168 * 2, R, ranks_per_node=8) == 0
        assert d.get_rdma_buffer_size_hint(7168 * 2, R, ranks_per_node=R // 2 or 1) > 0 or R == 1
    more_sms = epcomm.Config(48, 32, 128)
    assert more_sms.get_nvl_buffer_size_hint(7168 * 2, 4) > epcomm.Config(24, 32, 128).get_nvl_buffer_size_hint(7168 * 2, 4)
    raises(ValueError, lambda: d.get_nvl_buffer_size_hint(0, 4), "hidden_bytes")
    raises(ValueError, lambda: d.get_rdma_buffer_size_hint(1024, 0), "num_ranks")
    raises(ValueError, lambda: epcomm.Buffer.get_dispatch_config(0), "num_ranks")


def test_set_num_sms():
    old = epcomm.Buffer.num_sms
    try:
        epcomm.Buffer.set_num_sms(16)
        assert epcomm.Buffer.num_sms == 16 and epcomm.Buffer.get_combine_config(4).num_sms == 16
        epcomm.Buffer.set_num_sms(15)  # no evenness rule in epcomm
        for bad in (0, -2, 2.5, "24", True):
            raises(ValueError, lambda: epcomm.Buffer.set_num_sms(bad), "new_num_sms")
    finally:
        epcomm.Buffer.set_num_sms(old)


def test_dtype_mapping_and_views():
    names = {"bfloat16": 2, "float8_e4m3fn": 1, "float32": 4, "float": 4, "int32": 4, "int": 4, "int64": 8,
             "long": 8, "bool": 1}
    for name, size in names.items():
        assert _epcomm.dtype_size(name) == size
        assert _epcomm.dtype_size("torch." + name) == size
    raises(ValueError, lambda: _epcomm.dtype_size("float16"), "dtype", "float16")
    assert _epcomm.describe_view((0, "bfloat16", (4, 8), (8, 1), 0)) == "[4, 8] bfloat16 on cuda:0"
    assert _epcomm.describe_view(FakeTensor((3, 5), "torch.int64", device=-1)) == "[3, 5] int64 on cpu"
    assert _epcomm.describe_view(FakeTensor((2, 3), "torch.float8_e4m3fn", device=1)) == "[2, 3] float8_e4m3fn on cuda:1"
    raises(ValueError, lambda: _epcomm.describe_view(FakeTensor((1, 1, 1, 1, 1)), "x"), "x", "dimensions")
    raises(ValueError, lambda: _epcomm.describe_view(FakeTensor((2,), "torch.float16"), "x_scales"), "x_scales")
    raises(ValueError, lambda: _epcomm.describe_view(7, "topk_idx"), "topk_idx", "int")
    raises(ValueError, lambda: _epcomm.describe_view(None, "recv_x"), "recv_x", "None")
    raises(ValueError, lambda: _epcomm.describe_view((0, "bfloat16", (4,), (1, 1), 0), "x"), "x")
    if torch is not None:
        t = torch.zeros(3, 5, dtype=torch.bfloat16)
        assert _epcomm.describe_view(t) == "[3, 5] bfloat16 on cpu"
        assert _epcomm.describe_view(t.t()) == "[5, 3] bfloat16 on cpu"
        for dt, name in ((torch.float32, "float32"), (torch.int32, "int32"), (torch.int64, "int64"),
                         (torch.bool, "bool")):
            assert _epcomm.describe_view(torch.zeros(2, dtype=dt)) == f"[2] {name} on cpu"


def test_error_translation():
    cases = {"argument": (epcomm.ArgumentError, ValueError), "timeout": (epcomm.TimeoutError, RuntimeError),
             "runtime": (epcomm.Error, RuntimeError), "error": (epcomm.Error, RuntimeError)}
    for kind, classes in cases.items():
        e = raises(Exception, lambda: _epcomm._throw_for_test(kind, f"the {kind} message"), f"the {kind} message")
        for cls in classes:
            assert isinstance(e, cls), f"{kind}: {type(e).__mro__} lacks {cls}"
    assert not issubclass(epcomm.TimeoutError, ValueError)


def test_runtime_without_gpu_fails_clearly():
    if _epcomm.device_count() > 0:
        skip("a GPU is visible")
    uid = _epcomm.get_unique_id()
    assert isinstance(uid, bytes) and len(uid) == 128
    raises(RuntimeError, lambda: _epcomm.Runtime(uid, 1, 0, 0, 1 << 20), "no CUDA device")
    raises(ValueError, lambda: _epcomm.Runtime(b"short", 1, 0, 0), "unique_id")
    raises(ValueError, lambda: _epcomm.Runtime(uid, 2, 5, 0), "rank")
    raises(RuntimeError, lambda: _epcomm.Event.record(0, 0))


# ---------------------------------------------------------------------------- the torch layer, torch-free parts
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


def _parse_spec(params):
    out = []
    for item in [p.strip() for p in params.split(",") if p.strip()]:
        name, _, default = item.partition("=")
        out.append((name.strip(), eval(default) if default else inspect.Parameter.empty))  # noqa: S307 -- literals
    return out


# docs/contract.md §4, verbatim: names, order and defaults.
SPEC_SIGNATURES = {
    "__init__": "group, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=24, "
                "allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False, use_fabric=False, "
                "explicitly_destroy=False, enable_shrink=False, comm=None",
    "set_num_sms": "new_num_sms",
    "is_sm90_compiled": "",
    "capture": "",
    "get_dispatch_config": "num_ranks",
    "get_combine_config": "num_ranks",
    "get_low_latency_rdma_size_hint": "num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts",
    "destroy": "",
    "get_comm_stream": "",
    "get_local_buffer_tensor": "dtype, size=None, offset=0, use_rdma_buffer=False",
    "get_dispatch_layout": "topk_idx, num_experts, previous_event=None, async_finish=False, "
                           "allocate_on_comm_stream=False",
    "dispatch": "x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None, is_token_in_rank=None, "
                "num_tokens_per_expert=None, topk_idx=None, topk_weights=None, expert_alignment=1, "
                "num_worst_tokens=0, config=None, previous_event=None, async_finish=False, "
                "allocate_on_comm_stream=False",
    "combine": "x, handle, topk_weights=None, bias=None, config=None, previous_event=None, async_finish=False, "
               "allocate_on_comm_stream=False",
    "clean_low_latency_buffer": "num_max_dispatch_tokens_per_rank, hidden, num_experts",
    "low_latency_dispatch": "x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, "
                            "cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None, "
                            "use_fp8=True, round_scale=False, use_ue8m0=False, async_finish=False, "
                            "return_recv_hook=False",
    "low_latency_combine": "x, topk_idx, topk_weights, handle, use_logfmt=False, zero_copy=False, "
                           "async_finish=False, return_recv_hook=False, out=None, combine_wait_recv_cost_stats=None",
    "get_next_low_latency_combine_buffer": "handle",
    "low_latency_update_mask_buffer": "rank_to_mask, mask=False",
    "low_latency_query_mask_buffer": "mask_status",
    "low_latency_clean_mask_buffer": "",
}
SPEC_SIGNATURES["internode_dispatch"] = SPEC_SIGNATURES["dispatch"]
SPEC_SIGNATURES["internode_combine"] = SPEC_SIGNATURES["combine"]
STATICS = {"set_num_sms", "is_sm90_compiled", "capture", "get_dispatch_config", "get_combine_config",
           "get_low_latency_rdma_size_hint"}


def test_signatures_match_spec():
    for name, spec in SPEC_SIGNATURES.items():
        fn = getattr(epcomm.Buffer, name)
        params = list(inspect.signature(fn).parameters.values())
        is_static = isinstance(inspect.getattr_static(epcomm.Buffer, name), staticmethod)
        assert is_static == (name in STATICS), f"{name}: static={is_static}"
        if not is_static:
            assert params[0].name == "self"
            params = params[1:]
        got = [(p.name, p.default) for p in params]
        assert got == _parse_spec(spec), \
            f"Buffer.{name}{inspect.signature(fn)} differs from docs/contract.md §4: ({spec})"
    assert isinstance(epcomm.Buffer.num_sms, int)


def _deepep_low_latency_size_hint(tmax, hidden, num_ranks, num_experts):
    """DeepEP's get_low_latency_rdma_size_hint (csrc/config.hpp LowLatencyLayout), for comparison."""
    scales = hidden // 128
    dispatch_msg = 16 + max(2 * hidden, hidden + 4 * scales)
    combine_msg = 4 * scales + 2 * hidden
    send = max(tmax * dispatch_msg, num_experts * tmax * combine_msg)
    recv = max(num_experts * tmax * dispatch_msg, num_experts * tmax * combine_msg)
    signal = (num_experts * 4 + 127) // 128 * 128
    return (2 * (send + recv + signal) + 128) // 128 * 128


def test_low_latency_size_hint():
    hint = epcomm.Buffer.get_low_latency_rdma_size_hint
    for tmax, hidden, R, E in ((1, 128, 1, 1), (128, 7168, 8, 288), (128, 7168, 4, 288), (1024, 4096, 16, 256),
                               (7, 640, 3, 12)):
        got = hint(tmax, hidden, R, E)
        assert 0 < got <= _deepep_low_latency_size_hint(tmax, hidden, R, E), (tmax, hidden, R, E, got)
        assert got == _epcomm.low_latency_size_hint(tmax, hidden, R, E)
    assert hint(128, 7168, 8, 288) < hint(256, 7168, 8, 288)
    raises(ValueError, lambda: hint(0, 7168, 8, 288), "num_max_dispatch_tokens_per_rank")
    raises(ValueError, lambda: hint(5000, 7168, 8, 288), "num_max_dispatch_tokens_per_rank")
    raises(ValueError, lambda: hint(128, 7000, 8, 288), "hidden", "128")
    raises(ValueError, lambda: hint(128, 7168, 7, 288), "num_experts", "divisible")
    raises(ValueError, lambda: hint(128, 7168, 0, 288), "num_ranks")
    raises(ValueError, lambda: hint(128.0, 7168, 8, 288), "num_max_dispatch_tokens_per_rank")


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


class _NoCore:
    """A Runtime stand-in that fails the test if the Python layer reaches the core."""

    def __getattr__(self, name):
        def reached(*args, **kwargs):
            raise AssertionError(f"the argument error was not caught before Runtime.{name}")
        return reached


def _fake_buffer(runtime, num_ranks=4, device=None):
    """A Buffer without a GPU or a group: only what the Python layer reads (tests of the checks)."""
    b = object.__new__(epcomm.Buffer)
    b.runtime, b.group_size, b._ll_shapes, b._device = runtime, num_ranks, set(), device
    b._num_nodes, b._chunk_offset_strides, b._default_configs = 1, {}, {}
    b._max_recv_rows = num_ranks * 65536
    b._recent_rows = collections.deque(maxlen=epcomm.Buffer.RESERVE_WINDOW)
    return b


def test_low_latency_argument_checks():
    b = _fake_buffer(_NoCore())
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
    gone = _fake_buffer(None)
    for fn in (lambda: gone.low_latency_dispatch(x, idx, 16, 32), lambda: gone.low_latency_combine(y, idx, w, h),
               lambda: gone.clean_low_latency_buffer(16, 1024, 32), lambda: gone.get_next_low_latency_combine_buffer(h),
               lambda: gone.low_latency_update_mask_buffer(0), lambda: gone.low_latency_query_mask_buffer(x),
               gone.low_latency_clean_mask_buffer, lambda: gone.get_local_buffer_tensor(None)):
        raises(RuntimeError, fn, "destroy")


class _CpuDevice:
    """What the Python layer reads of a torch.device when there is no torch: a host stand-in."""
    type, index = "cpu", None


def _checks_buffer(runtime, num_ranks=4):
    """_fake_buffer plus the normal-mode state the Python layer reads before it reaches the core."""
    b = _fake_buffer(runtime, num_ranks=num_ranks, device=_CpuDevice())
    b._num_nodes, b._chunk_offset_strides, b._default_configs = 1, {}, {}
    return b


def test_normal_argument_checks_before_the_core():
    """docs/contract.md §6 on the Python side, normal mode: every bad value the Python layer can see
    raises ValueError naming the argument before anything reaches the core (so the buffer is
    untouched); type and shape rules of the tensors themselves are the core's (GPU tests)."""
    b = _checks_buffer(_NoCore())
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
    b = _checks_buffer(rt, num_ranks=4)
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
    b = _checks_buffer(rt, num_ranks=2)
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
    with _single_process_group() as group:
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


# ---------------------------------------------------------------------------- with PyTorch (CPU is enough)
class _single_process_group:
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


def test_reference_is_consistent():
    need_torch()
    import _reference as ref

    R, E, K, H = 4, 32, 4, 16
    g = torch.Generator().manual_seed(1)
    tokens = [7, 0, 13, 5]
    all_topk = [ref.random_topk(T, K, E, g, drop=0.3, nowhere=0.2) for T in tokens]
    all_x = [torch.randn(T, H, generator=g) for T in tokens]
    all_w = [torch.rand(T, K, generator=g) for T in tokens]
    prefix = ref.rank_prefix_matrix(all_topk, E)
    for j in range(R):
        exp = ref.dispatch(j, all_topk, E, [all_x], all_w, expert_alignment=4)
        n = exp["recv_src_idx"].numel()
        assert n == int(prefix[-1][j])
        assert exp["rows"][0].shape == (n, H)
        local = exp["recv_topk_idx"]
        assert bool(((local >= -1) & (local < E // R)).all())
        assert bool((exp["recv_topk_weights"][local < 0] == 0).all())
        assert all(c % 4 == 0 for c in exp["num_recv_tokens_per_expert"])
    # Dispatch then combine of the received rows sums each token once per destination rank.
    all_y = [ref.dispatch(j, all_topk, E, [all_x])["rows"][0] for j in range(R)]
    for r in range(R):
        _, _, in_rank = ref.layout(all_topk[r], E, R)
        want = all_x[r] * in_rank.sum(dim=1, keepdim=True)
        got = ref.combine(r, all_topk, E, all_y, tokens[r], out_dtype=None)
        assert torch.allclose(got, want, atol=1e-5), f"rank {r}"
    # combined weights reconstruct the original weights (0 where the slot was -1).
    all_rw = [ref.dispatch(j, all_topk, E, [], all_w)["recv_topk_weights"] for j in range(R)]
    for r in range(R):
        got = ref.combine(r, all_topk, E, all_rw, tokens[r], out_dtype=None)
        assert torch.equal(got, torch.where(all_topk[r] >= 0, all_w[r], torch.zeros_like(all_w[r])))
    assert ref.same_bytes(torch.arange(4), torch.arange(4)) is None
    assert ref.same_bytes(torch.arange(4), torch.arange(1, 5)) is not None
    assert ref.close_bf16(torch.ones(3).bfloat16(), torch.ones(3) * 1.003) is None
    assert ref.close_bf16(torch.ones(3).bfloat16(), torch.ones(3) * 1.05) is not None


class _OneRankBuffer:
    """Normal mode of a one-rank group, in torch on the CPU (a stand-in for epcomm.Buffer where
    there is no GPU), so the MoE example's autograd wiring can be checked here."""

    def __init__(self):
        self.rank, self.group_size = 0, 1

    def get_dispatch_layout(self, topk_idx, num_experts):
        import _reference as ref

        ntpr, ntpe, in_rank = ref.layout(topk_idx, num_experts, 1)
        return ntpr, None, ntpe, in_rank, EventOverlap()

    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None, **_):
        if handle is not None:
            return x[handle.recv_src_idx.long()], None, None, None, None, EventOverlap()
        src = is_token_in_rank[:, 0].nonzero().flatten()
        meta = HandleMeta(src.numel(), src.numel(), 1, 32, x.size(0), int(num_tokens_per_expert.numel()))
        handle = DispatchHandle(num_tokens_per_rank.view(1, 1), None, src.int(), is_token_in_rank, meta)
        return x[src], topk_idx[src], topk_weights[src], [], handle, EventOverlap()

    def combine(self, x, handle, topk_weights=None, **_):
        def back(rows, dtype):
            out = torch.zeros((handle.meta.num_tokens,) + tuple(rows.shape[1:]), dtype=torch.float32)
            return out.index_add(0, handle.recv_src_idx.long(), rows.float()).to(dtype)

        weights = None if topk_weights is None else back(topk_weights, torch.float32)
        return back(x, torch.bfloat16), weights, EventOverlap()


def test_moe_example_autograd_wiring():
    need_torch()
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "moe_layer.py")
    spec = importlib.util.spec_from_file_location("moe_layer_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with _single_process_group() as group:
        report = module.check_against_single_gpu(_OneRankBuffer(), group, seed=3, tokens=32, hidden=64, ffn=96,
                                                 num_topk=2, experts_per_rank=4, device=torch.device("cpu"))
    assert report["ok"], report


# ---------------------------------------------------------------------------- low-latency, with PyTorch (CPU)
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
    b = _fake_buffer(rt, num_ranks=2, device=torch.device("cpu"))
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


def _le16(x):
    values = x.contiguous().view(torch.int16).view(-1).tolist()
    return b"".join((v & 0xFFFF).to_bytes(2, "little") for v in values)


def _fp8_test_rows():
    """BF16 rows over the cases the cast has: ordinary, tiny (below the 1e-4 scale floor, so
    subnormal and zero codes), huge, zeros, exact ties of the e4m3 grid, negative zero."""
    g = torch.Generator().manual_seed(11)
    H = 512
    rows = [torch.randn(24, H, generator=g) * torch.tensor([1e-7, 1e-5, 1e-3, 1.0, 30.0, 1e4]).repeat(4).unsqueeze(1)]
    rows.append(torch.zeros(1, H))
    rows.append(-torch.zeros(1, H))
    ties = torch.linspace(-448, 448, H).unsqueeze(0)  # amax 448: scale 1, values spread over the grid
    rows.append(ties)
    rows.append(torch.full((1, H), 3.0))
    return torch.cat(rows).to(torch.bfloat16), H


def test_fp8_scales_match_the_cpp_reference():
    need_torch()
    import _reference as ref

    x, H = _fp8_test_rows()
    for round_scale in (False, True):
        _, scale_bytes = _epcomm._reference_fp8_cast(_le16(x), H, round_scale)
        want = torch.frombuffer(bytearray(scale_bytes), dtype=torch.int32).view(x.size(0), H // 128)
        got = ref.fp8_scales(x, round_scale).view(torch.int32)
        assert torch.equal(got, want), f"round_scale={round_scale}: {int((got != want).sum())} scales differ"
        if round_scale:
            mantissa = got & 0x7FFFFF
            assert bool((mantissa == 0).all())
            packed = ref.ue8m0_pack(got.view(torch.float32))
            assert torch.equal(ref.ue8m0_unpack(packed, H // 128).view(torch.int32), got)


def test_fp8_cast_matches_the_cpp_reference():
    need_torch()
    if not hasattr(torch, "float8_e4m3fn"):
        skip(f"PyTorch {torch.__version__} has no float8_e4m3fn (2.1+)")
    import _reference as ref

    x, H = _fp8_test_rows()
    for round_scale in (False, True):
        q_bytes, _ = _epcomm._reference_fp8_cast(_le16(x), H, round_scale)
        want = torch.frombuffer(bytearray(q_bytes), dtype=torch.uint8).view(x.shape)
        got = ref.fp8_cast(x, round_scale)[0].view(torch.uint8)
        bad = (got != want).nonzero()
        assert bad.numel() == 0, (f"round_scale={round_scale}: {bad.size(0)} e4m3 codes differ, first at {bad[0].tolist()}"
                                  f": torch {int(got[tuple(bad[0])])}, C++ {int(want[tuple(bad[0])])}")


def test_ue8m0_packing():
    need_torch()
    import _reference as ref

    exps = [127, 128, 129, 130, 1]
    scales = torch.tensor([[2.0 ** (e - 127) for e in exps]], dtype=torch.float32)
    packed = ref.ue8m0_pack(scales)
    word0 = 127 | 128 << 8 | 129 << 16 | 130 << 24
    assert packed.dtype == torch.int32 and packed.shape == (1, 2)
    assert packed.tolist() == [[word0 - (1 << 32), 1]]
    assert torch.equal(ref.ue8m0_unpack(packed, 5), scales)


def test_low_latency_reference_is_consistent():
    """The references the GPU tests use, against a direct per-slot simulation of docs/contract.md §3.3."""
    need_torch()
    import _reference as ref

    R, E, K, H = 3, 12, 4, 256
    g = torch.Generator().manual_seed(2)
    tokens = [9, 0, 5]
    all_topk = [ref.random_topk(T, K, E, g, drop=0.3) for T in tokens]
    all_x = [torch.randn(T, H, generator=g).to(torch.bfloat16) for T in tokens]
    all_w = [torch.rand(T, K, generator=g) for T in tokens]
    EL = E // R
    factor = ref.expert_scale(E)
    # Each expert's rows: sources in rank order, tokens ascending (one valid order of many).
    y = []
    for j in range(R):
        want = ref.ll_tokens(all_topk, E, j)
        rows = {}
        for e in range(EL):
            for s in range(R):
                for t in want[e][s].tolist():
                    assert int((all_topk[s][t] == j * EL + e).sum()) == 1
                    rows[(e, s, t)] = ref.ll_expert(all_x[s][t].float(), factor[j * EL + e])
        assert sum(len(w) for we in want for w in we) == len(rows)
        y.append(rows)
    for r in range(R):
        got = ref.ll_combine(all_topk[r], all_w[r], lambda k: ref.ll_expert(
            all_x[r].float(), factor[all_topk[r][:, k].clamp(min=0)].unsqueeze(1)))
        want = torch.zeros(tokens[r], H)
        for t in range(tokens[r]):
            for k in range(K):
                ge = int(all_topk[r][t, k])
                if ge >= 0:
                    want[t] = want[t] + all_w[r][t, k] * y[ge // EL][(ge % EL, r, t)].float()
        assert torch.equal(got, want), f"rank {r}"
    x = torch.randn(5, 384, generator=g)
    s = torch.rand(5, 3, generator=g)
    assert torch.equal(ref.dequant(x, s), x * s.repeat_interleave(128, dim=1))


def _host_view(ptr, shape, dtype):
    """A tensor over host memory the Python layer allocated and passed to the core as a pointer."""
    from torch.utils.dlpack import from_dlpack

    numel = 1
    for n in shape:
        numel *= n
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    return from_dlpack(_epcomm.wrap_memory(ptr, nbytes, -1, None)).view(dtype).view(shape)


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
        rx = _host_view(recv_x, (EL, tmax, H), torch.bfloat16)
        count = _host_view(recv_count, (EL,), torch.int32)
        src = _host_view(src_info, (EL, tmax), torch.int32)
        ranges = _host_view(layout_range, (EL, 1), torch.int64)
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
        out = _host_view(out, (T, hidden), torch.bfloat16) if isinstance(out, int) else out
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

    b = _fake_buffer(_HostLowLatencyRuntime(), num_ranks=1, device=torch.device("cpu"))
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
        _host_view(recv_x, (rows, self.x.size(1)), self.x.dtype)[:n] = self.x[self.src]
        _host_view(recv_src_idx, (rows,), torch.int32)[:n] = self.src.int()
        if recv_topk_idx is not None:
            _host_view(recv_topk_idx, (rows, K), torch.int64)[:n] = self.topk_idx[self.src]
        if recv_topk_weights is not None:
            w = self.topk_weights[self.src]
            _host_view(recv_topk_weights, (rows, K), torch.float32)[:n] = torch.where(
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
    b = _fake_buffer(rt, num_ranks=1, device=torch.device("cpu"))
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
