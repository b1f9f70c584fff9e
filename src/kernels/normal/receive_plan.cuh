// The second half of a dispatch's count exchange, shared by the intranode notify (normal/notify.cu)
// and the internode one (internode/notify.cuh), which differ only in how the meta entries travel.
#pragma once

#include "kernels/common/control.hpp"
#include "kernels/common/wait.cuh"
#include "kernels/normal/params.hpp"

namespace epcomm::dev {

// Every source's meta entry of this call is readable at entry(i): a NotifyHeader, then counts [R],
// experts [E/R] and masks [chunks] at the offsets of `layout`. One block;
// `ok` (the same on every thread): every entry arrived. Checks that all ranks agree on the call's
// shape, builds this rank's receive plan (rank_prefix_matrix; per-expert counts rounded up to the
// alignment; chunk_offset: the first receive row of each (source, chunk), then the end row, and
// the source's cut in the last column) and hands the totals to the host, status last.
// kMaxR: the most ranks R may be (its shared arrays; blockDim.x >= R): a node's inside one,
// kMaxInterRanks across nodes. Up to 64 the whole count table is staged in shared memory (16 KB);
// past that (64 KB would not fit) each warp sums its destinations' columns from the entries.
template <int kMaxR = kMaxNvlRanks, class Params, class Entry>
__device__ void build_receive_plan(const Params& p, const WaitContext& w, const MetaEntryLayout& layout, int R,
                                   int rank, int num_blocks, bool ok, uint32_t notify_count, Entry entry) {
  const int lane = lane_id(), warp = warp_id(), num_warps = blockDim.x / 32;
  const int experts_per_rank = p.num_experts / R;
  constexpr bool kTable = kMaxR <= 64;
  __shared__ int32_t s_counts[kTable ? kMaxR : 1][kTable ? kMaxR : 1];  // [source][destination]
  __shared__ int32_t s_mine[kMaxR];                                     // [source]: rows it sends this rank
  __shared__ int32_t s_tokens[kMaxR];
  __shared__ int32_t s_cut[kMaxR];
  const auto count = [&](int i, int j) { return reinterpret_cast<const int32_t*>(entry(i) + layout.counts)[j]; };
  if (ok) {
    // Every rank must agree on the call's shape and rows; a mismatch would corrupt the rings. Across
    // nodes also on num_worst_tokens given or not: it sets the rounds. (This rank's own entry says
    // its own.)
    if (threadIdx.x < R) {
      const auto* h = reinterpret_cast<const NotifyHeader*>(entry(threadIdx.x));
      const auto* own = reinterpret_cast<const NotifyHeader*>(entry(rank));
      s_tokens[threadIdx.x] = h->num_tokens;
      s_cut[threadIdx.x] = max(1, min(h->cut_tokens, h->chunk_tokens));
      if (h->num_experts != p.num_experts || h->chunk_tokens != p.chunk || h->num_blocks != num_blocks ||
          h->worst_tokens != own->worst_tokens)
        report_mismatch(w, WaitPhase::kNotifyMeta, threadIdx.x,
                        notify_mismatch_word(p.num_experts, p.chunk, own->worst_tokens),
                        notify_mismatch_word(h->num_experts, h->chunk_tokens, h->worst_tokens));
      else if (h->row_bytes != own->row_bytes || h->rows_words != own->rows_words)
        report_mismatch(w, WaitPhase::kNotifyMeta, threadIdx.x,
                        notify_rows_mismatch_word(own->row_bytes, own->rows_words),
                        notify_rows_mismatch_word(h->row_bytes, h->rows_words));
    }
    if (threadIdx.x < R) s_mine[threadIdx.x] = count(threadIdx.x, rank);
    if constexpr (kTable) {
      for (int x = threadIdx.x; x < R * R; x += blockDim.x) {
        const int i = x / R, j = x % R;
        s_counts[i][j] = count(i, j);
      }
    }
  }
  __syncthreads();
  if (ok && !aborted(w)) {
    // rank_prefix_matrix[i][j] = sum over i' <= i of counts[i'][j].
    if constexpr (kTable) {
      if (threadIdx.x < R) {
        int32_t acc = 0;
        for (int i = 0; i < R; ++i) {
          acc += s_counts[i][threadIdx.x];
          p.rank_prefix_matrix[i * R + threadIdx.x] = acc;
        }
      }
    } else {
      // A warp per destination column: 32 sources at a time, a warp prefix sum over them.
      for (int j = warp; j < R; j += num_warps) {
        int32_t base = 0;
        for (int i0 = 0; i0 < R; i0 += 32) {
          const int i = i0 + lane;
          const int32_t inclusive = warp_inclusive_sum(i < R ? count(i, j) : 0);
          if (i < R) p.rank_prefix_matrix[i * R + j] = base + inclusive;
          base += __shfl_sync(0xffffffffu, inclusive, 31);
        }
      }
    }
    // Per local expert: received entries, rounded up to the alignment.
    for (int e = threadIdx.x; e < experts_per_rank; e += blockDim.x) {
      int32_t sum = 0;
      for (int i = 0; i < R; ++i) sum += reinterpret_cast<const int32_t*>(entry(i) + layout.experts)[e];
      const int32_t aligned = (sum + p.expert_alignment - 1) / p.expert_alignment * p.expert_alignment;
      p.num_recv_tokens_per_expert[e] = aligned;
      p.host_result[kNotifyExpertCounts + e] = aligned;
    }
    // First receive row of each (source, chunk): a warp per source scans popcounts of its masks.
    const int stride = p.chunk_offset_stride;
    for (int i = warp; i < R; i += num_warps) {
      int32_t base = 0;
      for (int r = 0; r < i; ++r) base += s_mine[r];
      const int source_chunks = (s_tokens[i] + s_cut[i] - 1) / s_cut[i];
      const auto* masks = reinterpret_cast<const uint32_t*>(entry(i) + layout.masks);
      // The scan is a serial chain through `base`: only the source's real chunks go through it
      // (with the next mask word already loaded); the rest of the row is the end offset.
      int32_t* row = p.chunk_offset + static_cast<int64_t>(i) * stride;
      uint32_t next = lane < source_chunks ? masks[lane] : 0u;
      for (int c0 = 0; c0 < source_chunks; c0 += 32) {
        const int ci = c0 + lane;
        const int32_t n = __popc(next);
        next = ci + 32 < source_chunks ? masks[ci + 32] : 0u;
        const int32_t inclusive = warp_inclusive_sum(n);
        if (ci < source_chunks) row[ci] = base + inclusive - n;
        base += __shfl_sync(0xffffffffu, inclusive, 31);
      }
      for (int ci = source_chunks + lane; ci < stride - 1; ci += 32) row[ci] = base;
      if (lane == 0) row[stride - 1] = s_cut[i];
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const bool good = ok && !aborted(w);
    int max_chunks = 0;
    int32_t num_recv = 0;
    for (int i = 0; good && i < R; ++i) {
      max_chunks = max(max_chunks, (s_tokens[i] + s_cut[i] - 1) / s_cut[i]);
      num_recv += s_mine[i];
    }
    volatile int32_t* result = p.host_result;
    result[kNotifyNumRecv] = num_recv;
    result[kNotifyMaxChunks] = max_chunks;
    result[kNotifyInvalidTopk] = *p.invalid_topk;
    *p.invalid_topk = -1;
    __threadfence_system();
    result[kNotifyStatus] = good ? p.host_token : -p.host_token;
    atomicExch(reinterpret_cast<unsigned*>(p.parity_counter), notify_count + 1);
  }
}

// num_worst_tokens: receive rows past the plan's row count (the end row of the last source, the
// column before its cut in chunk_offset) get topk -1 and weight 0, the whole grid striding over
// [num_recv * K, num_worst_tokens * K). A count outside [0, num_worst_tokens] is reported (the host
// names it) and never used as an index. Shared by the intranode and internode dispatch kernels.
__device__ __forceinline__ void pad_worst_topk(const WaitContext& w, int rank, const int32_t* chunk_offset, int stride,
                                               int num_ranks, int num_worst_tokens, int K, int64_t* recv_topk_idx,
                                               float* recv_topk_weights) {
  const int num_recv = chunk_offset[static_cast<int64_t>(num_ranks - 1) * stride + stride - 2];
  const bool sane = num_recv >= 0 && num_recv <= num_worst_tokens;
  if (!sane && blockIdx.x == 0 && threadIdx.x == 0)
    report(w, DeviceError::kBadArgument, WaitPhase::kNone, rank, static_cast<uint64_t>(num_worst_tokens),
           static_cast<uint64_t>(static_cast<uint32_t>(num_recv)));
  const int64_t begin = sane ? static_cast<int64_t>(num_recv) * K : 0;
  const int64_t end = sane ? static_cast<int64_t>(num_worst_tokens) * K : 0;
  for (int64_t e = begin + blockIdx.x * blockDim.x + threadIdx.x; e < end; e += gridDim.x * blockDim.x) {
    if (recv_topk_idx) recv_topk_idx[e] = -1;
    if (recv_topk_weights) recv_topk_weights[e] = 0.f;
  }
}

}  // namespace epcomm::dev
