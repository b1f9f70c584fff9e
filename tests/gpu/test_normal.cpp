// Normal-mode dispatch / combine on the GPU against the CPU reference, on fresh random inputs:
// every output compared (recv rows bit for bit, combine against the float32 reference).
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <random>

#include "harness.hpp"
#include "normal_problem.hpp"

namespace epcomm::test {
namespace {

using NormalCase = NormalProblem;

std::string describe(const NormalCase& c) {
  std::string s = "R=" + std::to_string(c.num_ranks) + (c.dtype == DType::kBF16 ? " bf16" : " fp8") +
                  " hidden=" + std::to_string(c.hidden) + " K=" + std::to_string(c.num_topk) + " E=" +
                  std::to_string(c.num_experts) + " T<=" + std::to_string(c.max_tokens);
  if (c.fixed_tokens >= 0) s += " T=" + std::to_string(c.fixed_tokens);
  if (!c.with_topk) s += " no-topk";
  if (c.skewed) s += " skewed";
  if (c.worst) s += " worst";
  if (c.graph) s += " graph";
  if (c.dtype == DType::kFP8E4M3)
    s += std::string(" scales ") + (c.scale_dtype == DType::kI32 ? "int32" : "float32") + " x" +
         std::to_string(c.scale_words()) + (c.scales_row_major ? " row-major" : " column-major") +
         (c.scale_token_align > 1 ? " aligned " + std::to_string(c.scale_token_align) : "");
  return s;
}

void run_normal_case(const NormalCase& c) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(describe(c) + " seed=" + std::to_string(seed));
  const int R = c.num_ranks, H = c.hidden, K = c.num_topk, E = c.num_experts;
  const int elt = c.dtype == DType::kBF16 ? 2 : 1;
  const int G = c.scale_words();
  const int sms = test_num_sms(R, c.num_sms);

  // ---- inputs of every rank, and the reference results ----
  const NormalReference reference = make_normal_reference(c, seed);
  const std::vector<RankInputs>& in = reference.in;

  run_ranks(R, [&](int r, std::shared_ptr<Group> group) {
    const RankInputs& ri = in[r];
    const int T = ri.num_tokens;
    const int dev = group->device();
    Config cfg = Config::dispatch_default(R);
    cfg.num_sms = sms;
    Config ccfg = Config::combine_default(R);
    ccfg.num_sms = sms;
    BufferOptions bo;
    bo.num_nvl_bytes = std::max(cfg.get_nvl_buffer_size_hint(H * 2, R), ccfg.get_nvl_buffer_size_hint(H * 2, R));
    bo.max_tokens_per_rank = 4096;
    bo.timeout_ms = 5000;
    Buffer buf(group, bo);
    cudaStream_t stream;
    cuda_ok(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
    const StreamOrder order{stream, nullptr, false};

    DeviceTensor x(c.dtype, {T, H}, dev), x2(c.dtype, {T, H}, dev);
    x.upload(ri.x);
    x2.upload(ri.x2);
    DeviceTensor sc = scale_tensor(c, T, dev), sc2 = scale_tensor(c, T, dev);
    if (c.dtype == DType::kFP8E4M3) {
      sc.upload(scale_layout(c, ri.scales, T));
      sc2.upload(scale_layout(c, ri.scales2, T));
    }
    DeviceTensor topk(DType::kI64, {T, K}, dev), weights(DType::kF32, {T, K}, dev);
    topk.upload(ri.topk);
    weights.upload(ri.weights);

    // Every device tensor of the case is allocated (and filled) before the first call: ranks that
    // share a GPU are threads of one process, and an allocation that synchronizes the device would
    // wait for a co-resident rank's kernel that waits for this rank (README "Limits").
    const auto& want = reference.dispatch[r];
    const int rows = want.num_rows;
    const int stride = buf.chunk_offset_stride(cfg);
    DeviceTensor per_rank(DType::kI32, {R}, dev), per_expert(DType::kI32, {E}, dev), in_rank(DType::kBool, {T, R}, dev);
    DeviceTensor prefix(DType::kI32, {R, R}, dev), chunk_off(DType::kI32, {R, stride}, dev);
    DeviceTensor per_expert_recv(DType::kI32, {E / R}, dev);
    DeviceTensor rx(c.dtype, {rows, H}, dev), rsc(c.scale_dtype, {rows, G}, dev);
    DeviceTensor ridx(DType::kI64, {rows, K}, dev), rw(DType::kF32, {rows, K}, dev), src(DType::kI32, {rows}, dev);
    DeviceTensor y(DType::kBF16, {rows, H}, dev), cw(DType::kF32, {rows, K}, dev);
    y.upload(reference.combine_in[r].x);
    if (c.with_topk) cw.upload(reference.combine_in[r].topk_weights);
    DeviceTensor b0(DType::kBF16, {T, H}, dev), b1(DType::kBF16, {T, H}, dev);
    if (c.with_bias) {
      b0.upload(reference.combine_in[r].bias0);
      b1.upload(reference.combine_in[r].bias1);
    }
    DeviceTensor out(DType::kBF16, {T, H}, dev), out_w(DType::kF32, {T, K}, dev);
    DeviceTensor cx(c.dtype, {rows, H}, dev), csc(c.scale_dtype, {rows, G}, dev);

    // layout
    buf.get_dispatch_layout(topk.view(), E, {per_rank.view(), std::nullopt, per_expert.view(), in_rank.view()}, order);
    cuda_ok(cudaStreamSynchronize(stream), "sync layout");
    const ref::Layout& lay = ri.layout;
    EXPECT_TRUE(same_values(per_rank.download<int32_t>(), lay.num_tokens_per_rank, "num_tokens_per_rank"));
    EXPECT_TRUE(same_values(per_expert.download<int32_t>(), lay.num_tokens_per_expert, "num_tokens_per_expert"));
    EXPECT_TRUE(same_values(in_rank.download<uint8_t>(), lay.is_token_in_rank, "is_token_in_rank"));

    // dispatch
    DispatchInputs di;
    di.x = x.view();
    if (c.dtype == DType::kFP8E4M3) di.x_scales = scale_view(c, sc, T);
    if (c.with_topk) {
      di.topk_idx = topk.view();
      di.topk_weights = weights.view();
    }
    di.num_tokens_per_rank = per_rank.view();
    di.is_token_in_rank = in_rank.view();
    di.num_tokens_per_expert = per_expert.view();
    di.expert_alignment = c.expert_alignment;
    di.num_worst_tokens = reference.num_worst_tokens;
    di.config = cfg;
    DispatchHandle h;
    h.rank_prefix_matrix = prefix.view();
    h.chunk_offset = chunk_off.view();
    const DispatchPlan plan = buf.dispatch_prepare(di, h, per_expert_recv.view(), order);
    ASSERT_EQ(plan.num_rows, want.num_rows);
    if (!c.worst && c.with_topk)
      EXPECT_TRUE(same_values(std::vector<int32_t>(plan.num_recv_tokens_per_expert.begin(),
                                                   plan.num_recv_tokens_per_expert.end()),
                              want.num_recv_tokens_per_expert, "num_recv_tokens_per_expert (host)"));
    h.recv_src_idx = src.view();
    DispatchOutputs dout;
    dout.recv_x = rx.view();
    if (c.dtype == DType::kFP8E4M3) dout.recv_x_scales = rsc.view();
    if (c.with_topk) {
      dout.recv_topk_idx = ridx.view();
      dout.recv_topk_weights = rw.view();
    }
    buf.dispatch_run(di, plan, h, dout, order);
    cuda_ok(cudaStreamSynchronize(stream), "sync dispatch");
    const int nrecv = want.handle.num_recv;
    EXPECT_TRUE(same_values(prefix.download<int32_t>(), want.handle.rank_prefix_matrix, "rank_prefix_matrix"));
    if (c.with_topk)
      EXPECT_TRUE(same_values(per_expert_recv.download<int32_t>(), want.num_recv_tokens_per_expert,
                              "num_recv_tokens_per_expert (device)"));
    EXPECT_TRUE(same_values(rx.download<uint8_t>(), want.recv_x, "recv_x", static_cast<size_t>(nrecv) * H * elt));
    EXPECT_TRUE(same_values(src.download<int32_t>(), want.handle.recv_src_idx, "recv_src_idx", nrecv));
    if (c.dtype == DType::kFP8E4M3)
      EXPECT_TRUE(same_scale_words(rsc, want.recv_scales, "recv_x_scales", static_cast<size_t>(nrecv) * G));
    if (c.with_topk) {
      EXPECT_TRUE(same_values(ridx.download<int64_t>(), want.recv_topk_idx, "recv_topk_idx"));
      EXPECT_TRUE(same_values(rw.download<float>(), want.recv_topk_weights, "recv_topk_weights"));
    }

    // combine
    CombineInputs ci;
    ci.x = y.view();
    if (c.with_topk) ci.topk_weights = cw.view();
    if (c.with_bias) {
      ci.bias0 = b0.view();
      ci.bias1 = b1.view();
    }
    ci.config = ccfg;
    CombineOutputs co;
    co.combined_x = out.view();
    if (c.with_topk) co.combined_topk_weights = out_w.view();
    buf.combine(ci, h, co, order);
    cuda_ok(cudaStreamSynchronize(stream), "sync combine");
    EXPECT_TRUE(close_bf16(out.download<uint16_t>(), reference.combine[r].combined_x, "combined_x", 1e-2));
    EXPECT_TRUE(same_values(out.download<uint16_t>(), reference.combine[r].combined_x, "combined_x (bit-exact)"));
    if (c.with_topk)
      EXPECT_TRUE(same_values(out_w.download<float>(), reference.combine[r].combined_topk_weights,
          "combined_topk_weights"));

    // cached dispatch with new x
    DispatchOutputs cout_;
    cout_.recv_x = cx.view();
    if (c.dtype == DType::kFP8E4M3) cout_.recv_x_scales = csc.view();
    std::optional<TensorView> sc2v;
    if (c.dtype == DType::kFP8E4M3) sc2v = scale_view(c, sc2, T);
    buf.cached_dispatch(x2.view(), sc2v, h, cout_, cfg, order);
    cuda_ok(cudaStreamSynchronize(stream), "sync cached");
    EXPECT_TRUE(same_values(cx.download<uint8_t>(), reference.cached[r].recv_x,
        "cached recv_x", static_cast<size_t>(nrecv) * H * elt));
    if (c.dtype == DType::kFP8E4M3)
      EXPECT_TRUE(same_scale_words(csc, reference.cached[r].recv_scales, "cached recv_x_scales",
                                   static_cast<size_t>(nrecv) * G));

    // CUDA graph: the whole step captured once, replayed with new inputs each time.
    if (c.graph) {
      cudaGraph_t graph;
      cudaGraphExec_t exec;
      cuda_ok(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "begin capture");
      buf.get_dispatch_layout(topk.view(), E, {per_rank.view(), std::nullopt, per_expert.view(), in_rank.view()}, order);
      DispatchHandle gh;
      gh.rank_prefix_matrix = prefix.view();
      gh.chunk_offset = chunk_off.view();
      const DispatchPlan gp = buf.dispatch_prepare(di, gh, per_expert_recv.view(), order);
      gh.recv_src_idx = src.view();
      buf.dispatch_run(di, gp, gh, dout, order);
      buf.combine(ci, gh, co, order);
      cuda_ok(cudaStreamEndCapture(stream, &graph), "end capture");
      cuda_ok(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
      for (int replay = 0; replay < 3; ++replay) {
        // Same routing, new data: outputs must follow.
        x.upload(replay % 2 ? ri.x : ri.x2);
        cuda_ok(cudaGraphLaunch(exec, stream), "graph launch");
        cuda_ok(cudaStreamSynchronize(stream), "graph sync");
        const auto& want_x = replay % 2 ? want.recv_x : reference.cached[r].recv_x;
        EXPECT_TRUE(same_values(rx.download<uint8_t>(), want_x, "graph recv_x", static_cast<size_t>(nrecv) * H * elt));
        EXPECT_TRUE(same_values(out.download<uint16_t>(), reference.combine[r].combined_x, "graph combined_x"));
      }
      cudaGraphExecDestroy(exec);
      cudaGraphDestroy(graph);
    }
    ranks_meet();  // no rank frees its memory while another's calls run (harness.hpp)
    cudaStreamDestroy(stream);
  });
}

TEST(NormalGpu, Bf16AllRankCounts) {
  for (int R : {2, 3, 4}) {
    NormalCase c;
    c.num_ranks = R;
    c.num_experts = 16 * R;
    run_normal_case(c);
  }
}

TEST(NormalGpu, Fp8AllRankCounts) {
  for (int R : {2, 3, 4}) {
    NormalCase c;
    c.num_ranks = R;
    c.dtype = DType::kFP8E4M3;
    c.hidden = 1008;  // not a multiple of 128: a partial scale group
    c.num_experts = 8 * R;
    run_normal_case(c);
  }
}

// DeepEP's scale forms: packed UE8M0 int32 words, column-major with the token stride rounded up to 4
// (DeepGEMM's TMA-aligned form, what SGLang passes), float32 scales of another group count
// (per 64 channels), row-major, and a single word per token. Received scales are [rows, S]
// row-major of the same dtype, bit for bit (the int32 words include NaN float patterns).
TEST(NormalGpu, Fp8ScaleForms) {
  struct Form {
    DType dtype;
    int words;
    int align;
    bool row_major;
  };
  const Form forms[] = {{DType::kI32, 2, 4, false},   // hidden 1008: ceil(ceil(1008/128) / 4) = 2 words
                        {DType::kF32, 16, 1, true},   // 64-channel groups (ceil(1008 / 64) = 16)
                        {DType::kI32, 1, 1, true},
                        {DType::kF32, 3, 4, false}};
  for (const Form& f : forms) {
    NormalCase c;
    c.num_ranks = 3;
    c.dtype = DType::kFP8E4M3;
    c.hidden = 1008;
    c.num_experts = 24;
    c.scale_dtype = f.dtype;
    c.num_scales = f.words;
    c.scale_token_align = f.align;
    c.scales_row_major = f.row_major;
    run_normal_case(c);
  }
  NormalCase worst;  // num_worst_tokens pads the int32 words too
  worst.dtype = DType::kFP8E4M3;
  worst.scale_dtype = DType::kI32;
  worst.num_scales = 2;
  worst.scale_token_align = 4;
  worst.worst = true;
  run_normal_case(worst);
}

TEST(NormalGpu, WithoutTopk) {
  NormalCase c;
  c.with_topk = false;
  run_normal_case(c);
}

TEST(NormalGpu, WorstTokensAndGraph) {
  NormalCase c;
  c.worst = true;
  c.graph = true;
  run_normal_case(c);
  c.dtype = DType::kFP8E4M3;
  c.graph = false;
  run_normal_case(c);
}

TEST(NormalGpu, SkewedToOneExpert) {
  NormalCase c;
  c.skewed = true;
  c.num_topk = 4;
  run_normal_case(c);
}

// Every token to expert 0 and one rank without tokens (the stress test's step that hung with three
// ranks on one GPU, seed 4129355205): the idle rank is done at once and must not free its memory
// while the others still combine (ranks_meet). FP8 with a partial scale group, and BF16.
TEST(NormalGpu, AllToOneExpertWithAnIdleRank) {
  for (const DType dtype : {DType::kFP8E4M3, DType::kBF16}) {
    NormalCase c;
    c.num_ranks = 3;
    c.dtype = dtype;
    c.hidden = 1008;
    c.num_topk = 5;
    c.num_experts = 24;
    c.routing = [](int, int T) {
      std::vector<int64_t> topk(static_cast<size_t>(T) * 5, -1);
      for (int t = 0; t < T; ++t) topk[static_cast<size_t>(t) * 5] = 0;
      return topk;
    };
    c.tokens = [](int r) { return r == 0 ? 160 : r == 1 ? 0 : 90; };
    run_normal_case(c);
  }
}

TEST(NormalGpu, ZeroAndOneToken) {
  for (int t : {0, 1}) {
    NormalCase c;
    c.fixed_tokens = t;
    run_normal_case(c);
  }
}

TEST(NormalGpu, WideRowsTop16) {
  NormalCase c;
  c.hidden = 7168;
  c.num_topk = 16;
  c.num_experts = 256;
  c.max_tokens = 200;
  run_normal_case(c);
  c.hidden = 16384;
  c.max_tokens = 64;
  c.num_topk = 8;
  run_normal_case(c);
}

}  // namespace
}  // namespace epcomm::test

namespace epcomm::test {
namespace {

// R = 5 ... 8: every R-dependent path (source rotation, segments of several sources per block,
// masks, prefix matrix) on the device. On machines with fewer GPUs the ranks share them.
TEST(NormalGpu, FiveToEightRanks) {
  for (int R : {5, 6, 7, 8}) {
    NormalCase c;
    c.num_ranks = R;
    c.num_experts = 8 * R;
    c.max_tokens = 150;
    c.dtype = R % 2 ? DType::kBF16 : DType::kFP8E4M3;
    c.hidden = R % 2 ? 1024 : 1024 + 128;
    c.num_sms = 4;
    run_normal_case(c);
  }
}

}  // namespace
}  // namespace epcomm::test
