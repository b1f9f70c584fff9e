"""GPU cases shaped like the frameworks that import DeepEP (vLLM, SGLang, Megatron-LM), run on every
rank by _cluster (one process per GPU; one GPU = one rank works too). Each case makes exactly the
calls the client's file makes (python/README.md, "What clients call"), through `import deep_ep`
(the compatibility package, python/deep_ep_compat), and checks every output against the torch
reference (_reference.py), as the cases of test_gpu.py do (_gpu_cases.py). All collectives come before the first assertion."""

import gc
import os
import sys

_COMPAT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python", "deep_ep_compat")
if os.path.normpath(_COMPAT) not in [os.path.normpath(p) for p in sys.path]:
    sys.path.insert(0, os.path.normpath(_COMPAT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import _reference as ref  # noqa: E402
import deep_ep  # noqa: E402
from _gpu_checks import Checks, capture_graph, gather, generators  # noqa: E402
from _gpu_checks import take_timings  # noqa: E402,F401 -- _cluster reads each case's phase times through it
from _gpu_low_latency import LLInputs, ll_expert_y, ll_gather, ll_verify  # noqa: E402
from _gpu_normal import Inputs  # noqa: E402
from deep_ep import Buffer, Config  # noqa: E402
from deep_ep.utils import EventHandle, EventOverlap  # noqa: E402

assert deep_ep.__backend__ == "epcomm", "these cases test epcomm's deep_ep, not a real DeepEP"


# ---------------------------------------------------------------------------- checks
def verify_dispatch_combine(ctx, inp, what, recv, ridx, rw, counts, handle, y, cx, cw=None, scales=None,
                            alignment=1, fp8=False, combine_weights=None):
    """dispatch outputs (recv, topk, weights, per-expert counts, handle[0]) and combine outputs against
    the reference; `scales` are the FP8 scales as the client passed them (any dtype, any strides:
    received back [rows, S] row-major, bit for bit); combine_weights: the topk_weights combine was
    given (then cw is checked)."""
    rank, E = ctx.rank, inp.num_experts
    all_topk = gather(ctx, inp.topk)
    all_w = gather(ctx, inp.weights)
    rows = [gather(ctx, inp.x8), gather(ctx, scales)] if fp8 else [gather(ctx, inp.x)]
    exp = ref.dispatch(rank, all_topk, E, rows, all_w, alignment)
    n = exp["recv_src_idx"].numel()
    all_y = gather(ctx, y[:n])
    all_cwin = gather(ctx, combine_weights[:n]) if combine_weights is not None else None

    c = Checks(ctx, what)
    recv_x, recv_sc = recv if fp8 else (recv, None)
    c.true("recv_x type", isinstance(recv, tuple) == fp8, "FP8 input returns a (recv_x, recv_scales) tuple")
    c.equal("recv_x rows", recv_x.size(0), n)
    c.bytes("recv_x", recv_x, exp["rows"][0])
    if fp8:
        c.equal("recv_x_scales dtype", recv_sc.dtype, scales.dtype)
        c.equal("recv_x_scales shape", tuple(recv_sc.shape), (n, scales.size(1)))
        c.true("recv_x_scales layout", recv_sc.is_contiguous(), "received scales are row-major")
        c.bytes("recv_x_scales", recv_sc, exp["rows"][1])
    c.bytes("handle[0] (rank_prefix_matrix)", handle[0], exp["rank_prefix_matrix"])
    c.equal("num_recv_tokens_per_expert_list", list(counts), exp["num_recv_tokens_per_expert"])
    c.equal("recv_topk_idx dtype", ridx.dtype, torch.int64)
    c.bytes("recv_topk_idx", ridx, exp["recv_topk_idx"])
    c.bytes("recv_topk_weights", rw, exp["recv_topk_weights"])
    c.bf16("combined_x", cx, ref.combine(rank, all_topk, E, all_y, inp.num_tokens))
    if combine_weights is not None:
        c.bytes("combined_topk_weights", cw, ref.combine(rank, all_topk, E, all_cwin, inp.num_tokens, out_dtype=None))
    else:
        c.true("combined_topk_weights", cw is None, "None without topk_weights")
    c.done()
    return exp


def random_y(ctx, inp, rows):
    """Expert outputs for combine: BF16 rows of the dispatch's row count."""
    g = generators(ctx, inp.y_seed)[1]
    return torch.randn(rows, inp.hidden, generator=g, device=ctx.device).to(torch.bfloat16)


def packed_ue8m0_scales(ctx, seed, num_tokens, hidden):
    """What SGLang passes with DeepGEMM's UE8M0 scales (sglang_per_token_group_quant_fp8 with
    column_major_scales, scale_tma_aligned, scale_ue8m0): int32 [T, ceil(hidden/512)], four exponent
    bytes per word, column-major with the token stride rounded up to 4. epcomm moves the words as
    they are, so any bits do."""
    words = (hidden // 128 + 3) // 4
    aligned = (num_tokens + 3) // 4 * 4
    g = generators(ctx, seed)[1]
    storage = torch.randint(-2 ** 31, 2 ** 31 - 1, (words, aligned), generator=g, dtype=torch.int32,
                            device=ctx.device)
    return storage.t()[:num_tokens]


# ---------------------------------------------------------------------------- Megatron-LM
# megatron/core/transformer/moe/fused_a2a.py, call for call: a module-level buffer sized by the
# configs' hints (reallocated when too small), the layout then dispatch with previous_event, the
# autograd functions whose backward is the other operation.
_megatron_buffer = None


def _megatron_hidden_bytes(x):
    return x.size(1) * max(x.element_size(), 2)


def _megatron_get_buffer(group, hidden_bytes):
    global _megatron_buffer
    num_nvl_bytes, num_rdma_bytes = 0, 0
    for config in (Buffer.get_dispatch_config(group.size()), Buffer.get_combine_config(group.size())):
        num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, group.size()), num_nvl_bytes)
        num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, group.size()), num_rdma_bytes)
    if (_megatron_buffer is None or _megatron_buffer.group != group or _megatron_buffer.num_nvl_bytes < num_nvl_bytes
            or _megatron_buffer.num_rdma_bytes < num_rdma_bytes):
        _megatron_buffer = Buffer(group, num_nvl_bytes, num_rdma_bytes)
    return _megatron_buffer


class _MegatronDispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, token_indices, token_probs, num_experts, group, async_finish=False,
                allocate_on_comm_stream=False):
        previous_event = None
        if async_finish:
            previous_event = EventOverlap(EventHandle())
        buffer = _megatron_get_buffer(group, _megatron_hidden_bytes(x))
        (num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank,
         event) = buffer.get_dispatch_layout(token_indices, num_experts, previous_event=previous_event,
                                             async_finish=async_finish,
                                             allocate_on_comm_stream=allocate_on_comm_stream)
        (recv_x, recv_token_indices, recv_token_probs, num_recv_tokens_per_expert_list, handle,
         after_event_overlap) = buffer.dispatch(
            x, topk_idx=token_indices, topk_weights=token_probs, num_tokens_per_rank=num_tokens_per_rank,
            num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
            num_tokens_per_expert=num_tokens_per_expert, previous_event=event, async_finish=async_finish,
            allocate_on_comm_stream=allocate_on_comm_stream)
        if async_finish:
            after_event_overlap.current_stream_wait()
        ctx.group, ctx.handle, ctx.async_finish = group, handle, async_finish
        ctx.allocate_on_comm_stream = allocate_on_comm_stream
        tokens_per_expert = torch.tensor(num_recv_tokens_per_expert_list)
        return recv_x, recv_token_indices, recv_token_probs, tokens_per_expert, handle

    @staticmethod
    def backward(ctx, grad_output, grad_token_indices, grad_token_probs, grad_tokens_per_expert, grad_handle):
        buffer = _megatron_get_buffer(ctx.group, _megatron_hidden_bytes(grad_output))
        previous_event = None
        if ctx.async_finish:
            previous_event = EventOverlap(EventHandle())
        grad_x, grad_token_probs, after_event = buffer.combine(
            grad_output.contiguous(), ctx.handle, topk_weights=grad_token_probs.float(),
            previous_event=previous_event, async_finish=ctx.async_finish,
            allocate_on_comm_stream=ctx.allocate_on_comm_stream)
        if ctx.async_finish:
            after_event.current_stream_wait()
        return grad_x, None, grad_token_probs, None, None, None, None


class _MegatronCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, handle, async_finish=False, allocate_on_comm_stream=False):
        previous_event = None
        if async_finish:
            previous_event = EventOverlap(EventHandle())
        buffer = _megatron_get_buffer(group, _megatron_hidden_bytes(x))
        combined_x, _, after_event = buffer.combine(x, handle=handle, async_finish=async_finish,
                                                    previous_event=previous_event,
                                                    allocate_on_comm_stream=allocate_on_comm_stream)
        if async_finish:
            after_event.current_stream_wait()
        ctx.handle, ctx.group, ctx.async_finish = handle, group, async_finish
        ctx.allocate_on_comm_stream = allocate_on_comm_stream
        return combined_x, None

    @staticmethod
    def backward(ctx, grad_output, previous_event=None):
        previous_event = None
        if ctx.async_finish:
            previous_event = EventOverlap(EventHandle())
        buffer = _megatron_get_buffer(ctx.group, _megatron_hidden_bytes(grad_output))
        grad_x, _, _, _, _, after_event = buffer.dispatch(grad_output.contiguous(), handle=ctx.handle,
                                                          previous_event=previous_event,
                                                          async_finish=ctx.async_finish,
                                                          allocate_on_comm_stream=ctx.allocate_on_comm_stream)
        if ctx.async_finish:
            after_event.current_stream_wait()
        return grad_x, None, None, None, None


def megatron(ctx, seed, async_finish=False, allocate_on_comm_stream=False, hidden=1024, num_topk=4):
    """Megatron's flex dispatcher: set_deepep_num_sms(20), dispatch (BF16, float32 probs) -> expert
    (x2) -> combine, then backward: combine's backward is a cached dispatch of the output gradient,
    dispatch's backward a combine of the row gradients with the probs' gradients as topk_weights."""
    global _megatron_buffer
    R, E = ctx.num_ranks, 8 * ctx.num_ranks
    old_sms = Buffer.num_sms
    Buffer.set_num_sms(20)
    try:
        inp = Inputs(ctx, seed, 200, hidden, num_topk, E)
        x = inp.x.clone().requires_grad_(True)
        probs = inp.weights.clone().requires_grad_(True)
        recv_x, recv_idx, recv_probs, tokens_per_expert, handle = _MegatronDispatch.apply(
            x, inp.topk, probs, E, ctx.group, async_finish, allocate_on_comm_stream)
        y = recv_x * 2  # the stand-in expert (exact in BF16)
        combined, _ = _MegatronCombine.apply(y, ctx.group, handle, async_finish, allocate_on_comm_stream)
        g_out = torch.randn(combined.shape, generator=generators(ctx, seed + 1)[1], device=ctx.device).to(
            torch.bfloat16)
        # The probs' gradient: 1 where the received slot names a local expert, else 0.
        loss = (combined.float() * g_out.float()).sum() + (recv_probs * (recv_idx >= 0).float()).sum()
        loss.backward()
        torch.cuda.synchronize()
        # Collectives first: the reference of the forward, and every rank's routing.
        all_topk = gather(ctx, inp.topk)
        exp = ref.dispatch(ctx.rank, all_topk, E, [gather(ctx, inp.x)], gather(ctx, inp.weights))
        n = exp["recv_src_idx"].numel()
        want_combined = ref.combine(ctx.rank, all_topk, E, gather(ctx, (recv_x.detach() * 2)[:n]), inp.num_tokens)
        reused = _megatron_buffer is not None and _megatron_buffer.group is ctx.group
    finally:
        Buffer.set_num_sms(old_sms)
        # Every rank drops the buffer here (its destructor is collective), before any check can raise.
        _megatron_buffer = None
        gc.collect()
    c = Checks(ctx, f"Megatron fused_a2a async={async_finish} on_comm={allocate_on_comm_stream} (seed {seed})")
    c.bytes("recv_x", recv_x.detach(), exp["rows"][0])
    c.bytes("recv_token_indices", recv_idx, exp["recv_topk_idx"])
    c.bytes("recv_token_probs", recv_probs.detach(), exp["recv_topk_weights"])
    c.equal("tokens_per_expert", tokens_per_expert.tolist(), exp["num_recv_tokens_per_expert"])
    c.equal("tokens_per_expert device", tokens_per_expert.device.type, "cpu")
    c.bf16("combined", combined.detach(), want_combined)
    # grad_x[t] = sum over the ranks that got t of 2 * g_out[t] (cached dispatch, x2, combine).
    _, _, in_rank = ref.layout(inp.topk, E, R)
    want_gx = g_out.float() * 2 * in_rank.sum(dim=1, keepdim=True).float()
    c.bf16("grad x (dispatch backward = combine)", x.grad, want_gx)
    c.bytes("grad probs (combined topk_weights)", probs.grad, (inp.topk >= 0).float())
    c.true("buffer reused", reused, "get_buffer made one buffer and reused it in backward")
    c.done()


# ---------------------------------------------------------------------------- vLLM
# vllm/distributed/device_communicators/all2all.py (the managers' Buffer kwargs, fault tolerance)
# and model_executor/layers/fused_moe/prepare_finalize/deepep_ht.py / deepep_ll.py.
def vllm_high_throughput(ctx, seed, fp8=True, hidden=2048, num_topk=8):
    R, E = ctx.num_ranks, 16 * ctx.num_ranks
    hint = max(Buffer.get_dispatch_config(R).get_nvl_buffer_size_hint(hidden * 2, R),
               Buffer.get_combine_config(R).get_nvl_buffer_size_hint(hidden * 2, R))
    buffer = deep_ep.Buffer(group=ctx.group, num_nvl_bytes=hint, num_rdma_bytes=0, low_latency_mode=False,
                            num_qps_per_rank=1, explicitly_destroy=True)
    old_sms = Buffer.num_sms
    try:
        deep_ep.Buffer.set_num_sms(min(20, old_sms))  # DeepEPHTAll2AllManager.set_num_sms: never more
        _vllm_high_throughput_steps(ctx, seed, buffer, fp8, hidden, num_topk, E)
    finally:
        Buffer.set_num_sms(old_sms)
        torch.cuda.synchronize()
        buffer.destroy()  # the manager's destroy(): explicitly_destroy=True, every rank


def _vllm_high_throughput_steps(ctx, seed, buffer, fp8, hidden, num_topk, E):
    R = ctx.num_ranks
    available_rank_configs = [2, 4, 8, 16, 24, 32, 64, 128, 144, 160]
    dispatch_config = deep_ep.Buffer.get_dispatch_config(R) if R in available_rank_configs else None
    combine_config = deep_ep.Buffer.get_combine_config(R) if R in available_rank_configs else None
    inp = Inputs(ctx, seed, 200, hidden, num_topk, E)
    # vLLM's block-quantized FP8 input: float32 scales [T, hidden / 128], row-major.
    scales = inp.scales.contiguous()
    previous_event = buffer.capture()  # dbo_get_previous_event(self.buffer.capture)
    (num_tokens_per_rank, num_tokens_per_rdma_rank, dispatch_expert_num_tokens, is_token_in_rank,
     event) = buffer.get_dispatch_layout(topk_idx=inp.topk, num_experts=E, previous_event=previous_event,
                                         async_finish=False, allocate_on_comm_stream=False)
    token_data = (inp.x8, scales) if fp8 else inp.x
    (token_data, expert_topk_ids, expert_topk_weights, expert_num_tokens_per_expert_list, handle,
     event) = buffer.dispatch(x=token_data, handle=None, num_tokens_per_rank=num_tokens_per_rank,
                              num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
                              num_tokens_per_expert=dispatch_expert_num_tokens, topk_idx=inp.topk,
                              topk_weights=inp.weights, expert_alignment=1, config=dispatch_config,
                              previous_event=previous_event, async_finish=True, allocate_on_comm_stream=False)
    problems = []
    if event.event is None:
        problems.append("dispatch(async_finish=True) returned no event")
    else:
        event.current_stream_wait()  # _receiver
    y = random_y(ctx, inp, expert_topk_ids.size(0))
    combined_x, _, event = buffer.combine(x=y, handle=handle, topk_weights=None, config=combine_config,
                                          previous_event=buffer.capture(), async_finish=True,
                                          allocate_on_comm_stream=False)
    if event.event is not None:
        event.current_stream_wait()
    output = torch.empty_like(combined_x)
    output.copy_(combined_x, non_blocking=True)
    torch.cuda.synchronize()
    verify_dispatch_combine(ctx, inp, f"vLLM deepep_ht fp8={fp8} (seed {seed})", token_data, expert_topk_ids,
                            expert_topk_weights, expert_num_tokens_per_expert_list, handle, y, output, None,
                            scales=scales, fp8=fp8)
    c = Checks(ctx, "vLLM deepep_ht")
    for p in problems:
        c.fails.append(p)
    c.done()


def _vllm_dequant_fp8(expert_x_fp8, expert_x_scales):
    """vLLM deepep_ll.py's dequant_fp8, as it is (it needs the scales' token-major order)."""
    assert expert_x_fp8.is_contiguous()
    expert_x_scales = expert_x_scales.contiguous()
    num_experts = expert_x_fp8.size(0)
    expert_x_fp32 = expert_x_fp8.to(torch.float32).view(num_experts, -1, 128)
    expert_x_scales = expert_x_scales.view(num_experts, -1, 1)
    return (expert_x_fp32 * expert_x_scales).view(expert_x_fp8.size())


def vllm_low_latency(ctx, seed, ue8m0=False, tmax=64, hidden=2048, num_topk=8):
    """vLLM's LL manager and prepare/finalize: the buffer from the rdma size hint (keywords), shrink
    mode on, dispatch with a hook (use_fp8, round_scale = use_ue8m0), the expert, combine into
    `out=` with and without a hook; then the fault-tolerance path (query the mask, zero the whole
    LL region through get_local_buffer_tensor, clean the mask) and more rounds on the same buffer."""
    R, E = ctx.num_ranks, 8 * ctx.num_ranks
    num_rdma_bytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank=tmax, hidden=hidden, num_ranks=R, num_experts=E)
    buffer = deep_ep.Buffer(group=ctx.group, num_nvl_bytes=0, num_rdma_bytes=num_rdma_bytes, low_latency_mode=True,
                            num_qps_per_rank=E // R, allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False,
                            explicitly_destroy=True, enable_shrink=True)
    try:
        return _vllm_low_latency_rounds(ctx, seed, buffer, ue8m0, tmax, hidden, num_topk, E)
    finally:
        torch.cuda.synchronize()
        buffer.destroy()


def _vllm_low_latency_rounds(ctx, seed, buffer, ue8m0, tmax, hidden, num_topk, E):
    R = ctx.num_ranks
    reports = []
    for rnd in range(4):
        if rnd == 2:
            # DeepEPLLAll2AllManager.query_active_mask / clean_buffers, on every rank between calls.
            mask = torch.zeros(R, device="cuda", dtype=torch.int32)
            buffer.low_latency_query_mask_buffer(mask)
            c = Checks(ctx, "vLLM fault tolerance")
            c.true("no rank masked", bool((mask == 0).all()), f"mask {mask.tolist()}")
            c.done()
            torch.cuda.synchronize()
            dist.barrier()  # no rank is still in an LL call
            buffer.get_local_buffer_tensor(dtype=torch.int8, use_rdma_buffer=True).zero_()
            torch.cuda.synchronize()
            buffer.low_latency_clean_mask_buffer()
            torch.cuda.synchronize()
            dist.barrier()  # every rank zeroed its region before anyone sends again
        inp = LLInputs(ctx, seed + rnd, tmax, hidden, num_topk, E)
        expert_x, expert_num_tokens, handle, _, hook = buffer.low_latency_dispatch(
            inp.x, inp.topk, tmax, E, use_fp8=True, round_scale=ue8m0, use_ue8m0=ue8m0, async_finish=False,
            return_recv_hook=True)
        problems = []
        if hook is None:
            problems.append("return_recv_hook=True returned no hook")
        else:
            hook()
        x_q, x_s = expert_x
        if not ue8m0:  # vLLM's own dequantization of the received rows must read our scales right
            mine = _vllm_dequant_fp8(x_q, x_s)
            theirs = torch.stack([ref.dequant(x_q[e], x_s[e]) for e in range(x_q.size(0))])
            # Rows past each expert's count are not written (any bits, NaN included): compared as numbers.
            if not torch.equal(torch.nan_to_num(mine), torch.nan_to_num(theirs)):
                problems.append("vLLM's dequant_fp8 of the received rows differs from the reference dequantization")
        y = ll_expert_y(ctx, E, expert_x, True, ue8m0, hidden)
        output = torch.empty((inp.num_tokens, hidden), dtype=torch.bfloat16, device=ctx.device)
        do_recv_hook = rnd % 2 == 1
        _, _, recv_hook = buffer.low_latency_combine(y, inp.topk, inp.weights, handle, async_finish=False,
                                                     zero_copy=False, return_recv_hook=do_recv_hook, out=output)
        if do_recv_hook:
            recv_hook()
        elif recv_hook is not None:
            problems.append("return_recv_hook=False returned a hook")
        out = dict(recv=expert_x, count=expert_num_tokens, handle=handle, cx=output, problems=problems)
        reports.append(ll_verify(ctx, inp, out, ll_gather(ctx, inp), f"vLLM deepep_ll round {rnd} ue8m0={ue8m0} "
                                 f"(seed {seed}){' after zeroing the region' if rnd >= 2 else ''}", fp8=True,
                                 round_scale=ue8m0, ue8m0=ue8m0))
    return reports


# ---------------------------------------------------------------------------- SGLang
# python/sglang/srt/layers/moe/token_dispatcher/deepep.py: DeepEPConfig from --deepep-config
# (Config(**json) with DeepEP's names), DeepEPBuffer in AUTO mode (one buffer for normal and
# low-latency calls, clean_low_latency_buffer when switching to low latency), the normal dispatch
# with UE8M0 column-major scales, expert_alignment=128, capture() events; the LL calls with
# async_finish (or hooks), also inside a CUDA graph.
SGLANG_CONFIG = {
    "normal_dispatch": {"num_sms": 24, "num_max_nvl_chunked_send_tokens": 16, "num_max_nvl_chunked_recv_tokens": 256,
                        "num_max_rdma_chunked_send_tokens": 16, "num_max_rdma_chunked_recv_tokens": 128},
    "normal_combine": {"num_sms": 24, "num_max_nvl_chunked_send_tokens": 8, "num_max_nvl_chunked_recv_tokens": 256,
                       "num_max_rdma_chunked_send_tokens": 16, "num_max_rdma_chunked_recv_tokens": 128},
}


class _SGLangBuffer:
    """DeepEPBuffer.get_deepep_buffer / clean_buffer / set_dispatch_mode_* of SGLang, AUTO mode."""

    def __init__(self, ctx, hidden, tmax, num_experts):
        self.dispatch_config = Config(**SGLANG_CONFIG["normal_dispatch"])
        self.combine_config = Config(**SGLANG_CONFIG["normal_combine"])
        group, param_bytes = ctx.group, 2
        num_nvl_bytes, num_rdma_bytes = 0, 0
        hidden_bytes = hidden * param_bytes
        for config in (self.dispatch_config, self.combine_config):
            num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, group.size()), num_nvl_bytes)
            num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, group.size()), num_rdma_bytes)
        num_rdma_bytes = max(Buffer.get_low_latency_rdma_size_hint(tmax, hidden, group.size(), num_experts),
                             num_rdma_bytes)
        num_qps_per_rank = max(SGLANG_CONFIG["normal_dispatch"]["num_sms"], num_experts // group.size())
        self.buffer = Buffer(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode=True,
                             num_qps_per_rank=num_qps_per_rank, allow_mnnvl=True)
        self.hidden, self.tmax, self.num_experts = hidden, tmax, num_experts
        self.mode = None

    def clean_buffer(self):
        if not self.buffer.low_latency_mode:
            return
        self.buffer.clean_low_latency_buffer(self.tmax, self.hidden, self.num_experts)

    def set_normal(self):
        self.mode = "normal"

    def set_low_latency(self):
        if self.mode == "normal":
            self.clean_buffer()
        self.mode = "low_latency"


def _sglang_normal_round(ctx, sb, inp, x, async_finish, what, scales=None, fp8=False):
    buffer = sb.buffer
    sb.set_normal()
    previous_event = Buffer.capture() if async_finish else None  # dispatch_a
    (num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank,
     previous_event) = buffer.get_dispatch_layout(inp.topk, inp.num_experts, previous_event=previous_event,
                                                  async_finish=async_finish,
                                                  allocate_on_comm_stream=previous_event is not None)
    (recv_x, recv_topk_ids, recv_topk_weights, num_recv_tokens_per_expert, handle,
     event) = buffer.dispatch(x, topk_idx=inp.topk, topk_weights=inp.weights, num_tokens_per_rank=num_tokens_per_rank,
                              num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
                              num_tokens_per_expert=num_tokens_per_expert, previous_event=previous_event,
                              async_finish=async_finish,
                              allocate_on_comm_stream=(previous_event is not None) and async_finish,
                              expert_alignment=128, config=sb.dispatch_config)
    event.current_stream_wait() if async_finish else ()  # dispatch_b
    rows = recv_topk_ids.size(0)
    y = random_y(ctx, inp, rows)
    previous_event = Buffer.capture() if async_finish else None  # combine_a
    combined_x, _, event = buffer.combine(y, handle, async_finish=async_finish, previous_event=previous_event,
                                          allocate_on_comm_stream=previous_event is not None,
                                          config=sb.combine_config)
    event.current_stream_wait() if async_finish else ()  # combine_b
    torch.cuda.synchronize()
    verify_dispatch_combine(ctx, inp, what, recv_x, recv_topk_ids, recv_topk_weights, num_recv_tokens_per_expert,
                            handle, y, combined_x, None, scales=scales, alignment=128, fp8=fp8)


def _sglang_ll_step(sb, inp, async_finish, hook):
    """_DeepEPDispatcherImplLowLatency dispatch_a/b, the stand-in expert, combine_a/b."""
    buffer = sb.buffer
    sb.set_low_latency()
    packed_recv_hidden, packed_recv_count, handle, event, recv_hook = buffer.low_latency_dispatch(
        inp.x, inp.topk, sb.tmax, sb.num_experts, use_fp8=True, async_finish=not hook, return_recv_hook=hook)
    recv_hook() if hook else event.current_stream_wait()
    return packed_recv_hidden, packed_recv_count, handle


def sglang(ctx, seed, async_finish=True, hook=False, hidden=1024, tmax=32, num_topk=4):
    """Prefill (normal: BF16, then FP8 with packed UE8M0 column-major scales, then FP8 with float32
    scales) and decode (low latency) on one AUTO-mode buffer, switching back and forth (each switch to
    low latency cleans, on the current stream); then decode captured in a CUDA graph with its clean
    inside, replayed on new inputs."""
    R, E = ctx.num_ranks, 8 * ctx.num_ranks
    sb = _SGLangBuffer(ctx, hidden, tmax, E)
    c = Checks(ctx, "SGLang buffer")
    c.equal("group_size", sb.buffer.group_size, R)
    c.true("low_latency_mode", sb.buffer.low_latency_mode is True)
    c.done()
    reports = []
    for step in range(2):
        inp = Inputs(ctx, seed + step, 150, hidden, num_topk, E)
        _sglang_normal_round(ctx, sb, inp, inp.x, async_finish, f"SGLang normal bf16 step {step} (seed {seed})")
        ue8m0 = packed_ue8m0_scales(ctx, seed + step, inp.num_tokens, hidden)
        _sglang_normal_round(ctx, sb, inp, (inp.x8, ue8m0), async_finish,
                             f"SGLang normal fp8 UE8M0 step {step} (seed {seed})", scales=ue8m0, fp8=True)
        _sglang_normal_round(ctx, sb, inp, (inp.x8, inp.scales), async_finish,
                             f"SGLang normal fp8 float32 column-major step {step} (seed {seed})", scales=inp.scales,
                             fp8=True)
        ll = LLInputs(ctx, seed + 10 + step, tmax, hidden, num_topk, E)
        recv, count, handle = _sglang_ll_step(sb, ll, async_finish, hook)
        y = ll_expert_y(ctx, E, recv, True, False, hidden)
        combined, event, recv_hook = sb.buffer.low_latency_combine(x=y, topk_idx=ll.topk, topk_weights=ll.weights,
                                                                   handle=handle, async_finish=not hook,
                                                                   return_recv_hook=hook)
        recv_hook() if hook else event.current_stream_wait()
        out = dict(recv=recv, count=count, handle=handle, cx=combined, problems=[])
        reports.append(ll_verify(ctx, ll, out, ll_gather(ctx, ll), f"SGLang decode step {step} hook={hook} "
                                 f"(seed {seed})"))

    # Decode in a CUDA graph: the switch's clean is captured too (SGLang may switch while capturing).
    static = LLInputs(ctx, seed + 99, tmax, hidden, num_topk, E, fixed_tokens=tmax)
    static_x, static_topk, static_w = static.x.clone(), static.topk.clone(), static.weights.clone()

    def step_fn():
        sb.set_normal()
        sb.set_low_latency()  # cleans
        recv, count, handle, event, recv_hook = sb.buffer.low_latency_dispatch(
            static_x, static_topk, tmax, E, use_fp8=True, async_finish=not hook, return_recv_hook=hook)
        recv_hook() if hook else event.current_stream_wait()
        y = ll_expert_y(ctx, E, recv, True, False, hidden)
        combined, event, recv_hook = sb.buffer.low_latency_combine(x=y, topk_idx=static_topk, topk_weights=static_w,
                                                                   handle=handle, async_finish=not hook,
                                                                   return_recv_hook=hook)
        recv_hook() if hook else event.current_stream_wait()
        return recv, count, handle, combined

    graph, (recv, count, handle, combined) = capture_graph(step_fn)
    for it in range(2):
        fresh = LLInputs(ctx, seed + 200 + it, tmax, hidden, num_topk, E, fixed_tokens=tmax)
        static_x.copy_(fresh.x)
        static_topk.copy_(fresh.topk)
        static_w.copy_(fresh.weights)
        graph.replay()
        torch.cuda.synchronize()
        out = dict(recv=recv, count=count, handle=handle, cx=combined, problems=[])
        reports.append(ll_verify(ctx, fresh, out, ll_gather(ctx, fresh),
                                 f"SGLang decode in a CUDA graph (clean inside) replay {it} hook={hook} (seed {seed})"))
    # A normal prefill after the graph, then drop the buffer on every rank at the same point.
    inp = Inputs(ctx, seed + 300, 150, hidden, num_topk, E)
    _sglang_normal_round(ctx, sb, inp, inp.x, async_finish, f"SGLang normal after the graph (seed {seed})")
    # The buffer goes with its last reference (step_fn's too), on every rank at this point.
    del graph, recv, count, handle, combined, step_fn
    torch.cuda.synchronize()
    sb = None
    gc.collect()
    return reports
