// The low-latency kernels' GIN transport (compiled, not launched; see ll_net.cuh): GinNet's
// operations with the ncclGin handle made at each call instead of held for the whole kernel, so
// the LL kernels (already at 128 registers) keep no GIN state live across their loops.
#pragma once

#include "transport/net_gin.cuh"

namespace epcomm::dev {

struct LLGinNet {
  const GinNetParams& p;
  int rank;

  __device__ __forceinline__ GinNet make() const { return GinNet(p, rank); }
  __device__ __forceinline__ void put_warp(int peer, size_t dst_offset, size_t src_offset, size_t bytes) const {
    make().put_warp(peer, dst_offset, src_offset, bytes);
  }
  __device__ __forceinline__ void signal(int peer, int id, uint64_t add) const { make().signal(peer, id, add); }
  __device__ __forceinline__ void fence_puts() const {}
  __device__ __forceinline__ uint64_t read_signal(int id) const { return make().read_signal(id); }
  __device__ __forceinline__ void flush() const { make().flush(); }
};

}  // namespace epcomm::dev
