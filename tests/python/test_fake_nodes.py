"""epcomm from Python across nodes, on one machine: fake nodes (processes with distinct NCCL_HOSTID)
joined by the test-only loopback net plugin with GIN (tests/gin_loopback), one process per rank, as
epcomm_gin_tests does in C++ (docs/design-internode.md, "Testing across processes").

Layouts NxP (N nodes of P ranks): 2x1 and 4x1 (all on GPU 0 with one GPU: their kernels time-slice,
so every call is slow), 2x2 with 4 GPUs or more (a node's two ranks on two GPUs). Each rank
(_fake_nodes_worker.py) runs `import epcomm as deep_ep`, a gloo process group, Buffers sized by the
hints, then get_dispatch_layout (num_tokens_per_rdma_rank per node), normal dispatch / combine /
cached dispatch (BF16, FP8 with scales, without top-k, num_worst_tokens) and low-latency dispatch /
combine with hooks (BF16, FP8), every output against the torch reference on fresh random inputs;
then it tears down and exits, and must exit 0 with no CUDA noise (_exit_check's rule). A watchdog
kills ranks that hang and prints each failed rank's last output.

    PYTHONPATH=python python3 -m pytest -rs tests/python/test_fake_nodes.py
    PYTHONPATH=python python3 tests/python/test_fake_nodes.py [2x1 4x1 ...]   (own runner, or one layout each)

The plugin: EPCOMM_TEST_NET_PLUGIN, else build-gpu/ then build/ tests/gin_loopback/
libnccl-net-epcomm-loopback.so; without it "skipped (no loopback plugin)", without a GPU "skipped
(no GPU)". EPCOMM_TEST_SEED fixes the inputs (the seed is printed), EPCOMM_FAKE_CASES=bf16,ll-fp8-hook
picks cases (_fake_nodes_worker.CASES), EPCOMM_FAKE_NODES_TIMEOUT is the watchdog per layout
(seconds, default 300), EPCOMM_FAKE_NODES_LOG_DIR keeps the ranks' logs (default: a temporary
directory, printed), EPCOMM_TIMEOUT_MS the ranks' GPU waits (default 30000 here).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _fake_nodes  # noqa: E402
import _runner  # noqa: E402
from _cluster import case_seed, free_port  # noqa: E402
from _exit_check import DONE_LINE, noise_lines  # noqa: E402
from _runner import run_tests, skip  # noqa: E402


def _visible_gpus():
    """Visible GPUs, or a reason to skip (no torch, no GPU)."""
    try:
        import torch
    except ImportError:
        return 0, "skipped (no GPU): PyTorch is not installed"
    try:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 -- no driver
        n = 0
    return n, None if n else "skipped (no GPU)"


def run_fake_nodes(layout: str) -> None:
    """Runs one layout; skips where it cannot run, raises AssertionError naming every failed rank."""
    gpus, reason = _visible_gpus()
    if reason:
        skip(reason)
    nodes, per_node = _fake_nodes.parse_layout(layout)
    if layout == "2x2" and gpus < 4:
        skip(f"skipped (layout 2x2 runs with 4 GPUs or more; {gpus} visible)")
    if per_node > gpus:
        skip(f"skipped (layout {layout}: a node's {per_node} ranks need {per_node} GPUs; {gpus} visible)")
    plugin, looked = _fake_nodes.find_plugin()
    if plugin is None:
        skip(f"skipped (no loopback plugin): none of {looked} (EPCOMM_TEST_NET_PLUGIN; built by "
             f"EPCOMM_CHECK_STEPS=build scripts/gpu-check.sh)")
    seed = case_seed()
    timeout = float(os.environ.get("EPCOMM_FAKE_NODES_TIMEOUT", "300"))
    print(f"[fake-nodes] layout {layout}: {nodes} nodes x {per_node} rank(s), {gpus} GPU(s), seed {seed} "
          f"(EPCOMM_TEST_SEED), plugin {plugin}, watchdog {timeout:.0f} s", file=sys.__stderr__, flush=True)
    start = time.monotonic()
    runs, fired, logs = _fake_nodes.run_layout(layout, gpus, plugin, seed, free_port(), timeout)
    found = _fake_nodes.problems(runs, DONE_LINE, noise_lines)
    verdict = "FAILED" if found else "passed"
    print(f"[fake-nodes] layout {layout}: {verdict} in {time.monotonic() - start:.1f} s"
          f"{' (watchdog fired)' if fired else ''}; logs in {logs}\n{_fake_nodes.summary(runs)}",
          file=sys.__stderr__, flush=True)
    assert not found, f"layout {layout} (seed {seed}; logs in {logs}):\n" + "\n".join(found)


def test_two_nodes_of_one_rank():
    run_fake_nodes("2x1")


def test_four_nodes_of_one_rank():
    run_fake_nodes("4x1")


def test_two_nodes_of_two_ranks():
    run_fake_nodes("2x2")


def test_watchdog_kills_a_hung_rank_and_shows_its_output():
    """CPU: the launcher on a stand-in worker (rank 0 exits 0, rank 1 fails, rank 2 hangs): the hung
    rank is killed once the grace period after the failure ends, and each problem names its rank and
    shows its last output."""
    stand_in = ("import os, sys, time; r = int(os.environ['RANK']); print(f'rank {r} node ' + "
                "os.environ['EPCOMM_FAKE_NODE'] + ' ' + os.environ['NCCL_HOSTID'], flush=True); "
                "print('x: every call matched the reference' if r == 0 else f'x: case c{r}: FAIL', flush=True); "
                "time.sleep(600 if r == 2 else 0); sys.exit(3 if r == 1 else 0)")
    start = time.monotonic()
    runs, fired, _ = _fake_nodes.run_layout("3x1", 0, "/nonexistent/plugin.so", 1, 1, timeout=60.0, grace=1.0,
                                            worker=[sys.executable, "-c", stand_in])
    took = time.monotonic() - start
    assert fired and took < 30, f"watchdog fired {fired} after {took:.1f} s"
    assert [(r.status, r.killed) for r in runs] == [(0, False), (3, False), (None, True)], \
        [(r.status, r.killed) for r in runs]
    found = _fake_nodes.problems(runs, DONE_LINE, noise_lines)
    assert len(found) == 2, found
    assert found[0].startswith("--- rank 1 (node 1, GPU 0): exit status 3") and "case c1: FAIL" in found[0], found[0]
    assert found[1].startswith("--- rank 2 (node 2, GPU 0): hung") and "epcomm-py-3x1-node2" in found[1], found[1]


if __name__ == "__main__":
    _runner.pytest = None  # a script: SKIP lines from _runner, not pytest's Skipped exception
    layouts = [a for a in sys.argv[1:] if "x" in a]
    if layouts:
        failed = 0
        for layout in layouts:
            failed += _runner._run({layout: lambda layout=layout: run_fake_nodes(layout)}, [layout], "layout ")
        sys.exit(1 if failed else 0)
    run_tests(globals())
