// The wait of clean_low_latency_buffer's barriers (clean.cu over LSA flags, clean_gin.cu over GIN
// signals too): every rank is waited for, masked ones included (clean.cu says why).
#pragma once

#include <cstdint>

#include "kernels/common/ptx.cuh"
#include "kernels/common/wait.cuh"

namespace epcomm::dev {

// load() >= target, bounded. On timeout: with shrink mode the peer is masked, else a record naming
// it; false when it did not arrive.
template <typename Load>
__device__ bool wait_clean_arrival(const WaitContext& w, int32_t* mask, Load load, uint64_t target, int peer) {
  if (load() >= target) return true;
  const uint64_t start = global_timer_ns();
  for (uint32_t spins = 1;; ++spins) {
    const uint64_t v = load();
    if (v >= target) return true;
    if ((spins & 255) == 0) {
      if (aborted(w)) return false;
      if (global_timer_ns() - start > w.timeout_ns) {
        if (mask != nullptr && peer != w.rank) {
          atomicExch(mask + peer, 1);
          __threadfence();
        } else {
          report_timeout(w, WaitPhase::kLowLatencyClean, peer, target, v);
        }
        return false;
      }
    }
  }
}

}  // namespace epcomm::dev
