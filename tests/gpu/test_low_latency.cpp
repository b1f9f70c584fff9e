// Low-latency dispatch / combine on the GPU against the CPU reference, on fresh random inputs with
// -1 (and out-of-range) topk entries. Every rank runs its rounds on the GPU and keeps what it got;
// the comparison runs afterwards on the host: dispatch rows per (local expert, source rank) as sets
// (data and scales bit for bit), counts and ranges exactly; combine bit for bit against the
// reference evaluated through the GPU's own handle (src_info, layout_range).
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <tuple>

#include "epcomm/error.hpp"
#include "harness.hpp"
#include "kernels/low_latency/params.hpp"

namespace epcomm::test {
namespace {

struct LLCase {
  int num_ranks = 2;
  int hidden = 1024;
  int num_topk = 8;
  int num_experts = 16;
  int max_tokens = 64;        // Tmax
  int fixed_tokens = -1;      // >= 0: every rank has exactly this many tokens, else random (rank 0: Tmax)
  bool use_fp8 = true;
  bool round_scale = false;
  bool use_ue8m0 = false;
  bool hook = false;          // send and receive halves as two calls
  bool two_batches = false;   // two micro-batches interleaved: send A, send B, recv A, recv B (hook)
  bool zero_copy = false;     // y written into get_next_low_latency_combine_buffer
  int graph_replays = 0;      // > 0: capture dispatch + combine once, replay with new inputs
  bool out_of_range = false;  // also put ids >= E and < -1 into topk_idx (treated as -1)
  bool duplicates = false;    // some tokens list an expert twice (two rows, in k order)
  int order_mode = 0;         // 0: on the caller's stream, 1: async_finish + event, 2: previous_event
  double drop_rate = 0.1;
  int64_t timeout_ms = 5000;
};

std::string describe(const LLCase& c) {
  std::string s = "R=" + std::to_string(c.num_ranks) + " hidden=" + std::to_string(c.hidden) + " K=" +
                  std::to_string(c.num_topk) + " E=" + std::to_string(c.num_experts) + " Tmax=" +
                  std::to_string(c.max_tokens) + (c.use_fp8 ? " fp8" : " bf16");
  if (c.round_scale) s += " round_scale";
  if (c.use_ue8m0) s += " ue8m0";
  if (c.hook) s += " hook";
  if (c.two_batches) s += " two-batches";
  if (c.zero_copy) s += " zero-copy";
  if (c.graph_replays) s += " graph x" + std::to_string(c.graph_replays);
  if (c.out_of_range) s += " out-of-range-ids";
  if (c.duplicates) s += " duplicate-experts";
  if (c.order_mode == 1) s += " async_finish";
  if (c.order_mode == 2) s += " previous_event";
  return s;
}

struct RoundInput {
  int num_tokens = 0;
  std::vector<uint16_t> x;
  std::vector<int64_t> topk;      // as the device gets it
  std::vector<int64_t> ref_topk;  // out-of-range ids replaced by -1
  std::vector<float> weights;
  std::vector<uint16_t> y;        // [E/R, R*Tmax, hidden]
};

struct RoundOutput {
  std::vector<int32_t> recv_count, src_info;
  std::vector<int64_t> layout_range;
  std::vector<uint8_t> recv_x;
  std::vector<float> scales;      // logical [E/R, R*Tmax, G]
  std::vector<int32_t> packed;    // logical [E/R, R*Tmax, ceil(G/4)]
  std::vector<uint16_t> out;
};

// A buffer sized for the case, with a stream of this rank's own (destroyed with it).
struct RankBuffer {
  RankBuffer(const std::shared_ptr<Group>& group, const LLCase& c, int64_t timeout_ms) {
    BufferOptions bo;
    bo.num_rdma_bytes = Buffer::low_latency_size_hint(c.max_tokens, c.hidden, c.num_ranks, c.num_experts);
    bo.timeout_ms = timeout_ms;
    buffer = std::make_unique<Buffer>(group, bo);
    cuda_ok(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
  }
  ~RankBuffer() { cudaStreamDestroy(stream); }
  std::unique_ptr<Buffer> buffer;
  cudaStream_t stream = nullptr;
};

// A small case for the error-path tests.
LLCase small_case(int R, int Tmax, int H, int E, int K) {
  LLCase c;
  c.num_ranks = R;
  c.hidden = H;
  c.num_experts = E;
  c.num_topk = K;
  c.max_tokens = Tmax;
  return c;
}

RoundInput make_input(const LLCase& c, uint64_t seed, int round, int rank, int num_tokens) {
  std::mt19937_64 rng(seed * 1000003ull + round * 7919ull + rank);
  RoundInput in;
  in.num_tokens = num_tokens;
  in.x = random_bf16(rng, static_cast<size_t>(num_tokens) * c.hidden);
  in.ref_topk = random_topk(rng, num_tokens, RoutingSpec{c.num_experts, c.num_topk, false, c.drop_rate});
  if (c.duplicates)
    for (int t = 0; t < num_tokens; t += 4) {
      int64_t* row = in.ref_topk.data() + static_cast<size_t>(t) * c.num_topk;
      if (row[0] >= 0) row[c.num_topk - 1] = row[0];
    }
  in.topk = in.ref_topk;
  if (c.out_of_range)
    for (size_t i = 0; i < in.topk.size(); ++i)
      if (in.topk[i] < 0 && i % 3 == 0) in.topk[i] = (i % 2) ? c.num_experts + static_cast<int64_t>(i % 5) : -2 - static_cast<int64_t>(i % 7);
  in.weights = random_weights(rng, in.topk.size());
  const int64_t slots = static_cast<int64_t>(c.num_ranks) * c.max_tokens;
  in.y = testing::fast_bf16(seed * 31 + round * 1009 + rank,
                            static_cast<size_t>(c.num_experts / c.num_ranks) * slots * c.hidden);
  return in;
}

// Views of the outputs of one batch on one rank.
struct Batch {
  DeviceTensor x, topk, weights, y, recv_x, scales, count, src_info, range, out;
  LowLatencyDispatchInputs din;
  LowLatencyDispatchOutputs dout;
  LowLatencyCombineInputs cin;
  LowLatencyHandle handle;
};

Batch make_batch(const LLCase& c, int R, int T, int dev, int sms, const DeviceTensor* cum, const DeviceTensor* dwait,
                 const DeviceTensor* cwait) {
  const int EL = c.num_experts / R, H = c.hidden, K = c.num_topk, G = H / 128, W = (G + 3) / 4;
  const int64_t RT = static_cast<int64_t>(R) * c.max_tokens;
  Batch b;
  b.x = DeviceTensor(DType::kBF16, {T, H}, dev);
  b.topk = DeviceTensor(DType::kI64, {T, K}, dev);
  b.weights = DeviceTensor(DType::kF32, {T, K}, dev);
  b.y = DeviceTensor(DType::kBF16, {EL, RT, H}, dev);
  b.recv_x = DeviceTensor(c.use_fp8 ? DType::kFP8E4M3 : DType::kBF16, {EL, RT, H}, dev);
  b.scales = c.use_ue8m0 ? DeviceTensor(DType::kI32, {EL, W, RT}, dev) : DeviceTensor(DType::kF32, {EL, G, RT}, dev);
  b.count = DeviceTensor(DType::kI32, {EL}, dev);
  b.src_info = DeviceTensor(DType::kI32, {EL, RT}, dev);
  b.range = DeviceTensor(DType::kI64, {EL, R}, dev);
  b.out = DeviceTensor(DType::kBF16, {T, H}, dev);
  b.din.x = b.x.view();
  b.din.topk_idx = b.topk.view();
  b.din.num_max_dispatch_tokens_per_rank = c.max_tokens;
  b.din.num_experts = c.num_experts;
  b.din.use_fp8 = c.use_fp8;
  b.din.round_scale = c.round_scale;
  b.din.use_ue8m0 = c.use_ue8m0;
  b.din.num_sms = sms;
  if (cum) b.din.cumulative_local_expert_recv_stats = cum->view();
  if (dwait) b.din.dispatch_wait_recv_cost_stats = dwait->view();
  b.dout.recv_x = b.recv_x.view();
  if (c.use_fp8) {
    const int cols = c.use_ue8m0 ? W : G;
    TensorView s = b.scales.view();
    s.shape = {EL, RT, cols, 0};
    s.strides = {cols * RT, 1, RT, 0};
    b.dout.recv_x_scales = s;
  }
  b.dout.recv_count = b.count.view();
  b.dout.src_info = b.src_info.view();
  b.dout.layout_range = b.range.view();
  b.cin.x = b.y.view();
  b.cin.topk_idx = b.topk.view();
  b.cin.topk_weights = b.weights.view();
  b.cin.zero_copy = c.zero_copy;
  b.cin.num_sms = sms;
  if (cwait) b.cin.combine_wait_recv_cost_stats = cwait->view();
  return b;
}

void upload_dispatch_inputs(Batch& b, const RoundInput& in) {
  b.x.upload(in.x);
  b.topk.upload(in.topk);
  b.weights.upload(in.weights);
}

void upload_y(const LLCase& c, Buffer& buf, Batch& b, const RoundInput& in) {
  if (!c.zero_copy) {
    b.y.upload(in.y);
    return;
  }
  const TensorView zc = buf.get_next_low_latency_combine_buffer(b.handle);
  ASSERT_EQ(zc.nbytes(), in.y.size() * 2);
  cuda_ok(cudaMemcpy(zc.data, in.y.data(), zc.nbytes(), cudaMemcpyHostToDevice), "zero-copy upload");
}

RoundOutput download_dispatch(const LLCase& c, int R, const Batch& b) {
  const int EL = c.num_experts / R, G = c.hidden / 128, W = (G + 3) / 4;
  const int64_t RT = static_cast<int64_t>(R) * c.max_tokens;
  RoundOutput o;
  o.recv_count = b.count.download<int32_t>();
  o.src_info = b.src_info.download<int32_t>();
  o.layout_range = b.range.download<int64_t>();
  o.recv_x = b.recv_x.download<uint8_t>();
  if (c.use_fp8 && !c.use_ue8m0) {
    const auto raw = b.scales.download<float>();  // [EL][G][RT]
    o.scales.resize(raw.size());
    for (int e = 0; e < EL; ++e)
      for (int g = 0; g < G; ++g)
        for (int64_t s = 0; s < RT; ++s) o.scales[(e * RT + s) * G + g] = raw[(static_cast<int64_t>(e) * G + g) * RT + s];
  }
  if (c.use_fp8 && c.use_ue8m0) {
    const auto raw = b.scales.download<int32_t>();  // [EL][W][RT]
    o.packed.resize(raw.size());
    for (int e = 0; e < EL; ++e)
      for (int w = 0; w < W; ++w)
        for (int64_t s = 0; s < RT; ++s) o.packed[(e * RT + s) * W + w] = raw[(static_cast<int64_t>(e) * W + w) * RT + s];
  }
  return o;
}

// One received row as comparable bytes: data, then its scales.
struct Row {
  int32_t src;
  std::vector<uint8_t> bytes;
  bool operator<(const Row& o) const { return std::tie(src, bytes) < std::tie(o.src, o.bytes); }
  bool operator==(const Row& o) const { return src == o.src && bytes == o.bytes; }
};

Row make_row(const LLCase& c, int64_t slot, int32_t src, const std::vector<uint8_t>& x, const std::vector<float>& scales,
             const std::vector<int32_t>& packed) {
  const int H = c.hidden, G = H / 128, W = (G + 3) / 4;
  const size_t row_bytes = static_cast<size_t>(H) * (c.use_fp8 ? 1 : 2);
  Row r{src, std::vector<uint8_t>(x.begin() + slot * row_bytes, x.begin() + (slot + 1) * row_bytes)};
  if (c.use_fp8 && !c.use_ue8m0) {
    const auto* p = reinterpret_cast<const uint8_t*>(scales.data() + slot * G);
    r.bytes.insert(r.bytes.end(), p, p + 4 * G);
  }
  if (c.use_fp8 && c.use_ue8m0) {
    const auto* p = reinterpret_cast<const uint8_t*>(packed.data() + slot * W);
    r.bytes.insert(r.bytes.end(), p, p + 4 * W);
  }
  return r;
}

void compare_round(const LLCase& c, int round, const std::vector<RoundInput>& in, const std::vector<RoundOutput>& got) {
  const int R = c.num_ranks, EL = c.num_experts / R;
  const int64_t RT = static_cast<int64_t>(R) * c.max_tokens;
  ref::LowLatencyOptions opt;
  opt.hidden = c.hidden;
  opt.num_topk = c.num_topk;
  opt.num_experts = c.num_experts;
  opt.num_max_dispatch_tokens_per_rank = c.max_tokens;
  opt.use_fp8 = c.use_fp8;
  opt.round_scale = c.round_scale;
  opt.use_ue8m0 = c.use_ue8m0;
  std::vector<ref::LowLatencyDispatchInput> din(R);
  for (int r = 0; r < R; ++r) din[r] = {in[r].num_tokens, in[r].x, in[r].ref_topk};
  const auto want = ref::low_latency_dispatch(din, opt);

  for (int j = 0; j < R; ++j) {
    SCOPED_TRACE("round " + std::to_string(round) + ", rank " + std::to_string(j));
    const RoundOutput& g = got[j];
    const auto& w = want[j];
    ASSERT_TRUE(same_values(g.recv_count, w.recv_count, "recv_count"));
    bool rows_ok = true;
    for (int e = 0; e < EL && rows_ok; ++e) {
      int64_t next_begin = 0;
      for (int s = 0; s < R && rows_ok; ++s) {
        const int64_t gr = g.layout_range[e * R + s], wr = w.layout_range[e * R + s];
        const int64_t gb = gr >> 32, gn = gr & 0xffffffff, wb = wr >> 32, wn = wr & 0xffffffff;
        EXPECT_EQ(gn, wn) << "layout_range count of local expert " << e << " from rank " << s;
        EXPECT_EQ(gb, next_begin) << "layout_range begin of local expert " << e << " from rank " << s
                                  << " (sources are packed in rank order)";
        if (gn != wn || gb != next_begin) {
          rows_ok = false;
          break;
        }
        next_begin += gn;
        std::vector<Row> a, b;
        for (int64_t i = 0; i < gn; ++i) {
          a.push_back(make_row(c, e * RT + gb + i, g.src_info[e * RT + gb + i], g.recv_x, g.scales, g.packed));
          b.push_back(make_row(c, e * RT + wb + i, w.src_info[e * RT + wb + i], w.recv_x, w.recv_scales,
                               w.recv_scales_ue8m0));
        }
        std::sort(a.begin(), a.end());
        std::sort(b.begin(), b.end());
        for (size_t i = 0; i < a.size() && rows_ok; ++i)
          if (!(a[i] == b[i])) {
            ADD_FAILURE() << "rows of local expert " << e << " from rank " << s << " differ as a set: sorted row " << i
                          << " has source token " << a[i].src << " (want " << b[i].src << ")"
                          << (a[i].src == b[i].src ? ", same token, different data or scales" : "");
            rows_ok = false;
          }
      }
    }
  }

  // Combine, through the GPU's own handles.
  std::vector<ref::LowLatencyDispatchOutput> handles(R);
  std::vector<ref::LowLatencyCombineInput> cin(R);
  for (int r = 0; r < R; ++r) {
    handles[r].src_info = got[r].src_info;
    handles[r].layout_range = got[r].layout_range;
    cin[r] = {in[r].num_tokens, in[r].y, in[r].ref_topk, in[r].weights};
  }
  const auto want_out = ref::low_latency_combine(cin, handles, opt);
  for (int j = 0; j < R; ++j) {
    SCOPED_TRACE("round " + std::to_string(round) + ", rank " + std::to_string(j));
    EXPECT_TRUE(same_values(got[j].out, want_out[j], "combined x (bit-exact)"));
  }
}

void run_case(const LLCase& c) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(describe(c) + " seed=" + std::to_string(seed));
  const int R = c.num_ranks, EL = c.num_experts / R;
  const int rounds = c.graph_replays > 0 ? c.graph_replays : (c.two_batches ? 2 : 1);
  std::vector<int> tokens(R);
  for (int r = 0; r < R; ++r) {
    std::mt19937_64 rng(seed + 17 * r);
    tokens[r] = c.fixed_tokens >= 0 ? c.fixed_tokens
                                    : (r == 0 ? c.max_tokens : std::uniform_int_distribution<int>(0, c.max_tokens)(rng));
  }
  std::vector<std::vector<RoundInput>> in(rounds, std::vector<RoundInput>(R));
  for (int k = 0; k < rounds; ++k)
    for (int r = 0; r < R; ++r) in[k][r] = make_input(c, seed, k, r, tokens[r]);
  std::vector<std::vector<RoundOutput>> got(rounds, std::vector<RoundOutput>(R));
  std::vector<std::vector<int32_t>> cum(R);
  std::vector<std::vector<int64_t>> dwait(R), cwait(R);

  const auto* result = ::testing::UnitTest::GetInstance()->current_test_info()->result();
  const int parts_before = result->total_part_count();
  run_ranks(R, [&](int r, std::shared_ptr<Group> group) {
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
    const int T = tokens[r];
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

    if (c.graph_replays > 0) {
      Batch b = make_batch(c, R, T, dev, sms, &cum_t, &dwait_t, &cwait_t);
      upload_dispatch_inputs(b, in[0][r]);
      cudaGraph_t graph;
      cudaGraphExec_t exec;
      cuda_ok(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "begin capture");
      dispatch(b, c.hook);
      if (c.hook) dispatch_recv(b);
      combine(b, c.hook);
      if (c.hook) combine_recv(b);
      cuda_ok(cudaStreamEndCapture(stream, &graph), "end capture");
      cuda_ok(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
      for (int k = 0; k < c.graph_replays; ++k) {
        upload_dispatch_inputs(b, in[k][r]);
        b.y.upload(in[k][r].y);
        cuda_ok(cudaGraphLaunch(exec, stream), "graph launch");
        sync("graph replay");
        got[k][r] = download_dispatch(c, R, b);
        got[k][r].out = b.out.download<uint16_t>();
      }
      cudaGraphExecDestroy(exec);
      cudaGraphDestroy(graph);
    } else if (c.two_batches) {
      Batch a = make_batch(c, R, T, dev, sms, &cum_t, &dwait_t, &cwait_t);
      Batch b = make_batch(c, R, T, dev, sms, &cum_t, &dwait_t, &cwait_t);
      upload_dispatch_inputs(a, in[0][r]);
      upload_dispatch_inputs(b, in[1][r]);
      dispatch(a, true);
      dispatch(b, true);
      EXPECT_NE(a.handle.buffer_index, b.handle.buffer_index) << "micro-batches must use different buffers";
      dispatch_recv(a);
      dispatch_recv(b);
      sync("dispatch");
      got[0][r] = download_dispatch(c, R, a);
      got[1][r] = download_dispatch(c, R, b);
      upload_y(c, buf, a, in[0][r]);
      upload_y(c, buf, b, in[1][r]);
      combine(a, true);
      combine(b, true);
      combine_recv(a);
      combine_recv(b);
      sync("combine");
      got[0][r].out = a.out.download<uint16_t>();
      got[1][r].out = b.out.download<uint16_t>();
    } else {
      Batch b = make_batch(c, R, T, dev, sms, &cum_t, &dwait_t, &cwait_t);
      upload_dispatch_inputs(b, in[0][r]);
      dispatch(b, c.hook);
      if (c.hook) dispatch_recv(b);
      sync("dispatch");
      got[0][r] = download_dispatch(c, R, b);
      upload_y(c, buf, b, in[0][r]);
      combine(b, c.hook);
      if (c.hook) combine_recv(b);
      sync("combine");
      got[0][r].out = b.out.download<uint16_t>();
    }
    buf.check_device_errors();
    cum[r] = cum_t.download<int32_t>();
    dwait[r] = dwait_t.download<int64_t>();
    cwait[r] = cwait_t.download<int64_t>();
    cudaEventDestroy(previous);
  });
  if (result->total_part_count() != parts_before) return;  // a rank failed: its outputs are incomplete

  for (int k = 0; k < rounds; ++k) compare_round(c, k, in[k], got[k]);
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

TEST(LowLatencyGpu, SizeHintNoLargerThanDeepEP) {
  for (int tmax : {1, 2, 7, 128, 1024})
    for (int hidden : {128, 256, 2048, 7168})
      for (int R : {1, 2, 3, 4, 8, 16, 32})
        for (int per_rank : {1, 2, 5, 9, 72})
          for (int extra : {0, 1}) {
            const int E = R * per_rank + extra * R;
            const size_t ours = Buffer::low_latency_size_hint(tmax, hidden, R, E);
            const size_t theirs = deepep_low_latency_size_hint(tmax, hidden, R, E);
            EXPECT_LE(ours, theirs) << "Tmax=" << tmax << " hidden=" << hidden << " R=" << R << " E=" << E;
          }
  // The standard problem: about half of DeepEP's.
  EXPECT_LT(Buffer::low_latency_size_hint(128, 7168, 4, 288), deepep_low_latency_size_hint(128, 7168, 4, 288) * 6 / 10);
}

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
  LLCase c;  // SPEC.md §7: 128 tokens, hidden 7168, top-8, 288 experts, FP8 dispatch
  c.num_ranks = 4;
  c.num_experts = 288;
  c.hidden = 7168;
  c.max_tokens = 128;
  c.fixed_tokens = 128;
  c.drop_rate = 0.0;
  run_case(c);
}

TEST(LowLatencyGpu, ArgumentErrorsLeaveTheBufferUsable) {
  const int R = 2, Tmax = 16, H = 256, E = 8, K = 4;
  const LLCase c = small_case(R, Tmax, H, E, K);
  run_ranks(R, [&](int r, std::shared_ptr<Group> group) {
    const int dev = group->device();
    RankBuffer rb(group, c, 5000);
    Buffer& buf = *rb.buffer;
    cudaStream_t stream = rb.stream;
    const StreamOrder order{stream, nullptr, false};
    Batch b = make_batch(c, R, Tmax, dev, test_num_sms(R, 132), nullptr, nullptr, nullptr);
    const RoundInput in = make_input(c, 99, 0, r, Tmax);
    upload_dispatch_inputs(b, in);
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
  run_ranks(R, [&](int r, std::shared_ptr<Group> group) {
    const int dev = group->device();
    RankBuffer rb(group, c, 5000);
    Buffer& buf = *rb.buffer;
    cudaStream_t stream = rb.stream;
    const StreamOrder order{stream, nullptr, false};
    Batch b = make_batch(c, R, Tmax, dev, test_num_sms(R, 132), nullptr, nullptr, nullptr);
    RoundInput in = make_input(c, 5, 0, r, Tmax);
    upload_dispatch_inputs(b, in);
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
  run_ranks(R, [&](int r, std::shared_ptr<Group> group) {
    const int dev = group->device();
    RankBuffer rb(group, c, 1000);
    Buffer& buf = *rb.buffer;
    cudaStream_t stream = rb.stream;
    const StreamOrder order{stream, nullptr, false};
    Batch b = make_batch(c, R, c.max_tokens, dev, test_num_sms(R, 132), nullptr, nullptr, nullptr);
    RoundInput in = make_input(c, 1234, 0, r, c.max_tokens);
    upload_dispatch_inputs(b, in);
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
