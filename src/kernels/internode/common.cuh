// Device helpers shared by the internode kernels: addressing inside the internode region, node
// flags (LSA, between ranks of one node), the last-block pattern that ends a grid phase, and the
// float32 row arithmetic of combine.
#pragma once

#include <cuda_bf16.h>

#include "kernels/common/bulk_copy.cuh"
#include "kernels/common/vec.cuh"
#include "kernels/common/wait.cuh"
#include "kernels/internode/params.hpp"
#include "transport/net_emulated.cuh"

namespace epcomm::dev {

constexpr int kInterThreads = 512;  // threads per block of the dispatch and combine kernels
constexpr int kInterWarps = kInterThreads / 32;

template <typename T = char>
__device__ __forceinline__ T* at(char* base, size_t offset) {
  return reinterpret_cast<T*>(base + offset);
}
template <typename T = char>
__device__ __forceinline__ const T* at(const char* base, size_t offset) {
  return reinterpret_cast<const T*>(base + offset);
}

struct Who {
  int rank, node, local, R, P, N;
};
__device__ __forceinline__ Who who(const InterCommon& ic) {
  const int rank = ic.common.rank, P = ic.layout.ranks_per_node;
  return Who{rank, rank / P, rank % P, ic.layout.num_ranks, P, ic.layout.num_nodes};
}

// Every block calls it (all threads) after its part of a grid phase; returns true in one block, the
// last to arrive, which then sees every other block's writes. The counter is left at zero.
__device__ __forceinline__ bool grid_phase_last(uint32_t* counter) {
  __shared__ int last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned done = atomicAdd(counter, 1u);
    last = done == gridDim.x - 1;
    if (last) {
      *counter = 0;
      __threadfence();
    }
  }
  __syncthreads();
  return last != 0;
}

// A token's destination ranks (bit r: rank r gets it), or the sources a warp has seen: R <= 128.
using RankMask = unsigned __int128;
static_assert(kMaxInterRanks <= 128, "RankMask holds a bit per rank");

// The full destination mask of token t. All lanes call it.
__device__ __forceinline__ RankMask token_ranks(const uint8_t* is_token_in_rank, int64_t t, int R, bool valid) {
  RankMask full = 0;
  for (int base = 0; base < R; base += 32) {
    const int r = base + lane_id();
    const bool bit = valid && r < R && is_token_in_rank[t * R + r] != 0;
    full |= static_cast<RankMask>(__ballot_sync(0xffffffffu, bit)) << base;
  }
  return full;
}
__device__ __forceinline__ uint32_t node_bits(RankMask full, int node, int P) {
  return static_cast<uint32_t>(full >> (node * P)) & (P >= 32 ? 0xffffffffu : ((1u << P) - 1));
}

__device__ __forceinline__ void add_f32x8(float (&acc)[8], const float4* p) {
  const float4 a = __ldcg(p), b = __ldcg(p + 1);
  acc[0] = __fadd_rn(acc[0], a.x);
  acc[1] = __fadd_rn(acc[1], a.y);
  acc[2] = __fadd_rn(acc[2], a.z);
  acc[3] = __fadd_rn(acc[3], a.w);
  acc[4] = __fadd_rn(acc[4], b.x);
  acc[5] = __fadd_rn(acc[5], b.y);
  acc[6] = __fadd_rn(acc[6], b.z);
  acc[7] = __fadd_rn(acc[7], b.w);
}

// Copies `bytes` (multiple of 16) with the whole warp, loads cached in L2 only (the data may come
// from another GPU after an acquire).
__device__ __forceinline__ void warp_copy(void* dst, const void* src, size_t bytes) {
  warp_copy<4>(static_cast<int4*>(dst), static_cast<const int4*>(src), static_cast<int>(bytes / 16), LoadCg{});
}

__device__ __forceinline__ void add_stat(const InterCommon& ic, int which, uint64_t v) {
  if (v)
    atomicAdd(reinterpret_cast<unsigned long long*>(at<uint64_t>(ic.net.window[ic.common.rank], ic.layout.stats) +
                                                    which),
              static_cast<unsigned long long>(v));
}

}  // namespace epcomm::dev
