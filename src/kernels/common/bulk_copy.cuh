// Copies through shared memory with the bulk copy engine, driven by one thread: loads run ahead of
// stores by `num_bufs` pieces. Used for contiguous runs (a chunk of x into the ring; rows of a
// combine chunk into an origin's slot), local or over NVLink.
#pragma once

#include "kernels/common/wait.cuh"

namespace epcomm::dev {

// State of one thread's set of shared-memory buffers and their mbarriers (one per buffer).
struct BulkPipe {
  uint8_t* bufs;
  uint64_t* bars;
  int num_bufs;
  int piece_bytes;
  uint32_t phases;  // bit b: parity to wait for next on buffer b
};

// Copies `bytes` (a multiple of 16, as are both addresses) from src to dst. Needs num_bufs >= 2. Returns false on
// timeout (recorded) or when `after_first_stores` does. On return every store has been issued and
// committed; the caller waits with bulk_wait_all() before signalling a consumer.
// `after_first_stores(issued)` runs once, when this copy's first two stores (or its only one) are
// committed: `issued` of the most recent groups are this copy's, so the caller can wait there for an
// earlier copy's stores without draining the pipe.
template <class AfterFirstStores>
__device__ __forceinline__ bool bulk_copy(const WaitContext& ctx, BulkPipe& pipe, uint8_t* dst, const uint8_t* src,
                                          size_t bytes, WaitPhase phase, int peer,
                                          AfterFirstStores&& after_first_stores) {
  const size_t piece = static_cast<size_t>(pipe.piece_bytes);
  const int num_pieces = static_cast<int>((bytes + piece - 1) / piece);
  auto piece_len = [&](int k) {
    const size_t begin = static_cast<size_t>(k) * piece;
    return static_cast<uint32_t>(bytes - begin < piece ? bytes - begin : piece);
  };
  // Stores from an earlier call may still read these buffers.
  bulk_wait_read<0>();
  const int prologue = num_pieces < pipe.num_bufs ? num_pieces : pipe.num_bufs;
  for (int k = 0; k < prologue; ++k) {
    mbar_arrive_expect_tx(&pipe.bars[k], piece_len(k));
    tma_load(pipe.bufs + k * piece, src + k * piece, piece_len(k), &pipe.bars[k]);
  }
  for (int k = 0; k < num_pieces; ++k) {
    const int b = k % pipe.num_bufs;
    if (!wait_mbar(ctx, &pipe.bars[b], (pipe.phases >> b) & 1u, phase, peer)) return false;
    pipe.phases ^= 1u << b;
    tma_store(dst + k * piece, pipe.bufs + b * piece, piece_len(k));
    bulk_commit();
    if (k == (num_pieces > 1 ? 1 : 0) && !after_first_stores(k + 1)) return false;
    // Refill the buffer of the previous piece: its store had a whole iteration to read it, and
    // two stores stay in flight.
    const int prev = k - 1, next = prev + pipe.num_bufs;
    if (prev >= 0 && next < num_pieces) {
      const int pb = prev % pipe.num_bufs;
      bulk_wait_read<1>();
      mbar_arrive_expect_tx(&pipe.bars[pb], piece_len(next));
      tma_load(pipe.bufs + pb * piece, src + next * piece, piece_len(next), &pipe.bars[pb]);
    }
  }
  return true;
}

__device__ __forceinline__ bool bulk_copy(const WaitContext& ctx, BulkPipe& pipe, uint8_t* dst, const uint8_t* src,
                                          size_t bytes, WaitPhase phase, int peer) {
  return bulk_copy(ctx, pipe, dst, src, bytes, phase, peer, [](int) { return true; });
}

// Leader of a warp waits, the warp agrees: returns the leader's verdict to every lane.
__device__ __forceinline__ bool warp_wait_flag(const WaitContext& ctx, const uint64_t* flag, uint64_t target,
                                               WaitPhase phase, int peer) {
  int ok = 1;
  if (lane_id() == 0) ok = wait_flag_geq(ctx, flag, target, phase, peer);
  return __shfl_sync(0xffffffffu, ok, 0) != 0;
}

// Every lane waits on the mbarrier (so every lane sees the bulk-copied shared memory); the warp
// agrees on the verdict.
__device__ __forceinline__ bool warp_wait_mbar(const WaitContext& ctx, uint64_t* bar, uint32_t parity, WaitPhase phase,
                                               int peer) {
  const bool ok = wait_mbar(ctx, bar, parity, phase, peer);
  return __all_sync(0xffffffffu, ok);
}

}  // namespace epcomm::dev
