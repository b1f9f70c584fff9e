// The network hop over NCCL GIN (GPU-initiated networking, NCCL >= 2.28 device API): the same four
// operations as EmulatedNet (net_emulated.cuh, which documents the rules), for ranks of real nodes.
// Buffer launches the kernels instantiated with it (kernels/internode/gin_kernels.cu and the LL
// network path, kernels/low_latency/ll_net_gin.cuh) when its group's ranks are not all load/store
// reachable; GinContext (gin_context.hpp) creates the device communicator and its signals.
//
// Every operation uses one GIN context (kGinContext, gin_params.hpp says why). A signal is an add
// into the peer's signal `signal_base + id`; NCCL orders it after this context's earlier puts to
// that peer, which covers the rule "after every put this block issued to that peer before it".
// Waits read this rank's own signal through the same context, bounded like every wait
// (kernels/common/wait.cuh). Status: compiled; not yet run on a GPU with a GIN network.
#pragma once

#include <nccl.h>
#include <nccl_device.h>
#include <nccl_device/gin/proxy/gin_proxy_device_host_common.h>

#include <cstddef>
#include <cstdint>

#include "kernels/common/wait.cuh"
#include "transport/gin_params.hpp"

namespace epcomm {
namespace dev {

struct GinNet {
  const GinNetParams& p;
  int rank;
  ncclGin gin;
  ncclTeam world;

  __device__ GinNet(const GinNetParams& params, int r)
      : p(params), rank(r), gin(params.comm, kGinContext), world(ncclTeamWorld(params.comm)) {}

  __device__ char* local() const { return p.local; }

  // Warp-cooperative: all 32 lanes call it with the same arguments.
  __device__ __forceinline__ void put_warp(int peer, size_t dst_offset, size_t src_offset, size_t bytes) const {
    gin.put(world, peer, p.window, p.region + dst_offset, p.window, p.region + src_offset, bytes, ncclGin_None{},
            ncclGin_None{}, ncclCoopWarp{});
    if (lane_id() == 0 && p.stats && peer / p.ranks_per_node != rank / p.ranks_per_node) {
      atomicAdd(reinterpret_cast<unsigned long long*>(&p.stats[0]), 1ull);
      atomicAdd(reinterpret_cast<unsigned long long*>(&p.stats[1]), static_cast<unsigned long long>(bytes));
    }
  }

  // One thread.
  __device__ __forceinline__ void signal(int peer, int id, uint64_t add) const {
    gin.signal(world, peer, ncclGin_SignalAdd{p.signal_base + static_cast<uint32_t>(id), add});
  }

  __device__ __forceinline__ void fence_puts() const {}

  __device__ __forceinline__ bool wait_signal(const WaitContext& ctx, int id, uint64_t least, WaitPhase phase,
                                              int peer) const {
    const ncclGinSignal_t s = p.signal_base + static_cast<uint32_t>(id);
    return wait_geq(
        ctx, [&] { return gin.readSignal(s); }, least, phase, peer);
  }

  __device__ __forceinline__ uint64_t read_signal(int id) const {
    return gin.readSignal(p.signal_base + static_cast<uint32_t>(id));
  }

  // Every thread of the block calls it. The sources of this block's puts may be reused after it.
  // NCCL's proxy flush spins until the proxy consumed every posted put, with no bound
  // (nccl_device/gin/proxy/gin_proxy.h): for the proxy backend this is the same wait on the same
  // producer/consumer indices, bounded, so a transport that stops consuming ends in a TimeoutError
  // naming the peer. Other backends (GDAKI) use NCCL's flush.
  __device__ __forceinline__ bool flush(const WaitContext& ctx) const {
    if (p.comm.ginTypes[kGinContext] != static_cast<uint8_t>(NCCL_NET_DEVICE_GIN_PROXY)) {
      gin.flush(ncclCoopCta{});
      return true;
    }
    const auto* q = static_cast<const ncclGinProxyGpuCtx_t*>(p.comm.ginHandles[kGinContext]);
    __syncthreads();  // every thread's puts are posted before the indices are read
    bool ok = true;
    for (int pe = static_cast<int>(threadIdx.x); ok && pe < p.comm.nRanks; pe += static_cast<int>(blockDim.x)) {
      const uint32_t posted = ld_volatile(q->pis + pe);
      const uint32_t* consumed = q->cis + pe;
      // Rolling comparison (the indices wrap): done once the consumer index reached `posted`.
      ok = wait_geq(
          ctx, [&] { return static_cast<int32_t>(ld_acquire_sys(consumed) - posted) >= 0 ? 1ull : 0ull; }, 1,
          WaitPhase::kNetworkFlush, pe);
    }
    __syncthreads();
    return ok;
  }
};

}  // namespace dev
}  // namespace epcomm
