// Low-latency mode as one rank's part of a case: every rank's inputs from one seed, the run of one
// rank (dispatch and combine in the case's way: plain, hooks, two micro-batches, zero copy, CUDA
// graph, stream orders), and the comparison of every rank's results with the CPU reference (which
// needs every rank's handles, so it runs where all results are: after the threads of
// test_low_latency.cpp, or after tests/gin exchanged them between processes).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "ll_harness.hpp"

namespace epcomm::test {

struct LLRun {
  uint64_t seed = 0;
  int rounds = 1;
  std::vector<int> tokens;                  // [rank]
  std::vector<std::vector<RoundInput>> in;  // [round][rank]
};
LLRun make_ll_run(const LLCase& c, uint64_t seed);

// What one rank got and counted.
struct LLRankResult {
  std::vector<RoundOutput> got;  // [round]
  std::vector<int32_t> cum;      // cumulative_local_expert_recv_stats
  std::vector<int64_t> dwait, cwait;
  int net_used = 0;  // the network path (where the case expects it)
  uint64_t net_puts = 0, net_bytes = 0, lsa_remote_words = 0;
};
LLRankResult run_ll_rank(const LLCase& c, const LLRun& run, int r, const std::shared_ptr<Group>& group);
// Every rank's rounds against the reference; the network counters where the case expects the path.
void check_ll_run(const LLCase& c, const LLRun& run, const std::vector<LLRankResult>& results);
// Every rank as a thread of this process (run_ranks), on a fresh seed.
void run_case(const LLCase& c);
// Every LL feature once across nodes of P ranks through the network path (low_latency_net = 1):
// FP8, BF16, UE8M0 with out-of-range ids, hooks (async), two micro-batches (both buffers), zero
// copy (previous_event), CUDA graph replays (with and without hooks), several experts per rank.
std::vector<LLCase> ll_network_cases(int R, int P);

}  // namespace epcomm::test
