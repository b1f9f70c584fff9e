"""The DeepEP-compatible surface on GPUs, one process per GPU (torch.multiprocessing): layout,
dispatch / combine in BF16 and FP8, with and without top-k, cached handle, num_worst_tokens,
previous_event / async_finish / allocate_on_comm_stream, handle[0] as the prefix matrix, Config
and size hints, set_num_sms, capture and CUDA graphs, destroy, argument errors, the MoE example,
receive tensors reserved before the count exchange (and not); low-latency dispatch / combine
(BF16, FP8, round_scale, UE8M0), hooks, two micro-batches, async_finish, zero_copy, out=, the
stats tensors, CUDA graphs, argument errors, the memory views (get_next_low_latency_combine_buffer,
get_local_buffer_tensor). Every output is checked against a torch reference built from
all-gathered inputs (_reference.py). After the run, a table shows where each case's time went
(conftest.py); `--durations=0` adds pytest's per-test times.

    PYTHONPATH=python python -m pytest -rs tests/python/test_gpu.py

EPCOMM_TEST_RANKS sets the number of ranks (default: every visible GPU, at most 8);
EPCOMM_TEST_SEED fixes the random inputs (the seed is in every failure message). Without a GPU
every test is skipped with "skipped (no GPU)".
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _cluster import Cluster, case_seed, gpu_test_marks, ranks_for_tests  # noqa: E402

pytestmark = gpu_test_marks()

SEED = case_seed()
STANDARD = dict(max_tokens=4096, fixed_tokens=4096, hidden=7168, num_topk=8, num_experts=256)


@pytest.fixture(scope="module")
def cluster():
    import epcomm

    R = ranks_for_tests()
    # Enough ring memory for the widest rows any case uses, with the default configs.
    hidden_bytes = STANDARD["hidden"] * 2
    nbytes = max(epcomm.Buffer.get_dispatch_config(R).get_nvl_buffer_size_hint(hidden_bytes, R),
                 epcomm.Buffer.get_combine_config(R).get_nvl_buffer_size_hint(hidden_bytes, R))
    print(f"\nepcomm GPU tests: {R} ranks, seed {SEED} (EPCOMM_TEST_SEED)")
    c = Cluster(R, "_gpu_cases", nbytes)
    yield c
    c.close()


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("with_topk", [True, False], ids=["topk", "no-topk"])
def test_dispatch_combine(cluster, fp8, with_topk):
    cluster.run("normal", seed=SEED, what=f"fp8={fp8} topk={with_topk}", fp8=fp8, with_topk=with_topk,
                alignment=4, bias=True)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_standard_problem(cluster, fp8):
    cluster.run("normal", seed=SEED, what=f"standard problem fp8={fp8}", fp8=fp8, **STANDARD)


@pytest.mark.parametrize("hidden", [1040, 4096, 7168])
def test_hidden_sizes(cluster, hidden):
    for fp8 in (False, True):
        cluster.run("normal", seed=SEED, what=f"hidden={hidden} fp8={fp8}", fp8=fp8, hidden=hidden, max_tokens=200)


def test_few_tokens(cluster):
    for max_tokens in (0, 1, 3):
        cluster.run("normal", seed=SEED + max_tokens, what=f"T<={max_tokens}", max_tokens=max_tokens, bias=True)


def seeded(case):
    """A test that runs `case` (_gpu_cases.py) with the run's seed and nothing else."""
    def test(cluster):
        cluster.run(case, seed=SEED)
    test.__doc__ = f"_gpu_cases.{case}"
    return test


test_fp8_scale_forms = seeded("scale_forms")
test_receive_reservation = seeded("reserve_paths")
test_num_worst_tokens = seeded("worst_tokens")
test_stream_options = seeded("stream_modes")
test_config_and_hints = seeded("configs")
test_set_num_sms = seeded("set_num_sms")
test_cuda_graph = seeded("graph")
test_argument_errors = seeded("errors")
test_out_of_range_topk = seeded("invalid_topk")
test_lifetime_and_statics = seeded("lifetime")


# ---------------------------------------------------------------------------- low-latency mode
LL_MODES = {"bf16": dict(fp8=False), "fp8": dict(fp8=True), "fp8-round-scale": dict(fp8=True, round_scale=True),
            "fp8-ue8m0": dict(fp8=True, round_scale=True, ue8m0=True, shape="ue8m0")}


def _report(reports):
    for r in reports:
        print(r)


@pytest.mark.parametrize("mode", list(LL_MODES))
def test_low_latency(cluster, mode):
    for reports in cluster.run("low_latency", seed=SEED, what=f"low-latency {mode}", rounds=2, **LL_MODES[mode]):
        _report(reports)


def test_low_latency_standard_problem(cluster):
    # docs/contract.md §7: 128 tokens per rank, hidden 7168, top-8, 288 experts (the nearest multiple of
    # the rank count when 288 is not one), FP8 dispatch, BF16 combine.
    _report(cluster.run("low_latency", seed=SEED, what="low-latency standard problem", shape="standard",
                        fixed_tokens=128, drop=0.0)[0])


def test_low_latency_few_tokens(cluster):
    for tokens in (0, 1):
        cluster.run("low_latency", seed=SEED + tokens, what=f"low-latency T={tokens}", shape="small", num_topk=4,
                    fixed_tokens=tokens)


def test_low_latency_modes_and_stats(cluster):
    _report(cluster.run("low_latency_modes", seed=SEED)[0])


@pytest.mark.parametrize("zero_copy", [False, True], ids=["copy", "zero-copy"])
def test_low_latency_two_micro_batches(cluster, zero_copy):
    cluster.run("low_latency_two_batches", seed=SEED, zero_copy=zero_copy, fp8=not zero_copy)


@pytest.mark.parametrize("hook", [False, True], ids=["one-launch", "hook"])
def test_low_latency_cuda_graph(cluster, hook):
    _report(cluster.run("low_latency_graph", seed=SEED, hook=hook)[0])


test_low_latency_argument_errors = seeded("low_latency_errors")
test_low_latency_memory_views = seeded("low_latency_memory")


def test_moe_layer_example(cluster):
    reports = cluster.run("moe_layer", seed=SEED % 1000)
    print("\n".join(str(r) for r in reports))
