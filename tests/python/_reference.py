"""Torch references for epcomm's normal mode, built from every rank's inputs (all-gathered), per
SPEC.md 3.1-3.2. Plain torch ops, any device; test_cpu.py checks them on the CPU, test_gpu.py
compares epcomm's outputs with them."""

from typing import Dict, List, Optional, Sequence

import torch


def random_topk(num_tokens: int, num_topk: int, num_experts: int, gen: torch.Generator, drop: float = 0.1,
                nowhere: float = 0.02) -> torch.Tensor:
    """[T, K] int64: distinct experts per token, some slots -1, a few tokens sent nowhere."""
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    idx = scores.topk(num_topk, dim=1).indices
    drop_mask = torch.rand(num_tokens, num_topk, generator=gen) < drop
    drop_mask |= (torch.rand(num_tokens, 1, generator=gen) < nowhere).expand(-1, num_topk)
    return torch.where(drop_mask, torch.full_like(idx, -1), idx)


def layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int):
    """-> (num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32, is_token_in_rank [T, R] bool)."""
    per_rank = num_experts // num_ranks
    valid = topk_idx >= 0
    dest = torch.where(valid, topk_idx // per_rank, torch.full_like(topk_idx, -1))
    is_token_in_rank = torch.stack([(dest == r).any(dim=1) for r in range(num_ranks)], dim=1)
    if topk_idx.size(0) == 0:
        is_token_in_rank = torch.zeros((0, num_ranks), dtype=torch.bool, device=topk_idx.device)
    num_tokens_per_rank = is_token_in_rank.sum(dim=0).to(torch.int32)
    num_tokens_per_expert = torch.bincount(topk_idx[valid].flatten(), minlength=num_experts).to(torch.int32)
    return num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank


def selections(all_topk: Sequence[torch.Tensor], num_experts: int, dest_rank: int) -> List[torch.Tensor]:
    """For each source rank, the indices (ascending) of its tokens that go to `dest_rank`."""
    per_rank = num_experts // len(all_topk)
    lo = dest_rank * per_rank
    return [((t >= lo) & (t < lo + per_rank)).any(dim=1).nonzero().flatten() for t in all_topk]


def rank_prefix_matrix(all_topk: Sequence[torch.Tensor], num_experts: int) -> torch.Tensor:
    """[R, R] int32: [i][j] = tokens ranks 0..i send to rank j."""
    R = len(all_topk)
    counts = torch.stack([layout(t, num_experts, R)[0] for t in all_topk]).to(torch.int64)
    return counts.cumsum(dim=0).to(torch.int32)


def dispatch(rank: int, all_topk: Sequence[torch.Tensor], num_experts: int,
             all_rows: Sequence[Sequence[torch.Tensor]] = (), all_weights: Optional[Sequence[torch.Tensor]] = None,
             expert_alignment: int = 1) -> Dict[str, object]:
    """What rank `rank` receives. `all_rows` holds per-row tensors to route (x, scales, ...), each a
    list over source ranks. Keys: rows (list, as all_rows), recv_src_idx, recv_topk_idx,
    recv_topk_weights (when all_weights), num_recv_tokens_per_expert (list), rank_prefix_matrix."""
    R = len(all_topk)
    per_rank = num_experts // R
    lo = rank * per_rank
    sel = selections(all_topk, num_experts, rank)
    out: Dict[str, object] = {
        "rows": [torch.cat([src[s][sel[s]] for s in range(R)]) for src in all_rows],
        "recv_src_idx": torch.cat(sel).to(torch.int32),
        "rank_prefix_matrix": rank_prefix_matrix(all_topk, num_experts),
    }
    idx = torch.cat([all_topk[s][sel[s]] for s in range(R)])
    local = (idx >= lo) & (idx < lo + per_rank)
    out["recv_topk_idx"] = torch.where(local, idx - lo, torch.full_like(idx, -1))
    if all_weights is not None:
        w = torch.cat([all_weights[s][sel[s]] for s in range(R)])
        out["recv_topk_weights"] = torch.where(local, w, torch.zeros_like(w))
    counts = []
    for e in range(per_rank):
        n = sum(int((t == lo + e).sum()) for t in all_topk)
        counts.append((n + expert_alignment - 1) // expert_alignment * expert_alignment)
    out["num_recv_tokens_per_expert"] = counts
    return out


def combine(rank: int, all_topk: Sequence[torch.Tensor], num_experts: int, all_y: Sequence[torch.Tensor],
            num_tokens: int, bias: Sequence[Optional[torch.Tensor]] = (), out_dtype=torch.bfloat16) -> torch.Tensor:
    """combine's output on rank `rank`: for each token, the sum over the ranks j that received it of
    j's row (all_y[j] is j's combine input, rows in dispatch order), ascending j, in float32, then
    the biases, rounded once to out_dtype (None: stay float32)."""
    R = len(all_topk)
    width = all_y[0].size(1)
    acc = torch.zeros((num_tokens, width), dtype=torch.float32, device=all_y[0].device)
    for j in range(R):
        sel = selections(all_topk, num_experts, j)
        start = sum(int(s.numel()) for s in sel[:rank])
        rows = sel[rank]
        acc[rows.to(acc.device)] += all_y[j][start:start + rows.numel()].float()
    for b in bias:
        if b is not None:
            acc += b.float()
    return acc if out_dtype is None else acc.to(out_dtype)


def close_bf16(got: torch.Tensor, want: torch.Tensor, rtol: float = 2 ** -7, atol: float = 1e-3) -> Optional[str]:
    """None when every element is within one BF16 rounding of the float32 reference, else a
    message with the worst element."""
    if got.shape != want.shape:
        return f"shape {list(got.shape)} != {list(want.shape)}"
    if got.numel() == 0:
        return None
    g, w = got.float(), want.float()
    err = (g - w).abs() - (atol + rtol * w.abs())
    worst = int(err.flatten().argmax())
    if float(err.flatten()[worst]) <= 0:
        return None
    return (f"{int((err > 0).sum())} elements off; worst at flat index {worst}: "
            f"got {float(g.flatten()[worst])}, want {float(w.flatten()[worst])}")


def same_bytes(got: torch.Tensor, want: torch.Tensor) -> Optional[str]:
    """None when the tensors are bit-identical (FP8 rows, indices, scales), else a message."""
    if got.shape != want.shape:
        return f"shape {list(got.shape)} != {list(want.shape)}"
    if got.numel() == 0:
        return None
    a = got.contiguous().view(torch.uint8).flatten()
    b = want.to(got.device).contiguous().view(torch.uint8).flatten()
    diff = (a != b).nonzero()
    if diff.numel() == 0:
        return None
    return f"{diff.numel()} bytes differ, first at byte {int(diff[0])}"
