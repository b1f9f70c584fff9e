// Number formats of the reference backend against CUDA's own host conversions (cuda_bf16.h,
// cuda_fp8.h), which mirror the GPU instructions, so the oracle rounds exactly as the kernels do.
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cmath>
#include <limits>

#include "cpu/test_reference_util.hpp"

namespace epcomm::ref {
namespace {

using testing_util::bits;
using testing_util::from_bits;

uint16_t cuda_bf16(float f) {
  __nv_bfloat16_raw raw = __float2bfloat16_rn(f);
  return raw.x;
}
uint8_t cuda_e4m3(float f) { return __nv_cvt_float_to_fp8(f, __NV_SATFINITE, __NV_E4M3); }

// Floats that exercise rounding: every BF16 value (which includes every e4m3 value and every
// midpoint between neighbouring e4m3 values) with low bits that sit exactly on, just below and just
// above BF16 ties, plus boundaries.
std::vector<float> rounding_probes() {
  std::vector<float> v;
  for (uint32_t hi = 0; hi < 0x10000; ++hi)
    for (uint32_t lo : {0x0000u, 0x0001u, 0x7fffu, 0x8000u, 0x8001u, 0xffffu}) v.push_back(from_bits((hi << 16) | lo));
  for (float f :
       {0.0f, -0.0f, 448.0f, 464.0f, std::nextafter(464.0f, 0.0f), 480.0f, 1e30f, std::numeric_limits<float>::max(),
        std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
        std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::denorm_min(), 0x1p-10f,
        std::nextafter(0x1p-10f, 1.0f), 0x1p-9f * 1.5f, 0x1p-6f, std::nextafter(0x1p-6f, 0.0f)})
    v.push_back(f), v.push_back(-f);
  return v;
}

TEST(ReferenceFormats, Bf16MatchesCudaOnRoundingProbes) {
  for (float f : rounding_probes()) ASSERT_EQ(float_to_bf16(f), cuda_bf16(f)) << std::hexfloat << f;
}

TEST(ReferenceFormats, Bf16MatchesCudaOnRandomFloats) {
  EPCOMM_SEEDED_RNG(rng);
  for (int i = 0; i < 1 << 20; ++i) {
    const float f = from_bits(static_cast<uint32_t>(rng()));
    ASSERT_EQ(float_to_bf16(f), cuda_bf16(f)) << std::hex << bits(f);
  }
}

TEST(ReferenceFormats, Bf16ToFloatIsExactAndRoundTrips) {
  for (uint32_t v = 0; v < 0x10000; ++v) {
    const uint16_t b = static_cast<uint16_t>(v);
    const float f = bf16_to_float(b);
    __nv_bfloat16_raw raw;
    raw.x = b;
    const float cuda = __bfloat162float(__nv_bfloat16(raw));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(cuda));
      EXPECT_EQ(float_to_bf16(f), 0x7fff);  // CUDA's canonical NaN
      continue;
    }
    ASSERT_EQ(bits(f), bits(cuda)) << v;
    ASSERT_EQ(float_to_bf16(f), b) << v;
  }
  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(float_to_bf16(from_bits(0x3f808000)), 0x3f80);              // tie, even stays
  EXPECT_EQ(float_to_bf16(from_bits(0x3f818000)), 0x3f82);              // tie, odd rounds up
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::max()), 0x7f80);  // rounds to infinity
}

TEST(ReferenceFormats, E4m3MatchesCudaOnRoundingProbes) {
  for (float f : rounding_probes()) ASSERT_EQ(float_to_e4m3(f), cuda_e4m3(f)) << std::hexfloat << f;
}

TEST(ReferenceFormats, E4m3MatchesCudaOnRandomFloats) {
  EPCOMM_SEEDED_RNG(rng);
  // Any bit pattern, then values concentrated in the e4m3 range where rounding happens.
  for (int i = 0; i < 1 << 20; ++i) {
    const float f = from_bits(static_cast<uint32_t>(rng()));
    ASSERT_EQ(float_to_e4m3(f), cuda_e4m3(f)) << std::hex << bits(f);
  }
  std::uniform_real_distribution<float> exponent(-12.0f, 10.0f);
  for (int i = 0; i < 1 << 20; ++i) {
    const float f = std::exp2(exponent(rng)) * (rng() & 1 ? 1.0f : -1.0f);
    ASSERT_EQ(float_to_e4m3(f), cuda_e4m3(f)) << std::hexfloat << f;
  }
  // A strided sweep over all floats.
  for (uint64_t u = rng() % 257; u < (uint64_t{1} << 32); u += 257) {
    const float f = from_bits(static_cast<uint32_t>(u));
    ASSERT_EQ(float_to_e4m3(f), cuda_e4m3(f)) << std::hex << u;
  }
}

TEST(ReferenceFormats, E4m3HandValues) {
  EXPECT_EQ(float_to_e4m3(1.0f), 0x38);
  EXPECT_EQ(float_to_e4m3(-1.0f), 0xb8);
  EXPECT_EQ(float_to_e4m3(448.0f), 0x7e);
  EXPECT_EQ(float_to_e4m3(1000.0f), 0x7e);  // saturates
  EXPECT_EQ(float_to_e4m3(-1e9f), 0xfe);
  EXPECT_EQ(float_to_e4m3(std::numeric_limits<float>::infinity()), 0x7e);
  EXPECT_EQ(float_to_e4m3(std::nanf("")), 0x7f);
  EXPECT_EQ(float_to_e4m3(-std::nanf("")), 0x7f);
  EXPECT_EQ(float_to_e4m3(112.0f), 0x6e);          // 1.75 * 2^6
  EXPECT_EQ(float_to_e4m3(336.0f), 0x7a);          // tie between 320 and 352 -> even mantissa (320)
  EXPECT_EQ(float_to_e4m3(0x1p-9f), 0x01);         // smallest subnormal
  EXPECT_EQ(float_to_e4m3(0x1p-10f), 0x00);        // half of it: tie to even (zero)
  EXPECT_EQ(float_to_e4m3(0x1p-9f * 1.5f), 0x02);  // tie to even (2)
  EXPECT_EQ(float_to_e4m3(0x1p-6f), 0x08);         // smallest normal
}

TEST(ReferenceFormats, E4m3ToFloatMatchesCudaAndRoundTrips) {
  for (int v = 0; v < 256; ++v) {
    __nv_fp8_e4m3 fp8;
    fp8.__x = static_cast<__nv_fp8_storage_t>(v);
    const float cuda = static_cast<float>(fp8);
    const float f = e4m3_to_float(static_cast<uint8_t>(v));
    if ((v & 0x7f) == 0x7f) {
      EXPECT_TRUE(std::isnan(f)) << v;
      EXPECT_TRUE(std::isnan(cuda)) << v;
      continue;
    }
    ASSERT_EQ(bits(f), bits(cuda)) << v;
    ASSERT_EQ(float_to_e4m3(f), v) << v;
  }
  EXPECT_EQ(e4m3_to_float(0x7e), 448.0f);
  EXPECT_EQ(e4m3_to_float(0x01), 0x1p-9f);
}

TEST(ReferenceFormats, GroupScale) {
  EXPECT_EQ(fp8_group_scale(448.0f, false), 1.0f);
  EXPECT_EQ(fp8_group_scale(0.0f, false), 1e-4f / 448.0f);  // floor on amax
  EXPECT_EQ(fp8_group_scale(std::nanf(""), false), 1e-4f / 448.0f);
  EXPECT_EQ(fp8_group_scale(4.0f, false), 4.0f / 448.0f);
  EXPECT_EQ(fp8_group_scale(448.0f, true), 1.0f);  // already a power of two
  EXPECT_EQ(fp8_group_scale(449.0f, true), 2.0f);
  EXPECT_EQ(fp8_group_scale(4.0f, true), 0x1p-6f);   // 0.0089 -> 2^-6
  EXPECT_EQ(fp8_group_scale(0.0f, true), 0x1p-22f);  // 2.2e-7 -> 2^-22
  EXPECT_EQ(ue8m0_of(1.0f), 127);
  EXPECT_EQ(ue8m0_of(2.0f), 128);
  EXPECT_EQ(ue8m0_of(0x1p-6f), 121);
  EXPECT_EQ(ue8m0_of(0x1p-22f), 105);
}

TEST(ReferenceFormats, RoundedScaleIsTheNextPowerOfTwo) {
  EPCOMM_SEEDED_RNG(rng);
  std::uniform_real_distribution<float> exponent(-20.0f, 20.0f);
  for (int i = 0; i < 100000; ++i) {
    const float amax = std::exp2(exponent(rng));
    const float exact = fp8_group_scale(amax, false);
    const float rounded = fp8_group_scale(amax, true);
    ASSERT_EQ(bits(rounded) & 0x7fffff, 0u) << amax;  // a power of two
    ASSERT_GE(rounded, exact) << amax;
    ASSERT_LT(rounded, 2.0f * exact) << amax;
    ASSERT_EQ(std::exp2(static_cast<float>(ue8m0_of(rounded)) - 127.0f), rounded) << amax;
  }
}

}  // namespace
}  // namespace epcomm::ref
