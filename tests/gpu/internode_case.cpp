// See internode_case.hpp.
#include "internode_case.hpp"

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <thread>

#include "kernels/internode/params.hpp"
#include "normal_rank.hpp"

namespace epcomm::test {

std::string describe(const InterCase& c) {
  std::string s = std::to_string(c.num_ranks / c.ranks_per_node) + " nodes x " + std::to_string(c.ranks_per_node) +
                  (c.dtype == DType::kBF16 ? " bf16" : " fp8") + " hidden=" + std::to_string(c.hidden) +
                  " K=" + std::to_string(c.num_topk) + " E=" + std::to_string(c.num_experts) +
                  " T<=" + std::to_string(c.max_tokens);
  if (c.fixed_tokens >= 0) s += " T=" + std::to_string(c.fixed_tokens);
  if (!c.with_topk) s += " no-topk";
  if (c.skewed) s += " skewed";
  if (c.worst) s += " worst";
  if (c.graph) s += " graph";
  if (c.region_divisor > 1) s += " region/" + std::to_string(c.region_divisor);
  if (c.low_latency_mode) s += " low_latency_mode";
  if (c.bf16_partials) s += " bf16-partials";
  if (c.combine_nvl_divisor > 0) s += " combine-nvl/" + std::to_string(c.combine_nvl_divisor);
  if (c.dtype == DType::kFP8E4M3 && (c.scale_dtype != DType::kF32 || c.num_scales > 0))
    s += std::string(" scales ") + (c.scale_dtype == DType::kI32 ? "int32" : "float32") + " x" +
         std::to_string(c.scale_words());
  return s;
}

Traffic expected_traffic(const std::vector<RankInputs>& in, int R, int P) {
  Traffic tr;
  tr.dispatch_net_rows.assign(R, 0);
  tr.dispatch_nvl_rows.assign(R, 0);
  tr.combine_net_rows.assign(R, 0);
  const int N = R / P;
  for (int i = 0; i < R; ++i) {
    for (int t = 0; t < in[i].num_tokens; ++t) {
      for (int m = 0; m < N; ++m) {
        bool any = false;
        for (int d = 0; d < P; ++d) {
          const int j = m * P + d;
          if (!in[i].layout.is_token_in_rank[static_cast<size_t>(t) * R + j]) continue;
          any = true;
          if (j % P != i % P) ++tr.dispatch_nvl_rows[j];
        }
        if (any && m != i / P) {
          ++tr.dispatch_net_rows[i];
          ++tr.combine_net_rows[m * P + i % P];  // forwarder (m, local of i) sends the partial back
        }
      }
    }
  }
  return tr;
}

std::vector<int32_t> expected_chunk_offset(const std::vector<RankInputs>& in, int r, int R, int chunk, int stride) {
  std::vector<int32_t> want(static_cast<size_t>(R) * stride);
  int32_t row = 0;
  for (int i = 0; i < R; ++i) {
    const int T = in[i].num_tokens, chunks = (T + chunk - 1) / chunk;
    for (int c = 0; c < stride - 1; ++c) {
      want[static_cast<size_t>(i) * stride + c] = row;
      if (c >= chunks) continue;
      for (int t = c * chunk; t < std::min(T, (c + 1) * chunk); ++t)
        row += in[i].layout.is_token_in_rank[static_cast<size_t>(t) * R + r] ? 1 : 0;
    }
    want[static_cast<size_t>(i) * stride + stride - 1] = chunk;
  }
  return want;
}

InterRun make_inter_run(const InterCase& c, uint64_t seed) {
  InterRun run;
  run.seed = seed;
  run.reference = make_normal_reference(c, seed);
  run.traffic = expected_traffic(run.reference.in, c.num_ranks, c.ranks_per_node);
  return run;
}

BufferOptions inter_buffer_options(const InterCase& c) {
  const int R = c.num_ranks, P = c.ranks_per_node;
  BufferOptions bo;
  bo.max_tokens_per_rank = std::max(c.max_tokens, 1);
  bo.max_experts_per_rank = std::max(c.num_experts / R, 8);
  bo.num_rdma_bytes =
      Buffer::internode_size_hint(bo.max_tokens_per_rank, c.hidden, R, P, c.num_topk, bo.max_experts_per_rank);
  if (c.token_limit_from_region) {
    // Room for about twice the case's tokens (the control part, laid out for the default token
    // limit, comes on top of num_rdma_bytes); the first dispatch finds how many the rows hold.
    bo.num_rdma_bytes = Buffer::internode_size_hint(2 * bo.max_tokens_per_rank + 64, c.hidden, R, P, /*top-k 16*/ 16,
                                                    bo.max_experts_per_rank);
    bo.max_tokens_per_rank = 0;
  }
  if (c.region_divisor > 1) bo.num_rdma_bytes /= c.region_divisor;
  bo.low_latency_mode = c.low_latency_mode;
  bo.internode_bf16_partials = c.bf16_partials ? 1 : 0;
  bo.internode_combine_nvl = c.combine_nvl_divisor > 0 ? 1 : 0;
  if (c.combine_nvl_divisor > 0) {
    // The rows every rank of the group pushes for the layout's token bound (T + 32, then a step),
    // each of the kernels' pushed-row size.
    const size_t crow = InterCombineGeometry::make(InterLayout{}, c.hidden, c.num_topk).crow;
    bo.num_nvl_bytes = static_cast<size_t>(R) * crow * (std::max(c.max_tokens, 1) + 32 + 64) / c.combine_nvl_divisor;
  }
  bo.timeout_ms = std::getenv("EPCOMM_TIMEOUT_MS") ? 0 : 5000;  // 0: the environment's (sanitizer runs)
  return bo;
}

void run_inter_steps(const InterCase& c, const InterRun& run, int r, const std::shared_ptr<Group>& group, Buffer& buf) {
  const int R = c.num_ranks, P = c.ranks_per_node, H = c.hidden;
  const int elt = c.dtype == DType::kBF16 ? 2 : 1;
  const int sms = test_num_sms(R, c.num_sms);
  const Traffic& traffic = run.traffic;
  ASSERT_EQ(group->ranks_per_node(), P);
  ASSERT_EQ(group->num_nodes(), R / P);
  Config cfg = Config::dispatch_default(R);
  cfg.num_sms = sms;
  if (c.chunk) cfg.nvl_chunk_size = c.chunk;
  Config ccfg = Config::combine_default(R);
  ccfg.num_sms = sms;
  if (c.chunk) ccfg.nvl_chunk_size = c.chunk;
  // The traffic counters of a call, printed where the case asks (tests/gin shows that each token
  // crosses the network once per destination node): rows checked below, puts and bytes as counted.
  const auto report = [&](const char* what, int step, const Buffer::InternodeStats& s, uint64_t want_rows) {
    if (!c.report_traffic) return;
    std::printf(
        "[traffic] rank %d step %d %s: network rows %llu (expected %llu), puts %llu, bytes %llu, "
        "NVLink bytes %llu\n",
        r, step, what, static_cast<unsigned long long>(s.network_rows), static_cast<unsigned long long>(want_rows),
        static_cast<unsigned long long>(s.network_puts), static_cast<unsigned long long>(s.network_bytes),
        static_cast<unsigned long long>(s.nvlink_bytes));
    std::fflush(stdout);
  };
  cudaStream_t stream;
  cuda_ok(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
  const StreamOrder order{stream, nullptr, false};

  // On a failure, each rank prints its control words (signals, shadows, flags, counters).
  const auto dump = [&](const char* when) {
    std::fprintf(stderr, "[internode %s] %s\n", when, buf.internode_stats(false).control.c_str());
  };

  // Every tensor of a step is allocated once, before the first step, and poisoned again at the
  // start of each step. Ranks that share a GPU are threads of one process (one CUDA context),
  // and cudaFree waits until the whole device is idle: a rank that freed its step-k tensors
  // while a co-resident rank's step-(k+1) notify kernel was already spinning for this rank's
  // count entry waited for that kernel, which waited for this rank: both stood still until the
  // GPU timeout (the "lost" step-1 meta signals, which in fact arrived after the waiters gave
  // up). EPCOMM_TEST_FREE_EACH_STEP=1 brings that pattern back (fresh tensors each step, the
  // old ones freed at the step boundary) to show the hang on ranks sharing a GPU.
  const bool free_each_step =
      std::getenv("EPCOMM_TEST_FREE_EACH_STEP") != nullptr && std::atoi(std::getenv("EPCOMM_TEST_FREE_EACH_STEP")) != 0;
  const int stride = buf.chunk_offset_stride(cfg);
  NormalRank t(c, run.reference, r, stride, group->device());
  // And every rank's tensors exist before any rank's first kernel spins for its peers (a cudaMalloc
  // may wait for the device too: ll_case.cpp's harness hung so until it met here, runs 78-81).
  group->barrier("run_inter_steps: tensors made");
  int at_step = 0;
  const char* at_part = "start";
  try {
    for (int step = 0; step < c.steps; ++step) {
      SCOPED_TRACE("rank " + std::to_string(r) + " step " + std::to_string(step));
      at_step = step;
      at_part = "layout";
      if (step > 0) {
        if (free_each_step) {
          t.allocate_outputs();  // frees the previous step's (cudaFree: device-wide wait)
        } else {
          t.poison_outputs();  // outputs must be written again by this step (no stale results from the last one)
        }
      }
      // layout (per-node counts included)
      t.run_layout(buf, stream, order);

      at_part = "dispatch";
      const DispatchInputs di = t.dispatch_inputs(cfg);
      DispatchHandle h = t.handle();
      const std::optional<DispatchPlan> plan = t.prepare_dispatch(buf, di, h, order);
      if (!plan) return;
      const DispatchOutputs dout = t.dispatch_outputs();
      buf.internode_stats(/*reset=*/true);
      buf.dispatch_run(di, *plan, h, dout, order);
      cuda_ok(cudaStreamSynchronize(stream), "sync dispatch");
      const Buffer::InternodeStats ds = buf.internode_stats(true);
      report("dispatch", step, ds, traffic.dispatch_net_rows[r]);
      EXPECT_EQ(ds.network_rows, traffic.dispatch_net_rows[r]) << "dispatch: rows over the network";
      // (The combine-rows cases cut the region less: their dispatch may take one round.)
      if (c.region_divisor > 1 && c.dtype == DType::kBF16 && c.combine_nvl_divisor == 0)
        EXPECT_GT(ds.rounds, 1u) << "dispatch: rounds";
      if (step == 0 && r == 0 && c.region_divisor > 1)
        std::printf("[internode] region / %d: dispatch in %llu rounds\n", c.region_divisor,
                    static_cast<unsigned long long>(ds.rounds));
      EXPECT_EQ(ds.nvlink_bytes, traffic.dispatch_nvl_rows[r] * static_cast<uint64_t>(H) * elt)
          << "dispatch: bytes read from node peers";
      EXPECT_TRUE(same_values(t.chunk_off.download<int32_t>(),
                              expected_chunk_offset(run.reference.in, r, R, cfg.chunk_tokens(), stride),
                              "chunk_offset [source][chunk] (the receive plan)"))
          << "plan.max_chunks " << plan->max_chunks << ", stride " << stride;
      t.expect_dispatch();
      if (::testing::Test::HasFailure()) dump(("after dispatch, step " + std::to_string(step)).c_str());

      // combine
      at_part = "combine";
      t.upload_combine_inputs();
      const CombineInputs ci = t.combine_inputs(ccfg);
      const CombineOutputs co = t.combine_outputs();
      buf.combine(ci, h, co, order);
      cuda_ok(cudaStreamSynchronize(stream), "sync combine");
      const Buffer::InternodeStats cs = buf.internode_stats(true);
      report("combine", step, cs, traffic.combine_net_rows[r]);
      EXPECT_EQ(cs.network_rows, traffic.combine_net_rows[r]) << "combine: partial sums over the network";
      if (c.region_divisor > 1 && c.combine_nvl_divisor == 0) EXPECT_GT(cs.rounds, 1u) << "combine: rounds";
      if (c.combine_nvl_divisor > 0 && !c.bf16_partials && !c.tokens && c.fixed_tokens < 0 &&
          !c.token_limit_from_region) {
        // The rounds of the windows with and without the part (rank 0 has max_tokens, the most).
        const BufferOptions bo = inter_buffer_options(c);
        const int chunk = ccfg.chunk_tokens();
        const auto rounds_for = [&](size_t nvl) {
          const int w = Buffer::internode_windows(bo.num_rdma_bytes, bo.max_tokens_per_rank, c.hidden, R,
                                                  c.ranks_per_node, c.num_topk, bo.max_experts_per_rank, chunk, nvl)
                            .combine;
          const int tokens = (c.max_tokens + chunk - 1) / chunk * chunk;
          return static_cast<uint64_t>(std::max((tokens + w - 1) / std::max(w, 1), 1));
        };
        EXPECT_EQ(cs.rounds, rounds_for(bo.num_nvl_bytes)) << "combine: rounds with the pushed rows in num_nvl_bytes";
        if (step == 0 && r == 0)
          std::printf("[internode] combine rows in num_nvl_bytes (%zu): %llu rounds (%llu without)\n", bo.num_nvl_bytes,
                      static_cast<unsigned long long>(cs.rounds), static_cast<unsigned long long>(rounds_for(0)));
      }
      if (step == 0 && r == 0 && c.region_divisor > 1)
        std::printf("[internode] region / %d: combine in %llu rounds\n", c.region_divisor,
                    static_cast<unsigned long long>(cs.rounds));
      // Node-first summation: equal to the float32 reference up to one BF16 rounding step (and, with
      // BF16 partials, within their rounding too).
      if (c.bf16_partials) t.expect_combine_bf16_partials();
      else t.expect_combine(/*bit_exact=*/false);

      // cached dispatch with new x
      at_part = "cached dispatch";
      buf.cached_dispatch(t.x2.view(), t.cached_scales(), h, t.cached_outputs(), cfg, order);
      cuda_ok(cudaStreamSynchronize(stream), "sync cached");
      const Buffer::InternodeStats cached_stats = buf.internode_stats(true);
      report("cached dispatch", step, cached_stats, traffic.dispatch_net_rows[r]);
      EXPECT_EQ(cached_stats.network_rows, traffic.dispatch_net_rows[r]) << "cached: network rows";
      t.expect_cached();

      if (c.graph && step == 0) {
        at_part = "graph";
        t.replay_graph(buf, stream, order, di, dout, ci, co, /*bit_exact=*/false);
        t.x.upload(t.ri.x);
      }
    }
  } catch (...) {
    std::fprintf(stderr, "[internode] rank %d: error in step %d, %s\n", r, at_step, at_part);
    dump("after an error");
    // Again a little later: a signal that rose in between (or stands above its shadow) was not
    // lost but late, i.e. its sender was held up (e.g. on the host) until this rank gave up.
    std::this_thread::sleep_for(std::chrono::seconds(2));
    dump("2 s after the error");
    throw;
  }
  buf.check_device_errors();
  cudaStreamDestroy(stream);
}

void run_inter_rank(const InterCase& c, const InterRun& run, int r, const std::shared_ptr<Group>& group) {
  Buffer buf(group, inter_buffer_options(c));
  run_inter_steps(c, run, r, group, buf);
}

void run_inter_case(const InterCase& c) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(describe(c) + " seed=" + std::to_string(seed));
  ASSERT_EQ(c.num_ranks % c.ranks_per_node, 0);
  const InterRun run = make_inter_run(c, seed);
  run_ranks(
      c.num_ranks, [&](int r, std::shared_ptr<Group> group) { run_inter_rank(c, run, r, group); }, c.ranks_per_node);
}

}  // namespace epcomm::test
