// clean_low_latency_buffer's barriers across real nodes, on the caller's stream (capturable in a
// CUDA graph): clean.cu's barrier for the ranks of this node (LSA flags in the control part), and
// for the ranks of other nodes one GIN signal per peer (GinSignalPlan::clean_base(): the signal
// `clean_base + s` of a rank counts the barriers rank s reached; one add per barrier, so the c-th
// clean's barrier b expects 2 (c - 1) + b from every peer). A peer's barrier signal travels on the
// context of its LL puts and signals, after them (net_gin.cuh): once it arrived, nothing that peer
// sent before the clean is still on its way here. These signals are not reset by the clean
// (Buffer::reset resets them with the call counters).
//
// Buffer takes this path across real nodes while the caller's stream is capturing, or with
// EPCOMM_LL_CLEAN_ON_DEVICE=1; otherwise the host's barriers (buffer_low_latency_state.cpp).
#include <cuda_runtime.h>

#include "core/call_check.hpp"
#include "kernels/common/launch.hpp"
#include "kernels/common/ptx.cuh"
#include "kernels/common/wait.cuh"
#include "kernels/low_latency/clean_wait.cuh"
#include "kernels/low_latency/params.hpp"
#include "transport/net_gin.cuh"

namespace epcomm {
namespace {

using namespace epcomm::dev;

__global__ void __launch_bounds__(32, 1)
    low_latency_clean_barrier_gin_kernel(const __grid_constant__ LowLatencyCleanParams p,
                                         const __grid_constant__ GinNetParams g) {
  const CommonParams& c = p.common;
  const GinNet net(g, c.rank);
  const int P = g.ranks_per_node, node = c.rank / P;
  const uint32_t number = ld_volatile(p.clean_count) + 1u;
  const uint64_t target = tag(number, static_cast<uint32_t>(p.barrier));                // LSA flags
  const uint64_t net_target = 2ull * (number - 1u) + static_cast<uint64_t>(p.barrier);  // GIN signals
  const size_t slot = c.ctl.ll_region + sizeof(uint64_t) * static_cast<size_t>(c.rank);
  const uint64_t* flags = reinterpret_cast<const uint64_t*>(p.peers[c.rank] + c.ctl.ll_region);
  __threadfence_system();  // this rank's earlier writes (its zeroed region) before the flags
  for (int r = lane_id(); r < c.num_ranks; r += 32) {
    if (r / P == node) st_release_sys(reinterpret_cast<uint64_t*>(p.peers[r] + slot), target);
    else net.signal(r, c.rank, 1);
  }
  // Barrier 2 waits for the ranks that reached barrier 1 (one that timed out there is not waited
  // for twice).
  for (int r = lane_id(); r < c.num_ranks; r += 32) {
    if (r / P == node) {
      if (p.barrier == 1 || ld_acquire_sys(flags + r) >= tag(number, 1))
        wait_clean_arrival(
            c.wait, p.mask, [&] { return ld_acquire_sys(flags + r); }, target, r);
    } else if (p.barrier == 1 || net.read_signal(r) >= net_target - 1) {
      wait_clean_arrival(
          c.wait, p.mask, [&] { return net.read_signal(r); }, net_target, r);
    }
  }
  __syncwarp();
  if (p.barrier == 2 && lane_id() == 0) {
    __threadfence();
    *p.clean_count = number;
  }
}

const KernelRegistration kGinKernels({reinterpret_cast<const void*>(low_latency_clean_barrier_gin_kernel)},
                                     KernelSet::kGin);

}  // namespace

void launch_low_latency_clean_barrier_gin(const LowLatencyCleanParams& p, const GinNetParams& g, void* stream) {
  low_latency_clean_barrier_gin_kernel<<<1, 32, 0, static_cast<cudaStream_t>(stream)>>>(p, g);
  EPCOMM_LAUNCH_CHECK("low_latency_clean_barrier_gin_kernel");
}

}  // namespace epcomm
