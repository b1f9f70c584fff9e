// Low-latency mode on the GPU when a call goes wrong, and the ways back: argument errors leave the
// buffer usable, too many rows for one expert and the end of the call numbers are reported,
// clean_low_latency_buffer (eager or captured in a CUDA graph) and zeroing the region bring the
// buffer back, and a combine waiting for a row that never comes times out naming the peer. Every
// round that must work is checked against the CPU reference (ll_harness.hpp).
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <functional>
#include <random>
#include <string>

#include "epcomm/error.hpp"
#include "harness.hpp"
#include "kernels/low_latency/params.hpp"
#include "ll_harness.hpp"

namespace epcomm::test {
namespace {

// An error-path test's ranks: each gets a buffer (timeout `timeout_ms`) with its stream, a batch of
// Tmax tokens and the inputs of round 0 (`seed`), uploaded, and runs `body` with them.
using ErrorPathBody = std::function<void(int rank, Buffer& buf, cudaStream_t stream, const StreamOrder& order, Batch& b,
                                         const RoundInput& in)>;
void run_error_path(const LLCase& c, int64_t timeout_ms, uint64_t seed, const ErrorPathBody& body) {
  run_ranks(c.num_ranks, [&](int r, std::shared_ptr<Group> group) {
    RankBuffer rb(group, c, timeout_ms);
    Batch b = make_batch(c, c.max_tokens, rb.device);
    const RoundInput in = make_input(c, seed, 0, r, c.max_tokens);
    upload_dispatch_inputs(b, in);
    body(r, *rb.buffer, rb.stream, rb.order, b, in);
  });
}

// Dispatch and combine of one batch (its expert outputs `in.y` uploaded between), then a wait for
// the stream (`what` names it in a failure); the caller checks the device errors.
void round_trip(Buffer& buf, cudaStream_t stream, const StreamOrder& order, Batch& b, const RoundInput& in,
                const char* what) {
  buf.low_latency_dispatch(b.din, b.dout, b.handle, false, order);
  b.y.upload(in.y);
  buf.low_latency_combine(b.cin, b.handle, b.out.view(), false, order);
  cuda_ok(cudaStreamSynchronize(stream), what);
}

TEST(LowLatencyGpu, ArgumentErrorsLeaveTheBufferUsable) {
  const int R = 2, Tmax = 16, H = 256, E = 8, K = 4;
  const LLCase c = small_case(R, Tmax, H, E, K);
  run_error_path(c, 5000, 99,
                 [&](int r, Buffer& buf, cudaStream_t stream, const StreamOrder& order, Batch& b,
                     const RoundInput& in) {
                   const int dev = buf.device();
                   auto expect_refused = [&](LowLatencyDispatchInputs din, LowLatencyDispatchOutputs dout,
                                             const std::string& needle) {
                     LowLatencyHandle h;
                     expect_error<ArgumentError>([&] { buf.low_latency_dispatch(din, dout, h, false, order); },
                                                 {needle});
                   };
                   LowLatencyDispatchInputs d = b.din;
                   d.num_max_dispatch_tokens_per_rank = Tmax - 1;  // T = Tmax > Tmax - 1
                   expect_refused(d, b.dout, "exceed num_max_dispatch_tokens_per_rank");
                   d = b.din;
                   d.num_experts = 7;
                   expect_refused(d, b.dout, "num_experts = 7 must be divisible by num_ranks");
                   d = b.din;
                   d.num_max_dispatch_tokens_per_rank = 4096;
                   expect_refused(d, b.dout, "num_rdma_bytes");
                   d = b.din;
                   d.use_ue8m0 = true;
                   expect_refused(d, b.dout, "round_scale");
                   DeviceTensor x_bad(DType::kBF16, {Tmax, 200}, dev);
                   d = b.din;
                   d.x = x_bad.view();
                   expect_refused(d, b.dout, "hidden = 200 must be a positive multiple of 128");
                   DeviceTensor topk_bad(DType::kI64, {Tmax, 17}, dev);
                   d = b.din;
                   d.topk_idx = topk_bad.view();
                   expect_refused(d, b.dout, "num_topk = 17");
                   LowLatencyDispatchOutputs o = b.dout;
                   TensorView s = *o.recv_x_scales;
                   s.strides = {s.strides[0], static_cast<int64_t>(H / 128), 1, 0};  // row-major instead of transposed
                   o.recv_x_scales = s;
                   expect_refused(b.din, o, "strides");
                   // The buffer still works.
                   round_trip(buf, stream, order, b, in, "sync");
                   buf.check_device_errors();
                   const auto count = b.count.download<int32_t>();
                   int total = 0;
                   for (int v : count) total += v;
                   EXPECT_GT(total, 0);
                   // Another shape needs clean_low_latency_buffer first; after it the new shape works.
                   LLCase c8 = c;
                   c8.max_tokens = 8;
                   Batch b8 = make_batch(c8, 8, dev);
                   const RoundInput in8 = make_input(c8, 7, 0, r, 8);
                   upload_dispatch_inputs(b8, in8);
                   expect_refused(b8.din, b8.dout, "clean_low_latency_buffer");
                   buf.clean_low_latency_buffer(8, H, E, stream);
                   round_trip(buf, stream, order, b8, in8, "sync");
                   EXPECT_EQ(b8.handle.buffer_index, 0) << "clean starts over at buffer 0";
                   buf.check_device_errors();
                 });
}

// Tokens that list one expert twice may push more than Tmax rows to it: the rows past Tmax are
// dropped (never written past the slots), the call reports it, and clean brings the buffer back.
TEST(LowLatencyGpu, TooManyRowsForOneExpertIsReported) {
  const int R = 2, Tmax = 4, H = 256, E = 4, K = 2;
  const LLCase c = small_case(R, Tmax, H, E, K);
  run_error_path(c, 5000, 5,
                 [&](int r, Buffer& buf, cudaStream_t stream, const StreamOrder& order, Batch& b,
                     const RoundInput& in) {
                   b.topk.upload(std::vector<int64_t>(static_cast<size_t>(Tmax) * K, 0));  // 8 rows for expert 0
                   buf.low_latency_dispatch(b.din, b.dout, b.handle, false, order);
                   cuda_ok(cudaStreamSynchronize(stream), "sync");
                   expect_error<Error>([&] { buf.check_device_errors(); },
                                       {"more than num_max_dispatch_tokens_per_rank = 4 rows to expert 0"},
                                       "rank " + std::to_string(r) + ": the overflow");
                   buf.clean_low_latency_buffer(Tmax, H, E, stream);
                   upload_dispatch_inputs(b, in);
                   round_trip(buf, stream, order, b, in, "sync after clean");
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
  run_error_path(c, 5000, 7,
                 [&](int r, Buffer& buf, cudaStream_t stream, const StreamOrder& order, Batch& b,
                     const RoundInput& in) {
                   const auto round = [&](const char* what) { round_trip(buf, stream, order, b, in, what); };
                   round("the last numbers");
                   buf.check_device_errors();
                   buf.low_latency_dispatch(b.din, b.dout, b.handle, false, order);  // number kLastCallNumber + 1
                   cuda_ok(cudaStreamSynchronize(stream), "past the last number");
                   expect_error<RuntimeFailure>([&] { buf.check_device_errors(); },
                                                {"low_latency_dispatch on rank " + std::to_string(r) + " did not run",
                                                 "call numbers"},
                                                "rank " + std::to_string(r) + ": a dispatch past the last call number");
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

// clean_low_latency_buffer zeroes only the words LL calls wait on (LowLatencyLayout::flags_begin,
// the network area's signals and shadows), not the rows. Here every byte of every rank's LL region
// is set (0xff: each flag then reads as arrived for any call, each shadow as far ahead) after a
// round, as if normal mode or earlier calls had left anything anywhere; after one clean the next
// rounds (both buffers) must match the reference. A flag the clean missed gives wrong rows or a
// timeout. The LSA paths (per expert; per rank: dispatch, then combine too) and the network path
// over two virtual nodes.
TEST(LowLatencyGpu, CleanAfterEveryByteSetMatchesReference) {
  const uint64_t seed = std::random_device{}();
  struct Variant {
    const char* name;
    int per_rank, ranks_per_node, net;
  };
  for (const Variant v :
       {Variant{"per expert", 0, 0, -1}, Variant{"per-rank dispatch", 1, 0, -1}, Variant{"per-rank combine", 2, 0, -1},
        Variant{"per-rank combine, float32 partials", 4, 0, -1}, Variant{"network, 2 virtual nodes", 0, 1, 1}}) {
    LLCase c;
    c.num_ranks = 2;
    c.hidden = 512;
    c.num_experts = 64;  // 32 per rank: room for the per-rank plan (LowLatencyLayout::per_rank_combine_fits)
    c.num_topk = 4;
    c.max_tokens = 32;
    const LowLatencyLayout l = LowLatencyLayout::make(c.max_tokens, c.hidden, c.num_ranks, c.num_experts);
    if (v.per_rank > 0) ASSERT_TRUE(low_latency_per_rank_wanted(l, true, v.per_rank)) << v.name;
    if (v.per_rank > 1) ASSERT_NE(low_latency_partials(l, v.per_rank), LowLatencyPartials::kNone) << v.name;
    c.low_latency_per_rank = v.per_rank;
    c.ranks_per_node = v.ranks_per_node;
    c.low_latency_net = v.net;
    SCOPED_TRACE(std::string(v.name) + ": " + describe(c) + " seed=" + std::to_string(seed));
    const int R = c.num_ranks, rounds = 3;
    std::vector<std::vector<RoundInput>> in(rounds, std::vector<RoundInput>(R));
    for (int k = 0; k < rounds; ++k)
      for (int r = 0; r < R; ++r) in[k][r] = make_input(c, seed, k, r, r == 0 ? c.max_tokens : c.max_tokens / 2);
    std::vector<std::vector<RoundOutput>> got(rounds, std::vector<RoundOutput>(R));
    const bool clean = run_ranks_cleanly(
        R,
        [&](int r, std::shared_ptr<Group> group) {
          RankBuffer rb(group, c, c.timeout_ms);
          Buffer& buf = *rb.buffer;
          std::vector<Batch> batches;
          for (int k = 0; k < rounds; ++k) batches.push_back(make_batch(c, in[k][r].num_tokens, rb.device));
          auto round = [&](int k) {
            Batch& b = batches[k];
            upload_dispatch_inputs(b, in[k][r]);
            b.y.upload(in[k][r].y);
            b.out.fill_bytes(0);
            buf.low_latency_dispatch(b.din, b.dout, b.handle, false, rb.order);
            buf.low_latency_combine(b.cin, b.handle, b.out.view(), false, rb.order);
            rb.sync("round");
            got[k][r] = download_dispatch(c, R, b);
            got[k][r].out = b.out.download<uint16_t>();
          };
          round(0);
          ranks_meet();  // every peer's writes into this region ended
          const auto [region, bytes] = buf.local_buffer(true);
          cuda_ok(cudaMemsetAsync(region, 0xff, bytes, rb.stream), "set every byte of the LL region");
          rb.sync("set");
          ranks_meet();
          buf.clean_low_latency_buffer(c.max_tokens, c.hidden, c.num_experts, rb.stream);
          round(1);
          round(2);
          buf.check_device_errors();
          ranks_meet();
        },
        c.ranks_per_node);
    if (!clean) return;
    for (int k = 0; k < rounds; ++k) {
      SCOPED_TRACE("round " + std::to_string(k) + (k > 0 ? " (after every byte set and a clean)" : ""));
      compare_round(c, k, in[k], got[k]);
    }
  }
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
  const bool clean = run_ranks_cleanly(R, [&](int r, std::shared_ptr<Group> group) {
    RankBuffer rb(group, c, c.timeout_ms);
    Buffer& buf = *rb.buffer;
    cudaStream_t stream = rb.stream;
    const StreamOrder& order = rb.order;
    std::vector<Batch> batches;
    for (int k = 0; k < kEager + 1; ++k) batches.push_back(make_batch(c, in[0][r].num_tokens, rb.device));
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
  if (!clean) return;
  for (int k = 0; k < rounds; ++k) {
    SCOPED_TRACE("round " + std::to_string(k) +
                 (k == 1                 ? " (after an eager clean)"
                  : k >= 2 && k < kEager ? " (after zeroing the region)"
                  : k >= kEager          ? " (graph with clean inside)"
                                         : ""));
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
  run_error_path(c, 1000, 1234,
                 [&](int r, Buffer& buf, cudaStream_t stream, const StreamOrder& order, Batch& b,
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
                         for (int k = 0; k < c.num_topk; ++k)
                           dup |= (row * c.num_topk + k != i && topk[row * c.num_topk + k] == topk[i]);
                         if (!dup) break;
                         topk[i] = -1;
                       }
                     b.topk.upload(topk);
                   }
                   buf.low_latency_combine(b.cin, b.handle, b.out.view(), false, order);
                   cuda_ok(cudaStreamSynchronize(stream), "sync");
                   if (r == 0) {
                     expect_error<TimeoutError>([&] { buf.check_device_errors(); },
                                                {"low_latency_combine", "peer 1", "expert output row"}, "rank 0");
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
