"""Python CPU tests of the extension and the DeepEP-compatible surface: the extension builds and
imports, Config (DeepEP's positional order, fields, hints), set_num_sms, the dtype and tensor-view
mapping, error translation, a runtime made without a GPU failing clearly, Buffer's signatures
against docs/contract.md §4 and the low-latency size hint against DeepEP's.

    PYTHONPATH=python python -m pytest tests/python/test_cpu_extension.py
    PYTHONPATH=python python tests/python/test_cpu_extension.py     (without pytest: its own runner)
"""

import inspect
import os
import pickle
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _cpu_stand_ins import FakeTensor, torch  # noqa: E402
from _runner import raises, run_tests, skip  # noqa: E402

import epcomm  # noqa: E402
from epcomm import _epcomm  # noqa: E402


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
    # The NVLink hint covers one node's rings (DeepEP's min(R, 8)): it stops growing past the node.
    node = epcomm.Config.nvl_hint_domain_ranks()
    assert node >= 8 or os.environ.get("EPCOMM_RANKS_PER_NODE")
    R = random.choice((2, 3, 5)) * node
    assert d.get_nvl_buffer_size_hint(7168 * 2, R) == d.get_nvl_buffer_size_hint(7168 * 2, node)
    assert c.get_nvl_buffer_size_hint(7168 * 2, 16, ranks_per_node=16) > c.get_nvl_buffer_size_hint(7168 * 2, 16,
                                                                                                   ranks_per_node=8)
    assert c.get_nvl_buffer_size_hint(7168 * 2, 8, ranks_per_node=16) == c.get_nvl_buffer_size_hint(7168 * 2, 8)
    raises(ValueError, lambda: d.get_nvl_buffer_size_hint(1024, 4, ranks_per_node=-1), "ranks_per_node")
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


# ---------------------------------------------------------------------------- DeepEP's signatures and size hint
def _parse_spec(params):
    out = []
    for item in [p.strip() for p in params.split(",") if p.strip()]:
        name, _, default = item.partition("=")
        out.append((name.strip(), eval(default) if default else inspect.Parameter.empty))  # noqa: S307 -- literals
    return out


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
        inside = _epcomm.low_latency_size_hint(tmax, hidden, R, E)
        across = _epcomm.low_latency_net_size_hint(tmax, hidden, R, E)
        assert got == (inside if R == 1 else max(inside, across)), (tmax, hidden, R, E, got, inside, across)
        if R == 1 or (E >= 32 and E >= 2 * R):
            assert 0 < got <= _deepep_low_latency_size_hint(tmax, hidden, R, E), (tmax, hidden, R, E, got)
    for R in (2, 4, 8, 16, 32, 64):  # the network path fits below DeepEP's hint at production shapes
        for E in (64, 256, 288):
            if E % R == 0 and E >= 2 * R:
                assert hint(128, 7168, R, E) <= _deepep_low_latency_size_hint(128, 7168, R, E), (R, E)
                assert hint(128, 7168, R, E) >= _epcomm.low_latency_net_size_hint(128, 7168, R, E), (R, E)
    assert hint(128, 7168, 8, 288) < hint(256, 7168, 8, 288)
    raises(ValueError, lambda: hint(0, 7168, 8, 288), "num_max_dispatch_tokens_per_rank")
    raises(ValueError, lambda: hint(5000, 7168, 8, 288), "num_max_dispatch_tokens_per_rank")
    raises(ValueError, lambda: hint(128, 7000, 8, 288), "hidden", "128")
    raises(ValueError, lambda: hint(128, 7168, 7, 288), "num_experts", "divisible")
    raises(ValueError, lambda: hint(128, 7168, 0, 288), "num_ranks")
    raises(ValueError, lambda: hint(128.0, 7168, 8, 288), "num_max_dispatch_tokens_per_rank")


def test_internode_rdma_size_hint():
    """The extension's size of normal mode's internode region: the core's, growing with the tokens,
    the ranks and the row; bad arguments named."""
    hint = epcomm.Buffer.get_internode_rdma_size_hint
    for tokens, hidden, R, P, K in ((128, 512, 16, 8, 4), (4096, 7168, 16, 8, 8), (24, 256, 64, 8, 8), (1, 128, 2, 1, 1)):
        got = hint(tokens, hidden, R, P, K)
        assert got == _epcomm.internode_size_hint(tokens, hidden, R, P, K), (tokens, hidden, R, P, K)
        assert got > 0
    assert hint(128, 512, 16, 8) < hint(256, 512, 16, 8) < hint(256, 1024, 16, 8) < hint(256, 1024, 32, 8)
    # DeepEP's hint (no token count) is far below what 4096 tokens per rank need across 2 nodes of 8.
    config_hint = epcomm.Buffer.get_dispatch_config(16).get_rdma_buffer_size_hint(7168 * 2, 16, ranks_per_node=8)
    assert hint(4096, 7168, 16, 8) > config_hint
    raises(ValueError, lambda: hint(0, 512, 16, 8), "num_max_tokens_per_rank")
    raises(ValueError, lambda: hint(128, 512, 12, 8), "ranks_per_node")
    raises(ValueError, lambda: hint(128, 512, 16, 8, 17), "num_topk")


def test_internode_windows():
    """The extension's windows of normal mode across nodes: the size hint's region moves every token in
    one round, a smaller one fewer tokens per round (more rounds), one too small for a round says 0; the
    combine's window is the smaller; bad arguments named."""
    hint = epcomm.Buffer.get_internode_rdma_size_hint
    windows = epcomm.Buffer.get_internode_windows
    for tokens, hidden, R, P in ((4096, 7168, 16, 8), (300, 1024, 4, 2), (128, 512, 64, 8)):
        size = hint(tokens, hidden, R, P)
        d, c = windows(size, hidden, R, P, num_max_tokens_per_rank=tokens)
        assert d >= tokens and c >= tokens, (tokens, d, c)
        d3, c3 = windows(size // 3, hidden, R, P, num_max_tokens_per_rank=tokens)
        assert 0 < c3 < tokens and c3 <= d3, (tokens, d3, c3)
        assert (d3, c3) == _epcomm.internode_windows(size // 3, tokens, hidden, R, P, 8)
    assert windows(4096, 7168, 16, 8) == (0, 0)
    raises(ValueError, lambda: windows(-1, 512, 16, 8), "num_rdma_bytes")
    raises(ValueError, lambda: windows(1 << 30, 512, 12, 8), "ranks_per_node")
    raises(ValueError, lambda: windows(1 << 30, 512, 16, 8, num_max_tokens_per_rank=0), "num_max_tokens_per_rank")


# ---------------------------------------------------------------------------- without pytest
if __name__ == "__main__":
    run_tests(globals())
