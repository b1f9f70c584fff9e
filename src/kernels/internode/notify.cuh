// Internode dispatch prologue: the count exchange of the intranode notify (kernels/normal/notify.cu),
// with every meta entry sent through the network transport (put + signal) instead of LSA stores, so
// it works across nodes. Output: the same handle (rank_prefix_matrix, chunk_offset), per-expert
// counts and host result. One block; meta entries double-buffered by the notify count's parity.
#pragma once

#include "kernels/common/sequence.cuh"
#include "kernels/internode/common.cuh"

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
    if (lane == 0) *reinterpret_cast<NotifyHeader*>(meta) = NotifyHeader{p.num_tokens, p.num_experts, p.chunk, ic.num_blocks};
    for (int r = lane; r < R; r += 32) at<int32_t>(meta, L.meta_counts)[r] = p.num_tokens_per_rank[r];
    for (int e = lane; e < experts_per_rank; e += 32)
      at<int32_t>(meta, L.meta_experts)[e] = p.num_tokens_per_expert[j * experts_per_rank + e];
    for (int c = 0; c < num_chunks; ++c) {
      const int t = c * p.chunk + lane;
      const bool bit = lane < p.chunk && t < p.num_tokens && p.is_token_in_rank[static_cast<int64_t>(t) * R + j] != 0;
      const uint32_t m = __ballot_sync(0xffffffffu, bit);
      if (lane == 0) at<uint32_t>(meta, L.meta_masks)[c] = m;
    }
    __syncwarp();
    const size_t bytes = align_up(L.meta_masks + sizeof(uint32_t) * num_chunks, 16);
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

  __shared__ int32_t s_counts[kMaxInterRanks][kMaxInterRanks];  // [source][destination]
  __shared__ int32_t s_tokens[kMaxInterRanks];
  if (ok) {
    if (threadIdx.x < R) {
      const auto* h = at<NotifyHeader>(mine, L.meta(parity, threadIdx.x));
      s_tokens[threadIdx.x] = h->num_tokens;
      if (h->num_experts != p.num_experts || h->chunk_tokens != p.chunk || h->num_blocks != ic.num_blocks)
        report_mismatch(w, WaitPhase::kNotifyMeta, threadIdx.x, (static_cast<uint64_t>(p.num_experts) << 32) | p.chunk,
                        (static_cast<uint64_t>(h->num_experts) << 32) | h->chunk_tokens);
    }
    for (int x = threadIdx.x; x < R * R; x += blockDim.x) {
      const int i = x / R, j = x % R;
      s_counts[i][j] = at<int32_t>(mine, L.meta(parity, i) + L.meta_counts)[j];
    }
  }
  __syncthreads();
  if (ok && !aborted(w)) {
    if (threadIdx.x < R) {
      int32_t acc = 0;
      for (int i = 0; i < R; ++i) {
        acc += s_counts[i][threadIdx.x];
        p.rank_prefix_matrix[i * R + threadIdx.x] = acc;
      }
    }
    for (int e = threadIdx.x; e < experts_per_rank; e += blockDim.x) {
      int32_t sum = 0;
      for (int i = 0; i < R; ++i) sum += at<int32_t>(mine, L.meta(parity, i) + L.meta_experts)[e];
      const int32_t aligned = (sum + p.expert_alignment - 1) / p.expert_alignment * p.expert_alignment;
      p.num_recv_tokens_per_expert[e] = aligned;
      p.host_result[kNotifyExpertCounts + e] = aligned;
    }
    // First receive row of each (source, chunk): a warp per source scans the popcounts of its masks.
    const int stride = p.chunk_offset_stride;
    for (int i = warp; i < R; i += num_warps) {
      int32_t base = 0;
      for (int r = 0; r < i; ++r) base += s_counts[r][me.rank];
      const int source_chunks = (s_tokens[i] + p.chunk - 1) / p.chunk;
      const auto* masks = at<uint32_t>(mine, L.meta(parity, i) + L.meta_masks);
      int32_t* row = p.chunk_offset + static_cast<int64_t>(i) * stride;
      for (int c0 = 0; c0 < source_chunks; c0 += 32) {
        const int ci = c0 + lane;
        const int32_t n = ci < source_chunks ? __popc(masks[ci]) : 0;
        int32_t inclusive = n;
#pragma unroll
        for (int d = 1; d < 32; d <<= 1) {
          const int32_t v = __shfl_up_sync(0xffffffffu, inclusive, d);
          if (lane >= d) inclusive += v;
        }
        if (ci < source_chunks) row[ci] = base + inclusive - n;
        base += __shfl_sync(0xffffffffu, inclusive, 31);
      }
      for (int ci = source_chunks + lane; ci < stride; ci += 32) row[ci] = base;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const bool good = ok && !aborted(w);
    int max_tokens = 0;
    int32_t num_recv = 0;
    for (int i = 0; good && i < R; ++i) {
      max_tokens = max(max_tokens, s_tokens[i]);
      num_recv += s_counts[i][me.rank];
    }
    volatile int32_t* result = p.host_result;
    result[kNotifyNumRecv] = num_recv;
    result[kNotifyMaxChunks] = (max_tokens + p.chunk - 1) / p.chunk;
    result[kNotifyInvalidTopk] = *p.invalid_topk;
    *p.invalid_topk = -1;
    __threadfence_system();
    result[kNotifyStatus] = good ? p.host_token : -p.host_token;
    atomicExch(reinterpret_cast<unsigned*>(p.parity_counter), notify_count + 1);
  }
  net.flush();
}

}  // namespace epcomm::dev
