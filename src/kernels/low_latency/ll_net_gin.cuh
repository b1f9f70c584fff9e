// The low-latency kernels' GIN transport (see ll_net.cuh; Buffer launches it when its group spans
// real nodes): GinNet's operations with the ncclGin handle made at each call instead of held for
// the whole kernel, so the LL kernels (already at 128 registers) keep no GIN state live across
// their loops.
#pragma once

#include "kernels/low_latency/ll_net.cuh"
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
  __device__ __forceinline__ bool flush(const WaitContext& ctx) const { return make().flush(ctx); }
};

// The LL kernels' view of the network path over either transport (Params: the dispatch's or the
// combine's kernel parameters; both carry `common` and the LL `region`).
template <class Params>
__device__ __forceinline__ LLNet<EmulatedNet> make_ll_net(const Params& p, const LowLatencyNetArgs& a,
                                                          const EmulatedNetParams& np) {
  return LLNet<EmulatedNet>{EmulatedNet{np, p.common.rank}, a, lsa_peer(p.common, p.common.rank) + p.region,
                            p.common.rank};
}
template <class Params>
__device__ __forceinline__ LLNet<LLGinNet> make_ll_net(const Params& p, const LowLatencyNetArgs& a,
                                                       const GinNetParams& g) {
  return LLNet<LLGinNet>{LLGinNet{g, p.common.rank}, a, lsa_peer(p.common, p.common.rank) + p.region, p.common.rank};
}

}  // namespace epcomm::dev
