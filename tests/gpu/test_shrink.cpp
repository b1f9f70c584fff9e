// Shrink mode (docs/contract.md §3.3, BufferOptions::enable_shrink) on the GPU: a rank stops taking part in
// the middle of a run. The others finish their low-latency calls within the timeout, with the
// results the reference gives when that rank is masked; the mask shows it; the next calls skip it
// without waiting; after clean_low_latency_buffer + low_latency_clean_mask_buffer on every rank all
// ranks work together again. Without shrink the same stall is a TimeoutError, as before, and the
// mask API refuses to mask.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <chrono>
#include <random>
#include <string>

#include "epcomm/error.hpp"
#include "harness.hpp"
#include "ll_harness.hpp"
#include "shrink_case.hpp"

namespace epcomm::test {
namespace {

constexpr int64_t kTimeoutMs = 1000;

TEST(ShrinkGpu, RankThatStopsIsMaskedSkippedAndCleanBringsItBack) {
  run_dead_rank(4, 1, /*stop_in_combine=*/false, kTimeoutMs);
}

TEST(ShrinkGpu, RankThatStopsBeforeCombineIsMaskedThere) { run_dead_rank(3, 2, /*stop_in_combine=*/true, kTimeoutMs); }

// The same through the network transport (BufferOptions::low_latency_net = 1) over virtual nodes:
// the dead rank is on another node for some ranks (2 x 2) or for all (4 x 1).
TEST(ShrinkGpu, NetworkPathRankThatStopsIsMaskedSkippedAndCleanBringsItBack) {
  run_dead_rank(4, 1, /*stop_in_combine=*/false, kTimeoutMs, /*P=*/2, /*net=*/1);
}
TEST(ShrinkGpu, NetworkPathRankThatStopsBeforeCombineIsMaskedThere) {
  run_dead_rank(4, 2, /*stop_in_combine=*/true, kTimeoutMs, /*P=*/1, /*net=*/1);
}

// The mask is device memory read by every kernel, so a captured CUDA graph follows it: ranks that
// mask a rank by hand replay the same graph without it (and without waiting), and after clean on
// every rank and clean_mask the same graph serves all ranks again.
TEST(ShrinkGpu, CudaGraphReplaysFollowTheMask) {
  const uint64_t seed = std::random_device{}();
  const int R = 3, away = 2;
  const LLCase c = shrink_case(R);
  SCOPED_TRACE(describe(c) + " seed=" + std::to_string(seed));
  constexpr int kReplays = 3;  // 0: all; 1: `away` masked by the others and absent; 2: all again
  std::vector<std::vector<RoundInput>> in(kReplays, std::vector<RoundInput>(R));
  for (int k = 0; k < kReplays; ++k)
    for (int r = 0; r < R; ++r) in[k][r] = make_input(c, seed, k, r, c.max_tokens);
  std::vector<std::vector<RoundOutput>> got(kReplays, std::vector<RoundOutput>(R));
  std::vector<double> secs(R, 0.0);
  const bool clean = run_ranks_cleanly(R, [&](int r, std::shared_ptr<Group> group) {
    RankBuffer rb(group, c, kTimeoutMs, /*enable_shrink=*/true);
    Buffer& buf = *rb.buffer;
    cudaStream_t s = rb.stream;
    Batch b = make_batch(c, c.max_tokens, rb.device);
    const StreamOrder& order = rb.order;
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    cuda_ok(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), "begin capture");
    buf.low_latency_dispatch(b.din, b.dout, b.handle, false, order);
    buf.low_latency_combine(b.cin, b.handle, b.out.view(), false, order);
    cuda_ok(cudaStreamEndCapture(s, &graph), "end capture");
    cuda_ok(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
    auto replay = [&](int k) {
      upload_dispatch_inputs(b, in[k][r]);
      b.y.upload(in[k][r].y);
      cuda_ok(cudaGraphLaunch(exec, s), "graph launch");
      cuda_ok(cudaStreamSynchronize(s), "graph replay");
      buf.check_device_errors();
      got[k][r] = download_dispatch(c, R, b);
      got[k][r].out = b.out.download<uint16_t>();
    };
    replay(0);
    if (r != away) {
      buf.low_latency_update_mask_buffer(away, true, s);
      const auto t0 = std::chrono::steady_clock::now();
      replay(1);
      secs[r] = seconds_since(t0);
    }
    buf.clean_low_latency_buffer(c.max_tokens, c.hidden, c.num_experts, s);
    buf.low_latency_clean_mask_buffer(s);
    replay(2);
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  });
  if (!clean) return;
  std::vector<uint8_t> masked(R, 0);
  masked[away] = 1;
  compare_round(c, 0, in[0], got[0]);
  compare_round(c, 1, in[1], got[1], masked);
  compare_round(c, 2, in[2], got[2]);
  for (int r = 0; r < R; ++r)
    if (r != away) EXPECT_LT(secs[r], 0.25 * kTimeoutMs / 1000) << "rank " << r << ": the masked replay waited";
}

// Without shrink mode nothing changes: the same stall is a TimeoutError naming the peer, masking by
// hand is refused, the mask stays empty, and clean_low_latency_buffer brings every rank back.
TEST(ShrinkGpu, WithoutShrinkAStallIsStillATimeoutError) {
  const uint64_t seed = std::random_device{}();
  const int R = 2;
  const LLCase c = shrink_case(R);
  run_ranks(R, [&](int r, std::shared_ptr<Group> group) {
    RankBuffer rb(group, c, kTimeoutMs, /*enable_shrink=*/false);
    Buffer& buf = *rb.buffer;
    cudaStream_t s = rb.stream;
    Batch b = make_batch(c, c.max_tokens, rb.device);
    DeviceTensor mask_t(DType::kI32, {R}, rb.device);
    RoundOutput out;
    expect_error<ArgumentError>([&] { buf.low_latency_update_mask_buffer(1 - r, true, s); }, {"enable_shrink"},
                                "masking without enable_shrink");
    buf.low_latency_update_mask_buffer(1 - r, false, s);  // unmasking is always fine
    expect_error<ArgumentError>([&] { buf.low_latency_update_mask_buffer(r, true, s); }, {"cannot mask itself"},
                                "a rank masking itself");
    if (r == 0) {
      const auto stalled = [&] { dispatch_half(c, buf, s, b, make_input(c, seed, 0, r, c.max_tokens), false, out); };
      expect_error<TimeoutError>(stalled, {"peer 1"}, "a silent peer without shrink mode");
      EXPECT_EQ(query_mask(buf, s, mask_t), mask_of(R, -1));
    }
    buf.clean_low_latency_buffer(c.max_tokens, c.hidden, c.num_experts, s);
    const RoundInput in = make_input(c, seed, 1, r, c.max_tokens);
    dispatch_half(c, buf, s, b, in, false, out);
    combine_half(c, buf, s, b, in, false, out);
  });
}

}  // namespace
}  // namespace epcomm::test
