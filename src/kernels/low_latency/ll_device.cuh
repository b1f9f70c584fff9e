// Device building blocks of the low-latency kernels: the FP8 cast of one token and addressing
// (bounded waits: shrink.cuh; copies: common/vec.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include "kernels/common/sequence.cuh"
#include "kernels/common/vec.cuh"
#include "kernels/common/wait.cuh"
#include "kernels/low_latency/params.hpp"

namespace epcomm::dev {

constexpr int kLowLatencyWarps = kLowLatencyThreads / 32;

// The low half of a tag: what the sender put there (count + 1, or header + 1).
__device__ __forceinline__ uint32_t tag_payload(uint64_t v) { return static_cast<uint32_t>(v) - 1u; }

__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits16) { return __uint_as_float(bits16 << 16); }

// docs/contract.md §3.3 scale of one group, bit for bit ref::fp8_group_scale: IEEE division, and rounding
// up to a power of two by exponent arithmetic.
__device__ __forceinline__ float fp8_group_scale(float amax, bool round_scale) {
  float scale = __fdiv_rn(fmaxf(amax, 1e-4f), 448.0f);
  if (round_scale) {
    uint32_t u = __float_as_uint(scale);
    if (u & 0x007fffffu) u = (u & ~0x007fffffu) + (1u << 23);
    scale = __uint_as_float(u);
  }
  return scale;
}

// Casts row `x` ([hidden] bf16) into `msg`: hidden e4m3 bytes, then hidden/128 f32 scales. All
// threads of the block take part; a thread handles 16 channels, so 8 consecutive threads hold one
// 128-channel group and agree on its amax by shuffles.
__device__ __forceinline__ void stage_fp8(const uint16_t* __restrict__ x, int hidden, bool round_scale, uint8_t* msg) {
  float* scales = reinterpret_cast<float*>(msg + hidden);
  const int step = static_cast<int>(blockDim.x) * 16;
  for (int base = 0; base < hidden; base += step) {
    const int c = base + static_cast<int>(threadIdx.x) * 16;
    const bool active = c < hidden;
    int4 a = make_int4(0, 0, 0, 0), b = make_int4(0, 0, 0, 0);
    if (active) {
      a = __ldg(reinterpret_cast<const int4*>(x + c));
      b = __ldg(reinterpret_cast<const int4*>(x + c + 8));
    }
    const uint32_t w[8] = {static_cast<uint32_t>(a.x), static_cast<uint32_t>(a.y), static_cast<uint32_t>(a.z),
                           static_cast<uint32_t>(a.w), static_cast<uint32_t>(b.x), static_cast<uint32_t>(b.y),
                           static_cast<uint32_t>(b.z), static_cast<uint32_t>(b.w)};
    float f[16];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      f[2 * i] = bf16_bits_to_float(w[i] & 0xffffu);
      f[2 * i + 1] = bf16_bits_to_float(w[i] >> 16);
    }
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 16; ++i) amax = fmaxf(amax, fabsf(f[i]));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 4));
    const float scale = fp8_group_scale(amax, round_scale);
    if (active) {
      uint32_t q[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t lo =
            __nv_cvt_float2_to_fp8x2(make_float2(__fdiv_rn(f[4 * i], scale), __fdiv_rn(f[4 * i + 1], scale)),
                                     __NV_SATFINITE, __NV_E4M3);
        const uint32_t hi =
            __nv_cvt_float2_to_fp8x2(make_float2(__fdiv_rn(f[4 * i + 2], scale), __fdiv_rn(f[4 * i + 3], scale)),
                                     __NV_SATFINITE, __NV_E4M3);
        q[i] = lo | (hi << 16);
      }
      *reinterpret_cast<int4*>(msg + c) =
          make_int4(static_cast<int>(q[0]), static_cast<int>(q[1]), static_cast<int>(q[2]), static_cast<int>(q[3]));
      if ((threadIdx.x & 7) == 0) scales[c / kLowLatencyScaleGroup] = scale;
    }
  }
}

// Copies row `x` ([hidden] bf16) into `msg` as is.
__device__ __forceinline__ void stage_bf16(const uint16_t* __restrict__ x, int hidden, uint8_t* msg) {
  const int n = hidden / 8;
  const int4* src = reinterpret_cast<const int4*>(x);
  int4* dst = reinterpret_cast<int4*>(msg);
  for (int i = static_cast<int>(threadIdx.x); i < n; i += static_cast<int>(blockDim.x)) dst[i] = __ldg(src + i);
}

}  // namespace epcomm::dev
