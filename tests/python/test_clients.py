"""Client-shaped GPU tests: the calls vLLM, SGLang and Megatron-LM make, through `import deep_ep`
(python/deep_ep_compat over epcomm), one process per GPU (1 GPU = 1 rank works), every output
checked against the torch reference (_client_cases.py says what each case does). The CPU side
(imports, signatures, Config keywords, hints) is test_deep_ep_compat.py.

    PYTHONPATH=python:python/deep_ep_compat python -m pytest -rs tests/python/test_clients.py

EPCOMM_TEST_RANKS sets the number of ranks (default: every visible GPU, at most 8);
EPCOMM_TEST_SEED fixes the random inputs. Without a GPU every test is skipped with "skipped (no GPU)".
"""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.normpath(os.path.join(HERE, "..", "..", "python", "deep_ep_compat")))

from _cluster import Cluster, case_seed, gpu_test_marks, ranks_for_tests  # noqa: E402

pytestmark = gpu_test_marks()

SEED = case_seed()


@pytest.fixture(scope="module")
def cluster():
    R = ranks_for_tests()
    print(f"\nepcomm client tests: {R} ranks, seed {SEED} (EPCOMM_TEST_SEED)")
    # The cases build their own buffers, as the clients do; the cluster's is a small one.
    c = Cluster(R, "_client_cases", 1 << 20)
    yield c
    c.close()


@pytest.mark.parametrize("async_finish,on_comm", [(False, False), (True, False), (True, True)],
                         ids=["sync", "async", "async-comm-stream"])
def test_megatron_fused_a2a(cluster, async_finish, on_comm):
    cluster.run("megatron", seed=SEED, async_finish=async_finish, allocate_on_comm_stream=on_comm)


@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "bf16"])
def test_vllm_high_throughput(cluster, fp8):
    cluster.run("vllm_high_throughput", seed=SEED, fp8=fp8)


@pytest.mark.parametrize("ue8m0", [False, True], ids=["fp8", "fp8-ue8m0"])
def test_vllm_low_latency_and_fault_tolerance(cluster, ue8m0):
    for r in cluster.run("vllm_low_latency", seed=SEED, ue8m0=ue8m0)[0]:
        print(r)


@pytest.mark.parametrize("async_finish,hook", [(True, False), (False, True)], ids=["async", "hook"])
def test_sglang_auto_mode(cluster, async_finish, hook):
    for r in cluster.run("sglang", seed=SEED, async_finish=async_finish, hook=hook)[0]:
        print(r)
