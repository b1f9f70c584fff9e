// Device code both LL combine paths share (per-expert: combine_per_expert.cuh, per-rank:
// combine_per_rank.cu): the slice width, the weighted BF16 sum, the end of the send half (`done`)
// and the wait for every rank's `done`.
#pragma once

#include <cstdint>

#include "kernels/low_latency/ll_device.cuh"
#include "kernels/low_latency/ll_net.cuh"
#include "kernels/low_latency/shrink.cuh"

namespace epcomm::dev {

constexpr int kSliceChannels = 256;  // 8 per lane

// acc[i] = acc[i] + w * (the i-th BF16 of v), multiply and add rounded separately (the reference's
// operations, no FMA).
__device__ __forceinline__ void add_weighted_bf16x8(float (&acc)[8], float w, int4 v) {
  const uint32_t words[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                             static_cast<uint32_t>(v.w)};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    acc[2 * i] = __fadd_rn(acc[2 * i], __fmul_rn(w, bf16_bits_to_float(words[i] & 0xffffu)));
    acc[2 * i + 1] = __fadd_rn(acc[2 * i + 1], __fmul_rn(w, bf16_bits_to_float(words[i] >> 16)));
  }
}

// The last block past the send half publishes the call's number and tells every origin that this
// rank neither writes to it nor reads its own buffer for this combine any more.
// kBarrier: the block's threads meet first; without it the caller has made thread 0 come after
// every thread's send (the split launch's warp 0).
template <class NetT, bool kBarrier = true>
__device__ void finish_combine_send(const LowLatencyCombineParams& p, uint32_t seq, const NetT& net) {
  const CommonParams& c = p.common;
  if constexpr (kBarrier) __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();
    if (atomicAdd(&p.state->combine_blocks_done, 1u) == gridDim.x - 1) {
      __threadfence_system();
      p.state->combine_blocks_done = 0;
      p.state->buffer_combine_seq[p.buffer] = seq;
      for (int r = 0; r < c.num_ranks; ++r) {
        if (peer_masked(p.mask, r)) continue;
        if constexpr (NetT::kEnabled) {
          if (net.remote(r)) {
            net.net.signal(r, net.L().signal_id(p.buffer, kLLNetCombineDone, c.rank), 1);
            continue;
          }
        }
        st_release_sys(reinterpret_cast<uint64_t*>(lsa_peer(c, r) + p.region + p.layout.done(p.buffer, c.rank)),
                       tag(seq, 1));
      }
      __threadfence();
      atomicExch(&p.state->combine_seq, seq);
    }
  }
}

// Leave only when every expert rank is past its send half: then no rank still reads its own
// buffer for this combine, so this rank's next dispatch may write into it. Warp 0 of block 0,
// lane r waits for ranks r, r + 32, ...
template <class NetT>
__device__ void wait_all_done(const LowLatencyCombineParams& p, uint32_t seq, const NetT& net) {
  const CommonParams& c = p.common;
  if (blockIdx.x != 0 || warp_id() != 0) return;
  for (int r = lane_id(); r < c.num_ranks && !aborted(c.wait); r += 32) {
    uint64_t v;
    long long cycles = 0;
    if constexpr (NetT::kEnabled) {
      if (net.remote(r)) {
        net.wait(c.wait, p.mask, p.buffer, kLLNetCombineDone, r, net.shadow_value(p.buffer, kLLNetCombineDone, r) + 1,
                 WaitPhase::kLowLatencyCombineDone, cycles);
        continue;
      }
    }
    wait_tag_or_mask(c.wait, p.mask,
                     reinterpret_cast<const uint64_t*>(lsa_peer(c, c.rank) + p.region + p.layout.done(p.buffer, r)),
                     tag(seq, 1), WaitPhase::kLowLatencyCombineDone, r, v, cycles);
  }
}

}  // namespace epcomm::dev
