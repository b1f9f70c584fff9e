"""Starts the ranks of test_exit.py as fresh interpreters (_exit_worker.py) and reads what they
printed; no torch here, so the CPU tests (test_cpu_arguments.py) check the output rule too."""

import os
import re
import socket
import subprocess
import sys
import time

TEARDOWNS = ("exit", "destroy", "destroy-first")  # _exit_worker.py's docstring says what each does
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_exit_worker.py")
QUIET_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
DONE_LINE = "every call matched the reference"  # printed by each worker before its teardown

# What a clean exit never prints: CUDA errors, C++ exceptions escaping at teardown, crashes.
_NOISE = re.compile(r"CUDA error|CUDA_ERROR|cudaError|AcceleratorError|terminate called|context is destroyed|"
                    r"invalid device context|Traceback|Segmentation fault|core dumped|Aborted|"
                    r"Exception ignored|NCCL WARN|illegal memory access")


def noise_lines(output: str):
    """The lines of a worker's output that a clean exit never prints."""
    return [line for line in output.splitlines() if _NOISE.search(line)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(teardown: str, ranks: int, timeout: float = 420.0):
    """Runs `ranks` workers with `teardown`; returns (seed, [(exit status or None if killed, output)])."""
    env = dict(os.environ, **QUIET_ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               WORLD_SIZE=str(ranks), PYTHONUNBUFFERED="1")
    env.setdefault("EPCOMM_TEST_SEED", str(int(time.time()) % 100000))
    procs = [subprocess.Popen([sys.executable, WORKER, teardown], env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(ranks)]
    deadline, results = time.monotonic() + timeout, []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(deadline - time.monotonic(), 1.0))
            results.append((p.returncode, out))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            out, _ = p.communicate()
            results.append((None, out))
    return env["EPCOMM_TEST_SEED"], results


def problems(results):
    """One paragraph per rank that did not exit cleanly (status, hang, noise, or no DONE_LINE)."""
    found = []
    for r, (rc, out) in enumerate(results):
        noise = noise_lines(out)
        if rc != 0 or noise or DONE_LINE not in out:
            status = "hung (killed)" if rc is None else f"exit status {rc}"
            found.append(f"--- rank {r}: {status}; noise {noise}\n{out[-4000:]}")
    return found
