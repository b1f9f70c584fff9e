// Buffer: low-latency mode (docs/contract.md §3.3): buffer alternation, path choice, stream order
// and launches of dispatch and combine. The scheme is described in kernels/low_latency/params.hpp;
// the argument checks are in buffer_low_latency_checks.cpp, the region's state (setup, clean, the
// shrink mask) in buffer_low_latency_state.cpp, EPCOMM_LL_PROBE's report in
// buffer_low_latency_probe.cpp.
//
// Peers are addressed through CommonParams::peer_base (NVLink load/store). With more than one node
// and the network path (ll.net: EPCOMM_LL_NET / BufferOptions::low_latency_net over virtual nodes,
// always across real nodes) the ranks of other nodes are reached only through the network
// transport: the emulated one over virtual nodes, NCCL GIN across real nodes (Impl::gin).
#include "core/buffer_low_latency.hpp"
#include "core/call_check.hpp"
#include "transport/gin_context.hpp"
#include "transport/net_params.hpp"

namespace epcomm {
namespace low_latency {
namespace {

// LL calls without async_finish / previous_event launch straight on the caller's stream: the same
// order as enter()/leave() give, without two event hops (a few microseconds each on the GPU).
bool direct(const StreamOrder& order) { return !order.async_finish && order.previous_event == nullptr; }

}  // namespace

cudaStream_t begin_call(Buffer::Impl& m, const StreamOrder& order) {
  if (direct(order)) {
    EPCOMM_CUDA_CHECK(cudaSetDevice(m.device));
    if (m.comm_unjoined && !m.capturing(order.stream)) {
      // An async_finish call may still run on the comm stream (its event not waited for): this
      // call comes after it, as it would on the comm stream (DeepEP's order).
      EPCOMM_CUDA_CHECK(cudaEventRecord(m.done_event, m.comm));
      EPCOMM_CUDA_CHECK(cudaStreamWaitEvent(order.stream, m.done_event, 0));
      m.comm_unjoined = false;
    }
    return order.stream;
  }
  m.enter(order);
  return m.comm;
}

Event end_call(Buffer::Impl& m, const StreamOrder& order) {
  if (!direct(order)) return m.leave(order);
  // The comm stream follows the call too (at its next synchronization: Impl::note_direct_call), so
  // whatever synchronizes it (check_device_errors, reset, the destructor) also waits for this
  // kernel. Not while capturing: that would pull the comm stream into the caller's graph.
  if (!m.capturing(order.stream)) m.note_direct_call(order.stream);
  return Event();
}

}  // namespace low_latency

using namespace low_latency;

namespace {

// The network path's transport arguments: every rank's LL region as its window (virtual nodes:
// all load/store reachable), the signal array, the traffic counters in the device state.
EmulatedNetParams ll_net_params(const Buffer::Impl& m, const LowLatencyNetLayout& nl) {
  EmulatedNetParams n;
  n.window = m.ll_windows();
  n.signals = nl.signals;
  n.stats = reinterpret_cast<uint64_t*>(&m.ll.state->net_stats[0]);
  n.ranks_per_node = m.group->ranks_per_node();
  return n;
}

// The per-rank dispatch (EPCOMM_LL_PER_RANK >= 1) where its staging slots fit the layout (E/R >= 2, or FP8)
// and its shared memory fits the device; otherwise the per-expert path. Every rank decides alike.
bool use_per_rank(const Buffer::Impl& m, const LowLatencyLayout& l, bool use_fp8, int blocks) {
  if (m.ll.net) return false;  // the network path has the per-expert kernels only
  return low_latency_per_rank_wanted(l, use_fp8, m.ll.per_rank_level) &&
         low_latency_dispatch_launch_shared_bytes(l, blocks, 1, true, kLowLatencySend | kLowLatencyRecv) <= m.max_smem;
}

// The per-rank combine (levels 2, 3, 4) needs the per-rank dispatch's plan, where it fits.
LowLatencyPartials combine_partials(const Buffer::Impl& m, bool per_rank_dispatch, const LowLatencyLayout& l) {
  return per_rank_dispatch ? low_latency_partials(l, m.ll.per_rank_level) : LowLatencyPartials::kNone;
}

Event launch_dispatch_phases(Buffer::Impl& m, const LowLatencyDispatchInputs& in, const LowLatencyDispatchOutputs& out,
                             const DispatchCall& call, int buffer, int phases, bool per_rank,
                             const StreamOrder& order) {
  const LowLatencyLayout& l = call.layout;
  LowLatencyDispatchParams p;
  p.common = m.common(KernelId::kLowLatencyDispatch);
  p.layout = l;
  p.region = m.ll.offset;
  p.state = m.ll.state;
  p.buffer = buffer;
  p.phases = phases;
  p.num_tokens = call.num_tokens;
  p.num_topk = call.num_topk;
  p.use_fp8 = in.use_fp8;
  p.round_scale = in.round_scale;
  p.use_ue8m0 = in.use_ue8m0;
  p.per_rank = per_rank;
  p.per_rank_combine = combine_partials(m, per_rank, l) != LowLatencyPartials::kNone;
  const int smem_limit = m.ll.net ? m.max_smem - kLowLatencyNetStaticSmem : m.max_smem;
  p.staging_buffers =
      low_latency_dispatch_launch_shared_bytes(l, call.blocks, 2, per_rank, phases) <= smem_limit ? 2 : 1;
  p.x = in.x.ptr<const uint16_t>();
  p.topk_idx = in.topk_idx.ptr<const int64_t>();
  p.recv_x = out.recv_x.ptr<uint8_t>();
  if (in.use_fp8 && !in.use_ue8m0) p.recv_scales = out.recv_x_scales->ptr<float>();
  if (in.use_fp8 && in.use_ue8m0) p.recv_scales_packed = out.recv_x_scales->ptr<int32_t>();
  p.recv_count = out.recv_count.ptr<int32_t>();
  p.src_info = out.src_info.ptr<int32_t>();
  p.layout_range = out.layout_range.ptr<int64_t>();
  if (in.cumulative_local_expert_recv_stats)
    p.cumulative_recv_stats = in.cumulative_local_expert_recv_stats->ptr<int32_t>();
  if (in.dispatch_wait_recv_cost_stats) p.wait_cost_stats = in.dispatch_wait_recv_cost_stats->ptr<int64_t>();
  if (m.options.enable_shrink) {
    p.mask = m.ll.mask;
    p.count_decisions = m.ll.count_decisions;
  }
  p.probe = m.ll.probe;
  const int smem = low_latency_dispatch_launch_shared_bytes(l, call.blocks, p.staging_buffers, per_rank, phases);
  cudaStream_t stream = begin_call(m, order);
  if (m.ll.net) {
    LowLatencyNetArgs a;
    a.layout = LowLatencyNetLayout::make(l);
    a.ranks_per_node = m.group->ranks_per_node();
    if (m.gin) launch_low_latency_dispatch_gin(p, a, m.low_latency_gin_params(), call.blocks, smem, stream);
    else launch_low_latency_dispatch_net(p, a, ll_net_params(m, a.layout), call.blocks, smem, stream);
  } else {
    launch_low_latency_dispatch(p, call.blocks, smem, stream);
  }
  return end_call(m, order);
}

Event launch_combine_phases(Buffer::Impl& m, const LowLatencyCombineInputs& in, const LowLatencyHandle& h,
                            const TensorView& out, const CombineCall& call, int phases, const StreamOrder& order) {
  const LowLatencyLayout& l = call.layout;
  LowLatencyCombineParams p;
  p.common = m.common(KernelId::kLowLatencyCombine);
  p.layout = l;
  p.region = m.ll.offset;
  p.state = m.ll.state;
  p.buffer = h.buffer_index;
  p.phases = phases;
  p.num_tokens = call.num_tokens;
  p.num_topk = call.num_topk;
  p.y = in.zero_copy ? reinterpret_cast<const uint16_t*>(static_cast<const char*>(m.sym->local()) + m.ll.offset +
                                                         l.message(h.buffer_index, 0, 0, 0))
                     : in.x.ptr<const uint16_t>();
  p.layout_range = h.layout_range.ptr<const int64_t>();
  p.partials = m.ll.partials[h.buffer_index];
  p.topk_idx = in.topk_idx.ptr<const int64_t>();
  p.topk_weights = in.topk_weights.ptr<const float>();
  p.out = out.ptr<uint16_t>();
  if (in.combine_wait_recv_cost_stats) p.wait_cost_stats = in.combine_wait_recv_cost_stats->ptr<int64_t>();
  if (m.options.enable_shrink) p.mask = m.ll.mask;
  cudaStream_t stream = begin_call(m, order);
  if (m.ll.net) {
    LowLatencyNetArgs a;
    a.layout = LowLatencyNetLayout::make(l);
    a.ranks_per_node = m.group->ranks_per_node();
    a.y_in_window = in.zero_copy;
    if (m.gin) launch_low_latency_combine_gin(p, a, m.low_latency_gin_params(), call.blocks, stream);
    else launch_low_latency_combine_net(p, a, ll_net_params(m, a.layout), call.blocks, stream);
  } else {
    launch_low_latency_combine(p, call.blocks, stream);
  }
  return end_call(m, order);
}

}  // namespace

Event Buffer::low_latency_dispatch(const LowLatencyDispatchInputs& in, const LowLatencyDispatchOutputs& out,
                                   LowLatencyHandle& handle_out, bool return_recv_hook, const StreamOrder& order) {
  Impl& m = *impl_;
  check_device_errors();
  const DispatchCall call = check_dispatch(m, in, out);
  const int buffer = m.ll.next_buffer;
  const int phases = return_recv_hook ? kLowLatencySend : (kLowLatencySend | kLowLatencyRecv);
  const bool per_rank = use_per_rank(m, call.layout, in.use_fp8, call.blocks);
  Event e = launch_dispatch_phases(m, in, out, call, buffer, phases, per_rank, order);
  m.ll.layout = call.layout;
  m.ll.per_rank[buffer] = per_rank;
  m.ll.partials[buffer] = combine_partials(m, per_rank, call.layout);
  m.ll.next_buffer = buffer ^ 1;
  m.ll.issued_src_info[buffer] = out.src_info.data;
  m.ll.issued_tokens[buffer] = call.num_tokens;
  m.ll.issued_topk[buffer] = call.num_topk;
  handle_out.src_info = out.src_info;
  handle_out.layout_range = out.layout_range;
  handle_out.num_max_dispatch_tokens_per_rank = call.layout.max_tokens;
  handle_out.hidden = call.layout.hidden;
  handle_out.num_experts = call.layout.num_experts;
  handle_out.buffer_index = buffer;
  return e;
}

Event Buffer::low_latency_dispatch_recv(const LowLatencyDispatchInputs& in, const LowLatencyDispatchOutputs& out,
                                        const LowLatencyHandle& handle, const StreamOrder& order) {
  Impl& m = *impl_;
  check_device_errors();
  const DispatchCall call = check_dispatch(m, in, out);
  check_handle(m, handle, call.layout);
  return launch_dispatch_phases(m, in, out, call, handle.buffer_index, kLowLatencyRecv,
                                m.ll.per_rank[handle.buffer_index], order);
}

Event Buffer::low_latency_combine(const LowLatencyCombineInputs& in, const LowLatencyHandle& handle,
                                  const TensorView& out, bool return_recv_hook, const StreamOrder& order) {
  Impl& m = *impl_;
  check_device_errors();
  const CombineCall call = check_combine(m, in, handle, out);
  const int phases = return_recv_hook ? kLowLatencySend : (kLowLatencySend | kLowLatencyRecv);
  Event e = launch_combine_phases(m, in, handle, out, call, phases, order);
  m.ll.layout = call.layout;
  return e;
}

Event Buffer::low_latency_combine_recv(const LowLatencyCombineInputs& in, const LowLatencyHandle& handle,
                                       const TensorView& out, const StreamOrder& order) {
  Impl& m = *impl_;
  check_device_errors();
  const CombineCall call = check_combine(m, in, handle, out);
  return launch_combine_phases(m, in, handle, out, call, kLowLatencyRecv, order);
}

TensorView Buffer::get_next_low_latency_combine_buffer(const LowLatencyHandle& handle) const {
  const Impl& m = *impl_;
  const LowLatencyLayout l = layout_for(m, handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts);
  check_handle(m, handle, l);
  void* base = static_cast<char*>(m.sym->local()) + m.ll.offset + l.message(handle.buffer_index, 0, 0, 0);
  return TensorView::contiguous(base, DType::kBF16,
                                {l.local_experts, static_cast<int64_t>(m.num_ranks) * l.max_tokens, l.hidden},
                                m.device);
}

}  // namespace epcomm
