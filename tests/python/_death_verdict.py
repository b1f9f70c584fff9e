"""The parent side of test_process_death.py, without torch (so the CPU tests check it too): the
scenarios, where the ranks run and with what environment, the limits, the launch of one fresh
interpreter per rank (_death_worker.py) under a watchdog, and the verdict on what they reported.

A worker reports on stdout, one JSON object per line after DEATH_TAG (`emit` in _death_worker.py):
  ready, good (steps verified before the kill), killing (victim, just before its SIGKILL),
  detected (survivor: kind "mask" with the mask, or kind "error" with type / epcomm_timeout /
  message; wall clock and seconds since the kill), after (shrink: steps after the death, slowest
  step, mask at the end), teardown_start, teardown (destroy time, destroy error if any), fail.
The victim also writes the wall-clock time of its kill to a file just before it (the kill file):
the parent measures every survivor's detection from it.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, NamedTuple, Optional

DEATH_TAG = "[death] "
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_death_worker.py")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUIET_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
PLUGIN_NAME = "libnccl-net-epcomm-loopback.so"

# mode: "ll" (decode loop of low_latency_dispatch / combine), "normal" (get_dispatch_layout,
# dispatch, combine) or "construct" (the victim dies inside Buffer's constructor).
# kill_at, where the victim dies in step kill_step (after kill_step good, verified steps):
#   dispatch       before its dispatch of that step: the survivors wait for it inside theirs.
#   dispatch-sent  after the send half of its dispatch (return_recv_hook=True, synchronized),
#                  before the receive half: its tokens are out, it never takes its rows.
#   combine        after its whole dispatch and expert (synchronized), before its combine.
#   construct      right after the NCCL unique id went round (all_gather_object in Buffer's
#                  constructor): the others are in the rest of the constructor (NCCL init, ...).
# The victim sleeps VICTIM_SETTLE_S before dispatch-sent and combine kills, so that what it sent
# has left (a network proxy included) and the survivors' view of that step is its full dispatch.
SCENARIOS = {
    "ll-shrink-dispatch": dict(mode="ll", shrink=True, kill_at="dispatch"),
    "ll-shrink-dispatch-sent": dict(mode="ll", shrink=True, kill_at="dispatch-sent"),
    "ll-shrink-combine": dict(mode="ll", shrink=True, kill_at="combine"),
    "ll-timeout": dict(mode="ll", shrink=False, kill_at="dispatch"),
    "normal-timeout": dict(mode="normal", shrink=False, kill_at="dispatch"),
    "construct": dict(mode="construct", shrink=False, kill_at="construct"),
}
VICTIM_SETTLE_S = 0.5
GOOD_STEPS = 5  # verified steps before the kill

# A constructor's error is "clear" when it names the dead rank or says what happened to it (every
# epcomm message names the rank that raises it: that alone does not count).
_CLEAR_CONSTRUCT_CAUSE = (r"tim(ed |e)?out|abort|closed|exited|did not answer|did not finish|never joined|connection|"
                          r"unreachable|remote process")


class Plan(NamedTuple):
    ranks: int
    shared: bool  # every rank on GPU 0, each a fake NCCL node through the loopback plugin
    timeout_ms: int  # EPCOMM_TIMEOUT_MS of the workers
    after_steps: int  # shrink: steps after the death
    scenarios: tuple
    plugin: Optional[str]


class Limits(NamedTuple):
    detect_s: float  # kill -> a survivor's mask or TimeoutError
    construct_s: float  # kill -> a survivor's constructor error
    step_s: float  # shrink: the slowest step after the death (one that waited for the dead rank takes >= timeout)
    teardown_s: float  # teardown start -> process exit
    watchdog_s: float  # the whole scenario, start to the last exit


class RankResult(NamedTuple):
    returncode: Optional[int]  # None: still running at the watchdog, killed
    output: str
    exit_wall: Optional[float]  # wall clock when the parent saw it exit


def net_plugin(env: Dict[str, str]) -> Optional[str]:
    """The loopback net plugin: EPCOMM_TEST_NET_PLUGIN, else the one built in $EPCOMM_GPU_BUILD,
    build-gpu or build (tests/gin_loopback); None when there is none."""
    given = env.get("EPCOMM_TEST_NET_PLUGIN")
    if given:
        return os.path.abspath(given)
    builds = [env.get("EPCOMM_GPU_BUILD"), os.path.join(REPO, "build-gpu"), os.path.join(REPO, "build")]
    for build in builds:
        if build:
            path = os.path.join(os.path.abspath(build), "tests", "gin_loopback", PLUGIN_NAME)
            if os.path.isfile(path):
                return path
    return None


def make_plan(num_gpus: int, env: Dict[str, str]) -> Plan:
    """One rank per GPU with 2 or more (R = min(4, GPUs)); with one, 3 processes on GPU 0 as fake
    nodes (EPCOMM_TEST_RANKS overrides; more ranks than GPUs shares GPU 0 too). Processes that share
    a GPU take turns on it, so their timeout is longer (10 s: a live peer can be seconds late) and
    the shrink runs take 100 steps after the death instead of 1000 (EPCOMM_DEATH_STEPS)."""
    ranks = int(env.get("EPCOMM_TEST_RANKS") or (min(4, num_gpus) if num_gpus >= 2 else 3))
    shared = num_gpus < 2 or ranks > num_gpus
    # EPCOMM_TIMEOUT_MS, when set, replaces the tests' short timeouts (docs/testing.md).
    timeout_ms = int(env.get("EPCOMM_TIMEOUT_MS") or (10000 if shared else 4000))
    after_steps = int(env.get("EPCOMM_DEATH_STEPS") or (100 if shared else 1000))
    if env.get("EPCOMM_DEATH_SCENARIOS"):
        scenarios = tuple(s.strip() for s in env["EPCOMM_DEATH_SCENARIOS"].split(",") if s.strip())
    elif shared:  # dispatch-sent leaves the survivors where combine does; left out for time
        scenarios = tuple(s for s in SCENARIOS if s != "ll-shrink-dispatch-sent")
    else:
        scenarios = tuple(SCENARIOS)
    return Plan(ranks, shared, timeout_ms, after_steps, scenarios, net_plugin(env) if shared else None)


def make_limits(plan: Plan) -> Limits:
    t = plan.timeout_ms / 1000.0
    margin = 10.0 if plan.shared else 5.0
    startup = 120.0  # interpreters, torch, the process group, NCCL and the buffer, on a busy GPU
    per_step = 0.3 if plan.shared else 0.1
    return Limits(detect_s=t + margin, construct_s=3 * t + margin, step_s=t / 2, teardown_s=30.0,
                  watchdog_s=startup + 3 * t + margin + plan.after_steps * per_step + 30.0)


def rank_env(base: Dict[str, str], plan: Plan, scenario: str, rank: int, port: int) -> Dict[str, str]:
    env = dict(base, **QUIET_ENV)
    env.update(PYTHONUNBUFFERED="1", RANK=str(rank), WORLD_SIZE=str(plan.ranks), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), EPCOMM_TIMEOUT_MS=str(plan.timeout_ms),
               # Normal mode across nodes sizes its network region for this many tokens per rank
               # (_death_steps.normal_buffer); the tests send at most NORMAL_SHAPE's 128.
               EPCOMM_MAX_TOKENS_PER_RANK="128",
               # NCCL's communicator creation bounded too (by default NCCL waits for ever for a
               # rank that never joins): the "construct" scenario's survivors are inside it.
               EPCOMM_INIT_TIMEOUT_MS=str(plan.timeout_ms))
    if plan.shared:
        # Each process its own node to NCCL (NCCL_HOSTID), GIN between them through the test-only
        # loopback plugin (docs/design-internode.md), as epcomm_gin_tests and the peer-death test.
        env.update(NCCL_HOSTID=f"epcomm-death-{scenario}-node{rank}", NCCL_NET_PLUGIN=plan.plugin or "",
                   NCCL_NET="EpcommLoopback", NCCL_GIN_TYPE="2", EPCOMM_RANKS_PER_NODE="0")
        env.setdefault("NCCL_SOCKET_IFNAME", "lo")
        env.setdefault("EPCOMM_LOOPBACK_TIMEOUT_MS", "30000")  # the plugin's own waits (default 120 s)
        # A rank that closes with puts in flight has died: the plugin drops its puts and lets the
        # others go on, as a network's connections to other nodes do (by default a failure of all).
        env["EPCOMM_LOOPBACK_DEAD_PEERS"] = "1"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def victim_of(plan: Plan) -> int:
    return plan.ranks - 1  # never rank 0: it holds the torch store and NCCL's bootstrap root


def worker_config(plan: Plan, scenario: str, kill_file: str, seed: int) -> dict:
    spec = SCENARIOS[scenario]
    return dict(scenario=scenario, mode=spec["mode"], shrink=spec["shrink"], kill_at=spec["kill_at"],
                victim=victim_of(plan), kill_step=GOOD_STEPS, after_steps=plan.after_steps, kill_file=kill_file,
                shared=plan.shared, seed=seed, settle_s=VICTIM_SETTLE_S)


def run_scenario(plan: Plan, scenario: str, seed: int, limits: Limits, env: Optional[Dict[str, str]] = None):
    """Runs one scenario's ranks; returns ([RankResult per rank], wall clock of the kill or None)."""
    env = dict(os.environ if env is None else env)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="epcomm-death-") as tmp:
        kill_file = os.path.join(tmp, "kill_time")
        config = json.dumps(worker_config(plan, scenario, kill_file, seed))
        logs, procs = [], []
        # EPCOMM_DEATH_LOG_DIR keeps the ranks' logs (one folder per scenario); else they go with tmp.
        log_dir = os.path.join(env["EPCOMM_DEATH_LOG_DIR"], scenario) if env.get("EPCOMM_DEATH_LOG_DIR") else tmp
        os.makedirs(log_dir, exist_ok=True)
        for r in range(plan.ranks):
            log = open(os.path.join(log_dir, f"rank{r}.log"), "w+")
            logs.append(log)
            renv = rank_env(env, plan, scenario, r, port)
            renv["EPCOMM_DUMP_AFTER_S"] = str(max(limits.watchdog_s - 10.0, 1.0))  # stacks before the watchdog
            procs.append(subprocess.Popen([sys.executable, WORKER, config], env=renv, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        exit_wall = wait_all(procs, limits.watchdog_s, grace_s=limits.teardown_s + plan.timeout_ms / 1000.0,
                             victim=victim_of(plan))
        results = []
        for p, log, wall in zip(procs, logs, exit_wall):
            log.seek(0)
            results.append(RankResult(p.returncode if wall is not None else None, log.read(), wall))
            log.close()
        return results, read_kill_file(kill_file)


def wait_all(procs, watchdog_s: float, grace_s: float, victim: int) -> List[Optional[float]]:
    """Waits for every process, at most watchdog_s; once a survivor failed (non-zero status), the
    others get grace_s more. Kills what is left (SIGKILL, by pid). Returns each one's exit wall
    clock, None for those killed here."""
    deadline = time.monotonic() + watchdog_s
    exit_wall: List[Optional[float]] = [None] * len(procs)
    while time.monotonic() < deadline and any(w is None for w in exit_wall):
        for i, p in enumerate(procs):
            if exit_wall[i] is None and p.poll() is not None:
                exit_wall[i] = time.time()
                if i != victim and p.returncode != 0:
                    deadline = min(deadline, time.monotonic() + grace_s)
        time.sleep(0.05)
    for i, p in enumerate(procs):
        if exit_wall[i] is None:
            try:
                p.kill()
            except ProcessLookupError:
                pass
            p.wait()
    return exit_wall


def read_kill_file(path: str) -> Optional[float]:
    try:
        with open(path) as f:
            return float(f.read().strip())
    except (OSError, ValueError):
        return None


def events(output: str) -> List[dict]:
    """The worker's reports, in order (lines that are not reports, or do not parse, are skipped)."""
    found = []
    for line in output.splitlines():
        if line.startswith(DEATH_TAG):
            try:
                e = json.loads(line[len(DEATH_TAG):])
            except ValueError:
                continue
            if isinstance(e, dict) and "event" in e:
                found.append(e)
    return found


def _first(evs: List[dict], name: str) -> Optional[dict]:
    return next((e for e in evs if e["event"] == name), None)


def judge(scenario: str, victim: int, num_ranks: int, results: List[RankResult], kill_wall: Optional[float],
          limits: Limits, after_steps: int) -> List[str]:
    """Everything that went against the scenario's rules; empty when it passed."""
    spec = SCENARIOS[scenario]
    problems = []
    v = results[victim]
    if v.returncode != -signal.SIGKILL:
        state = "still running at the watchdog" if v.returncode is None else f"exit status {v.returncode}"
        problems.append(f"victim rank {victim}: {state}, want killed by SIGKILL")
    if kill_wall is None:
        problems.append(f"victim rank {victim} never reached its kill point (no kill file)")
    for r in range(num_ranks):
        if r != victim:
            problems += _judge_survivor(spec, r, victim, num_ranks, results[r], kill_wall, limits, after_steps)
    return problems


def _judge_survivor(spec, r, victim, num_ranks, res: RankResult, kill_wall, limits: Limits, after_steps) -> List[str]:
    problems = []
    if res.returncode is None:
        problems.append(f"rank {r}: hung (still running after the watchdog, killed)")
    elif res.returncode != 0:
        problems.append(f"rank {r}: exit status {res.returncode}")
    evs = events(res.output)
    problems += [f"rank {r}: {e.get('what', '?')}" for e in evs if e["event"] == "fail"]
    det = _first(evs, "detected")
    if det is None:
        problems.append(f"rank {r}: never reported the death of rank {victim}")
    else:
        if kill_wall is not None:
            elapsed = det["wall"] - kill_wall
            limit = limits.construct_s if spec["mode"] == "construct" else limits.detect_s
            if elapsed < 0:
                problems.append(f"rank {r}: {det['kind']} {-elapsed:.2f} s BEFORE the kill (a live rank was taken "
                                f"for dead)")
            elif elapsed > limit:
                problems.append(f"rank {r}: {det['kind']} {elapsed:.2f} s after the kill, more than {limit:.1f} s")
        problems += _judge_detection(spec, r, victim, num_ranks, det)
        if spec["shrink"]:
            problems += _judge_after(r, victim, num_ranks, _first(evs, "after"), limits, after_steps)
    start = _first(evs, "teardown_start")
    if start is None:
        problems.append(f"rank {r}: never started its teardown")
    elif res.exit_wall is not None and res.exit_wall - start["wall"] > limits.teardown_s:
        problems.append(f"rank {r}: teardown to exit took {res.exit_wall - start['wall']:.1f} s, more than "
                        f"{limits.teardown_s:.0f} s")
    return problems


def _dead_mask(num_ranks: int, victim: int) -> List[int]:
    return [1 if i == victim else 0 for i in range(num_ranks)]


def _judge_detection(spec, r, victim, num_ranks, det) -> List[str]:
    if spec["shrink"]:
        if det["kind"] != "mask":
            return [f"rank {r}: shrink mode, but the death gave {det['kind']} ({det.get('message', '')})"]
        if det.get("mask") != _dead_mask(num_ranks, victim):
            return [f"rank {r}: mask {det.get('mask')} after the death, want {_dead_mask(num_ranks, victim)}"]
        return []
    if det["kind"] != "error":
        return [f"rank {r}: want an error, got {det['kind']}"]
    message = det.get("message") or ""
    if spec["mode"] == "construct":
        if not re.search(rf"\b(peer|rank) {victim}\b|{_CLEAR_CONSTRUCT_CAUSE}", message, re.IGNORECASE):
            return [f"rank {r}: the constructor's {det.get('type')} does not say what happened: {message!r}"]
        return []
    found = []
    if not det.get("epcomm_timeout"):
        found.append(f"rank {r}: raised {det.get('type')}, want epcomm.TimeoutError: {message}")
    if not re.search(rf"\bpeer {victim}\b", message):
        found.append(f"rank {r}: the error does not name the dead rank as 'peer {victim}': {message}")
    return found


def _judge_after(r, victim, num_ranks, after, limits: Limits, after_steps) -> List[str]:
    if after is None:
        return [f"rank {r}: did not finish the {after_steps} steps after the death"]
    found = []
    if after.get("steps") != after_steps:
        found.append(f"rank {r}: ran {after.get('steps')} steps after the death, want {after_steps}")
    if after.get("max_step_s", 0.0) > limits.step_s:
        found.append(f"rank {r}: a step after the death took {after['max_step_s']:.2f} s (waited for the dead "
                     f"rank?), more than {limits.step_s:.1f} s")
    if after.get("mask") != _dead_mask(num_ranks, victim):
        found.append(f"rank {r}: mask {after.get('mask')} after the later steps, want {_dead_mask(num_ranks, victim)}")
    return found


def summary(scenario: str, victim: int, results: List[RankResult], kill_wall: Optional[float]) -> str:
    """One line per survivor: what it saw, when, its later steps and teardown."""
    lines = []
    for r, res in enumerate(results):
        if r == victim:
            lines.append(f"  rank {r} (victim): status {res.returncode}")
            continue
        evs = events(res.output)
        det, after, td = _first(evs, "detected"), _first(evs, "after"), _first(evs, "teardown")
        start = _first(evs, "teardown_start")
        parts = [f"  rank {r}: status {res.returncode}"]
        if det is not None:
            when = f"{det['wall'] - kill_wall:.2f} s after the kill" if kill_wall is not None else "(no kill time)"
            what = det.get("mask") if det["kind"] == "mask" else f"{det.get('type')}: {det.get('message', '')[:300]}"
            parts.append(f"{det['kind']} {when}: {what}")
        if after is not None:
            parts.append(f"{after.get('steps')} steps after it (slowest {after.get('max_step_s', 0):.3f} s, "
                         f"{after.get('total_s', 0):.1f} s in all)")
        if td is not None:
            parts.append(f"destroy {td.get('destroy_s', 0):.2f} s" +
                         (f" (raised {td['destroy_error']})" if td.get("destroy_error") else ""))
        if start is not None and res.exit_wall is not None:
            parts.append(f"exit {res.exit_wall - start['wall']:.1f} s after the teardown began")
        lines.append("; ".join(parts))
    return "\n".join(lines)


def tails(results: List[RankResult], chars: int = 4000) -> str:
    return "\n".join(f"----- rank {r} (status {res.returncode}) -----\n{res.output[-chars:]}"
                     for r, res in enumerate(results))
