// Internode dispatch prologue: the count exchange of the intranode notify (kernels/normal/notify.cu),
// with every meta entry sent through the network transport (put + signal) instead of LSA stores, so
// it works across nodes. Output: the same handle (rank_prefix_matrix, chunk_offset), per-expert
// counts and host result. One block; meta entries double-buffered by the notify count's parity.
#pragma once

#include "kernels/common/sequence.cuh"
#include "kernels/internode/common.cuh"
#include "kernels/normal/receive_plan.cuh"

namespace epcomm::dev {

constexpr int kInterNotifyThreads = 1024;

template <class Net>
__device__ void inter_notify(const InterNotifyParams& p, const Net& net) {
  const InterCommon& ic = p.ic;
  const InterLayout& L = ic.layout;
  const WaitContext& w = ic.common.wait;
  const Who me = who(ic);
  const int R = me.R;
  char* const mine = ic.net.window[me.rank];
  const int lane = lane_id(), warp = warp_id(), num_warps = blockDim.x / 32;
  const uint32_t notify_count = ld_volatile(p.parity_counter);
  const int parity = static_cast<int>(notify_count & 1);
  const int experts_per_rank = p.num_experts / R;
  const int num_chunks = (p.num_tokens + p.chunk - 1) / p.chunk;

  // 1. A warp per destination: stage the meta entry, put it, signal.
  for (int j = warp; j < R; j += num_warps) {
    char* meta = mine + L.meta_staging(j);
    if (lane == 0)
      *reinterpret_cast<NotifyHeader*>(meta) = NotifyHeader{p.num_tokens, p.num_experts,  p.chunk,     ic.num_blocks,
                                                            p.chunk,      p.worst_tokens, p.row_bytes, p.rows_words};
    for (int r = lane; r < R; r += 32) at<int32_t>(meta, L.meta_entry.counts)[r] = p.num_tokens_per_rank[r];
    for (int e = lane; e < experts_per_rank; e += 32)
      at<int32_t>(meta, L.meta_entry.experts)[e] = p.num_tokens_per_expert[j * experts_per_rank + e];
    for (int c = 0; c < num_chunks; ++c) {
      const int t = c * p.chunk + lane;
      const bool bit = lane < p.chunk && t < p.num_tokens && p.is_token_in_rank[static_cast<int64_t>(t) * R + j] != 0;
      const uint32_t m = __ballot_sync(0xffffffffu, bit);
      if (lane == 0) at<uint32_t>(meta, L.meta_entry.masks)[c] = m;
    }
    __syncwarp();
    const size_t bytes = align_up(L.meta_entry.masks + sizeof(uint32_t) * num_chunks, 16);
    net.put_warp(j, L.meta(parity, me.rank), L.meta_staging(j), bytes);
    net.fence_puts();
    __syncwarp();
    if (lane == 0) net.signal(j, L.signal_id(kSigMeta, me.rank), 1);
  }

  // 2. Wait for every source's entry.
  int ok = 1;
  if (threadIdx.x < R) {
    uint64_t* shadow = at<uint64_t>(mine, L.shadow(kSigMeta, threadIdx.x));
    const uint64_t least = *shadow + 1;
    ok = net.wait_signal(w, L.signal_id(kSigMeta, threadIdx.x), least, WaitPhase::kNotifyMeta, threadIdx.x);
    if (ok) *shadow = least;
  }
  ok = __syncthreads_and(ok);

  // 3. The receive plan, the per-expert counts and the host's totals (as inside a node).
  build_receive_plan<kMaxInterRanks>(p, w, L.meta_entry, R, me.rank, ic.num_blocks, ok != 0, notify_count,
                                     [&](int i) { return static_cast<const char*>(mine + L.meta(parity, i)); });
  net.flush(w);
}

}  // namespace epcomm::dev
