// Bounded waits. Every wait on another GPU goes through `wait_flag_geq`: on timeout it records
// kernel, phase, rank, peer and the values seen, raises the local abort flag so the other blocks
// stop too, and returns false; the caller then leaves the kernel.
#pragma once

#include "kernels/common/diagnostics.hpp"
#include "kernels/common/ptx.cuh"

namespace epcomm::dev {

using epcomm::DeviceError;
using epcomm::WaitContext;

__device__ __forceinline__ bool aborted(const WaitContext& ctx) { return ld_volatile(ctx.abort_flag) != 0; }

// Every error but DeviceError::kBadArgument stops the kernel (the local abort flag); a bad argument
// only the device could check lets it go on, so peers are not stranded.
static __device__ __noinline__ void report(const WaitContext& ctx, DeviceError code, WaitPhase phase, int peer,
                                           uint64_t expected, uint64_t observed) {
  // A device flag decides who writes the record (no atomics on host memory over PCIe).
  if (atomicCAS(ctx.record_claimed, 0, 1) == 0) {
    volatile DeviceErrorRecord* r = ctx.record;
    r->kernel = ctx.kernel;
    r->phase = phase;
    r->rank = ctx.rank;
    r->peer = peer;
    r->block = static_cast<int>(blockIdx.x);
    r->expected = expected;
    r->observed = observed;
    __threadfence_system();
    r->code = static_cast<int32_t>(code);
    __threadfence_system();
  }
  if (code != DeviceError::kBadArgument) atomicExch(ctx.abort_flag, 1);
}

__device__ __forceinline__ void report_timeout(const WaitContext& ctx, WaitPhase phase, int peer, uint64_t expected,
                                               uint64_t observed) {
  report(ctx, DeviceError::kTimeout, phase, peer, expected, observed);
}

// Ranks disagree on a call's parameters (chunk size, experts, SMs): the rings would not line up.
__device__ __forceinline__ void report_mismatch(const WaitContext& ctx, WaitPhase phase, int peer, uint64_t expected,
                                                uint64_t observed) {
  report(ctx, DeviceError::kMismatch, phase, peer, expected, observed);
}

// Spins until load() >= target. Bounded: false when the call was aborted, or after the timeout with
// a record naming the phase and the awaited peer. One thread calls it.
template <class Load>
__device__ __forceinline__ bool wait_geq(const WaitContext& ctx, Load load, uint64_t target, WaitPhase phase,
                                         int peer) {
  uint64_t v = load();
  if (v >= target) return true;
  const uint64_t start = global_timer_ns();
  for (uint32_t spins = 1;; ++spins) {
    v = load();
    if (v >= target) return true;
    if ((spins & 255) == 0) {
      if (aborted(ctx)) return false;
      if (global_timer_ns() - start > ctx.timeout_ns) {
        report_timeout(ctx, phase, peer, target, v);
        return false;
      }
    }
  }
}

// Spins until *flag >= target (acquire, system scope). One thread calls it.
__device__ __forceinline__ bool wait_flag_geq(const WaitContext& ctx, const uint64_t* flag, uint64_t target,
                                              WaitPhase phase, int peer) {
  return wait_geq(
      ctx, [flag] { return ld_acquire_sys(flag); }, target, phase, peer);
}

// Spins on an mbarrier phase (local, but bounded too: a lost bulk copy must not hang the GPU).
__device__ __forceinline__ bool wait_mbar(const WaitContext& ctx, uint64_t* bar, uint32_t parity, WaitPhase phase,
                                          int peer) {
  if (mbar_try_wait(bar, parity)) return true;
  const uint64_t start = global_timer_ns();
  for (uint32_t spins = 1;; ++spins) {
    if (mbar_try_wait(bar, parity)) return true;
    if ((spins & 63) == 0 && global_timer_ns() - start > ctx.timeout_ns) {
      report_timeout(ctx, phase, peer, parity, ~0ull);
      return false;
    }
  }
}

// A flag value: the call's sequence number in the high half, a per-call counter in the low half,
// so flags left by earlier calls always compare smaller and no flag is ever reset.
__device__ __forceinline__ uint64_t tag(uint32_t seq, uint32_t value) {
  return (static_cast<uint64_t>(seq) << 32) | value;
}

}  // namespace epcomm::dev
