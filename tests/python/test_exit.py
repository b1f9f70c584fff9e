"""A framework's worker must exit cleanly: status 0 and nothing from CUDA at teardown.

Every rank is a fresh interpreter (_exit_worker.py, as vLLM / SGLang / Megatron spawn theirs), one
per visible GPU (at most 4; EPCOMM_TEST_RANKS overrides). Each makes the normal-mode and
low-latency calls a framework makes (sync and async, allocate_on_comm_stream on and off,
previous_event, FP8, cached dispatch, num_worst_tokens, hooks, CUDA graphs; every output checked
against the reference), then tears down one of three ways (_exit_check.TEARDOWNS) and exits. The
test fails on a non-zero status, a hang, or a line of CUDA / C++ teardown noise in the output. The
CPU side (the output rule, the pool stream the Buffer gives the core) is in test_cpu_arguments.py.

The bug this guards against: the core made and destroyed its own communication stream, the
Python layer record_stream-ed the tensors of async calls on it, and PyTorch's caching allocator,
freeing such a tensor after the buffer was gone, recorded an event on the destroyed stream:
``terminate called after throwing an instance of 'c10::AcceleratorError' ... context is
destroyed`` and SIGABRT at exit.

    PYTHONPATH=python python -m pytest -rs tests/python/test_exit.py
"""

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _cluster import visible_gpus  # noqa: E402
from _exit_check import TEARDOWNS, problems, run_ranks  # noqa: E402

try:
    import torch
except ImportError:
    torch = None


pytestmark = [
    pytest.mark.skipif(torch is None, reason="PyTorch is not installed"),
    pytest.mark.skipif(torch is not None and visible_gpus() == 0, reason="skipped (no GPU)"),
]


@pytest.mark.parametrize("teardown", TEARDOWNS)
def test_worker_exits_cleanly(teardown):
    ranks = int(os.environ.get("EPCOMM_TEST_RANKS", min(visible_gpus(), 4)))
    start = time.monotonic()
    seed, results = run_ranks(teardown, ranks)
    found = problems(results)
    print(f"[epcomm exit] {teardown}: {ranks} process(es), seed {seed}, statuses {[rc for rc, _ in results]}, "
          f"{time.monotonic() - start:.1f} s", file=sys.__stderr__, flush=True)
    assert not found, f"teardown '{teardown}' (seed {seed}):\n" + "\n".join(found)
