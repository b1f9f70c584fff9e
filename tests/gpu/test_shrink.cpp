// Shrink mode (SPEC.md §3.3, BufferOptions::enable_shrink) on the GPU: a rank stops taking part in
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

namespace epcomm::test {
namespace {

constexpr int64_t kTimeoutMs = 1000;

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// `m` is allocated once per rank, before its first call: ranks that share a GPU are threads of one
// process, and a cudaFree here would wait for a co-resident rank's kernel that may be waiting (up to
// the timeout) for a masked rank, making this rank late enough to be masked as well.
std::vector<int32_t> query_mask(Buffer& buf, cudaStream_t stream, DeviceTensor& m) {
  buf.low_latency_query_mask_buffer(m.view(), stream);
  cuda_ok(cudaStreamSynchronize(stream), "sync after query");
  return m.download<int32_t>();
}

std::vector<int32_t> mask_of(int R, int masked_rank) {
  std::vector<int32_t> m(R, 0);
  if (masked_rank >= 0) m[masked_rank] = 1;
  return m;
}

// The halves of one LL round; `do_combine` = false leaves after the dispatch.
void dispatch_half(const LLCase& c, Buffer& buf, cudaStream_t stream, Batch& b, const RoundInput& in, bool hook,
                   RoundOutput& out) {
  const StreamOrder order{stream, nullptr, false};
  upload_dispatch_inputs(b, in);
  buf.low_latency_dispatch(b.din, b.dout, b.handle, hook, order);
  if (hook) buf.low_latency_dispatch_recv(b.din, b.dout, b.handle, order);
  cuda_ok(cudaStreamSynchronize(stream), "sync after dispatch");
  buf.check_device_errors();
  out = download_dispatch(c, c.num_ranks, b);
}

void combine_half(const LLCase& c, Buffer& buf, cudaStream_t stream, Batch& b, const RoundInput& in, bool hook,
                  RoundOutput& out) {
  const StreamOrder order{stream, nullptr, false};
  upload_y(c, buf, b, in);
  buf.low_latency_combine(b.cin, b.handle, b.out.view(), hook, order);
  if (hook) buf.low_latency_combine_recv(b.cin, b.handle, b.out.view(), order);
  cuda_ok(cudaStreamSynchronize(stream), "sync after combine");
  buf.check_device_errors();
  out.out = b.out.download<uint16_t>();
}

// P > 0: virtual nodes of P ranks; net = 1: LL through the network transport to other nodes.
LLCase shrink_case(int R, int P = 0, int net = -1) {
  LLCase c;
  c.ranks_per_node = P;
  c.low_latency_net = net;
  c.num_ranks = R;
  c.hidden = 512;
  c.num_topk = 4;
  c.num_experts = 4 * R;
  c.max_tokens = 32;
  c.drop_rate = 0.05;
  return c;
}

// stop_in_combine: the dead rank still makes round 1's dispatch and stops before its combine (so the
// others mask it in the combine), else it makes no call of round 1 at all.
void run_dead_rank(int R, int dead, bool stop_in_combine, int P = 0, int net = -1) {
  const uint64_t seed = std::random_device{}();
  const LLCase c = shrink_case(R, P, net);
  SCOPED_TRACE(describe(c) + " dead rank " + std::to_string(dead) + (stop_in_combine ? " (stops in combine)" : "") +
               " seed=" + std::to_string(seed));
  constexpr int kRounds = 5;  // 0: all; 1: dead rank stops; 2: it stays away (hooks); 3: all again; 4: masked by hand
  std::vector<int> tokens(R);
  for (int r = 0; r < R; ++r) {
    std::mt19937_64 rng(seed + 31 * r);
    tokens[r] = r == 0 ? c.max_tokens : std::uniform_int_distribution<int>(1, c.max_tokens)(rng);
  }
  std::vector<std::vector<RoundInput>> in(kRounds, std::vector<RoundInput>(R));
  for (int k = 0; k < kRounds; ++k)
    for (int r = 0; r < R; ++r) in[k][r] = make_input(c, seed, k, r, tokens[r]);
  std::vector<std::vector<RoundOutput>> got(kRounds, std::vector<RoundOutput>(R));
  std::vector<std::vector<double>> secs(kRounds, std::vector<double>(R, 0.0));
  std::vector<std::vector<std::vector<int32_t>>> masks(kRounds, std::vector<std::vector<int32_t>>(R));

  const auto* result = ::testing::UnitTest::GetInstance()->current_test_info()->result();
  const int parts_before = result->total_part_count();
  run_ranks(R, [&](int r, std::shared_ptr<Group> group) {
    RankBuffer rb(group, c, kTimeoutMs, /*enable_shrink=*/true);
    Buffer& buf = *rb.buffer;
    cudaStream_t s = rb.stream;
    Batch b = make_batch(c, R, tokens[r], group->device(), test_num_sms(R, 132), nullptr, nullptr, nullptr);
    DeviceTensor mask_t(DType::kI32, {R}, group->device());
    auto round = [&](int k, bool hook) {
      const auto t0 = std::chrono::steady_clock::now();
      dispatch_half(c, buf, s, b, in[k][r], hook, got[k][r]);
      combine_half(c, buf, s, b, in[k][r], hook, got[k][r]);
      secs[k][r] = seconds_since(t0);
      masks[k][r] = query_mask(buf, s, mask_t);
    };
    round(0, false);
    if (r != dead) {
      round(1, false);  // the dead rank stops answering here: masked after the timeout
      round(2, true);   // skipped without waiting
    } else if (stop_in_combine) {
      dispatch_half(c, buf, s, b, in[1][r], false, got[1][r]);
    }
    // Every rank, the dead one included, brings the group back: counters and regions, then the mask.
    buf.clean_low_latency_buffer(c.max_tokens, c.hidden, c.num_experts, s);
    EXPECT_EQ(query_mask(buf, s, mask_t), mask_of(R, r == dead ? -1 : dead)) << "rank " << r << ": clean keeps the mask";
    buf.low_latency_clean_mask_buffer(s);
    round(3, false);
    // Masking by hand: the live ranks mask the dead rank before it stops; nobody waits for it.
    if (r != dead) {
      buf.low_latency_update_mask_buffer(dead, true, s);
      round(4, false);
      buf.low_latency_update_mask_buffer(dead, false, s);
      EXPECT_EQ(query_mask(buf, s, mask_t), mask_of(R, -1)) << "rank " << r << ": unmasked by hand";
    }
  }, c.ranks_per_node);
  if (result->total_part_count() != parts_before) return;  // a rank failed: its outputs are incomplete

  std::vector<uint8_t> masked(R, 0);
  masked[dead] = 1;
  compare_round(c, 0, in[0], got[0]);
  compare_round(c, 1, in[1], got[1], masked, /*masked_from_dispatch=*/!stop_in_combine);
  compare_round(c, 2, in[2], got[2], masked);
  compare_round(c, 3, in[3], got[3]);
  compare_round(c, 4, in[4], got[4], masked);
  for (int r = 0; r < R; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    EXPECT_EQ(masks[0][r], mask_of(R, -1));
    EXPECT_EQ(masks[3][r], mask_of(R, -1)) << "after low_latency_clean_mask_buffer";
    if (r == dead) continue;
    EXPECT_EQ(masks[1][r], mask_of(R, dead)) << "the dead rank is masked after the round it missed";
    EXPECT_EQ(masks[2][r], mask_of(R, dead));
    EXPECT_EQ(masks[4][r], mask_of(R, dead));
    // Round 1 waited about one timeout per half at most; rounds 2 and 4 never wait for the dead rank.
    EXPECT_LT(secs[1][r], 3.0 * kTimeoutMs / 1000 + 2.0) << "round 1 took " << secs[1][r] << " s";
    EXPECT_GE(secs[1][r], 0.5 * kTimeoutMs / 1000) << "round 1 cannot finish before the timeout";
    EXPECT_LT(secs[2][r], 0.25 * kTimeoutMs / 1000) << "round 2 took " << secs[2][r] << " s: it waited";
    EXPECT_LT(secs[4][r], 0.25 * kTimeoutMs / 1000) << "round 4 took " << secs[4][r] << " s: it waited";
  }
}

TEST(ShrinkGpu, RankThatStopsIsMaskedSkippedAndCleanBringsItBack) { run_dead_rank(4, 1, /*stop_in_combine=*/false); }

TEST(ShrinkGpu, RankThatStopsBeforeCombineIsMaskedThere) { run_dead_rank(3, 2, /*stop_in_combine=*/true); }

// The same through the network transport (BufferOptions::low_latency_net = 1) over virtual nodes:
// the dead rank is on another node for some ranks (2 x 2) or for all (4 x 1).
TEST(ShrinkGpu, NetworkPathRankThatStopsIsMaskedSkippedAndCleanBringsItBack) {
  run_dead_rank(4, 1, /*stop_in_combine=*/false, /*P=*/2, /*net=*/1);
}
TEST(ShrinkGpu, NetworkPathRankThatStopsBeforeCombineIsMaskedThere) {
  run_dead_rank(4, 2, /*stop_in_combine=*/true, /*P=*/1, /*net=*/1);
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
  const auto* result = ::testing::UnitTest::GetInstance()->current_test_info()->result();
  const int parts_before = result->total_part_count();
  run_ranks(R, [&](int r, std::shared_ptr<Group> group) {
    RankBuffer rb(group, c, kTimeoutMs, /*enable_shrink=*/true);
    Buffer& buf = *rb.buffer;
    cudaStream_t s = rb.stream;
    Batch b = make_batch(c, R, c.max_tokens, group->device(), test_num_sms(R, 132), nullptr, nullptr, nullptr);
    const StreamOrder order{s, nullptr, false};
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
  if (result->total_part_count() != parts_before) return;
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
    Batch b = make_batch(c, R, c.max_tokens, group->device(), test_num_sms(R, 132), nullptr, nullptr, nullptr);
    DeviceTensor mask_t(DType::kI32, {R}, group->device());
    RoundOutput out;
    try {
      buf.low_latency_update_mask_buffer(1 - r, true, s);
      ADD_FAILURE() << "masking without enable_shrink was accepted";
    } catch (const ArgumentError& e) {
      EXPECT_NE(std::string(e.what()).find("enable_shrink"), std::string::npos) << e.what();
    }
    buf.low_latency_update_mask_buffer(1 - r, false, s);  // unmasking is always fine
    try {
      buf.low_latency_update_mask_buffer(r, true, s);
      ADD_FAILURE() << "a rank masked itself";
    } catch (const ArgumentError& e) {
      EXPECT_NE(std::string(e.what()).find("cannot mask itself"), std::string::npos) << e.what();
    }
    if (r == 0) {
      try {
        dispatch_half(c, buf, s, b, make_input(c, seed, 0, r, c.max_tokens), false, out);
        ADD_FAILURE() << "no timeout without shrink mode";
      } catch (const TimeoutError& e) {
        EXPECT_NE(std::string(e.what()).find("peer 1"), std::string::npos) << e.what();
      }
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
