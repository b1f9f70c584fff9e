// Normal-mode dispatch and combine (docs/contract.md §3.2) on small hand-computed cases.
#include "cpu/test_reference_util.hpp"

namespace epcomm::ref {
namespace {

using namespace testing_util;
using V32 = std::vector<int32_t>;
using V64 = std::vector<int64_t>;

constexpr int kHidden = 8;  // 16-byte BF16 rows

// Row of token t of rank `src`: every channel distinct, so a misplaced row is caught.
std::vector<uint16_t> token_row(int src, int t) {
  std::vector<uint16_t> row(kHidden);
  for (int c = 0; c < kHidden; ++c) row[c] = bf16(static_cast<float>(100 * src + 10 * t + c + 1));
  return row;
}

std::vector<uint16_t> rows_of(int src, int T) {
  std::vector<uint16_t> x;
  for (int t = 0; t < T; ++t) {
    auto row = token_row(src, t);
    x.insert(x.end(), row.begin(), row.end());
  }
  return x;
}

// 2 ranks, 4 experts (rank 0 owns 0,1; rank 1 owns 2,3), top-2.
//   rank 0: t0 -> {0, 3} (both ranks), t1 -> {1, -1} (rank 0), t2 -> {2, 3} (rank 1)
//   rank 1: t0 -> {3, 0} (both ranks), t1 -> nothing
std::vector<NormalInput> two_rank_inputs() {
  std::vector<NormalInput> in(2);
  in[0].num_tokens = 3;
  in[0].x = as_bytes(rows_of(0, 3));
  in[0].topk_idx = {0, 3, 1, -1, 2, 3};
  in[0].topk_weights = {0.5f, 0.25f, 1.0f, 0.0f, 2.0f, 4.0f};
  in[1].num_tokens = 2;
  in[1].x = as_bytes(rows_of(1, 2));
  in[1].topk_idx = {3, 0, -1, -1};
  in[1].topk_weights = {8.0f, 16.0f, 0.0f, 0.0f};
  return in;
}

NormalOptions two_rank_options(int alignment = 1, int worst = 0) {
  NormalOptions o;
  o.hidden = kHidden;
  o.num_topk = 2;
  o.num_experts = 4;
  o.expert_alignment = alignment;
  o.num_worst_tokens = worst;
  return o;
}

void expect_rows(const NormalDispatchOutput& out, const std::vector<std::pair<int, int>>& rows) {
  ASSERT_EQ(out.handle.num_recv, static_cast<int>(rows.size()));
  const auto x = as_bf16(out.recv_x);
  for (size_t i = 0; i < rows.size(); ++i) {
    EXPECT_EQ(out.handle.recv_src_rank[i], rows[i].first) << "row " << i;
    EXPECT_EQ(out.handle.recv_src_idx[i], rows[i].second) << "row " << i;
    const auto want = token_row(rows[i].first, rows[i].second);
    EXPECT_TRUE(std::equal(want.begin(), want.end(), x.begin() + i * kHidden)) << "row " << i;
  }
}

TEST(ReferenceNormal, DispatchHandComputed) {
  const auto out = normal_dispatch(two_rank_inputs(), two_rank_options());
  ASSERT_EQ(out.size(), 2u);
  // Source rank 0's rows first, ascending token; then rank 1's.
  expect_rows(out[0], {{0, 0}, {0, 1}, {1, 0}});
  expect_rows(out[1], {{0, 0}, {0, 2}, {1, 0}});
  for (int j = 0; j < 2; ++j) {
    EXPECT_EQ(out[j].num_rows, 3);
    EXPECT_EQ(out[j].handle.rank_prefix_matrix, (V32{2, 2, 3, 3}));
    EXPECT_EQ(out[j].handle.num_tokens, j == 0 ? 3 : 2);
    EXPECT_TRUE(out[j].recv_scales.empty());
  }
  EXPECT_EQ(out[0].handle.is_token_in_rank, (std::vector<uint8_t>{1, 1, 1, 0, 0, 1}));
  // Local ids on the receiver, -1 for experts elsewhere; weights only where local.
  EXPECT_EQ(out[0].recv_topk_idx, (V64{0, -1, 1, -1, -1, 0}));
  EXPECT_EQ(out[0].recv_topk_weights, (std::vector<float>{0.5f, 0, 1.0f, 0, 0, 16.0f}));
  EXPECT_EQ(out[1].recv_topk_idx, (V64{-1, 1, 0, 1, 1, -1}));
  EXPECT_EQ(out[1].recv_topk_weights, (std::vector<float>{0, 0.25f, 2.0f, 4.0f, 8.0f, 0}));
  EXPECT_EQ(out[0].num_recv_tokens_per_expert, (V32{2, 1}));
  EXPECT_EQ(out[1].num_recv_tokens_per_expert, (V32{1, 3}));
}

TEST(ReferenceNormal, ExpertAlignmentRoundsEachExpertsTotal) {
  // Expert 0 gets one token from each source: total 2, a multiple of 2 already.
  auto out = normal_dispatch(two_rank_inputs(), two_rank_options(2));
  EXPECT_EQ(out[0].num_recv_tokens_per_expert, (V32{2, 2}));
  EXPECT_EQ(out[1].num_recv_tokens_per_expert, (V32{2, 4}));
  out = normal_dispatch(two_rank_inputs(), two_rank_options(128));
  EXPECT_EQ(out[0].num_recv_tokens_per_expert, (V32{128, 128}));
}

TEST(ReferenceNormal, NumWorstTokensPadsRows) {
  const auto out = normal_dispatch(two_rank_inputs(), two_rank_options(1, 5));
  for (const auto& o : out) {
    EXPECT_EQ(o.num_rows, 5);
    EXPECT_EQ(o.handle.num_recv, 3);
    ASSERT_EQ(o.recv_x.size(), 5u * kHidden * 2);
    ASSERT_EQ(o.recv_topk_idx.size(), 10u);
    for (size_t b = 3 * kHidden * 2; b < o.recv_x.size(); ++b) EXPECT_EQ(o.recv_x[b], 0);
    for (size_t k = 6; k < 10; ++k) {
      EXPECT_EQ(o.recv_topk_idx[k], -1);
      EXPECT_EQ(o.recv_topk_weights[k], 0.0f);
    }
  }
  expect_rows(out[1], {{0, 0}, {0, 2}, {1, 0}});
  // Exactly enough rows is fine; one short is an error.
  EXPECT_EQ(normal_dispatch(two_rank_inputs(), two_rank_options(1, 3))[0].num_rows, 3);
  expect_argument_error([] { normal_dispatch(two_rank_inputs(), two_rank_options(1, 2)); },
                        {"num_worst_tokens = 2", "3 tokens"});
}

TEST(ReferenceNormal, Fp8DispatchCopiesBytesAndScales) {
  // hidden 160: 160-byte rows, two scale columns (the second covers 32 channels).
  const int hidden = 160;
  std::vector<NormalInput> in(2);
  for (int r = 0; r < 2; ++r) {
    in[r].num_tokens = 2;
    for (int i = 0; i < 2 * hidden; ++i) in[r].x.push_back(static_cast<uint8_t>(i * 7 + r));
    in[r].scales = {1.0f + r, 2.0f + r, 3.0f + r, 4.0f + r};
    in[r].topk_idx = {r, -1, 1 - r, -1};  // token 0 stays home, token 1 goes to the other rank
    in[r].topk_weights = {1.0f, 0.0f, 1.0f, 0.0f};
  }
  NormalOptions o;
  o.dtype = DType::kFP8E4M3;
  o.hidden = hidden;
  o.num_topk = 2;
  o.num_experts = 2;
  const auto out = normal_dispatch(in, o);
  // Rank 0 receives (0, t0) then (1, t1).
  ASSERT_EQ(out[0].num_rows, 2);
  EXPECT_EQ(out[0].recv_scales, (std::vector<float>{1, 2, 4, 5}));
  EXPECT_TRUE(std::equal(in[0].x.begin(), in[0].x.begin() + hidden, out[0].recv_x.begin()));
  EXPECT_TRUE(std::equal(in[1].x.begin() + hidden, in[1].x.end(), out[0].recv_x.begin() + hidden));
  EXPECT_EQ(out[1].recv_scales, (std::vector<float>{3, 4, 2, 3}));
  // With padding, scales past num_recv are zero.
  o.num_worst_tokens = 4;
  const auto padded = normal_dispatch(in, o);
  EXPECT_EQ(padded[0].recv_scales, (std::vector<float>{1, 2, 4, 5, 0, 0, 0, 0}));
  EXPECT_EQ(padded[0].recv_x.size(), 4u * hidden);
}

// DeepEP's other scale forms: int32 words (UE8M0 exponents packed four per word, some of which read
// as NaN floats) and a scale count that is not ceil(hidden / 128) travel bit for bit, in dispatch
// and cached dispatch; a wrong count is refused.
TEST(ReferenceNormal, Fp8ScaleWordsOfAnyCountTravelBitForBit) {
  const int hidden = 512;
  for (const int words : {1, 2, 5}) {
    std::vector<NormalInput> in(2);
    std::vector<std::vector<int32_t>> sent(2);
    for (int r = 0; r < 2; ++r) {
      in[r].num_tokens = 3;
      for (int i = 0; i < 3 * hidden; ++i) in[r].x.push_back(static_cast<uint8_t>(i * 5 + r));
      for (int t = 0; t < 3; ++t)
        for (int w = 0; w < words; ++w)  // 0x7f800001 + ...: NaN bit patterns among ordinary ones
          sent[r].push_back(static_cast<int32_t>(w % 2 ? 0x7f800001u + 16u * t + r : 0x7e7d7c7bu - 256u * t - r));
      in[r].scales = scale_words_from(sent[r]);
      in[r].topk_idx = {r, -1, 1 - r, -1, 0, 1};  // t0 home, t1 to the other rank, t2 to both
      in[r].topk_weights = {1.0f, 0.0f, 1.0f, 0.0f, 0.5f, 0.5f};
    }
    NormalOptions o;
    o.dtype = DType::kFP8E4M3;
    o.hidden = hidden;
    o.num_topk = 2;
    o.num_experts = 2;
    o.num_scales = words;
    ASSERT_EQ(o.scale_words(), words);
    const auto out = normal_dispatch(in, o);
    // Rank 0 receives (0, t0), (0, t2), (1, t1), (1, t2).
    const std::pair<int, int> rows0[] = {{0, 0}, {0, 2}, {1, 1}, {1, 2}};
    const auto got = scale_words_as_int(out[0].recv_scales);
    ASSERT_EQ(got.size(), 4u * words);
    for (int i = 0; i < 4; ++i)
      for (int w = 0; w < words; ++w)
        EXPECT_EQ(got[i * words + w], sent[rows0[i].first][rows0[i].second * words + w])
            << "row " << i << " word " << w;
    // Cached dispatch of new words: the same rows.
    std::vector<NormalHandle> handles{out[0].handle, out[1].handle};
    std::vector<NormalInput> again = in;
    for (int r = 0; r < 2; ++r) {
      for (auto& v : sent[r]) v = ~v;
      again[r].scales = scale_words_from(sent[r]);
      again[r].topk_idx.clear();
      again[r].topk_weights.clear();
    }
    NormalOptions co = o;
    co.num_topk = 0;
    const auto cached = scale_words_as_int(normal_cached_dispatch(again, handles, co)[0].recv_scales);
    ASSERT_EQ(cached.size(), 4u * words);
    for (int i = 0; i < 4; ++i)
      for (int w = 0; w < words; ++w)
        EXPECT_EQ(cached[i * words + w], sent[rows0[i].first][rows0[i].second * words + w]) << "cached row " << i;
    // The count must match the scales given.
    o.num_scales = words + 1;
    expect_argument_error([&] { normal_dispatch(in, o); }, {"scales", "scale words per token"});
  }
  NormalOptions bad;
  bad.dtype = DType::kFP8E4M3;
  bad.hidden = hidden;
  bad.num_scales = 513;
  expect_argument_error([&] { normal_dispatch(std::vector<NormalInput>(2), bad); }, {"num_scales = 513"});
}

TEST(ReferenceNormal, DispatchWithoutTopk) {
  std::vector<NormalInput> in = two_rank_inputs();
  for (auto& r : in) r.topk_idx.clear(), r.topk_weights.clear();
  in[0].is_token_in_rank = {1, 1, 1, 0, 0, 1};
  in[1].is_token_in_rank = {1, 1, 0, 0};
  NormalOptions o;
  o.hidden = kHidden;  // num_topk = 0: no topk, routing from is_token_in_rank
  const auto out = normal_dispatch(in, o);
  expect_rows(out[0], {{0, 0}, {0, 1}, {1, 0}});
  expect_rows(out[1], {{0, 0}, {0, 2}, {1, 0}});
  for (const auto& r : out) {
    EXPECT_TRUE(r.recv_topk_idx.empty());
    EXPECT_TRUE(r.recv_topk_weights.empty());
    EXPECT_TRUE(r.num_recv_tokens_per_expert.empty());
  }
  // The same routing as the topk dispatch gives the same rows and handle.
  const auto with_topk = normal_dispatch(two_rank_inputs(), two_rank_options());
  for (int j = 0; j < 2; ++j) {
    EXPECT_EQ(out[j].recv_x, with_topk[j].recv_x);
    EXPECT_EQ(out[j].handle.rank_prefix_matrix, with_topk[j].handle.rank_prefix_matrix);
  }
}

TEST(ReferenceNormal, CachedDispatchReusesRouting) {
  const auto first = normal_dispatch(two_rank_inputs(), two_rank_options());
  std::vector<NormalInput> fresh(2);
  std::vector<NormalHandle> handles;
  for (int r = 0; r < 2; ++r) {
    fresh[r].num_tokens = first[r].handle.num_tokens;
    for (int i = 0; i < fresh[r].num_tokens * kHidden; ++i) {
      const uint16_t v = bf16(static_cast<float>(-i - 1000 * r));
      fresh[r].x.push_back(static_cast<uint8_t>(v & 0xff));
      fresh[r].x.push_back(static_cast<uint8_t>(v >> 8));
    }
    handles.push_back(first[r].handle);
  }
  const auto cached = normal_cached_dispatch(fresh, handles, two_rank_options());
  // Against a full dispatch of the new x with the original topk.
  auto full_in = two_rank_inputs();
  for (int r = 0; r < 2; ++r) full_in[r].x = fresh[r].x;
  const auto full = normal_dispatch(full_in, two_rank_options());
  for (int j = 0; j < 2; ++j) {
    EXPECT_EQ(cached[j].recv_x, full[j].recv_x);
    EXPECT_EQ(cached[j].num_rows, 3);
    EXPECT_TRUE(cached[j].recv_topk_idx.empty());
    EXPECT_TRUE(cached[j].recv_topk_weights.empty());
    EXPECT_TRUE(cached[j].num_recv_tokens_per_expert.empty());
    EXPECT_EQ(cached[j].handle.recv_src_idx, handles[j].recv_src_idx);
  }
}

TEST(ReferenceNormal, CombineHandComputedWithBiasAndWeights) {
  const auto disp = normal_dispatch(two_rank_inputs(), two_rank_options());
  std::vector<CombineInput> in(2);
  std::vector<NormalHandle> handles;
  for (int j = 0; j < 2; ++j) {
    in[j].x = as_bf16(disp[j].recv_x);  // identity experts
    in[j].topk_weights = disp[j].recv_topk_weights;
    handles.push_back(disp[j].handle);
  }
  in[1].bias0.assign(2 * kHidden, bf16(0.5f));
  in[1].bias1.assign(2 * kHidden, bf16(-2.0f));
  const auto out = normal_combine(in, handles, kHidden, 2);
  // Rank 0: t0 came back from both ranks, t1 and t2 from one.
  for (int t = 0; t < 3; ++t) {
    const int copies = t == 0 ? 2 : 1;
    const auto row = token_row(0, t);
    for (int c = 0; c < kHidden; ++c)
      EXPECT_EQ(out[0].combined_x[t * kHidden + c], bf16(copies * bf16_to_float(row[c]))) << t;
  }
  EXPECT_EQ(out[0].combined_topk_weights, two_rank_inputs()[0].topk_weights);
  // Rank 1: t0 from both ranks plus biases; t1 went nowhere: the biases alone.
  for (int c = 0; c < kHidden; ++c) {
    EXPECT_EQ(out[1].combined_x[c], bf16(2 * bf16_to_float(token_row(1, 0)[c]) + 0.5f - 2.0f));
    EXPECT_EQ(out[1].combined_x[kHidden + c], bf16(-1.5f));
  }
  EXPECT_EQ(out[1].combined_topk_weights, (std::vector<float>{8.0f, 16.0f, 0.0f, 0.0f}));
}

TEST(ReferenceNormal, CombineRoundsOnceAfterFloatSum) {
  // Three ranks return 1, 2^-8, 2^-8 for the same token: float32 gives 1 + 2^-7 (a BF16 value);
  // rounding to BF16 after each add would give 1 (each step is a tie to even). Bias likewise.
  const int R = 3;
  std::vector<NormalInput> in(R);
  for (int r = 0; r < R; ++r) {
    in[r].num_tokens = r == 0 ? 1 : 0;
    in[r].x = r == 0 ? as_bytes(std::vector<uint16_t>(kHidden, bf16(1.0f))) : std::vector<uint8_t>{};
    in[r].topk_idx = r == 0 ? V64{0, 1, 2} : V64{};
    in[r].topk_weights = std::vector<float>(in[r].topk_idx.size(), 1.0f);
  }
  NormalOptions o;
  o.hidden = kHidden;
  o.num_topk = 3;
  o.num_experts = 3;
  const auto disp = normal_dispatch(in, o);
  std::vector<CombineInput> cin(R);
  std::vector<NormalHandle> handles;
  for (int j = 0; j < R; ++j) {
    cin[j].x.assign(kHidden, bf16(j == 0 ? 1.0f : 0x1p-8f));
    handles.push_back(disp[j].handle);
  }
  auto out = normal_combine(cin, handles, kHidden, /*num_topk=*/0);  // no weights
  EXPECT_EQ(out[0].combined_x, std::vector<uint16_t>(kHidden, bf16(1.0f + 0x1p-7f)));
  EXPECT_TRUE(out[0].combined_topk_weights.empty());
  for (int j = 1; j < R; ++j) cin[j].x.assign(kHidden, bf16(0.0f));
  cin[0].bias0.assign(kHidden, bf16(0x1p-8f));
  cin[0].bias1.assign(kHidden, bf16(0x1p-8f));
  out = normal_combine(cin, handles, kHidden, 0);
  EXPECT_EQ(out[0].combined_x, std::vector<uint16_t>(kHidden, bf16(1.0f + 0x1p-7f)));
}

// Sum in float32 over receiving ranks in ascending order, then + bias0, then + bias1, rounded once.
// Cancellation makes the order visible: 1 + 2^-24 rounds to 1 in float32 (a tie, to even), while
// -1 + 2^-24 is exact.
TEST(ReferenceNormal, CombineOrderIsRanksAscendingThenBias0ThenBias1) {
  const float tiny = 0x1p-24f;
  // Channel 0: ranks return 1, 2^-24, -1. Ascending: (1 + 2^-24) - 1 = 0; descending: 2^-24.
  // Channel 1: ranks return 1, 0, 0; bias0 = 2^-24, bias1 = -1. In order: 0; biases first, or
  // bias1 before bias0: 2^-24.
  const float x[3][2] = {{1.0f, 1.0f}, {tiny, 0.0f}, {-1.0f, 0.0f}};
  const float bias0[2] = {0.0f, tiny}, bias1[2] = {0.0f, -1.0f};
  std::vector<NormalInput> in(3);
  in[0].num_tokens = 1;
  in[0].x = as_bytes(std::vector<uint16_t>(kHidden, bf16(1.0f)));
  in[0].topk_idx = {0, 1, 2};  // rank 0's token goes to ranks 0, 1, 2
  in[0].topk_weights = {1.0f, 1.0f, 1.0f};
  NormalOptions o;
  o.hidden = kHidden;
  o.num_topk = 3;
  o.num_experts = 3;
  const auto disp = normal_dispatch(in, o);
  std::vector<CombineInput> cin(3);
  std::vector<NormalHandle> handles;
  for (int j = 0; j < 3; ++j) {
    cin[j].x.assign(kHidden, bf16(0.0f));
    for (int c = 0; c < 2; ++c) cin[j].x[c] = bf16(x[j][c]);
    handles.push_back(disp[j].handle);
  }
  cin[0].bias0.assign(kHidden, bf16(0.0f));
  cin[0].bias1.assign(kHidden, bf16(0.0f));
  for (int c = 0; c < 2; ++c) cin[0].bias0[c] = bf16(bias0[c]), cin[0].bias1[c] = bf16(bias1[c]);
  const auto out = normal_combine(cin, handles, kHidden, 0)[0].combined_x;
  EXPECT_EQ(out[0], bf16(0.0f)) << "ranks must be summed in ascending order";
  EXPECT_EQ(out[1], bf16(0.0f)) << "bias0 then bias1 must be added after the ranks' sum";
  // The rounding the test relies on.
  ASSERT_EQ(bf16(((0.0f + x[2][0]) + x[1][0]) + x[0][0]), bf16(tiny));
  ASSERT_EQ(bf16(((bias0[1] + bias1[1]) + x[0][1])), bf16(tiny));
}

TEST(ReferenceNormal, CombineIgnoresPaddingRows) {
  const auto disp = normal_dispatch(two_rank_inputs(), two_rank_options(1, 6));
  const auto plain = normal_dispatch(two_rank_inputs(), two_rank_options());
  std::vector<CombineInput> padded(2), exact(2);
  std::vector<NormalHandle> handles;
  for (int j = 0; j < 2; ++j) {
    padded[j].x = as_bf16(disp[j].recv_x);
    std::fill(padded[j].x.begin() + 3 * kHidden, padded[j].x.end(), bf16(99.0f));  // garbage rows
    padded[j].topk_weights = disp[j].recv_topk_weights;
    exact[j].x = as_bf16(plain[j].recv_x);
    exact[j].topk_weights = plain[j].recv_topk_weights;
    handles.push_back(disp[j].handle);
  }
  const auto a = normal_combine(padded, handles, kHidden, 2);
  const auto b = normal_combine(exact, handles, kHidden, 2);
  for (int j = 0; j < 2; ++j) {
    EXPECT_EQ(a[j].combined_x, b[j].combined_x);
    EXPECT_EQ(a[j].combined_topk_weights, b[j].combined_topk_weights);
  }
}

}  // namespace
}  // namespace epcomm::ref
