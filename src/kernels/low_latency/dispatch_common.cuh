// Device code both LL dispatch paths share (per-expert: dispatch_per_expert.cuh, per-rank:
// dispatch_per_rank*.cu*): peer addressing, staging a token, EPCOMM_LL_PROBE's stamps, publishing
// the call's number and reading a count flag.
#pragma once

#include <cstdint>

#include "kernels/low_latency/ll_device.cuh"
#include "kernels/low_latency/shrink.cuh"

namespace epcomm::dev {

__device__ __forceinline__ char* peer_region(const LowLatencyDispatchParams& p, int rank) {
  return lsa_peer(p.common, rank) + p.region;
}

// Token t of x into a staging area of shared memory: cast to FP8 (scales after the row) or as BF16.
__device__ __forceinline__ void stage_token(const LowLatencyDispatchParams& p, int t, uint8_t* msg) {
  const uint16_t* row = p.x + static_cast<size_t>(t) * p.layout.hidden;
  if (p.use_fp8) stage_fp8(row, p.layout.hidden, p.round_scale, msg);
  else stage_bf16(row, p.layout.hidden, msg);
}

// A global-timer stamp in `slot` by thread 0 (the per-rank send's sub-phases).
template <bool kProbe>
__device__ __forceinline__ void probe_stamp(const LowLatencyDispatchParams& p, int slot) {
  if constexpr (kProbe) {
    if (threadIdx.x == 0) p.probe[blockIdx.x * kLowLatencyProbeSlots + slot] = global_timer_ns();
  }
}

// EPCOMM_LL_PROBE: thread 0 of each block stamps a phase mark (global timer and SM clock).
// A kernel instance of its own (kProbe), so the kernels without it keep their registers.
template <bool kProbe>
__device__ __forceinline__ void probe_mark(const LowLatencyDispatchParams& p, int mark, int thread = 0) {
  if constexpr (kProbe) {
    if (static_cast<int>(threadIdx.x) == thread) {
      p.probe[blockIdx.x * kLowLatencyProbeSlots + mark] = global_timer_ns();
      p.probe[blockIdx.x * kLowLatencyProbeSlots + 8 + mark] = static_cast<unsigned long long>(clock64());
    }
  }
}

// The last block past the send half publishes the call's number (the receive of a hook reads it).
// kBarrier: the block's threads meet first; without it the caller has made thread 0 come after
// every thread's send (kSplit's warp 0).
template <bool kBarrier = true>
__device__ void publish_dispatch(const LowLatencyDispatchParams& p, uint32_t seq) {
  if constexpr (kBarrier) __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(&p.state->dispatch_blocks_done, 1u) == gridDim.x - 1) {
      p.state->dispatch_blocks_done = 0;
      p.state->buffer_dispatch_seq[p.buffer] = seq;
      __threadfence();
      atomicExch(&p.state->dispatch_seq, seq);
    }
  }
}

// Shrink mode: every block of this rank settles (le, src)'s count once per call (shrink.cuh), so
// a source masked part-way gives all blocks the same answer. Without a mask, the count as seen.
__device__ __forceinline__ uint32_t settled_count(const LowLatencyDispatchParams& p, int le, int src, uint32_t seq,
                                                  uint32_t payload) {
  if (p.mask == nullptr) return payload;
  const LowLatencyLayout& L = p.layout;
  return settle_count(p.count_decisions + static_cast<size_t>(p.buffer) * L.num_experts +
                          static_cast<size_t>(le) * L.num_ranks + src,
                      seq, tag(seq, payload));
}

// The count of (local expert le, source src): its flag's payload (count + 1), or 0 when shrink mode
// masked the source (then settled once per call, see shrink.cuh). False: the call was aborted.
__device__ __forceinline__ bool receive_count(const LowLatencyDispatchParams& p, const char* mine, int le, int src,
                                              uint32_t seq, uint32_t& payload, long long& cycles) {
  const LowLatencyLayout& L = p.layout;
  const uint64_t* flag = reinterpret_cast<const uint64_t*>(mine + L.count(p.buffer, le, src));
  uint64_t v = 0;
  // Counts are stored relaxed (they guard no data): read them relaxed too.
  const PeerWait w = wait_payload_or_mask(p.common.wait, p.mask, flag, tag(seq, 1), WaitPhase::kLowLatencyDispatchCount,
                                          src, v, cycles);
  if (w == PeerWait::kAborted) return false;
  payload = w == PeerWait::kArrived ? static_cast<uint32_t>(v) : 0u;
  payload = settled_count(p, le, src, seq, payload);
  return true;
}

}  // namespace epcomm::dev
