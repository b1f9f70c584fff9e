// clean_low_latency_buffer over load/store (kernel_params.hpp, LowLatencyCleanParams): barrier 1, the
// zeroing and barrier 2 in one kernel on the caller's stream, so a clean orders with the LL calls
// around it and can be captured in a CUDA graph (SGLang cleans when it switches to low-latency
// mode, possibly while capturing). A barrier is one warp, lane l for ranks l, l + 32, ....
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

constexpr int kCleanThreads = 512;

// Barrier `b` of the clean numbered `number`, by one warp (LowLatencyCleanParams).
__device__ void clean_barrier(const LowLatencyCleanParams& p, uint32_t number, int b) {
  const CommonParams& c = p.common;
  const uint64_t target = tag(number, static_cast<uint32_t>(b));
  const size_t slot = c.ctl.ll_region + sizeof(uint64_t) * static_cast<size_t>(c.rank);
  const uint64_t* flags = reinterpret_cast<const uint64_t*>(p.peers[c.rank] + c.ctl.ll_region);
  __threadfence_system();  // this rank's earlier writes (its zeroed region) before the flags
  for (int r = lane_id(); r < c.num_ranks; r += 32)
    st_release_sys(reinterpret_cast<uint64_t*>(p.peers[r] + slot), target);
  // Lane l waits for ranks l, l + 32, ... Barrier 2 waits for the ranks that reached barrier 1
  // (one that timed out there is not waited for twice).
  for (int r = lane_id(); r < c.num_ranks; r += 32)
    if (b == 1 || ld_acquire_sys(flags + r) >= tag(number, 1))
      wait_clean_arrival(
          c.wait, p.mask, [&] { return ld_acquire_sys(flags + r); }, target, r);
  __syncwarp();
}

// Zeroes the grid's share of every range: 16-byte stores over the aligned middle, bytes at the ends.
__device__ void clean_zero(const LowLatencyCleanParams& p) {
  const size_t thread = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const size_t threads = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (int i = 0; i < LowLatencyCleanParams::kZeroRanges; ++i) {
    char* const begin = p.zero[i].data;
    char* const end = begin + p.zero[i].bytes;
    if (p.zero[i].bytes == 0) continue;
    char* const mid = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(begin) + 15) & ~uintptr_t{15});
    char* const mid_end = reinterpret_cast<char*>(reinterpret_cast<uintptr_t>(end) & ~uintptr_t{15});
    if (mid >= mid_end) {
      for (char* b = begin + thread; b < end; b += threads) *b = 0;
      continue;
    }
    for (char* b = begin + thread; b < mid; b += threads) *b = 0;
    for (char* b = mid_end + thread; b < end; b += threads) *b = 0;
    int4* const v = reinterpret_cast<int4*>(mid);
    const size_t n = static_cast<size_t>(mid_end - mid) / sizeof(int4);
    for (size_t j = thread; j < n; j += threads) v[j] = make_int4(0, 0, 0, 0);
  }
}

// The whole clean in one kernel (kernel_params.hpp says why not three): block 0's first warp runs
// barrier 1 and then releases `go`; every block zeroes its share once `go` holds this clean's
// number; the last block to finish runs barrier 2 and counts the clean.
__global__ void __launch_bounds__(kCleanThreads, 1)
    low_latency_clean_kernel(const __grid_constant__ LowLatencyCleanParams p) {
  const CommonParams& c = p.common;
  __shared__ uint32_t number_s;
  __shared__ bool last_s;
  // Every rank made the same number of cleans, so this number is the same everywhere. Each block
  // reads it before it counts itself done, and the counter moves only after all did.
  if (threadIdx.x == 0) number_s = ld_volatile(p.clean_count) + 1u;
  __syncthreads();
  const uint32_t number = number_s;
  if (blockIdx.x == 0) {
    if (threadIdx.x < 32) {
      clean_barrier(p, number, 1);
      // On a timeout too (a record, or a masked peer): the zeroing and barrier 2 go on, as the
      // stream-ordered steps did before.
      if (lane_id() == 0) {
        __threadfence();
        st_release_sys(p.go, number);
      }
    }
  } else if (threadIdx.x == 0) {
    // Bounded past block 0's own bound (barrier 1 waits up to c.wait.timeout_ns per peer lane).
    const uint64_t start = global_timer_ns();
    for (uint32_t spins = 1; ld_acquire_sys(p.go) < number; ++spins) {
      if ((spins & 255) == 0 && global_timer_ns() - start > 2 * c.wait.timeout_ns + 1000000000ull) {
        report_timeout(c.wait, WaitPhase::kLowLatencyClean, c.rank, number, ld_acquire_sys(p.go));
        break;
      }
    }
  }
  __syncthreads();
  clean_zero(p);
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();  // this block's zeros before it counts itself done
    last_s = atomicAdd(p.zeroed, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last_s || threadIdx.x >= 32) return;
  if (lane_id() == 0) {
    __threadfence();
    *p.zeroed = 0;  // for the next clean (a later kernel on this stream)
  }
  __syncwarp();
  clean_barrier(p, number, 2);
  if (lane_id() == 0) {
    __threadfence();
    *p.clean_count = number;
  }
}

const KernelRegistration kKernels{reinterpret_cast<const void*>(low_latency_clean_kernel)};

}  // namespace

void launch_low_latency_clean(const LowLatencyCleanParams& p, int num_blocks, void* stream) {
  low_latency_clean_kernel<<<num_blocks, kCleanThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  EPCOMM_LAUNCH_CHECK("low_latency_clean_kernel");
}

}  // namespace epcomm
