// Shrink mode of the low-latency kernels (docs/contract.md §3.3): a peer that does not answer within the
// timeout is masked instead of failing the call, and masked peers are skipped without waiting.
//
// The mask is this rank's own view, [R] int32 in device memory (LowLatencyHostState::mask), read by
// every LL kernel (so CUDA graph replays see it too) and written by them (a timed-out wait sets
// the peer's entry) and by the mask API (kernels/low_latency/mask.cu). With shrink off the kernels
// get mask == nullptr and every helper here behaves exactly like the plain wait: a timeout fails
// the call with a record naming kernel, phase, rank and peer.
//
// One call may decide about a peer in several warps at once (every (expert, source) unit waits for
// the counts of sources 0..src). A peer that answers right at the timeout could then look alive to
// one warp and masked to another, and the packed begins of later sources would disagree. The
// dispatch therefore settles each (buffer, local expert, source) count once per call in a decision
// cell (first writer wins, tagged with the call's number); every warp uses the settled value.
#pragma once

#include "kernels/low_latency/ll_device.cuh"

namespace epcomm::dev {

enum class PeerWait { kArrived, kMasked, kAborted };

__device__ __forceinline__ bool peer_masked(const int32_t* mask, int peer) {
  return mask != nullptr && ld_volatile(mask + peer) != 0;
}

// Spins until load() >= target (load: an acquire at system scope); `value` gets what was seen and `cycles`
// grows by the clock cycles spent (0 when the flag was already there). Bounded like wait_flag_geq.
// With shrink mode (mask != nullptr) it ends early when the peer is (or becomes) masked, and on
// timeout masks the peer instead of failing; never for this rank itself: its own flags not arriving
// is a bug, and fails with a record like every wait without a mask.
template <typename Load>
__device__ __forceinline__ PeerWait wait_geq_or_mask(const WaitContext& ctx, int32_t* mask, Load load, uint64_t target,
                                                     WaitPhase phase, int peer, uint64_t& value, long long& cycles) {
  int32_t* const m = peer == ctx.rank ? nullptr : mask;
  if (peer_masked(m, peer)) return PeerWait::kMasked;
  uint64_t v = load();
  if (v >= target) {
    value = v;
    return PeerWait::kArrived;
  }
  const long long c0 = clock64();
  const uint64_t start = global_timer_ns();
  for (uint32_t spins = 1;; ++spins) {
    v = load();
    if (v >= target) {
      value = v;
      cycles += clock64() - c0;
      return PeerWait::kArrived;
    }
    if ((spins & 255) == 0) {
      if (aborted(ctx)) return PeerWait::kAborted;
      if (peer_masked(m, peer)) return PeerWait::kMasked;
      if (global_timer_ns() - start > ctx.timeout_ns) {
        if (m == nullptr) {
          report_timeout(ctx, phase, peer, target, v);
          return PeerWait::kAborted;
        }
        atomicExch(m + peer, 1);
        __threadfence();
        cycles += clock64() - c0;
        return PeerWait::kMasked;
      }
    }
  }
}

// The usual 64-bit flag: *flag >= target.
__device__ __forceinline__ PeerWait wait_tag_or_mask(const WaitContext& ctx, int32_t* mask, const uint64_t* flag,
                                                     uint64_t target, WaitPhase phase, int peer, uint64_t& value,
                                                     long long& cycles) {
  return wait_geq_or_mask(
      ctx, mask, [flag] { return ld_acquire_sys(flag); }, target, phase, peer, value, cycles);
}

// The same for a flag that guards no data (its payload is all the reader needs): relaxed loads.
__device__ __forceinline__ PeerWait wait_payload_or_mask(const WaitContext& ctx, int32_t* mask, const uint64_t* flag,
                                                         uint64_t target, WaitPhase phase, int peer, uint64_t& value,
                                                         long long& cycles) {
  return wait_geq_or_mask(
      ctx, mask, [flag] { return ld_relaxed_sys(flag); }, target, phase, peer, value, cycles);
}

// The same for a 32-bit flag holding a call number: arrived when *flag >= seq.
__device__ __forceinline__ PeerWait wait_seq_or_mask(const WaitContext& ctx, int32_t* mask, const uint32_t* flag,
                                                     uint32_t seq, WaitPhase phase, int peer, long long& cycles) {
  uint64_t value = 0;
  return wait_geq_or_mask(
      ctx, mask, [flag] { return static_cast<uint64_t>(ld_acquire_sys(flag)); }, seq, phase, peer, value, cycles);
}

// Settles one count of a dispatch: `proposal` is tag(seq, count + 1) when the count arrived, or
// tag(seq, 0) when the source is masked. The first proposal of this call wins; returns the
// settled payload (0: masked, else count + 1). Cells of earlier calls carry other numbers.
__device__ __forceinline__ uint32_t settle_count(uint64_t* cell, uint32_t seq, uint64_t proposal) {
  unsigned long long old = *reinterpret_cast<volatile unsigned long long*>(cell);
  while (static_cast<uint32_t>(old >> 32) != seq) {
    const unsigned long long seen =
        atomicCAS(reinterpret_cast<unsigned long long*>(cell), old, static_cast<unsigned long long>(proposal));
    if (seen == old) return static_cast<uint32_t>(proposal);
    old = seen;
  }
  return static_cast<uint32_t>(old);
}

}  // namespace epcomm::dev
