// Call sequence numbers kept on the device, so that a kernel captured in a CUDA graph still gets a
// fresh number at every replay. Every rank makes the same calls in the same order, so the numbers
// agree across ranks without any exchange.
#pragma once

#include "kernels/common/common_params.hpp"
#include "kernels/common/ptx.cuh"
#include "kernels/common/wait.cuh"

namespace epcomm::dev {

// The number of the call now running (read by every block before any block can finish it).
__device__ __forceinline__ uint32_t call_sequence(const CommonParams& c) { return ld_volatile(c.seq_counter) + 1; }

// False (and a record, DeviceError::kCallNumbersUsedUp) when `seq` is past kLastCallNumber (or came
// round to 0): the kernel must leave before it touches a flag. Every rank makes the same calls, so all
// of them stop at the same call, and every later one stops too (the counter is not advanced) until a
// reset.
__device__ __forceinline__ bool call_number_left(const WaitContext& w, uint32_t seq) {
  if (call_number_usable(seq)) return true;
  if (threadIdx.x == 0 && blockIdx.x == 0)
    report(w, DeviceError::kCallNumbersUsedUp, WaitPhase::kNone, -1, kLastCallNumber, seq);
  return false;
}

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
