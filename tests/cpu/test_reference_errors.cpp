// One test per argument rule (docs/contract.md §6): a valid call, one bad value, and an ArgumentError whose
// message names the argument and the value (and the rank, where several ranks are involved).
#include "cpu/test_reference_util.hpp"

namespace epcomm::ref {
namespace {

using namespace testing_util;

// ---- layout ----

TEST(ReferenceErrors, LayoutTopkIdxOutOfRange) {
  std::vector<int64_t> topk(4 * 2, 0);
  topk[3 * 2 + 1] = 300;
  expect_argument_error([&] { get_dispatch_layout(topk, 4, 2, 256, 8, 8); },
                        {"topk_idx[3][1] = 300 is out of range [-1, 256)"});
  topk[3 * 2 + 1] = -2;
  expect_argument_error([&] { get_dispatch_layout(topk, 4, 2, 256, 8, 8); }, {"topk_idx[3][1] = -2"});
}

TEST(ReferenceErrors, LayoutExpertsNotDivisibleByRanks) {
  expect_argument_error([] { get_dispatch_layout({0, 1}, 1, 2, 10, 4, 4); }, {"num_experts = 10", "num_ranks = 4"});
  expect_argument_error([] { get_dispatch_layout({}, 0, 2, 0, 4, 4); }, {"num_experts = 0"});
}

TEST(ReferenceErrors, LayoutTopkCount) {
  expect_argument_error([] { get_dispatch_layout({}, 0, 0, 8, 2, 2); }, {"num_topk = 0", "[1, 16]"});
  expect_argument_error([] { get_dispatch_layout({}, 0, 17, 8, 2, 2); }, {"num_topk = 17"});
}

TEST(ReferenceErrors, LayoutSizes) {
  expect_argument_error(
      [] {
        get_dispatch_layout({0, 1, 2}, 2, 2, 8, 2, 2);
      },
      {"topk_idx has 3 elements", "num_tokens * num_topk", "= 4"});
  expect_argument_error([] { get_dispatch_layout({}, -1, 2, 8, 2, 2); }, {"num_tokens = -1"});
  expect_argument_error([] { get_dispatch_layout({}, 0, 2, 8, 4, 3); }, {"ranks_per_node = 3"});
  expect_argument_error([] { get_dispatch_layout({}, 0, 2, 8, 0, 1); }, {"num_ranks = 0"});
}

// ---- normal dispatch ----

NormalOptions normal_options() {
  NormalOptions o;
  o.hidden = 16;
  o.num_topk = 2;
  o.num_experts = 4;
  return o;
}

std::vector<NormalInput> normal_inputs(DType dtype = DType::kBF16, int hidden = 16) {
  std::vector<NormalInput> in(2);
  for (int r = 0; r < 2; ++r) {
    in[r].num_tokens = 3;
    in[r].x.assign(3 * hidden * dtype_size(dtype), 0x3f);
    if (dtype == DType::kFP8E4M3) in[r].scales.assign(3 * ((hidden + 127) / 128), 1.0f);
    in[r].topk_idx = {0, 3, 1, -1, 2, 1};
    in[r].topk_weights = {1, 1, 1, 1, 1, 1};
  }
  return in;
}

TEST(ReferenceErrors, NormalDtype) {
  auto o = normal_options();
  o.dtype = DType::kF32;
  expect_argument_error([&] { normal_dispatch(normal_inputs(), o); }, {"rank 0: ", "options.dtype = float32"});
}

TEST(ReferenceErrors, NormalHiddenRowNotMultipleOf16Bytes) {
  auto o = normal_options();
  o.hidden = 12;
  expect_argument_error([&] { normal_dispatch(normal_inputs(DType::kBF16, 12), o); },
                        {"hidden = 12", "24 bytes", "multiple of 16"});
  o.dtype = DType::kFP8E4M3;
  o.hidden = 24;
  expect_argument_error([&] { normal_dispatch(normal_inputs(DType::kFP8E4M3, 24), o); }, {"hidden = 24"});
  o.hidden = 0;
  expect_argument_error([&] { normal_dispatch(normal_inputs(DType::kFP8E4M3, 0), o); }, {"hidden = 0"});
  o.hidden = 16;  // FP8 with 16-byte rows is fine
  EXPECT_EQ(normal_dispatch(normal_inputs(DType::kFP8E4M3, 16), o)[0].recv_scales.size(), 6u);
}

TEST(ReferenceErrors, NormalXAndScalesSizes) {
  auto in = normal_inputs();
  in[1].x.pop_back();
  expect_argument_error([&] { normal_dispatch(in, normal_options()); }, {"rank 1: ", "x (bytes) has 95", "= 96"});
  auto o = normal_options();
  o.dtype = DType::kFP8E4M3;
  in = normal_inputs(DType::kFP8E4M3);
  in[0].scales.push_back(1.0f);
  expect_argument_error([&] { normal_dispatch(in, o); }, {"scales has 4 elements", "ceil(hidden / 128)"});
  in = normal_inputs();
  in[0].scales = {1.0f};
  expect_argument_error([&] { normal_dispatch(in, normal_options()); }, {"scales has 1", "bfloat16"});
}

TEST(ReferenceErrors, NormalTopk) {
  auto in = normal_inputs();
  in[1].topk_idx[5] = 4;
  expect_argument_error([&] { normal_dispatch(in, normal_options()); }, {"rank 1: ", "topk_idx[2][1] = 4", "[-1, 4)"});
  in = normal_inputs();
  in[0].topk_weights.pop_back();
  expect_argument_error([&] { normal_dispatch(in, normal_options()); }, {"topk_weights has 5"});
  in = normal_inputs();
  in[0].topk_idx.clear();
  expect_argument_error([&] { normal_dispatch(in, normal_options()); }, {"topk_idx is empty", "num_topk = 2"});
  auto o = normal_options();
  o.num_topk = 17;
  expect_argument_error([&] { normal_dispatch(normal_inputs(), o); }, {"num_topk = 17"});
  o = normal_options();
  o.num_experts = 5;
  expect_argument_error([&] { normal_dispatch(normal_inputs(), o); }, {"num_experts = 5", "num_ranks = 2"});
  o.num_experts = 0;
  expect_argument_error([&] { normal_dispatch(normal_inputs(), o); }, {"num_experts = 0"});
}

TEST(ReferenceErrors, NormalWeightsRequiredWithTopk) {
  auto in = normal_inputs();
  in[1].topk_weights.clear();
  expect_argument_error([&] { normal_dispatch(in, normal_options()); },
                        {"rank 1: ", "topk_weights has 0 elements", "num_tokens * num_topk"});
}

TEST(ReferenceErrors, NormalAlignmentAndWorstTokens) {
  auto o = normal_options();
  o.expert_alignment = 0;
  expect_argument_error([&] { normal_dispatch(normal_inputs(), o); }, {"expert_alignment = 0", ">= 1"});
  o = normal_options();
  o.num_worst_tokens = -1;
  expect_argument_error([&] { normal_dispatch(normal_inputs(), o); }, {"num_worst_tokens = -1"});
  o.num_worst_tokens = 2;  // rank 0 receives every token of both ranks
  expect_argument_error([&] { normal_dispatch(normal_inputs(), o); }, {"rank 0: ", "num_worst_tokens = 2", "6 tokens"});
}

TEST(ReferenceErrors, NormalIsTokenInRank) {
  auto in = normal_inputs();
  for (auto& r : in) r.topk_idx.clear(), r.topk_weights.clear();
  auto o = normal_options();
  o.num_topk = 0;
  expect_argument_error([&] { normal_dispatch(in, o); }, {"is_token_in_rank has 0 elements", "num_tokens * num_ranks"});
  for (auto& r : in) r.is_token_in_rank = {1, 0, 0, 1, 1, 1};
  in[1].is_token_in_rank[4] = 2;
  expect_argument_error([&] { normal_dispatch(in, o); }, {"rank 1: ", "is_token_in_rank element 4 = 2"});
  in[1].topk_weights = {1, 1};
  in[1].is_token_in_rank[4] = 1;
  expect_argument_error([&] { normal_dispatch(in, o); }, {"topk_weights has 2", "no topk_idx"});
  in = normal_inputs();
  in[0].topk_idx.assign(6, 0);
  in[0].is_token_in_rank = {1, 0, 1, 0, 1, 1};  // token 2 goes to rank 0 only
  expect_argument_error([&] { normal_dispatch(in, normal_options()); },
                        {"is_token_in_rank[2][1] = 1", "topk_idx implies 0"});
  in = normal_inputs();
  o.num_topk = 0;
  expect_argument_error([&] { normal_dispatch(in, o); }, {"topk_idx has 6 elements but num_topk = 0"});
}

TEST(ReferenceErrors, NormalEmptyInputs) {
  expect_argument_error([] { normal_dispatch({}, normal_options()); }, {"inputs is empty"});
}

// ---- cached dispatch and combine: handles ----

std::vector<NormalHandle> handles_of(const std::vector<NormalDispatchOutput>& out) {
  std::vector<NormalHandle> h;
  for (const auto& o : out) h.push_back(o.handle);
  return h;
}

std::vector<NormalInput> bare(std::vector<NormalInput> in) {
  for (auto& r : in) r.topk_idx.clear(), r.topk_weights.clear();
  return in;
}

TEST(ReferenceErrors, CachedDispatchHandle) {
  const auto handles = handles_of(normal_dispatch(normal_inputs(), normal_options()));
  auto in = bare(normal_inputs());
  EXPECT_EQ(normal_cached_dispatch(in, handles, normal_options()).size(), 2u);
  expect_argument_error([&] { normal_cached_dispatch(normal_inputs(), handles, normal_options()); },
                        {"topk_idx/topk_weights must be empty"});
  expect_argument_error([&] { normal_cached_dispatch(in, {handles[0]}, normal_options()); },
                        {"handles has 1 entries", "inputs has 2"});
  in[1].num_tokens = 2;
  in[1].x.resize(2 * 32);
  expect_argument_error([&] { normal_cached_dispatch(in, handles, normal_options()); },
                        {"rank 1: ", "num_tokens = 2", "handle.num_tokens = 3"});
  in = bare(normal_inputs());
  auto broken = handles;
  broken[0].recv_src_idx.pop_back();
  expect_argument_error([&] { normal_cached_dispatch(in, broken, normal_options()); }, {"handle.recv_src_idx has"});
  // A handle from another dispatch: same shapes, different routing.
  auto other = normal_inputs();
  other[1].topk_idx = {0, -1, 0, -1, 0, -1};
  auto mixed = handles;
  mixed[1] = normal_dispatch(other, normal_options())[1].handle;
  expect_argument_error([&] { normal_cached_dispatch(in, mixed, normal_options()); }, {"handle", "one dispatch"});
}

TEST(ReferenceErrors, CombineArguments) {
  const auto out = normal_dispatch(normal_inputs(), normal_options());
  const auto handles = handles_of(out);
  std::vector<CombineInput> in(2);
  for (int j = 0; j < 2; ++j) in[j].x = as_bf16(out[j].recv_x), in[j].topk_weights = out[j].recv_topk_weights;
  EXPECT_EQ(normal_combine(in, handles, 16, 2).size(), 2u);
  auto bad = in;
  bad[1].x.resize(bad[1].x.size() - 16);
  expect_argument_error([&] { normal_combine(bad, handles, 16, 2); }, {"rank 1: ", "x has", "handle.num_recv = "});
  bad = in;
  bad[0].x.pop_back();
  expect_argument_error([&] { normal_combine(bad, handles, 16, 2); }, {"rank 0: ", "x has"});
  bad = in;
  bad[0].bias0.assign(5, 0);
  expect_argument_error([&] { normal_combine(bad, handles, 16, 2); }, {"bias0 has 5", "handle.num_tokens * hidden"});
  bad = in;
  bad[1].bias1.assign(47, 0);
  expect_argument_error([&] { normal_combine(bad, handles, 16, 2); }, {"bias1 has 47"});
  bad = in;
  bad[0].topk_weights.pop_back();
  expect_argument_error([&] { normal_combine(bad, handles, 16, 2); }, {"topk_weights has"});
  bad = in;
  bad[0].topk_weights.clear();
  expect_argument_error([&] { normal_combine(bad, handles, 16, 2); },
                        {"rank 0: ", "topk_weights has 0 elements", "num_topk = 0 to combine no weights"});
  expect_argument_error([&] { normal_combine(in, handles, 16, 0); }, {"topk_weights has", "num_topk = 0"});
  expect_argument_error([&] { normal_combine(in, handles, 16, 17); }, {"num_topk = 17"});
  expect_argument_error([&] { normal_combine(in, handles, 12, 2); }, {"hidden = 12"});
  expect_argument_error([&] { normal_combine(in, {handles[0]}, 16, 2); }, {"handles has 1 entries"});
  auto swapped = handles;
  std::swap(swapped[0], swapped[1]);
  expect_argument_error([&] { normal_combine(in, swapped, 16, 2); }, {"handle"});
}

// ---- low-latency ----

LowLatencyOptions ll_options() {
  LowLatencyOptions o;
  o.hidden = 128;
  o.num_topk = 2;
  o.num_experts = 4;
  o.num_max_dispatch_tokens_per_rank = 4;
  return o;
}

std::vector<LowLatencyDispatchInput> ll_inputs() {
  std::vector<LowLatencyDispatchInput> in(2);
  for (auto& r : in) {
    r.num_tokens = 3;
    r.x.assign(3 * 128, float_to_bf16(1.0f));
    r.topk_idx = {0, 3, 1, -1, 2, 1};
  }
  return in;
}

TEST(ReferenceErrors, LowLatencyDispatchArguments) {
  EXPECT_EQ(low_latency_dispatch(ll_inputs(), ll_options()).size(), 2u);
  auto o = ll_options();
  o.hidden = 100;
  expect_argument_error([&] { low_latency_dispatch(ll_inputs(), o); }, {"hidden = 100", "multiple of 128"});
  o = ll_options();
  o.num_max_dispatch_tokens_per_rank = 2;
  expect_argument_error([&] { low_latency_dispatch(ll_inputs(), o); },
                        {"num_tokens = 3", "num_max_dispatch_tokens_per_rank = 2"});
  o.num_max_dispatch_tokens_per_rank = 0;
  expect_argument_error([&] { low_latency_dispatch(ll_inputs(), o); }, {"num_max_dispatch_tokens_per_rank = 0"});
  o = ll_options();
  o.use_ue8m0 = true;
  expect_argument_error([&] { low_latency_dispatch(ll_inputs(), o); }, {"use_ue8m0", "round_scale"});
  o = ll_options();
  o.num_experts = 5;
  expect_argument_error([&] { low_latency_dispatch(ll_inputs(), o); }, {"num_experts = 5"});
  o = ll_options();
  o.num_topk = 0;
  expect_argument_error([&] { low_latency_dispatch(ll_inputs(), o); }, {"num_topk = 0"});
  auto in = ll_inputs();
  in[1].topk_idx[2] = 9;
  expect_argument_error([&] { low_latency_dispatch(in, ll_options()); }, {"rank 1: ", "topk_idx[1][0] = 9", "[-1, 4)"});
  in = ll_inputs();
  in[0].x.resize(5);
  expect_argument_error([&] { low_latency_dispatch(in, ll_options()); }, {"x has 5", "num_tokens * hidden"});
  in = ll_inputs();
  in[0].topk_idx = {1, 1, 1, 1, 1, -1};  // 5 rows for expert 1 from one source; Tmax is 4
  expect_argument_error([&] { low_latency_dispatch(in, ll_options()); },
                        {"expert 1", "num_max_dispatch_tokens_per_rank = 4"});
}

TEST(ReferenceErrors, LowLatencyCombineArguments) {
  const auto in = ll_inputs();
  auto o = ll_options();
  o.use_fp8 = false;  // identity experts: y = the received BF16 rows
  const auto disp = low_latency_dispatch(in, o);
  std::vector<LowLatencyCombineInput> cin(2);
  for (int r = 0; r < 2; ++r) {
    cin[r].num_tokens = 3;
    cin[r].y = as_bf16(disp[r].recv_x);
    cin[r].topk_idx = in[r].topk_idx;
    cin[r].topk_weights.assign(6, 1.0f);
  }
  EXPECT_EQ(low_latency_combine(cin, disp, o).size(), 2u);
  auto bad = cin;
  bad[1].y.pop_back();
  expect_argument_error([&] { low_latency_combine(bad, disp, o); }, {"rank 1: ", "y has"});
  bad = cin;
  bad[0].topk_weights.pop_back();
  expect_argument_error([&] { low_latency_combine(bad, disp, o); }, {"topk_weights has 5"});
  bad = cin;
  bad[0].topk_idx[1] = 2;  // token 0 was never sent to expert 2
  expect_argument_error([&] { low_latency_combine(bad, disp, o); }, {"rank 0: ", "topk_idx[0][1] = 2", "no row"});
  bad = cin;
  bad[0].num_tokens = 5;
  expect_argument_error([&] { low_latency_combine(bad, disp, o); }, {"num_tokens = 5"});
  auto broken = disp;
  broken[1].layout_range[0] = (int64_t{7} << 32) | 3;
  expect_argument_error([&] { low_latency_combine(cin, broken, o); }, {"layout_range[0][0]", "begin 7"});
  broken = disp;
  broken[0].src_info.pop_back();
  expect_argument_error([&] { low_latency_combine(cin, broken, o); }, {"src_info has"});
  expect_argument_error([&] { low_latency_combine(cin, {disp[0]}, o); }, {"dispatch_outputs has 1 entries"});
}

}  // namespace
}  // namespace epcomm::ref
