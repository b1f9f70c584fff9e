// Groups with more ranks than one warp has lanes (issue 21, docs/design-scale.md §3 and §5). Low latency:
// the receive's prefix over sources, the wait for every rank's `done`, the clean barrier and the
// network path's per-rank counters all stride over ranks past 32; past kMaxLsaRanks (72) the
// kernels reach only their node's ranks by load/store and the others through the network. Normal
// mode across nodes: 128 ranks (kMaxInterRanks).
//
// Ranks are threads of this process sharing the GPUs (one block each where they share one:
// test_num_sms), outputs against the CPU reference as in test_low_latency.cpp. A case whose ranks'
// blocks cannot all be resident at once on the GPUs here is skipped, naming what it needs.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <string>

#include "harness.hpp"
#include "internode_case.hpp"
#include "ll_case.hpp"
#include "ll_harness.hpp"

namespace epcomm::test {
namespace {

// Small rows, two experts per rank, Tmax 8: the point is the rank count, not the bytes.
LLCase scale_case(int R, int P) {
  LLCase c;
  c.num_ranks = R;
  c.ranks_per_node = P;
  c.hidden = 512;
  c.num_topk = 4;
  c.num_experts = 2 * R;
  c.max_tokens = 8;
  c.timeout_ms = 20000;                       // a rank's single block takes its turn among R on a shared GPU
  if (P > 0 && P < R) c.low_latency_net = 1;  // other nodes through the network (forced past 72 ranks)
  return c;
}

// Every rank's blocks resident at once (`blocks` each; one SM a GPU left for the rest).
bool fits_here(int R, int blocks, std::string& why) {
  const int gpus = std::max(device_count(), 1);
  cudaDeviceProp prop{};
  cuda_ok(cudaGetDeviceProperties(&prop, 0), "props");
  const int per_gpu = (R + gpus - 1) / gpus, room = (prop.multiProcessorCount - 1) / blocks;
  if (per_gpu <= room) return true;
  why = std::to_string(R) + " ranks of " + std::to_string(blocks) + " resident block(s) each need " +
        std::to_string((R + room - 1) / room) + " GPUs of " + std::to_string(prop.multiProcessorCount) + " SMs; " +
        std::to_string(gpus) + " visible";
  return false;
}

void run_scale(int R, int P) {
  std::string why;
  if (!fits_here(R, 1, why)) GTEST_SKIP() << why;
  LLCase c = scale_case(R, P);
  run_case(c);  // FP8, plain calls
  c.use_fp8 = false;
  c.hook = true;
  run_case(c);  // BF16 with hooks
}

// One node (every rank by load/store): 64 ranks, lanes past 31 in every per-rank wait.
TEST(ScaleGpu, LowLatency64RanksOneNode) { run_scale(64, 0); }

// 16 virtual nodes of 8 (128 ranks, past kMaxLsaRanks): the network path to other nodes, this
// node's ranks through the node-local peer table.
TEST(ScaleGpu, LowLatency128RanksVirtualNodes) { run_scale(128, 8); }

// DeepSeek's decoding scale, 40 nodes of 8 (needs 3 GPUs or more of 132 SMs).
TEST(ScaleGpu, LowLatency320RanksVirtualNodes) { run_scale(320, 8); }

// Normal mode across R / P virtual nodes, two SMs per rank, small rows.
void run_normal_scale(int R, int P) {
  InterCase c;
  c.num_ranks = R;
  c.ranks_per_node = P;
  c.hidden = 256;
  c.num_experts = 2 * R;
  c.max_tokens = 24;
  c.num_sms = 2;
  c.steps = 1;
  std::string why;
  if (!fits_here(c.num_ranks, c.num_sms + 1, why)) GTEST_SKIP() << why;  // + the count exchange's block
  run_inter_case(c);
}

// 32 ranks as 4 nodes of 8 and as 16 nodes of 2 (one GPU holds them).
TEST(ScaleGpu, NormalMode32RanksFourAndSixteenVirtualNodes) {
  run_normal_scale(32, 8);
  run_normal_scale(32, 2);
}

// 8 nodes of 8 (64 ranks: the last count table the receive plan stages in shared memory; 2 GPUs
// or more).
TEST(ScaleGpu, NormalMode64RanksEightVirtualNodes) { run_normal_scale(64, 8); }

// 16 nodes of 8 and 32 nodes of 4 (128 ranks, kMaxInterRanks: a token's destination ranks in 128
// bits, the receive plan's prefix a warp per column; 3 GPUs or more).
TEST(ScaleGpu, NormalMode128RanksSixteenAndThirtyTwoVirtualNodes) {
  run_normal_scale(128, 8);
  run_normal_scale(128, 4);
}

}  // namespace
}  // namespace epcomm::test
