// Low-latency mode's state across calls: the call counters in device memory and what the Buffer
// keeps on the host.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/low_latency/per_rank.hpp"
#include "kernels/low_latency/region_layout.hpp"

namespace epcomm {

// Counters of this rank's LL calls, in device memory, so a CUDA graph replay gets fresh numbers.
// Every rank makes the same LL calls in the same order, so the numbers agree without exchange.
struct LowLatencyDeviceState {
  uint32_t dispatch_seq;  // last dispatch whose send half finished
  uint32_t combine_seq;
  uint32_t dispatch_blocks_done;  // blocks past the send half of the running dispatch
  uint32_t combine_blocks_done;
  uint32_t buffer_dispatch_seq[2];  // the dispatch that last sent into buffer b (read by its receive)
  uint32_t buffer_combine_seq[2];
  // Network path only (LowLatencyNetLayout), appended: last-block counters of its grid phases
  // ([0] dispatch send, [1] dispatch receive, [2] combine receive) and its traffic counters
  // ([0] puts to ranks of other nodes, [1] their bytes).
  uint32_t net_blocks_done[4];
  unsigned long long net_stats[2];
};

// What Buffer keeps on the host for LL mode (core/buffer_low_latency*.cpp).
struct LowLatencyHostState {
  size_t offset = 0;                  // of the LL region inside the symmetric allocation (after the data part)
  size_t bytes = 0;                   // its size: num_rdma_bytes rounded up to 4096
  int next_buffer = 0;                // the buffer the next dispatch takes
  bool per_rank[2] = {false, false};  // buffer b's dispatch used the per-rank path (its hook receive must too)
  LowLatencyPartials partials[2] = {LowLatencyPartials::kNone,
                                    LowLatencyPartials::kNone};  // ... and wrote the
                                                                 // per-rank combine's plan (its combine returns these)
  bool net = false;        // network path for ranks of other nodes (LowLatencyNetLayout)
  int per_rank_level = 0;  // low_latency_per_rank_choice(BufferOptions::low_latency_per_rank, env)
  // The src_info of buffer b's latest dispatch: a handle is this buffer's (and still current) only
  // if it holds that tensor, so a handle of another Buffer or of a dispatch since overwritten is
  // refused instead of combining another call's plan. Cleared with the calls.
  const void* issued_src_info[2] = {nullptr, nullptr};
  int issued_tokens[2] = {0, 0};  // ... and its topk_idx's [T, K], which its combine must pass again
  int issued_topk[2] = {0, 0};
  LowLatencyLayout layout;                 // fixed by the first call or clean_low_latency_buffer (max_tokens 0 before)
  LowLatencyDeviceState* state = nullptr;  // device memory
  // Shrink mode (kernels/low_latency/shrink.cuh), device memory: the mask [R] int32 (1 = masked;
  // always allocated, so the mask API works without shrink) and the dispatch's count decisions
  // [2][max_local_experts * R] u64 (only with BufferOptions::enable_shrink).
  int32_t* mask = nullptr;
  uint64_t* count_decisions = nullptr;
  size_t count_decision_bytes = 0;
  // EPCOMM_LL_PROBE=1: per-block phase times of the last LL dispatch (kLowLatencyProbeSlots u64 per
  // block, device memory), read by Buffer::low_latency_probe_report. nullptr when off.
  unsigned long long* probe = nullptr;
};

}  // namespace epcomm
