// The network hop over NCCL GIN (GPU-initiated networking, NCCL >= 2.28 device API): the same four
// operations as EmulatedNet (net_emulated.cuh, which documents the rules), for ranks of real nodes.
//
// Status: compiled in every build where nccl_device/gin.h exists (kernels/internode/gin_kernels.cu
// instantiates every internode kernel with it), never run here: the development and test machines
// have one node and no RDMA NIC. Buffer does not create the ncclDevComm GIN needs yet (it raises a
// clear error when a peer is not load/store reachable); see README "Across nodes".
#pragma once

#include <nccl.h>
#include <nccl_device.h>

#include <cstddef>
#include <cstdint>

#include "kernels/common/wait.cuh"

namespace epcomm {

struct GinNetParams {
  ncclDevComm comm{};            // from ncclDevCommCreate with ginSignalCount >= kNumSignals * R
  ncclWindow_t window = nullptr; // the Buffer's symmetric window (ncclCommWindowRegister)
  size_t region = 0;             // offset of the internode region inside the window
  uint32_t signal_base = 0;      // first GIN signal id epcomm owns
  char* local = nullptr;         // this rank's internode region (local pointer)
  uint64_t* stats = nullptr;     // local: [0] puts, [1] bytes put
};

namespace dev {

struct GinNet {
  const GinNetParams& p;
  int rank;
  ncclGin gin;
  ncclTeam world;

  __device__ GinNet(const GinNetParams& params, int r)
      : p(params), rank(r), gin(params.comm, static_cast<int>(blockIdx.x) % (params.comm.ginContextCount > 0 ? params.comm.ginContextCount : 1)),
        world(ncclTeamWorld(params.comm)) {}

  __device__ char* local() const { return p.local; }

  __device__ __forceinline__ void put_warp(int peer, size_t dst_offset, size_t src_offset, size_t bytes) const {
    gin.put(world, peer, p.window, p.region + dst_offset, p.window, p.region + src_offset, bytes, ncclGin_None{},
            ncclGin_None{}, ncclCoopWarp{});
    if (lane_id() == 0 && p.stats) {
      atomicAdd(reinterpret_cast<unsigned long long*>(&p.stats[0]), 1ull);
      atomicAdd(reinterpret_cast<unsigned long long*>(&p.stats[1]), static_cast<unsigned long long>(bytes));
    }
  }

  __device__ __forceinline__ void signal(int peer, int id, uint64_t add) const {
    gin.signal(world, peer, ncclGin_SignalAdd{p.signal_base + static_cast<uint32_t>(id), add});
  }

  __device__ __forceinline__ void fence_puts() const {}

  __device__ __forceinline__ bool wait_signal(const WaitContext& ctx, int id, uint64_t least, WaitPhase phase,
                                              int peer) const {
    const ncclGinSignal_t s = p.signal_base + static_cast<uint32_t>(id);
    return wait_geq(ctx, [&] { return gin.readSignal(s); }, least, phase, peer);
  }

  __device__ __forceinline__ uint64_t read_signal(int id) const {
    return gin.readSignal(p.signal_base + static_cast<uint32_t>(id));
  }

  // Called by every thread of the block.
  __device__ __forceinline__ void flush() const { gin.flush(ncclCoopCta{}); }
};

}  // namespace dev
}  // namespace epcomm
