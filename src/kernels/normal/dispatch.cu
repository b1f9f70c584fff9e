// Normal-mode dispatch over NVLink, as a pull (see params.hpp for the scheme).
//
// Per block: warps 0-1 stage this rank's chunks into its ring (warp 0: bulk copies of x; warp 1:
// the small per-token fields) and tell the receivers; warps 2.. pull (chunk, source) segments taken
// from a block-wide counter: one bulk load per needed row from the source's slot (over NVLink) into
// shared memory, one bulk store from there into recv_x, lanes for scales / topk / source index.
#include <cuda_runtime.h>

#include "core/call_check.hpp"
#include "kernels/common/bulk_copy.cuh"
#include "kernels/common/launch.hpp"
#include "kernels/common/sequence.cuh"
#include "kernels/normal/params.hpp"
#include "kernels/normal/receive_plan.cuh"
#include "kernels/normal/segments.cuh"

namespace epcomm {
namespace {

using namespace epcomm::dev;

constexpr int kMaxPullerWarps = 8;
constexpr int kStagerBufs = 3;
constexpr int kMaxSlots = 16;

struct DispatchShared {
  uint64_t stager_bars[kStagerBufs];
  uint64_t puller_bars[kMaxPullerWarps][kMaxSlots + 1];  // [stages..., meta]
  uint32_t slot_needed[kMaxSlots];                       // destinations that need each ring slot's current chunk
  int32_t last_needed[kMaxNvlRanks];                     // last iteration each destination needed
  int32_t next_segment;         // the pullers' work counter: segment i = (chunk i / R, source i % R)
  int32_t acked[kMaxNvlRanks];  // per source: the last chunk whose rows this rank acknowledged (-1: none)
};

__device__ __forceinline__ uint64_t* flag_at(const CommonParams& c, int owner, size_t base, int peer, int block) {
  return reinterpret_cast<uint64_t*>(c.peer_base[owner] + c.ctl.flag(base, peer, block));
}

// Named barrier of the two stager warps (0 is __syncthreads).
constexpr int kStagerBarrier = 1;

// Warp 0 copies the chunk's x rows into the slot (bulk copies) and signals the receivers; warp 1
// meanwhile writes the per-token fields (scales, topk), coalesced whichever the scales' layout.
__device__ void run_stager(const DispatchParams& p, uint32_t seq, bool is_copier, DispatchShared& sh, uint8_t* bufs) {
  const CommonParams& c = p.common;
  const int R = c.num_ranks, rank = c.rank, lane = lane_id(), block = blockIdx.x;
  const int S = p.ring.slots;
  const int cut = cut_of(p.chunk_offset, p.chunk_offset_stride, rank);
  const int num_chunks = (p.num_tokens + cut - 1) / cut;
  BulkPipe pipe{bufs, sh.stager_bars, kStagerBufs, p.stager_piece_bytes, 0};
  if (is_copier && lane < R) sh.last_needed[lane] = -1;

  bool ok = true;
  for (int n = 0; ok; ++n) {
    const int chunk = block + n * p.num_blocks;
    if (chunk >= num_chunks) break;
    const int s = n % S;
    const int t0 = chunk * cut;
    const int rows = min(cut, p.num_tokens - t0);
    uint8_t* slot = reinterpret_cast<uint8_t*>(c.peer_base[rank]) + p.ring.slot(block, s);

    uint32_t needed = 0;
    if (is_copier) {
      uint32_t dests = 0;
      if (lane < rows)
        for (int j = 0; j < R; ++j)
          dests |= static_cast<uint32_t>(p.is_token_in_rank[static_cast<int64_t>(t0 + lane) * R + j] != 0) << j;
      needed = __reduce_or_sync(0xffffffffu, dests);
      // The slot held iteration n - S: wait until every receiver of that chunk let go of it.
      if (n >= S && lane == 0) {
        const uint32_t prev = sh.slot_needed[s];
        for (int j = 0; j < R && ok; ++j)
          if ((prev >> j) & 1u)
            ok = wait_flag_geq(c.wait, flag_at(c, rank, c.ctl.dispatch_ack, j, block), tag(seq, n - S + 1),
                               WaitPhase::kDispatchSlotFree, j);
      }
      ok = __shfl_sync(0xffffffffu, ok, 0);
    }
    if (!barrier_all<kStagerBarrier>(ok, 64)) break;
    fence_proxy_async_global();

    if (is_copier) {
      if (lane == 0) sh.slot_needed[s] = needed;
      if (lane < R && ((needed >> lane) & 1u)) sh.last_needed[lane] = n;
      if (lane == 0) {
        ok = bulk_copy(c.wait, pipe, slot, p.x + static_cast<size_t>(t0) * p.row_bytes,
                       static_cast<size_t>(rows) * p.row_bytes, WaitPhase::kDispatchSlotFree, rank);
        bulk_wait_all();
        fence_proxy_async_global();
        __threadfence_system();
      }
      ok = __shfl_sync(0xffffffffu, ok, 0);
    } else if (p.ring.meta_row_bytes > 0) {
      // Meta rows: [scale words][topk idx i32][topk weights f32] per token, written so that
      // consecutive lanes load consecutive addresses whichever the scales' layout (token-major
      // [G][T] as DeepEP's kernels take it, or row-major [T][G] as Python callers pass it).
      const int G = p.num_scales, K = p.num_topk;
      uint8_t* meta = slot + p.ring.meta_offset;
      const auto field = [&](int r, int f) -> uint32_t& {
        return reinterpret_cast<uint32_t*>(meta + static_cast<size_t>(r) * p.ring.meta_row_bytes)[f];
      };
      if (p.scale_stride_token == 1) {
        // Token-major scales: a lane per token (rows <= 32), eight groups in flight.
        for (int f0 = 0; lane < rows && f0 < G; f0 += 8) {
          uint32_t v[8];
#pragma unroll
          for (int u = 0; u < 8; ++u)
            v[u] = f0 + u < G ? p.x_scales[t0 + lane + static_cast<int64_t>(f0 + u) * p.scale_stride_group] : 0u;
#pragma unroll
          for (int u = 0; u < 8; ++u)
            if (f0 + u < G) field(lane, f0 + u) = v[u];
        }
      } else {
        // Row-major (or other) scales: the warp walks (token, group) pairs, four loads in flight.
        for (int i0 = lane; i0 < rows * G; i0 += 4 * 32) {
          uint32_t v[4];
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int i = i0 + u * 32;
            v[u] = i < rows * G ? p.x_scales[static_cast<int64_t>(t0 + i / G) * p.scale_stride_token +
                                             static_cast<int64_t>(i % G) * p.scale_stride_group]
                                : 0u;
          }
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int i = i0 + u * 32;
            if (i < rows * G) field(i / G, i % G) = v[u];
          }
        }
      }
      for (int i0 = lane; i0 < rows * K; i0 += 2 * 32) {
        uint32_t idx[2], wt[2];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const int i = i0 + u * 32;
          const int64_t e = static_cast<int64_t>(t0) * K + i;  // token t0 + i / K, slot i % K
          idx[u] = i < rows * K ? static_cast<uint32_t>(static_cast<int32_t>(p.topk_idx[e])) : 0u;
          wt[u] = i < rows * K && p.topk_weights ? __float_as_uint(p.topk_weights[e]) : 0u;
        }
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const int i = i0 + u * 32;
          if (i >= rows * K) continue;
          field(i / K, G + i % K) = idx[u];
          field(i / K, G + K + i % K) = wt[u];
        }
      }
      fence_proxy_async_global();
      __threadfence_system();
    }
    // Both halves of the slot are written: one release per receiver.
    if (!barrier_all<kStagerBarrier>(ok, 64)) break;
    if (is_copier && lane < R && ((needed >> lane) & 1u))
      st_release_sys(flag_at(c, lane, c.ctl.dispatch_ready, rank, block), tag(seq, n + 1));
  }
  // Leave only when no receiver still reads the ring: the next call may overwrite it.
  if (is_copier) {
    __syncwarp();
    if (ok && lane < R && sh.last_needed[lane] >= 0)
      wait_flag_geq(c.wait, flag_at(c, rank, c.ctl.dispatch_ack, lane, block), tag(seq, sh.last_needed[lane] + 1),
                    WaitPhase::kDispatchSlotFree, lane);
    if (lane == 0) bulk_wait_all();
  }
}

__device__ void run_puller(const DispatchParams& p, uint32_t seq, int pw, DispatchShared& sh, uint8_t* stages,
                           uint8_t* meta_smem) {
  const CommonParams& c = p.common;
  const int R = c.num_ranks, rank = c.rank, lane = lane_id(), block = blockIdx.x;
  const int S = p.ring.slots, P = p.puller_stages;
  const int K = p.num_topk;
  const int expert_begin = rank * p.experts_per_rank;
  uint64_t* bars = sh.puller_bars[pw];
  uint64_t* meta_bar = &bars[P];
  uint32_t phases = 0;  // bit b for stage b, bit P for the meta barrier
  const int parity = p.cached ? 0 : static_cast<int>((ld_volatile(p.parity_counter) - 1u) & 1u);

  // Puller warps take the block's (chunk, source) segments from a shared counter, chunk by chunk, so
  // the block's rows spread evenly over its warps whatever each source's share (a warp per source
  // waited for the largest share, and the warp of the rank's own rows idled).
  const int num_n = block_iterations(p.max_chunks, p.num_blocks);
  bool ok = true;
  while (ok) {
    const int i = take_segment(&sh.next_segment);
    if (i >= num_n * R) break;
    {
      const int n = i / R, src = (rank + 1 + i % R) % R;
      const int chunk = block + n * p.num_blocks;
      const int32_t* offsets = p.chunk_offset + static_cast<int64_t>(src) * p.chunk_offset_stride;
      const int row_begin = offsets[chunk];
      const int rows = offsets[chunk + 1] - row_begin;
      if (rows == 0) continue;
      const int first_token = chunk * offsets[p.chunk_offset_stride - 1];  // the source's cut
      uint32_t mask;
      if (p.cached) {
        const uint32_t bit = lane < rows ? 1u << (p.recv_src_idx[row_begin + lane] - first_token) : 0u;
        mask = __reduce_or_sync(0xffffffffu, bit);
      } else {
        const char* meta = c.peer_base[rank] + c.ctl.meta(parity, src);
        mask = reinterpret_cast<const uint32_t*>(meta + c.ctl.meta_entry.masks)[chunk];
      }
      ok = warp_wait_flag(c.wait, flag_at(c, rank, c.ctl.dispatch_ready, src, block), tag(seq, n + 1),
                          WaitPhase::kDispatchReady, src);
      if (!ok) break;
      fence_proxy_async_global();
      const uint8_t* slot = reinterpret_cast<const uint8_t*>(c.peer_base[src]) + p.ring.slot(block, n % S);

      uint32_t issue_mask = mask;
      if (lane == 0) {
        if (p.ring.meta_row_bytes > 0) {
          const int last = 31 - __clz(mask);
          const uint32_t bytes = static_cast<uint32_t>((last + 1) * p.ring.meta_row_bytes);
          mbar_arrive_expect_tx(meta_bar, bytes);
          tma_load(meta_smem, slot + p.ring.meta_offset, bytes, meta_bar);
        }
        for (int k = 0; k < P && k < rows; ++k) {
          const int pos = __ffs(issue_mask) - 1;
          issue_mask &= issue_mask - 1;
          mbar_arrive_expect_tx(&bars[k], p.row_bytes);
          tma_load(stages + static_cast<size_t>(k) * p.row_bytes, slot + static_cast<size_t>(pos) * p.row_bytes,
                   p.row_bytes, &bars[k]);
        }
      }
      if (p.ring.meta_row_bytes > 0) {
        ok = warp_wait_mbar(c.wait, meta_bar, (phases >> P) & 1u, WaitPhase::kDispatchReady, src);
        phases ^= 1u << P;
        if (!ok) break;
      }
      uint32_t proc_mask = mask;
      for (int k = 0; k < rows; ++k) {
        const int st = k % P;
        const int pos = __ffs(proc_mask) - 1;
        proc_mask &= proc_mask - 1;
        ok = warp_wait_mbar(c.wait, &bars[st], (phases >> st) & 1u, WaitPhase::kDispatchReady, src);
        phases ^= 1u << st;
        if (!ok) break;
        const int64_t row = row_begin + k;
        uint8_t* stage = stages + static_cast<size_t>(st) * p.row_bytes;
        const bool fits = row < p.num_rows;  // num_worst_tokens too small: reported, never overrun
        if (lane == 0 && fits) {
          tma_store(p.recv_x + row * p.row_bytes, stage, p.row_bytes);
          bulk_commit();
        }
        const uint8_t* meta_row = meta_smem + static_cast<size_t>(pos) * p.ring.meta_row_bytes;
        for (int g = lane; fits && g < p.num_scales; g += 32)
          p.recv_scales[row * p.num_scales + g] = reinterpret_cast<const uint32_t*>(meta_row)[g];
        if (fits && lane < K) {
          const int32_t e = reinterpret_cast<const int32_t*>(meta_row)[p.num_scales + lane];
          const float w = reinterpret_cast<const float*>(meta_row)[p.num_scales + K + lane];
          const bool local = e >= expert_begin && e < expert_begin + p.experts_per_rank;
          p.recv_topk_idx[row * K + lane] = local ? e - expert_begin : -1;
          if (p.recv_topk_weights) p.recv_topk_weights[row * K + lane] = local ? w : 0.f;
        }
        if (fits && !p.cached && lane == 0) p.recv_src_idx[row] = first_token + pos;
        // Refill the previous row's stage (its store had an iteration to read it): two stores and
        // P - 1 loads stay in flight. With one stage, refill this one.
        const int prev = P > 1 ? k - 1 : k;
        if (lane == 0 && prev >= 0 && prev + P < rows) {
          const int next_pos = __ffs(issue_mask) - 1;
          issue_mask &= issue_mask - 1;
          const int pst = prev % P;
          if (P > 1) bulk_wait_read<1>();
          else bulk_wait_read<0>();
          mbar_arrive_expect_tx(&bars[pst], p.row_bytes);
          tma_load(stages + static_cast<size_t>(pst) * p.row_bytes, slot + static_cast<size_t>(next_pos) * p.row_bytes,
                   p.row_bytes, &bars[pst]);
        }
      }
      if (!ok) break;
      // Every load of this (source, chunk) has landed: the sender may reuse the slot. Acks to one
      // source go out in chunk order whichever warp pulled (its flag counts chunks): the source's
      // previous segment first.
      __syncwarp();
      fence_proxy_async_shared();
      if (lane == 0) {
        __threadfence_system();
        ok = flag_in_chunk_order(c.wait, &sh.acked[src], previous_segment(offsets, n, 1, p.num_blocks), n,
                                 flag_at(c, src, c.ctl.dispatch_ack, rank, block), tag(seq, n + 1),
                                 WaitPhase::kDispatchReady, src);
      }
      ok = __shfl_sync(0xffffffffu, ok, 0);
    }
  }
  if (lane == 0) bulk_wait_all();
}

__global__ void __launch_bounds__(32 * (2 + kMaxPullerWarps), 1)
    dispatch_kernel(const __grid_constant__ DispatchParams p) {
  extern __shared__ __align__(128) uint8_t smem[];
  auto& sh = *reinterpret_cast<DispatchShared*>(smem);
  const CommonParams& c = p.common;
  const uint32_t seq = call_sequence(c);
  if (!call_number_left(c.wait, seq)) return;
  const int warp = warp_id();

  if (threadIdx.x == 0) {
    for (int b = 0; b < kStagerBufs; ++b) mbar_init(&sh.stager_bars[b], 1);
    for (int w = 0; w < p.puller_warps; ++w)
      for (int b = 0; b <= p.puller_stages; ++b) mbar_init(&sh.puller_bars[w][b], 1);
    fence_mbar_init();
    sh.next_segment = 0;
  }
  for (int i = threadIdx.x; i < kMaxNvlRanks; i += blockDim.x) sh.acked[i] = -1;
  __syncthreads();
  if (p.num_worst_tokens > 0)
    pad_worst_topk(c.wait, c.rank, p.chunk_offset, p.chunk_offset_stride, c.num_ranks, p.num_worst_tokens, p.num_topk,
                   p.recv_topk_idx, p.recv_topk_weights);

  uint8_t* dyn = smem + align_up(sizeof(DispatchShared), 128);
  const size_t stager_bytes = static_cast<size_t>(kStagerBufs) * p.stager_piece_bytes;
  const size_t meta_bytes = align_up(static_cast<size_t>(p.chunk) * p.ring.meta_row_bytes, 128);
  const size_t puller_bytes = static_cast<size_t>(p.puller_stages) * p.row_bytes + meta_bytes;
  if (warp < 2) {
    run_stager(p, seq, warp == 0, sh, dyn);
  } else if (warp - 2 < p.puller_warps) {
    uint8_t* mine = dyn + stager_bytes + static_cast<size_t>(warp - 2) * puller_bytes;
    run_puller(p, seq, warp - 2, sh, mine, mine + static_cast<size_t>(p.puller_stages) * p.row_bytes);
  }
  finish_call(c, seq);
}

const KernelRegistration kKernels{reinterpret_cast<const void*>(dispatch_kernel)};

}  // namespace

int dispatch_shared_bytes(int puller_warps, int puller_stages, int row_bytes, int chunk, int meta_row_bytes,
                          int stager_piece_bytes) {
  return static_cast<int>(
      align_up(sizeof(DispatchShared), 128) + static_cast<size_t>(kStagerBufs) * stager_piece_bytes +
      static_cast<size_t>(puller_warps) * (static_cast<size_t>(puller_stages) * row_bytes +
                                           align_up(static_cast<size_t>(chunk) * meta_row_bytes, 128)));
}

int dispatch_max_puller_warps() { return kMaxPullerWarps; }
int dispatch_max_slots() { return kMaxSlots; }

void launch_dispatch(const DispatchParams& p, int smem_bytes, void* stream) {
  allow_dynamic_smem(reinterpret_cast<const void*>(dispatch_kernel), smem_bytes);
  dispatch_kernel<<<p.num_blocks, 32 * (2 + p.puller_warps), smem_bytes, static_cast<cudaStream_t>(stream)>>>(p);
  EPCOMM_LAUNCH_CHECK("dispatch_kernel");
}

}  // namespace epcomm
