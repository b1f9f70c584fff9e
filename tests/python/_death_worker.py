"""One rank of test_process_death.py, a fresh interpreter: a torch.distributed group (gloo: it
only carries the NCCL unique id; epcomm makes its own NCCL communicator), a Buffer, GOOD_STEPS
verified steps, then the victim dies by SIGKILL where the scenario says and every survivor
reports what it saw (_death_verdict.py has the scenarios, the report lines and the rules).

    python3 _death_worker.py CONFIG_JSON   (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment)

Survivors: shrink mode must mask the dead rank and run the later steps without waiting for it,
every output against the reference of the live ranks; without shrink mode the next call raises
epcomm.TimeoutError naming it. Then destroy(), destroy_process_group() and an ordinary exit.
"""

import datetime
import json
import os
import signal
import sys
import time
import traceback

for _k, _v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ.setdefault(_k, _v)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import _death_steps as steps  # noqa: E402
import epcomm  # noqa: E402
from _cluster import Context, dump_stacks_before_watchdog  # noqa: E402
from _death_verdict import DEATH_TAG  # noqa: E402
from _gpu_low_latency import warm_expert_kernels  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))
TIMEOUT_AFTER_DEATH_STEPS = 4  # without shrink mode: calls made after the death before the error must have come


class Failed(Exception):
    """A check failed on this rank (reported as a 'fail' event)."""


def emit(event: str, **fields) -> None:
    print(DEATH_TAG + json.dumps(dict(rank=RANK, event=event, **fields)), flush=True)


def die(cfg) -> None:
    """The victim: the wall clock of the kill into the kill file (whole, renamed into place), then
    SIGKILL to itself: nothing is torn down, as when a process is killed."""
    now = time.time()
    emit("killing", wall=now, kill_at=cfg["kill_at"])
    tmp = cfg["kill_file"] + f".{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(repr(now))
    os.replace(tmp, cfg["kill_file"])
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # not reached


def since_kill(cfg, wall: float):
    try:
        with open(cfg["kill_file"]) as f:
            return wall - float(f.read())
    except (OSError, ValueError):
        return None


def detected(cfg, kind: str, **fields) -> float:
    wall = time.time()
    elapsed = since_kill(cfg, wall)
    emit("detected", kind=kind, wall=wall, since_kill_s=elapsed, **fields)
    when = f"{elapsed:.2f} s after the kill" if elapsed is not None else "(kill time not found)"
    print(f"rank {RANK}: {kind} {when}: {fields.get('mask', fields.get('message', ''))}", flush=True)
    return wall


def error_fields(e: BaseException) -> dict:
    return dict(type=type(e).__name__, epcomm_timeout=isinstance(e, epcomm.TimeoutError), message=str(e))


def check(problems, what: str) -> None:
    if problems:
        raise Failed(f"{what}: " + "; ".join(problems[:10]))


# ---------------------------------------------------------------------------- the flows
def good_steps(cfg, ctx, buf, mode: str) -> None:
    shape = steps.LL_SHAPE if mode == "ll" else steps.NORMAL_SHAPE
    for step in range(cfg["kill_step"]):
        inputs = steps.step_inputs(cfg["seed"], step, ctx.num_ranks, shape, ctx.device)
        if mode == "ll":
            out = steps.ll_step(ctx, buf, inputs[ctx.rank])
            torch.cuda.synchronize()
            check(steps.ll_check(ctx, inputs, out, set(range(ctx.num_ranks))), f"good step {step}")
        else:
            out = steps.normal_step(buf, inputs[ctx.rank])
            torch.cuda.synchronize()
            check(steps.normal_check(ctx, inputs, out), f"good step {step}")
    emit("good", steps=cfg["kill_step"])


def victim_ll(cfg, ctx, buf) -> None:
    """Runs step kill_step up to the kill point, then dies."""
    inputs = steps.step_inputs(cfg["seed"], cfg["kill_step"], ctx.num_ranks, steps.LL_SHAPE, ctx.device, {ctx.rank})
    inp = inputs[ctx.rank]
    if cfg["kill_at"] == "dispatch-sent":
        steps.ll_dispatch(buf, inp, hook=True)  # the send half only; hook() never runs
        torch.cuda.synchronize()
        time.sleep(cfg["settle_s"])
    elif cfg["kill_at"] == "combine":
        recv, _, _, _, _ = steps.ll_dispatch(buf, inp)
        steps.ll_expert(ctx, recv)
        torch.cuda.synchronize()
        time.sleep(cfg["settle_s"])
    die(cfg)


def survivor_ll_shrink(cfg, ctx, buf) -> None:
    R, victim, k = ctx.num_ranks, cfg["victim"], cfg["kill_step"]
    live = set(range(R)) - {victim}
    inputs = steps.step_inputs(cfg["seed"], k, R, steps.LL_SHAPE, ctx.device)
    out = steps.ll_step(ctx, buf, inputs[ctx.rank])
    torch.cuda.synchronize()
    detected(cfg, "mask", mask=steps.mask_of(buf, ctx.device))
    # The dead rank sent nothing before a "dispatch" kill; otherwise its rows may be there.
    maybe = None if cfg["kill_at"] == "dispatch" else victim
    check(steps.ll_check(ctx, inputs, out, live, maybe), f"the step of the death ({k})")
    victim_rows = out.get("maybe_rows")  # how many of the dead rank's rows arrived in that step
    slowest, start = 0.0, time.monotonic()
    for i in range(cfg["after_steps"]):
        step = k + 1 + i
        inputs = steps.step_inputs(cfg["seed"], step, R, steps.LL_SHAPE, ctx.device, live)
        t0 = time.monotonic()
        out = steps.ll_step(ctx, buf, inputs[ctx.rank])
        torch.cuda.synchronize()
        slowest = max(slowest, time.monotonic() - t0)
        check(steps.ll_check(ctx, inputs, out, live), f"step {step}, {i + 1} after the death")
    emit("after", steps=cfg["after_steps"], max_step_s=slowest, total_s=time.monotonic() - start,
         mask=steps.mask_of(buf, ctx.device), victim_rows_in_death_step=victim_rows)


def survivor_timeout(cfg, ctx, buf, mode: str) -> None:
    """Without shrink mode: the calls from kill_step on must end in epcomm.TimeoutError (the LL
    calls report a timed-out kernel at the next call; normal dispatch waits for the counts)."""
    R, k = ctx.num_ranks, cfg["kill_step"]
    shape = steps.LL_SHAPE if mode == "ll" else steps.NORMAL_SHAPE
    try:
        for step in range(k, k + TIMEOUT_AFTER_DEATH_STEPS):
            inputs = steps.step_inputs(cfg["seed"], step, R, shape, ctx.device, {ctx.rank})
            if mode == "ll":
                steps.ll_step(ctx, buf, inputs[ctx.rank])
            else:
                steps.normal_step(buf, inputs[ctx.rank])
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 -- reported; the parent checks the type and the message
        detected(cfg, "error", **error_fields(e))
        return
    raise Failed(f"{TIMEOUT_AFTER_DEATH_STEPS} steps after the death of rank {cfg['victim']} ran without an error")


def construct(cfg, group, R: int) -> None:
    """The victim dies right after the NCCL unique id went round; the others' constructor must fail."""
    if RANK == cfg["victim"]:
        real = dist.all_gather_object

        def gather_then_die(*args, **kwargs):
            real(*args, **kwargs)
            die(cfg)

        dist.all_gather_object = gather_then_die  # Buffer calls torch.distributed.all_gather_object
    try:
        buf = steps.ll_buffer(group, R, False)
    except Exception as e:  # noqa: BLE001 -- reported; the parent checks the message
        detected(cfg, "error", **error_fields(e))
        return
    buf.destroy()
    raise Failed(f"Buffer was made although rank {cfg['victim']} died during its construction")


def teardown(buf) -> None:
    emit("teardown_start", wall=time.time())
    t0, error = time.monotonic(), None
    if buf is not None:
        try:
            buf.destroy()
        except Exception as e:  # noqa: BLE001 -- reported (a note, not a failure: it must only not hang)
            error = f"{type(e).__name__}: {e}"
    destroy_s = time.monotonic() - t0
    try:
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 -- reported
        error = (error + "; " if error else "") + f"destroy_process_group: {type(e).__name__}: {e}"
    emit("teardown", destroy_s=destroy_s, destroy_error=error, wall=time.time())


def main(cfg) -> int:
    R = int(os.environ["WORLD_SIZE"])
    dump_stacks_before_watchdog()
    device = 0 if cfg["shared"] else RANK
    torch.cuda.set_device(device)
    init = f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    dist.init_process_group("gloo", init_method=init, rank=RANK, world_size=R,
                            timeout=datetime.timedelta(seconds=120))
    group = dist.group.WORLD
    emit("ready", device=device, pid=os.getpid())
    buf, status = None, 0
    try:
        if cfg["mode"] == "construct":
            construct(cfg, group, R)
        else:
            if cfg["mode"] == "ll":
                buf = steps.ll_buffer(group, R, cfg["shrink"])
            else:
                buf = steps.normal_buffer(group, R, cfg["shared"])
            ctx = Context(RANK, R, buf, group, torch.device("cuda", device))
            if cfg["mode"] == "ll":  # the stand-in expert's kernels loaded before any kernel spins
                warm_expert_kernels(ctx, steps.num_experts(R), steps.LL_SHAPE["hidden"])
            good_steps(cfg, ctx, buf, cfg["mode"])
            if RANK == cfg["victim"]:
                if cfg["mode"] == "ll":
                    victim_ll(cfg, ctx, buf)
                die(cfg)  # normal mode: before the dispatch of kill_step
            elif cfg["shrink"]:
                survivor_ll_shrink(cfg, ctx, buf)
            else:
                survivor_timeout(cfg, ctx, buf, cfg["mode"])
    except Failed as e:
        emit("fail", what=str(e))
        status = 1
    except Exception:  # noqa: BLE001 -- reported
        emit("fail", what=traceback.format_exc()[-3000:])
        status = 1
    teardown(buf)
    return status


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
