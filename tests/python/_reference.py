"""Torch references for epcomm's normal mode, built from every rank's inputs (all-gathered), per
docs/contract.md §3.1-3.2. Plain torch ops, any device; test_cpu_reference.py checks them on the CPU,
test_gpu.py compares epcomm's outputs with them."""

from typing import Dict, List, Optional, Sequence

import torch


def random_topk(num_tokens: int, num_topk: int, num_experts: int, gen: torch.Generator, drop: float = 0.1,
                nowhere: float = 0.02) -> torch.Tensor:
    """[T, K] int64 on the generator's device: distinct experts per token, some slots -1, a few
    tokens sent nowhere."""
    dev = gen.device
    if num_tokens == 0:
        return torch.empty((0, num_topk), dtype=torch.int64, device=dev)
    scores = torch.rand(num_tokens, num_experts, generator=gen, device=dev)
    idx = scores.topk(num_topk, dim=1).indices
    drop_mask = torch.rand(num_tokens, num_topk, generator=gen, device=dev) < drop
    drop_mask |= (torch.rand(num_tokens, 1, generator=gen, device=dev) < nowhere).expand(-1, num_topk)
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
    per_expert = sum(torch.bincount(t[t >= 0].flatten(), minlength=num_experts)[:num_experts] for t in all_topk)
    counts = per_expert[lo:lo + per_rank].tolist()  # one host sync
    out["num_recv_tokens_per_expert"] = [(n + expert_alignment - 1) // expert_alignment * expert_alignment
                                         for n in counts]
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


# ---------------------------------------------------------------------------- low-latency mode (docs/contract.md §3.3)
SCALE_GROUP = 128


def fp8_scales(x: torch.Tensor, round_scale: bool = False) -> torch.Tensor:
    """[T, hidden] BF16 -> [T, hidden/128] float32: max(amax, 1e-4) / 448 per 128 channels, as IEEE
    float32 division (tensor by tensor: torch turns a division by a Python scalar into a multiplication
    by its reciprocal on the GPU), rounded up to a power of two by exponent arithmetic with round_scale."""
    T, H = x.shape
    amax = x.float().abs().view(T, H // SCALE_GROUP, SCALE_GROUP).amax(dim=2)
    scale = torch.maximum(amax, torch.full_like(amax, 1e-4)) / torch.full_like(amax, 448.0)
    if round_scale:
        bits = scale.view(torch.int32)
        mantissa = bits & 0x7FFFFF
        bits = torch.where(mantissa != 0, (bits & ~0x7FFFFF) + (1 << 23), bits)
        scale = bits.view(torch.float32)
    return scale


def fp8_cast(x: torch.Tensor, round_scale: bool = False):
    """[T, hidden] BF16 -> (q [T, hidden] float8_e4m3fn, scales [T, hidden/128] float32): q = e4m3(x /
    scale), IEEE division, round to nearest even, saturating at +-448. torch's float -> e4m3fn cast
    rounds to nearest even (subnormals included) but is not saturating (|v| >= 464 becomes NaN), so the
    quotient is clamped to [-448, 448] first; on finite values that is exactly CUDA's __NV_SATFINITE
    conversion. (|x / scale| <= 448 up to one rounding anyway, so the clamp never bites in practice.)"""
    T, H = x.shape
    scale = fp8_scales(x, round_scale)
    xf = x.float().view(T, H // SCALE_GROUP, SCALE_GROUP)
    q = (xf / scale.unsqueeze(2)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q.view(T, H), scale


def ue8m0_pack(scales: torch.Tensor) -> torch.Tensor:
    """[..., G] power-of-two float32 scales -> [..., ceil(G/4)] int32: the exponent bytes, 4 per word,
    group 4w+i in byte i (little-endian)."""
    G = scales.size(-1)
    W = (G + 3) // 4
    exps = (scales.contiguous().view(torch.int32).to(torch.int64) >> 23) & 0xFF
    padded = torch.zeros(scales.shape[:-1] + (W * 4,), dtype=torch.int64, device=scales.device)
    padded[..., :G] = exps
    padded = padded.view(scales.shape[:-1] + (W, 4))
    words = padded[..., 0] | (padded[..., 1] << 8) | (padded[..., 2] << 16) | (padded[..., 3] << 24)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def ue8m0_unpack(packed: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of ue8m0_pack: [..., W] int32 -> [..., groups] float32 powers of two."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    exps = torch.stack([(words >> (8 * i)) & 0xFF for i in range(4)], dim=-1).flatten(-2)[..., :groups]
    return (exps << 23).to(torch.int32).view(torch.float32)


def dequant(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[..., hidden] e4m3 (or anything .float() takes) and [..., hidden/128] float32 -> float32 q * scale
    (fixed shapes, no host sync: CUDA-graph capturable)."""
    shape = q.shape
    groups = scales.size(-1)
    return (q.float().reshape(*shape[:-1], groups, SCALE_GROUP) * scales.float().unsqueeze(-1)).reshape(shape)


def ll_tokens(all_topk: Sequence[torch.Tensor], num_experts: int, rank: int) -> List[List[torch.Tensor]]:
    """What rank `rank` receives in low-latency mode: [local expert][source rank] -> the source's
    token indices (int64, ascending, a token once per slot that names the expert)."""
    R = len(all_topk)
    per_rank = num_experts // R
    out = []
    for e in range(per_rank):
        g = rank * per_rank + e
        out.append([(t == g).nonzero()[:, 0] for t in all_topk])
    return out


def expert_scale(num_experts: int, device=None) -> torch.Tensor:
    """[E] float32: the factor the tests' stand-in expert multiplies its rows by (distinct per expert,
    so a row combined under the wrong expert shows)."""
    return 0.5 + (torch.arange(num_experts, device=device) % 13).float() / 8


def ll_expert(rows: torch.Tensor, factor) -> torch.Tensor:
    """The tests' stand-in expert: BF16(float32 rows * factor); the same ops on either side give the
    same bits."""
    return (rows * factor).to(torch.bfloat16)


def ll_combine(topk_idx: torch.Tensor, topk_weights: torch.Tensor, y_of_slot) -> torch.Tensor:
    """low_latency_combine's output as float32: out[t] = sum over k with topk_idx[t, k] >= 0 of
    w[t, k] * y_of_slot(k)[t].float(), multiply then add, in k order (as the kernel does)."""
    T, K = topk_idx.shape
    acc = None
    for k in range(K):
        y = y_of_slot(k).float()
        if acc is None:
            acc = torch.zeros_like(y)
        valid = (topk_idx[:, k] >= 0).unsqueeze(1)
        acc = torch.where(valid, acc + topk_weights[:, k:k + 1].float() * y, acc)
    return acc
