// Low-latency dispatch / combine on the GPU against the CPU reference, on fresh random inputs with
// -1 (and out-of-range) topk entries. Every rank runs its rounds on the GPU and keeps what it got;
// the comparison runs afterwards on the host: dispatch rows per (local expert, source rank) as sets
// (data and scales bit for bit), counts and ranges exactly; combine against the reference evaluated
// through the GPU's own handle (src_info, layout_range): bit for bit on the per-expert combine, within
// the partials' bound on the per-rank one (the default where it fits, ll_harness.cpp).
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <random>
#include <string>

#include "harness.hpp"
#include "ll_case.hpp"
#include "ll_harness.hpp"

namespace epcomm::test {
namespace {

// Low-latency mode across (virtual) nodes through the network transport (BufferOptions::
// low_latency_net = 1, EPCOMM_LL_NET): every LL feature once per split (ll_network_cases).
std::vector<LLCase> net_cases(int P) { return ll_network_cases(4, P); }

TEST(InternodeLowLatencyNet, TwoNodesOfTwo) {
  for (const LLCase& c : net_cases(2)) run_case(c);
}

TEST(InternodeLowLatencyNet, FourNodesOfOne) {
  for (const LLCase& c : net_cases(1)) run_case(c);
}

TEST(InternodeLowLatencyNet, TwoNodesOfOne) {
  LLCase c = net_cases(1)[0];
  c.num_ranks = 2;
  c.num_experts = 8;
  run_case(c);
  c.use_fp8 = false;
  c.hook = true;
  run_case(c);
}

// The switch: one node, or low_latency_net = 0, keeps the LSA path (no puts).
TEST(InternodeLowLatencyNet, OneNodeOrSwitchOffKeepsLsa) {
  for (int P : {4, 2}) {
    LLCase c = net_cases(P)[0];
    c.low_latency_net = P == 4 ? 1 : 0;
    run_ranks(
        4,
        [&](int, std::shared_ptr<Group> group) {
          RankBuffer rb(group, c, c.timeout_ms);
          EXPECT_FALSE(rb.buffer->low_latency_uses_network()) << "P=" << P;
        },
        P);
    run_case(c);
  }
}

// The size hint against DeepEP's and the per-rank overlays are host-only: tests/cpu/test_geometry_ranks.cpp.
// Many calls into the same buffers: test_low_latency_many_calls.cpp; errors and the ways back:
// test_low_latency_recovery.cpp.

TEST(LowLatencyGpu, Fp8AllRankCounts) {
  for (int R : {2, 3, 4}) {
    LLCase c;
    c.num_ranks = R;
    c.num_experts = 8 * R;
    c.out_of_range = R == 3;
    run_case(c);
  }
}

TEST(LowLatencyGpu, Bf16AllRankCounts) {
  for (int R : {2, 3, 4}) {
    LLCase c;
    c.num_ranks = R;
    c.use_fp8 = false;
    c.hidden = 768;
    c.num_experts = 6 * R;
    c.num_topk = 6;
    run_case(c);
  }
}

TEST(LowLatencyGpu, RoundScaleAndUe8m0) {
  LLCase c;
  c.num_ranks = 3;
  c.num_experts = 12;
  c.hidden = 640;  // 5 scale groups: the last packed word is partial
  c.round_scale = true;
  run_case(c);
  c.use_ue8m0 = true;
  run_case(c);
}

TEST(LowLatencyGpu, StreamOrders) {
  for (int mode : {1, 2}) {
    LLCase c;
    c.num_ranks = 2;
    c.order_mode = mode;
    c.hook = mode == 2;
    run_case(c);
  }
}

// A call with async_finish whose event nobody waits for, then calls on the caller's stream (which
// launch there, not on the comm stream): they still come after it, as on DeepEP's comm stream.
// Without that, combine A would run beside dispatch A and read its plan before it is written.
TEST(LowLatencyGpu, UnwaitedAsyncCallThenCallsOnTheCallersStream) {
  LLCase c;
  c.num_ranks = 2;
  c.max_tokens = 64;
  c.hidden = 2048;  // long enough that A is still running when B is launched
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(describe(c) + " seed=" + std::to_string(seed));
  const int R = c.num_ranks;
  std::vector<std::vector<RoundInput>> in(2, std::vector<RoundInput>(R));
  for (int k = 0; k < 2; ++k)
    for (int r = 0; r < R; ++r) in[k][r] = make_input(c, seed, k, r, c.max_tokens);
  std::vector<std::vector<RoundOutput>> got(2, std::vector<RoundOutput>(R));
  const bool clean = run_ranks_cleanly(R, [&](int r, std::shared_ptr<Group> group) {
    RankBuffer rb(group, c, c.timeout_ms);
    Buffer& buf = *rb.buffer;
    cudaStream_t stream = rb.stream;
    const StreamOrder& direct = rb.order;
    const StreamOrder async{stream, nullptr, true};
    // 16 blocks each: the kernels do not fill the GPU, so nothing but the order keeps B from running
    // beside A.
    Batch a = make_batch(c, R, c.max_tokens, rb.device, 16, nullptr, nullptr, nullptr);
    Batch b = make_batch(c, R, c.max_tokens, rb.device, 16, nullptr, nullptr, nullptr);
    upload_dispatch_inputs(a, in[0][r]);
    upload_dispatch_inputs(b, in[1][r]);
    upload_y(c, buf, a, in[0][r]);
    upload_y(c, buf, b, in[1][r]);
    Event ea = buf.low_latency_dispatch(a.din, a.dout, a.handle, false, async);  // not waited for
    buf.low_latency_combine(a.cin, a.handle, a.out.view(), false, direct);       // reads A's plan
    buf.low_latency_dispatch(b.din, b.dout, b.handle, false, direct);
    Event eb = buf.low_latency_combine(b.cin, b.handle, b.out.view(), false, async);
    eb.wait_on(stream);
    cuda_ok(cudaStreamSynchronize(stream), "the four calls");
    buf.check_device_errors();
    got[0][r] = download_dispatch(c, R, a);
    got[1][r] = download_dispatch(c, R, b);
    got[0][r].out = a.out.download<uint16_t>();
    got[1][r].out = b.out.download<uint16_t>();
  });
  if (!clean) return;
  for (int k = 0; k < 2; ++k) compare_round(c, k, in[k], got[k]);
}

TEST(LowLatencyGpu, DuplicateExpertsInAToken) {
  LLCase c;
  c.num_ranks = 3;
  c.num_experts = 24;
  c.duplicates = true;
  c.drop_rate = 0.05;
  run_case(c);
}

TEST(LowLatencyGpu, HookMode) {
  LLCase c;
  c.num_ranks = 4;
  c.num_experts = 32;
  c.hook = true;
  run_case(c);
}

TEST(LowLatencyGpu, TwoMicroBatchesWithHooks) {
  LLCase c;
  c.num_ranks = 3;
  c.num_experts = 24;
  c.two_batches = true;
  run_case(c);
  c.zero_copy = true;
  c.use_fp8 = false;
  run_case(c);
}

TEST(LowLatencyGpu, ZeroCopy) {
  LLCase c;
  c.num_ranks = 2;
  c.zero_copy = true;
  run_case(c);
}

TEST(LowLatencyGpu, GraphReplays) {
  LLCase c;
  c.num_ranks = 4;
  c.num_experts = 16;
  c.hidden = 512;
  c.max_tokens = 32;
  c.num_topk = 4;
  c.graph_replays = 100;
  run_case(c);
  c.graph_replays = 10;
  c.hook = true;
  c.num_ranks = 2;
  run_case(c);
}

TEST(LowLatencyGpu, SmallAndEdgeShapes) {
  for (int t : {0, 1}) {
    LLCase c;
    c.fixed_tokens = t;
    c.max_tokens = 8;
    run_case(c);
  }
  {
    LLCase one;  // a single rank: everything local
    one.num_ranks = 1;
    one.num_experts = 8;
    run_case(one);
  }
  LLCase c;  // E < 16 (fewer combine rows per token), hidden = 128 (one scale group), K = E
  c.num_ranks = 2;
  c.num_experts = 4;
  c.num_topk = 4;
  c.hidden = 128;
  c.max_tokens = 16;
  run_case(c);
  c.num_topk = 16;  // top-16 with 64 experts per rank
  c.num_experts = 128;
  c.hidden = 256;
  c.max_tokens = 40;
  run_case(c);
}

TEST(LowLatencyGpu, StandardShape) {
  LLCase c;  // docs/contract.md §7: 128 tokens, hidden 7168, top-8, 288 experts, FP8 dispatch
  c.num_ranks = 4;
  c.num_experts = 288;
  c.hidden = 7168;
  c.max_tokens = 128;
  c.fixed_tokens = 128;
  c.drop_rate = 0.0;
  run_case(c);
}

// The per-rank dispatch (EPCOMM_LL_PER_RANK >= 1) stages a token once per destination rank inside the
// per-expert messages' area: it must fit there for every E/R >= 2 (and FP8 always), so the buffer
// does not grow. The cases after it run through whichever path the environment selects.
// Shapes where EPCOMM_LL_PER_RANK=2, 3 or 4 also takes the per-rank combine (E/R >= 26 with kslots =
// 16, LowLatencyLayout::per_rank_combine_fits): plain, hook, two micro-batches with zero copy and
// BF16, CUDA graph replays with top-16 and duplicates. With 2, 3 or 4 (the default) the combine is
// checked within the partials' bound (ll_harness.cpp); with 0 or 1 they run the per-expert combine
// (bit-exact).
TEST(LowLatencyGpu, PerRankCombineShapes) {
  LLCase c;
  c.num_ranks = 4;
  c.num_experts = 128;
  c.hidden = 512;
  run_case(c);
  c.hook = true;
  run_case(c);
  c.hook = false;
  c.two_batches = true;
  c.zero_copy = true;
  c.use_fp8 = false;
  run_case(c);
  LLCase g;
  g.num_ranks = 3;
  g.num_experts = 84;
  g.num_topk = 16;
  g.hidden = 256;
  g.max_tokens = 32;
  g.graph_replays = 20;
  g.duplicates = true;
  run_case(g);
}

// Tokens whose experts fall on every rank, several per rank (and twice the same), with drops: the
// per-rank path's fan-out of one staged token into several rows of one rank.
TEST(LowLatencyGpu, SeveralExpertsOfOneRankPerToken) {
  for (bool fp8 : {true, false}) {
    LLCase c;
    c.num_ranks = 4;
    c.num_experts = 16;
    c.num_topk = 12;
    c.use_fp8 = fp8;
    c.hidden = fp8 ? 1024 : 384;
    c.duplicates = true;
    c.drop_rate = 0.1;
    run_case(c);
  }
  LLCase one;  // one expert per rank: FP8 takes the per-rank path, BF16 the per-expert one
  one.num_ranks = 4;
  one.num_experts = 4;
  one.num_topk = 4;
  one.hidden = 256;
  run_case(one);
  one.use_fp8 = false;
  run_case(one);
}

}  // namespace
}  // namespace epcomm::test
