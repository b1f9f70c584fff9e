// BF16 and FP8 e4m3 conversions, bit-for-bit what CUDA produces (cvt.rn.bf16.f32 and
// cvt.rn.satfinite.e4m3x2.f32; tests compare with cuda_bf16.h / cuda_fp8.h host code), and the
// per-group FP8 scale of docs/contract.md §3.3. Integer arithmetic only where rounding matters, so the
// result never depends on the host's floating-point flags or the compiler's contraction choices.
#include <cmath>
#include <cstring>

#include "epcomm/reference.hpp"

namespace epcomm::ref {
namespace {

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

constexpr uint32_t kAbsMask = 0x7fffffffu;
constexpr uint32_t kInfBits = 0x7f800000u;
constexpr uint32_t kMantissaMask = 0x007fffffu;

}  // namespace

float bf16_to_float(uint16_t v) { return float_of(uint32_t{v} << 16); }

uint16_t float_to_bf16(float f) {
  const uint32_t u = bits_of(f);
  if ((u & kAbsMask) > kInfBits) return 0x7fff;  // CUDA's canonical NaN
  // Round to nearest even on the 16 dropped bits; a carry into the exponent is the right answer
  // (up to infinity for values past the largest finite bf16).
  const uint32_t lsb = (u >> 16) & 1u;
  return static_cast<uint16_t>((u + 0x7fffu + lsb) >> 16);
}

float e4m3_to_float(uint8_t v) {
  const bool negative = (v & 0x80) != 0;
  const int exponent = (v >> 3) & 0xf;
  const int mantissa = v & 0x7;
  float magnitude;
  if (exponent == 0xf && mantissa == 0x7) {
    magnitude = std::nanf("");
  } else if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -9);  // subnormal: m * 2^-9
  } else {
    magnitude = std::ldexp(static_cast<float>(8 + mantissa), exponent - 10);  // 1.m * 2^(e-7)
  }
  return negative ? -magnitude : magnitude;
}

uint8_t float_to_e4m3(float f) {
  const uint32_t u = bits_of(f);
  const uint32_t a = u & kAbsMask;
  if (a > kInfBits) return 0x7f;  // NaN, sign dropped as CUDA does
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  const float magnitude = float_of(a);
  // Everything from 448 up (infinity included) lands on 448: [448, 464) rounds there anyway and
  // SATFINITE clamps the rest.
  if (magnitude >= 448.0f) return sign | 0x7e;
  if (magnitude < 0x1p-6f) {
    // Subnormal target: multiples of 2^-9. Scaling by 2^9 is exact, so one rounding to an integer
    // (0..8, where 8 is the smallest normal's code) is the whole conversion.
    const float steps = magnitude * 512.0f;
    uint32_t q = static_cast<uint32_t>(steps);         // truncation
    const float rest = steps - static_cast<float>(q);  // exact: steps < 2^4
    if (rest > 0.5f || (rest == 0.5f && (q & 1u))) ++q;
    return sign | static_cast<uint8_t>(q);
  }
  // Normal target: keep 3 of 23 mantissa bits, rounding to nearest even; a mantissa carry moves
  // into the exponent field, which is the correct result. Then rebias the exponent 127 -> 7.
  const uint32_t rounded = (a + 0x7ffffu + ((a >> 20) & 1u)) >> 20;
  return sign | static_cast<uint8_t>(rounded - ((127u - 7u) << 3));
}

float fp8_group_scale(float amax, bool round_scale) {
  // fmax: a NaN amax (from a NaN input) falls back to the floor, as fmaxf does on the GPU.
  const float scale = std::fmax(amax, 1e-4f) / 448.0f;
  if (!round_scale) return scale;
  uint32_t u = bits_of(scale);
  if (u & kMantissaMask) u = (u & ~kMantissaMask) + (1u << 23);
  return float_of(u);
}

uint8_t ue8m0_of(float power_of_two_scale) { return static_cast<uint8_t>((bits_of(power_of_two_scale) >> 23) & 0xffu); }

}  // namespace epcomm::ref
