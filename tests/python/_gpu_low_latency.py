"""Low-latency GPU cases, run on every rank by _cluster (one process per GPU): the shared buffer,
one rank's inputs, a decode step (dispatch, a stand-in expert, combine) with DeepEP's options, the
check of every output against the torch reference (_reference.py), and the cases (modes and stats,
two micro-batches, CUDA graphs, argument errors, memory views). _gpu_cases.py lists what
test_gpu.py runs."""

import gc
import weakref

import torch
import torch.distributed as dist

import _reference as ref
import epcomm
from _gpu_checks import FP8, Checks, capture_graph, expect_error, gather, generators, timed


# ---------------------------------------------------------------------------- low-latency mode
# Each case checks dispatch against a torch reference built from every rank's all-gathered inputs:
# counts and layout_range counts exactly, and the rows of each (local expert, source rank) as a set
# (sorted by src_info inside the layout_range segment), data and scales bit for bit against
# _reference.fp8_cast. The stand-in expert multiplies each received row (dequantized) by a factor
# of its global expert id (_reference.ll_expert), so every rank knows what each expert returns for
# its own tokens, and combine is checked against _reference.ll_combine without gathering the
# expert outputs: within 1e-2 relative (and the number of elements that are not bit-identical to
# the float32 k-order reference is reported).

def ll_standard_experts(R):
    return 288 if 288 % R == 0 else 288 // R * R


def ll_shapes(R):
    """(Tmax, hidden, num_experts) of every low-latency case, so that one buffer fits them all."""
    return {"basic": (64, 1024, 8 * R), "ue8m0": (64, 640, 8 * R), "standard": (128, 7168, ll_standard_experts(R)),
            "graph": (32, 512, 4 * R), "small": (16, 256, 4 * R)}


@timed("buffers")
def ll_buffer(ctx):
    """One low-latency buffer per rank process, made on first use (collective: every rank runs the
    same case) and big enough for every shape in ll_shapes; cases clean it to their shape."""
    buf = getattr(ctx, "ll_buffer", None)
    if buf is None:
        R = ctx.num_ranks
        nbytes = max(epcomm.Buffer.get_low_latency_rdma_size_hint(t, h, R, e) for t, h, e in ll_shapes(R).values())
        buf = ctx.ll_buffer = epcomm.Buffer(ctx.group, num_rdma_bytes=nbytes, low_latency_mode=True)
        _, hidden, E = ll_shapes(R)["basic"]
        warm_expert_kernels(ctx, E, hidden)
    return buf


class LLInputs:
    """One rank's low-latency inputs: T <= Tmax tokens (rank 0: Tmax unless fixed), distinct experts
    per token with some -1 slots, weights, and BF16 rows with some tiny (below the 1e-4 scale floor)
    and some large rows."""

    @timed("inputs")
    def __init__(self, ctx, seed, tmax, hidden, num_topk, num_experts, fixed_tokens=None, drop=0.1):
        sizes, g = generators(ctx, seed * 7919 + ctx.rank)
        if fixed_tokens is not None:
            T = fixed_tokens
        else:
            T = tmax if ctx.rank == 0 else int(torch.randint(0, tmax + 1, (1,), generator=sizes))
        dev = ctx.device
        self.num_tokens, self.tmax, self.hidden, self.num_experts = T, tmax, hidden, num_experts
        self.topk = ref.random_topk(T, num_topk, num_experts, g, drop=drop)
        self.weights = torch.rand(T, num_topk, generator=g, device=dev)
        mult = torch.ones(T, 1, device=dev)
        mult[::5] = 1e-6  # below the scale floor: small e4m3 codes
        mult[2::11] = 1e-9  # far below it: subnormal codes and zeros
        mult[1::7] = 300.0
        self.x = (torch.randn(T, hidden, generator=g, device=dev) * mult).to(torch.bfloat16)


def ll_settle(problems, what, event, hook, async_finish, return_recv_hook):
    """Checks the (event, hook) pair of one call and finishes it the way the caller would."""
    if return_recv_hook:
        if not callable(hook):
            problems.append(f"{what}: return_recv_hook=True returned no callable hook ({hook!r})")
            return
        if event.event is not None:
            problems.append(f"{what}: a hook call returned an event")
        if hook() is not None:
            problems.append(f"{what}: hook() must return None")
        try:  # the receive half runs once
            hook()
            problems.append(f"{what}: a second hook() call must raise RuntimeError")
        except RuntimeError as e:
            if "already ran" not in str(e):
                problems.append(f"{what}: a second hook() call raised '{e}', which does not say the hook already ran")
    elif async_finish:
        if hook is not None or event.event is None:
            problems.append(f"{what}: async_finish must return an event and no hook")
            return
        event.current_stream_wait()
    elif hook is not None or event.event is not None:
        problems.append(f"{what}: a synchronous call returned an event or a hook")


def ll_expert_y(ctx, num_experts, recv, fp8, ue8m0, hidden):
    """The stand-in expert on this rank: y[e] = BF16(dequant(recv[e]) * factor(global expert)),
    [E/R, R*Tmax, hidden] (rows past recv_count hold garbage, which combine must not read). Fixed
    shapes, no host sync: capturable in a CUDA graph."""
    x_q, sc = recv if fp8 else (recv, None)
    EL = x_q.size(0)
    factor = ref.expert_scale(num_experts, ctx.device)[ctx.rank * EL:(ctx.rank + 1) * EL]
    y = torch.empty(x_q.shape, dtype=torch.bfloat16, device=ctx.device)
    for e in range(EL):
        if fp8:
            scales = ref.ue8m0_unpack(sc[e], hidden // ref.SCALE_GROUP) if ue8m0 else sc[e]
            rows = ref.dequant(x_q[e], scales)
        else:
            rows = x_q[e].float()
        y[e] = ref.ll_expert(rows, factor[e])
    return y


def warm_expert_kernels(ctx, num_experts, hidden):
    """Runs the stand-in expert once on dummy rows (BF16, FP8, FP8 with UE8M0 scales) and waits.

    CUDA loads a kernel's module on its first launch (lazy loading, the default), and a load waits
    for the kernels already running in the context. The expert runs while a receive kernel spins for
    its peers' data; where that data arrives through CUDA copies of this same process (the loopback
    GIN plugin's proxy thread), the load and the spin wait for each other for ever. Real NICs write
    without CUDA calls, so only the first call pays a wait there; the tests warm the kernels first."""
    EL = max(num_experts // ctx.num_ranks, 1)
    x = torch.zeros((EL, 2, hidden), dtype=torch.bfloat16, device=ctx.device)
    q = x.to(torch.float8_e4m3fn)
    scales = torch.ones((EL, 2, hidden // ref.SCALE_GROUP), dtype=torch.float32, device=ctx.device)
    packed = torch.zeros((EL, 2, (hidden // ref.SCALE_GROUP + 3) // 4), dtype=torch.int32, device=ctx.device)
    ll_expert_y(ctx, num_experts, x, False, False, hidden)
    ll_expert_y(ctx, num_experts, (q, scales), True, False, hidden)
    ll_expert_y(ctx, num_experts, (q, packed), True, True, hidden).clone()  # clone: zero_copy's copy_
    torch.cuda.synchronize(ctx.device)


@timed("epcomm")
class _IntLike(int):
    """An int that is not exactly int (as numpy's integers are not)."""


def ll_run(ctx, buf, inp, fp8=True, round_scale=False, ue8m0=False, hook=False, async_finish=False, zero_copy=False,
           use_out=False, stats=(None, None, None), eager=True, other_types=False):
    """One decode step: dispatch, the stand-in expert, combine, with the given options. eager=False
    takes the Python layer's path for the eager calls (not the one C call); eager="pybind" the
    Runtime's pybind11 methods (session 15's path, see pybind_eager_calls); other_types passes Tmax
    and use_fp8 as other types than int and bool, which the C call declines (the Python layer
    takes them)."""
    E, tmax = inp.num_experts, inp.tmax
    cum, dwait, cwait = stats
    problems = []
    saved = buf._ll_fast_dispatch, buf._ll_fast_combine
    if eager == "pybind":
        buf._ll_fast_dispatch, buf._ll_fast_combine = pybind_eager_calls(buf)
    elif not eager:
        buf._ll_fast_dispatch = buf._ll_fast_combine = None
    # An int subclass for Tmax and 0 / 1 for use_fp8: not the exact types the C call reads.
    tmax, fp8_arg = (_IntLike(tmax), int(fp8)) if other_types else (tmax, fp8)
    try:
        return _ll_step(ctx, buf, inp, E, tmax, fp8, fp8_arg, round_scale, ue8m0, hook, async_finish, zero_copy,
                        use_out, cum, dwait, cwait, problems)
    finally:
        buf._ll_fast_dispatch, buf._ll_fast_combine = saved


def pybind_eager_calls(buf):
    """(dispatch, combine) in the shape of the buffer's fast calls over the Runtime's pybind11
    methods low_latency_dispatch_eager / low_latency_combine_eager, the result tuples assembled in
    Python: what Buffer did in session 15, for the tests and the benchmarks' comparison."""
    from epcomm.event import EventOverlap
    from epcomm.handle import LowLatencyHandle
    runtime, new_tuple = buf.runtime, tuple.__new__

    def dispatch(x, topk_idx, tmax, num_experts, cum, wait, use_fp8, round_scale, use_ue8m0, async_finish,
                 return_recv_hook):
        if async_finish is not False or return_recv_hook is not False:
            return None
        r = runtime.low_latency_dispatch_eager(x, topk_idx, tmax, num_experts, cum, wait, use_fp8, round_scale,
                                               use_ue8m0, buf._raw_stream())
        return None if r is None else (r[0], r[1], new_tuple(LowLatencyHandle, r[2]), EventOverlap(), None)

    def combine(x, topk_idx, topk_weights, handle, use_logfmt, zero_copy, async_finish, return_recv_hook, out,
                wait):
        if async_finish is not False or return_recv_hook is not False:
            return None
        y = runtime.low_latency_combine_eager(x, topk_idx, topk_weights, handle, use_logfmt, zero_copy, out, wait,
                                              buf._raw_stream())
        return None if y is None else (y, EventOverlap(), None)

    return dispatch, combine


def _ll_step(ctx, buf, inp, E, tmax, fp8, fp8_arg, round_scale, ue8m0, hook, async_finish, zero_copy, use_out, cum,
             dwait, cwait, problems):
    recv, count, handle, ev, hk = buf.low_latency_dispatch(
        inp.x, inp.topk, tmax, E, cumulative_local_expert_recv_stats=cum, dispatch_wait_recv_cost_stats=dwait,
        use_fp8=fp8_arg, round_scale=round_scale, use_ue8m0=ue8m0, async_finish=async_finish, return_recv_hook=hook)
    if type(handle.num_max_dispatch_tokens_per_rank) is not int or handle.buffer_index not in (0, 1):
        problems.append(f"low_latency_dispatch: handle {handle[2:]} (ints expected, buffer_index 0 or 1)")
    ll_settle(problems, "low_latency_dispatch", ev, hk, async_finish, hook)
    y = ll_expert_y(ctx, E, recv, fp8, ue8m0, inp.hidden)
    x_arg = y
    if zero_copy:
        x_arg = buf.get_next_low_latency_combine_buffer(handle)
        x_arg.copy_(y)
    out = torch.empty((inp.num_tokens, inp.hidden), dtype=torch.bfloat16, device=ctx.device) if use_out else None
    cx, ev, hk = buf.low_latency_combine(x_arg, inp.topk, inp.weights, handle, zero_copy=zero_copy,
                                         async_finish=async_finish, return_recv_hook=hook, out=out,
                                         combine_wait_recv_cost_stats=cwait)
    ll_settle(problems, "low_latency_combine", ev, hk, async_finish, hook)
    if use_out and cx is not out:
        problems.append("low_latency_combine(out=...) must return `out`")
    return dict(recv=recv, count=count, handle=handle, cx=cx, problems=problems)


def ll_gather(ctx, inp):
    """Every rank's (x, topk_idx): collective, so it comes before any check."""
    return gather(ctx, inp.x), gather(ctx, inp.topk)


def _same(a, b) -> bool:
    """Bit-identical tensors of one shape."""
    if a.shape != b.shape:
        return False
    a, b = a.contiguous(), b.contiguous()
    if a.dtype != b.dtype:
        return False
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.numel() else True


def _ll_rows_differ(ctx, s, experts, layout_range, src_info, x_q, sc, x_s, topk_s, cast_s, fp8, ue8m0):
    """None when every row this rank received from source `s` for the local experts `experts`
    (tokens from src_info inside each layout_range segment, data, scales) is what the reference
    says, as a set per expert; else what differs first."""
    EL, RT = x_q.size(0), x_q.size(1)
    lo = ctx.rank * EL
    if experts.numel() == 0:
        return None
    # Received: (expert, row) of every row in the segments of source s.
    ranges = layout_range[experts, s]
    begin, n = (ranges >> 32).unsqueeze(1), (ranges & 0xFFFFFFFF).unsqueeze(1)
    rows = torch.arange(RT, device=x_q.device).unsqueeze(0)
    which, r_got = ((rows >= begin) & (rows < begin + n)).nonzero(as_tuple=True)
    e_got = experts[which]
    t_got = src_info[e_got, r_got].long() & 0xFFFFFFFF
    key_got, order_got = torch.sort((e_got << 32) | t_got, stable=True)
    # Wanted: (expert, token) of every top-k slot of source s that names one of them.
    local = torch.zeros(EL, dtype=torch.bool, device=x_q.device)
    local[experts] = True
    hit = (topk_s >= lo) & (topk_s < lo + EL) & local[(topk_s - lo).clamp(0, EL - 1)]
    t_want, k_want = hit.nonzero(as_tuple=True)
    key_want, order_want = torch.sort(((topk_s[t_want, k_want] - lo) << 32) | t_want, stable=True)
    if not torch.equal(key_got, key_want):
        return f"the (expert, source token) sets differ ({key_got.numel()} rows, want {key_want.numel()})"
    e_got, r_got, t_want = e_got[order_got], r_got[order_got], t_want[order_want]
    got = (x_q.view(torch.uint8) if fp8 else x_q)[e_got, r_got]
    want = cast_s[0].view(torch.uint8)[t_want] if fp8 else x_s[t_want]
    if not _same(got, want):
        return "row data differs"
    if fp8:
        want_sc = cast_s[1][t_want]
        if not _same(sc[e_got, r_got], ref.ue8m0_pack(want_sc) if ue8m0 else want_sc):
            return "scales differ"
    return None


def _ll_check_rows(c, e, s, ranges, src_info, want_tokens, x_q, sc, all_x, casts, fp8, ue8m0):
    """The rows of local expert `e` from source `s`, one message per kind of difference."""
    begin, n = ranges[e][s] >> 32, ranges[e][s] & 0xFFFFFFFF
    tokens = want_tokens[e][s]
    where = f"local expert {e} from rank {s}"
    if n == 0:
        return
    got_src = src_info[e, begin:begin + n].long().cpu()
    got_sorted, order = torch.sort(got_src, stable=True)
    if not torch.equal(got_sorted, tokens):
        c.fails.append(f"src_info of {where}: tokens {got_sorted.tolist()[:16]}..., want {tokens.tolist()[:16]}...")
        return
    dev = x_q.device
    rows = (begin + order).to(dev)
    tok = tokens.to(dev)
    # Compared as bytes (indexing needs no float8 kernels).
    want_rows = casts[s][0].view(torch.uint8)[tok] if fp8 else all_x[s][tok]
    c.bytes(f"recv_x rows of {where}", (x_q[e].view(torch.uint8) if fp8 else x_q[e])[rows], want_rows)
    if fp8:
        want_sc = casts[s][1][tok]
        c.bytes(f"scales of {where}", sc[e][rows], ref.ue8m0_pack(want_sc) if ue8m0 else want_sc)


@timed("verify")
def ll_verify(ctx, inp, out, gathered, what, fp8=True, round_scale=False, ue8m0=False):
    """Raises AssertionError listing every difference from the reference; returns a summary."""
    R, rank, dev = ctx.num_ranks, ctx.rank, ctx.device
    E, tmax, H = inp.num_experts, inp.tmax, inp.hidden
    EL, RT, G = E // R, R * tmax, H // ref.SCALE_GROUP
    W = (G + 3) // 4
    all_x, all_topk = gathered
    c = Checks(ctx, what)
    for p in out["problems"]:
        c.fails.append(p)
    recv, count, handle = out["recv"], out["count"], out["handle"]

    # Types and shapes (DeepEP's).
    c.true("recv_x type", isinstance(recv, tuple) == fp8, "a (x_e4m3, scales) pair with use_fp8, else a tensor")
    x_q, sc = recv if fp8 else (recv, None)
    c.equal("recv_x shape", tuple(x_q.shape), (EL, RT, H))
    c.equal("recv_x dtype", x_q.dtype, FP8 if fp8 else torch.bfloat16)
    if fp8:
        cols = W if ue8m0 else G
        c.equal("scales shape", tuple(sc.shape), (EL, RT, cols))
        c.equal("scales dtype", sc.dtype, torch.int32 if ue8m0 else torch.float32)
        c.equal("scales strides (a transposed view)", tuple(sc.stride()), (cols * RT, 1, RT))
    c.equal("recv_count", (tuple(count.shape), count.dtype), ((EL,), torch.int32))
    c.equal("handle length", len(handle), 6)
    c.equal("handle[2:5] (Tmax, hidden, num_experts)", tuple(handle[2:5]), (tmax, H, E))
    c.true("handle[5] (buffer_index)", handle[5] in (0, 1), f"got {handle[5]!r}")
    c.equal("handle[0] (src_info)", (tuple(handle[0].shape), handle[0].dtype), ((EL, RT), torch.int32))
    c.equal("handle[1] (layout_range)", (tuple(handle[1].shape), handle[1].dtype), ((EL, R), torch.int64))
    if c.fails:
        c.done()

    # Dispatch: per (local expert, source rank), rows as a set. Counts and segments on the host;
    # the rows of each source in one vectorized comparison, and only where that finds a
    # difference, per (expert, source) with a message naming it.
    want_tokens = ref.ll_tokens([t.cpu() for t in all_topk], E, rank)
    casts = [ref.fp8_cast(x, round_scale) for x in all_x] if fp8 else None
    counts = count.cpu().tolist()
    ranges = handle[1].cpu().tolist()
    src_info = handle[0]
    rows_to_check = [[] for _ in range(R)]  # per source: local experts whose counts are right
    for e in range(EL):
        total = sum(int(t.numel()) for t in want_tokens[e])
        if counts[e] != total:
            c.fails.append(f"recv_count[{e}] = {counts[e]}, want {total}")
            continue
        segments = []
        for s in range(R):
            begin, n = ranges[e][s] >> 32, ranges[e][s] & 0xFFFFFFFF
            if n != want_tokens[e][s].numel():
                c.fails.append(f"layout_range count of local expert {e} from rank {s} = {n}, "
                               f"want {want_tokens[e][s].numel()}")
                continue
            segments.append((begin, n))
            rows_to_check[s].append(e)
        pos = 0
        for begin, n in sorted(segments):
            if begin < pos:
                c.fails.append(f"layout_range segments of local expert {e} overlap: {sorted(segments)}")
                break
            pos = begin + n
        if pos > counts[e]:
            c.fails.append(f"layout_range segments of local expert {e} run past recv_count = {counts[e]}")
    for s in range(R):
        experts = torch.tensor(rows_to_check[s], dtype=torch.int64, device=dev)
        problem = _ll_rows_differ(ctx, s, experts, handle[1], src_info, x_q, sc, all_x[s], all_topk[s],
                                  casts[s] if fp8 else None, fp8, ue8m0)
        if problem:
            before = len(c.fails)
            for e in rows_to_check[s]:
                _ll_check_rows(c, e, s, ranges, src_info, want_tokens, x_q, sc, all_x, casts, fp8, ue8m0)
            if len(c.fails) == before:  # only if the two comparisons disagreed
                c.fails.append(f"rows from rank {s}: {problem}")

    # Combine: this rank's tokens, from its own inputs.
    rows = ref.dequant(*ref.fp8_cast(inp.x, round_scale)) if fp8 else inp.x.float()
    factor = ref.expert_scale(E, dev)
    want = ref.ll_combine(inp.topk, inp.weights,
                          lambda k: ref.ll_expert(rows, factor[inp.topk[:, k].clamp(min=0)].unsqueeze(1)))
    cx = out["cx"]
    c.equal("combined_x", (tuple(cx.shape), cx.dtype), ((inp.num_tokens, H), torch.bfloat16))
    if cx.shape == want.shape:
        msg = ref.close_bf16(cx, want, rtol=1e-2, atol=1e-3)
        if msg:
            c.fails.append(f"combined_x: {msg}")
    c.done()
    inexact = int((cx.float() != want.to(torch.bfloat16).float()).sum()) if cx.shape == want.shape else -1
    return {"what": what, "rows": sum(counts), "combine_not_bit_exact": inexact}


def low_latency(ctx, seed, what="low latency", shape="basic", num_topk=8, fixed_tokens=None, drop=0.1, rounds=1,
                **kw):
    """Dispatch + combine on fresh inputs, `rounds` times, with the options in kw (ll_run)."""
    buf = ll_buffer(ctx)
    tmax, hidden, E = ll_shapes(ctx.num_ranks)[shape]
    buf.clean_low_latency_buffer(tmax, hidden, E)
    check_kw = {k: kw[k] for k in ("fp8", "round_scale", "ue8m0") if k in kw}
    reports = []
    for r in range(rounds):
        inp = LLInputs(ctx, seed + r, tmax, hidden, num_topk, E, fixed_tokens, drop)
        out = ll_run(ctx, buf, inp, **kw)
        reports.append(ll_verify(ctx, inp, out, ll_gather(ctx, inp), f"{what} round {r} (seed {seed})", **check_kw))
    return reports


def low_latency_modes(ctx, seed):
    """hook, async_finish, zero_copy, out= and the stats tensors, round after round on one buffer."""
    buf = ll_buffer(ctx)
    R = ctx.num_ranks
    tmax, hidden, E = ll_shapes(R)["basic"]
    EL = E // R
    buf.clean_low_latency_buffer(tmax, hidden, E)
    cum = torch.zeros(EL, dtype=torch.int32, device=ctx.device)
    dwait = torch.zeros(R, dtype=torch.int64, device=ctx.device)
    cwait = torch.zeros(R, dtype=torch.int64, device=ctx.device)
    # The eager calls (no hook, no async_finish) take one C call each where _torch_ops makes the
    # outputs; eager=False and numpy scalars take the Python layer's path, eager="pybind" the
    # Runtime's pybind11 methods: the same results.
    modes = [dict(hook=True), dict(async_finish=True), dict(zero_copy=True), dict(zero_copy=True, fp8=False),
             dict(use_out=True, hook=True), dict(zero_copy=True, use_out=True, async_finish=True),
             dict(round_scale=True, ue8m0=True, hook=True, zero_copy=True), dict(), dict(eager=False),
             dict(other_types=True, use_out=True), dict(round_scale=True, ue8m0=True),
             dict(round_scale=True, ue8m0=True, eager=False), dict(fp8=False, use_out=True), dict(eager="pybind"),
             dict(fp8=False, use_out=True, eager="pybind")]
    want_cum = torch.zeros(EL, dtype=torch.int64)
    reports, snapshots = [], [(dwait.clone(), cwait.clone())]
    for i, mode in enumerate(modes):
        inp = LLInputs(ctx, seed + i, tmax, hidden, 8, E)
        out = ll_run(ctx, buf, inp, stats=(cum, dwait, cwait), **mode)
        torch.cuda.current_stream().synchronize()
        snapshots.append((dwait.clone(), cwait.clone()))
        want_cum += out["count"].cpu().long()
        check_kw = {k: mode[k] for k in ("fp8", "round_scale", "ue8m0") if k in mode}
        reports.append(ll_verify(ctx, inp, out, ll_gather(ctx, inp), f"mode {mode} (seed {seed + i})", **check_kw))
    # Collective first: the wait costs of every rank.
    total_wait = torch.stack([dwait.sum(), cwait.sum()])
    dist.all_reduce(total_wait)
    c = Checks(ctx, "low-latency stats")
    c.equal("cumulative_local_expert_recv_stats", cum.cpu().long().tolist(), want_cum.tolist())
    c.equal("eager calls in one C call (with _torch_ops)", buf._ll_fast_dispatch is not None,
            epcomm._alloc.status().startswith("epcomm._torch_ops"))
    for i in range(1, len(snapshots)):
        for name, before, after in (("dispatch", snapshots[i - 1][0], snapshots[i][0]),
                                    ("combine", snapshots[i - 1][1], snapshots[i][1])):
            c.true(f"{name}_wait_recv_cost_stats after {modes[i - 1]}", bool((after >= before).all()),
                   f"decreased: {before.tolist()} -> {after.tolist()}")
    if R > 1:  # some rank waited for a peer at least once (the first to arrive does)
        c.true("wait cost stats grow", bool((total_wait > 0).all()),
               f"sums over ranks (dispatch, combine) = {total_wait.tolist()}")
    c.done()
    return reports + [{"dispatch_wait_cycles": dwait.tolist(), "combine_wait_cycles": cwait.tolist()}]


def low_latency_two_batches(ctx, seed, zero_copy=False, fp8=True):
    """Two micro-batches overlapped with hooks: send A, send B, receive A, receive B (each in the
    other LL buffer), then the same for their combines."""
    buf = ll_buffer(ctx)
    tmax, hidden, E = ll_shapes(ctx.num_ranks)["basic"]
    buf.clean_low_latency_buffer(tmax, hidden, E)
    inps = [LLInputs(ctx, seed + i, tmax, hidden, 8, E) for i in range(2)]
    sent = [buf.low_latency_dispatch(inp.x, inp.topk, tmax, E, use_fp8=fp8, return_recv_hook=True) for inp in inps]
    problems = []
    if sent[0][2][5] == sent[1][2][5]:
        problems.append(f"both micro-batches use LL buffer {sent[0][2][5]}")
    for recv, count, handle, ev, hook in sent:
        hook()
    ys = [ll_expert_y(ctx, E, s[0], fp8, False, hidden) for s in sent]
    xs = []
    for y, s in zip(ys, sent):
        if zero_copy:
            zc = buf.get_next_low_latency_combine_buffer(s[2])
            zc.copy_(y)
            y = zc
        xs.append(y)
    combined = [buf.low_latency_combine(x, inp.topk, inp.weights, s[2], zero_copy=zero_copy, return_recv_hook=True)
                for x, inp, s in zip(xs, inps, sent)]
    for cx, ev, hook in combined:
        hook()
    reports = []
    for i, (inp, s, comb) in enumerate(zip(inps, sent, combined)):
        out = dict(recv=s[0], count=s[1], handle=s[2], cx=comb[0], problems=problems if i == 0 else [])
        reports.append(ll_verify(ctx, inp, out, ll_gather(ctx, inp),
                                 f"micro-batch {'AB'[i]} zero_copy={zero_copy} fp8={fp8} (seed {seed})", fp8=fp8))
    return reports


def low_latency_graph(ctx, seed, hook=False, replays=3):
    """dispatch (FP8) + stand-in expert + combine captured in one CUDA graph, replayed on new inputs."""
    buf = ll_buffer(ctx)
    R = ctx.num_ranks
    tmax, hidden, E = ll_shapes(R)["graph"]
    K = 4
    buf.clean_low_latency_buffer(tmax, hidden, E)
    inp = LLInputs(ctx, seed, tmax, hidden, K, E, fixed_tokens=tmax)
    static_x, static_topk, static_w = inp.x.clone(), inp.topk.clone(), inp.weights.clone()
    cum = torch.zeros(E // R, dtype=torch.int32, device=ctx.device)

    def step():
        recv, count, handle, _, hk = buf.low_latency_dispatch(static_x, static_topk, tmax, E,
                                                              cumulative_local_expert_recv_stats=cum,
                                                              return_recv_hook=hook)
        if hook:
            hk()
        y = ll_expert_y(ctx, E, recv, True, False, hidden)
        cx, _, hk = buf.low_latency_combine(y, static_topk, static_w, handle, return_recv_hook=hook)
        if hook:
            hk()
        return recv, count, handle, cx

    g, (recv, count, handle, cx) = capture_graph(step)
    reports = []
    for it in range(replays):
        fresh = LLInputs(ctx, seed + 1000 * (it + 1), tmax, hidden, K, E, fixed_tokens=tmax)
        static_x.copy_(fresh.x)
        static_topk.copy_(fresh.topk)
        static_w.copy_(fresh.weights)
        before = cum.clone()
        g.replay()
        torch.cuda.synchronize()
        out = dict(recv=recv, count=count, handle=handle, cx=cx, problems=[])
        if not torch.equal(cum - before, count):
            out["problems"].append(f"cumulative_local_expert_recv_stats grew by {(cum - before).tolist()}, "
                                   f"want recv_count {count.tolist()}")
        reports.append(ll_verify(ctx, fresh, out, ll_gather(ctx, fresh),
                                 f"CUDA graph replay {it} hook={hook} (seed {seed})"))
    return reports


def low_latency_errors(ctx, seed):
    """Bad arguments raise ValueError naming the argument (before anything is launched); the buffer
    stays usable. Also the shape rule (clean_low_latency_buffer) and the shrink-mode placeholders."""
    buf = ll_buffer(ctx)
    R, dev = ctx.num_ranks, ctx.device
    tmax, hidden, E = ll_shapes(R)["small"]
    EL, K = E // R, 4
    buf.clean_low_latency_buffer(tmax, hidden, E)
    inp = LLInputs(ctx, seed, tmax, hidden, K, E, fixed_tokens=tmax)
    out = ll_run(ctx, buf, inp)
    ll_verify(ctx, inp, out, ll_gather(ctx, inp), f"before the errors (seed {seed})")
    handle, y = out["handle"], ll_expert_y(ctx, E, out["recv"], True, False, hidden)

    def d(**kw):
        args = dict(x=inp.x, topk_idx=inp.topk, num_max_dispatch_tokens_per_rank=tmax, num_experts=E)
        args.update(kw)
        return buf.low_latency_dispatch(**args)

    def cmb(**kw):
        args = dict(x=y, topk_idx=inp.topk, topk_weights=inp.weights, handle=handle)
        args.update(kw)
        return buf.low_latency_combine(**args)

    one_more = torch.cat([inp.x, inp.x[:1]])
    bad = [
        ("x float32", lambda: d(x=inp.x.float()), "x"),
        ("x 1-D", lambda: d(x=inp.x[0]), "x"),
        ("x on the CPU", lambda: d(x=inp.x.cpu()), "x"),
        ("T > Tmax", lambda: d(x=one_more, topk_idx=torch.cat([inp.topk, inp.topk[:1]])),
         "num_max_dispatch_tokens_per_rank"),
        ("hidden 200", lambda: d(x=torch.zeros(tmax, 200, dtype=torch.bfloat16, device=dev)), "hidden"),
        ("Tmax 0", lambda: d(num_max_dispatch_tokens_per_rank=0), "num_max_dispatch_tokens_per_rank"),
        ("Tmax 5000", lambda: d(num_max_dispatch_tokens_per_rank=5000), "num_max_dispatch_tokens_per_rank"),
        ("topk_idx int32", lambda: d(topk_idx=inp.topk.int()), "topk_idx"),
        ("topk_idx rows", lambda: d(topk_idx=inp.topk[:-1]), "topk_idx"),
        ("17 experts per token", lambda: d(topk_idx=torch.zeros(tmax, 17, dtype=torch.int64, device=dev)), "num_topk"),
        ("use_ue8m0 without round_scale", lambda: d(use_ue8m0=True), "round_scale"),
        ("use_ue8m0 without use_fp8", lambda: d(use_fp8=False, use_ue8m0=True, round_scale=True), "use_fp8"),
        ("async_finish and return_recv_hook", lambda: d(async_finish=True, return_recv_hook=True), "return_recv_hook"),
        ("use_fp8 'yes'", lambda: d(use_fp8="yes"), "use_fp8"),
        ("cumulative stats int64", lambda: d(cumulative_local_expert_recv_stats=torch.zeros(
            EL, dtype=torch.int64, device=dev)), "cumulative_local_expert_recv_stats"),
        ("cumulative stats length", lambda: d(cumulative_local_expert_recv_stats=torch.zeros(
            EL + 1, dtype=torch.int32, device=dev)), "cumulative_local_expert_recv_stats"),
        ("dispatch wait stats int32", lambda: d(dispatch_wait_recv_cost_stats=torch.zeros(
            R, dtype=torch.int32, device=dev)), "dispatch_wait_recv_cost_stats"),
        ("another shape without clean", lambda: d(num_max_dispatch_tokens_per_rank=2 * tmax),
         "clean_low_latency_buffer"),
        ("combine x shape", lambda: cmb(x=y[:, :-1]), "x"),
        ("combine x float32", lambda: cmb(x=y.float()), "x"),
        ("combine x 2-D", lambda: cmb(x=y[0]), "x"),
        ("combine a 5-item handle", lambda: cmb(handle=tuple(handle[:5])), "buffer_index"),
        ("combine handle garbage", lambda: cmb(handle=(1, 2)), "handle"),
        ("combine buffer_index 2", lambda: cmb(handle=handle._replace(buffer_index=2)), "buffer_index"),
        ("combine handle of another shape", lambda: cmb(handle=handle._replace(hidden=2 * hidden)), "clean"),
        ("combine topk_weights float64", lambda: cmb(topk_weights=inp.weights.double()), "topk_weights"),
        ("combine out shape", lambda: cmb(out=torch.zeros(tmax, hidden + 128, dtype=torch.bfloat16, device=dev)),
         "out"),
        ("combine out float32", lambda: cmb(out=torch.zeros(tmax, hidden, device=dev)), "out"),
        ("combine wait stats int32", lambda: cmb(combine_wait_recv_cost_stats=torch.zeros(
            R, dtype=torch.int32, device=dev)), "combine_wait_recv_cost_stats"),
        ("combine async_finish and return_recv_hook", lambda: cmb(async_finish=True, return_recv_hook=True),
         "return_recv_hook"),
        ("get_next_low_latency_combine_buffer garbage", lambda: buf.get_next_low_latency_combine_buffer((1, 2, 3)),
         "handle"),
        ("clean hidden 100", lambda: buf.clean_low_latency_buffer(tmax, 100, E), "hidden"),
        ("mask rank out of range", lambda: buf.low_latency_update_mask_buffer(R), "rank_to_mask"),
        ("mask_status int64", lambda: buf.low_latency_query_mask_buffer(torch.zeros(R, dtype=torch.int64,
                                                                                    device=dev)), "mask_status"),
        ("get_local_buffer_tensor offset", lambda: buf.get_local_buffer_tensor(torch.int32, offset=2), "offset"),
        ("get_local_buffer_tensor dtype", lambda: buf.get_local_buffer_tensor("float"), "dtype"),
        ("get_local_buffer_tensor size", lambda: buf.get_local_buffer_tensor(torch.uint8, size=(1 << 40,)), "size"),
    ]
    if R > 1:
        bad.append(("num_experts not divisible", lambda: d(num_experts=E + 1), "num_experts"))
    c = Checks(ctx, "low-latency argument errors")
    for name, fn, fragment in bad:
        expect_error(c, name, fn, ValueError, fragment)
    if R > 1:  # with one rank the only rank is this one, which no buffer may mask
        expect_error(c, "mask=True without shrink mode",
                     lambda: buf.low_latency_update_mask_buffer((ctx.rank + 1) % R, True), ValueError, "shrink mode")
    buf.low_latency_update_mask_buffer(0, False)
    buf.low_latency_clean_mask_buffer()
    status = torch.full((R,), 7, dtype=torch.int32, device=dev)
    buf.low_latency_query_mask_buffer(status)
    c.true("low_latency_query_mask_buffer", bool((status == 0).all()), f"no rank is masked, got {status.tolist()}")
    c.done()
    # The buffer is still usable, at this shape and (after clean) at another.
    low_latency(ctx, seed + 1, "after argument errors", "small", num_topk=K)
    return low_latency(ctx, seed + 2, "after a shape change", "graph", num_topk=K)


def low_latency_memory(ctx, seed):
    """get_next_low_latency_combine_buffer (shape, the two buffers, zero-copy use, keeping the
    Buffer alive) and get_local_buffer_tensor (both regions, size and offset)."""
    R, dev = ctx.num_ranks, ctx.device
    tmax, hidden, E = ll_shapes(R)["small"]
    EL, K = E // R, 4
    buf = ll_buffer(ctx)
    buf.clean_low_latency_buffer(tmax, hidden, E)
    c = Checks(ctx, "low-latency memory views")
    views = []
    for i in range(2):
        inp = LLInputs(ctx, seed + i, tmax, hidden, K, E)
        recv, count, handle, _, _ = buf.low_latency_dispatch(inp.x, inp.topk, tmax, E)
        zc = buf.get_next_low_latency_combine_buffer(handle)
        again = buf.get_next_low_latency_combine_buffer(handle)
        c.equal("combine buffer shape", (tuple(zc.shape), zc.dtype, zc.device), ((EL, R * tmax, hidden),
                                                                                 torch.bfloat16, dev))
        c.true("combine buffer contiguous", zc.is_contiguous())
        c.equal("same handle, same buffer", again.data_ptr(), zc.data_ptr())
        views.append((handle[5], zc.data_ptr()))
        zc.copy_(ll_expert_y(ctx, E, recv, True, False, hidden))
        cx, _, _ = buf.low_latency_combine(zc, inp.topk, inp.weights, handle, zero_copy=True)
        ll_verify(ctx, inp, dict(recv=recv, count=count, handle=handle, cx=cx, problems=[]), ll_gather(ctx, inp),
                  f"zero-copy through the view, step {i} (seed {seed})")
    c.true("two buffers", views[0][0] != views[1][0] and views[0][1] != views[1][1],
           f"consecutive dispatches used (buffer_index, view pointer) {views}")

    # The view keeps its Buffer alive (a Buffer made without explicitly_destroy goes with its last
    # reference; every rank drops it at the same point, as the destructor is collective).
    own = epcomm.Buffer(ctx.group, num_rdma_bytes=epcomm.Buffer.get_low_latency_rdma_size_hint(tmax, hidden, R, E),
                        low_latency_mode=True)
    inp = LLInputs(ctx, seed + 7, tmax, hidden, K, E)
    recv, count, handle, _, _ = own.low_latency_dispatch(inp.x, inp.topk, tmax, E)
    view = own.get_next_low_latency_combine_buffer(handle)
    view.copy_(ll_expert_y(ctx, E, recv, True, False, hidden))
    cx, _, _ = own.low_latency_combine(view, inp.topk, inp.weights, handle, zero_copy=True)
    torch.cuda.synchronize()
    alive = weakref.ref(own)
    del own
    gc.collect()
    c.true("the view keeps the Buffer alive", alive() is not None)
    part = view[0, :4]
    del view
    gc.collect()
    c.true("a view of the view keeps it alive", alive() is not None)
    part.fill_(1.0)
    torch.cuda.synchronize()
    del part
    # By reference counting alone: nothing the buffer holds (its fast calls among them) refers
    # back to it, so it goes as soon as the last reference does, not at the next collection.
    by_refcount = alive() is None
    gc.collect()
    c.true("the Buffer goes with its last view", alive() is None)
    c.true("the Buffer goes without the cycle collector", by_refcount)

    # get_local_buffer_tensor, low-latency region then normal-mode region.
    ptr, nbytes = buf.runtime.local_buffer(True)
    whole = buf.get_local_buffer_tensor(torch.int32, use_rdma_buffer=True)
    c.equal("rdma region", (whole.dtype, whole.numel(), whole.data_ptr(), whole.device),
            (torch.int32, nbytes // 4, ptr, dev))
    part = buf.get_local_buffer_tensor(torch.bfloat16, size=torch.Size([4, 8]), offset=256, use_rdma_buffer=True)
    c.equal("size and offset", (tuple(part.shape), part.data_ptr()), ((4, 8), ptr + 256))
    part.copy_(torch.arange(32, dtype=torch.bfloat16, device=dev).view(4, 8))
    c.true("writes land in the region",
           torch.equal(whole.view(torch.bfloat16)[128:160], torch.arange(32, dtype=torch.bfloat16, device=dev)))
    nptr, nnbytes = ctx.buffer.runtime.local_buffer(False)
    normal = ctx.buffer.get_local_buffer_tensor(torch.uint8)
    c.equal("nvl region", (normal.numel(), normal.data_ptr()), (nnbytes, nptr))
    c.true("nvl region covers num_nvl_bytes", nnbytes >= ctx.buffer.num_nvl_bytes)
    del whole, part, normal
    c.done()
    # The region was written: clean it before the next low-latency call (collective).
    buf.clean_low_latency_buffer(tmax, hidden, E)
    return low_latency(ctx, seed + 3, "after writing the local buffer", "small", num_topk=K)
