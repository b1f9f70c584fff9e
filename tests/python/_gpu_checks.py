"""What every GPU case shares (_gpu_normal.py, _gpu_low_latency.py, _client_cases.py): per-phase
timing (_cluster reports it), the Checks that collect every mismatch of a rank before raising,
the all-gather of a rank's tensors, generators for the random inputs, argument-error checks and
CUDA graph capture. All collectives come before the first assertion, so a failing rank never
leaves the others waiting."""

import functools
import time

import torch
import torch.distributed as dist

import _reference as ref

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
