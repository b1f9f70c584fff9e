// Dispatch prologue: every rank tells every other rank how many tokens it sends, to which local
// experts, and which tokens of each chunk (a 32-bit mask per chunk); then each rank builds its
// receive plan: rank_prefix_matrix, the first receive row of every (source, chunk), and the
// per-expert counts, and hands the totals to the host through mapped memory.
//
// One block. Meta entries are double-buffered by the parity of the notify count: a rank can only
// write parity p again after every rank has finished reading it (it must first pass the next
// notify, which waits for everybody's meta).
#include <cuda_runtime.h>

#include "core/check.hpp"
#include "kernels/common/sequence.cuh"
#include "kernels/common/wait.cuh"
#include "kernels/normal/params.hpp"

namespace epcomm {
namespace {

using namespace epcomm::dev;

constexpr int kNotifyThreads = 1024;

__global__ void __launch_bounds__(kNotifyThreads, 1) notify_dispatch_kernel(const __grid_constant__ NotifyParams p) {
  const CommonParams& c = p.common;
  const int R = c.num_ranks;
  const int rank = c.rank;
  const int lane = lane_id();
  const int warp = warp_id();
  const int num_warps = blockDim.x / 32;
  const uint32_t seq = call_sequence(c);
  const uint32_t notify_count = ld_volatile(p.parity_counter);
  const int parity = static_cast<int>(notify_count & 1);
  const int experts_per_rank = p.num_experts / R;
  const int num_chunks = (p.num_tokens + p.cut - 1) / p.cut;
  char* const local = c.peer_base[rank];

  // 1. Write my meta into every peer's entry [parity][rank].
  for (int j = 0; j < R; ++j) {
    char* meta = c.peer_base[j] + c.ctl.meta(parity, rank);
    if (threadIdx.x == 0) {
      NotifyHeader h{p.num_tokens, p.num_experts, p.chunk, p.num_blocks, p.cut};
      *reinterpret_cast<NotifyHeader*>(meta) = h;
    }
    int32_t* counts = reinterpret_cast<int32_t*>(meta + c.ctl.meta_counts);
    for (int r = threadIdx.x; r < R; r += blockDim.x) counts[r] = p.num_tokens_per_rank[r];
    int32_t* experts = reinterpret_cast<int32_t*>(meta + c.ctl.meta_experts);
    for (int e = threadIdx.x; e < experts_per_rank; e += blockDim.x)
      experts[e] = p.num_tokens_per_expert[j * experts_per_rank + e];
  }
  // Masks: a warp per chunk, a lane per token; lane j ends up holding the mask for destination j.
  for (int chunk = warp; chunk < num_chunks; chunk += num_warps) {
    const int t = chunk * p.cut + lane;
    const bool valid = lane < p.cut && t < p.num_tokens;
    uint32_t mine = 0;
    for (int j = 0; j < R; ++j) {
      const uint32_t m = __ballot_sync(0xffffffffu, valid && p.is_token_in_rank[static_cast<int64_t>(t) * R + j]);
      if (lane == j) mine = m;
    }
    if (lane < R) {
      auto* masks = reinterpret_cast<uint32_t*>(c.peer_base[lane] + c.ctl.meta(parity, rank) + c.ctl.meta_masks);
      masks[chunk] = mine;
    }
  }
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x < R)
    st_release_sys(reinterpret_cast<uint64_t*>(c.peer_base[threadIdx.x] + c.ctl.notify_flags) + rank, tag(seq, 1));

  // 2. Wait for every source's meta.
  __shared__ int ok_all;
  if (threadIdx.x == 0) ok_all = 1;
  __syncthreads();
  if (threadIdx.x < R) {
    const auto* flag = reinterpret_cast<const uint64_t*>(local + c.ctl.notify_flags) + threadIdx.x;
    if (!wait_flag_geq(c.wait, flag, tag(seq, 1), WaitPhase::kNotifyMeta, threadIdx.x)) ok_all = 0;
  }
  __syncthreads();

  __shared__ int32_t s_counts[kMaxNvlRanks][kMaxNvlRanks];  // [source][destination]
  __shared__ int32_t s_tokens[kMaxNvlRanks];
  __shared__ int32_t s_cut[kMaxNvlRanks];
  if (ok_all) {
    // Every rank must agree on the call's shape; a mismatch would corrupt the rings.
    if (threadIdx.x < R) {
      const auto* h = reinterpret_cast<const NotifyHeader*>(local + c.ctl.meta(parity, threadIdx.x));
      s_tokens[threadIdx.x] = h->num_tokens;
      s_cut[threadIdx.x] = max(1, min(h->cut_tokens, h->chunk_tokens));
      if (h->num_experts != p.num_experts || h->chunk_tokens != p.chunk || h->num_blocks != p.num_blocks)
        report_mismatch(c.wait, WaitPhase::kNotifyMeta, threadIdx.x,
                        (static_cast<uint64_t>(p.num_experts) << 32) | p.chunk,
                        (static_cast<uint64_t>(h->num_experts) << 32) | h->chunk_tokens);
    }
    for (int x = threadIdx.x; x < R * R; x += blockDim.x) {
      const int i = x / R, j = x % R;
      s_counts[i][j] = reinterpret_cast<const int32_t*>(local + c.ctl.meta(parity, i) + c.ctl.meta_counts)[j];
    }
  }
  __syncthreads();
  if (ok_all && !aborted(c.wait)) {
    // 3. rank_prefix_matrix[i][j] = sum over i' <= i of counts[i'][j].
    if (threadIdx.x < R) {
      int32_t acc = 0;
      for (int i = 0; i < R; ++i) {
        acc += s_counts[i][threadIdx.x];
        p.rank_prefix_matrix[i * R + threadIdx.x] = acc;
      }
    }
    // 4. Per local expert: received entries, rounded up to the alignment.
    for (int e = threadIdx.x; e < experts_per_rank; e += blockDim.x) {
      int32_t sum = 0;
      for (int i = 0; i < R; ++i)
        sum += reinterpret_cast<const int32_t*>(local + c.ctl.meta(parity, i) + c.ctl.meta_experts)[e];
      const int32_t aligned = (sum + p.expert_alignment - 1) / p.expert_alignment * p.expert_alignment;
      p.num_recv_tokens_per_expert[e] = aligned;
      p.host_result[kNotifyExpertCounts + e] = aligned;
    }
    // 5. First receive row of each (source, chunk): a warp per source scans popcounts of its masks.
    const int stride = p.chunk_offset_stride;
    for (int i = warp; i < R; i += num_warps) {
      int32_t base = 0;
      for (int r = 0; r < i; ++r) base += s_counts[r][rank];
      const int source_chunks = (s_tokens[i] + s_cut[i] - 1) / s_cut[i];
      const auto* masks = reinterpret_cast<const uint32_t*>(local + c.ctl.meta(parity, i) + c.ctl.meta_masks);
      // The scan is a serial chain through `base`: only the source's real chunks go through it
      // (with the next mask word already loaded); the rest of the row is the end offset.
      int32_t* row = p.chunk_offset + static_cast<int64_t>(i) * stride;
      uint32_t next = lane < source_chunks ? masks[lane] : 0u;
      for (int c0 = 0; c0 < source_chunks; c0 += 32) {
        const int ci = c0 + lane;
        const int32_t n = __popc(next);
        next = ci + 32 < source_chunks ? masks[ci + 32] : 0u;
        int32_t inclusive = n;
#pragma unroll
        for (int d = 1; d < 32; d <<= 1) {
          const int32_t v = __shfl_up_sync(0xffffffffu, inclusive, d);
          if (lane >= d) inclusive += v;
        }
        if (ci < source_chunks) row[ci] = base + inclusive - n;
        base += __shfl_sync(0xffffffffu, inclusive, 31);
      }
      for (int ci = source_chunks + lane; ci < stride - 1; ci += 32) row[ci] = base;
      if (lane == 0) row[stride - 1] = s_cut[i];
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const bool ok = ok_all && !aborted(c.wait);
    int max_chunks = 0;
    for (int i = 0; ok && i < R; ++i) max_chunks = max(max_chunks, (s_tokens[i] + s_cut[i] - 1) / s_cut[i]);
    int32_t num_recv = 0;
    for (int i = 0; ok && i < R; ++i) num_recv += s_counts[i][rank];
    volatile int32_t* result = p.host_result;
    result[kNotifyNumRecv] = num_recv;
    result[kNotifyMaxChunks] = max_chunks;
    result[kNotifyInvalidTopk] = *p.invalid_topk;
    *p.invalid_topk = -1;
    __threadfence_system();
    result[kNotifyStatus] = ok ? p.host_token : -p.host_token;
    atomicExch(reinterpret_cast<unsigned*>(p.parity_counter), notify_count + 1);
  }
  finish_call(c, seq);
}

}  // namespace

void launch_notify_dispatch(const NotifyParams& p, void* stream) {
  notify_dispatch_kernel<<<1, kNotifyThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  EPCOMM_LAUNCH_CHECK("notify_dispatch_kernel");
}

}  // namespace epcomm
