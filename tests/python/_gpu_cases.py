"""The GPU test cases, run on every rank by _cluster (one process per GPU): the names test_gpu.py
passes to Cluster.run, and what _exit_worker.py and _fuzz_gpu.py call. Each case moves data with
epcomm, all-gathers the inputs, builds the expected result with _reference and raises
AssertionError listing every mismatch; all collectives come before the first assertion, so a
failing rank never leaves the others waiting. Normal mode: _gpu_normal.py; low-latency mode:
_gpu_low_latency.py; what they share: _gpu_checks.py."""

from _gpu_checks import take_timings
from _gpu_low_latency import (LLInputs, ll_buffer, ll_gather, ll_run, ll_shapes, ll_verify, low_latency,
                              low_latency_errors, low_latency_graph, low_latency_memory, low_latency_modes,
                              low_latency_two_batches)
from _gpu_normal import (Inputs, configs, errors, graph, invalid_topk, lifetime, moe_layer, normal, normal_case,
                         reserve_paths, run_normal, scale_forms, set_num_sms, stream_modes, verify_normal,
                         worst_tokens)

__all__ = [
    # the cases (Cluster.run names them)
    "normal", "scale_forms", "stream_modes", "configs", "set_num_sms", "reserve_paths", "worst_tokens", "graph",
    "errors", "invalid_topk", "lifetime", "moe_layer", "low_latency", "low_latency_modes", "low_latency_two_batches",
    "low_latency_graph", "low_latency_errors", "low_latency_memory",
    # their parts, for _exit_worker.py and _fuzz_gpu.py
    "Inputs", "run_normal", "verify_normal", "normal_case", "LLInputs", "ll_buffer", "ll_gather", "ll_run",
    "ll_shapes", "ll_verify",
    # _cluster reads each case's phase times through it
    "take_timings",
]
