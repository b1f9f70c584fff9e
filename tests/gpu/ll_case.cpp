// See ll_case.hpp.
#include "ll_case.hpp"

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <functional>
#include <random>

#include "kernels/low_latency/params.hpp"

namespace epcomm::test {

LLRun make_ll_run(const LLCase& c, uint64_t seed) {
  LLRun run;
  run.seed = seed;
  const int R = c.num_ranks;
  run.rounds = c.graph_replays > 0 ? c.graph_replays : (c.two_batches ? 2 : 1);
  run.tokens.resize(R);
  for (int r = 0; r < R; ++r) {
    std::mt19937_64 rng(seed + 17 * r);
    run.tokens[r] = c.fixed_tokens >= 0
                        ? c.fixed_tokens
                        : (r == 0 ? c.max_tokens : std::uniform_int_distribution<int>(0, c.max_tokens)(rng));
  }
  run.in.assign(run.rounds, std::vector<RoundInput>(R));
  for (int k = 0; k < run.rounds; ++k)
    for (int r = 0; r < R; ++r) run.in[k][r] = make_input(c, seed, k, r, run.tokens[r]);
  return run;
}

LLRankResult run_ll_rank(const LLCase& c, const LLRun& run, int r, const std::shared_ptr<Group>& group) {
  const int R = c.num_ranks, EL = c.num_experts / R;
  const int rounds = run.rounds;
  LLRankResult res;
  res.got.resize(rounds);
  const int dev = group->device();
  const int sms = test_num_sms(R, 132);
  RankBuffer rb(group, c, c.timeout_ms);
  Buffer& buf = *rb.buffer;
  cudaStream_t stream = rb.stream;
  const StreamOrder order{stream, nullptr, false};
  DeviceTensor cum_t(DType::kI32, {EL}, dev), dwait_t(DType::kI64, {R}, dev), cwait_t(DType::kI64, {R}, dev);
  cum_t.fill_bytes(0);
  dwait_t.fill_bytes(0);
  cwait_t.fill_bytes(0);
  const int T = run.tokens[r];
  auto sync = [&](const char* what) { cuda_ok(cudaStreamSynchronize(stream), what); };

  cudaEvent_t previous;
  cuda_ok(cudaEventCreateWithFlags(&previous, cudaEventDisableTiming), "event");
  // Every call through the same path: on the caller's stream, async (the caller waits on the
  // returned event), or after previous_event.
  auto call = [&](const std::function<Event(const StreamOrder&)>& fn) {
    if (c.order_mode == 1) {
      Event e = fn(StreamOrder{stream, nullptr, true});
      EXPECT_TRUE(e.valid()) << "async_finish must return an event";
      e.wait_on(stream);
    } else if (c.order_mode == 2) {
      cuda_ok(cudaEventRecord(previous, stream), "record");
      fn(StreamOrder{stream, previous, false});
    } else {
      fn(order);
    }
  };
  auto dispatch = [&](Batch& b, bool hook) {
    call([&](const StreamOrder& o) { return buf.low_latency_dispatch(b.din, b.dout, b.handle, hook, o); });
  };
  auto dispatch_recv = [&](Batch& b) {
    call([&](const StreamOrder& o) { return buf.low_latency_dispatch_recv(b.din, b.dout, b.handle, o); });
  };
  auto combine = [&](Batch& b, bool hook) {
    call([&](const StreamOrder& o) { return buf.low_latency_combine(b.cin, b.handle, b.out.view(), hook, o); });
  };
  auto combine_recv = [&](Batch& b) {
    call([&](const StreamOrder& o) { return buf.low_latency_combine_recv(b.cin, b.handle, b.out.view(), o); });
  };

  // Every rank's device memory is allocated before any rank launches (ranks_ready): a cudaMalloc
  // may wait for the device to go idle, and with ranks as threads on one GPU an early rank's
  // kernel spins until this rank launches, so an allocation after it would stall both until the
  // timeout (ScaleGpu.LowLatency128RanksVirtualNodes: one run in two, BENCHMARKS runs 78-80).
  auto ranks_ready = [&] { group->barrier(); };

  if (c.graph_replays > 0) {
    Batch b = make_batch(c, R, T, dev, sms, &cum_t, &dwait_t, &cwait_t);
    upload_dispatch_inputs(b, run.in[0][r]);
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    cuda_ok(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "begin capture");
    // Across real nodes this takes the GIN barriers of clean_gin.cu (the host's cannot be captured).
    if (c.clean_in_graph) buf.clean_low_latency_buffer(c.max_tokens, c.hidden, c.num_experts, stream);
    dispatch(b, c.hook);
    if (c.hook) dispatch_recv(b);
    combine(b, c.hook);
    if (c.hook) combine_recv(b);
    cuda_ok(cudaStreamEndCapture(stream, &graph), "end capture");
    cuda_ok(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
    ranks_ready();
    for (int k = 0; k < c.graph_replays; ++k) {
      upload_dispatch_inputs(b, run.in[k][r]);
      b.y.upload(run.in[k][r].y);
      cuda_ok(cudaGraphLaunch(exec, stream), "graph launch");
      sync("graph replay");
      res.got[k] = download_dispatch(c, R, b);
      res.got[k].out = b.out.download<uint16_t>();
    }
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  } else if (c.two_batches) {
    Batch a = make_batch(c, R, T, dev, sms, &cum_t, &dwait_t, &cwait_t);
    Batch b = make_batch(c, R, T, dev, sms, &cum_t, &dwait_t, &cwait_t);
    upload_dispatch_inputs(a, run.in[0][r]);
    upload_dispatch_inputs(b, run.in[1][r]);
    ranks_ready();
    dispatch(a, true);
    dispatch(b, true);
    EXPECT_NE(a.handle.buffer_index, b.handle.buffer_index) << "micro-batches must use different buffers";
    dispatch_recv(a);
    dispatch_recv(b);
    sync("dispatch");
    res.got[0] = download_dispatch(c, R, a);
    res.got[1] = download_dispatch(c, R, b);
    upload_y(c, buf, a, run.in[0][r]);
    upload_y(c, buf, b, run.in[1][r]);
    combine(a, true);
    combine(b, true);
    combine_recv(a);
    combine_recv(b);
    sync("combine");
    res.got[0].out = a.out.download<uint16_t>();
    res.got[1].out = b.out.download<uint16_t>();
  } else {
    Batch b = make_batch(c, R, T, dev, sms, &cum_t, &dwait_t, &cwait_t);
    upload_dispatch_inputs(b, run.in[0][r]);
    ranks_ready();
    dispatch(b, c.hook);
    if (c.hook) dispatch_recv(b);
    sync("dispatch");
    res.got[0] = download_dispatch(c, R, b);
    upload_y(c, buf, b, run.in[0][r]);
    combine(b, c.hook);
    if (c.hook) combine_recv(b);
    sync("combine");
    res.got[0].out = b.out.download<uint16_t>();
  }
  buf.check_device_errors();
  res.cum = cum_t.download<int32_t>();
  res.dwait = dwait_t.download<int64_t>();
  res.cwait = cwait_t.download<int64_t>();
  cudaEventDestroy(previous);
  if (c.low_latency_net == 1 || c.expect_network) {
    res.net_used = buf.low_latency_uses_network() ? 1 : 0;
    const Buffer::LowLatencyNetStats st = buf.low_latency_net_stats();
    res.net_puts = st.puts;
    res.net_bytes = st.bytes;
    // The LSA words a source of another node would have stored here (its count flags and its
    // combine `done`) must still be zero: on the network path they travel as puts and signals.
    // Every peer's writes into this region ended before this rank's combine returned.
    const int P = group->ranks_per_node();
    const LowLatencyLayout L = LowLatencyLayout::make(c.max_tokens, c.hidden, R, c.num_experts);
    const char* region = static_cast<const char*>(buf.local_buffer(true).first);
    for (int bi = 0; bi < 2; ++bi) {
      std::vector<uint64_t> counts(static_cast<size_t>(EL) * R), done(R);
      cuda_ok(cudaMemcpyAsync(counts.data(), region + L.count(bi, 0, 0), counts.size() * 8, cudaMemcpyDeviceToHost,
                              cudaStreamPerThread),
              "read counts");
      cuda_ok(cudaMemcpyAsync(done.data(), region + L.done(bi, 0), done.size() * 8, cudaMemcpyDeviceToHost,
                              cudaStreamPerThread),
              "read done");
      cuda_ok(cudaStreamSynchronize(cudaStreamPerThread), "read region");
      for (int src = 0; src < R; ++src) {
        if (src / P == r / P) continue;
        res.lsa_remote_words += done[src] != 0;
        for (int le = 0; le < EL; ++le) res.lsa_remote_words += counts[static_cast<size_t>(le) * R + src] != 0;
      }
    }
  }
  return res;
}

void check_ll_run(const LLCase& c, const LLRun& run, const std::vector<LLRankResult>& results) {
  const int R = c.num_ranks, EL = c.num_experts / R;
  const int rounds = run.rounds;
  std::vector<std::vector<RoundOutput>> got(rounds, std::vector<RoundOutput>(R));
  std::vector<std::vector<int32_t>> cum(R);
  std::vector<std::vector<int64_t>> dwait(R), cwait(R);
  std::vector<int> net_used(R, 0);
  std::vector<uint64_t> net_puts(R, 0), net_bytes(R, 0), lsa_remote_words(R, 0);
  for (int r = 0; r < R; ++r) {
    for (int k = 0; k < rounds; ++k) got[k][r] = results[r].got[k];
    cum[r] = results[r].cum;
    dwait[r] = results[r].dwait;
    cwait[r] = results[r].cwait;
    net_used[r] = results[r].net_used;
    net_puts[r] = results[r].net_puts;
    net_bytes[r] = results[r].net_bytes;
    lsa_remote_words[r] = results[r].lsa_remote_words;
  }
  for (int k = 0; k < rounds; ++k) compare_round(c, k, run.in[k], got[k]);
  if ((c.low_latency_net == 1 || c.expect_network) && c.ranks_per_node > 0 && c.ranks_per_node < R) {
    // Puts each rank made to ranks of other nodes: one per (token, k) message it dispatched there,
    // one per row it returned there in the combine, one meta entry per rank of another node and
    // dispatch. Bytes: message payloads, BF16 rows, meta entries.
    const int P = c.ranks_per_node, K = c.num_topk, H = c.hidden, G = H / 128;
    const LowLatencyNetLayout NL = LowLatencyNetLayout::make(LowLatencyLayout::make(c.max_tokens, H, R, c.num_experts));
    const uint64_t payload = c.use_fp8 ? static_cast<uint64_t>(H) + (4 * G + 15) / 16 * 16 : 2ull * H;
    std::vector<uint64_t> want_puts(R, 0), want_bytes(R, 0);
    // A clean zeroes the counters with the rest of the LL state: with one in the graph, the last
    // replay's calls are what they count.
    for (int k = c.clean_in_graph ? rounds - 1 : 0; k < rounds; ++k)
      for (int r = 0; r < R; ++r) {
        want_puts[r] += R - P;
        want_bytes[r] += static_cast<uint64_t>(R - P) * NL.entry_bytes;
        const RoundInput& x = run.in[k][r];
        for (int i = 0; i < x.num_tokens * K; ++i) {
          const int64_t e = x.ref_topk[i];
          if (e < 0) continue;
          const int owner = static_cast<int>(e) / EL;
          if (owner / P == r / P) continue;
          want_puts[r] += 1;
          want_bytes[r] += payload;
          want_puts[owner] += 1;
          want_bytes[owner] += 2ull * H;
        }
      }
    for (int r = 0; r < R; ++r) {
      EXPECT_EQ(net_used[r], 1) << "rank " << r << " did not take the network path";
      EXPECT_EQ(net_puts[r], want_puts[r]) << "network puts of rank " << r;
      EXPECT_EQ(net_bytes[r], want_bytes[r]) << "network bytes of rank " << r;
      EXPECT_EQ(lsa_remote_words[r], 0u) << "LSA flags from ranks of other nodes in rank " << r << "'s region";
    }
  }
  for (int r = 0; r < R; ++r) {
    std::vector<int32_t> want(EL, 0);
    for (int k = 0; k < rounds; ++k)
      for (int e = 0; e < EL; ++e) want[e] += got[k][r].recv_count[e];
    EXPECT_TRUE(same_values(cum[r], want, "cumulative_local_expert_recv_stats of rank " + std::to_string(r)));
    for (int s = 0; s < R; ++s) {
      EXPECT_GE(dwait[r][s], 0) << "dispatch_wait_recv_cost_stats of rank " << r << " for source " << s;
      EXPECT_GE(cwait[r][s], 0) << "combine_wait_recv_cost_stats of rank " << r << " for rank " << s;
    }
  }
}

// Low-latency mode across (virtual) nodes through the network transport (BufferOptions::
// low_latency_net = 1, EPCOMM_LL_NET): ranks of other nodes get puts and signals only, ranks of the
// same node LSA stores. Every LL feature once per split (2 nodes of 2, 4 nodes of 1; ranks share
// GPUs where there are fewer than 4; processes of fake nodes, tests/gin): outputs against the
// reference, stats, and the puts counted.
std::vector<LLCase> ll_network_cases(int R, int P) {
  LLCase base;
  base.num_ranks = R;
  base.num_experts = 4 * R;
  base.max_tokens = 48;
  base.hidden = 512;
  base.ranks_per_node = P;
  base.low_latency_net = 1;
  std::vector<LLCase> cases;
  cases.push_back(base);  // FP8
  LLCase bf16 = base;
  bf16.use_fp8 = false;
  cases.push_back(bf16);
  LLCase ue8m0 = base;
  ue8m0.round_scale = ue8m0.use_ue8m0 = true;
  ue8m0.out_of_range = true;
  cases.push_back(ue8m0);
  LLCase hook = base;
  hook.hook = true;
  hook.order_mode = 1;
  cases.push_back(hook);
  LLCase two = base;
  two.two_batches = true;
  two.use_fp8 = false;
  cases.push_back(two);
  LLCase zc = base;
  zc.zero_copy = true;
  zc.order_mode = 2;
  cases.push_back(zc);
  LLCase graph = base;
  graph.graph_replays = 3;
  cases.push_back(graph);
  LLCase graph_hook = base;  // (run_case's graph path has no zero copy: y is written in the graph)
  graph_hook.graph_replays = 2;
  graph_hook.hook = true;
  graph_hook.use_fp8 = false;
  cases.push_back(graph_hook);
  LLCase graph_clean = base;  // every replay cleans first: the capturable clean across nodes
  graph_clean.graph_replays = 2;
  graph_clean.clean_in_graph = true;
  cases.push_back(graph_clean);
  LLCase wide = base;  // several experts per rank, a bigger row, topk 6
  wide.num_experts = 8 * R;
  wide.hidden = 2048;
  wide.num_topk = 6;
  wide.max_tokens = 33;
  cases.push_back(wide);
  return cases;
}

void run_case(const LLCase& c) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(describe(c) + " seed=" + std::to_string(seed));
  const LLRun run = make_ll_run(c, seed);
  std::vector<LLRankResult> results(c.num_ranks);
  if (!run_ranks_cleanly(
          c.num_ranks, [&](int r, std::shared_ptr<Group> group) { results[r] = run_ll_rank(c, run, r, group); },
          c.ranks_per_node))
    return;  // a rank failed: its outputs are incomplete
  check_ll_run(c, run, results);
}

}  // namespace epcomm::test
