"""The launcher of test_fake_nodes.py: one fresh interpreter per rank (_fake_nodes_worker.py), each
in the environment of its fake node, watched until it exits; no torch here (the CPU tests run the
watchdog on a stand-in worker).

A layout "NxP" is N fake nodes of P ranks. NCCL takes processes with distinct NCCL_HOSTID values for
different hosts, and the test-only loopback net plugin (tests/gin_loopback, built beside the C++
tests) carries NCCL's traffic and GIN puts between them, so epcomm's Buffer reaches the ranks of
other nodes through NCCL GIN, as across real machines (docs/design-internode.md). The ranks of one
node share a NCCL_HOSTID and sit on distinct GPUs; where the machine has fewer GPUs than ranks,
rank l of every node is on GPU l (fake nodes then share GPUs: their kernels time-slice, slowly).
"""

import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
WORKER = os.path.join(HERE, "_fake_nodes_worker.py")
PLUGIN_NAME = "libnccl-net-epcomm-loopback.so"
# Where the build puts the plugin: scripts/gpu-check.sh's build first, then a local build.
PLUGIN_DEFAULTS = [os.path.join(REPO, d, "tests", "gin_loopback", PLUGIN_NAME) for d in ("build-gpu", "build")]
# Every case's tokens per rank (at most): the buffers' EPCOMM_MAX_TOKENS_PER_RANK, which sizes the
# internode region (epcomm's default, 65536, needs far more than the DeepEP-style rdma hint gives).
MAX_TOKENS = 128


def find_plugin() -> Tuple[Optional[str], List[str]]:
    """(absolute path of the loopback plugin, or None; the paths looked at): EPCOMM_TEST_NET_PLUGIN
    if set, else build-gpu/ then build/."""
    given = os.environ.get("EPCOMM_TEST_NET_PLUGIN")
    candidates = [given] if given else PLUGIN_DEFAULTS
    for path in candidates:
        if os.path.isfile(path):
            return os.path.abspath(path), candidates
    return None, candidates


def parse_layout(layout: str) -> Tuple[int, int]:
    """"NxP" -> (N nodes, P ranks per node); ValueError for anything else."""
    try:
        nodes, per_node = (int(v) for v in layout.lower().split("x"))
    except ValueError:
        raise ValueError(f"layout '{layout}': want NxP, e.g. 2x1") from None
    if nodes < 2 or per_node < 1:
        raise ValueError(f"layout '{layout}': want at least 2 nodes and 1 rank per node")
    return nodes, per_node


def gpu_of(rank: int, per_node: int, num_ranks: int, gpus: int) -> int:
    """Rank -> GPU: its own GPU where there are enough, else its place in its node (as
    epcomm_gin_tests places them)."""
    return rank if gpus >= num_ranks else rank % per_node


def rank_env(layout: str, rank: int, per_node: int, num_ranks: int, gpu: int, port: int, plugin: str,
             seed: int) -> Dict[str, str]:
    """The environment of one rank: its fake node's NCCL_HOSTID, the plugin with GIN, and the
    settings every epcomm GPU run has (no NVLink multicast); the rest comes from the parent."""
    node = rank // per_node
    env = dict(os.environ)
    env.update({
        "RANK": str(rank), "WORLD_SIZE": str(num_ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "EPCOMM_FAKE_NODE": str(node), "EPCOMM_FAKE_RANKS_PER_NODE": str(per_node), "EPCOMM_FAKE_GPU": str(gpu),
        "EPCOMM_TEST_SEED": str(seed),
        "NCCL_HOSTID": f"epcomm-py-{layout}-node{node}",
        "NCCL_NET_PLUGIN": plugin, "NCCL_NET": "EpcommLoopback", "NCCL_GIN_TYPE": "2",
        "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
        # The node is what NCCL says (its load/store domain: this node's ranks), never a split of it.
        "EPCOMM_RANKS_PER_NODE": "0",
        "EPCOMM_MAX_TOKENS_PER_RANK": str(MAX_TOKENS),
        "PYTHONUNBUFFERED": "1",
    })
    # Fake nodes that share a GPU take turns on it: a live peer can be seconds late.
    env.setdefault("EPCOMM_TIMEOUT_MS", "30000")
    # epcomm from where this process would import it (the tests run with PYTHONPATH=python).
    python_dir = os.path.join(REPO, "python")
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if python_dir not in parts:
        env["PYTHONPATH"] = os.pathsep.join(parts + [python_dir])
    return env


class RankRun:
    """One rank's process and what became of it."""

    def __init__(self, rank: int, node: int, gpu: int, log_path: str):
        self.rank, self.node, self.gpu, self.log_path = rank, node, gpu, log_path
        self.proc: Optional[subprocess.Popen] = None
        self.status: Optional[int] = None  # exit status; None while running or when killed
        self.killed = False
        self.seconds = 0.0

    @property
    def name(self) -> str:
        return f"rank {self.rank} (node {self.node}, GPU {self.gpu})"

    def output(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError as e:
            return f"(no log: {e})"


def _kill(run: RankRun) -> None:
    """SIGKILL to the rank's process group (it runs in a session of its own)."""
    try:
        os.killpg(run.proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    run.proc.wait()


def watch(commands: List[Tuple[RankRun, List[str], Dict[str, str]]], timeout: float, grace: float) -> bool:
    """Starts every command (output to its log) and waits: until all exit, `timeout` seconds in all,
    or `grace` seconds after the first that failed (its peers may wait for it forever). Kills what
    is still running then. Returns whether the watchdog fired."""
    start = time.monotonic()
    runs = [run for run, _, _ in commands]
    try:
        for run, argv, env in commands:
            with open(run.log_path, "w") as log:
                run.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = start + timeout
        while True:
            running = 0
            for run in runs:
                if run.status is not None or run.killed:
                    continue
                rc = run.proc.poll()
                if rc is None:
                    running += 1
                    continue
                run.status, run.seconds = rc, time.monotonic() - start
                if rc != 0:
                    deadline = min(deadline, time.monotonic() + grace)
            if running == 0:
                return False
            if time.monotonic() >= deadline:
                for run in runs:
                    if run.status is None and not run.killed:
                        run.killed, run.seconds = True, time.monotonic() - start
                        _kill(run)
                return True
            time.sleep(0.1)
    finally:  # an exception or Ctrl-C here must not leave ranks running
        for run in runs:
            if run.proc is not None and run.proc.poll() is None:
                run.killed = True
                _kill(run)


def log_dir(layout: str) -> str:
    """EPCOMM_FAKE_NODES_LOG_DIR/<layout> (scripts/gpu-check.sh keeps them under $OUT), else a new
    temporary directory."""
    root = os.environ.get("EPCOMM_FAKE_NODES_LOG_DIR")
    if not root:
        return tempfile.mkdtemp(prefix=f"epcomm-fake-nodes-{layout}-")
    path = os.path.join(root, layout)
    os.makedirs(path, exist_ok=True)
    return path


def run_layout(layout: str, gpus: int, plugin: str, seed: int, port: int, timeout: float, grace: float = 60.0,
               worker: Optional[List[str]] = None) -> Tuple[List[RankRun], bool, str]:
    """Runs one rank per process over the layout's fake nodes; returns (runs, whether the watchdog
    fired, the log directory). `worker` replaces the command (the CPU test's stand-in)."""
    nodes, per_node = parse_layout(layout)
    R = nodes * per_node
    where = log_dir(layout)
    commands = []
    for r in range(R):
        gpu = gpu_of(r, per_node, R, gpus)
        run = RankRun(r, r // per_node, gpu, os.path.join(where, f"rank{r}.log"))
        commands.append((run, worker or [sys.executable, WORKER],
                         rank_env(layout, r, per_node, R, gpu, port, plugin, seed)))
    for _, _, env in commands:  # stacks in the logs before the watchdog fires
        env["EPCOMM_DUMP_AFTER_S"] = str(max(timeout - 15.0, 1.0))
    fired = watch(commands, timeout, grace)
    return [run for run, _, _ in commands], fired, where


def problems(runs: List[RankRun], done_line: str, noise_lines) -> List[str]:
    """One paragraph per rank that did not pass: its status, the cases it reported failing (lines
    with 'FAIL' / 'ERROR'), the teardown noise it printed (noise_lines: _exit_check's rule), and the
    last part of its output."""
    found = []
    for run in runs:
        out = run.output()
        noise = noise_lines(out)
        if run.status == 0 and not noise and done_line in out:
            continue
        if run.killed:
            how = f"hung: still running after {run.seconds:.0f} s, killed by the watchdog"
        elif run.status is not None and run.status < 0:
            how = f"died of signal {-run.status}"
        elif run.status == 0:
            how = "exit status 0" + ("" if done_line in out else f" without '{done_line}'")
        else:
            how = f"exit status {run.status}"
        failed = [line for line in out.splitlines() if ": FAIL" in line or ": ERROR" in line]
        found.append(f"--- {run.name}: {how}" + (f"; noise {noise}" if noise else "") + "\n" +
                     "".join(f"  {line}\n" for line in failed) +
                     f"--- last output of {run.name} ({run.log_path}):\n{out[-4000:]}")
    return found


def summary(runs: List[RankRun]) -> str:
    """One line per rank: status, time, and the case lines it printed ('... case NAME: ok (s)')."""
    lines = []
    for run in runs:
        status = "killed" if run.killed else f"exit {run.status}"
        cases = [line.split(": case ", 1)[1] for line in run.output().splitlines() if ": case " in line]
        lines.append(f"  {run.name}: {status} after {run.seconds:.1f} s; " + ", ".join(cases))
    return "\n".join(lines)
