"""The GPU test cases, run on every rank by _cluster (one process per GPU). Each case moves data
with epcomm, all-gathers the inputs, builds the expected result with _reference and raises
AssertionError listing every mismatch. All collectives come before the first assertion, so a
failing rank never leaves the others waiting."""

import functools
import gc
import importlib.util
import os
import time
import weakref

import torch
import torch.distributed as dist

import _reference as ref
import epcomm

FP8 = getattr(torch, "float8_e4m3fn", None)


# ---------------------------------------------------------------------------- helpers
_TIMES = {}  # phase -> seconds this rank spent in it during the current case (_cluster reports them)


def timed(phase):
    """Adds the wall time of the decorated function (its GPU work included) to `phase`."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                _TIMES[phase] = _TIMES.get(phase, 0.0) + time.perf_counter() - start
        return run
    return wrap


def take_timings():
    """The phase times of the case that just ran (and a fresh start for the next one)."""
    out = dict(_TIMES)
    _TIMES.clear()
    return out


class Checks:
    def __init__(self, ctx, what: str):
        self.prefix = f"rank {ctx.rank} of {ctx.num_ranks}: {what}"
        self.fails = []

    def bytes(self, name, got, want):
        msg = ref.same_bytes(got, want)
        if msg:
            self.fails.append(f"{name}: {msg}")

    def bf16(self, name, got, want):
        msg = ref.close_bf16(got, want.to(got.device))
        if msg:
            self.fails.append(f"{name}: {msg}")

    def equal(self, name, got, want):
        if got != want:
            self.fails.append(f"{name}: got {got!r}, want {want!r}")

    def true(self, name, cond, detail=""):
        if not cond:
            self.fails.append(f"{name}: {detail}")

    def done(self, limit=40):
        if self.fails:
            shown = self.fails[:limit]
            more = [f"... and {len(self.fails) - limit} more"] if len(self.fails) > limit else []
            raise AssertionError(self.prefix + "\n  " + "\n  ".join(shown + more))


@timed("gather")
def gather(ctx, t):
    """Every rank's `t` (first dimensions may differ), as a list over ranks, on this device."""
    t = t.contiguous()
    n = torch.tensor([t.size(0)], device=ctx.device)
    sizes = [torch.zeros_like(n) for _ in range(ctx.num_ranks)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    wire = t.view(torch.uint8) if t.dtype in (torch.bool, FP8) else t
    padded = torch.zeros((max(sizes + [1]),) + tuple(wire.shape[1:]), dtype=wire.dtype, device=ctx.device)
    padded[:wire.size(0)] = wire
    outs = [torch.empty_like(padded) for _ in range(ctx.num_ranks)]
    dist.all_gather(outs, padded)
    return [(o[:s].view(t.dtype) if wire is not t else o[:s]) for o, s in zip(outs, sizes)]


def generators(ctx, seed):
    """(CPU generator for sizes, GPU generator for the data): inputs are made on the GPU, where even
    the standard problem's take milliseconds."""
    return (torch.Generator().manual_seed(seed), torch.Generator(device=ctx.device).manual_seed(seed))


class Inputs:
    """One rank's random inputs: BF16 and FP8 rows (two sets each, the second for cached dispatch),
    column-major FP8 scales, top-k ids and weights."""

    @timed("inputs")
    def __init__(self, ctx, seed, max_tokens, hidden, num_topk, num_experts, fixed_tokens=None):
        sizes, g = generators(ctx, seed * 7919 + ctx.rank)
        if fixed_tokens is not None:
            T = fixed_tokens
        else:
            T = max_tokens if ctx.rank == 0 else int(torch.randint(0, max_tokens + 1, (1,), generator=sizes))
        groups = (hidden + 127) // 128
        dev = ctx.device
        self.num_tokens, self.hidden, self.num_experts = T, hidden, num_experts
        self.topk = ref.random_topk(T, num_topk, num_experts, g)
        self.weights = torch.rand(T, num_topk, generator=g, device=dev)
        self.x = torch.randn(T, hidden, generator=g, device=dev).to(torch.bfloat16)
        self.x2 = torch.randn(T, hidden, generator=g, device=dev).to(torch.bfloat16)
        self.x8 = torch.randint(0, 256, (T, hidden), generator=g, dtype=torch.uint8, device=dev).view(FP8)
        self.x8_2 = torch.randint(0, 256, (T, hidden), generator=g, dtype=torch.uint8, device=dev).view(FP8)
        # Column-major scales, as frameworks often hold them (dispatch takes any strides).
        self.scales = torch.rand(groups, T, generator=g, device=dev).t()
        self.scales2 = torch.rand(groups, T, generator=g, device=dev).t()
        self.y_seed = seed * 104729 + ctx.rank
        self.bias = (torch.randn(T, hidden, generator=g, device=dev).to(torch.bfloat16),
                     torch.randn(T, hidden, generator=g, device=dev).to(torch.bfloat16))


@timed("epcomm")
def run_normal(ctx, inp, fp8=False, with_topk=True, alignment=1, num_worst=0, bias=False, dconfig=None,
               cconfig=None, prev=False, async_finish=False, on_comm=False, buffer=None):
    """layout -> dispatch -> combine -> cached dispatch, with the given stream options."""
    buf = buffer or ctx.buffer
    E = inp.num_experts
    opts = dict(async_finish=async_finish, allocate_on_comm_stream=on_comm)

    def prev_event():
        return epcomm.Buffer.capture() if prev else None

    def settle(event):
        if async_finish:
            assert event.event is not None, "async_finish returned no event"
            event.current_stream_wait()
        else:
            assert event.event is None, "a synchronous call returned an event"

    out = {}
    ntpr, ntprdma, ntpe, itir, ev = buf.get_dispatch_layout(inp.topk, E, previous_event=prev_event(), **opts)
    settle(ev)
    out["layout"] = (ntpr, ntprdma, ntpe, itir)
    x = (inp.x8, inp.scales) if fp8 else inp.x
    recv, ridx, rw, counts, handle, ev = buf.dispatch(
        x, num_tokens_per_rank=ntpr, num_tokens_per_rdma_rank=ntprdma, is_token_in_rank=itir,
        num_tokens_per_expert=ntpe, topk_idx=inp.topk if with_topk else None,
        topk_weights=inp.weights if with_topk else None, expert_alignment=alignment, num_worst_tokens=num_worst,
        config=dconfig, previous_event=prev_event(), **opts)
    settle(ev)
    out.update(recv=recv, ridx=ridx, rw=rw, counts=counts, handle=handle)
    rows = handle.meta.num_rows
    if fp8:
        g = generators(ctx, inp.y_seed)[1]
        y = torch.randn(rows, inp.hidden, generator=g, device=ctx.device).to(torch.bfloat16)
    else:
        y = recv
    out["y"] = y
    cx, cw, ev = buf.combine(y, handle, topk_weights=rw, bias=inp.bias if bias else None, config=cconfig,
                             previous_event=prev_event(), **opts)
    settle(ev)
    out.update(cx=cx, cw=cw)
    x2 = (inp.x8_2, inp.scales2) if fp8 else inp.x2
    recv2, a, b, c, d, ev = buf.dispatch(x2, handle=handle, config=dconfig, previous_event=prev_event(), **opts)
    settle(ev)
    assert (a, b, c, d) == (None, None, None, None), "cached dispatch must return (recv_x, None, None, None, None, event)"
    out["recv2"] = recv2
    return out


@timed("verify")
def verify_normal(ctx, inp, out, what, fp8=False, with_topk=True, alignment=1, num_worst=0, bias=False):
    R, rank, E = ctx.num_ranks, ctx.rank, inp.num_experts
    # Collectives first.
    all_topk = gather(ctx, inp.topk)
    all_w = gather(ctx, inp.weights)
    if fp8:
        rows1 = [gather(ctx, inp.x8), gather(ctx, inp.scales)]
        rows2 = [gather(ctx, inp.x8_2), gather(ctx, inp.scales2)]
    else:
        rows1, rows2 = [gather(ctx, inp.x)], [gather(ctx, inp.x2)]
    exp = ref.dispatch(rank, all_topk, E, rows1, all_w if with_topk else None, alignment)
    exp2 = ref.dispatch(rank, all_topk, E, rows2)
    n = exp["recv_src_idx"].numel()
    all_y = gather(ctx, out["y"][:n])
    all_rw = gather(ctx, out["rw"][:n]) if with_topk else None

    c = Checks(ctx, what)
    ntpr, ntprdma, ntpe, itir = out["layout"]
    want_ntpr, want_ntpe, want_itir = ref.layout(inp.topk, E, R)
    c.bytes("num_tokens_per_rank", ntpr, want_ntpr)
    c.bytes("num_tokens_per_expert", ntpe, want_ntpe)
    c.bytes("is_token_in_rank", itir, want_itir)
    c.true("num_tokens_per_rdma_rank", ntprdma is None, "must be None inside one node")

    recv, recv2 = out["recv"], out["recv2"]
    recv_x, recv_sc = recv if fp8 else (recv, None)
    recv2_x, recv2_sc = recv2 if fp8 else (recv2, None)
    c.true("recv_x type", isinstance(recv, tuple) == fp8, "FP8 input returns a (recv_x, recv_scales) tuple")
    c.equal("recv_x rows", recv_x.size(0), num_worst if num_worst else n)
    c.equal("recv_x dtype", recv_x.dtype, FP8 if fp8 else torch.bfloat16)
    c.bytes("recv_x", recv_x[:n], exp["rows"][0])
    c.bytes("cached recv_x", recv2_x[:n], exp2["rows"][0])
    if fp8:
        c.true("recv_x_scales layout", recv_sc.is_contiguous(), "received scales are row-major")
        c.bytes("recv_x_scales", recv_sc[:n], exp["rows"][1])
        c.bytes("cached recv_x_scales", recv2_sc[:n], exp2["rows"][1])
    handle = out["handle"]
    c.bytes("handle[0] (rank_prefix_matrix)", handle[0], exp["rank_prefix_matrix"])
    c.bytes("handle.recv_src_idx", handle.recv_src_idx[:n], exp["recv_src_idx"])
    c.equal("handle.meta.num_recv_tokens", handle.meta.num_recv_tokens, -1 if num_worst else n)
    c.equal("num_recv_tokens_per_expert_list", out["counts"], [] if num_worst else exp["num_recv_tokens_per_expert"])
    if with_topk:
        c.equal("recv_topk_idx dtype", out["ridx"].dtype, torch.int64)
        c.bytes("recv_topk_idx", out["ridx"][:n], exp["recv_topk_idx"])
        c.bytes("recv_topk_weights", out["rw"][:n], exp["recv_topk_weights"])
        if num_worst:
            c.true("recv_topk_idx beyond the received rows", bool((out["ridx"][n:] == -1).all()), "must be -1")
    else:
        c.true("recv_topk_idx", out["ridx"] is None and out["rw"] is None, "None without topk")
    want_cx = ref.combine(rank, all_topk, E, all_y, inp.num_tokens, inp.bias if bias else ())
    c.bf16("combined_x", out["cx"], want_cx)
    if with_topk:
        want_cw = ref.combine(rank, all_topk, E, all_rw, inp.num_tokens, out_dtype=None)
        c.bytes("combined_topk_weights", out["cw"], want_cw)
    else:
        c.true("combined_topk_weights", out["cw"] is None, "None without topk_weights")
    c.done()


def normal_case(ctx, seed, what, max_tokens=300, hidden=2048, num_topk=8, num_experts=None, fixed_tokens=None,
                buffer=None, **kw):
    num_experts = num_experts or 16 * ctx.num_ranks
    inp = Inputs(ctx, seed, max_tokens, hidden, num_topk, num_experts, fixed_tokens)
    check_kw = {k: kw[k] for k in ("fp8", "with_topk", "alignment", "num_worst", "bias") if k in kw}
    out = run_normal(ctx, inp, buffer=buffer, **kw)
    verify_normal(ctx, inp, out, f"{what} (seed {seed})", **check_kw)


def expect_error(c, name, fn, exc_type, *fragments):
    try:
        fn()
    except exc_type as e:
        msg = str(e)
        missing = [f for f in fragments if f not in msg]
        if missing:
            c.fails.append(f"{name}: {exc_type.__name__} '{msg}' does not mention {missing}")
        return
    except Exception as e:  # noqa: BLE001 -- reported
        c.fails.append(f"{name}: raised {type(e).__name__} '{e}', want {exc_type.__name__}")
        return
    c.fails.append(f"{name}: no error, want {exc_type.__name__}")


# ---------------------------------------------------------------------------- cases
def normal(ctx, seed, what="normal", **kw):
    normal_case(ctx, seed, what, **kw)


def scale_forms(ctx, seed, hidden=1024):
    """FP8 scales in DeepEP's other forms: packed UE8M0 exponents as int32 words ([T, ceil(hidden /
    512)], column-major with the token stride rounded up to 4: what SGLang passes from DeepGEMM's
    quantizer), float32 scales of 64-channel groups (row-major), one word per token; each comes
    back [rows, S] row-major in its own dtype, bit for bit (dispatch, cached dispatch, and with
    num_worst_tokens)."""
    R = ctx.num_ranks

    def packed_ue8m0(T, g):
        words, aligned = (hidden // 128 + 3) // 4, (T + 3) // 4 * 4
        return torch.randint(-2 ** 31, 2 ** 31 - 1, (words, aligned), generator=g, dtype=torch.int32,
                             device=ctx.device).t()[:T]

    forms = [
        ("int32 UE8M0 packed, TMA-aligned column-major", packed_ue8m0),
        ("float32 per 64 channels, row-major", lambda T, g: torch.rand(T, hidden // 64, generator=g, device=ctx.device)),
        ("one int32 word per token", lambda T, g: torch.randint(-2 ** 31, 2 ** 31 - 1, (T, 1), generator=g,
                                                                dtype=torch.int32, device=ctx.device)),
    ]
    for i, (name, make) in enumerate(forms):
        for num_worst in (0, R * 200):
            inp = Inputs(ctx, seed + i, 200, hidden, 8, 16 * R)
            g = generators(ctx, seed * 31 + i)[1]
            inp.scales, inp.scales2 = make(inp.num_tokens, g), make(inp.num_tokens, g)
            out = run_normal(ctx, inp, fp8=True, num_worst=num_worst, bias=True)
            verify_normal(ctx, inp, out, f"scales: {name}, num_worst_tokens={num_worst} (seed {seed})", fp8=True,
                          num_worst=num_worst, bias=True)


def stream_modes(ctx, seed):
    """Every combination of previous_event / async_finish / allocate_on_comm_stream."""
    for prev in (False, True):
        for async_finish in (False, True):
            for on_comm in (False, True):
                normal_case(ctx, seed, f"prev={prev} async={async_finish} on_comm={on_comm}", prev=prev,
                            async_finish=async_finish, on_comm=on_comm, bias=True)
                with epcomm.Buffer.capture():  # EventOverlap as a context manager waits on exit
                    pass


def configs(ctx, seed):
    c = Checks(ctx, "Config and hints")
    R = ctx.num_ranks
    for chunk, buf_tokens in ((8, 64), (16, 256), (32, 128), (6, 256)):
        cfg = epcomm.Config(epcomm.Buffer.num_sms, chunk, buf_tokens, 6, 128)
        normal_case(ctx, seed, f"config chunk={chunk} buffer={buf_tokens}", dconfig=cfg, cconfig=cfg)
    d, k = epcomm.Buffer.get_dispatch_config(R), epcomm.Buffer.get_combine_config(R)
    c.equal("default num_sms", (d.num_sms, k.num_sms), (epcomm.Buffer.num_sms,) * 2)
    small, big = d.get_nvl_buffer_size_hint(1024 * 2, R), d.get_nvl_buffer_size_hint(7168 * 2, R)
    c.true("nvl hint", 0 < small <= big, f"{small}, {big}")
    # No network memory inside one NVLink domain (DeepEP's rule), some across nodes.
    c.equal("rdma hint inside one node", d.get_rdma_buffer_size_hint(7168 * 2, R), 0
            if R <= epcomm.Config.nvlink_domain_ranks() else d.get_rdma_buffer_size_hint(7168 * 2, R))
    c.equal("rdma hint, ranks_per_node=R", d.get_rdma_buffer_size_hint(7168 * 2, R, ranks_per_node=R), 0)
    c.true("rdma hint across nodes", d.get_rdma_buffer_size_hint(7168 * 2, 2 * R, ranks_per_node=R) > 0)
    c.true("buffer big enough", ctx.buffer.num_nvl_bytes >= k.get_nvl_buffer_size_hint(2048 * 2, R))
    inp = Inputs(ctx, seed, 64, 1024, 4, 8 * R)
    ntpr, _, ntpe, itir, _ = ctx.buffer.get_dispatch_layout(inp.topk, inp.num_experts)
    too_many = epcomm.Config(100000, 32, 128)
    expect_error(c, "config.num_sms too large", lambda: ctx.buffer.dispatch(
        inp.x, num_tokens_per_rank=ntpr, is_token_in_rank=itir, num_tokens_per_expert=ntpe, topk_idx=inp.topk,
        topk_weights=inp.weights, config=too_many), ValueError, "num_sms")
    expect_error(c, "Config(num_sms=0)", lambda: epcomm.Config(0, 32, 128), ValueError, "num_sms")
    c.done()
    normal_case(ctx, seed, "after a config error")  # the buffer stays usable


def set_num_sms(ctx, seed):
    c = Checks(ctx, "set_num_sms")
    old = epcomm.Buffer.num_sms
    try:
        for sms in (16, 15, 8):
            epcomm.Buffer.set_num_sms(sms)
            c.equal("get_dispatch_config.num_sms", epcomm.Buffer.get_dispatch_config(ctx.num_ranks).num_sms, sms)
            normal_case(ctx, seed, f"{sms} SMs")
        expect_error(c, "set_num_sms(0)", lambda: epcomm.Buffer.set_num_sms(0), ValueError, "new_num_sms")
    finally:
        epcomm.Buffer.set_num_sms(old)
    c.done()


def reserve_paths(ctx, seed, hidden=1024, num_topk=8):
    """Receive tensors reserved before the count exchange (Buffer.dispatch): a buffer's first
    dispatch allocates after it, the next into the reservation (exactly the received rows over a
    larger storage, not views), one that receives more than reserved after it again, and
    reserve_recv_rows = False never reserves. Every step checked against the reference."""
    buf, R = ctx.buffer, ctx.num_ranks
    saved = list(buf._recent_rows)
    c = Checks(ctx, f"receive reservation (seed {seed})")
    steps = [("first", seed, 100, True), ("reserved", seed, 100, True), ("more rows", seed + 1, 400, True),
             ("switched off", seed + 2, 100, False)]
    try:
        buf._recent_rows.clear()
        for name, step_seed, tokens, reserve in steps:
            buf.reserve_recv_rows = reserve
            reserved = buf._reserve_rows()
            inp = Inputs(ctx, step_seed, tokens, hidden, num_topk, 16 * R, fixed_tokens=tokens)
            out = run_normal(ctx, inp)
            verify_normal(ctx, inp, out, f"reservation step '{name}' (seed {step_seed})")
            rows = out["handle"].meta.num_rows
            want = reserved if 0 < reserved and rows <= reserved else rows
            if name == "reserved":
                c.true(f"{name}: rows fit the reservation", rows <= reserved, f"{rows} rows, {reserved} reserved")
            if name in ("first", "more rows", "switched off"):
                c.equal(f"{name}: storage of exactly the received rows", want, rows)
            for what, t, cols in (("recv_x", out["recv"], hidden), ("recv_topk_idx", out["ridx"], num_topk),
                                  ("recv_topk_weights", out["rw"], num_topk),
                                  ("recv_src_idx", out["handle"].recv_src_idx, 1)):
                c.equal(f"{name}: {what} shape[0]", t.size(0), rows)
                c.true(f"{name}: {what} is not a view", t._base is None)
                storage = t.untyped_storage() if hasattr(t, "untyped_storage") else t.storage()
                storage_rows = storage.nbytes() // (t.element_size() * cols)
                c.equal(f"{name}: rows of {what}'s storage", storage_rows, want)
    finally:
        vars(buf).pop("reserve_recv_rows", None)
        buf._recent_rows.clear()
        buf._recent_rows.extend(saved)
    c.done()


def worst_tokens(ctx, seed):
    R = ctx.num_ranks
    for fp8 in (False, True):
        normal_case(ctx, seed, f"num_worst_tokens fp8={fp8}", num_worst=R * 300, fp8=fp8, bias=True)


def capture_graph(step):
    """Runs step() once on a side stream (warm-up outside the graph), then captures it in a CUDA graph;
    returns (graph, what the captured step returned)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    # thread_local: other threads (the NCCL process group's watchdog) may query events meanwhile.
    with torch.cuda.graph(g, capture_error_mode="thread_local"):
        out = step()
    return g, out


def graph(ctx, seed, tokens=128, hidden=2048, num_topk=8, num_experts=None):
    """layout + dispatch(num_worst_tokens) + combine captured in a CUDA graph, replayed on new data."""
    R = ctx.num_ranks
    num_experts = num_experts or 16 * R
    inp = Inputs(ctx, seed, tokens, hidden, num_topk, num_experts, fixed_tokens=tokens)
    static_x, static_topk, static_w = inp.x.clone(), inp.topk.clone(), inp.weights.clone()
    buf = ctx.buffer

    def step():
        ntpr, ntprdma, ntpe, itir, _ = buf.get_dispatch_layout(static_topk, num_experts)
        recv, ridx, rw, _, handle, _ = buf.dispatch(static_x, num_tokens_per_rank=ntpr, is_token_in_rank=itir,
                                                     num_tokens_per_expert=ntpe, topk_idx=static_topk,
                                                     topk_weights=static_w, num_worst_tokens=R * tokens)
        cx, cw, _ = buf.combine(recv, handle, topk_weights=rw)
        return (ntpr, ntprdma, ntpe, itir), recv, ridx, rw, handle, cx, cw

    g, (layout, recv, ridx, rw, handle, cx, cw) = capture_graph(step)
    for it in range(3):
        fresh = Inputs(ctx, seed + 1000 * (it + 1), tokens, hidden, num_topk, num_experts, fixed_tokens=tokens)
        static_x.copy_(fresh.x)
        static_topk.copy_(fresh.topk)
        static_w.copy_(fresh.weights)
        g.replay()
        torch.cuda.synchronize()
        fresh.x2 = fresh.x  # no cached dispatch in the graph: check the first dispatch twice
        out = dict(layout=layout, recv=recv, ridx=ridx, rw=rw, counts=[], handle=handle, y=recv, cx=cx, cw=cw,
                   recv2=recv)
        verify_normal(ctx, fresh, out, f"CUDA graph replay {it} (seed {seed})", num_worst=R * tokens)


def errors(ctx, seed):
    """Bad arguments raise ValueError naming the argument; the buffer stays usable."""
    R, buf = ctx.num_ranks, ctx.buffer
    inp = Inputs(ctx, seed, 64, 1024, 4, 8 * R, fixed_tokens=64)
    E = inp.num_experts
    ntpr, _, ntpe, itir, _ = buf.get_dispatch_layout(inp.topk, E)
    layout_kw = dict(num_tokens_per_rank=ntpr, is_token_in_rank=itir, num_tokens_per_expert=ntpe)
    _, _, rw, _, handle, _ = buf.dispatch(inp.x, topk_idx=inp.topk, topk_weights=inp.weights, **layout_kw)
    rows = handle.meta.num_rows
    c = Checks(ctx, "argument errors")
    bad = [
        ("topk_idx int32", lambda: buf.get_dispatch_layout(inp.topk.int(), E), "topk_idx"),
        ("topk_idx 1-D", lambda: buf.get_dispatch_layout(inp.topk[:, 0], E), "topk_idx"),
        ("num_experts 0", lambda: buf.get_dispatch_layout(inp.topk, 0), "num_experts"),
        ("x float32", lambda: buf.dispatch(inp.x.float(), topk_idx=inp.topk, **layout_kw), "x"),
        ("x on the CPU", lambda: buf.dispatch(inp.x.cpu(), topk_idx=inp.topk, **layout_kw), "x"),
        ("x not a tensor", lambda: buf.dispatch([1, 2], topk_idx=inp.topk, **layout_kw), "x"),
        # Any number of scale words per token is taken (DeepEP's rule); the rows and the dtype must fit.
        ("x_scales rows", lambda: buf.dispatch((inp.x8, inp.scales[:-1]), topk_idx=inp.topk, **layout_kw),
         "x_scales"),
        ("x_scales float64", lambda: buf.dispatch((inp.x8, inp.scales.double()), topk_idx=inp.topk, **layout_kw),
         "x_scales"),
        ("x_scales 513 words", lambda: buf.dispatch((inp.x8, torch.zeros(64, 513, device=ctx.device)),
                                                    topk_idx=inp.topk, **layout_kw), "x_scales"),
        ("layout missing", lambda: buf.dispatch(inp.x, topk_idx=inp.topk), "num_tokens_per_rank"),
        ("topk_weights alone", lambda: buf.dispatch(inp.x, topk_weights=inp.weights, **layout_kw), "topk_weights"),
        ("expert_alignment 0", lambda: buf.dispatch(inp.x, expert_alignment=0, **layout_kw), "expert_alignment"),
        ("num_worst_tokens -1", lambda: buf.dispatch(inp.x, num_worst_tokens=-1, **layout_kw), "num_worst_tokens"),
        ("async_finish 'yes'", lambda: buf.dispatch(inp.x, async_finish="yes", **layout_kw), "async_finish"),
        ("config str", lambda: buf.dispatch(inp.x, config="fast", **layout_kw), "config"),
        ("previous_event int", lambda: buf.dispatch(inp.x, previous_event=42, **layout_kw), "previous_event"),
        ("handle garbage", lambda: buf.combine(inp.x, (1, 2, 3)), "handle"),
        ("combine x rows", lambda: buf.combine(torch.zeros(rows + 1, 1024, dtype=torch.bfloat16,
                                                           device=ctx.device), handle), "x"),
        ("combine bias shape", lambda: buf.combine(torch.zeros(rows, 1024, dtype=torch.bfloat16, device=ctx.device),
                                                   handle, bias=inp.bias[0][:, :512]), "bias"),
        ("cached with topk", lambda: buf.dispatch(inp.x, handle=handle, topk_idx=inp.topk), "topk_idx"),
        ("cached x rows", lambda: buf.dispatch(inp.x[:-1], handle=handle), "x"),
    ]
    if R > 1:
        bad.append(("num_experts not divisible", lambda: buf.get_dispatch_layout(inp.topk, E + 1), "num_experts"))
    for name, fn, fragment in bad:
        expect_error(c, name, fn, ValueError, fragment)
    c.done()
    normal_case(ctx, seed, "after argument errors", fp8=True, bias=True)


def invalid_topk(ctx, seed):
    """An out-of-range expert id: every rank's dispatch raises ValueError, later calls work."""
    inp = Inputs(ctx, seed, 64, 1024, 4, 8 * ctx.num_ranks, fixed_tokens=64)
    inp.topk[0, 0] = inp.num_experts  # out of range on every rank
    ntpr, _, ntpe, itir, _ = ctx.buffer.get_dispatch_layout(inp.topk, inp.num_experts)
    c = Checks(ctx, "topk_idx out of range")
    expect_error(c, "dispatch", lambda: ctx.buffer.dispatch(inp.x, num_tokens_per_rank=ntpr, is_token_in_rank=itir,
                                                            num_tokens_per_expert=ntpe, topk_idx=inp.topk),
                 ValueError, "topk_idx")
    torch.cuda.synchronize()
    c.done()
    normal_case(ctx, seed, "after an out-of-range topk entry")


def lifetime(ctx, seed):
    """destroy(), explicitly_destroy, too-small buffers, the shrink-mode placeholders, misc statics."""
    c = Checks(ctx, "lifetime and statics")
    R = ctx.num_ranks
    c.true("is_sm90_compiled", epcomm.Buffer.is_sm90_compiled() is True)
    c.true("topk_idx_t", epcomm.topk_idx_t is torch.int64)
    c.true("get_comm_stream", isinstance(ctx.buffer.get_comm_stream(), torch.cuda.Stream))
    c.true("capture", epcomm.Buffer.capture().event is not None)
    expect_error(c, "destroy without explicitly_destroy", ctx.buffer.destroy, RuntimeError, "explicitly_destroy")

    hint = epcomm.Buffer.get_dispatch_config(R).get_nvl_buffer_size_hint(1024 * 2, R)
    own = epcomm.Buffer(ctx.group, num_nvl_bytes=hint, explicitly_destroy=True)
    normal_case(ctx, seed, "explicitly destroyed buffer", hidden=1024, buffer=own)
    own.destroy()
    inp = Inputs(ctx, seed, 16, 1024, 4, 8 * R)
    expect_error(c, "layout after destroy", lambda: own.get_dispatch_layout(inp.topk, inp.num_experts),
                 RuntimeError, "destroy")
    expect_error(c, "destroy twice", own.destroy, RuntimeError, "destroy")

    tiny = epcomm.Buffer(ctx.group, num_nvl_bytes=4096, explicitly_destroy=True)
    ntpr, _, ntpe, itir, _ = tiny.get_dispatch_layout(inp.topk, inp.num_experts)
    expect_error(c, "num_nvl_bytes too small", lambda: tiny.dispatch(
        inp.x, num_tokens_per_rank=ntpr, is_token_in_rank=itir, num_tokens_per_expert=ntpe), ValueError,
        "num_nvl_bytes")
    tiny.destroy()

    # A low-latency buffer too small for the shape, the shrink-mode placeholders, destroy.
    ll = epcomm.Buffer(ctx.group, num_nvl_bytes=0, num_rdma_bytes=1 << 20, low_latency_mode=True,
                       num_qps_per_rank=8, enable_shrink=True, explicitly_destroy=True)
    x = torch.zeros(4, 1024, dtype=torch.bfloat16, device=ctx.device)
    idx = torch.zeros(4, 2, dtype=torch.int64, device=ctx.device)
    expect_error(c, "low_latency_dispatch with num_rdma_bytes too small",
                 lambda: ll.low_latency_dispatch(x, idx, 64, 8 * R), ValueError, "num_rdma_bytes")
    # Shrink mode: a rank masks another one (seen by query), never itself; clean unmasks all.
    other = (ctx.rank + 1) % R
    status = torch.full((R,), 7, dtype=torch.int32, device=ctx.device)
    if R > 1:
        ll.low_latency_update_mask_buffer(other, True)
        ll.low_latency_query_mask_buffer(status)
        want = [1 if r == other else 0 for r in range(R)]
        c.true("mask another rank", status.tolist() == want, f"mask {status.tolist()}, want {want}")
    expect_error(c, "low_latency_update_mask_buffer(this rank, True)",
                 lambda: ll.low_latency_update_mask_buffer(ctx.rank, True), ValueError, "itself")
    ll.low_latency_update_mask_buffer(R - 1, False)
    ll.low_latency_clean_mask_buffer()
    ll.low_latency_query_mask_buffer(status)
    c.true("clean unmasks", bool((status == 0).all()), f"mask after clean {status.tolist()}")
    ll.destroy()
    expect_error(c, "low_latency_dispatch after destroy", lambda: ll.low_latency_dispatch(x, idx, 8, 8 * R),
                 RuntimeError, "destroy")
    expect_error(c, "get_local_buffer_tensor after destroy", lambda: ll.get_local_buffer_tensor(torch.uint8),
                 RuntimeError, "destroy")
    c.done()


def moe_layer(ctx, seed):
    """examples/moe_layer.py: forward and input gradients against the same layer on one GPU."""
    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "moe_layer.py")
    spec = importlib.util.spec_from_file_location("epcomm_moe_layer_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.check_against_single_gpu(ctx.buffer, ctx.group, seed=seed)
    if not report["ok"]:
        raise AssertionError(f"rank {ctx.rank}: MoE layer differs from the single-GPU layer: {report}")
    return report


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


@timed("epcomm")
def ll_run(ctx, buf, inp, fp8=True, round_scale=False, ue8m0=False, hook=False, async_finish=False, zero_copy=False,
           use_out=False, stats=(None, None, None)):
    """One decode step: dispatch, the stand-in expert, combine, with the given options."""
    E, tmax = inp.num_experts, inp.tmax
    cum, dwait, cwait = stats
    problems = []
    recv, count, handle, ev, hk = buf.low_latency_dispatch(
        inp.x, inp.topk, tmax, E, cumulative_local_expert_recv_stats=cum, dispatch_wait_recv_cost_stats=dwait,
        use_fp8=fp8, round_scale=round_scale, use_ue8m0=ue8m0, async_finish=async_finish, return_recv_hook=hook)
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
    modes = [dict(hook=True), dict(async_finish=True), dict(zero_copy=True), dict(zero_copy=True, fp8=False),
             dict(use_out=True, hook=True), dict(zero_copy=True, use_out=True, async_finish=True),
             dict(round_scale=True, ue8m0=True, hook=True, zero_copy=True), dict()]
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
    gc.collect()
    c.true("the Buffer goes with its last view", alive() is None)

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
