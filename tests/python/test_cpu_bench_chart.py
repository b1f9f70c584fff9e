"""tools/bench_chart.py (no GPU): the slowest rank's figure per (system, op, tokens, SMs) from
epcomm-bench --json files, and a PNG where matplotlib is installed."""

import json
import os
import random
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools"))

import bench_chart  # noqa: E402
from _runner import raises, run_tests, skip  # noqa: E402


def _run_json(tokens, rows):
    return {"device": "test device", "ranks": 4, "verified": True,
            "problem": f"normal: tokens {tokens}/rank, hidden 7168, top-8, 256 experts", "rows": rows}


def _files(tmp, seed):
    """Two runs (two token counts), each with 4 ranks x 2 SM counts x 2 systems, random figures; returns
    the paths and the expected slowest figure per (system, op) and (tokens, sms)."""
    rng = random.Random(seed)
    want, paths = {}, []
    for tokens in (128, 4096):
        rows = [{"system": "epcomm", "op": "layout", "rank": r, "sms": 0, "us": 12.0, "gbps": 0, "note": ""}
                for r in range(4)]
        for system in ("epcomm", "nccl-alltoall"):
            for sms in (8, 24):
                figures = [rng.uniform(50, 400) for _ in range(4)]
                want.setdefault((system, "dispatch-bf16"), {})[(tokens, sms)] = min(figures)
                rows += [{"system": system, "op": "dispatch-bf16", "rank": r, "sms": sms, "us": 100.0, "gbps": g,
                          "note": ""} for r, g in enumerate(figures)]
        path = os.path.join(tmp, f"run-{tokens}.json")
        with open(path, "w") as f:
            json.dump(_run_json(tokens, rows), f)
        paths.append(path)
    return paths, want


def test_chart_takes_the_slowest_rank_per_point():
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    with tempfile.TemporaryDirectory() as tmp:
        paths, want = _files(tmp, seed)
        series, devices = bench_chart.load(paths)
        assert devices == ["test device, 4 ranks"], devices
        assert dict(series) == want, f"seed {seed}: {dict(series)} != {want}"  # the layout (0 GB/s) is left out


def test_chart_refuses_a_problem_without_tokens():
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bad.json")
        with open(path, "w") as f:
            json.dump({"device": "d", "ranks": 1, "problem": "low-latency", "rows": []}, f)
        raises(SystemExit, lambda: bench_chart.load([path]), "names no token count")


def test_chart_writes_a_png():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        skip("matplotlib is not installed (Debian: python3-matplotlib)")
    with tempfile.TemporaryDirectory() as tmp:
        paths, _ = _files(tmp, 7)
        out = os.path.join(tmp, "chart.png")
        assert bench_chart.main(paths + ["-o", out]) == 0
        with open(out, "rb") as f:
            head = f.read(8)
        assert head == b"\x89PNG\r\n\x1a\n", head
        assert os.path.getsize(out) > 10000


if __name__ == "__main__":
    run_tests(globals())
