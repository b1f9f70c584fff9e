// Dynamic shared memory of the LL dispatch kernels: the send half's arrays (both paths), the
// per-rank path's token metadata and receive-half ints (the network path's static part is
// NetSendSmem, dispatch_per_expert.cuh). The offsets are __host__ __device__: the host sizes each
// launch with them (low_latency_dispatch_*_shared_bytes, dispatch.cu).
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/common/control.hpp"
#include "kernels/low_latency/params.hpp"

namespace epcomm::dev {

// Shared memory of the send half: [hist: E][owned: ceil(E / grid)][slots: 2 x 16][experts: 2 x 16]
// then the staging areas (16-byte aligned), one message each.
struct SendSmem {
  int32_t* hist;     // rows of each expert before the current token (then a running slot counter)
  int32_t* owned;    // rows of expert blockIdx.x + i * gridDim.x, for its count flag
  int32_t* slots;    // [2][kMaxTopk]: slot of (token, k), -1 when k selects nothing
  int32_t* experts;  // [2][kMaxTopk]: expert of (token, k), -1 when none
  uint8_t* staging;  // [staging_buffers][msg_bytes]
};

__host__ __device__ inline size_t send_smem_ints(int num_experts, int num_blocks) {
  return static_cast<size_t>(num_experts) + (num_experts + num_blocks - 1) / num_blocks + 4 * kMaxTopk;
}

// Per-rank path: one token's destinations, in shared memory. Three sets rotate: set it % 3 is
// written by thread 0 before token it's barrier, read by the copies after it and by the flag
// releases after token it + 1's barrier, so it is rewritten only after token it + 2's barrier.
struct RankMeta {
  uint32_t entries[kMaxTopk][kMaxTopk];  // per destination: le | slot << 16 | k << 28 (16-byte rows)
  int32_t dest[kMaxTopk];                // destination rank
  int32_t dslot[kMaxTopk];               // staging slot there (tokens before this one to that rank)
  int32_t nent[kMaxTopk];                // entries
  int32_t ndest;
  int32_t token;
  int32_t pad[2];
};
static_assert(sizeof(RankMeta) % 16 == 0, "RankMeta rows are copied as 16-byte vectors");

// Per-rank send's extra shared memory after the per-expert path's ints: [rank_hist: R][rank_total: R]
// (16-byte aligned), then three RankMeta sets, then each token's destination-rank mask
// [max_tokens] (16-byte aligned), then the staging areas.
__host__ __device__ inline size_t rank_meta_offset(int num_experts, int num_blocks, int num_ranks) {
  return align_up(sizeof(int32_t) * (send_smem_ints(num_experts, num_blocks) + 2 * static_cast<size_t>(num_ranks)), 16);
}
__host__ __device__ inline size_t per_rank_staging_offset(const LowLatencyLayout& L, int num_blocks) {
  return rank_meta_offset(L.num_experts, num_blocks, L.num_ranks) + 3 * sizeof(RankMeta) +
         align_up(sizeof(uint32_t) * static_cast<size_t>(L.max_tokens), 16);
}
// A launch with both halves puts the receive half's ints past the send half's shared memory.
__host__ __device__ inline size_t per_rank_recv_offset(const LowLatencyLayout& L, int num_blocks, int staging_buffers) {
  return align_up(per_rank_staging_offset(L, num_blocks) + static_cast<size_t>(staging_buffers) * L.msg_bytes, 16);
}

// The send half's arrays at the start of the dynamic shared memory (SendSmem's layout), and the
// per-expert path's staging after them (the per-rank path puts its RankMeta sets in between and
// moves staging past them).
__device__ __forceinline__ SendSmem carve_send_smem(const LowLatencyLayout& L, uint8_t* smem) {
  const int grid = static_cast<int>(gridDim.x);
  int32_t* ints = reinterpret_cast<int32_t*>(smem);
  SendSmem sm;
  sm.hist = ints;
  sm.owned = ints + L.num_experts;
  sm.slots = sm.owned + (L.num_experts + grid - 1) / grid;
  sm.experts = sm.slots + 2 * kMaxTopk;
  sm.staging = smem + align_up(sizeof(int32_t) * send_smem_ints(L.num_experts, grid), 16);
  return sm;
}

// Per-rank receive's shared memory: [cnt: E][begin: E][rtot: R][ipre: R + 1][abort: 1][dead: R].
__host__ __device__ inline size_t recv_smem_ints(int num_experts, int num_ranks) {
  return 2 * static_cast<size_t>(num_experts) + 3 * static_cast<size_t>(num_ranks) + 2;
}

}  // namespace epcomm::dev
