"""Host time of epcomm's Python layer per public call, on the CPU, without a GPU: every call of
epcomm.Buffer over a core that takes the same arguments and does nothing (_cpu_stand_ins.NullRuntime),
with CPU tensors, so what is timed is the Python layer's own work (argument checks, output
allocations, handles, the EventOverlap) and not the binding, the C++ checks or the launch.

Prints, per call, microseconds per call (best and median of --repeats rounds of --calls calls,
time.perf_counter_ns) and the torch operations the call makes (allocations and views, counted with
a TorchDispatchMode): on a GPU host each allocation costs more than on the CPU (the caching
allocator; run 51: ~6.4 us per torch.empty through Python on an H200 host, ~2.7 us per view op), so
the count says more than the CPU time about those. The baseline rows time bare torch.empty calls and
the binding's tensor conversion (to_view, through _epcomm.describe_view) on this host.

Shapes are the standard problems' scaled down (hidden 256, not 7168) so that the CPU allocator does
not hand out fresh pages per call; the Python layer's work does not depend on them. torch without
float8_e4m3fn (before 2.1) gets uint8 in its place (same element size).

    PYTHONPATH=python python3 tests/python/bench_host_cpu.py [--calls 20000] [--profile ll-dispatch-fp8]
"""

import argparse
import cProfile
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _cpu_stand_ins import NullRuntime, fake_buffer, torch  # noqa: E402

from epcomm import _epcomm  # noqa: E402

if torch is None:
    sys.exit("bench_host_cpu.py needs PyTorch (the CPU build is enough)")
if not hasattr(torch, "float8_e4m3fn"):
    torch.float8_e4m3fn = torch.uint8  # a stand-in of the same size, for timing only


def calls(args):
    """name -> a function making one call, over one fake buffer per mode."""
    R, K, H, cpu = 4, 8, args.hidden, torch.device("cpu")
    tmax, E = 128, 16
    ll = fake_buffer(NullRuntime(), num_ranks=R, device=cpu)
    x = torch.zeros(tmax, H, dtype=torch.bfloat16)
    topk = torch.zeros(tmax, K, dtype=torch.int64)
    weights = torch.zeros(tmax, K, dtype=torch.float32)
    handle = ll.low_latency_dispatch(x, topk, tmax, E, use_fp8=False)[2]
    y = torch.zeros(E // R, R * tmax, H, dtype=torch.bfloat16)

    T, rows = 256, 256
    nm = fake_buffer(NullRuntime(rows=rows, num_experts=E), num_ranks=R, device=cpu)
    nx = torch.zeros(T, H, dtype=torch.bfloat16)
    nx8, scales = torch.zeros(T, H, dtype=torch.float8_e4m3fn), torch.zeros(T, H // 128, dtype=torch.float32)
    ntopk, nweights = torch.zeros(T, K, dtype=torch.int64), torch.zeros(T, K, dtype=torch.float32)
    layout = dict(num_tokens_per_rank=torch.zeros(R, dtype=torch.int32),
                  is_token_in_rank=torch.zeros(T, R, dtype=torch.bool),
                  num_tokens_per_expert=torch.zeros(E, dtype=torch.int32))
    recv, _, recv_w, _, nhandle, _ = nm.dispatch(nx, topk_idx=ntopk, topk_weights=nweights, **layout)
    nm.dispatch(nx, topk_idx=ntopk, topk_weights=nweights, **layout)  # now the receive rows are reserved
    recv = torch.zeros(rows, H, dtype=torch.bfloat16)
    return {
        "ll-dispatch-fp8": lambda: ll.low_latency_dispatch(x, topk, tmax, E),
        "ll-dispatch-fp8-hook": lambda: ll.low_latency_dispatch(x, topk, tmax, E, return_recv_hook=True),
        "ll-dispatch-bf16": lambda: ll.low_latency_dispatch(x, topk, tmax, E, use_fp8=False),
        "ll-dispatch-ue8m0": lambda: ll.low_latency_dispatch(x, topk, tmax, E, round_scale=True, use_ue8m0=True),
        "ll-combine": lambda: ll.low_latency_combine(y, topk, weights, handle),
        "ll-combine-hook": lambda: ll.low_latency_combine(y, topk, weights, handle, return_recv_hook=True),
        "get-dispatch-layout": lambda: nm.get_dispatch_layout(ntopk, E),
        "dispatch-bf16": lambda: nm.dispatch(nx, topk_idx=ntopk, topk_weights=nweights, **layout),
        "dispatch-fp8": lambda: nm.dispatch((nx8, scales), topk_idx=ntopk, topk_weights=nweights, **layout),
        "cached-dispatch": lambda: nm.dispatch(nx, handle=nhandle),
        "combine": lambda: nm.combine(recv, nhandle, topk_weights=recv_w),
    }


def baselines(args):
    """Costs on this host that the Python layer's calls are made of."""
    H, R, tmax, EL = args.hidden, 4, 128, 4
    t = torch.zeros(tmax, H, dtype=torch.bfloat16)
    return {
        "base: torch.empty x1 (recv_x)":
            lambda: torch.empty((EL, R * tmax, H), dtype=torch.bfloat16, device=torch.device("cpu")),
        "base: torch.empty x1 ([4] int32)": lambda: torch.empty((EL,), dtype=torch.int32, device=torch.device("cpu")),
        "base: .transpose(1, 2) x1": lambda: t.view(1, tmax, H).transpose(1, 2),
        "base: to_view x1 (describe_view)": lambda: _epcomm.describe_view(t),
    }


class _OpCounter:
    """Counts the aten operations a call makes (torch.empty -> aten.empty.memory_format, ...)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counts = self.counts = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func.overloadpacket.__name__)
                counts[name] = counts.get(name, 0) + 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode

    def __call__(self, fn):
        self.counts.clear()
        try:
            with self.mode():
                fn()
        except Exception as e:  # noqa: BLE001 -- a torch too old for the mode: no counts
            return f"({type(e).__name__})"
        return " ".join(f"{n}x{c}" for n, c in sorted(self.counts.items()))


def time_us(fn, n, repeats):
    for _ in range(min(n, 2000)):
        fn()
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter_ns() - start) / n / 1e3)
    rounds.sort()
    return rounds[0], rounds[len(rounds) // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=20000, help="calls per round")
    p.add_argument("--repeats", type=int, default=7, help="rounds (best and median reported)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--only", default="", help="comma-separated call names")
    p.add_argument("--profile", default="", help="cProfile this call and print the top functions")
    args = p.parse_args()
    table = calls(args)
    if args.profile:
        fn = table[args.profile]
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            fn()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return
    count = _OpCounter()
    only = set(filter(None, args.only.split(",")))
    print(f"torch {torch.__version__}, Python {sys.version.split()[0]}, {args.calls} calls x {args.repeats} rounds")
    print(f"| {'call':34} | best us | median us | torch ops per call |")
    print(f"| {'-' * 34} | ---: | ---: | --- |")
    for name, fn in list(table.items()) + list(baselines(args).items()):
        if only and name not in only:
            continue
        best, median = time_us(fn, args.calls, args.repeats)
        ops = count(fn) if not name.startswith("base:") else ""
        print(f"| {name:34} | {best:.2f} | {median:.2f} | {ops} |")


if __name__ == "__main__":
    main()
