// Arguments of the low-latency kernels (dispatch, combine, the clean barrier): plain structs
// filled by the host (core/buffer_low_latency*.cpp) and passed by value as __grid_constant__.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/common/common_params.hpp"
#include "kernels/low_latency/net_layout.hpp"
#include "kernels/low_latency/per_rank.hpp"
#include "kernels/low_latency/region_layout.hpp"
#include "kernels/low_latency/state.hpp"

namespace epcomm {

constexpr int kLowLatencyThreads = 512;  // threads per block of both LL kernels
constexpr int kLowLatencySend = 1;       // kernel phases
constexpr int kLowLatencyRecv = 2;

struct LowLatencyDispatchParams {
  CommonParams common;  // peers, rank, wait context (the control layout is not used)
  LowLatencyLayout layout;
  size_t region = 0;  // offset of the LL region inside the symmetric allocation
  LowLatencyDeviceState* state = nullptr;
  int buffer = 0;      // 0 or 1
  int phases = 0;      // kLowLatencySend | kLowLatencyRecv
  int num_tokens = 0;  // T of this rank
  int num_topk = 0;
  int staging_buffers = 2;  // token staging areas in shared memory (2: cast the next while sending)
  bool use_fp8 = true;
  bool round_scale = false;
  bool use_ue8m0 = false;
  bool per_rank = false;          // per-rank path (staging slots, fan-out on the receiver), see dispatch_per_rank.cu
  bool per_rank_combine = false;  // (per_rank only) write the per-rank combine's plan instead of headers
  // inputs (send half)
  const uint16_t* x = nullptr;        // [T, hidden] bf16
  const int64_t* topk_idx = nullptr;  // [T, K]
  // outputs (receive half)
  uint8_t* recv_x = nullptr;                 // [E/R, R*Tmax, hidden] fp8 or bf16
  float* recv_scales = nullptr;              // fp8: [E/R][G][R*Tmax] (transposed)
  int32_t* recv_scales_packed = nullptr;     // ue8m0: [E/R][ceil(G/4)][R*Tmax]
  int32_t* recv_count = nullptr;             // [E/R]
  int32_t* src_info = nullptr;               // [E/R, R*Tmax]
  int64_t* layout_range = nullptr;           // [E/R, R]
  int32_t* cumulative_recv_stats = nullptr;  // [E/R], optional
  int64_t* wait_cost_stats = nullptr;        // [R], optional: clock cycles spent waiting per source
  // shrink mode (nullptr when off): see kernels/low_latency/shrink.cuh
  int32_t* mask = nullptr;              // [R]: 1 = masked peer (skipped; a timed-out wait sets it)
  uint64_t* count_decisions = nullptr;  // [2][E]: each count settled once per call
  unsigned long long* probe = nullptr;  // diagnostics (EPCOMM_LL_PROBE): see LowLatencyHostState
};

struct LowLatencyCombineParams {
  CommonParams common;
  LowLatencyLayout layout;
  size_t region = 0;
  LowLatencyDeviceState* state = nullptr;
  int buffer = 0;
  int phases = 0;
  int num_tokens = 0;  // T of this rank (origin side)
  int num_topk = 0;
  // expert side
  const uint16_t* y = nullptr;            // [E/R, R*Tmax, hidden] bf16 (user tensor or the zero-copy area)
  const int64_t* layout_range = nullptr;  // [E/R, R] from the dispatch handle
  // kNone: per-expert rows; else the per-rank combine (the dispatch wrote its plan), see combine_per_rank.cu
  LowLatencyPartials partials = LowLatencyPartials::kNone;
  // origin side
  const int64_t* topk_idx = nullptr;    // [T, K]
  const float* topk_weights = nullptr;  // [T, K]
  uint16_t* out = nullptr;              // [T, hidden] bf16
  int64_t* wait_cost_stats = nullptr;   // [R], optional
  int32_t* mask = nullptr;              // shrink mode: [R] masked peers (nullptr when off)
};

// Network path (LowLatencyNetLayout): the same kernels with sends to ranks of other nodes through
// the emulated network transport (kernels/low_latency/ll_net.cuh). `net` holds each rank's LL
// region (window), the signal array offset and the statistics; ranks_per_node picks the path.
struct LowLatencyNetArgs {
  LowLatencyNetLayout layout;
  int ranks_per_node = 1;
  bool y_in_window = false;  // combine: y is the zero-copy area (already in this rank's window)
};

// clean_low_latency_buffer as work on the caller's stream (kernels/low_latency/clean.cu), no host
// wait and capturable: barrier(1), zero this rank's LL flags and counters, barrier(2). Barrier n
// of the c-th clean: each rank stores tag(c, n) into its slot of every rank's clean flags, then
// waits until every slot of its own holds at least that. After barrier 1 no rank has LL work left
// that could write into a region (each came to it after its earlier LL calls on that stream);
// after barrier 2 every region's flags are zeroed, so the next LL call may write. `c` is a device counter
// (DeviceCounters::ll_cleans), the same on every rank, and barrier 2 advances it. Every rank takes
// part, masked ones included (clean.cu says why).
// Over load/store (clean.cu) the three steps are ONE kernel per rank: ranks that share a GPU are
// threads of one process whose streams share the GPU's hardware work queues, and a second item
// queued behind a rank's spinning barrier (the zeroing, waiting for it in stream order) held a
// peer's barrier queued behind it until the first timed out (runs 82-85). Across real nodes
// (clean_gin.cu) the barriers are kernels of their own around stream-ordered memsets.
// The flags: u64 [R] in the control part.
constexpr size_t low_latency_clean_flag_bytes(int num_ranks) { return sizeof(uint64_t) * num_ranks; }
struct LowLatencyCleanParams {
  CommonParams common;              // rank, wait context; ctl.ll_region holds the flags
  char* const* peers = nullptr;     // device [R]: every rank's symmetric region (all load/store reachable)
  uint32_t* clean_count = nullptr;  // device: cleans finished
  int barrier = 1;                  // clean_gin.cu: 1 before zeroing, 2 after (and count this clean)
  int32_t* mask = nullptr;          // shrink mode: a peer that never arrives is masked (nullptr: a record)
  // clean.cu: what the blocks zero between the barriers (the flags of this rank's LL region: two
  // buffers' tails and the network area's signals and shadows; its LL device state, shrink mode's
  // count decisions; bytes 0: nothing), and the two device words that order
  // them: `go` (block 0 stores the clean's number after barrier 1) and `zeroed` (blocks done; the
  // last one runs barrier 2 and returns it to 0).
  struct Range {
    char* data = nullptr;
    size_t bytes = 0;
  };
  static constexpr int kZeroRanges = 5;
  Range zero[kZeroRanges];
  uint32_t* go = nullptr;
  uint32_t* zeroed = nullptr;
};

}  // namespace epcomm
