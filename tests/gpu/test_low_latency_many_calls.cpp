// Low-latency mode on the GPU, many calls into the same two buffers of each rank, as the bench
// makes them: formats, hooks, zero copy and repeated combines taking turns, then a CUDA graph of
// several pairs replayed; every round against the CPU reference (ll_harness.hpp). Inside one node,
// with the last call numbers, and across virtual nodes through the network path.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <chrono>
#include <random>
#include <string>
#include <thread>

#include "harness.hpp"
#include "kernels/low_latency/params.hpp"
#include "ll_harness.hpp"

namespace epcomm::test {
namespace {

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

  const bool clean = run_ranks_cleanly(
      R,
      [&](int r, std::shared_ptr<Group> group) {
        const int sms = test_num_sms(R, 132);
        RankBuffer rb(group, base, base.timeout_ms);
        Buffer& buf = *rb.buffer;
        const StreamOrder& order = rb.order;
        const int dev = rb.device, T = tokens[r];
        auto sync = [&](const char* what) { rb.sync(what); };
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
        for (int k = 0; k < eager_rounds; ++k)
          eager.push_back(make_batch(variant(k), R, T, dev, sms, nullptr, nullptr, nullptr));
        std::vector<Batch> g;
        for (int i = 0; i < kGraphPairs; ++i)
          g.push_back(make_batch(variant(eager_rounds + i), R, T, dev, sms, nullptr, nullptr, nullptr));

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
        cuda_ok(cudaStreamBeginCapture(rb.stream, cudaStreamCaptureModeThreadLocal), "begin capture");
        for (int i = 0; i < kGraphPairs; ++i) {
          const LLCase c = variant(eager_rounds + i);
          dispatch(g[i], c);
          combine(g[i], c);
        }
        cuda_ok(cudaStreamEndCapture(rb.stream, &graph), "end capture");
        cuda_ok(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
        for (int m = 0; m < graph_replays; ++m) {
          for (int i = 0; i < kGraphPairs; ++i) {
            const int k = eager_rounds + m * kGraphPairs + i;
            upload_dispatch_inputs(g[i], in[k][r]);
            g[i].y.upload(in[k][r].y);
            g[i].out.fill_bytes(0);
          }
          late();
          cuda_ok(cudaGraphLaunch(exec, rb.stream), "graph launch");
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
      },
      base.ranks_per_node);
  if (!clean) return;  // a rank failed: its outputs are incomplete
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

}  // namespace
}  // namespace epcomm::test
