// Low-latency test helpers shared by the LL, shrink-mode and stress tests: a case, random inputs
// of one round, one batch's device tensors and views, the download of its outputs, and the
// comparison of a round of every rank with the CPU reference (dispatch rows per (local expert,
// source rank) as sets, data and scales bit for bit; combine bit for bit through the GPU's own
// handles). Ranks masked in shrink mode are left out of the comparison.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "harness.hpp"

namespace epcomm::test {

struct LLCase {
  int num_ranks = 2;
  int hidden = 1024;
  int num_topk = 8;
  int num_experts = 16;
  int max_tokens = 64;    // Tmax
  int fixed_tokens = -1;  // >= 0: every rank has exactly this many tokens, else random (rank 0: Tmax)
  bool use_fp8 = true;
  bool round_scale = false;
  bool use_ue8m0 = false;
  bool hook = false;            // send and receive halves as two calls
  bool two_batches = false;     // two micro-batches interleaved: send A, send B, recv A, recv B (hook)
  bool zero_copy = false;       // y written into get_next_low_latency_combine_buffer
  int graph_replays = 0;        // > 0: capture dispatch + combine once, replay with new inputs
  bool clean_in_graph = false;  // ... with clean_low_latency_buffer first in the graph (SGLang's capture)
  bool out_of_range = false;    // also put ids >= E and < -1 into topk_idx (treated as -1)
  bool duplicates = false;      // some tokens list an expert twice (two rows, in k order)
  int order_mode = 0;           // 0: on the caller's stream, 1: async_finish + event, 2: previous_event
  double drop_rate = 0.1;
  int64_t timeout_ms = 5000;
  int ranks_per_node = 0;          // > 0: virtual nodes of this many ranks (Group::ranks_per_node)
  int low_latency_net = -1;        // BufferOptions::low_latency_net (1: sized with low_latency_net_size_hint)
  bool expect_network = false;     // the network path without asking for it (real nodes, tests/gin): sized
                                   // for it, its counters checked as with low_latency_net = 1
  uint32_t first_call_number = 0;  // BufferOptions::first_call_number (numbers near kLastCallNumber)
  int low_latency_per_rank = -1;   // BufferOptions::low_latency_per_rank (-1: the environment decides)
};

struct RoundInput {
  int num_tokens = 0;
  std::vector<uint16_t> x;
  std::vector<int64_t> topk;      // as the device gets it
  std::vector<int64_t> ref_topk;  // out-of-range ids replaced by -1
  std::vector<float> weights;
  std::vector<uint16_t> y;  // [E/R, R*Tmax, hidden]
};

struct RoundOutput {
  std::vector<int32_t> recv_count, src_info;
  std::vector<int64_t> layout_range;
  std::vector<uint8_t> recv_x;
  std::vector<float> scales;    // logical [E/R, R*Tmax, G]
  std::vector<int32_t> packed;  // logical [E/R, R*Tmax, ceil(G/4)]
  std::vector<uint16_t> out;
};

// One rank's low-latency set-up: a buffer sized for the case, with a stream of this rank's own
// (destroyed with it) and the order of calls on that stream.
struct RankBuffer {
  RankBuffer(const std::shared_ptr<Group>& group, const LLCase& c, int64_t timeout_ms, bool enable_shrink = false,
             size_t num_nvl_bytes = 0)
      : device(group->device()) {
    BufferOptions bo;
    bo.enable_shrink = enable_shrink;
    bo.num_nvl_bytes = num_nvl_bytes;
    // The network path's size where it may be taken (the option, or EPCOMM_LL_NET for -1).
    const char* env_net = std::getenv("EPCOMM_LL_NET");
    const bool net =
        c.low_latency_net == 1 || c.expect_network || (c.low_latency_net < 0 && env_net && std::atoi(env_net) != 0);
    bo.num_rdma_bytes = net ? Buffer::low_latency_net_size_hint(c.max_tokens, c.hidden, c.num_ranks, c.num_experts)
                            : Buffer::low_latency_size_hint(c.max_tokens, c.hidden, c.num_ranks, c.num_experts);
    bo.low_latency_net = c.low_latency_net;
    bo.timeout_ms = timeout_ms;
    bo.first_call_number = c.first_call_number;
    bo.low_latency_per_rank = c.low_latency_per_rank;
    // Past 32 ranks normal mode is out of reach: a buffer for low-latency mode alone.
    bo.low_latency_mode = c.num_ranks > 32;
    buffer = std::make_unique<Buffer>(group, bo);
    cuda_ok(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
    order = StreamOrder{stream, nullptr, false};
  }
  ~RankBuffer() { cudaStreamDestroy(stream); }
  void sync(const char* what) const { cuda_ok(cudaStreamSynchronize(stream), what); }
  std::unique_ptr<Buffer> buffer;
  cudaStream_t stream = nullptr;
  StreamOrder order;  // on `stream`, no previous event, no async finish
  int device = 0;
};

// Views of the outputs of one batch on one rank.
struct Batch {
  DeviceTensor x, topk, weights, y, recv_x, scales, count, src_info, range, out;
  LowLatencyDispatchInputs din;
  LowLatencyDispatchOutputs dout;
  LowLatencyCombineInputs cin;
  LowLatencyHandle handle;
};

std::string describe(const LLCase& c);

// A small case for the error-path tests.
LLCase small_case(int R, int Tmax, int H, int E, int K);

RoundInput make_input(const LLCase& c, uint64_t seed, int round, int rank, int num_tokens);

Batch make_batch(const LLCase& c, int R, int T, int dev, int sms, const DeviceTensor* cum, const DeviceTensor* dwait,
                 const DeviceTensor* cwait);
// A batch of T tokens on the case's R ranks, with the blocks of test_num_sms(R, 132), no stats tensors.
Batch make_batch(const LLCase& c, int T, int dev);

void upload_dispatch_inputs(Batch& b, const RoundInput& in);

void upload_y(const LLCase& c, Buffer& buf, Batch& b, const RoundInput& in);

RoundOutput download_dispatch(const LLCase& c, int R, const Batch& b);

// The first difference between round `in` / `got` of every rank and the reference ("" if none);
// masked as for compare_round. Thread-safe (no gtest assertions): the stress test's verifiers use it.
std::string check_round(const LLCase& c, const std::vector<RoundInput>& in, const std::vector<RoundOutput>& got,
                        const std::vector<uint8_t>& masked = {}, bool masked_from_dispatch = true);

// Compares round `round` of every rank (inputs `in`, what the GPU gave `got`) with the reference.
// masked: shrink mode's masked ranks ([R] 0/1, or empty): left out, and absent for the others
// (in the dispatch too unless masked_from_dispatch is false: a rank masked during the combine).
void compare_round(const LLCase& c, int round, const std::vector<RoundInput>& in, const std::vector<RoundOutput>& got,
                   const std::vector<uint8_t>& masked = {}, bool masked_from_dispatch = true);

}  // namespace epcomm::test
