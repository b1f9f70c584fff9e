// Warp-wide 16-byte copies and the float32 arithmetic on eight BF16 values (one 16-byte vector)
// that the normal, internode and low-latency kernels share.
#pragma once

#include <cuda_bf16.h>

#include "kernels/common/ptx.cuh"

namespace epcomm::dev {

// Loads for the copies: from shared memory, from global memory written by another GPU (L2 only:
// the L1 may hold a previous call's line), and read-only global input.
struct LoadShared {
  __device__ __forceinline__ int4 operator()(const int4* p) const { return *p; }
};
struct LoadCg {
  __device__ __forceinline__ int4 operator()(const int4* p) const { return __ldcg(p); }
};
struct LoadNc {
  __device__ __forceinline__ int4 operator()(const int4* p) const { return __ldg(p); }
};

// A warp copies n 16-byte vectors, U loads in flight per lane before the stores.
template <int U, typename Load>
__device__ __forceinline__ void warp_copy(int4* __restrict__ dst, const int4* __restrict__ src, int n, Load load) {
  const int lane = lane_id();
  int i = lane;
  for (; i + (U - 1) * 32 < n; i += U * 32) {
    int4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) v[u] = load(src + i + u * 32);
#pragma unroll
    for (int u = 0; u < U; ++u) dst[i + u * 32] = v[u];
  }
  for (; i < n; i += 32) dst[i] = load(src + i);
}

// acc[i] += the i-th BF16 of v, in float32 (round to nearest).
__device__ __forceinline__ void add_bf16x8(float (&acc)[8], int4 v) {
  const auto* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    acc[2 * i] = __fadd_rn(acc[2 * i], f.x);
    acc[2 * i + 1] = __fadd_rn(acc[2 * i + 1], f.y);
  }
}

// The eight sums rounded once to BF16.
__device__ __forceinline__ int4 to_bf16x8(const float (&acc)[8]) {
  int4 out;
  auto* h = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
  return out;
}

}  // namespace epcomm::dev
