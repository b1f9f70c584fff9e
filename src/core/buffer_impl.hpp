// Private state of epcomm::Buffer, shared by the files that implement its modes.
#pragma once

#include <cuda_runtime_api.h>

#include <memory>
#include <string>

#include "core/gin_signals.hpp"
#include "epcomm/buffer.hpp"
#include "kernels/common/control.hpp"
#include "kernels/common/diagnostics.hpp"
#include "kernels/internode/params.hpp"
#include "kernels/low_latency/params.hpp"
#include "kernels/normal/params.hpp"

namespace epcomm {

struct GinNetParams;

// Counters the kernels keep on the device (see kernels/common/sequence.cuh).
struct DeviceCounters {
  uint32_t seq;              // last finished call
  uint32_t done;             // blocks finished in the running call
  uint32_t notify_count;     // notifies so far (meta parity)
  int32_t abort;             // set by a timed-out wait
  int32_t record_claimed;    // the first error writes the record (cleared with abort)
  int32_t invalid_topk;      // first out-of-range topk entry seen by a kernel (flat index), or -1
  uint32_t ll_cleans;        // clean_low_latency_buffer calls finished (its barrier's number)
  uint32_t ll_clean_go;      // the running clean's number once its barrier 1 passed (clean.cu)
  uint32_t ll_clean_zeroed;  // blocks of the running clean done zeroing (clean.cu)
  int32_t pad;
};

struct Buffer::Impl {
  std::shared_ptr<Group> group;
  BufferOptions options;
  int rank = 0, num_ranks = 0, device = 0;
  int sm_count = 0;
  int gpu_sharers = 1;  // ranks of the group on this rank's GPU, itself included (threads or processes)
  int max_smem = 0;
  int max_tokens = 0;
  int max_local_experts = 0;
  uint64_t timeout_ns = 0;

  std::unique_ptr<SymmetricMemory> sym;
  // NCCL GIN to the ranks of other nodes (the group spans real nodes: SymmetricMemory::gin), or
  // nullptr (one node, or virtual nodes: every rank load/store reachable, the emulated transport).
  const GinContext* gin = nullptr;
  GinSignalPlan gin_signals;  // which of its signals each mode's kernels use
  ControlLayout ctl;
  size_t data_offset = 0;  // of the ring part inside the symmetric region
  size_t data_bytes = 0;

  DeviceCounters* counters = nullptr;       // device
  DeviceErrorRecord* record = nullptr;      // host-mapped
  DeviceErrorRecord* record_dev = nullptr;  // its device address
  int32_t* host_result = nullptr;           // host-mapped: notify output
  int32_t* host_result_dev = nullptr;
  int32_t notify_token = 0;  // distinguishes this call's notify result from earlier ones
  cudaStream_t comm = nullptr;
  bool owns_comm = false;  // false: BufferOptions::comm_stream, the caller's to destroy
  cudaEvent_t order_event = nullptr;
  cudaEvent_t done_event = nullptr;
  // An async_finish call (any mode) left work on the comm stream that no caller's stream was made to
  // wait for: a low-latency call launched straight on the caller's stream must wait for it first.
  bool comm_unjoined = false;
  // Low-latency calls launched straight on the caller's stream (buffer_low_latency.cpp): each
  // records direct_event there, and the comm stream is made to wait for it only when something
  // waits for the comm stream (sync_comm, enter) or the caller's stream changes: one driver call
  // per call instead of two. EPCOMM_LL_JOIN_EACH_CALL=1: the wait at every call (as before).
  cudaEvent_t direct_event = nullptr;
  unsigned long long direct_stream_id = 0;  // cudaStreamGetId of the stream direct_event was recorded on
  bool direct_pending = false;
  bool join_each_call = false;
  void note_direct_call(cudaStream_t stream);  // after a direct call's launch (not while capturing)
  void join_direct_calls();                    // the comm stream waits for the latest direct call
  // join_direct_calls, then waits for the comm stream, bounded by comm_bound_ms(): RuntimeFailure
  // naming the stuck stream past it (a kernel in a wait epcomm cannot bound: NCCL GIN's put waiting
  // for queue credits once the network transport stopped), instead of a hang.
  void sync_comm();
  // Every GPU wait epcomm makes ends within the timeout, so the comm stream's calls finish within
  // a few of them (four, and a second, allow for calls queued behind each other).
  int64_t comm_bound_ms() const { return static_cast<int64_t>(4 * (timeout_ns / 1000000) + 1000); }
  bool wait_bounded(cudaStream_t stream) const;  // false: work still on `stream` after comm_bound_ms()
  // Throws that RuntimeFailure for `stream` ("the communication stream", "the caller's stream").
  [[noreturn]] void throw_stuck(const char* which) const;

  // Makes the comm stream wait for the caller (or previous_event); notes an async_finish call.
  void enter(const StreamOrder& order);
  // Makes the caller wait for the comm stream, or returns the event when async.
  Event leave(const StreamOrder& order);
  CommonParams common(KernelId kernel) const;
  // Normal mode's kernels hold a node's ranks in 32-bit masks and, across nodes, a token's
  // destination ranks in one u64 (design-scale.md §3): at most kMaxNvlRanks per node, and across
  // nodes kMaxInterRanks in all on at most kMaxInterNodes nodes. Larger groups are low-latency only
  // (Buffer checks at creation and at every normal-mode call).
  bool normal_mode_fits() const {
    return group->ranks_per_node() <= kMaxNvlRanks &&
           (group->num_nodes() == 1 || (num_ranks <= kMaxInterRanks && group->num_nodes() <= kMaxInterNodes));
  }
  std::string normal_mode_limit_text() const;        // what the group has, against those limits
  void require_normal_mode(const char* call) const;  // ArgumentError naming the call unless it fits
  // Device tables [R], written once in the constructor: every rank's symmetric region, and the
  // same plus the LL / internode region's offset (the emulated network's windows); nullptr where
  // not load/store reachable. Kernels that reach any rank by load/store take them (no R-sized
  // array in kernel parameters: design-scale.md §3).
  char** peer_tables = nullptr;  // [3][R]
  char* const* peer_regions() const { return peer_tables; }
  char* const* ll_windows() const { return peer_tables + num_ranks; }
  char* const* inter_windows() const { return peer_tables + 2 * static_cast<size_t>(num_ranks); }
  // Half of the data part each normal-mode ring may use.
  size_t ring_region_bytes() const { return data_bytes / 2; }
  size_t dispatch_ring_offset() const { return data_offset; }
  size_t combine_ring_offset() const { return data_offset + ring_region_bytes(); }
  bool capturing(cudaStream_t stream) const;
  // Low-latency mode (buffer_low_latency*.cpp): its region follows the data part.
  LowLatencyHostState ll;
  void init_low_latency();                      // constructor: the device counters
  void release_low_latency();                   // destructor
  void reset_low_latency(cudaStream_t stream);  // zero the whole LL region and counters (one rank; no barrier)
  GinNetParams low_latency_gin_params() const;  // the LL network path's GIN arguments (gin != nullptr)
  // Normal mode across nodes (buffer_internode.cpp): its control part right before the LL region,
  // its data halves on it (core/region_plan.hpp).
  struct Internode {
    bool enabled = false;  // more than one node
    size_t offset = 0, bytes = 0;
    InterLayout layout;
    // The token limit of dispatches that do not wait for the counts (num_worst_tokens), whose rounds
    // cover it: the given limit (BufferOptions::max_tokens_per_rank, EPCOMM_MAX_TOKENS_PER_RANK), else
    // what one round of the region holds at the first dispatch's hidden (internode_tokens.hpp), and
    // `fitted` says it was found. Other calls run rounds for the group's largest T.
    int tokens = 0;
    bool tokens_given = true;
    uint64_t rounds = 0;  // rounds launched since the last internode_stats(reset)
    bool fitted = false;
    // The data halves lie on the LL region (buffer.cpp): a normal-mode call since the last
    // clean_low_latency_buffer (or reset) left its data there.
    bool normal_since_clean = false;
    bool bf16_partials = false;  // BufferOptions::internode_bf16_partials / EPCOMM_INTER_BF16_PARTIALS
    // The part of the region num_nvl_bytes gives, for the combine's pushed rows where that holds
    // more tokens per round (InterCombineGeometry::in_nvl); bytes 0 with the option off
    // (BufferOptions::internode_combine_nvl, EPCOMM_INTER_COMBINE_NVL).
    size_t nvl_offset = 0, nvl_bytes = 0;
  } inter;
  void init_internode();                      // constructor (before the barrier)
  void reset_internode(cudaStream_t stream);  // zero its control part and signals (one rank; no barrier)
  InterCommon inter_common(KernelId kernel, int num_blocks) const;
  GinNetParams inter_gin_params() const;  // the internode kernels' GIN arguments (gin != nullptr)
  // Throws ArgumentError when num_rdma_bytes cannot hold this dispatch's rows.
  void require_internode_region() const;  // ArgumentError unless normal mode has the region
  // ArgumentError when normal-mode data lies on the LL region (a low_latency_mode buffer across nodes
  // after a normal-mode call, before clean_low_latency_buffer).
  void require_low_latency_data() const;
  // hidden > 0: the call's hidden, for the first dispatch to fit the rows (0: a cached dispatch,
  // after one); num_tokens: this rank's T; counts_on_host: false with num_worst_tokens.
  void check_internode_dispatch(int row_bytes, int num_scales, int num_topk, int chunk, int hidden, int num_tokens,
                                bool counts_on_host);
  // The tokens of every rank a call's rounds cover (buffer_internode.cpp), and the rounds' launches.
  int internode_round_tokens(const DispatchHandle& h) const;
  template <class Params, class Launch>
  void run_internode_rounds(const DispatchHandle& handle, Params& p, Launch&& launch);
  // The normal-mode entry points call these in place of the intranode launches (same params).
  void launch_internode_notify(const NotifyParams& p);
  Event run_internode_dispatch(const DispatchParams& p, const DispatchHandle& handle, const StreamOrder& order);
  Event run_internode_combine(const CombineParams& p, const DispatchHandle& handle, const StreamOrder& order);
};

}  // namespace epcomm
