// Call sequence numbers kept on the device, so that a kernel captured in a CUDA graph still gets a
// fresh number at every replay. Every rank makes the same calls in the same order, so the numbers
// agree across ranks without any exchange.
#pragma once

#include "kernels/common/ptx.cuh"
#include "kernels/normal/params.hpp"

namespace epcomm::dev {

// The number of the call now running (read by every block before any block can finish it).
__device__ __forceinline__ uint32_t call_sequence(const CommonParams& c) { return ld_volatile(c.seq_counter) + 1; }

// Each block calls this once, last, with all its threads; the last block publishes the number.
__device__ __forceinline__ void finish_call(const CommonParams& c, uint32_t seq) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const unsigned done = atomicAdd(c.done_counter, 1u);
    if (done == gridDim.x - 1) {
      *c.done_counter = 0;
      __threadfence();
      atomicExch(c.seq_counter, seq);
    }
  }
}

}  // namespace epcomm::dev
