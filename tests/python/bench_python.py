"""Python-level figures of epcomm as a DeepEP user sees them (tensors allocated per call, the
caller's stream), on the standard problems of docs/contract.md §7, one process per GPU, each call
timed with CUDA events on the caller's stream.

Normal mode (--mode normal): 4096 tokens per rank, hidden 7168, top-8, 256 experts, uniform
routing; median of --iters after --warmup; logical bytes = rows received by the rank x bytes per
row (BF16 2*hidden, FP8 hidden + 4*hidden/128; combine and cached dispatch at BF16). Prints GB/s
per rank and the minimum over ranks, the figure that counts. A dispatch is timed as epcomm-bench
times it (event on the caller's stream, count exchange + host wait + data phase, event), with the
Python layer's work and allocations included; dispatch-*-exact repeat the dispatches with
Buffer.reserve_recv_rows = False (receive tensors allocated after the count exchange).

Low-latency mode (--mode low-latency): 128 tokens per rank (Tmax 128), hidden 7168, top-8, 288
experts (rounded down to a multiple of the rank count), uniform routing; FP8 (and BF16) dispatch,
BF16 combine; median microseconds of --ll-iters after --ll-warmup, per rank and the maximum over
ranks: one call each (ll-dispatch-fp8, ll-dispatch-bf16, ll-combine, the host's Python work
included when it is slower than the GPU), the two halves of hook mode with 50 us of other GPU work
between them (ll-*-send / ll-*-recv, as epcomm-bench measures them), calls replayed from one
CUDA graph (ll-*-graph, no host work), and eager calls back to back (ll-*-loop: one event pair
around --ll-iters calls, per call; what a framework calling each layer eagerly pays, against the
C++ row of the same call).

Host time (ll-*-host rows): a host clock around one eager call, no synchronization, median of
--ll-iters; --profile-dir DIR also writes torch.profiler's CPU table of rank 0's LL calls there.
The output tensors come from epcomm._torch_ops where it was built (EPCOMM_TORCH_OPS=0: from Python;
the line "output tensors made by" says which), and the binding reads tensor arguments through its
reader (--no-tensor-reader: through Python calls; the line "tensors read by" says which), so the
paths can be compared on one machine; --ab-rounds (default 15) also times them interleaved in one
process (reader on/off, outputs from _torch_ops or Python), which cancels the host's drift between
processes. With --cpp-bench the host rows show the C++ call's own host time beside them, and an
empty kernel's launch: the floor under the Python figures.

--mode all (the default) runs both. With --cpp-bench PATH it first runs the C++ epcomm-bench on
the same problems (same SMs and iterations, no NCCL baseline; `--mode normal` and `--mode
low-latency`) and prints the Python/C++ ratio per operation.

    PYTHONPATH=python python tests/python/bench_python.py --cpp-bench build/bench/epcomm-bench
"""

import argparse
import json
import os
import queue
import socket
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist

OPS = ("dispatch-bf16", "dispatch-fp8", "cached-dispatch-bf16", "combine")
# The same dispatches with Buffer.reserve_recv_rows = False (receive tensors allocated after the
# count exchange, while the GPU waits): what reserving them before it gains, in the same run.
EXACT_OPS = {"dispatch-bf16-exact": "dispatch-bf16", "dispatch-fp8-exact": "dispatch-fp8"}
LL_OPS = ("ll-dispatch-fp8", "ll-dispatch-bf16", "ll-combine", "ll-dispatch-fp8-send", "ll-dispatch-fp8-recv",
          "ll-combine-send", "ll-combine-recv", "ll-dispatch-fp8-graph", "ll-combine-graph")
# Eager calls back to back (one event pair around --ll-iters calls, per call): what a framework that
# calls each layer without a CUDA graph pays per call, the larger of its host time and the GPU's;
# compared with the C++ row of the same call (its host never holds the GPU back). The per-call rows
# above add two Python event records to each call's host time.
LL_LOOP_OPS = {"ll-dispatch-fp8-loop": "ll-dispatch-fp8", "ll-combine-loop": "ll-combine"}
# Host time of one eager call (a host clock around the call, no synchronization; what the Python
# layer, the binding, the C++ checks and the launches cost the CPU), median of --ll-iters.
LL_HOST_OPS = ("ll-dispatch-fp8-host", "ll-dispatch-bf16-host", "ll-combine-host")
# Normal mode's host time per call (the dispatch's includes its wait for the count exchange, as the
# C++ call's does): what the Python layer adds over C++ (issue: <= 20 us).
NORMAL_HOST_OPS = ("dispatch-bf16-host", "cached-dispatch-bf16-host", "combine-host")
HOOK_GAP_US = 50.0  # GPU work between a hook call's send and receive halves (epcomm-bench's spin)


def median_us(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) * 1e3 for start, end in events)
    return times[len(times) // 2]


def loop_us(fn, warmup, iters):
    """Microseconds per call of `iters` calls of `fn` back to back between two events on the
    caller's stream (no host work between the calls but the calls' own)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def host_us(fn, warmup, iters):
    """Median host microseconds of one call of `fn`, timed with perf_counter_ns around the call,
    the GPU left to run behind (synchronized every 50 calls, outside the timed stretch, so the
    launch queue never fills and blocks the host)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    clock = time.perf_counter_ns
    for i in range(iters):
        if i % 50 == 0:
            torch.cuda.synchronize()
        t0 = clock()
        fn()
        times.append((clock() - t0) / 1e3)
    torch.cuda.synchronize()
    times.sort()
    return times[len(times) // 2]


# The host-path variants host_ab compares in one process, by name: (which eager entry: "fast" the
# buffer's C calls, the default; "pybind" session 15's Runtime methods with the tuples built in
# Python; None the Python layer's path), the reader on, outputs from _torch_ops, _torch_ops's CUDA
# tensors straight from PyTorch's CUDA factory (else at::empty).
AB_CONFIGS = (("fast", "fast", True, True, True), ("fast, at::empty", "fast", True, True, False),
              ("pybind (s15)", "pybind", True, True, False), ("reader+ops", None, True, True, False),
              ("no-reader+python", None, False, False, False))


def host_ab(epcomm, buffer, dispatch, combine, rounds, calls=40):
    """Host us per call of the FP8 dispatch and the combine under each of AB_CONFIGS, interleaved:
    `rounds` rounds, each timing `calls` calls of every variant in turn (the median of each), then
    the median over rounds per variant. One process, alternating, so the host's drift between
    processes and calls (run 82: the same variant read 20 to 32 us in two processes) cancels.
    Beside them, the pieces of the fast call (floor rows): the C function alone without the Python
    method around it, the same C call declining at once (async_finish: Python to C and back with 11
    arguments), and the dispatch's two allocations through _torch_ops from Python."""
    from _gpu_low_latency import pybind_eager_calls
    from epcomm import _alloc, _epcomm, _low_latency
    ops = _alloc._OPS
    set_direct = getattr(ops, "_set_direct_alloc", lambda on: False)
    saved_empty, had_reader = _low_latency.empty, _epcomm._tensor_reader_set()
    saved_fast, had_direct = (buffer._ll_fast_dispatch, buffer._ll_fast_combine), set_direct(True)

    def restore():  # the process's own setup, for the floor rows and at the end
        buffer._ll_fast_dispatch, buffer._ll_fast_combine = saved_fast
        _epcomm._set_tensor_reader(ops.tensor_reader if had_reader else None)
        _low_latency.empty = saved_empty
        set_direct(had_direct)

    restore()
    pybind = pybind_eager_calls(buffer) if saved_fast[0] is not None else None
    got = {name: {"dispatch": [], "combine": []} for name, *_ in AB_CONFIGS}
    x, topk_idx, tmax, E = dispatch.args
    fast_d = saved_fast[0]
    R, H, dev = buffer.group_size, x.size(1), x.device.index
    EL, RT = E // R, R * tmax
    specs = (((torch.float8_e4m3fn, (EL, RT, H)), (torch.float32, (EL, RT, H // 128), (H // 128 * RT, 1, RT))),
             ((torch.int32, (EL,)), (torch.int32, (EL, RT)), (torch.int64, (EL, R))))
    floors = {"C call alone": [], "C call declined": [], "2 allocations": []}
    try:
        for _ in range(rounds):
            for name, entry, reader, from_ops, direct in AB_CONFIGS:
                if entry == "pybind" and pybind is None:
                    continue
                buffer._ll_fast_dispatch, buffer._ll_fast_combine = \
                    saved_fast if entry == "fast" else pybind if entry == "pybind" else (None, None)
                _epcomm._set_tensor_reader(ops.tensor_reader if reader else None)
                _low_latency.empty = saved_empty if from_ops else _alloc._python_empty
                set_direct(direct and had_direct)
                got[name]["dispatch"].append(host_us(dispatch, 5, calls))
                handle = dispatch()[2]
                got[name]["combine"].append(host_us(lambda: combine(handle), 5, calls))
            restore()
            if fast_d is not None:
                floors["C call alone"].append(host_us(
                    lambda: fast_d(x, topk_idx, tmax, E, None, None, True, False, False, False, False), 5, calls))
                floors["C call declined"].append(host_us(
                    lambda: fast_d(x, topk_idx, tmax, E, None, None, True, False, False, True, False), 5, calls))
            floors["2 allocations"].append(host_us(lambda: (ops.empty(dev, specs[0], True),
                                                            ops.empty(dev, specs[1], True)), 5, calls))
    finally:
        restore()
    med = lambda v: sorted(v)[len(v) // 2] if v else float("nan")  # noqa: E731
    result = {name: {op: med(v) for op, v in by_op.items()} for name, by_op in got.items() if by_op["dispatch"]}
    result["floors (dispatch)"] = {name: med(v) for name, v in floors.items()}
    result["direct_alloc_built"] = bool(getattr(ops, "direct_alloc_built", 0))
    return result


def profile_table(fns, path, calls=20, mode="w"):
    """torch.profiler over `calls` calls of each (name, fn): the CPU-side table (self CPU time per
    op, per call), written to `path`."""
    from torch.profiler import ProfilerActivity, profile

    with open(path, mode) as f:
        for name, fn in fns:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(calls):
                    fn()
                torch.cuda.synchronize()
            f.write(f"== {name}: {calls} calls\n")
            f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15) + "\n")


def sleep_cycles(us):
    """torch.cuda._sleep cycles that keep the GPU busy for about `us` microseconds."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1000)
    start.record()
    torch.cuda._sleep(1_000_000)
    end.record()
    torch.cuda.synchronize()
    return max(1, int(1_000_000 * us / (start.elapsed_time(end) * 1e3)))


def median_halves_us(send, warmup, iters, gap_cycles):
    """Median times of the send half (`send()` returns the call's tuple, hook last) and of the
    receive half (the hook), with `gap_cycles` of other GPU work between them."""
    for _ in range(warmup):
        hook = send()[-1]
        torch.cuda._sleep(gap_cycles)
        hook()
    torch.cuda.synchronize()
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(4)] for _ in range(iters)]
    for ev in events:
        ev[0].record()
        hook = send()[-1]
        ev[1].record()
        torch.cuda._sleep(gap_cycles)
        ev[2].record()
        hook()
        ev[3].record()
    torch.cuda.synchronize()
    sends = sorted(ev[0].elapsed_time(ev[1]) * 1e3 for ev in events)
    recvs = sorted(ev[2].elapsed_time(ev[3]) * 1e3 for ev in events)
    return sends[len(sends) // 2], recvs[len(recvs) // 2]


def graph_us(fn, calls, replays=5):
    """Per-call time of `calls` calls captured in one CUDA graph (median of `replays` replays)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, capture_error_mode="thread_local"):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del g
    return sorted(times)[len(times) // 2]


def ll_experts(args, num_ranks):
    return args.ll_experts // num_ranks * num_ranks


def _low_latency(rank, num_ranks, args, out):
    import epcomm

    T, H, K, E = args.ll_tokens, args.ll_hidden, args.ll_topk, ll_experts(args, num_ranks)
    EL = E // num_ranks
    nbytes = epcomm.Buffer.get_low_latency_rdma_size_hint(T, H, num_ranks, E)
    buffer = epcomm.Buffer(dist.group.WORLD, num_rdma_bytes=nbytes, low_latency_mode=True, explicitly_destroy=True)
    g = torch.Generator(device="cuda").manual_seed(2000 + rank)
    dev = torch.device("cuda", rank)
    x = torch.randn(T, H, generator=g, device=dev).to(torch.bfloat16)
    topk_idx = torch.rand(T, E, generator=g, device=dev).topk(K, dim=1).indices  # uniform, distinct experts
    topk_weights = torch.rand(T, K, generator=g, device=dev)
    y = torch.randn(EL, num_ranks * T, H, generator=g, device=dev).to(torch.bfloat16)  # the experts' outputs
    warmup, iters = args.ll_warmup, args.ll_iters
    even = iters + (iters & 1)  # a graph of dispatches only holds an even number of them

    def dispatch(fp8=True, hook=False):
        return buffer.low_latency_dispatch(x, topk_idx, T, E, use_fp8=fp8, return_recv_hook=hook)

    dispatch.args = (x, topk_idx, T, E)  # for host_ab's floor rows

    # The GPU sat idle while the process started: ~0.3 s of calls first, or the first timed loop
    # runs at lower clocks (run 81: the first row of each process read ~40 us, later rows ~30).
    t_end = time.perf_counter() + 0.3
    while time.perf_counter() < t_end:
        for _ in range(20):
            dispatch()
        torch.cuda.synchronize()
    out["ll-dispatch-fp8"] = median_us(dispatch, warmup, iters)
    out["ll-dispatch-bf16"] = median_us(lambda: dispatch(fp8=False), warmup, iters)
    handle = dispatch()[2]  # a fresh dispatch, then combines of its handle (each rewrites the same rows)
    out["ll-combine"] = median_us(lambda: buffer.low_latency_combine(y, topk_idx, topk_weights, handle), warmup, iters)
    out["ll-dispatch-fp8-loop"] = loop_us(dispatch, warmup, iters)
    handle = dispatch()[2]  # the loop of dispatches above took the earlier handle's buffer
    out["ll-combine-loop"] = loop_us(lambda: buffer.low_latency_combine(y, topk_idx, topk_weights, handle), warmup,
                                     iters)
    gap = sleep_cycles(HOOK_GAP_US)
    out["ll-dispatch-fp8-send"], out["ll-dispatch-fp8-recv"] = median_halves_us(
        lambda: dispatch(hook=True), warmup, iters, gap)
    handle = dispatch()[2]
    out["ll-combine-send"], out["ll-combine-recv"] = median_halves_us(
        lambda: buffer.low_latency_combine(y, topk_idx, topk_weights, handle, return_recv_hook=True), warmup, iters,
        gap)
    out["ll-dispatch-fp8-graph"] = graph_us(dispatch, even)
    handle = dispatch()[2]
    out["ll-combine-graph"] = graph_us(lambda: buffer.low_latency_combine(y, topk_idx, topk_weights, handle), even)
    out["ll-dispatch-fp8-host"] = host_us(dispatch, warmup, iters)
    out["ll-dispatch-bf16-host"] = host_us(lambda: dispatch(fp8=False), warmup, iters)
    handle = dispatch()[2]
    out["ll-combine-host"] = host_us(lambda: buffer.low_latency_combine(y, topk_idx, topk_weights, handle), warmup,
                                     iters)
    if args.ab_rounds and epcomm._alloc._OPS is not None:
        out["ab"] = host_ab(epcomm, buffer, dispatch, lambda h: buffer.low_latency_combine(y, topk_idx, topk_weights, h),
                            args.ab_rounds)
    if args.profile_dir and rank == 0:
        path = os.path.join(args.profile_dir, "profile-ll-rank0.txt")
        profile_table((("low_latency_dispatch fp8", dispatch),), path)
        handle = dispatch()[2]  # after the profiled dispatches: the handle of the latest one
        profile_table((("low_latency_combine", lambda: buffer.low_latency_combine(y, topk_idx, topk_weights, handle)),),
                      path, mode="a")
    out["ll-recv-count"] = int(dispatch()[1].sum())
    out["alloc"] = epcomm._alloc.status()
    out["reader"] = "in C++ (epcomm._torch_ops.tensor_reader)" if epcomm._epcomm._tensor_reader_set() else \
        "through Python calls"
    torch.cuda.synchronize()
    buffer.destroy()


def _worker(rank, num_ranks, port, args, results):
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=num_ranks)
    if args.no_tensor_reader:
        import epcomm
        epcomm._epcomm._set_tensor_reader(None)
    out = {"rank": rank}
    if args.mode in ("normal", "all"):
        _normal(rank, num_ranks, args, out)
    if args.mode in ("low-latency", "all"):
        _low_latency(rank, num_ranks, args, out)
    results.put(out)
    torch.cuda.synchronize()
    dist.destroy_process_group()


def _normal(rank, num_ranks, args, out):
    import epcomm

    T, H, K, E = args.tokens, args.hidden, args.topk, args.experts
    epcomm.Buffer.set_num_sms(args.sms)
    dcfg, ccfg = epcomm.Buffer.get_dispatch_config(num_ranks), epcomm.Buffer.get_combine_config(num_ranks)
    nbytes = max(dcfg.get_nvl_buffer_size_hint(H * 2, num_ranks), ccfg.get_nvl_buffer_size_hint(H * 2, num_ranks))
    buffer = epcomm.Buffer(dist.group.WORLD, num_nvl_bytes=nbytes, explicitly_destroy=True)

    g = torch.Generator(device="cuda").manual_seed(1000 + rank)
    dev = torch.device("cuda", rank)
    x = torch.randn(T, H, generator=g, device=dev).to(torch.bfloat16)
    x8 = torch.randint(0, 256, (T, H), generator=g, device=dev, dtype=torch.uint8).view(torch.float8_e4m3fn)
    scales = torch.rand((H + 127) // 128, T, generator=g, device=dev).t()  # column-major, as frameworks hold them
    topk_idx = torch.rand(T, E, generator=g, device=dev).topk(K, dim=1).indices  # uniform, distinct experts
    topk_weights = torch.rand(T, K, generator=g, device=dev)
    ntpr, ntprdma, ntpe, in_rank, _ = buffer.get_dispatch_layout(topk_idx, E)
    layout = dict(num_tokens_per_rank=ntpr, num_tokens_per_rdma_rank=ntprdma, is_token_in_rank=in_rank,
                  num_tokens_per_expert=ntpe)

    def dispatch(inp):
        return buffer.dispatch(inp, topk_idx=topk_idx, topk_weights=topk_weights, config=dcfg, **layout)

    recv_x, _, recv_w, _, handle, _ = dispatch(x)
    rows = handle.meta.num_rows
    fp8_row = H + 4 * H / 128
    out["rows"] = rows
    ops = {
        "dispatch-bf16": (lambda: dispatch(x), 2 * H),
        "dispatch-fp8": (lambda: dispatch((x8, scales)), fp8_row),
        "cached-dispatch-bf16": (lambda: buffer.dispatch(x, handle=handle, config=dcfg), 2 * H),
        "combine": (lambda: buffer.combine(recv_x, handle, topk_weights=recv_w, config=ccfg), 2 * H),
    }
    for op, (fn, row_bytes) in ops.items():
        us = median_us(fn, args.warmup, args.iters)
        out[op] = (us, rows * row_bytes / us / 1e3)
    for op in NORMAL_HOST_OPS:
        out[op] = host_us(ops[op[:-len("-host")]][0], args.warmup, args.iters)
    epcomm.Buffer.reserve_recv_rows = False
    try:
        for op, base in EXACT_OPS.items():
            fn, row_bytes = ops[base]
            us = median_us(fn, args.warmup, args.iters)
            out[op] = (us, rows * row_bytes / us / 1e3)
    finally:
        epcomm.Buffer.reserve_recv_rows = True
    torch.cuda.synchronize()
    buffer.destroy()


def run_python(args, num_ranks):
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, num_ranks, port, args, results)) for r in range(num_ranks)]
    for p in procs:
        p.start()
    got, waited = [], 0.0
    while len(got) < num_ranks:
        try:
            got.append(results.get(timeout=5.0))
        except queue.Empty:
            waited += 5.0
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead or waited > args.timeout:
                for p in procs:
                    p.kill()
                raise SystemExit(f"bench_python: ranks {dead} failed" if dead else "bench_python: timed out")
    for p in procs:
        p.join(timeout=60)
        if p.exitcode not in (0, None):
            raise SystemExit(f"bench_python: a rank exited with code {p.exitcode}")
    return sorted(got, key=lambda r: r["rank"])


def run_cpp(args, num_ranks, mode):
    """{op: (max us, min GB/s)} over ranks from epcomm-bench's JSON, and the device it names."""
    if mode == "normal":
        problem = ["--tokens", args.tokens, "--hidden", args.hidden, "--topk", args.topk, "--experts", args.experts,
                   "--sms", args.sms, "--iters", args.iters, "--warmup", args.warmup]
    else:
        problem = ["--tokens", args.ll_tokens, "--hidden", args.ll_hidden, "--topk", args.ll_topk, "--experts",
                   ll_experts(args, num_ranks), "--iters", args.ll_iters, "--warmup", args.ll_warmup]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.json")
        cmd = [args.cpp_bench, "--mode", mode, "--ranks", str(num_ranks)] + [str(v) for v in problem] + [
            "--no-baseline", "--json", path]
        print("C++:", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0:
            print(proc.stdout[-4000:], proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"epcomm-bench failed with code {proc.returncode}")
        with open(path) as f:
            report = json.load(f)
    ops = OPS + NORMAL_HOST_OPS if mode == "normal" else LL_OPS + LL_HOST_OPS + ("host-empty-launch",)
    summary = {}
    for row in report["rows"]:
        # Normal mode: the rows at --sms; low-latency kernels use every SM (one row per op and rank).
        if row["system"] != "epcomm" or row["op"] not in ops or (mode == "normal" and row["sms"] != args.sms):
            continue
        us, gbps = summary.get(row["op"], (0.0, float("inf")))
        summary[row["op"]] = (max(us, row["us"]), min(gbps, row["gbps"]))
    return summary, report.get("device", "?")


def print_normal(args, num_ranks, device, results, cpp, summary):
    print(f"\n{num_ranks} x {device} | {args.sms} SMs | tokens {args.tokens}/rank, hidden {args.hidden}, "
          f"top-{args.topk}, {args.experts} experts | median of {args.iters}")
    print(f"{'op':<22}" + "".join(f"{'rank ' + str(r['rank']):>16}" for r in results) + f"{'min GB/s':>12}"
          + (f"{'C++ GB/s':>12}{'py/C++':>9}" if cpp else ""))
    for op in OPS + tuple(EXACT_OPS):
        per_rank = [r[op] for r in results]
        worst = min(g for _, g in per_rank)
        summary[op] = {"python_gbps": worst, "python_us": max(u for u, _ in per_rank)}
        line = f"{op:<22}" + "".join(f"{u:8.1f}us {g:6.1f}" for u, g in per_rank) + f"{worst:12.1f}"
        base = EXACT_OPS.get(op, op)  # the -exact rows compare with the C++ figure of their op
        if base in cpp:
            ratio = worst / cpp[base][1]
            summary[op].update(cpp_gbps=cpp[base][1], ratio=ratio)
            line += f"{cpp[base][1]:12.1f}{ratio:9.3f}" + ("" if ratio >= 0.95 or op != base else "  < 0.95")
        print(line)
    for op in NORMAL_HOST_OPS:
        worst = max(r[op] for r in results)
        summary[op] = {"python_host_us": worst}
        line = f"{op:<22}" + "".join(f"{r[op]:8.1f}us {'':6}" for r in results) + f"{'':12}"
        if op in cpp:  # the C++ call's own host time: the Python layer adds the difference
            summary[op].update(cpp_host_us=cpp[op][0], added_us=worst - cpp[op][0])
            line += f"{cpp[op][0]:10.1f}us  +{worst - cpp[op][0]:.1f} us"
        print(line)
    print("*-exact: Buffer.reserve_recv_rows = False (receive tensors allocated after the count exchange); "
          "*-host: host us per call (a host clock around it; the dispatch's wait for the counts included), "
          "C++ beside it and what Python adds")
    print("rows received per rank:", [r["rows"] for r in results])


def print_low_latency(args, num_ranks, device, results, cpp, summary):
    E = ll_experts(args, num_ranks)
    print(f"\n{num_ranks} x {device} | low-latency | tokens {args.ll_tokens}/rank (Tmax {args.ll_tokens}), "
          f"hidden {args.ll_hidden}, top-{args.ll_topk}, {E} experts, FP8 dispatch, BF16 combine | "
          f"median us of {args.ll_iters}" + ("" if E == args.ll_experts else f" ({args.ll_experts} rounded down to "
                                                                           f"a multiple of {num_ranks})"))
    print(f"{'op':<22}" + "".join(f"{'rank ' + str(r['rank']):>10}" for r in results) + f"{'max us':>10}"
          + (f"{'C++ us':>10}{'py/C++':>9}" if cpp else ""))
    for op in LL_OPS:
        per_rank = [r[op] for r in results]
        worst = max(per_rank)
        summary[op] = {"python_us": worst}
        line = f"{op:<22}" + "".join(f"{u:10.1f}" for u in per_rank) + f"{worst:10.1f}"
        if op in cpp:
            ratio = worst / cpp[op][0]
            summary[op].update(cpp_us=cpp[op][0], ratio=ratio)
            line += f"{cpp[op][0]:10.1f}{ratio:9.3f}"
        print(line)
    for op, base in LL_LOOP_OPS.items():
        per_rank = [r[op] for r in results]
        worst = max(per_rank)
        summary[op] = {"python_us": worst}
        line = f"{op:<22}" + "".join(f"{u:10.1f}" for u in per_rank) + f"{worst:10.1f}"
        if base in cpp:  # against the C++ call's event-timed figure
            summary[op].update(cpp_us=cpp[base][0], ratio=worst / cpp[base][0])
            line += f"{cpp[base][0]:10.1f}{worst / cpp[base][0]:9.3f}"
        print(line)
    for op in LL_HOST_OPS:
        per_rank = [r[op] for r in results]
        summary[op] = {"python_host_us": max(per_rank)}
        line = f"{op:<22}" + "".join(f"{u:10.1f}" for u in per_rank) + f"{max(per_rank):10.1f}"
        if op in cpp:  # the C++ call's own host time (no allocations, no binding): the floor
            summary[op].update(cpp_host_us=cpp[op][0])
            line += f"{cpp[op][0]:10.1f}{max(per_rank) / cpp[op][0]:9.3f}"
        print(line)
    for op in ("host-empty-launch", "host-params-launch", "host-stream-bookkeeping"):  # the C++ call's pieces
        if op in cpp:
            print(f"{op:<22}" + " " * (10 * len(results) + 10) + f"{cpp[op][0]:10.1f}")
            summary[op] = {"cpp_host_us": cpp[op][0]}
    print("tensors read by the binding:", results[0]["reader"])
    if "ab" in results[0]:
        print(f"host us per call, variants interleaved in one process (median of {args.ab_rounds} rounds of 40 "
              "calls), rank 0:")
        ab = dict(results[0]["ab"])
        floors, direct_built = ab.pop("floors (dispatch)"), ab.pop("direct_alloc_built")
        for name, ops in ab.items():
            print(f"  {name:<18} ll-dispatch-fp8 {ops['dispatch']:6.1f}   ll-combine {ops['combine']:6.1f}")
        print("  pieces of the FP8 dispatch: " + ", ".join(f"{k} {v:.1f}" for k, v in floors.items()) +
              f" (_torch_ops with PyTorch's CUDA factory: {direct_built})")
        summary["host-ab"] = results[0]["ab"]
    print("rows received per rank (one FP8 dispatch):", [r["ll-recv-count"] for r in results])
    print("output tensors made by:", results[0]["alloc"])
    print(f"ll-*-send / ll-*-recv: hook mode, {HOOK_GAP_US:.0f} us of other GPU work between the halves; "
          f"ll-*-graph: per call, {args.ll_iters + (args.ll_iters & 1)} calls replayed from one CUDA graph; "
          f"ll-*-loop: per call, {args.ll_iters} eager calls back to back between two events (vs the C++ call); "
          "ll-*-host: host microseconds per eager call (perf_counter_ns around the call, no sync; C++: the "
          "C++ call alone, steady_clock); host-empty-launch: an empty kernel's launch from C++ (host-params-launch: "
          "with the dispatch's parameter bytes; host-stream-bookkeeping: the stream calls a call on the caller's "
          "stream makes); "
          "py/C++ > 1: Python slower")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=0, help="GPUs (default: every visible one)")
    parser.add_argument("--mode", choices=("normal", "low-latency", "all"), default="all")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--sms", type=int, default=24)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--ll-tokens", type=int, default=128, help="low-latency tokens per rank (= Tmax)")
    parser.add_argument("--ll-hidden", type=int, default=7168)
    parser.add_argument("--ll-topk", type=int, default=8)
    parser.add_argument("--ll-experts", type=int, default=288)
    parser.add_argument("--ll-iters", type=int, default=200)
    parser.add_argument("--ll-warmup", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before giving up on the ranks")
    parser.add_argument("--cpp-bench", default="", help="path of epcomm-bench to run first, for the ratio")
    parser.add_argument("--json", default="", help="also write the results as JSON to this file")
    parser.add_argument("--ab-rounds", type=int, default=15,
                        help="rounds of the interleaved host-time comparison of the host-path variants (0: off)")
    parser.add_argument("--no-tensor-reader", action="store_true",
                        help="read tensor arguments through Python calls even where epcomm._torch_ops is used")
    parser.add_argument("--profile-dir", default="", help="write a torch.profiler table of rank 0's LL calls here")
    args = parser.parse_args()
    num_ranks = args.ranks or torch.cuda.device_count()
    if num_ranks < 1:
        raise SystemExit("bench_python: no CUDA GPU")
    modes = ("normal", "low-latency") if args.mode == "all" else (args.mode,)

    cpp, device = {}, torch.cuda.get_device_name(0)
    if args.cpp_bench:
        for mode in modes:
            cpp[mode], device = run_cpp(args, num_ranks, mode)
    results = run_python(args, num_ranks)

    summary = {}
    if "normal" in modes:
        print_normal(args, num_ranks, device, results, cpp.get("normal", {}), summary)
    if "low-latency" in modes:
        print_low_latency(args, num_ranks, device, results, cpp.get("low-latency", {}), summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "ranks": num_ranks, "sms": args.sms, "ops": summary,
                       "per_rank": results}, f, indent=1)


if __name__ == "__main__":
    main()
