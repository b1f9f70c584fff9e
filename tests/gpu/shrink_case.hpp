// Shrink mode's "a rank stops" case as one rank's part (shared by the threads of test_shrink.cpp and
// the processes of tests/gin): five rounds of low-latency calls; in round 1 the dead rank stops
// answering (or stops before its combine) and the live ranks mask it after the timeout; round 2
// skips it without waiting (hooks); clean_low_latency_buffer + low_latency_clean_mask_buffer on
// every rank bring it back for round 3; round 4 masks it by hand. The comparison with the
// reference (with the dead rank left out where it was masked) needs every rank's results.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <vector>

#include "ll_harness.hpp"

namespace epcomm::test {

double seconds_since(std::chrono::steady_clock::time_point t0);
// The mask as the buffer reports it (`m`: a tensor of [R] int32 allocated up front).
std::vector<int32_t> query_mask(Buffer& buf, cudaStream_t stream, DeviceTensor& m);
std::vector<int32_t> mask_of(int R, int masked_rank);
// The halves of one LL round.
void dispatch_half(const LLCase& c, Buffer& buf, cudaStream_t stream, Batch& b, const RoundInput& in, bool hook,
                   RoundOutput& out);
void combine_half(const LLCase& c, Buffer& buf, cudaStream_t stream, Batch& b, const RoundInput& in, bool hook,
                  RoundOutput& out);
// A small LL case; P > 0: virtual nodes of P ranks; net = 1: the network path to other nodes.
LLCase shrink_case(int R, int P = 0, int net = -1);

constexpr int kDeadRankRounds = 5;
struct DeadRankRun {
  LLCase c;
  int dead = 0;
  bool stop_in_combine = false;  // the dead rank still dispatches round 1 and stops before its combine
  int64_t timeout_ms = 1000;
  uint64_t seed = 0;
  std::vector<int> tokens;                  // [rank]
  std::vector<std::vector<RoundInput>> in;  // [round][rank]
};
DeadRankRun make_dead_rank_run(const LLCase& c, int dead, bool stop_in_combine, int64_t timeout_ms, uint64_t seed);

struct DeadRankResult {
  std::vector<RoundOutput> got;             // [round]
  std::vector<double> secs;                 // [round]
  std::vector<std::vector<int32_t>> masks;  // [round]
};
DeadRankResult run_dead_rank_rank(const DeadRankRun& run, int r, const std::shared_ptr<Group>& group);
void check_dead_rank(const DeadRankRun& run, const std::vector<DeadRankResult>& results);
// Every rank as a thread of this process, on a fresh seed.
void run_dead_rank(int R, int dead, bool stop_in_combine, int64_t timeout_ms, int P = 0, int net = -1);

}  // namespace epcomm::test
