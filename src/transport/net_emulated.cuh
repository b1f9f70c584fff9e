// The network hop between nodes, as the internode kernels see it (kernels/internode/*): the four
// operations of NCCL's GIN device API, and nothing else.
//
//   put(peer, dst_offset, src_offset, bytes)  one-sided write from this rank's window to the peer's
//   signal(peer, id, add)                      adds to signal `id` of the peer, visible only after
//                                              every put this block issued to that peer before it
//   wait_signal(id, least)                     spins (bounded) until this rank's own signal `id`
//                                              reaches `least` (acquire)
//   flush(wait)                                the sources of this block's puts may be reused (every
//                                              thread of the block calls it; bounded like a wait)
//
// Rules the kernels follow so that both transports behave the same (GIN's rules):
// - a put's source is this rank's own window (the kernels stage data there first);
// - a signal orders only the puts issued before it by the same block (the block synchronizes
//   before its leader signals); signals only ever add, and a receiver knows how much to expect, so
//   it keeps the running total it waits for in a local "shadow";
// - a rank never reads a peer of another node by pointer and never polls a peer's signal.
//
// EmulatedNet implements the operations with LSA stores (virtual nodes: EPCOMM_RANKS_PER_NODE splits
// one machine, so every rank is still load/store reachable): put is a copy by the calling warp,
// signal a release fence plus a system-scope atomic add into the peer's signal array, wait an
// acquire poll with the usual timeout. GinNet (net_gin.cuh) implements the same with ncclGin.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/common/vec.cuh"
#include "kernels/common/wait.cuh"
#include "transport/net_params.hpp"

namespace epcomm {
namespace dev {

struct EmulatedNet {
  const EmulatedNetParams& p;
  int rank;

  __device__ char* local() const { return p.window[rank]; }

  // Warp-cooperative: all 32 lanes call it with the same arguments. 16-byte aligned sizes/offsets.
  __device__ __forceinline__ void put_warp(int peer, size_t dst_offset, size_t src_offset, size_t bytes) const {
    // L2 loads: the source may hold what other blocks of this rank just wrote.
    warp_copy<4>(reinterpret_cast<int4*>(p.window[peer] + dst_offset),
                 reinterpret_cast<const int4*>(p.window[rank] + src_offset), static_cast<int>(bytes / 16), LoadCg{});
    if (lane_id() == 0 && p.stats && peer / p.ranks_per_node != rank / p.ranks_per_node) {
      atomicAdd(reinterpret_cast<unsigned long long*>(&p.stats[0]), 1ull);
      atomicAdd(reinterpret_cast<unsigned long long*>(&p.stats[1]), static_cast<unsigned long long>(bytes));
    }
  }

  // One thread, after the block's puts (the block synchronized; every putting thread fenced).
  __device__ __forceinline__ void signal(int peer, int id, uint64_t add) const {
    __threadfence_system();
    uint64_t* s = reinterpret_cast<uint64_t*>(p.window[peer] + p.signals) + id;
    asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(s), "l"(add) : "memory");
  }

  // Every thread that put calls it before the block synchronizes for a signal.
  __device__ __forceinline__ void fence_puts() const { __threadfence_system(); }

  __device__ __forceinline__ bool wait_signal(const WaitContext& ctx, int id, uint64_t least, WaitPhase phase,
                                              int peer) const {
    return wait_flag_geq(ctx, reinterpret_cast<const uint64_t*>(p.window[rank] + p.signals) + id, least, phase, peer);
  }

  // The current value of this rank's own signal `id` (acquire), for waits with their own policy
  // (the low-latency kernels' shrink mode).
  __device__ __forceinline__ uint64_t read_signal(int id) const {
    return ld_acquire_sys(reinterpret_cast<const uint64_t*>(p.window[rank] + p.signals) + id);
  }

  __device__ __forceinline__ bool flush(const WaitContext&) const { return true; }
};

}  // namespace dev
}  // namespace epcomm
