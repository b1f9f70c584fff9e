// Dispatch prologue: every rank tells every other rank how many tokens it sends, to which local
// experts, and which tokens of each chunk (a 32-bit mask per chunk); then each rank builds its
// receive plan: rank_prefix_matrix, the first receive row of every (source, chunk), and the
// per-expert counts, and hands the totals to the host through mapped memory.
//
// One block. Meta entries are double-buffered by the parity of the notify count: a rank can only
// write parity p again after every rank has finished reading it (it must first pass the next
// notify, which waits for everybody's meta).
#include <cuda_runtime.h>

#include "core/call_check.hpp"
#include "kernels/common/launch.hpp"
#include "kernels/common/sequence.cuh"
#include "kernels/common/wait.cuh"
#include "kernels/normal/params.hpp"
#include "kernels/normal/receive_plan.cuh"

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
  if (!call_number_left(c.wait, seq)) return;
  const uint32_t notify_count = ld_volatile(p.parity_counter);
  const int parity = static_cast<int>(notify_count & 1);
  const int experts_per_rank = p.num_experts / R;
  const int num_chunks = (p.num_tokens + p.cut - 1) / p.cut;
  char* const local = c.peer_base[rank];

  // 1. Write my meta into every peer's entry [parity][rank].
  for (int j = 0; j < R; ++j) {
    char* meta = c.peer_base[j] + c.ctl.meta(parity, rank);
    if (threadIdx.x == 0) {
      NotifyHeader h{p.num_tokens, p.num_experts, p.chunk, p.num_blocks, p.cut, 0, p.row_bytes, p.rows_words};
      *reinterpret_cast<NotifyHeader*>(meta) = h;
    }
    int32_t* counts = reinterpret_cast<int32_t*>(meta + c.ctl.meta_entry.counts);
    for (int r = threadIdx.x; r < R; r += blockDim.x) counts[r] = p.num_tokens_per_rank[r];
    int32_t* experts = reinterpret_cast<int32_t*>(meta + c.ctl.meta_entry.experts);
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
      auto* masks = reinterpret_cast<uint32_t*>(c.peer_base[lane] + c.ctl.meta(parity, rank) + c.ctl.meta_entry.masks);
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

  // 3. The receive plan, the per-expert counts and the host's totals.
  build_receive_plan(p, c.wait, c.ctl.meta_entry, R, rank, p.num_blocks, ok_all != 0, notify_count,
                     [&](int i) { return static_cast<const char*>(local + c.ctl.meta(parity, i)); });
  finish_call(c, seq);
}

const KernelRegistration kKernels{reinterpret_cast<const void*>(notify_dispatch_kernel)};

}  // namespace

void launch_notify_dispatch(const NotifyParams& p, void* stream) {
  notify_dispatch_kernel<<<1, kNotifyThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  EPCOMM_LAUNCH_CHECK("notify_dispatch_kernel");
}

}  // namespace epcomm
