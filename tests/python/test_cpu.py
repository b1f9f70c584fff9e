"""Python tests that need no GPU (CI): the extension builds and imports, Config and its hints, the
dtype and tensor-view mapping, error translation, the argument checks of the torch layer, the
DeepEP-compatible signatures (SPEC.md section 4), and a Buffer made without a GPU failing with a
clear message. Parts that need PyTorch skip with a visible reason where it is not installed; where
it is (CPU-only is enough), the torch references of the GPU tests and the MoE example's autograd
wiring are checked too.

    PYTHONPATH=python python -m pytest tests/python/test_cpu.py    (or: python tests/python/test_cpu.py)
"""

import inspect
import os
import pickle
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

try:
    import pytest
except ImportError:  # the runner at the bottom stands in
    pytest = None

import epcomm
from epcomm import _epcomm
from epcomm._args import check_bool, check_handle, check_int, check_tensor, event_of, split_x, unpack_bias
from epcomm.event import EventOverlap
from epcomm.handle import DispatchHandle, HandleMeta

try:
    import torch
except ImportError:
    torch = None


class SkipTest(Exception):
    pass


def skip(reason):
    if pytest is not None:
        pytest.skip(reason)
    raise SkipTest(reason)


def need_torch():
    if torch is None:
        skip("PyTorch is not installed")


def raises(exc_type, fn, *fragments):
    try:
        fn()
    except exc_type as e:
        for f in fragments:
            assert f in str(e), f"{exc_type.__name__} '{e}' does not mention '{f}'"
        return e
    raise AssertionError(f"no {exc_type.__name__} raised")


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
        assert d.get_rdma_buffer_size_hint(7168 * 2, R) > 0
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


# SPEC.md section 4, verbatim: names, order and defaults.
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
        assert got == _parse_spec(spec), f"Buffer.{name}{inspect.signature(fn)} differs from SPEC.md: ({spec})"
    assert isinstance(epcomm.Buffer.num_sms, int)


def test_low_latency_hint_not_in_this_build():
    raises(NotImplementedError, lambda: epcomm.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 288),
           "low-latency")
    raises(ValueError, lambda: epcomm.Buffer.get_low_latency_rdma_size_hint(0, 7168, 8, 288),
           "num_max_dispatch_tokens_per_rank")


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


# ---------------------------------------------------------------------------- without pytest
if __name__ == "__main__":
    failed = 0
    for name, fn in sorted((n, f) for n, f in globals().items() if n.startswith("test_") and callable(f)):
        try:
            fn()
            print(f"PASS {name}")
        except SkipTest as e:
            print(f"SKIP {name}: {e}")
        except Exception as e:  # noqa: BLE001 -- reported
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}")
    sys.exit(1 if failed else 0)
