"""The GPU test cases, run on every rank by _cluster (one process per GPU). Each case moves data
with epcomm, all-gathers the inputs, builds the expected result with _reference and raises
AssertionError listing every mismatch. All collectives come before the first assertion, so a
failing rank never leaves the others waiting."""

import importlib.util
import os

import torch
import torch.distributed as dist

import _reference as ref
import epcomm

FP8 = getattr(torch, "float8_e4m3fn", None)


# ---------------------------------------------------------------------------- helpers
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

    def done(self):
        if self.fails:
            raise AssertionError(self.prefix + "\n  " + "\n  ".join(self.fails))


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


class Inputs:
    """One rank's random inputs: BF16 and FP8 rows (two sets each, the second for cached dispatch),
    column-major FP8 scales, top-k ids and weights."""

    def __init__(self, ctx, seed, max_tokens, hidden, num_topk, num_experts, fixed_tokens=None):
        g = torch.Generator().manual_seed(seed * 7919 + ctx.rank)
        if fixed_tokens is not None:
            T = fixed_tokens
        else:
            T = max_tokens if ctx.rank == 0 else int(torch.randint(0, max_tokens + 1, (1,), generator=g))
        groups = (hidden + 127) // 128
        dev = ctx.device
        self.num_tokens, self.hidden, self.num_experts = T, hidden, num_experts
        self.topk = ref.random_topk(T, num_topk, num_experts, g).to(dev)
        self.weights = torch.rand(T, num_topk, generator=g).to(dev)
        self.x = torch.randn(T, hidden, generator=g).to(torch.bfloat16).to(dev)
        self.x2 = torch.randn(T, hidden, generator=g).to(torch.bfloat16).to(dev)
        self.x8 = torch.randint(0, 256, (T, hidden), generator=g, dtype=torch.uint8).to(dev).view(FP8)
        self.x8_2 = torch.randint(0, 256, (T, hidden), generator=g, dtype=torch.uint8).to(dev).view(FP8)
        # Column-major scales, as frameworks often hold them (dispatch takes any strides).
        self.scales = torch.rand(groups, T, generator=g).to(dev).t()
        self.scales2 = torch.rand(groups, T, generator=g).to(dev).t()
        self.y_seed = seed * 104729 + ctx.rank
        self.bias = (torch.randn(T, hidden, generator=g).to(torch.bfloat16).to(dev),
                     torch.randn(T, hidden, generator=g).to(torch.bfloat16).to(dev))


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
        g = torch.Generator().manual_seed(inp.y_seed)
        y = torch.randn(rows, inp.hidden, generator=g).to(torch.bfloat16).to(ctx.device)
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
    c.true("rdma hint", d.get_rdma_buffer_size_hint(7168 * 2, R) > 0)
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


def worst_tokens(ctx, seed):
    R = ctx.num_ranks
    for fp8 in (False, True):
        normal_case(ctx, seed, f"num_worst_tokens fp8={fp8}", num_worst=R * 300, fp8=fp8, bias=True)


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

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    # thread_local: other threads (the NCCL process group's watchdog) may query events meanwhile.
    with torch.cuda.graph(g, capture_error_mode="thread_local"):
        layout, recv, ridx, rw, handle, cx, cw = step()
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
        ("x_scales shape", lambda: buf.dispatch((inp.x8, inp.scales[:, :1]), topk_idx=inp.topk, **layout_kw),
         "x_scales"),
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
    """destroy(), explicitly_destroy, a too-small buffer, the low-latency stubs, misc statics."""
    c = Checks(ctx, "lifetime and statics")
    R = ctx.num_ranks
    c.true("is_sm90_compiled", epcomm.Buffer.is_sm90_compiled() is True)
    c.true("topk_idx_t", epcomm.topk_idx_t is torch.int64)
    c.true("get_comm_stream", isinstance(ctx.buffer.get_comm_stream(), torch.cuda.Stream))
    c.true("capture", epcomm.Buffer.capture().event is not None)
    expect_error(c, "destroy without explicitly_destroy", ctx.buffer.destroy, RuntimeError, "explicitly_destroy")
    expect_error(c, "get_local_buffer_tensor", lambda: ctx.buffer.get_local_buffer_tensor(torch.bfloat16),
                 NotImplementedError)

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

    ll = epcomm.Buffer(ctx.group, num_nvl_bytes=0, num_rdma_bytes=64 << 20, low_latency_mode=True,
                       num_qps_per_rank=8, enable_shrink=True, explicitly_destroy=True)
    x = torch.zeros(4, 1024, dtype=torch.bfloat16, device=ctx.device)
    idx = torch.zeros(4, 2, dtype=torch.int64, device=ctx.device)
    stubs = [
        ("low_latency_dispatch", lambda: ll.low_latency_dispatch(x, idx, 8, 8 * R)),
        ("low_latency_combine", lambda: ll.low_latency_combine(x.view(1, 4, 1024), idx, idx.float(), (None,) * 5)),
        ("clean_low_latency_buffer", lambda: ll.clean_low_latency_buffer(8, 1024, 8 * R)),
        ("get_next_low_latency_combine_buffer", lambda: ll.get_next_low_latency_combine_buffer((None,) * 5)),
        ("low_latency_update_mask_buffer", lambda: ll.low_latency_update_mask_buffer(0, True)),
        ("low_latency_query_mask_buffer", lambda: ll.low_latency_query_mask_buffer(idx[:, 0].int())),
        ("low_latency_clean_mask_buffer", ll.low_latency_clean_mask_buffer),
        ("get_low_latency_rdma_size_hint", lambda: epcomm.Buffer.get_low_latency_rdma_size_hint(128, 7168, R, 288)),
    ]
    for name, fn in stubs:
        expect_error(c, name, fn, NotImplementedError, "low-latency")
    ll.destroy()
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
