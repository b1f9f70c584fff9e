"""Python-level bandwidth of epcomm's normal mode, as a DeepEP user sees it (tensors allocated per
call, the caller's stream, the host waiting for the counts), on the standard problem of SPEC.md
section 7: 4096 tokens per rank, hidden 7168, top-8, 256 experts, uniform routing. One process
per GPU. Times each call with CUDA events on the caller's stream (median of --iters after
--warmup) and counts logical bytes: rows received by the rank x bytes per row (BF16 2*hidden,
FP8 hidden + 4*hidden/128; combine and cached dispatch at BF16). Prints GB/s per rank and the
minimum over ranks, the figure that counts.

With --cpp-bench PATH it first runs the C++ epcomm-bench on the same problem (same SMs, same
iterations, no NCCL baseline) and prints the Python/C++ ratio per operation.

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

import torch
import torch.distributed as dist

OPS = ("dispatch-bf16", "dispatch-fp8", "cached-dispatch-bf16", "combine")


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


def _worker(rank, num_ranks, port, args, results):
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    import epcomm

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=num_ranks)
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
    out = {"rank": rank, "rows": rows}
    ops = {
        "dispatch-bf16": (lambda: dispatch(x), 2 * H),
        "dispatch-fp8": (lambda: dispatch((x8, scales)), fp8_row),
        "cached-dispatch-bf16": (lambda: buffer.dispatch(x, handle=handle, config=dcfg), 2 * H),
        "combine": (lambda: buffer.combine(recv_x, handle, topk_weights=recv_w, config=ccfg), 2 * H),
    }
    for op, (fn, row_bytes) in ops.items():
        us = median_us(fn, args.warmup, args.iters)
        out[op] = (us, rows * row_bytes / us / 1e3)
    results.put(out)
    torch.cuda.synchronize()
    buffer.destroy()
    dist.destroy_process_group()


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


def run_cpp(args, num_ranks):
    """{op: (max us, min GB/s)} over ranks from epcomm-bench's JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.json")
        cmd = [args.cpp_bench, "--mode", "normal", "--ranks", str(num_ranks), "--tokens", str(args.tokens),
               "--hidden", str(args.hidden), "--topk", str(args.topk), "--experts", str(args.experts),
               "--sms", str(args.sms), "--iters", str(args.iters), "--warmup", str(args.warmup), "--no-baseline",
               "--json", path]
        print("C++:", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0:
            print(proc.stdout[-4000:], proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"epcomm-bench failed with code {proc.returncode}")
        with open(path) as f:
            report = json.load(f)
    summary = {}
    for row in report["rows"]:
        if row["system"] != "epcomm" or row["op"] not in OPS or row["sms"] != args.sms:
            continue
        us, gbps = summary.get(row["op"], (0.0, float("inf")))
        summary[row["op"]] = (max(us, row["us"]), min(gbps, row["gbps"]))
    return summary, report.get("device", "?")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=0, help="GPUs (default: every visible one)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--sms", type=int, default=24)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before giving up on the ranks")
    parser.add_argument("--cpp-bench", default="", help="path of epcomm-bench to run first, for the ratio")
    parser.add_argument("--json", default="", help="also write the results as JSON to this file")
    args = parser.parse_args()
    num_ranks = args.ranks or torch.cuda.device_count()
    if num_ranks < 1:
        raise SystemExit("bench_python: no CUDA GPU")

    cpp, device = ({}, torch.cuda.get_device_name(0))
    if args.cpp_bench:
        cpp, device = run_cpp(args, num_ranks)
    results = run_python(args, num_ranks)

    print(f"\n{num_ranks} x {device} | {args.sms} SMs | tokens {args.tokens}/rank, hidden {args.hidden}, "
          f"top-{args.topk}, {args.experts} experts | median of {args.iters}")
    print(f"{'op':<22}" + "".join(f"{'rank ' + str(r['rank']):>16}" for r in results) + f"{'min GB/s':>12}"
          + (f"{'C++ GB/s':>12}{'py/C++':>9}" if cpp else ""))
    summary = {}
    for op in OPS:
        per_rank = [r[op] for r in results]
        worst = min(g for _, g in per_rank)
        summary[op] = {"python_gbps": worst, "python_us": max(u for u, _ in per_rank)}
        line = f"{op:<22}" + "".join(f"{u:8.1f}us {g:6.1f}" for u, g in per_rank) + f"{worst:12.1f}"
        if op in cpp:
            ratio = worst / cpp[op][1]
            summary[op].update(cpp_gbps=cpp[op][1], ratio=ratio)
            line += f"{cpp[op][1]:12.1f}{ratio:9.3f}" + ("" if ratio >= 0.95 else "  < 0.95")
        print(line)
    print("rows received per rank:", [r["rows"] for r in results])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "ranks": num_ranks, "sms": args.sms, "ops": summary,
                       "per_rank": results}, f, indent=1)


if __name__ == "__main__":
    main()
