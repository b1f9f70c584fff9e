// Work sharing inside a normal-mode block: the warps that move a block's rows (dispatch's pullers,
// combine's pushers) take (chunk, peer) segments from a block-wide counter instead of a peer each,
// so a block's bytes spread over its warps whatever each peer's share. A peer's flag counts chunks,
// so the flags of one peer must still go out in chunk order whichever warp moved the segment.
#pragma once

#include "kernels/common/wait.cuh"

namespace epcomm::dev {

// Iterations (chunks block, block + num_blocks, ...) of this block below max_chunks.
__device__ __forceinline__ int block_iterations(int max_chunks, int num_blocks) {
  const int block = static_cast<int>(blockIdx.x);
  return max_chunks > block ? (max_chunks - block + num_blocks - 1) / num_blocks : 0;
}

// Rows of a peer's segment n of this block (n below block_iterations): `offsets` is the peer's row
// of chunk_offset (the first receive row of each chunk, then the end).
__device__ __forceinline__ int segment_rows(const int32_t* offsets, int n, int num_blocks) {
  const int chunk = static_cast<int>(blockIdx.x) + n * num_blocks;
  return offsets[chunk + 1] - offsets[chunk];
}

// The last segment before n, stepping by `step`, with rows (-1: none): the one whose flag goes out
// before n's (step 1), or the one that last used n's ring slot (step = slots).
__device__ __forceinline__ int previous_segment(const int32_t* offsets, int n, int step, int num_blocks) {
  for (int m = n - step; m >= 0; m -= step)
    if (segment_rows(offsets, m, num_blocks) > 0) return m;
  return -1;
}

// Lane 0 takes the next segment index from the block's counter; every lane gets it.
__device__ __forceinline__ int take_segment(int32_t* counter) {
  int i = 0;
  if (lane_id() == 0) i = atomicAdd(counter, 1);
  return __shfl_sync(0xffffffffu, i, 0);
}

// One thread: once this segment's data is complete (the caller fenced it), stores `value` to the
// peer's `flag` after the peer's previous segment, `prev` (-1: none), was flagged; `*done` holds the
// peer's last flagged iteration. False on timeout or abort (recorded).
__device__ __forceinline__ bool flag_in_chunk_order(const WaitContext& ctx, volatile int32_t* done, int prev, int n,
                                                    uint64_t* flag, uint64_t value, WaitPhase phase, int peer) {
  if (!wait_geq(
          ctx, [done] { return static_cast<uint64_t>(*done + 1); }, static_cast<uint64_t>(prev + 1), phase, peer))
    return false;
  st_release_sys(flag, value);
  __threadfence();  // the flag's store is ordered before the next warp's, which reads *done first
  *done = n;
  return true;
}

}  // namespace epcomm::dev
