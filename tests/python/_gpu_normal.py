"""Normal-mode GPU cases, run on every rank by _cluster (one process per GPU): one rank's random
inputs, layout -> dispatch -> combine -> cached dispatch with the DeepEP-compatible calls, and the
check of every output against the torch reference built from all-gathered inputs (_reference.py);
then the cases (scale forms, stream options, configs, receive reservations, CUDA graphs, argument
errors, lifetime, the MoE example). _gpu_cases.py lists what test_gpu.py runs."""

import importlib.util
import os

import torch

import _reference as ref
import epcomm
from _gpu_checks import FP8, Checks, capture_graph, expect_error, gather, generators, timed


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


def _room_bytes(t, tensors):
    """(bytes from t's first element to the start of the next of `tensors` in the same storage, or
    to the storage's end; whether another one follows)."""
    def storage_of(u):
        return u.untyped_storage() if hasattr(u, "untyped_storage") else u.storage()

    storage = storage_of(t)
    starts = [u.data_ptr() for u in tensors if u is not None and u is not t and
              storage_of(u).data_ptr() == storage.data_ptr() and u.data_ptr() > t.data_ptr()]
    end = min(starts) if starts else storage.data_ptr() + storage.nbytes()
    return end - t.data_ptr(), bool(starts)


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
            handle = out["handle"]
            made = (out["recv"], out["ridx"], out["rw"], handle.recv_src_idx, handle.rank_prefix_matrix,
                    handle.chunk_offset)
            for what, t, cols in (("recv_x", out["recv"], hidden), ("recv_topk_idx", out["ridx"], num_topk),
                                  ("recv_topk_weights", out["rw"], num_topk),
                                  ("recv_src_idx", handle.recv_src_idx, 1)):
                c.equal(f"{name}: {what} shape[0]", t.size(0), rows)
                c.true(f"{name}: {what} is not a view", t._base is None)
                # Outputs held together share one allocation (epcomm._alloc.empty_grouped): each
                # has its rows' bytes up to the next one's 256-byte aligned start, the last up to the
                # block's end.
                room, followed = _room_bytes(t, made)
                row_bytes = t.element_size() * cols
                need = -(-want * row_bytes // 256) * 256 if followed else want * row_bytes
                c.equal(f"{name}: bytes of {what}'s room in its storage", room, need)
    finally:
        vars(buf).pop("reserve_recv_rows", None)
        buf._recent_rows.clear()
        buf._recent_rows.extend(saved)
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
