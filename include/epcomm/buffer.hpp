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
#include <vector>

#include "epcomm/config.hpp"
#include "epcomm/group.hpp"
#include "epcomm/types.hpp"

namespace epcomm {

struct BufferOptions {
  size_t num_nvl_bytes = 0;            // NVLink ring memory (normal mode); see Config hints
  size_t num_rdma_bytes = 0;           // low-latency and network-hop memory
  bool low_latency_mode = false;
  int max_tokens_per_rank = 0;         // normal mode; 0 = EPCOMM_MAX_TOKENS_PER_RANK
  int max_experts_per_rank = 0;        // 0 = EPCOMM_MAX_EXPERTS_PER_RANK
  int64_t timeout_ms = 0;              // 0 = EPCOMM_TIMEOUT_MS
};

// How a call orders itself with the caller's work.
struct StreamOrder {
  cudaStream_t stream = nullptr;          // the caller's stream
  cudaEvent_t previous_event = nullptr;   // if set, wait for this instead of `stream`
  bool async_finish = false;              // if set, `stream` does not wait; the call returns an event
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
  TensorView x;                                   // [T, hidden] bf16 or fp8 e4m3, rows contiguous
  std::optional<TensorView> x_scales;             // fp8: [T, ceil(hidden/128)] f32, any strides
  std::optional<TensorView> topk_idx;             // [T, K] i64 (global expert ids, -1 = none)
  std::optional<TensorView> topk_weights;         // [T, K] f32
  std::optional<TensorView> num_tokens_per_rank;  // [R] i32 (from the layout)
  std::optional<TensorView> is_token_in_rank;     // [T, R] bool
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
  TensorView recv_x;                              // [num_rows, hidden], dtype of x
  std::optional<TensorView> recv_x_scales;        // [num_rows, ceil(hidden/128)] f32
  std::optional<TensorView> recv_topk_idx;        // [num_rows, K] i64
  std::optional<TensorView> recv_topk_weights;    // [num_rows, K] f32
};

struct CombineInputs {
  TensorView x;                                   // [num_recv, hidden] bf16, rows as dispatch gave them
  std::optional<TensorView> topk_weights;         // [num_recv, K] f32
  std::optional<TensorView> bias0, bias1;         // [T, hidden] bf16
  Config config;
};

struct CombineOutputs {
  TensorView combined_x;                          // [T, hidden] bf16
  std::optional<TensorView> combined_topk_weights;  // [T, K] f32
};

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

  // Shapes of the handle pieces the caller allocates before dispatch_prepare.
  int chunk_offset_stride(const Config& config) const;

  Event get_dispatch_layout(const TensorView& topk_idx, int num_experts, const LayoutOutputs& out,
                            const StreamOrder& order);

  // Phase 1 of a dispatch: exchanges counts; fills handle.rank_prefix_matrix, handle.chunk_offset
  // and (if given) the device copy of the per-expert counts. Waits on the host for the counts unless
  // num_worst_tokens > 0.
  DispatchPlan dispatch_prepare(const DispatchInputs& in, DispatchHandle& handle,
                                const std::optional<TensorView>& num_recv_tokens_per_expert,
                                const StreamOrder& order);
  // Phase 2: moves the data. handle.recv_src_idx must have plan.num_rows entries.
  Event dispatch_run(const DispatchInputs& in, const DispatchPlan& plan, DispatchHandle& handle,
                     const DispatchOutputs& out, const StreamOrder& order);
  // Cached dispatch: the routing of `handle`, new x (and scales). No count exchange, no host sync.
  Event cached_dispatch(const TensorView& x, const std::optional<TensorView>& x_scales,
                        const DispatchHandle& handle, const DispatchOutputs& out, const Config& config,
                        const StreamOrder& order);
  Event combine(const CombineInputs& in, const DispatchHandle& handle, const CombineOutputs& out,
                const StreamOrder& order);

  // Raises the error a GPU wait recorded (TimeoutError), if any, and clears it so the buffer can be
  // used again. Reads host memory only; every entry point calls it before it launches.
  void check_device_errors();

  // Collective: brings every rank's buffer back to a clean state after an error (a timed-out wait
  // leaves flags and counters of an unfinished call behind). Every rank must call it; no call may
  // be in flight. Afterwards the buffer works as if new.
  void reset();

  struct Impl;  // private state (src/core/buffer_impl.hpp)

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace epcomm
