// epcomm::Buffer: the communication buffer of one rank, and every mode's entry points.
//
// Calls are collective: every rank of the group makes the same calls in the same order. Work runs on
// the buffer's communication stream after it waits for the caller's stream (or `previous_event`);
// then the caller's stream waits for it, or, with `async_finish`, the call returns an event instead.
// Arguments are checked before anything is launched (ArgumentError names the argument, the value
// and the rule; the buffer stays usable).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "epcomm/config.hpp"
#include "epcomm/group.hpp"
#include "epcomm/types.hpp"

namespace epcomm {

struct BufferOptions {
  size_t num_nvl_bytes = 0;   // NVLink ring memory (normal mode); see Config hints
  size_t num_rdma_bytes = 0;  // low-latency and network-hop memory
  bool low_latency_mode = false;
  int max_tokens_per_rank = 0;   // normal mode; 0 = EPCOMM_MAX_TOKENS_PER_RANK
  int max_experts_per_rank = 0;  // 0 = EPCOMM_MAX_EXPERTS_PER_RANK
  int64_t timeout_ms = 0;        // 0 = EPCOMM_TIMEOUT_MS
  bool enable_shrink = false;    // low-latency shrink mode: mask peers that time out (see below)
  // Low-latency mode with more than one node: 1 sends to ranks of other nodes only through the
  // network transport (puts + signals; docs/design-internode.md), 0 by LSA stores to every rank,
  // -1 = EPCOMM_LL_NET. Needs num_rdma_bytes >= low_latency_net_size_hint. Across real nodes (ranks
  // not all load/store reachable: NCCL GIN) the network path is always taken and 0 is refused.
  int low_latency_net = -1;
  // Low-latency paths, which change combine's rounding (docs/design-low-latency.md): 4 float32
  // partials per (token, rank) (float32 reordering only), 3 fine partials, 2 BF16 partials, 1 one
  // row per (token, expert) summed in k order (bit for bit the reference), 0 once per expert
  // throughout; -1 = EPCOMM_LL_PER_RANK. The network path (low_latency_net) uses none of them.
  int low_latency_per_rank = -1;
  // Normal mode across nodes: 1 sends each node's partial sum of a token to its origin as BF16
  // (half the combine's network bytes; one more rounding, as DeepEP's combine), 0 as float32
  // (float32 reordering only); -1 = EPCOMM_INTER_BF16_PARTIALS (default 0).
  int internode_bf16_partials = -1;
  // Normal mode across nodes: 1 puts the rows node peers push to a token's forwarder in combine into
  // num_nvl_bytes's part of the region (unused across nodes otherwise) where that holds more tokens
  // per round, so num_rdma_bytes holds only the node partials (fewer combine rounds in a small region);
  // 0 keeps them in num_rdma_bytes; -1 = EPCOMM_INTER_COMBINE_NVL (default 1).
  int internode_combine_nvl = -1;
  // Tests: the call counters start here instead of 0. Call numbers are 32-bit; a buffer runs out
  // after 2^32 - 256 calls of one kind (a normal-mode kernel launch, an LL dispatch, an LL combine),
  // and then every call fails with a RuntimeFailure until reset() (clean_low_latency_buffer for
  // LL calls; README "Limits").
  uint32_t first_call_number = 0;
  // The communication stream: nullptr = the Buffer creates its own and destroys it with itself.
  // Otherwise a stream of the Buffer's device that the caller keeps alive for as long as anything
  // recorded on it may be used (the Buffer never destroys it). The Python layer passes a stream of
  // PyTorch's pool, which lives as long as the process: tensors of async calls are record_stream-ed
  // on it, and PyTorch's allocator records events on that stream whenever it frees them, also after
  // the Buffer is gone (issue: a destroyed stream there aborted the process at exit).
  cudaStream_t comm_stream = nullptr;
};

// How a call orders itself with the caller's work.
struct StreamOrder {
  cudaStream_t stream = nullptr;         // the caller's stream
  cudaEvent_t previous_event = nullptr;  // if set, wait for this instead of `stream`
  bool async_finish = false;             // if set, `stream` does not wait; the call returns an event
};

// An owned CUDA event (empty when the call was not async).
class Event {
 public:
  Event() = default;
  explicit Event(cudaEvent_t e) : event_(e) {}
  Event(Event&& o) noexcept : event_(o.event_) { o.event_ = nullptr; }
  Event& operator=(Event&& o) noexcept;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  ~Event();
  bool valid() const { return event_ != nullptr; }
  cudaEvent_t get() const { return event_; }
  void wait_on(cudaStream_t stream) const;  // make `stream` wait for the event
  void synchronize() const;

 private:
  cudaEvent_t event_ = nullptr;
};

// ---- layout ----
struct LayoutOutputs {
  TensorView num_tokens_per_rank;                 // [R] i32
  std::optional<TensorView> num_tokens_per_node;  // [nodes] i32, only with several nodes
  TensorView num_tokens_per_expert;               // [E] i32
  TensorView is_token_in_rank;                    // [T, R] bool
};

// ---- normal mode ----
struct DispatchInputs {
  TensorView x;  // [T, hidden] bf16 or fp8 e4m3, rows contiguous
  // fp8: [T, S] scales, any strides, S in [1, 512] 4-byte words per token: float32 (S = ceil(hidden /
  // 128) for 128-channel groups, or any other group count), or int32 words (UE8M0 exponents packed
  // four per word, as DeepGEMM takes them). Moved bit for bit, never interpreted (DeepEP's rule).
  std::optional<TensorView> x_scales;
  std::optional<TensorView> topk_idx;               // [T, K] i64 (global expert ids, -1 = none)
  std::optional<TensorView> topk_weights;           // [T, K] f32
  std::optional<TensorView> num_tokens_per_rank;    // [R] i32 (from the layout)
  std::optional<TensorView> is_token_in_rank;       // [T, R] bool
  std::optional<TensorView> num_tokens_per_expert;  // [E] i32
  int expert_alignment = 1;
  int num_worst_tokens = 0;
  Config config;
};

// What combine and cached dispatch reuse. Memory is the caller's; shapes come from Buffer.
struct DispatchHandle {
  TensorView rank_prefix_matrix;  // [R, R] i32
  TensorView chunk_offset;        // [R, chunk_offset_stride] i32: first receive row of (source, chunk)
  TensorView recv_src_idx;        // [num_rows] i32: source token of each received row
  TensorView is_token_in_rank;    // [T, R] bool of this rank as a sender
  int num_recv_tokens = -1;       // -1 when only the device knows it (num_worst_tokens)
  int num_rows = 0;               // rows of the receive tensors
  int max_chunks = 0;             // chunk loop bound
  int chunk = 0;                  // tokens per chunk the routing was cut into
  int num_tokens = 0;             // T of this rank
  int num_experts = 0;
};

// Result of the first phase of a dispatch: how many rows arrive (known on the host unless
// num_worst_tokens was given).
struct DispatchPlan {
  int num_rows = 0;
  int num_recv_tokens = -1;
  std::vector<int> num_recv_tokens_per_expert;  // aligned; empty with num_worst_tokens
  int max_chunks = 0;
  int invalid_topk_index = -1;  // a bad topk entry the layout saw (reported after the data moved)
};

struct DispatchOutputs {
  TensorView recv_x;                            // [num_rows, hidden], dtype of x
  std::optional<TensorView> recv_x_scales;      // [num_rows, S] contiguous, dtype of x_scales
  std::optional<TensorView> recv_topk_idx;      // [num_rows, K] i64
  std::optional<TensorView> recv_topk_weights;  // [num_rows, K] f32
};

struct CombineInputs {
  TensorView x;                            // [num_recv, hidden] bf16, rows as dispatch gave them
  std::optional<TensorView> topk_weights;  // [num_recv, K] f32
  std::optional<TensorView> bias0, bias1;  // [T, hidden] bf16
  Config config;
};

struct CombineOutputs {
  TensorView combined_x;                            // [T, hidden] bf16
  std::optional<TensorView> combined_topk_weights;  // [T, K] f32
};

// ======================= low-latency mode (docs/contract.md §3.3) =======================
// Decoding: no host synchronization, fixed shapes (every size follows from Tmax =
// num_max_dispatch_tokens_per_rank, hidden and num_experts), CUDA-graph capturable. The LL region
// (BufferOptions::num_rdma_bytes, at least low_latency_size_hint()) holds two buffers: each
// dispatch takes the next one, records it in the handle, and its combine uses the same one.
//
// Rules of use (all collective, same order on every rank):
// - The first LL call fixes (Tmax, hidden, num_experts); another shape needs
//   clean_low_latency_buffer(...) with the new one first (ArgumentError otherwise).
// - A dispatch's buffer is used again by the dispatch after next. Its combine must come before
//   that (any decode step does). Eager calls alternate buffers by themselves; a dispatch followed
//   by its combine may also reuse one buffer (a CUDA graph with one dispatch + combine per replay).
//   Two dispatches into one buffer with no combine of the first in between are not allowed (the
//   second could overwrite rows a slow peer is still receiving): a graph of dispatches only must
//   hold an even number of them. Repeating a combine with the same handle and the same x is fine.
// - Hook mode: with return_recv_hook the call launches only the send half and returns; the
//   *_recv call (same arguments, plus the handle) launches the receive half. No SM is held in
//   between. Without the hook one launch does both halves.
// - Calls without async_finish / previous_event run directly on `order.stream` (no hop through the
//   comm stream: the caller's stream is ordered exactly as if they had); otherwise as every mode.
// - topk_idx entries outside [-1, num_experts) are treated as -1 on the device (checking them on
//   the host would need a sync).
// - Shrink mode (BufferOptions::enable_shrink): an LL wait on a peer that times out masks that
//   peer instead of failing the call. The call completes with what the live ranks sent (dispatch:
//   no rows from a masked source; combine: a masked rank's experts contribute nothing), and later
//   calls skip masked peers: nothing is sent to them and nothing is waited for. The mask is this
//   rank's own view ([R] int32 on the device, read by every LL kernel, graph replays included);
//   the mask API below queries, sets and clears it. A masked rank may only take part again after
//   clean_low_latency_buffer on every rank (its call counters lag behind) and
//   low_latency_clean_mask_buffer (clean_low_latency_buffer keeps the mask). Rows of a source
//   masked while its rows of that call were arriving are not valid (its layout_range count is
//   set to 0); in the call where a peer answers exactly at the timeout, outputs of tokens routed
//   to it may or may not include its rows. Normal mode is not affected.
struct LowLatencyDispatchInputs {
  TensorView x;                              // [T, hidden] bf16, rows contiguous, 16-byte aligned; T <= Tmax
  TensorView topk_idx;                       // [T, K] i64 contiguous, K <= min(16, num_experts)
  int num_max_dispatch_tokens_per_rank = 0;  // Tmax, 1..4096
  int num_experts = 0;                       // divisible by the number of ranks
  bool use_fp8 = true;                       // cast to e4m3 per 128 channels in the kernel, else send BF16
  bool round_scale = false;                  // scales rounded up to powers of two
  bool use_ue8m0 = false;                    // scales as UE8M0 bytes packed 4 per int32 (needs round_scale)
  std::optional<TensorView> cumulative_local_expert_recv_stats;  // [E/R] i32: += rows received
  std::optional<TensorView> dispatch_wait_recv_cost_stats;       // [R] i64: += clock cycles spent
                                                                 // waiting for each source
  int num_sms = 0;                                               // blocks (one per SM); 0 = every SM of the device
};

// Caller-allocated outputs (RT = R * Tmax, G = hidden / 128). Rows of an expert past recv_count
// are not written.
struct LowLatencyDispatchOutputs {
  TensorView recv_x;  // [E/R, RT, hidden] fp8 e4m3 (use_fp8) or bf16, contiguous
  // use_fp8 && !use_ue8m0: f32 [E/R, RT, G] with strides (G*RT, 1, RT), i.e. stored [E/R][G][RT];
  // use_ue8m0: i32 [E/R, RT, ceil(G/4)] with strides (ceil(G/4)*RT, 1, RT). Unused for BF16.
  std::optional<TensorView> recv_x_scales;
  TensorView recv_count;    // [E/R] i32
  TensorView src_info;      // [E/R, RT] i32: source token index of each row
  TensorView layout_range;  // [E/R, R] i64: (begin << 32) | count of the rows from each source
};

// What combine (and get_next_low_latency_combine_buffer) needs. DeepEP's Python handle is
// (src_info, layout_range, Tmax, hidden, num_experts); epcomm's Python layer appends
// buffer_index as a sixth element.
struct LowLatencyHandle {
  TensorView src_info;      // [E/R, RT] i32
  TensorView layout_range;  // [E/R, R] i64
  int num_max_dispatch_tokens_per_rank = 0;
  int hidden = 0;
  int num_experts = 0;
  int buffer_index = 0;  // which of the two LL buffers the dispatch used (0 or 1)
};

struct LowLatencyCombineInputs {
  // [E/R, RT, hidden] bf16 contiguous: expert outputs, rows as dispatch returned them. With
  // zero_copy its data is not read (the caller wrote it into get_next_low_latency_combine_buffer);
  // its shape is still checked.
  TensorView x;
  TensorView topk_idx;      // [T, K] i64: the dispatch's
  TensorView topk_weights;  // [T, K] f32
  bool zero_copy = false;
  bool use_logfmt = false;  // accepted for compatibility; epcomm always sends BF16 (exact)
  std::optional<TensorView> combine_wait_recv_cost_stats;  // [R] i64: += cycles waiting per rank
  int num_sms = 0;                                         // 0 = every SM of the device
};
// ===================== end of low-latency mode structs =====================

class Buffer {
 public:
  Buffer(std::shared_ptr<Group> group, const BufferOptions& options);
  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  int rank() const;
  int num_ranks() const;
  int device() const;
  const Group& group() const;
  cudaStream_t comm_stream() const;
  const BufferOptions& options() const;
  // The largest T of a normal-mode dispatch (BufferOptions::max_tokens_per_rank, or its environment
  // default); a dispatch receives at most num_ranks() times as many rows.
  int max_tokens_per_rank() const;

  // This rank's part of the symmetric memory, for DeepEP's get_local_buffer_tensor: the normal-mode
  // ring region (rdma = false) or the low-latency region (rdma = true). Calls overwrite it.
  std::pair<void*, size_t> local_buffer(bool rdma) const;

  // Shapes of the handle pieces the caller allocates before dispatch_prepare.
  int chunk_offset_stride(const Config& config) const;

  Event get_dispatch_layout(const TensorView& topk_idx, int num_experts, const LayoutOutputs& out,
                            const StreamOrder& order);

  // Phase 1 of a dispatch: exchanges counts; fills handle.rank_prefix_matrix, handle.chunk_offset
  // and (if given) the device copy of the per-expert counts. Waits on the host for the counts unless
  // num_worst_tokens > 0.
  DispatchPlan dispatch_prepare(const DispatchInputs& in, DispatchHandle& handle,
                                const std::optional<TensorView>& num_recv_tokens_per_expert, const StreamOrder& order);
  // Phase 2: moves the data. handle.recv_src_idx must have plan.num_rows entries.
  Event dispatch_run(const DispatchInputs& in, const DispatchPlan& plan, DispatchHandle& handle,
                     const DispatchOutputs& out, const StreamOrder& order);
  // Cached dispatch: the routing of `handle`, new x (and scales). No count exchange, no host sync.
  Event cached_dispatch(const TensorView& x, const std::optional<TensorView>& x_scales, const DispatchHandle& handle,
                        const DispatchOutputs& out, const Config& config, const StreamOrder& order);
  Event combine(const CombineInputs& in, const DispatchHandle& handle, const CombineOutputs& out,
                const StreamOrder& order);

  // ---------------- low-latency mode (see the structs above) ----------------
  // Bytes of num_rdma_bytes low-latency mode needs for this problem (both buffers). Never more than
  // DeepEP's get_low_latency_rdma_size_hint for the same arguments.
  static size_t low_latency_size_hint(int num_max_dispatch_tokens_per_rank, int hidden, int num_ranks, int num_experts);
  // The same with the network path's area (BufferOptions::low_latency_net / EPCOMM_LL_NET): the two
  // buffers plus staging and signals (about 2 * Tmax rows and the counts more).
  static size_t low_latency_net_size_hint(int num_max_dispatch_tokens_per_rank, int hidden, int num_ranks,
                                          int num_experts);
  // Whether this buffer's LL calls send to ranks of other nodes through the network transport, and
  // its traffic counters since the last reset (synchronizes the comm stream): puts to ranks of other
  // nodes and their bytes.
  bool low_latency_uses_network() const;
  struct LowLatencyNetStats {
    uint64_t puts = 0, bytes = 0;
  };
  LowLatencyNetStats low_latency_net_stats(bool reset = false);
  // Diagnostics: with EPCOMM_LL_PROBE=1 (read when the buffer is made) every LL dispatch kernel stamps
  // per-block phase times; this waits for the comm stream and summarizes the last dispatch (send and
  // receive halves; a hook's receive counts as the last one's). Empty when the probe is off.
  std::string low_latency_probe_report();
  // Collective: zeroes both LL buffers' flags (the words LL calls wait on, not their rows) and the
  // call counters on every rank and fixes the LL shape, as work on `stream` (within a node one
  // kernel: barrier, zeroing, barrier; across nodes barrier kernels around memsets; no host wait,
  // capturable in a CUDA graph; ordered after this buffer's unfinished async_finish calls). Needed to change the
  // shape; also the way back after an LL timeout (then it first clears the recorded error, which
  // waits for the comm stream). Zeroing the region by other means (get_local_buffer_tensor) while
  // no LL call is in flight on any rank is harmless too: every flag compares with the current call
  // number, so zeros read as "not yet".
  void clean_low_latency_buffer(int num_max_dispatch_tokens_per_rank, int hidden, int num_experts,
                                cudaStream_t stream = nullptr);
  // Sends (and, without the hook, receives). Fills handle_out (views of out.src_info and
  // out.layout_range, the shape, the buffer used).
  Event low_latency_dispatch(const LowLatencyDispatchInputs& in, const LowLatencyDispatchOutputs& out,
                             LowLatencyHandle& handle_out, bool return_recv_hook, const StreamOrder& order);
  // The hook's receive half: the same arguments, and the handle the send half filled.
  Event low_latency_dispatch_recv(const LowLatencyDispatchInputs& in, const LowLatencyDispatchOutputs& out,
                                  const LowLatencyHandle& handle, const StreamOrder& order);
  // out [T, hidden] bf16: out[t] = sum over k with topk_idx[t,k] valid of w[t,k] * y(expert, t),
  // float32 in k order (multiply, then add), rounded once.
  Event low_latency_combine(const LowLatencyCombineInputs& in, const LowLatencyHandle& handle, const TensorView& out,
                            bool return_recv_hook, const StreamOrder& order);
  Event low_latency_combine_recv(const LowLatencyCombineInputs& in, const LowLatencyHandle& handle,
                                 const TensorView& out, const StreamOrder& order);
  // Where a zero_copy combine of `handle` reads y: [E/R, R*Tmax, hidden] bf16 inside the LL
  // region of this rank (the dispatch's receive area, free once its receive half ran).
  TensorView get_next_low_latency_combine_buffer(const LowLatencyHandle& handle) const;
  // Shrink mode's mask (see "Shrink mode" above), this rank's view, changed on `stream` (ordered
  // with the LL calls on it, capturable). update masks (mask = true) or unmasks one rank; masking
  // needs BufferOptions::enable_shrink and another rank than this one (ArgumentError). query
  // writes 1 (masked) or 0 for every rank into mask_status ([R] i32 on this device). clean
  // unmasks every rank.
  void low_latency_update_mask_buffer(int rank, bool mask, cudaStream_t stream = nullptr);
  void low_latency_query_mask_buffer(const TensorView& mask_status, cudaStream_t stream = nullptr);
  void low_latency_clean_mask_buffer(cudaStream_t stream = nullptr);
  // -------------------------- end of low-latency mode --------------------------

  // ---------------- across nodes (normal mode, hierarchical; docs/design-internode.md) ----------------
  // With more than one node (Group::ranks_per_node < size, e.g. EPCOMM_RANKS_PER_NODE) dispatch and
  // combine take the hierarchical path by themselves. It needs num_rdma_bytes of at least this
  // (the data halves; the control part, a few MiB, comes on top of it). The data lie on the LL
  // region, which both modes share: a low-latency call after normal-mode calls takes
  // clean_low_latency_buffer first (ArgumentError otherwise). Same arguments on every rank.
  static size_t internode_size_hint(int max_tokens_per_rank, int hidden, int num_ranks, int ranks_per_node,
                                    int num_topk, int max_experts_per_rank = 1024);
  // A smaller num_rdma_bytes works too: the rows hold a window of tokens per node, and a call with
  // more tokens than a window runs ceil(T / window) rounds (more time, the same results). The
  // windows a region gives, for BF16 dispatch rows and for the combine (0: not one round fits, and
  // the call is refused naming the size); max_tokens_per_rank is the buffer's token limit
  // (BufferOptions::max_tokens_per_rank, 65536 by default), chunk Config::chunk_tokens().
  // num_nvl_bytes: the windows with BufferOptions::internode_combine_nvl on and this num_nvl_bytes
  // (0: off): its part of the region then holds the rows node peers push to a token's forwarder in
  // combine, and num_rdma_bytes only the node partials (with 8 ranks per node about 3 x the
  // combine's window, 5 x with BufferOptions::internode_bf16_partials's narrower rows).
  struct InternodeWindows {
    int dispatch = 0, combine = 0;
  };
  static InternodeWindows internode_windows(size_t num_rdma_bytes, int max_tokens_per_rank, int hidden, int num_ranks,
                                            int ranks_per_node, int num_topk, int max_experts_per_rank = 1024,
                                            int chunk = 32, size_t num_nvl_bytes = 0);
  // Traffic counters of this rank's internode calls since the last reset (synchronizes the comm
  // stream): puts to ranks of other nodes and their bytes (count meta, masks, rows), rows sent over
  // the network, and bytes of rows this rank read from / wrote to node peers over NVLink.
  // `control`: the region's signal counters, shadows, node flags and call counters, as text (for
  // diagnosing a failed call). `rounds`: kernel rounds the calls ran; a call whose tokens the region
  // holds at once runs one, a smaller num_rdma_bytes runs more (each a window of tokens per node).
  struct InternodeStats {
    uint64_t network_puts = 0, network_bytes = 0, network_rows = 0, nvlink_bytes = 0, rounds = 0;
    std::string control;
  };
  InternodeStats internode_stats(bool reset = false);
  // ------------------------------- end of across nodes -------------------------------

  // Raises the error a GPU wait recorded (TimeoutError), if any, and clears it so the buffer can be
  // used again. Reads host memory only; every entry point calls it before it launches.
  void check_device_errors();

  // Collective: brings every rank's buffer back to a clean state after an error (a timed-out wait
  // leaves flags and counters of an unfinished call behind). Every rank must call it; no call may
  // be in flight. Afterwards the buffer works as if new. A rank that meets a peer at another
  // collective step (Group::barrier names them) throws RuntimeFailure before it clears anything.
  void reset();

  struct Impl;  // private state (src/core/buffer_impl.hpp)

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace epcomm
