"""Python CPU tests of the torch references the GPU tests use (_reference.py), with PyTorch on the
CPU (skipped where it is not installed): normal-mode dispatch / combine consistency, FP8 scales and
casts against the C++ reference, UE8M0 packing, the low-latency references against a per-slot
simulation, and the MoE example's autograd wiring over a one-rank stand-in.

    PYTHONPATH=python python -m pytest tests/python/test_cpu_reference.py
    PYTHONPATH=python python tests/python/test_cpu_reference.py     (without pytest: its own runner)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _cpu_stand_ins import need_torch, single_process_group, torch  # noqa: E402
from _runner import run_tests, skip  # noqa: E402

from epcomm import _epcomm  # noqa: E402
from epcomm.event import EventOverlap  # noqa: E402
from epcomm.handle import DispatchHandle, HandleMeta  # noqa: E402


# ---------------------------------------------------------------------------- normal mode
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
    with single_process_group() as group:
        report = module.check_against_single_gpu(_OneRankBuffer(), group, seed=3, tokens=32, hidden=64, ffn=96,
                                                 num_topk=2, experts_per_rank=4, device=torch.device("cpu"))
    assert report["ok"], report


# ---------------------------------------------------------------------------- FP8 and low-latency mode
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


# ---------------------------------------------------------------------------- without pytest
if __name__ == "__main__":
    run_tests(globals())
