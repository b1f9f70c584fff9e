"""One process per GPU for the Python GPU tests, started once and reused: each test sends a case
name to every rank and collects each rank's result. A rank that fails reports its traceback; a
rank that hangs is caught by a timeout, and the processes are replaced before the next test, so a
broken case never hangs the suite. Each run records its wall time and the slowest rank's phase
times (TIMINGS; conftest.py prints them at the end of the pytest run)."""

import faulthandler
import importlib
import os
import queue
import random
import socket
import sys
import time
import traceback
from typing import Any, Dict, List, Tuple

# NVLink multicast stays off on shared machines (README "Environment variables", docs/testing.md); set before NCCL starts.
_QUIET_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

# (what ran, wall seconds seen by the parent, {phase: seconds on the slowest rank}), in run order.
TIMINGS: List[Tuple[str, float, Dict[str, float]]] = []


def dump_stacks_before_watchdog() -> None:
    """In a rank process its parent watches: EPCOMM_DUMP_AFTER_S seconds in (the parent sets it a
    little below its watchdog), every thread's stack goes to the log, so a hang names its Python
    line before the SIGKILL. Unset or 0: nothing."""
    after = float(os.environ.get("EPCOMM_DUMP_AFTER_S") or 0)
    if after > 0:
        faulthandler.dump_traceback_later(after, exit=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Context:
    """What a case gets on its rank: rank, R, device, the process group and a shared buffer."""

    def __init__(self, rank: int, num_ranks: int, buffer, group, device):
        self.rank, self.num_ranks, self.buffer, self.group, self.device = rank, num_ranks, buffer, group, device


def _worker(rank: int, num_ranks: int, port: int, cases_module: str, commands, results, buffer_bytes: int) -> None:
    for k, v in _QUIET_ENV.items():
        os.environ.setdefault(k, v)
    try:
        import torch
        import torch.distributed as dist

        import epcomm

        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=num_ranks)
        group = dist.group.WORLD
        buffer = epcomm.Buffer(group, num_nvl_bytes=buffer_bytes)
        ctx = Context(rank, num_ranks, buffer, group, torch.device("cuda", rank))
        cases = importlib.import_module(cases_module)
        results.put((rank, "ready", None, {}))
    except BaseException:  # noqa: BLE001 -- reported to the parent
        results.put((rank, "error", traceback.format_exc(), {}))
        return
    take_timings = getattr(cases, "take_timings", dict)
    while True:
        command = commands.get()
        if command is None:
            break
        name, kwargs = command
        start = time.perf_counter()
        try:
            out = getattr(cases, name)(ctx, **kwargs)
            torch.cuda.synchronize()
            results.put((rank, "ok", out, dict(take_timings(), case=time.perf_counter() - start)))
        except BaseException:  # noqa: BLE001 -- reported to the parent
            take_timings()
            results.put((rank, "error", traceback.format_exc(), {}))
    try:
        vars(ctx).pop("ll_buffer", None)  # made by the low-latency cases; freed (collectively) here
        del ctx, buffer
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 -- shutting down
        pass


class Cluster:
    def __init__(self, num_ranks: int, cases_module: str, buffer_bytes: int, start_timeout: float = 300.0):
        import torch.multiprocessing as mp

        self.num_ranks, self.cases_module, self.buffer_bytes = num_ranks, cases_module, buffer_bytes
        self.start_timeout = start_timeout
        self._mp = mp.get_context("spawn")
        self._procs: List[Any] = []
        self._commands: List[Any] = []
        self._results = None

    def _start(self) -> None:
        port = free_port()
        self._results = self._mp.Queue()
        self._commands = [self._mp.Queue() for _ in range(self.num_ranks)]
        self._procs = [self._mp.Process(target=_worker, args=(r, self.num_ranks, port, self.cases_module,
                                                              self._commands[r], self._results, self.buffer_bytes),
                                        daemon=True) for r in range(self.num_ranks)]
        for p in self._procs:
            p.start()
        start = time.monotonic()
        self._collect("startup", self.start_timeout, expect="ready")
        TIMINGS.append((f"startup: {self.num_ranks} processes, process group, buffer", time.monotonic() - start, {}))
        print(f"[epcomm case] {TIMINGS[-1][1]:7.2f} s  {TIMINGS[-1][0]}", file=sys.__stderr__, flush=True)

    def _collect(self, what: str, timeout: float, expect: str = "ok") -> List[Any]:
        deadline = time.monotonic() + timeout
        got: Dict[int, Any] = {}
        errors: List[str] = []
        self._phases: Dict[str, float] = {}
        while len(got) + len(errors) < self.num_ranks:
            left = deadline - time.monotonic()
            try:
                rank, status, payload, phases = self._results.get(timeout=max(left, 0.01))
            except queue.Empty:
                missing = sorted(set(range(self.num_ranks)) - set(got))
                self.close()
                raise AssertionError(f"{what}: ranks {missing} gave no answer within {timeout:.0f} s "
                                     f"(hung or died); processes restarted for the next test\n" + "\n".join(errors))
            if status == expect:
                got[rank] = payload
                for k, v in phases.items():
                    self._phases[k] = max(self._phases.get(k, 0.0), v)
            else:
                errors.append(f"--- rank {rank} ---\n{payload}")
                # The others may be stuck in a collective the failed rank left; don't wait long.
                deadline = min(deadline, time.monotonic() + 60.0)
        if errors:
            raise AssertionError(f"{what} failed on {len(errors)} rank(s):\n" + "\n".join(errors))
        return [got[r] for r in range(self.num_ranks)]

    def run(self, case: str, timeout: float = 600.0, **kwargs) -> List[Any]:
        """Runs cases.<case>(ctx, **kwargs) on every rank; returns the per-rank results."""
        if not self._procs or not all(p.is_alive() for p in self._procs):
            self.close()
            self._start()
        for q in self._commands:
            q.put((case, kwargs))
        start = time.monotonic()
        out = self._collect(case, timeout)
        what = kwargs.get("what")
        TIMINGS.append((case + (f" ({what})" if what else ""), time.monotonic() - start, self._phases))
        # Also as it happens (past pytest's capture), so a run cut short still shows where time went.
        label, wall, phases = TIMINGS[-1]
        print(f"[epcomm case] {wall:7.2f} s  {label}  " + " ".join(f"{k}={v:.2f}" for k, v in sorted(phases.items())),
              file=sys.__stderr__, flush=True)
        return out

    def close(self) -> None:
        for q in self._commands:
            try:
                q.put(None)
            except Exception:  # noqa: BLE001 -- the queue may be gone
                pass
        for p in self._procs:
            p.join(timeout=20)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
        self._procs, self._commands = [], []


def visible_gpus() -> int:
    """GPUs this process sees; 0 without torch or a driver."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 -- no torch, no driver
        return 0


def ranks_for_tests(max_ranks: int = 8) -> int:
    env = os.environ.get("EPCOMM_TEST_RANKS")
    return int(env) if env else min(visible_gpus(), max_ranks)


def gpu_test_marks() -> list:
    """pytestmark of a GPU test module: every test skipped with a visible reason where PyTorch is
    not installed or no GPU is visible (CTest's python-gpu counts those reasons as skipped)."""
    import pytest

    try:
        import torch  # noqa: F401
    except ImportError:
        torch = None
    return [
        pytest.mark.skipif(torch is None, reason="PyTorch is not installed"),
        pytest.mark.skipif(torch is not None and visible_gpus() == 0, reason="skipped (no GPU)"),
    ]


def case_seed() -> int:
    """The random inputs' seed of a GPU test run: EPCOMM_TEST_SEED, else a fresh one."""
    return int(os.environ.get("EPCOMM_TEST_SEED", random.randrange(1 << 30)))
