"""A rank's process killed with SIGKILL (issue 22 item 1): the others must not hang.

One fresh interpreter per rank (_death_worker.py, `import epcomm`, a gloo torch.distributed group;
epcomm makes its own NCCL communicator). After a few verified steps the last rank kills itself
(it writes the wall clock of the kill to a file just before; every survivor reports how long after
it its error or mask came). Scenarios (_death_verdict.SCENARIOS):

  ll-shrink-*     low-latency decode loop with enable_shrink=True, the victim dying before its
                  dispatch, after its dispatch's send half, or between dispatch and combine: every
                  survivor's step ends within the timeout plus a margin with the live ranks'
                  outputs (against the reference), its mask names the dead rank and nothing else,
                  then it runs EPCOMM_DEATH_STEPS more steps (1000; 100 on one GPU), none waiting
                  for the dead rank, each checked.
  ll-timeout      the same without shrink mode, and
  normal-timeout  normal mode (layout, dispatch, combine): every survivor gets epcomm.TimeoutError
                  naming 'peer <dead rank>' within the timeout plus a margin.
  construct       the victim dies inside Buffer's constructor, right after the NCCL unique id went
                  round: the others' constructor raises an error that says what happened.
Every survivor then tears down (destroy(), destroy_process_group()) and exits 0 within 30 s; the
victim must have died by SIGKILL. A watchdog kills whatever still runs and the failure shows every
rank's output.

Placement: one rank per GPU with 2 or more GPUs (R = min(4, GPUs), EPCOMM_TIMEOUT_MS 4 s). With one
GPU, 3 processes on GPU 0, each a fake NCCL node (NCCL_HOSTID) reaching the others through the
test-only loopback net plugin (NCCL_NET_PLUGIN from EPCOMM_TEST_NET_PLUGIN, else
build-gpu/tests/gin_loopback/libnccl-net-epcomm-loopback.so); their kernels take turns on the GPU,
so the timeout is 10 s, the shrink runs take 100 steps after the death, and ll-shrink-dispatch-sent
is left out. Knobs: EPCOMM_TEST_RANKS, EPCOMM_TIMEOUT_MS, EPCOMM_DEATH_STEPS, EPCOMM_DEATH_SCENARIOS
(comma-separated), EPCOMM_DEATH_RUNS (runs of each scenario, default 1), EPCOMM_TEST_SEED,
EPCOMM_DEATH_LOG_DIR (keeps the ranks' logs).

    PYTHONPATH=python python -m pytest -rs -s tests/python/test_process_death.py

Without a GPU (or PyTorch) the GPU test is skipped; the test_verdict_* tests check the parent's
rules on made-up reports and run anywhere (also as `python3 tests/python/test_process_death.py`).
"""

import json
import os
import random
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _death_verdict as dv  # noqa: E402
from _cluster import visible_gpus  # noqa: E402
from _runner import run_tests, skip  # noqa: E402

try:
    import pytest
except ImportError:
    pytest = None

try:
    import torch
except ImportError:
    torch = None


def _death_test(fn):
    """pytest: one test per scenario (a parametrized argument may not have a default). The runner
    without pytest calls runner_call: every planned scenario in turn."""
    def test_gpu_process_death(scenario):
        fn(scenario)

    test_gpu_process_death.__doc__ = fn.__doc__
    test_gpu_process_death.runner_call = fn
    if pytest is None:
        return test_gpu_process_death
    return pytest.mark.parametrize("scenario", list(dv.SCENARIOS))(test_gpu_process_death)


@_death_test
def test_gpu_process_death(scenario=None):
    """One scenario (pytest), or every planned one in turn (the runner without pytest)."""
    if torch is None:
        skip("PyTorch is not installed")
    gpus = visible_gpus()
    if gpus == 0:
        skip("skipped (no GPU)")
    plan = dv.make_plan(gpus, dict(os.environ))
    if plan.ranks < 2:
        skip(f"a death needs 2 ranks or more (EPCOMM_TEST_RANKS = {plan.ranks})")
    if plan.shared and (plan.plugin is None or not os.path.isfile(plan.plugin)):
        skip(f"one GPU: the fake nodes need the loopback net plugin (tests/gin_loopback), not found "
             f"({plan.plugin or 'EPCOMM_TEST_NET_PLUGIN unset, none in build-gpu or build'})")
    todo = plan.scenarios if scenario is None else [scenario]
    if scenario is not None and scenario not in plan.scenarios:
        skip(f"{scenario}: not in this machine's plan {list(plan.scenarios)} (EPCOMM_DEATH_SCENARIOS)")
    runs = int(os.environ.get("EPCOMM_DEATH_RUNS") or 1)  # the issue asks for three of each on the GPU machines
    failures = []
    for name in todo:
        for run in range(runs):
            failures += _run_one(plan, name, run, runs)
    assert not failures, "\n".join(failures)


def _run_one(plan, scenario, run=0, runs=1):
    limits = dv.make_limits(plan)
    seed = int(os.environ.get("EPCOMM_TEST_SEED") or random.randrange(1 << 30)) + run
    victim = dv.victim_of(plan)
    where = "GPU 0, fake nodes" if plan.shared else "one per GPU"
    start = time.monotonic()
    results, kill_wall = dv.run_scenario(plan, scenario, seed, limits)
    problems = dv.judge(scenario, victim, plan.ranks, results, kill_wall, limits, plan.after_steps)
    print(f"[epcomm death] {scenario}{f' (run {run + 1} of {runs})' if runs > 1 else ''}: {plan.ranks} processes "
          f"({where}), victim rank {victim}, timeout "
          f"{plan.timeout_ms} ms, seed {seed}, {time.monotonic() - start:.1f} s, "
          f"{'FAILED' if problems else 'passed'}\n{dv.summary(scenario, victim, results, kill_wall)}",
          file=sys.__stderr__, flush=True)
    if not problems:
        return []
    return [f"{scenario} (seed {seed}): " + "\n  ".join(problems) + "\n" + dv.tails(results)]


# ---------------------------------------------------------------------------- the parent's rules (CPU)
R, VICTIM, KILL = 3, 2, 1000.0
PLAN = dv.Plan(ranks=R, shared=True, timeout_ms=10000, after_steps=100, scenarios=tuple(dv.SCENARIOS), plugin="/p.so")
LIMITS = dv.make_limits(PLAN)


def _line(rank, event, **fields):
    return dv.DEATH_TAG + json.dumps(dict(rank=rank, event=event, **fields))


def _survivor(rank, kind="mask", after=True, detect_at=KILL + 10.5, exit_at=KILL + 25.0, mask=None, **fields):
    lines = ["NCCL INFO something", _line(rank, "ready", device=0, pid=1), _line(rank, "good", steps=5)]
    if kind == "mask":
        fields = dict(dict(mask=mask if mask is not None else [0, 0, 1]), **fields)
    lines.append(_line(rank, "detected", kind=kind, wall=detect_at, since_kill_s=detect_at - KILL, **fields))
    if after:
        lines.append(_line(rank, "after", steps=100, max_step_s=0.02, total_s=2.0, mask=[0, 0, 1]))
    lines.append(_line(rank, "teardown_start", wall=detect_at + 3.0))
    lines.append(_line(rank, "teardown", destroy_s=9.8, destroy_error=None, wall=detect_at + 13.0))
    return dv.RankResult(0, "\n".join(lines) + "\n", exit_at)


def _victim():
    return dv.RankResult(-signal.SIGKILL, _line(VICTIM, "killing", wall=KILL, kill_at="dispatch") + "\n", KILL + 0.1)


def _timeout_survivor(rank, message=f"epcomm rank 0: GPU wait timed out: kernel x, phase 'y', rank 0, peer {VICTIM}, "
                                    "block 3", **kw):
    return _survivor(rank, kind="error", after=False, type="TimeoutError", epcomm_timeout=True, message=message, **kw)


def _judge(scenario, results, kill_wall=KILL):
    return dv.judge(scenario, VICTIM, R, results, kill_wall, LIMITS, PLAN.after_steps)


def test_verdict_shrink_passes():
    assert _judge("ll-shrink-combine", [_survivor(0), _survivor(1), _victim()]) == []


def test_verdict_timeout_passes():
    assert _judge("ll-timeout", [_timeout_survivor(0), _timeout_survivor(1), _victim()]) == []
    assert _judge("normal-timeout", [_timeout_survivor(0), _timeout_survivor(1), _victim()]) == []


def test_verdict_construct_passes():
    ok = _survivor(0, kind="error", after=False, type="Error", epcomm_timeout=False,
                   message="group barrier on rank 0: peer 2 did not answer; the communicator was aborted")
    assert _judge("construct", [ok, ok._replace(output=ok.output.replace('"rank": 0', '"rank": 1')), _victim()]) == []


def test_verdict_hang_and_status():
    hung = _survivor(1)._replace(returncode=None, exit_wall=None)
    bad = _judge("ll-shrink-dispatch", [_survivor(0)._replace(returncode=1), hung, _victim()])
    assert any("rank 0: exit status 1" in p for p in bad), bad
    assert any("rank 1: hung" in p for p in bad), bad


def test_verdict_victim_must_die_by_sigkill():
    alive = dv.RankResult(None, "", None)
    bad = _judge("ll-shrink-dispatch", [_survivor(0), _survivor(1), alive], kill_wall=None)
    assert any("victim rank 2: still running" in p for p in bad), bad
    assert any("never reached its kill point" in p for p in bad), bad
    bad = _judge("ll-shrink-dispatch", [_survivor(0), _survivor(1), _victim()._replace(returncode=0)])
    assert any("exit status 0, want killed by SIGKILL" in p for p in bad), bad


def test_verdict_late_early_and_missing_detection():
    late = _survivor(0, detect_at=KILL + LIMITS.detect_s + 1, exit_at=KILL + LIMITS.detect_s + 20)
    early = _survivor(1, detect_at=KILL - 2.0, exit_at=KILL + 20)
    bad = _judge("ll-shrink-dispatch", [late, early, _victim()])
    assert any("rank 0: mask" in p and "more than" in p for p in bad), bad
    assert any("rank 1: mask" in p and "BEFORE the kill" in p for p in bad), bad
    silent = dv.RankResult(0, _line(0, "teardown_start", wall=KILL + 1) + "\n", KILL + 2)
    bad = _judge("ll-timeout", [silent, _timeout_survivor(1), _victim()])
    assert bad == ["rank 0: never reported the death of rank 2"], bad


def test_verdict_mask_must_name_only_the_dead_rank():
    bad = _judge("ll-shrink-combine", [_survivor(0, mask=[0, 1, 1]), _survivor(1), _victim()])
    assert any("rank 0: mask [0, 1, 1]" in p for p in bad), bad
    no_mask = _survivor(0, kind="error", type="TimeoutError", epcomm_timeout=True, message="peer 2")
    bad = _judge("ll-shrink-combine", [no_mask, _survivor(1), _victim()])
    assert any("shrink mode, but the death gave error" in p for p in bad), bad


def test_verdict_steps_after_the_death():
    slow = _survivor(0)
    slow = slow._replace(output=slow.output.replace('"max_step_s": 0.02', '"max_step_s": 9.5'))
    short = _survivor(1)
    short = short._replace(output=short.output.replace('"steps": 100', '"steps": 40'))
    bad = _judge("ll-shrink-dispatch", [slow, short, _victim()])
    assert any("rank 0: a step after the death took 9.50 s" in p for p in bad), bad
    assert any("rank 1: ran 40 steps after the death, want 100" in p for p in bad), bad
    none = _survivor(0, after=False)
    bad = _judge("ll-shrink-dispatch", [none, _survivor(1), _victim()])
    assert bad == ["rank 0: did not finish the 100 steps after the death"], bad


def test_verdict_timeout_error_must_be_epcomm_timeout_naming_the_peer():
    wrong_peer = _timeout_survivor(0, message="GPU wait timed out: kernel x, rank 0, peer 1, block 0")
    wrong_type = _survivor(1, kind="error", after=False, type="RuntimeError", epcomm_timeout=False,
                           message=f"peer {VICTIM} is gone")
    bad = _judge("normal-timeout", [wrong_peer, wrong_type, _victim()])
    assert any("rank 0: the error does not name the dead rank as 'peer 2'" in p for p in bad), bad
    assert any("rank 1: raised RuntimeError, want epcomm.TimeoutError" in p for p in bad), bad
    peer_12 = _timeout_survivor(0, message="GPU wait timed out: rank 0, peer 12, block 0")
    assert any("does not name the dead rank" in p for p in _judge("ll-timeout", [peer_12, _timeout_survivor(1),
                                                                                  _victim()]))


def test_verdict_construct_error_must_say_what_happened():
    vague = _survivor(0, kind="error", after=False, type="RuntimeError", epcomm_timeout=False,
                      message="epcomm rank 0: NCCL error 'unhandled system error' in ncclCommInitRank")
    ok = _survivor(1, kind="error", after=False, type="Error", epcomm_timeout=False, message="peer 2 timed out")
    bad = _judge("construct", [vague, ok, _victim()])
    assert len(bad) == 1 and "rank 0: the constructor's RuntimeError does not say what happened" in bad[0], bad
    for clear in ("rank 2 did not join", "the bootstrap timed out", "Connection closed by remote peer"):
        named = _survivor(0, kind="error", after=False, type="Error", epcomm_timeout=False, message=clear)
        assert _judge("construct", [named, ok, _victim()]) == [], clear
    late = _survivor(1, kind="error", after=False, type="Error", message="timed out",
                     detect_at=KILL + LIMITS.construct_s + 1, exit_at=KILL + LIMITS.construct_s + 20)
    assert any("more than" in p for p in _judge("construct", [ok, late, _victim()]))


def test_verdict_teardown_time_and_fail_reports():
    slow_exit = _survivor(0, exit_at=KILL + 10.5 + 3.0 + LIMITS.teardown_s + 1)
    failed = _survivor(1)
    failed = failed._replace(output=failed.output + _line(1, "fail", what="step 7: combined_x: 3 elements off") + "\n")
    bad = _judge("ll-shrink-combine", [slow_exit, failed, _victim()])
    assert any("rank 0: teardown to exit took" in p for p in bad), bad
    assert "rank 1: step 7: combined_x: 3 elements off" in bad, bad
    no_teardown = _survivor(0)
    no_teardown = no_teardown._replace(output="\n".join(
        line for line in no_teardown.output.splitlines() if "teardown_start" not in line))
    assert _judge("ll-shrink-combine", [no_teardown, _survivor(1), _victim()]) == [
        "rank 0: never started its teardown"]


def test_verdict_events_skip_noise():
    out = "garbage\n[death] {not json\n[death] [1, 2]\n" + _line(0, "ready") + "\n[death] {\"no_event\": 1}\n"
    assert [e["event"] for e in dv.events(out)] == ["ready"]


def test_verdict_plan_and_environment():
    one = dv.make_plan(1, {"EPCOMM_TEST_NET_PLUGIN": "plug.so"})
    assert (one.ranks, one.shared, one.timeout_ms, one.after_steps) == (3, True, 10000, 100)
    assert "ll-shrink-dispatch-sent" not in one.scenarios and "construct" in one.scenarios
    assert one.plugin == os.path.abspath("plug.so")
    eight = dv.make_plan(8, {})
    assert (eight.ranks, eight.shared, eight.timeout_ms, eight.after_steps, eight.plugin) == (4, False, 4000, 1000,
                                                                                             None)
    assert eight.scenarios == tuple(dv.SCENARIOS)
    picked = dv.make_plan(2, {"EPCOMM_TEST_RANKS": "3", "EPCOMM_TIMEOUT_MS": "30000", "EPCOMM_DEATH_STEPS": "7",
                              "EPCOMM_DEATH_SCENARIOS": "ll-timeout, construct", "EPCOMM_TEST_NET_PLUGIN": "/x.so"})
    assert (picked.ranks, picked.shared, picked.timeout_ms, picked.after_steps, picked.scenarios) == (
        3, True, 30000, 7, ("ll-timeout", "construct"))
    env = dv.rank_env({"PATH": "/bin"}, one, "construct", 1, 1234)
    for k, v in dict(RANK="1", WORLD_SIZE="3", MASTER_PORT="1234", EPCOMM_TIMEOUT_MS="10000", NCCL_NET="EpcommLoopback",
                     NCCL_GIN_TYPE="2", NCCL_NET_PLUGIN=os.path.abspath("plug.so"), NCCL_NVLS_ENABLE="0",
                     EPCOMM_RANKS_PER_NODE="0", EPCOMM_LOOPBACK_DEAD_PEERS="1").items():
        assert env[k] == v, (k, env.get(k))
    assert env["NCCL_HOSTID"] != dv.rank_env({}, one, "construct", 0, 1234)["NCCL_HOSTID"]
    distinct = dv.rank_env({}, eight, "ll-timeout", 0, 1)
    assert "NCCL_HOSTID" not in distinct and "NCCL_NET_PLUGIN" not in distinct
    assert dv.victim_of(one) == 2 and dv.victim_of(eight) == 3
    limits = dv.make_limits(one)
    assert limits.detect_s == 20.0 and limits.step_s == 5.0 and limits.teardown_s == 30.0


def test_verdict_watchdog_kills_and_names_the_hung():
    import subprocess

    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    quick = [sys.executable, "-c", "raise SystemExit(3)"]
    procs = [subprocess.Popen(quick), subprocess.Popen(sleeper), subprocess.Popen(sleeper)]
    start = time.monotonic()
    walls = dv.wait_all(procs, watchdog_s=30.0, grace_s=1.0, victim=2)  # rank 0 failed: 1 s of grace
    assert time.monotonic() - start < 10.0
    assert walls[0] is not None and walls[1] is None and walls[2] is None
    assert procs[0].returncode == 3 and procs[1].returncode == -signal.SIGKILL


if __name__ == "__main__":
    run_tests(globals())
