// Normal-mode dispatch / combine on the GPU against the CPU reference, on fresh random inputs:
// every output compared (recv rows bit for bit, combine against the float32 reference).
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <random>

#include "epcomm/error.hpp"
#include "harness.hpp"
#include "normal_problem.hpp"
#include "normal_rank.hpp"

namespace epcomm::test {
namespace {

using NormalCase = NormalProblem;

std::string describe(const NormalCase& c) {
  std::string s = "R=" + std::to_string(c.num_ranks) + (c.dtype == DType::kBF16 ? " bf16" : " fp8") +
                  " hidden=" + std::to_string(c.hidden) + " K=" + std::to_string(c.num_topk) +
                  " E=" + std::to_string(c.num_experts) + " T<=" + std::to_string(c.max_tokens);
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

// The buffer of a case: the NVLink hints of both configs for its rows, a 5 s timeout.
BufferOptions normal_buffer_options(const NormalCase& c, const Config& cfg, const Config& ccfg) {
  const int R = c.num_ranks, H = c.hidden;
  BufferOptions bo;
  bo.num_nvl_bytes = std::max(cfg.get_nvl_buffer_size_hint(H * 2, R), ccfg.get_nvl_buffer_size_hint(H * 2, R));
  bo.max_tokens_per_rank = 4096;
  bo.timeout_ms = 5000;
  return bo;
}

// After the layout: the count exchange, dispatch and combine of `di` into `h`, each against the
// reference (combine bit for bit). False when the plan already failed (nothing to compare).
bool dispatch_and_combine(Buffer& buf, const NormalRank& t, const DispatchInputs& di, DispatchHandle& h,
                          const Config& ccfg, cudaStream_t stream, const StreamOrder& order) {
  const std::optional<DispatchPlan> plan = t.prepare_dispatch(buf, di, h, order);
  if (!plan) return false;
  buf.dispatch_run(di, *plan, h, t.dispatch_outputs(), order);
  cuda_ok(cudaStreamSynchronize(stream), "sync dispatch");
  t.expect_dispatch();
  buf.combine(t.combine_inputs(ccfg), h, t.combine_outputs(), order);
  cuda_ok(cudaStreamSynchronize(stream), "sync combine");
  t.expect_combine(/*bit_exact=*/true);
  return true;
}

void run_normal_case(const NormalCase& c) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(describe(c) + " seed=" + std::to_string(seed));
  const int R = c.num_ranks;
  const int sms = test_num_sms(R, c.num_sms);

  // ---- inputs of every rank, and the reference results ----
  const NormalReference reference = make_normal_reference(c, seed);

  run_ranks(R, [&](int r, std::shared_ptr<Group> group) {
    Config cfg = Config::dispatch_default(R);
    cfg.num_sms = sms;
    Config ccfg = Config::combine_default(R);
    ccfg.num_sms = sms;
    Buffer buf(group, normal_buffer_options(c, cfg, ccfg));
    cudaStream_t stream;
    cuda_ok(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
    const StreamOrder order{stream, nullptr, false};

    // Every device tensor of the case is allocated (and filled) before the first call (normal_rank.hpp).
    const NormalRank t(c, reference, r, buf.chunk_offset_stride(cfg), group->device());
    t.upload_combine_inputs();

    // layout
    t.run_layout(buf, stream, order);

    // dispatch, combine
    const DispatchInputs di = t.dispatch_inputs(cfg);
    DispatchHandle h = t.handle();
    if (!dispatch_and_combine(buf, t, di, h, ccfg, stream, order)) return;

    // cached dispatch with new x
    buf.cached_dispatch(t.x2.view(), t.cached_scales(), h, t.cached_outputs(), cfg, order);
    cuda_ok(cudaStreamSynchronize(stream), "sync cached");
    t.expect_cached();

    // CUDA graph: the whole step captured once, replayed with new inputs each time.
    if (c.graph)
      t.replay_graph(buf, stream, order, di, t.dispatch_outputs(), t.combine_inputs(ccfg), t.combine_outputs(),
                     /*bit_exact=*/true);
    ranks_meet();  // no rank frees its memory while another's calls run (harness.hpp)
    cudaStreamDestroy(stream);
  });
}

// Ranks must pass rows of the same width (x, its scales, top-k): a peer with other rows would read
// the rings at other offsets. The count exchange compares them (NotifyHeader::row_bytes,
// rows_words): every rank gets an error naming both widths, and reset() recovers, exactly.
TEST(NormalGpu, RowsNotAlikeIsAnErrorThenResetRecovers) {
  NormalCase c;
  c.num_ranks = 2;
  c.num_experts = 32;
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(describe(c) + " seed=" + std::to_string(seed));
  const NormalReference reference = make_normal_reference(c, seed);
  const int R = c.num_ranks, H = c.hidden;
  run_ranks(R, [&](int r, std::shared_ptr<Group> group) {
    Config cfg = Config::dispatch_default(R), ccfg = Config::combine_default(R);
    cfg.num_sms = ccfg.num_sms = test_num_sms(R, c.num_sms);
    Buffer buf(group, normal_buffer_options(c, cfg, ccfg));
    cudaStream_t stream;
    cuda_ok(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
    const StreamOrder order{stream, nullptr, false};
    const NormalRank t(c, reference, r, buf.chunk_offset_stride(cfg), group->device());
    t.upload_combine_inputs();
    const DeviceTensor narrow(DType::kBF16, {t.T, H - 128}, group->device());  // rank 1's other rows
    group->barrier("rows test: tensors made");
    t.run_layout(buf, stream, order);

    DispatchInputs di = t.dispatch_inputs(cfg);
    if (r == 1) di.x = narrow.view();
    DispatchHandle h = t.handle();
    const int mine = r == 1 ? (H - 128) * 2 : H * 2, theirs = r == 1 ? H * 2 : (H - 128) * 2;
    expect_error<TimeoutError>([&] { buf.dispatch_prepare(di, h, std::nullopt, order); },
                               {"ranks disagree on the rows: rank " + std::to_string(r) + " has rows of " +
                                    std::to_string(mine) + " bytes",
                                "peer " + std::to_string(1 - r) + " rows of " + std::to_string(theirs) + " bytes",
                                "reset()"},
                               "rank " + std::to_string(r));
    buf.reset();

    // Alike again: dispatch and combine against the reference.
    h = t.handle();
    dispatch_and_combine(buf, t, t.dispatch_inputs(cfg), h, ccfg, stream, order);
    ranks_meet();
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
  const Form forms[] = {{DType::kI32, 2, 4, false},  // hidden 1008: ceil(ceil(1008/128) / 4) = 2 words
                        {DType::kF32, 16, 1, true},  // 64-channel groups (ceil(1008 / 64) = 16)
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
