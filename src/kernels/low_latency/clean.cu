// clean_low_latency_buffer's barriers (kernel_params.hpp, LowLatencyCleanParams): one warp, lane l for
// ranks l, l + 32, ..., on the caller's stream, so a clean orders with the LL calls around it and can be captured
// in a CUDA graph (SGLang cleans when it switches to low-latency mode, possibly while capturing).
//
// Every rank takes part, masked ones too (shrink mode): a masked rank that is alive comes back
// through this clean (its call counters restart with everyone's), and it must not zero its region
// while the others already send into it again. Unlike DeepEP, whose clean skips masked ranks, a
// rank that never arrives therefore costs a wait: three GPU timeouts plus 10 s (the host sets that
// bound: ranks come to clean after their own earlier calls, which may each have waited a timeout
// for a masked peer); in shrink mode it is then masked (it stays masked), otherwise the wait fails
// with a record like any other.
#include <cuda_runtime.h>

#include "core/call_check.hpp"
#include "kernels/common/launch.hpp"
#include "kernels/common/ptx.cuh"
#include "kernels/common/wait.cuh"
#include "kernels/low_latency/clean_wait.cuh"
#include "kernels/low_latency/params.hpp"

namespace epcomm {
namespace {

using namespace epcomm::dev;

__global__ void __launch_bounds__(32, 1)
    low_latency_clean_barrier_kernel(const __grid_constant__ LowLatencyCleanParams p) {
  const CommonParams& c = p.common;
  // Every rank made the same number of cleans, so this number is the same everywhere.
  const uint32_t number = ld_volatile(p.clean_count) + 1u;
  const uint64_t target = tag(number, static_cast<uint32_t>(p.barrier));
  const size_t slot = c.ctl.ll_region + sizeof(uint64_t) * static_cast<size_t>(c.rank);
  const uint64_t* flags = reinterpret_cast<const uint64_t*>(p.peers[c.rank] + c.ctl.ll_region);
  __threadfence_system();  // this rank's earlier writes (its zeroed region) before the flags
  for (int r = lane_id(); r < c.num_ranks; r += 32)
    st_release_sys(reinterpret_cast<uint64_t*>(p.peers[r] + slot), target);
  // Lane l waits for ranks l, l + 32, ... Barrier 2 waits for the ranks that reached barrier 1
  // (one that timed out there is not waited for twice).
  for (int r = lane_id(); r < c.num_ranks; r += 32)
    if (p.barrier == 1 || ld_acquire_sys(flags + r) >= tag(number, 1))
      wait_clean_arrival(
          c.wait, p.mask, [&] { return ld_acquire_sys(flags + r); }, target, r);
  __syncwarp();
  if (p.barrier == 2 && lane_id() == 0) {
    __threadfence();
    *p.clean_count = number;
  }
}

const KernelRegistration kKernels{reinterpret_cast<const void*>(low_latency_clean_barrier_kernel)};

}  // namespace

void launch_low_latency_clean_barrier(const LowLatencyCleanParams& p, void* stream) {
  low_latency_clean_barrier_kernel<<<1, 32, 0, static_cast<cudaStream_t>(stream)>>>(p);
  EPCOMM_LAUNCH_CHECK("low_latency_clean_barrier_kernel");
}

}  // namespace epcomm
