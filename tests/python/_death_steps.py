"""The steps of test_process_death.py's workers and their checks, with no collective: every rank
rebuilds every rank's inputs of a step on the CPU from (seed, step, rank), so a survivor checks its
outputs against the reference (_reference.py) for the ranks that are alive without asking anyone.

Low latency: FP8 dispatch, the tests' stand-in expert (_gpu_low_latency.ll_expert_y), combine.
After a death the reference is the one of the live ranks: no rows from the dead rank, and its
experts contribute nothing to combine (shrink mode, docs/contract.md §3.3). In the step of the
death the dead rank's rows may have arrived or not (it may have sent them before it died): both are
accepted, per (local expert, source) all of them or none. Normal mode: layout, dispatch, combine
with an identity expert, every output against the reference."""

from typing import List, Optional, Set

import torch

import _reference as ref
import epcomm
from _gpu_low_latency import _ll_rows_differ, ll_expert_y

LL_SHAPE = dict(max_tokens=64, hidden=512, num_topk=8)  # num_experts = 8 R
NORMAL_SHAPE = dict(max_tokens=128, hidden=1024, num_topk=8)  # EPCOMM_MAX_TOKENS_PER_RANK = 128 (_death_verdict)


def num_experts(num_ranks: int) -> int:
    return 8 * num_ranks


class RankInputs:
    """One rank's tokens in one step, made on the CPU from (seed, step, rank) so that any rank can
    rebuild them: T in [max_tokens / 2, max_tokens] (rank 0: max_tokens), distinct experts per token
    with some -1 slots, weights, BF16 rows."""

    def __init__(self, seed: int, step: int, rank: int, max_tokens: int, hidden: int, num_topk: int,
                 experts: int, device):
        g = torch.Generator().manual_seed((seed * 1000003 + step * 1009 + rank) % (1 << 62))
        T = max_tokens if rank == 0 else int(torch.randint(max_tokens // 2, max_tokens + 1, (1,), generator=g))
        self.num_tokens = T
        self.topk = ref.random_topk(T, num_topk, experts, g).to(device)
        self.weights = torch.rand(T, num_topk, generator=g).to(device)
        self.x = torch.randn(T, hidden, generator=g).to(torch.bfloat16).to(device)


def step_inputs(seed: int, step: int, num_ranks: int, shape: dict, device, ranks: Optional[Set[int]] = None):
    """[RankInputs or None] over ranks: those in `ranks` (default all)."""
    E = num_experts(num_ranks)
    return [RankInputs(seed, step, r, shape["max_tokens"], shape["hidden"], shape["num_topk"], E, device)
            if ranks is None or r in ranks else None for r in range(num_ranks)]


# ---------------------------------------------------------------------------- buffers
def ll_buffer(group, num_ranks: int, shrink: bool):
    """The low-latency buffer, sized by get_low_latency_rdma_size_hint as clients size it (for
    R > 1 it covers the network path across nodes too)."""
    hint = epcomm.Buffer.get_low_latency_rdma_size_hint(LL_SHAPE["max_tokens"], LL_SHAPE["hidden"], num_ranks,
                                                        num_experts(num_ranks))
    return epcomm.Buffer(group, num_rdma_bytes=hint, low_latency_mode=True,
                         explicitly_destroy=True, enable_shrink=shrink)


def normal_buffer(group, num_ranks: int, across_nodes: bool):
    """The normal-mode buffer. Across nodes the network region must hold
    Buffer::internode_size_hint(EPCOMM_MAX_TOKENS_PER_RANK, ...) bytes (13.3 MB at R = 4, T = 128,
    hidden 1024, measured with the C++ function), which Config.get_rdma_buffer_size_hint does not
    follow (it does not know the token limit); four times that hint (about 55 MB)."""
    H, R = NORMAL_SHAPE["hidden"], num_ranks
    dcfg, ccfg = epcomm.Buffer.get_dispatch_config(R), epcomm.Buffer.get_combine_config(R)
    nvl = max(dcfg.get_nvl_buffer_size_hint(2 * H, R), ccfg.get_nvl_buffer_size_hint(2 * H, R))
    rdma = 4 * dcfg.get_rdma_buffer_size_hint(2 * H, R, ranks_per_node=1) if across_nodes else 0
    return epcomm.Buffer(group, num_nvl_bytes=nvl, num_rdma_bytes=rdma, explicitly_destroy=True)


# ---------------------------------------------------------------------------- low latency
def ll_dispatch(buf, inp, hook: bool = False):
    E = num_experts(buf.group_size)
    return buf.low_latency_dispatch(inp.x, inp.topk, LL_SHAPE["max_tokens"], E, use_fp8=True,
                                    return_recv_hook=hook)


def ll_expert(ctx, recv):
    return ll_expert_y(ctx, num_experts(ctx.num_ranks), recv, True, False, LL_SHAPE["hidden"])


def ll_combine(buf, inp, y, handle):
    cx, _, _ = buf.low_latency_combine(y, inp.topk, inp.weights, handle)
    return cx


def ll_step(ctx, buf, inp) -> dict:
    """One decode step on the caller's stream (no host wait inside)."""
    recv, count, handle, _, _ = ll_dispatch(buf, inp)
    cx = ll_combine(buf, inp, ll_expert(ctx, recv), handle)
    return dict(recv=recv, count=count, handle=handle, cx=cx)


def _counts_from(inp, rank: int, EL: int) -> List[int]:
    """Rows source `inp` sends to each local expert of `rank` (one per top-k slot naming it)."""
    t = inp.topk
    lo = rank * EL
    hit = t[(t >= lo) & (t < lo + EL)]
    return torch.bincount((hit - lo).flatten(), minlength=EL).tolist()


def ll_check(ctx, inputs, out, live: Set[int], maybe: Optional[int] = None) -> List[str]:
    """What differs from the reference of the ranks in `live` (this one included). `maybe`: a rank
    that died in this step, whose rows may or may not be there (all or none per local expert) and
    whose experts contribute nothing to combine. Empty list: every output is right."""
    R, rank, dev = ctx.num_ranks, ctx.rank, ctx.device
    E = num_experts(R)
    EL = E // R
    problems = []
    x_q, sc = out["recv"]
    src_info, layout_range = out["handle"][0], out["handle"][1]
    counts = out["count"].cpu().tolist()
    ranges = layout_range.cpu().tolist()
    sources = set(live) | ({maybe} if maybe is not None else set())
    wanted = {s: _counts_from(inputs[s], rank, EL) for s in sources}

    for e in range(EL):
        live_total = sum(wanted[s][e] for s in live)
        allowed = {live_total} | ({live_total + wanted[maybe][e]} if maybe is not None else set())
        if counts[e] not in allowed:
            problems.append(f"recv_count[{e}] = {counts[e]}, want {sorted(allowed)}")
    maybe_rows = 0
    for s in range(R):
        got = [ranges[e][s] & 0xFFFFFFFF for e in range(EL)]
        if s not in sources:
            if any(got):
                problems.append(f"rows from rank {s}, which is dead: layout_range counts {got}")
            continue
        check = [e for e in range(EL) if got[e] == wanted[s][e]]
        wrong = [e for e in range(EL) if got[e] != wanted[s][e] and not (s == maybe and got[e] == 0)]
        if wrong:
            problems.append(f"layout_range counts from rank {s} for local experts {wrong}: "
                            f"{[got[e] for e in wrong]}, want {[wanted[s][e] for e in wrong]}"
                            + (" (or 0: it died in this step)" if s == maybe else ""))
        if s == maybe:
            maybe_rows = sum(got)
        if check:
            experts = torch.tensor(check, dtype=torch.int64, device=dev)
            msg = _ll_rows_differ(ctx, s, experts, layout_range, src_info, x_q, sc, inputs[s].x, inputs[s].topk,
                                  ref.fp8_cast(inputs[s].x), True, False)
            if msg:
                problems.append(f"rows from rank {s}: {msg}")

    # Combine: this rank's tokens, from the experts of live ranks only.
    mine = inputs[rank]
    alive = torch.zeros(R, dtype=torch.bool, device=dev)
    alive[sorted(live)] = True
    topk = mine.topk
    topk_live = torch.where((topk >= 0) & alive[topk.clamp(min=0) // EL], topk, torch.full_like(topk, -1))
    rows = ref.dequant(*ref.fp8_cast(mine.x))
    factor = ref.expert_scale(E, dev)
    want = ref.ll_combine(topk_live, mine.weights,
                          lambda k: ref.ll_expert(rows, factor[topk_live[:, k].clamp(min=0)].unsqueeze(1)))
    cx = out["cx"]
    if tuple(cx.shape) != tuple(want.shape):
        problems.append(f"combined_x shape {list(cx.shape)}, want {list(want.shape)}")
    else:
        msg = ref.close_bf16(cx, want, rtol=1e-2, atol=1e-3)
        if msg:
            problems.append(f"combined_x: {msg}")
    if maybe is not None and not problems:
        out["maybe_rows"] = maybe_rows  # rows of the rank that died in this step that arrived
    return problems


def mask_of(buf, device) -> List[int]:
    """This rank's shrink mask (low_latency_query_mask_buffer), on the host."""
    status = torch.full((buf.group_size,), -1, dtype=torch.int32, device=device)
    buf.low_latency_query_mask_buffer(status)
    return status.cpu().tolist()


# ---------------------------------------------------------------------------- normal mode
def normal_step(buf, inp) -> dict:
    E = num_experts(buf.group_size)
    per_rank, per_rdma_rank, per_expert, in_rank, _ = buf.get_dispatch_layout(inp.topk, E)
    recv_x, recv_topk, recv_w, per_expert_list, handle, _ = buf.dispatch(
        inp.x, topk_idx=inp.topk, topk_weights=inp.weights, num_tokens_per_rank=per_rank,
        num_tokens_per_rdma_rank=per_rdma_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    combined, _, _ = buf.combine(recv_x, handle)  # identity expert: each receiving rank returns its row
    return dict(recv_x=recv_x, recv_topk=recv_topk, recv_w=recv_w, per_expert=per_expert_list, combined=combined)


def normal_check(ctx, inputs, out) -> List[str]:
    R, rank = ctx.num_ranks, ctx.rank
    E = num_experts(R)
    all_topk = [i.topk for i in inputs]
    all_x = [i.x for i in inputs]
    want = ref.dispatch(rank, all_topk, E, all_rows=[all_x], all_weights=[i.weights for i in inputs])
    problems = []
    for name, got, w in (("recv_x", out["recv_x"], want["rows"][0]), ("recv_topk_idx", out["recv_topk"],
                                                                       want["recv_topk_idx"]),
                         ("recv_topk_weights", out["recv_w"], want["recv_topk_weights"])):
        msg = ref.same_bytes(got, w)
        if msg:
            problems.append(f"{name}: {msg}")
    if list(out["per_expert"]) != want["num_recv_tokens_per_expert"]:
        problems.append(f"num_recv_tokens_per_expert {list(out['per_expert'])}, want "
                        f"{want['num_recv_tokens_per_expert']}")
    all_y = [ref.dispatch(j, all_topk, E, all_rows=[all_x])["rows"][0] for j in range(R)]
    msg = ref.close_bf16(out["combined"], ref.combine(rank, all_topk, E, all_y, inputs[rank].num_tokens))
    if msg:
        problems.append(f"combined_x: {msg}")
    return problems
