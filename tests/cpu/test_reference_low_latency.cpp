// Low-latency dispatch and combine (docs/contract.md §3.3): slot layout, FP8 quantization and UE8M0
// packing by hand, then random routing at R = 1, 2, 3, 4, 8 with identity experts.
#include <cmath>

#include "cpu/test_reference_util.hpp"
#include "epcomm/host_cluster.hpp"

namespace epcomm::ref {
namespace {

using namespace testing_util;
using V32 = std::vector<int32_t>;
using V64 = std::vector<int64_t>;

int64_t range(int64_t begin, int64_t count) { return (begin << 32) | count; }

LowLatencyOptions options(int R, int E, int K, int Tmax, int hidden, bool fp8) {
  (void)R;
  LowLatencyOptions o;
  o.hidden = hidden;
  o.num_topk = K;
  o.num_experts = E;
  o.num_max_dispatch_tokens_per_rank = Tmax;
  o.use_fp8 = fp8;
  return o;
}

// 2 ranks, 4 experts (rank 0: 0,1; rank 1: 2,3), Tmax 3, top-2, hidden 128.
//   rank 0: t0 -> {1, 2}, t1 -> {1, -1}
//   rank 1: t0 -> {0, 1}, t1 -> {-1, 2}, t2 -> {1, 0}
std::vector<LowLatencyDispatchInput> hand_inputs(std::mt19937& rng) {
  std::vector<LowLatencyDispatchInput> in(2);
  in[0].num_tokens = 2;
  in[0].topk_idx = {1, 2, 1, -1};
  in[1].num_tokens = 3;
  in[1].topk_idx = {0, 1, -1, 2, 1, 0};
  for (auto& r : in) r.x = random_small_bf16(rng, static_cast<size_t>(r.num_tokens) * 128);
  return in;
}

TEST(ReferenceLowLatency, DispatchSlotLayoutHandComputed) {
  EPCOMM_SEEDED_RNG(rng);
  const auto in = hand_inputs(rng);
  const auto out = low_latency_dispatch(in, options(2, 4, 2, 3, 128, /*fp8=*/false));
  const int slots = 6;
  // Rank 0, expert 0: rank 1's t0, t2. Expert 1: rank 0's t0, t1, then rank 1's t0, t2.
  EXPECT_EQ(out[0].recv_count, (V32{2, 4}));
  EXPECT_EQ(out[0].layout_range, (V64{range(0, 0), range(0, 2), range(0, 2), range(2, 2)}));
  EXPECT_EQ(out[0].src_info, (V32{0, 2, -1, -1, -1, -1, /**/ 0, 1, 0, 2, -1, -1}));
  // Rank 1, expert 2: rank 0's t0, rank 1's t1. Expert 3: nothing.
  EXPECT_EQ(out[1].recv_count, (V32{2, 0}));
  EXPECT_EQ(out[1].layout_range, (V64{range(0, 1), range(1, 1), range(0, 0), range(0, 0)}));
  EXPECT_EQ(out[1].src_info, (V32{0, 1, -1, -1, -1, -1, /**/ -1, -1, -1, -1, -1, -1}));
  // BF16 mode: rows copied, the rest zero, no scales.
  const auto x0 = as_bf16(out[0].recv_x);
  ASSERT_EQ(x0.size(), 2u * slots * 128);
  auto row = [](const std::vector<uint16_t>& x, int t) {
    return std::vector<uint16_t>(x.begin() + t * 128, x.begin() + (t + 1) * 128);
  };
  auto slot = [&](const std::vector<uint16_t>& x, int e, int s) { return row(x, e * slots + s); };
  EXPECT_EQ(slot(x0, 0, 1), row(in[1].x, 2));
  EXPECT_EQ(slot(x0, 1, 0), row(in[0].x, 0));
  EXPECT_EQ(slot(x0, 1, 3), row(in[1].x, 2));
  EXPECT_EQ(slot(x0, 0, 2), std::vector<uint16_t>(128, 0));
  EXPECT_TRUE(out[0].recv_scales.empty());
  EXPECT_TRUE(out[0].recv_scales_ue8m0.empty());
}

TEST(ReferenceLowLatency, Fp8QuantizationHandComputed) {
  // One token, hidden 256: group 0 has amax 4 (x in {-4..4}), group 1 is all zero (scale floor).
  std::vector<LowLatencyDispatchInput> in(1);
  in[0].num_tokens = 1;
  in[0].topk_idx = {0};
  in[0].x.assign(256, bf16(0.0f));
  for (int c = 0; c < 128; ++c) in[0].x[c] = bf16(static_cast<float>(c % 9 - 4));
  auto o = options(1, 1, 1, 2, 256, true);
  auto out = low_latency_dispatch(in, o);
  ASSERT_EQ(out[0].recv_scales.size(), 2u * 2);
  EXPECT_EQ(out[0].recv_scales[0], 4.0f / 448.0f);
  EXPECT_EQ(out[0].recv_scales[1], 1e-4f / 448.0f);
  EXPECT_EQ(out[0].recv_scales[2], 0.0f);  // slot 1 unused
  EXPECT_EQ(out[0].recv_x[8], 0x7e);       // x = 4 -> 448
  EXPECT_EQ(out[0].recv_x[0], 0xfe);       // x = -4 -> -448
  EXPECT_EQ(out[0].recv_x[5], 0x6e);       // x = 1 -> 112 = 1.75 * 2^6
  EXPECT_EQ(out[0].recv_x[4], 0x00);       // x = 0
  for (int c = 0; c < 128; ++c) {
    const float x = bf16_to_float(in[0].x[c]);
    EXPECT_EQ(out[0].recv_x[c], float_to_e4m3(x / (4.0f / 448.0f))) << c;
    // Dequantized values stay within half an e4m3 step of x.
    EXPECT_NEAR(e4m3_to_float(out[0].recv_x[c]) * out[0].recv_scales[0], x, std::fabs(x) / 16 + 1e-6);
  }
  // round_scale: 4/448 rounds up to 2^-6, so x = 1 -> 64 exactly.
  o.round_scale = true;
  out = low_latency_dispatch(in, o);
  EXPECT_EQ(out[0].recv_scales[0], 0x1p-6f);
  EXPECT_EQ(out[0].recv_x[5], float_to_e4m3(64.0f));
  EXPECT_EQ(e4m3_to_float(out[0].recv_x[5]), 64.0f);
}

TEST(ReferenceLowLatency, Ue8m0PackingHandComputed) {
  // hidden 640 = 5 groups -> 2 words per row; group g has amax 448 * 2^(g-3), so its scale is
  // exactly 2^(g-3) and its UE8M0 byte 124 + g.
  std::vector<LowLatencyDispatchInput> in(1);
  in[0].num_tokens = 1;
  in[0].topk_idx = {0};
  in[0].x.assign(640, bf16(0.0f));
  for (int g = 0; g < 5; ++g) in[0].x[g * 128 + 7] = bf16(-448.0f * std::exp2(static_cast<float>(g - 3)));
  auto o = options(1, 1, 1, 2, 640, true);
  o.round_scale = true;
  o.use_ue8m0 = true;
  const auto out = low_latency_dispatch(in, o);
  EXPECT_TRUE(out[0].recv_scales.empty());
  ASSERT_EQ(out[0].recv_scales_ue8m0.size(), 2u * 2);  // [1 expert, 2 slots, 2 words]
  EXPECT_EQ(static_cast<uint32_t>(out[0].recv_scales_ue8m0[0]), 0x7f7e7d7cu);
  EXPECT_EQ(out[0].recv_scales_ue8m0[1], 0x80);  // missing bytes are zero
  EXPECT_EQ(out[0].recv_scales_ue8m0[2], 0);     // unused slot
  EXPECT_EQ(out[0].recv_scales_ue8m0[3], 0);
  for (int g = 0; g < 5; ++g) EXPECT_EQ(out[0].recv_x[g * 128 + 7], 0xfe) << g;
}

TEST(ReferenceLowLatency, CombineHandComputedWithRepeatedExpert) {
  // One rank, 2 experts, Tmax 3; token 0 lists expert 1 twice, so expert 1 gets three rows:
  // (t0, k0), (t0, k2), (t1, k1). The n-th occurrence of an expert maps to its n-th slot.
  std::vector<LowLatencyDispatchInput> in(1);
  in[0].num_tokens = 2;
  in[0].topk_idx = {1, 0, 1, /**/ -1, 1, -1};
  in[0].x.assign(2 * 128, bf16(1.0f));
  const auto o = options(1, 2, 3, 3, 128, false);
  const auto disp = low_latency_dispatch(in, o);
  EXPECT_EQ(disp[0].recv_count, (V32{1, 3}));
  EXPECT_EQ(disp[0].src_info, (V32{0, -1, -1, /**/ 0, 0, 1}));
  std::vector<LowLatencyCombineInput> cin(1);
  cin[0].num_tokens = 2;
  cin[0].topk_idx = in[0].topk_idx;
  cin[0].topk_weights = {1.0f, 2.0f, 4.0f, /**/ 1000.0f, 0.5f, 1000.0f};  // weights of -1 unused
  cin[0].y.assign(2 * 3 * 128, 0);
  for (int e = 0; e < 2; ++e)  // expert 0 slot 0 = 1; expert 1 slots = 5, 6, 7
    for (int s = 0; s < 3; ++s)
      std::fill_n(cin[0].y.begin() + (e * 3 + s) * 128, 128, bf16(static_cast<float>(1 + s + 4 * e)));
  const auto out = low_latency_combine(cin, disp, o);
  // token 0: 1 * 5 + 2 * 1 + 4 * 6 = 31 (swapped occurrences would give 28); token 1: 0.5 * 7.
  std::vector<uint16_t> want(128, bf16(31.0f));
  want.resize(256, bf16(3.5f));
  EXPECT_EQ(out[0], want);
}

float separate_multiply_add(float acc, float w, float y) {
  volatile float product = w * y;
  return acc + product;
}

TEST(ReferenceLowLatency, CombineMultipliesThenAddsWithoutFma) {
  // Find weights and expert outputs where a fused multiply-add would round to a different BF16
  // than a rounded multiply followed by a rounded add, then check the reference does the latter.
  EPCOMM_SEEDED_RNG(rng);
  std::uniform_real_distribution<float> weight(0.1f, 2.0f);
  float w0 = 0, w1 = 0, y0 = 0, y1 = 0;
  bool found = false;
  for (int trial = 0; trial < 10000000 && !found; ++trial) {
    w0 = weight(rng), w1 = weight(rng);
    y0 = bf16_to_float(bf16(weight(rng) * 8.0f)), y1 = bf16_to_float(bf16(-weight(rng) * 8.0f));
    const float acc = w0 * y0;
    found = bf16(separate_multiply_add(acc, w1, y1)) != bf16(std::fma(w1, y1, acc));
  }
  ASSERT_TRUE(found) << "no FMA-sensitive case found";
  std::vector<LowLatencyDispatchInput> in(1);
  in[0].num_tokens = 1;
  in[0].topk_idx = {0, 1};
  in[0].x.assign(128, bf16(1.0f));
  const auto o = options(1, 2, 2, 1, 128, false);
  const auto disp = low_latency_dispatch(in, o);
  std::vector<LowLatencyCombineInput> cin(1);
  cin[0].num_tokens = 1;
  cin[0].topk_idx = {0, 1};
  cin[0].topk_weights = {w0, w1};
  cin[0].y.assign(2 * 128, bf16(y1));
  std::fill_n(cin[0].y.begin(), 128, bf16(y0));
  const auto out = low_latency_combine(cin, disp, o);
  const uint16_t want = bf16(separate_multiply_add(separate_multiply_add(0.0f, w0, y0), w1, y1));
  EXPECT_EQ(out[0], std::vector<uint16_t>(128, want));
}

}  // namespace
}  // namespace epcomm::ref
