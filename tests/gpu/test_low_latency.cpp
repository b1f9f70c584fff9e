// Low-latency dispatch / combine on the GPU against the CPU reference, on fresh random inputs with
// -1 (and out-of-range) topk entries. Every rank runs its rounds on the GPU and keeps what it got;
// the comparison runs afterwards on the host: dispatch rows per (local expert, source rank) as sets
// (data and scales bit for bit), counts and ranges exactly; combine against the reference evaluated
// through the GPU's own handle (src_info, layout_range): bit for bit on the per-expert combine, within
// the partials' bound on the per-rank one (the default where it fits, ll_harness.cpp).
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <tuple>

#include "epcomm/error.hpp"
#include "harness.hpp"
#include "ll_case.hpp"
#include "ll_harness.hpp"
#include "kernels/low_latency/params.hpp"

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
    run_ranks(4, [&](int, std::shared_ptr<Group> group) {
      RankBuffer rb(group, c, c.timeout_ms);
      EXPECT_FALSE(rb.buffer->low_latency_uses_network()) << "P=" << P;
    }, P);
    run_case(c);
  }
}

// The size hint against DeepEP's and the per-rank overlays are host-only: tests/cpu/test_geometry_ranks.cpp.

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
  const auto* result = ::testing::UnitTest::GetInstance()->current_test_info()->result();
  const int parts_before = result->total_part_count();
  run_ranks(R, [&](int r, std::shared_ptr<Group> group) {
    const int dev = group->device();
    RankBuffer rb(group, c, c.timeout_ms);
    Buffer& buf = *rb.buffer;
    cudaStream_t stream = rb.stream;
    const StreamOrder direct{stream, nullptr, false}, async{stream, nullptr, true};
    // 16 blocks each: the kernels do not fill the GPU, so nothing but the order keeps B from running
    // beside A.
    Batch a = make_batch(c, R, c.max_tokens, dev, 16, nullptr, nullptr, nullptr);
    Batch b = make_batch(c, R, c.max_tokens, dev, 16, nullptr, nullptr, nullptr);
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
  if (result->total_part_count() != parts_before) return;
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

// Many calls into the same two buffers, as the bench makes them: FP8 and BF16 dispatches take
// turns in each buffer (their per-rank staging slots have different strides), some rounds with
// hooks, zero-copy combine input (written into the dispatch area) or a combine repeated on one
// handle, then a CUDA graph of four dispatch + combine pairs (mixed formats and hooks) replayed
// with new inputs. Odd ranks start each dispatch late, so the others look for tokens before they
// land: the per-rank path once kept its token flags inside the staging slots, where the previous
// call's rows (other format, or zero copy) read as arrived flags (the bench hung in the combine
// after a few hundred calls). Every round is checked against the reference.
void run_many_calls(const LLCase& base, int eager_rounds, int graph_replays) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("many calls: " + describe(base) + " seed=" + std::to_string(seed));
  constexpr int kGraphPairs = 4;
  const int R = base.num_ranks;
  const int rounds = eager_rounds + kGraphPairs * graph_replays;
  // Round k's variant: format alternating every two rounds (so each buffer alternates), hooks,
  // zero copy, a repeated combine. Graph pair i: fp8, bf16 + hooks, bf16, fp8 + hooks.
  auto variant = [&](int k) {
    LLCase c = base;
    if (k < eager_rounds) {
      c.use_fp8 = (k / 2) % 2 == 0;
      c.hook = k % 3 == 1;
      c.zero_copy = k % 3 == 2;
    } else {
      const int i = (k - eager_rounds) % kGraphPairs;
      c.use_fp8 = i == 0 || i == 3;
      c.hook = i % 2 == 1;
    }
    return c;
  };
  auto repeat_combine = [&](int k) { return k < eager_rounds && k % 5 == 4; };
  std::vector<int> tokens(R);
  for (int r = 0; r < R; ++r) {
    std::mt19937_64 rng(seed + 17 * r);
    tokens[r] = r == 0 ? base.max_tokens : std::uniform_int_distribution<int>(1, base.max_tokens)(rng);
  }
  std::vector<std::vector<RoundInput>> in(rounds, std::vector<RoundInput>(R));
  for (int k = 0; k < rounds; ++k)
    for (int r = 0; r < R; ++r) in[k][r] = make_input(variant(k), seed, k, r, tokens[r]);
  std::vector<std::vector<RoundOutput>> got(rounds, std::vector<RoundOutput>(R));

  const auto* result = ::testing::UnitTest::GetInstance()->current_test_info()->result();
  const int parts_before = result->total_part_count();
  run_ranks(R, [&](int r, std::shared_ptr<Group> group) {
    const int dev = group->device();
    const int sms = test_num_sms(R, 132);
    RankBuffer rb(group, base, base.timeout_ms);
    Buffer& buf = *rb.buffer;
    cudaStream_t stream = rb.stream;
    const StreamOrder order{stream, nullptr, false};
    const int T = tokens[r];
    auto sync = [&](const char* what) { cuda_ok(cudaStreamSynchronize(stream), what); };
    auto late = [&] {
      if (r % 2 == 1) std::this_thread::sleep_for(std::chrono::milliseconds(2));
    };
    auto dispatch = [&](Batch& b, const LLCase& c) {
      buf.low_latency_dispatch(b.din, b.dout, b.handle, c.hook, order);
      if (c.hook) buf.low_latency_dispatch_recv(b.din, b.dout, b.handle, order);
    };
    auto combine = [&](Batch& b, const LLCase& c) {
      buf.low_latency_combine(b.cin, b.handle, b.out.view(), c.hook, order);
      if (c.hook) buf.low_latency_combine_recv(b.cin, b.handle, b.out.view(), order);
    };

    // Every device tensor before the first call: ranks that share a GPU must not allocate or free
    // while a co-resident rank's kernel may wait for them (README "Limits").
    std::vector<Batch> eager;
    for (int k = 0; k < eager_rounds; ++k) eager.push_back(make_batch(variant(k), R, T, dev, sms, nullptr, nullptr, nullptr));
    std::vector<Batch> g;
    for (int i = 0; i < kGraphPairs; ++i) g.push_back(make_batch(variant(eager_rounds + i), R, T, dev, sms, nullptr, nullptr, nullptr));

    for (int k = 0; k < eager_rounds; ++k) {
      const LLCase c = variant(k);
      Batch& b = eager[k];
      upload_dispatch_inputs(b, in[k][r]);
      b.out.fill_bytes(0);
      late();
      dispatch(b, c);
      sync("dispatch");
      EXPECT_EQ(b.handle.buffer_index, k % 2) << "round " << k;
      got[k][r] = download_dispatch(c, R, b);
      upload_y(c, buf, b, in[k][r]);
      combine(b, c);
      if (repeat_combine(k)) {
        sync("combine");
        b.out.fill_bytes(0);
        combine(b, c);  // the same handle again: the same rows, the next combine number
      }
      sync("combine");
      got[k][r].out = b.out.download<uint16_t>();
    }

    for (int i = 0; i < kGraphPairs; ++i) upload_dispatch_inputs(g[i], in[eager_rounds + i][r]);
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    cuda_ok(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "begin capture");
    for (int i = 0; i < kGraphPairs; ++i) {
      const LLCase c = variant(eager_rounds + i);
      dispatch(g[i], c);
      combine(g[i], c);
    }
    cuda_ok(cudaStreamEndCapture(stream, &graph), "end capture");
    cuda_ok(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
    for (int m = 0; m < graph_replays; ++m) {
      for (int i = 0; i < kGraphPairs; ++i) {
        const int k = eager_rounds + m * kGraphPairs + i;
        upload_dispatch_inputs(g[i], in[k][r]);
        g[i].y.upload(in[k][r].y);
        g[i].out.fill_bytes(0);
      }
      late();
      cuda_ok(cudaGraphLaunch(exec, stream), "graph launch");
      sync("graph replay");
      for (int i = 0; i < kGraphPairs; ++i) {
        const int k = eager_rounds + m * kGraphPairs + i;
        got[k][r] = download_dispatch(variant(k), R, g[i]);
        got[k][r].out = g[i].out.download<uint16_t>();
      }
    }
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    buf.check_device_errors();
    if (base.low_latency_net == 1 && base.ranks_per_node > 0 && base.ranks_per_node < R) {
      EXPECT_TRUE(buf.low_latency_uses_network()) << "rank " << r;
      EXPECT_GT(buf.low_latency_net_stats().puts, 0u) << "rank " << r << ": no network puts";
    }
  }, base.ranks_per_node);
  if (result->total_part_count() != parts_before) return;  // a rank failed: its outputs are incomplete
  for (int k = 0; k < rounds; ++k) {
    SCOPED_TRACE("round " + std::to_string(k) + ": " + describe(variant(k)) +
                 (repeat_combine(k) ? " combine repeated" : ""));
    compare_round(variant(k), k, in[k], got[k]);
  }
}

// The bench's call sequence in small (EPCOMM_LL_PER_RANK=2..4 also take the per-rank combine here:
// E/R >= 26) and with few experts per rank (per-rank dispatch, per-expert combine).
TEST(LowLatencyGpu, ManyCallsMixedFormatsHooksZeroCopyAndGraph) {
  LLCase c;
  c.num_ranks = 4;
  c.num_experts = 128;
  c.hidden = 256;
  c.max_tokens = 32;
  run_many_calls(c, 16, 3);
  LLCase d;
  d.num_ranks = 2;
  d.num_experts = 16;
  d.hidden = 1024;
  d.max_tokens = 32;
  run_many_calls(d, 16, 3);
}

// The last call numbers a buffer has (every flag of these calls compares numbers with the top bit
// set against flags left at 0 or at lower numbers): the same mix of calls, verified.
TEST(LowLatencyGpu, ManyCallsWithTheLastCallNumbers) {
  LLCase c;
  c.num_ranks = 2;
  c.num_experts = 16;
  c.hidden = 1024;
  c.max_tokens = 32;
  c.first_call_number = kLastCallNumber - 100;  // 16 + 3 eager rounds (+ repeated combines), 12 in graphs
  run_many_calls(c, 16, 3);
}

// The bench's call sequence in small through the network path: formats alternating in each
// buffer, hooks, zero copy, a combine repeated on one handle, a graph of four mixed pairs replayed,
// odd ranks 2 ms late; every round against the reference (the shadows must stay in step).
TEST(InternodeLowLatencyNet, ManyCallsMixedFormatsHooksZeroCopyAndGraph) {
  for (int P : {2, 1}) {
    LLCase c;
    c.num_ranks = 4;
    c.num_experts = 16;
    c.hidden = 256;
    c.max_tokens = 32;
    c.ranks_per_node = P;
    c.low_latency_net = 1;
    run_many_calls(c, 12, 3);
  }
}

// An error-path test's ranks: each gets a buffer (timeout `timeout_ms`) with its stream, a batch of
// Tmax tokens and the inputs of round 0 (`seed`), uploaded, and runs `body` with them.
using ErrorPathBody = std::function<void(int rank, Buffer& buf, cudaStream_t stream, const StreamOrder& order, Batch& b,
                                         const RoundInput& in)>;
void run_error_path(const LLCase& c, int64_t timeout_ms, uint64_t seed, const ErrorPathBody& body) {
  run_ranks(c.num_ranks, [&](int r, std::shared_ptr<Group> group) {
    RankBuffer rb(group, c, timeout_ms);
    const int R = c.num_ranks;
    Batch b = make_batch(c, R, c.max_tokens, group->device(), test_num_sms(R, 132), nullptr, nullptr, nullptr);
    const RoundInput in = make_input(c, seed, 0, r, c.max_tokens);
    upload_dispatch_inputs(b, in);
    body(r, *rb.buffer, rb.stream, StreamOrder{rb.stream, nullptr, false}, b, in);
  });
}

TEST(LowLatencyGpu, ArgumentErrorsLeaveTheBufferUsable) {
  const int R = 2, Tmax = 16, H = 256, E = 8, K = 4;
  const LLCase c = small_case(R, Tmax, H, E, K);
  run_error_path(c, 5000, 99, [&](int r, Buffer& buf, cudaStream_t stream, const StreamOrder& order, Batch& b,
                                  const RoundInput& in) {
    const int dev = buf.device();
    auto expect_error = [&](LowLatencyDispatchInputs din, LowLatencyDispatchOutputs dout, const std::string& needle) {
      LowLatencyHandle h;
      try {
        buf.low_latency_dispatch(din, dout, h, false, order);
        ADD_FAILURE() << "no error; expected one mentioning '" << needle << "'";
      } catch (const ArgumentError& e) {
        EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      }
    };
    LowLatencyDispatchInputs d = b.din;
    d.num_max_dispatch_tokens_per_rank = Tmax - 1;  // T = Tmax > Tmax - 1
    expect_error(d, b.dout, "exceed num_max_dispatch_tokens_per_rank");
    d = b.din;
    d.num_experts = 7;
    expect_error(d, b.dout, "num_experts = 7 must be divisible by num_ranks");
    d = b.din;
    d.num_max_dispatch_tokens_per_rank = 4096;
    expect_error(d, b.dout, "num_rdma_bytes");
    d = b.din;
    d.use_ue8m0 = true;
    expect_error(d, b.dout, "round_scale");
    DeviceTensor x_bad(DType::kBF16, {Tmax, 200}, dev);
    d = b.din;
    d.x = x_bad.view();
    expect_error(d, b.dout, "hidden = 200 must be a positive multiple of 128");
    DeviceTensor topk_bad(DType::kI64, {Tmax, 17}, dev);
    d = b.din;
    d.topk_idx = topk_bad.view();
    expect_error(d, b.dout, "num_topk = 17");
    LowLatencyDispatchOutputs o = b.dout;
    TensorView s = *o.recv_x_scales;
    s.strides = {s.strides[0], static_cast<int64_t>(H / 128), 1, 0};  // row-major instead of transposed
    o.recv_x_scales = s;
    expect_error(b.din, o, "strides");
    // The buffer still works.
    buf.low_latency_dispatch(b.din, b.dout, b.handle, false, order);
    b.y.upload(in.y);
    buf.low_latency_combine(b.cin, b.handle, b.out.view(), false, order);
    cuda_ok(cudaStreamSynchronize(stream), "sync");
    buf.check_device_errors();
    const auto count = b.count.download<int32_t>();
    int total = 0;
    for (int v : count) total += v;
    EXPECT_GT(total, 0);
    // Another shape needs clean_low_latency_buffer first; after it the new shape works.
    LLCase c8 = c;
    c8.max_tokens = 8;
    Batch b8 = make_batch(c8, R, 8, dev, test_num_sms(R, 132), nullptr, nullptr, nullptr);
    const RoundInput in8 = make_input(c8, 7, 0, r, 8);
    upload_dispatch_inputs(b8, in8);
    expect_error(b8.din, b8.dout, "clean_low_latency_buffer");
    buf.clean_low_latency_buffer(8, H, E, stream);
    buf.low_latency_dispatch(b8.din, b8.dout, b8.handle, false, order);
    EXPECT_EQ(b8.handle.buffer_index, 0) << "clean starts over at buffer 0";
    b8.y.upload(in8.y);
    buf.low_latency_combine(b8.cin, b8.handle, b8.out.view(), false, order);
    cuda_ok(cudaStreamSynchronize(stream), "sync");
    buf.check_device_errors();
  });
}

// Tokens that list one expert twice may push more than Tmax rows to it: the rows past Tmax are
// dropped (never written past the slots), the call reports it, and clean brings the buffer back.
TEST(LowLatencyGpu, TooManyRowsForOneExpertIsReported) {
  const int R = 2, Tmax = 4, H = 256, E = 4, K = 2;
  const LLCase c = small_case(R, Tmax, H, E, K);
  run_error_path(c, 5000, 5, [&](int r, Buffer& buf, cudaStream_t stream, const StreamOrder& order, Batch& b,
                                 const RoundInput& in) {
    b.topk.upload(std::vector<int64_t>(static_cast<size_t>(Tmax) * K, 0));  // 8 rows for expert 0
    buf.low_latency_dispatch(b.din, b.dout, b.handle, false, order);
    cuda_ok(cudaStreamSynchronize(stream), "sync");
    try {
      buf.check_device_errors();
      ADD_FAILURE() << "rank " << r << ": the overflow was not reported";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("more than num_max_dispatch_tokens_per_rank = 4 rows to expert 0"),
                std::string::npos)
          << e.what();
    }
    buf.clean_low_latency_buffer(Tmax, H, E, stream);
    upload_dispatch_inputs(b, in);
    buf.low_latency_dispatch(b.din, b.dout, b.handle, false, order);
    b.y.upload(in.y);
    buf.low_latency_combine(b.cin, b.handle, b.out.view(), false, order);
    cuda_ok(cudaStreamSynchronize(stream), "sync after clean");
    buf.check_device_errors();
  });
}

// Past the last call number a low-latency kernel does not run: the next call raises a
// RuntimeFailure that says so (never stale flags passing for new ones), and clean_low_latency_buffer
// on every rank starts the numbers again.
TEST(LowLatencyGpu, CallNumbersRunOutThenCleanRecovers) {
  const int R = 2, Tmax = 8, H = 256, E = 8, K = 4;
  LLCase c = small_case(R, Tmax, H, E, K);
  c.first_call_number = kLastCallNumber - 1;  // one dispatch and one combine left
  run_error_path(c, 5000, 7, [&](int r, Buffer& buf, cudaStream_t stream, const StreamOrder& order, Batch& b,
                                 const RoundInput& in) {
    const auto round = [&](const char* what) {
      buf.low_latency_dispatch(b.din, b.dout, b.handle, false, order);
      b.y.upload(in.y);
      buf.low_latency_combine(b.cin, b.handle, b.out.view(), false, order);
      cuda_ok(cudaStreamSynchronize(stream), what);
    };
    round("the last numbers");
    buf.check_device_errors();
    buf.low_latency_dispatch(b.din, b.dout, b.handle, false, order);  // number kLastCallNumber + 1
    cuda_ok(cudaStreamSynchronize(stream), "past the last number");
    try {
      buf.check_device_errors();
      ADD_FAILURE() << "rank " << r << ": a dispatch past the last call number ran";
    } catch (const RuntimeFailure& e) {
      EXPECT_NE(std::string(e.what()).find("low_latency_dispatch on rank " + std::to_string(r) + " did not run"),
                std::string::npos)
          << e.what();
      EXPECT_NE(std::string(e.what()).find("call numbers"), std::string::npos) << e.what();
    }
    try {  // still refused: the numbers do not move on by themselves
      buf.low_latency_dispatch(b.din, b.dout, b.handle, false, order);
      cuda_ok(cudaStreamSynchronize(stream), "refused again");
      buf.check_device_errors();
      ADD_FAILURE() << "rank " << r << ": a second dispatch past the last call number ran";
    } catch (const RuntimeFailure&) {
    }
    buf.clean_low_latency_buffer(Tmax, H, E, stream);
    round("after clean");
    buf.check_device_errors();
  });
}

// clean_low_latency_buffer is stream work (docs/contract.md §4): eager with no host wait before the next
// calls on the stream, and captured in a CUDA graph before dispatch + combine (SGLang cleans when it
// switches to low latency, possibly while capturing); zeroing the whole LL region between calls on
// every rank (vLLM's fault-tolerance path: get_local_buffer_tensor(...).zero_()) leaves the buffer
// working without a clean. Every round against the reference.
TEST(LowLatencyGpu, CleanIsStreamWorkCapturableAndZeroingIsHarmless) {
  const uint64_t seed = std::random_device{}();
  LLCase c;
  c.num_ranks = 2;
  c.hidden = 512;
  c.num_experts = 16;
  c.num_topk = 4;
  c.max_tokens = 32;
  SCOPED_TRACE("clean as stream work: " + describe(c) + " seed=" + std::to_string(seed));
  const int R = c.num_ranks, kEager = 4, kReplays = 3, rounds = kEager + kReplays;
  std::vector<std::vector<RoundInput>> in(rounds, std::vector<RoundInput>(R));
  for (int k = 0; k < rounds; ++k)
    for (int r = 0; r < R; ++r) in[k][r] = make_input(c, seed, k, r, r == 0 ? c.max_tokens : c.max_tokens / 2);
  std::vector<std::vector<RoundOutput>> got(rounds, std::vector<RoundOutput>(R));
  const auto* result = ::testing::UnitTest::GetInstance()->current_test_info()->result();
  const int parts_before = result->total_part_count();
  run_ranks(R, [&](int r, std::shared_ptr<Group> group) {
    const int dev = group->device();
    const int T = in[0][r].num_tokens;
    RankBuffer rb(group, c, c.timeout_ms);
    Buffer& buf = *rb.buffer;
    cudaStream_t stream = rb.stream;
    const StreamOrder order{stream, nullptr, false};
    std::vector<Batch> batches;
    for (int k = 0; k < kEager + 1; ++k) batches.push_back(make_batch(c, R, T, dev, test_num_sms(R, 132), nullptr, nullptr, nullptr));
    auto sync = [&](const char* what) { cuda_ok(cudaStreamSynchronize(stream), what); };
    auto round = [&](Batch& b, int k) {
      upload_dispatch_inputs(b, in[k][r]);
      b.y.upload(in[k][r].y);
      b.out.fill_bytes(0);
      buf.low_latency_dispatch(b.din, b.dout, b.handle, false, order);
      buf.low_latency_combine(b.cin, b.handle, b.out.view(), false, order);
      sync("round");
      got[k][r] = download_dispatch(c, R, b);
      got[k][r].out = b.out.download<uint16_t>();
    };
    round(batches[0], 0);
    // Eager clean: the next dispatch follows on the stream, with no wait on the host in between.
    buf.clean_low_latency_buffer(c.max_tokens, c.hidden, c.num_experts, stream);
    round(batches[1], 1);
    EXPECT_EQ(batches[1].handle.buffer_index, 0) << "clean starts over at buffer 0";
    // vLLM's fault-tolerance path: every rank zeroes its whole LL region between calls.
    sync("before zeroing");
    ranks_meet();
    const auto [region, bytes] = buf.local_buffer(true);
    cuda_ok(cudaMemsetAsync(region, 0, bytes, stream), "zero the LL region");
    sync("zeroed");
    ranks_meet();
    round(batches[2], 2);
    round(batches[3], 3);
    buf.check_device_errors();
    // clean + dispatch + combine in one CUDA graph, replayed with new inputs.
    Batch& g = batches[kEager];
    upload_dispatch_inputs(g, in[kEager][r]);
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    cuda_ok(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "begin capture");
    buf.clean_low_latency_buffer(c.max_tokens, c.hidden, c.num_experts, stream);
    buf.low_latency_dispatch(g.din, g.dout, g.handle, false, order);
    buf.low_latency_combine(g.cin, g.handle, g.out.view(), false, order);
    cuda_ok(cudaStreamEndCapture(stream, &graph), "end capture");
    cuda_ok(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
    for (int m = 0; m < kReplays; ++m) {
      const int k = kEager + m;
      upload_dispatch_inputs(g, in[k][r]);
      g.y.upload(in[k][r].y);
      g.out.fill_bytes(0);
      cuda_ok(cudaGraphLaunch(exec, stream), "graph launch");
      sync("graph replay");
      got[k][r] = download_dispatch(c, R, g);
      got[k][r].out = g.out.download<uint16_t>();
    }
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    buf.check_device_errors();
    ranks_meet();
  });
  if (result->total_part_count() != parts_before) return;
  for (int k = 0; k < rounds; ++k) {
    SCOPED_TRACE("round " + std::to_string(k) + (k == 1 ? " (after an eager clean)" : k >= 2 && k < kEager
                     ? " (after zeroing the region)" : k >= kEager ? " (graph with clean inside)" : ""));
    compare_round(c, k, in[k], got[k]);
  }
}

// A combine asked for a row its dispatch never sent: the origin's wait times out with a record
// naming the kernel, the phase and the peer; clean_low_latency_buffer brings every rank back.
TEST(LowLatencyGpu, TimeoutNamesThePeerAndCleanRecovers) {
  const int R = 2;
  LLCase c;
  c.num_ranks = R;
  c.hidden = 256;
  c.num_experts = 8;
  c.num_topk = 4;
  c.max_tokens = 16;
  c.fixed_tokens = 16;
  c.drop_rate = 0.5;
  run_error_path(c, 1000, 1234, [&](int r, Buffer& buf, cudaStream_t stream, const StreamOrder& order, Batch& b,
                                    const RoundInput& in) {
    buf.low_latency_dispatch(b.din, b.dout, b.handle, false, order);
    b.y.upload(in.y);
    if (r == 0) {
      // Rank 0 combines with one -1 turned into an expert of rank 1: that row never comes.
      std::vector<int64_t> topk = in.topk;
      for (size_t i = 0; i < topk.size(); ++i)
        if (topk[i] < 0) {
          topk[i] = c.num_experts - 1;
          bool dup = false;
          const size_t row = i / c.num_topk;
          for (int k = 0; k < c.num_topk; ++k) dup |= (row * c.num_topk + k != i && topk[row * c.num_topk + k] == topk[i]);
          if (!dup) break;
          topk[i] = -1;
        }
      b.topk.upload(topk);
    }
    buf.low_latency_combine(b.cin, b.handle, b.out.view(), false, order);
    cuda_ok(cudaStreamSynchronize(stream), "sync");
    if (r == 0) {
      try {
        buf.check_device_errors();
        ADD_FAILURE() << "rank 0: no timeout reported";
      } catch (const TimeoutError& e) {
        const std::string msg = e.what();
        EXPECT_NE(msg.find("low_latency_combine"), std::string::npos) << msg;
        EXPECT_NE(msg.find("peer 1"), std::string::npos) << msg;
        EXPECT_NE(msg.find("expert output row"), std::string::npos) << msg;
      }
    } else {
      buf.check_device_errors();
    }
    buf.clean_low_latency_buffer(c.max_tokens, c.hidden, c.num_experts, stream);
    // A correct round afterwards.
    b.topk.upload(in.topk);
    buf.low_latency_dispatch(b.din, b.dout, b.handle, false, order);
    buf.low_latency_combine(b.cin, b.handle, b.out.view(), false, order);
    cuda_ok(cudaStreamSynchronize(stream), "sync after clean");
    buf.check_device_errors();
  });
}

}  // namespace
}  // namespace epcomm::test
