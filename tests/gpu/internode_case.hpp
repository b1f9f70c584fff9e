// Normal mode across nodes, as one rank's part of a case: every rank's inputs and the CPU reference
// from one seed, the traffic the hierarchical algorithm must produce, and the run of one rank that
// checks its own outputs (recv rows, scales, topk, source indices, prefix matrix, receive plan and
// per-expert counts bit for bit; combine within BF16 rounding, its weights bit for bit; the cached
// dispatch bit for bit; the traffic counters). Ranks need nothing from each other but the calls,
// so the same body serves threads of one process (test_internode.cpp) and processes of fake nodes
// (tests/gin).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "normal_problem.hpp"

namespace epcomm::test {

struct InterCase : NormalProblem {
  InterCase() { ranks_per_node = 2; }
  int steps = 2;                // dispatch / combine / cached dispatch repeated on one buffer (flow control)
  int chunk = 0;                // Config::nvl_chunk_size (0: default)
  bool report_traffic = false;  // print every call's traffic counters (one line per rank and call)
  // The buffer is given no token limit (BufferOptions::max_tokens_per_rank 0; EPCOMM_MAX_TOKENS_PER_RANK
  // unless set), as a DeepEP client's: its first dispatch lays the rows out for what the region holds.
  bool token_limit_from_region = false;
  // > 1: num_rdma_bytes is the size hint divided by this, so dispatch (BF16) and combine run in
  // rounds of a window each; the test checks that more than one ran.
  int region_divisor = 1;
  // The buffer is made with low_latency_mode (SGLang's auto mode): normal mode's data halves lie on
  // the LL region (core/buffer.cpp); the steps are the same.
  bool low_latency_mode = false;
  // BufferOptions::internode_bf16_partials: each node's partial sum travels as BF16; the combine is
  // then checked within that extra rounding (NormalRank::expect_combine_bf16_partials).
  bool bf16_partials = false;
  // > 0: BufferOptions::internode_combine_nvl with num_nvl_bytes the pushed rows of every token
  // divided by this (the combine half then holds only the partials); with float32 partials the
  // test checks the combine ran the rounds Buffer::internode_windows gives for those sizes.
  int combine_nvl_divisor = 0;
};

std::string describe(const InterCase& c);

// Traffic the hierarchical algorithm must produce, from every rank's routing.
struct Traffic {
  std::vector<uint64_t> dispatch_net_rows;  // [rank]: tokens x other destination nodes
  std::vector<uint64_t> dispatch_nvl_rows;  // [rank]: rows received from a forwarder other than itself
  std::vector<uint64_t> combine_net_rows;   // [rank]: partial sums this forwarder sends over the network
};
Traffic expected_traffic(const std::vector<RankInputs>& in, int R, int P);

// The receive plan the count exchange must build for rank r (handle.chunk_offset): per source i,
// the first receive row of each chunk of `chunk` tokens, the end row in every later column, and the
// chunk (the source's cut: internode chunks are not balanced) in the last column.
std::vector<int32_t> expected_chunk_offset(const std::vector<RankInputs>& in, int r, int R, int chunk, int stride);

// Every rank's inputs and expected results (the same on every rank that builds it from the seed).
struct InterRun {
  uint64_t seed = 0;
  NormalReference reference;
  Traffic traffic;
};
InterRun make_inter_run(const InterCase& c, uint64_t seed);

// The buffer a case needs (internode region sized for it; 5 s timeout unless EPCOMM_TIMEOUT_MS).
BufferOptions inter_buffer_options(const InterCase& c);
// Rank r's steps on `buf`: layout, dispatch, combine, cached dispatch (steps times), the CUDA graph
// where the case asks, each output against the reference.
void run_inter_steps(const InterCase& c, const InterRun& run, int r, const std::shared_ptr<Group>& group, Buffer& buf);
// The same on a buffer of its own.
void run_inter_rank(const InterCase& c, const InterRun& run, int r, const std::shared_ptr<Group>& group);
// Every rank as a thread of this process (run_ranks), on a fresh seed.
void run_inter_case(const InterCase& c);

}  // namespace epcomm::test
