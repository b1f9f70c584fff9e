// Normal-mode combine over NVLink, as a push (see params.hpp for the scheme).
//
// Per block: pusher warps copy (chunk, origin) segments taken from a block-wide counter: the rows of
// an origin's chunk (contiguous in x and in the origin's slot) with bulk copies through shared
// memory, plus their topk weights;
// reducer warps wait for the senders of this rank's chunk, then sum each token's rows in float32
// (ascending sender rank, then bias0, then bias1) and release the slot.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "core/call_check.hpp"
#include "kernels/common/bulk_copy.cuh"
#include "kernels/common/launch.hpp"
#include "kernels/common/sequence.cuh"
#include "kernels/common/vec.cuh"
#include "kernels/normal/params.hpp"
#include "kernels/normal/segments.cuh"

namespace epcomm {
namespace {

using namespace epcomm::dev;

constexpr int kMaxPusherWarps = 4;
constexpr int kMaxReducerWarps = 12;
constexpr int kMaxPusherBufs = 8;
constexpr int kMaxSlots = 16;
constexpr int kReducerBarrier = 1;  // named barriers (0 is __syncthreads)
constexpr int kPusherBarrier = 2;

struct CombineShared {
  uint64_t pusher_bars[kMaxPusherWarps][kMaxPusherBufs];
  int32_t next_segment;            // the pushers' work counter: segment i = (chunk i / R, origin i % R)
  int32_t released[kMaxNvlRanks];  // per origin: the last chunk whose rows this rank released (-1: none)
  const int4* sources[kMaxReducerWarps][kMaxNvlRanks];  // a token's rows in the slot, by sender
  int32_t positions[kMaxReducerWarps][kMaxNvlRanks];
};

__device__ __forceinline__ uint64_t* flag_at(const CommonParams& c, int owner, size_t base, int peer, int block) {
  return reinterpret_cast<uint64_t*>(c.peer_base[owner] + c.ctl.flag(base, peer, block));
}

// The rows this rank sends `origin`: that origin's row of chunk_offset.
__device__ __forceinline__ const int32_t* origin_offsets(const CombineParams& p, int origin) {
  return p.chunk_offset + static_cast<int64_t>(origin) * p.chunk_offset_stride;
}

// A segment whose stores are issued but not yet released to its origin.
struct PendingSegment {
  int origin = -1;
  int n = -1;
};

// Lane 0 of a pusher warp: once the segment's stores are complete (the caller waited for them),
// tells the origin, after the origin's previous segment.
__device__ __forceinline__ bool release_segment(const CombineParams& p, uint32_t seq, CombineShared& sh,
                                                const PendingSegment& seg) {
  const CommonParams& c = p.common;
  fence_proxy_async_global();
  __threadfence_system();
  return flag_in_chunk_order(c.wait, &sh.released[seg.origin],
                             previous_segment(origin_offsets(p, seg.origin), seg.n, 1, p.num_blocks), seg.n,
                             flag_at(c, seg.origin, c.ctl.combine_ready, c.rank, blockIdx.x), tag(seq, seg.n + 1),
                             WaitPhase::kCombineSlotFree, seg.origin);
}

// Pusher warps take the block's (chunk, origin) segments from a shared counter, chunk by chunk, so
// the block's bytes spread evenly over its warps whatever each origin's share (a warp per origin
// waited for the largest share; run 55). A warp does not drain its stores at the end of a segment:
// it releases the segment after issuing the next one's first stores, or before a wait that could
// block, so its copies stay in flight across segments.
__device__ void run_pusher(const CombineParams& p, uint32_t seq, CombineShared& sh, uint8_t* bufs, int pw) {
  const CommonParams& c = p.common;
  const int R = c.num_ranks, rank = c.rank, lane = lane_id(), block = blockIdx.x;
  const int S = p.ring.slots, K = p.num_topk;
  const size_t row_bytes = static_cast<size_t>(p.hidden) * 2;
  const int num_n = block_iterations(p.max_chunks, p.num_blocks);
  BulkPipe pipe{bufs, sh.pusher_bars[pw], p.pusher_stages, p.piece_bytes, 0};
  PendingSegment pending;  // lane 0's

  bool ok = true;
  while (ok) {
    const int i = take_segment(&sh.next_segment);
    if (i >= num_n * R) break;
    const int n = i / R, origin = (rank + 1 + i % R) % R;
    const int32_t* offsets = origin_offsets(p, origin);
    const int rows = segment_rows(offsets, n, p.num_blocks);
    if (rows == 0) continue;
    const int row_begin = offsets[block + n * p.num_blocks];
    uint8_t* slot = reinterpret_cast<uint8_t*>(c.peer_base[origin]) + p.ring.slot(block, n % S);
    if (lane == 0) {
      // The origin must have reduced what this rank last wrote into the slot. If that is not yet so,
      // release the pending segment first (the origin may be waiting for it) and wait.
      const int last = previous_segment(offsets, n, S, p.num_blocks);
      if (last >= 0) {
        const uint64_t* ack = flag_at(c, rank, c.ctl.combine_ack, origin, block);
        if (ld_acquire_sys(ack) < tag(seq, last + 1)) {
          if (pending.n >= 0) {
            bulk_wait_all();
            ok = release_segment(p, seq, sh, pending);
            pending = PendingSegment{};
          }
          ok = ok && wait_flag_geq(c.wait, ack, tag(seq, last + 1), WaitPhase::kCombineSlotFree, origin);
        }
      }
    }
    // Every lane writes into the slot (the weights): none may before lane 0 found it free.
    ok = __shfl_sync(0xffffffffu, ok, 0);
    if (!ok) break;
    if (lane == 0) {
      fence_proxy_async_global();
      ok = bulk_copy(c.wait, pipe, slot + static_cast<size_t>(rank) * p.chunk * row_bytes,
                     reinterpret_cast<const uint8_t*>(p.x) + static_cast<size_t>(row_begin) * row_bytes,
                     static_cast<size_t>(rows) * row_bytes, WaitPhase::kCombineSlotFree, origin, [&](int issued) {
                       // The previous segment's stores are older than these `issued` ones.
                       if (pending.n < 0) return true;
                       if (issued >= 2) bulk_wait<2>();
                       else bulk_wait<1>();
                       const bool released = release_segment(p, seq, sh, pending);
                       pending = PendingSegment{};
                       return released;
                     });
    }
    if (K > 0) {
      float* w = reinterpret_cast<float*>(slot + p.ring.weights_offset) + static_cast<size_t>(rank) * p.chunk * K;
      for (int e = lane; e < rows * K; e += 32) w[e] = p.topk_weights[static_cast<int64_t>(row_begin) * K + e];
      __threadfence_system();
    }
    __syncwarp();
    if (lane == 0) pending = PendingSegment{origin, n};
    ok = __shfl_sync(0xffffffffu, ok, 0);
  }
  if (ok && lane == 0 && pending.n >= 0) {
    bulk_wait_all();
    ok = release_segment(p, seq, sh, pending);
  }
  ok = __shfl_sync(0xffffffffu, ok, 0);
  // Leave only when every origin has reduced this rank's rows: the next call may overwrite them.
  if (barrier_all<kPusherBarrier>(ok, 32 * p.pusher_warps) && pw == 0 && lane < R) {
    const int last = sh.released[lane];
    if (last >= 0)
      wait_flag_geq(c.wait, flag_at(c, rank, c.ctl.combine_ack, lane, block), tag(seq, last + 1),
                    WaitPhase::kCombineSlotFree, lane);
  }
  if (lane == 0) bulk_wait_all();
}

__device__ void run_reducer(const CombineParams& p, uint32_t seq, int rw, CombineShared& sh) {
  const CommonParams& c = p.common;
  const int R = c.num_ranks, rank = c.rank, lane = lane_id(), block = blockIdx.x;
  const int S = p.ring.slots, K = p.num_topk;
  const int num_threads = 32 * p.reducer_warps;
  const int cut = cut_of(p.chunk_offset, p.chunk_offset_stride, rank);  // this rank's tokens per chunk
  const int num_chunks = (p.num_tokens + cut - 1) / cut;
  const int vecs = p.hidden / 8;
  const size_t row_bytes = static_cast<size_t>(p.hidden) * 2;

  for (int n = 0;; ++n) {
    const int chunk = block + n * p.num_blocks;
    if (chunk >= num_chunks) break;
    const int t0 = chunk * cut;
    const int rows = min(cut, p.num_tokens - t0);
    uint32_t dests = 0;
    if (lane < rows)
      for (int j = 0; j < R; ++j)
        dests |= static_cast<uint32_t>(p.is_token_in_rank[static_cast<int64_t>(t0 + lane) * R + j] != 0) << j;
    const uint32_t needed = __reduce_or_sync(0xffffffffu, dests);
    // Lane j of every reducer warp waits for sender j; all warps then agree before reading.
    bool ok = true;
    if (lane < R && ((needed >> lane) & 1u))
      ok = wait_flag_geq(c.wait, flag_at(c, rank, c.ctl.combine_ready, lane, block), tag(seq, n + 1),
                         WaitPhase::kCombineReady, lane);
    ok = __all_sync(0xffffffffu, ok);
    if (!barrier_all<kReducerBarrier>(ok, num_threads)) break;

    // Lane j keeps the chunk's mask of tokens that went to rank j (its rows are packed in order).
    uint32_t my_mask = 0;
    for (int j = 0; j < R; ++j) {
      const uint32_t m = __ballot_sync(0xffffffffu, (dests >> j) & 1u);
      if (lane == j) my_mask = m;
    }
    const uint8_t* slot = reinterpret_cast<const uint8_t*>(c.peer_base[rank]) + p.ring.slot(block, n % S);
    for (int tl = rw; tl < rows; tl += p.reducer_warps) {
      const uint32_t token_dests = __shfl_sync(0xffffffffu, dests, tl);
      const int num_sources = __popc(token_dests);
      // Rows of this token, in ascending sender order.
      if (lane < R && ((token_dests >> lane) & 1u)) {
        const int idx = __popc(token_dests & ((1u << lane) - 1u));
        const int pos = __popc(my_mask & ((1u << tl) - 1u));
        sh.sources[rw][idx] =
            reinterpret_cast<const int4*>(slot + (static_cast<size_t>(lane) * p.chunk + pos) * row_bytes);
        sh.positions[rw][idx] = lane * p.chunk + pos;
      }
      __syncwarp();
      const int64_t t = t0 + tl;
      const int4* b0 = p.bias0 ? reinterpret_cast<const int4*>(p.bias0 + t * p.hidden) : nullptr;
      const int4* b1 = p.bias1 ? reinterpret_cast<const int4*>(p.bias1 + t * p.hidden) : nullptr;
      int4* out = reinterpret_cast<int4*>(p.out + t * p.hidden);
      // Four 16-byte columns per lane, two senders at a time: up to eight loads in flight per lane.
      constexpr int kUnroll = 4;
      for (int v0 = lane; v0 < vecs; v0 += 32 * kUnroll) {
        float acc[kUnroll][8];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[u][i] = 0.f;
        int sidx = 0;
        for (; sidx + 1 < num_sources; sidx += 2) {
          const int4* a = sh.sources[rw][sidx];
          const int4* b = sh.sources[rw][sidx + 1];
          int4 va[kUnroll], vb[kUnroll];
#pragma unroll
          for (int u = 0; u < kUnroll; ++u)
            if (v0 + 32 * u < vecs) {
              va[u] = ld_cg(a + v0 + 32 * u);
              vb[u] = ld_cg(b + v0 + 32 * u);
            }
#pragma unroll
          for (int u = 0; u < kUnroll; ++u)
            if (v0 + 32 * u < vecs) {
              add_bf16x8(acc[u], va[u]);  // ascending sender order, as the reference sums
              add_bf16x8(acc[u], vb[u]);
            }
        }
        if (sidx < num_sources) {
          const int4* a = sh.sources[rw][sidx];
          int4 va[kUnroll];
#pragma unroll
          for (int u = 0; u < kUnroll; ++u)
            if (v0 + 32 * u < vecs) va[u] = ld_cg(a + v0 + 32 * u);
#pragma unroll
          for (int u = 0; u < kUnroll; ++u)
            if (v0 + 32 * u < vecs) add_bf16x8(acc[u], va[u]);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int v = v0 + 32 * u;
          if (v >= vecs) continue;
          if (b0) add_bf16x8(acc[u], b0[v]);
          if (b1) add_bf16x8(acc[u], b1[v]);
          out[v] = to_bf16x8(acc[u]);
        }
      }
      if (K > 0 && lane < K) {
        const float* w = reinterpret_cast<const float*>(slot + p.ring.weights_offset);
        float sum = 0.f;
        for (int sidx = 0; sidx < num_sources; ++sidx)
          sum = __fadd_rn(sum, __ldcg(w + static_cast<size_t>(sh.positions[rw][sidx]) * K + lane));
        p.out_topk_weights[t * K + lane] = sum;
      }
      __syncwarp();
    }
    // All reducer warps are done with the slot: release it to its senders.
    barrier_all<kReducerBarrier>(true, num_threads);
    if (rw == 0 && lane < R && ((needed >> lane) & 1u)) {
      __threadfence_system();
      st_release_sys(flag_at(c, lane, c.ctl.combine_ack, rank, block), tag(seq, n + 1));
    }
  }
}

__global__ void __launch_bounds__(32 * (kMaxPusherWarps + kMaxReducerWarps), 1)
    combine_kernel(const __grid_constant__ CombineParams p) {
  extern __shared__ __align__(128) uint8_t smem[];
  auto& sh = *reinterpret_cast<CombineShared*>(smem);
  const CommonParams& c = p.common;
  const uint32_t seq = call_sequence(c);
  if (!call_number_left(c.wait, seq)) return;
  const int warp = warp_id();
  if (threadIdx.x == 0) {
    for (int w = 0; w < p.pusher_warps; ++w)
      for (int b = 0; b < p.pusher_stages; ++b) mbar_init(&sh.pusher_bars[w][b], 1);
    fence_mbar_init();
  }
  if (threadIdx.x == 0) sh.next_segment = 0;
  for (int i = threadIdx.x; i < kMaxNvlRanks; i += blockDim.x) sh.released[i] = -1;
  __syncthreads();

  uint8_t* dyn = smem + align_up(sizeof(CombineShared), 128);
  if (warp < p.pusher_warps) {
    run_pusher(p, seq, sh, dyn + static_cast<size_t>(warp) * p.pusher_stages * p.piece_bytes, warp);
  } else if (warp - p.pusher_warps < p.reducer_warps) {
    run_reducer(p, seq, warp - p.pusher_warps, sh);
  }
  finish_call(c, seq);
}

const KernelRegistration kKernels{reinterpret_cast<const void*>(combine_kernel)};

}  // namespace

int combine_shared_bytes(int pusher_warps, int pusher_stages, int piece_bytes) {
  return static_cast<int>(align_up(sizeof(CombineShared), 128) +
                          static_cast<size_t>(pusher_warps) * pusher_stages * piece_bytes);
}
int combine_max_pusher_warps() { return kMaxPusherWarps; }
int combine_max_reducer_warps() { return kMaxReducerWarps; }
int combine_max_pusher_bufs() { return kMaxPusherBufs; }
int combine_max_slots() { return kMaxSlots; }

void launch_combine(const CombineParams& p, int smem_bytes, void* stream) {
  allow_dynamic_smem(reinterpret_cast<const void*>(combine_kernel), smem_bytes);
  combine_kernel<<<p.num_blocks, 32 * (p.pusher_warps + p.reducer_warps), smem_bytes,
                   static_cast<cudaStream_t>(stream)>>>(p);
  EPCOMM_LAUNCH_CHECK("combine_kernel");
}

}  // namespace epcomm
