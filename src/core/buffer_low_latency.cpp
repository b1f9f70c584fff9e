// Buffer: low-latency mode (docs/contract.md §3.3): size hint, argument checks, buffer alternation, launches.
// The scheme is described in kernels/low_latency/params.hpp.
//
// Peers are addressed through CommonParams::peer_base (NVLink load/store). With more than one node
// and the network path (ll.net: EPCOMM_LL_NET / BufferOptions::low_latency_net over virtual nodes,
// always across real nodes) the ranks of other nodes are reached only through the network
// transport: the emulated one over virtual nodes, NCCL GIN across real nodes (Impl::gin).
#include <algorithm>
#include <iterator>
#include <cstdio>
#include <vector>
#include <string>

#include "core/buffer_impl.hpp"
#include "core/argument_checks.hpp"
#include "core/call_check.hpp"
#include "core/env.hpp"
#include "epcomm/error.hpp"
#include "transport/gin_context.hpp"
#include "transport/net_params.hpp"

namespace epcomm {
namespace {

std::string shape_text(int tmax, int hidden, int num_ranks, int num_experts) {
  return "num_max_dispatch_tokens_per_rank = " + std::to_string(tmax) + ", hidden = " + std::to_string(hidden) +
         ", num_ranks = " + std::to_string(num_ranks) + ", num_experts = " + std::to_string(num_experts);
}

void check_problem(int tmax, int hidden, int num_ranks, int num_experts) {
  checks::in_range("num_max_dispatch_tokens_per_rank", tmax, 1, kLowLatencyMaxTokens);
  if (hidden <= 0 || hidden % kLowLatencyScaleGroup != 0)
    throw ArgumentError("hidden = " + std::to_string(hidden) + " must be a positive multiple of " +
                        std::to_string(kLowLatencyScaleGroup) + " in low-latency mode");
  checks::positive("num_ranks", num_ranks);
  checks::positive("num_experts", num_experts);
  checks::divisible("num_experts", num_experts, "num_ranks", num_ranks);
}

// The layout of this call, checked against the buffer (size, and the shape fixed earlier). Not
// committed: the caller commits it once every other check passed.
LowLatencyLayout layout_for(const Buffer::Impl& m, int tmax, int hidden, int num_experts) {
  check_problem(tmax, hidden, m.num_ranks, num_experts);
  if (num_experts / m.num_ranks > m.max_local_experts)
    throw ArgumentError("num_experts / num_ranks = " + std::to_string(num_experts / m.num_ranks) +
                        " exceeds the buffer's max_experts_per_rank = " + std::to_string(m.max_local_experts) +
                        " (EPCOMM_MAX_EXPERTS_PER_RANK)");
  const LowLatencyLayout l = LowLatencyLayout::make(tmax, hidden, m.num_ranks, num_experts);
  if (l.total_bytes > m.options.num_rdma_bytes)
    throw ArgumentError("num_rdma_bytes = " + std::to_string(m.options.num_rdma_bytes) +
                        " is too small for low-latency mode with " +
                        shape_text(tmax, hidden, m.num_ranks, num_experts) + ": it needs " +
                        std::to_string(l.total_bytes) +
                        " bytes (Buffer::low_latency_size_hint, Python get_low_latency_rdma_size_hint)");
  if (m.ll.net && LowLatencyNetLayout::make(l).end > m.options.num_rdma_bytes)
    throw ArgumentError("num_rdma_bytes = " + std::to_string(m.options.num_rdma_bytes) +
                        " is too small for low-latency mode through the network transport (EPCOMM_LL_NET / "
                        "BufferOptions::low_latency_net) with " + shape_text(tmax, hidden, m.num_ranks, num_experts) +
                        ": it needs " + std::to_string(LowLatencyNetLayout::make(l).end) +
                        " bytes (Buffer::low_latency_net_size_hint)");
  if (m.ll.layout.max_tokens != 0 && !m.ll.layout.same_shape(l))
    throw ArgumentError("low-latency shape changed from " +
                        shape_text(m.ll.layout.max_tokens, m.ll.layout.hidden, m.num_ranks, m.ll.layout.num_experts) +
                        " to " + shape_text(tmax, hidden, m.num_ranks, num_experts) +
                        ": call clean_low_latency_buffer with the new shape on every rank first");
  return l;
}

int blocks_for(const Buffer::Impl& m, int num_sms) {
  if (num_sms == 0) return m.sm_count;
  checks::in_range("num_sms", num_sms, 1, m.sm_count);
  return num_sms;
}

void check_strided3(const char* name, const TensorView& t, int device, DType dtype, int64_t d0, int64_t d1, int64_t d2,
                    int64_t s0, int64_t s1, int64_t s2, const char* layout) {
  checks::device_tensor(name, t, device, {dtype}, 3, /*need_contiguous=*/false);
  checks::dim(name, t, 0, d0, "num_experts / num_ranks");
  checks::dim(name, t, 1, d1, "num_ranks * num_max_dispatch_tokens_per_rank");
  checks::dim(name, t, 2, d2, "scale columns");
  const int64_t want[3] = {s0, s1, s2}, size[3] = {d0, d1, d2};
  for (int i = 0; i < 3; ++i)
    if (size[i] > 1 && t.strides[i] != want[i])
      throw ArgumentError(std::string(name) + ": strides must be (" + std::to_string(s0) + ", " + std::to_string(s1) +
                          ", " + std::to_string(s2) + "), " + layout + " (got " + t.describe() + " with strides (" +
                          std::to_string(t.strides[0]) + ", " + std::to_string(t.strides[1]) + ", " +
                          std::to_string(t.strides[2]) + "))");
}

struct DispatchCall {
  LowLatencyLayout layout;
  int num_tokens = 0, num_topk = 0, blocks = 0;
};

DispatchCall check_dispatch(const Buffer::Impl& m, const LowLatencyDispatchInputs& in,
                            const LowLatencyDispatchOutputs& out) {
  DispatchCall call;
  const int R = m.num_ranks;
  checks::device_tensor("x", in.x, m.device, {DType::kBF16}, 2);
  checks::aligned("x", in.x, 16);
  const LowLatencyLayout l =
      layout_for(m, in.num_max_dispatch_tokens_per_rank, static_cast<int>(in.x.shape[1]), in.num_experts);
  const int EL = l.local_experts, H = l.hidden, G = H / kLowLatencyScaleGroup, W = (G + 3) / 4;
  const int64_t RT = static_cast<int64_t>(R) * l.max_tokens;
  const int T = static_cast<int>(in.x.shape[0]);
  if (T > l.max_tokens)
    throw ArgumentError("x: " + std::to_string(T) + " tokens exceed num_max_dispatch_tokens_per_rank = " +
                        std::to_string(l.max_tokens));
  checks::device_tensor("topk_idx", in.topk_idx, m.device, {DType::kI64}, 2);
  checks::dim("topk_idx", in.topk_idx, 0, T, "tokens of x");
  const int K = static_cast<int>(in.topk_idx.shape[1]);
  if (K < 1 || K > l.kslots)
    throw ArgumentError("num_topk = " + std::to_string(K) + " must be in [1, " + std::to_string(l.kslots) +
                        "] (low-latency mode: at most min(16, num_experts))");
  if (in.use_ue8m0 && !in.use_fp8) throw ArgumentError("use_ue8m0 = true requires use_fp8 = true");
  if (in.use_ue8m0 && !in.round_scale)
    throw ArgumentError("use_ue8m0 = true requires round_scale = true (UE8M0 scales are powers of two)");

  checks::device_tensor("recv_x", out.recv_x, m.device, {in.use_fp8 ? DType::kFP8E4M3 : DType::kBF16}, 3);
  checks::aligned("recv_x", out.recv_x, 16);
  checks::dim("recv_x", out.recv_x, 0, EL, "num_experts / num_ranks");
  checks::dim("recv_x", out.recv_x, 1, RT, "num_ranks * num_max_dispatch_tokens_per_rank");
  checks::dim("recv_x", out.recv_x, 2, H, "hidden");
  if (in.use_fp8) {
    if (!out.recv_x_scales) throw ArgumentError("recv_x_scales: needed when use_fp8 = true");
    if (in.use_ue8m0)
      check_strided3("recv_x_scales", *out.recv_x_scales, m.device, DType::kI32, EL, RT, W, W * RT, 1, RT,
                     "i.e. an [E/R][ceil(hidden/512)][R*Tmax] int32 tensor transposed");
    else
      check_strided3("recv_x_scales", *out.recv_x_scales, m.device, DType::kF32, EL, RT, G, G * RT, 1, RT,
                     "i.e. an [E/R][hidden/128][R*Tmax] float32 tensor transposed");
  }
  checks::device_tensor("recv_count", out.recv_count, m.device, {DType::kI32}, 1);
  checks::dim("recv_count", out.recv_count, 0, EL, "num_experts / num_ranks");
  checks::device_tensor("src_info", out.src_info, m.device, {DType::kI32}, 2);
  checks::dim("src_info", out.src_info, 0, EL, "num_experts / num_ranks");
  checks::dim("src_info", out.src_info, 1, RT, "num_ranks * num_max_dispatch_tokens_per_rank");
  checks::device_tensor("layout_range", out.layout_range, m.device, {DType::kI64}, 2);
  checks::dim("layout_range", out.layout_range, 0, EL, "num_experts / num_ranks");
  checks::dim("layout_range", out.layout_range, 1, R, "num_ranks");
  if (in.cumulative_local_expert_recv_stats) {
    checks::device_tensor("cumulative_local_expert_recv_stats", *in.cumulative_local_expert_recv_stats, m.device,
                          {DType::kI32}, 1);
    checks::dim("cumulative_local_expert_recv_stats", *in.cumulative_local_expert_recv_stats, 0, EL,
                "num_experts / num_ranks");
  }
  if (in.dispatch_wait_recv_cost_stats) {
    checks::device_tensor("dispatch_wait_recv_cost_stats", *in.dispatch_wait_recv_cost_stats, m.device, {DType::kI64}, 1);
    checks::dim("dispatch_wait_recv_cost_stats", *in.dispatch_wait_recv_cost_stats, 0, R, "num_ranks");
  }
  call.blocks = blocks_for(m, in.num_sms);
  // The network path's kernel has kLowLatencyNetStaticSmem of static shared memory besides.
  const int smem_limit = m.ll.net ? m.max_smem - kLowLatencyNetStaticSmem : m.max_smem;
  if (low_latency_dispatch_shared_bytes(l, call.blocks, 1) > smem_limit)
    throw ArgumentError("hidden = " + std::to_string(H) + " with num_experts = " + std::to_string(l.num_experts) +
                        " needs " + std::to_string(low_latency_dispatch_shared_bytes(l, call.blocks, 1)) +
                        " bytes of shared memory per block in low-latency dispatch; the device has " +
                        std::to_string(smem_limit));
  call.layout = l;
  call.num_tokens = T;
  call.num_topk = K;
  return call;
}

void check_handle(const Buffer::Impl& m, const LowLatencyHandle& h, const LowLatencyLayout& l) {
  const int64_t RT = static_cast<int64_t>(m.num_ranks) * l.max_tokens;
  if (h.num_max_dispatch_tokens_per_rank != l.max_tokens || h.hidden != l.hidden || h.num_experts != l.num_experts)
    throw ArgumentError("handle: made for " +
                        shape_text(h.num_max_dispatch_tokens_per_rank, h.hidden, m.num_ranks, h.num_experts) +
                        ", but this call has " + shape_text(l.max_tokens, l.hidden, m.num_ranks, l.num_experts));
  checks::in_range("handle.buffer_index", h.buffer_index, 0, 1);
  if (h.src_info.data != m.ll.issued_src_info[h.buffer_index])
    throw ArgumentError("handle: not the handle of this buffer's latest low-latency dispatch into buffer " +
                        std::to_string(h.buffer_index) +
                        " (a handle of another Buffer, one from before clean_low_latency_buffer / reset, or one "
                        "whose buffer a later dispatch took: a dispatch's combine must come before the "
                        "dispatch after next)");
  checks::device_tensor("handle.src_info", h.src_info, m.device, {DType::kI32}, 2);
  checks::dim("handle.src_info", h.src_info, 0, l.local_experts, "num_experts / num_ranks");
  checks::dim("handle.src_info", h.src_info, 1, RT, "num_ranks * num_max_dispatch_tokens_per_rank");
  checks::device_tensor("handle.layout_range", h.layout_range, m.device, {DType::kI64}, 2);
  checks::dim("handle.layout_range", h.layout_range, 0, l.local_experts, "num_experts / num_ranks");
  checks::dim("handle.layout_range", h.layout_range, 1, m.num_ranks, "num_ranks");
}

// LL calls without async_finish / previous_event launch straight on the caller's stream: the same
// order as enter()/leave() give, without two event hops (a few microseconds each on the GPU).
bool direct(const StreamOrder& order) { return !order.async_finish && order.previous_event == nullptr; }

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
  // The comm stream follows the call too, so whatever synchronizes it (check_device_errors, reset,
  // the destructor) also waits for this kernel. Not while capturing: that would pull the comm
  // stream into the caller's graph.
  if (!m.capturing(order.stream)) {
    EPCOMM_CUDA_CHECK(cudaEventRecord(m.order_event, order.stream));
    EPCOMM_CUDA_CHECK(cudaStreamWaitEvent(m.comm, m.order_event, 0));
  }
  return Event();
}

// The per-rank dispatch (EPCOMM_LL_PER_RANK >= 1) where its staging slots fit the layout (E/R >= 2, or FP8)
// and its shared memory fits the device; otherwise the per-expert path. Every rank decides alike.
// The network path's transport arguments: every rank's LL region as its window (virtual nodes:
// all load/store reachable), the signal array, the traffic counters in the device state.
EmulatedNetParams ll_net_params(const Buffer::Impl& m, const CommonParams& c, const LowLatencyNetLayout& nl) {
  EmulatedNetParams n;
  for (int r = 0; r < m.num_ranks && r < kMaxInterRanks; ++r) n.window[r] = c.peer_base[r] + m.ll.offset;
  n.signals = nl.signals;
  n.stats = reinterpret_cast<uint64_t*>(&m.ll.state->net_stats[0]);
  n.ranks_per_node = m.group->ranks_per_node();
  return n;
}

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
                             const DispatchCall& call, int buffer, int phases, bool per_rank, const StreamOrder& order) {
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
  p.staging_buffers = low_latency_dispatch_launch_shared_bytes(l, call.blocks, 2, per_rank, phases) <= smem_limit ? 2 : 1;
  p.x = in.x.ptr<const uint16_t>();
  p.topk_idx = in.topk_idx.ptr<const int64_t>();
  p.recv_x = out.recv_x.ptr<uint8_t>();
  if (in.use_fp8 && !in.use_ue8m0) p.recv_scales = out.recv_x_scales->ptr<float>();
  if (in.use_fp8 && in.use_ue8m0) p.recv_scales_packed = out.recv_x_scales->ptr<int32_t>();
  p.recv_count = out.recv_count.ptr<int32_t>();
  p.src_info = out.src_info.ptr<int32_t>();
  p.layout_range = out.layout_range.ptr<int64_t>();
  if (in.cumulative_local_expert_recv_stats) p.cumulative_recv_stats = in.cumulative_local_expert_recv_stats->ptr<int32_t>();
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
    if (m.gin)
      launch_low_latency_dispatch_gin(p, a, m.low_latency_gin_params(), call.blocks, smem, stream);
    else
      launch_low_latency_dispatch_net(p, a, ll_net_params(m, p.common, a.layout), call.blocks, smem, stream);
  } else {
    launch_low_latency_dispatch(p, call.blocks, smem, stream);
  }
  return end_call(m, order);
}

struct CombineCall {
  LowLatencyLayout layout;
  int num_tokens = 0, num_topk = 0, blocks = 0;
};

CombineCall check_combine(const Buffer::Impl& m, const LowLatencyCombineInputs& in, const LowLatencyHandle& h,
                          const TensorView& out) {
  CombineCall call;
  const LowLatencyLayout l = layout_for(m, h.num_max_dispatch_tokens_per_rank, h.hidden, h.num_experts);
  check_handle(m, h, l);
  const int64_t RT = static_cast<int64_t>(m.num_ranks) * l.max_tokens;
  checks::device_tensor("x", in.x, m.device, {DType::kBF16}, 3);
  checks::aligned("x", in.x, 16);
  checks::dim("x", in.x, 0, l.local_experts, "num_experts / num_ranks");
  checks::dim("x", in.x, 1, RT, "num_ranks * num_max_dispatch_tokens_per_rank");
  checks::dim("x", in.x, 2, l.hidden, "hidden");
  checks::device_tensor("topk_idx", in.topk_idx, m.device, {DType::kI64}, 2);
  const int T = static_cast<int>(in.topk_idx.shape[0]);
  const int K = static_cast<int>(in.topk_idx.shape[1]);
  if (T > l.max_tokens)
    throw ArgumentError("topk_idx: " + std::to_string(T) + " tokens exceed num_max_dispatch_tokens_per_rank = " +
                        std::to_string(l.max_tokens));
  if (K < 1 || K > l.kslots)
    throw ArgumentError("num_topk = " + std::to_string(K) + " must be in [1, " + std::to_string(l.kslots) +
                        "] (low-latency mode: at most min(16, num_experts))");
  // The dispatch's plan covers its own tokens and top-k slots: a combine over others would wait for
  // rows that never come or read weights past their end.
  if (T != m.ll.issued_tokens[h.buffer_index] || K != m.ll.issued_topk[h.buffer_index])
    throw ArgumentError("topk_idx: [" + std::to_string(T) + ", " + std::to_string(K) + "], but the dispatch of this "
                        "handle had [" + std::to_string(m.ll.issued_tokens[h.buffer_index]) + ", " +
                        std::to_string(m.ll.issued_topk[h.buffer_index]) + "]: a combine takes its dispatch's topk_idx");
  checks::device_tensor("topk_weights", in.topk_weights, m.device, {DType::kF32}, 2);
  checks::dim("topk_weights", in.topk_weights, 0, T, "tokens of topk_idx");
  checks::dim("topk_weights", in.topk_weights, 1, K, "topk");
  checks::device_tensor("out", out, m.device, {DType::kBF16}, 2);
  checks::aligned("out", out, 16);
  checks::dim("out", out, 0, T, "tokens of topk_idx");
  checks::dim("out", out, 1, l.hidden, "hidden");
  if (in.combine_wait_recv_cost_stats) {
    checks::device_tensor("combine_wait_recv_cost_stats", *in.combine_wait_recv_cost_stats, m.device, {DType::kI64}, 1);
    checks::dim("combine_wait_recv_cost_stats", *in.combine_wait_recv_cost_stats, 0, m.num_ranks, "num_ranks");
  }
  call.blocks = blocks_for(m, in.num_sms);
  call.layout = l;
  call.num_tokens = T;
  call.num_topk = K;
  return call;
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
    if (m.gin)
      launch_low_latency_combine_gin(p, a, m.low_latency_gin_params(), call.blocks, stream);
    else
      launch_low_latency_combine_net(p, a, ll_net_params(m, p.common, a.layout), call.blocks, stream);
  } else {
    launch_low_latency_combine(p, call.blocks, stream);
  }
  return end_call(m, order);
}

// Zeroes the LL region, the call counters and shrink mode's count decisions (whose tags restart
// with the counters), on `stream`; across real nodes also the LL GIN signals (their shadows are in
// the region). Not the mask: clean_low_latency_buffer keeps it. Every rank is between two barriers.
void clear_low_latency_calls(Buffer::Impl& m, cudaStream_t stream) {
  if (m.ll.bytes > 0)
    EPCOMM_CUDA_CHECK(cudaMemsetAsync(static_cast<char*>(m.sym->local()) + m.ll.offset, 0, m.ll.bytes, stream));
  if (m.gin) m.gin->reset_signals(m.gin_signals.low_latency_base(), m.gin_signals.low_latency_count(), stream);
  EPCOMM_CUDA_CHECK(cudaMemsetAsync(m.ll.state, 0, sizeof(LowLatencyDeviceState), stream));
  if (m.ll.count_decisions) EPCOMM_CUDA_CHECK(cudaMemsetAsync(m.ll.count_decisions, 0, m.ll.count_decision_bytes, stream));
  m.ll.next_buffer = 0;
  m.ll.issued_src_info[0] = m.ll.issued_src_info[1] = nullptr;
}

}  // namespace

void Buffer::Impl::init_low_latency() {
  // Across real nodes always (the constructor refused low_latency_net = 0 there).
  const bool asked = options.low_latency_net < 0 ? low_latency_net_requested() : options.low_latency_net != 0;
  ll.net = (gin != nullptr || asked) && group->ranks_per_node() < num_ranks;
  ll.per_rank_level = low_latency_per_rank_choice(options.low_latency_per_rank, low_latency_per_rank_level());
  EPCOMM_CUDA_CHECK(cudaMalloc(&ll.state, sizeof(LowLatencyDeviceState)));
  EPCOMM_CUDA_CHECK(cudaMalloc(&ll.mask, sizeof(int32_t) * num_ranks));
  EPCOMM_CUDA_CHECK(cudaMemsetAsync(ll.mask, 0, sizeof(int32_t) * num_ranks, comm));
  if (options.enable_shrink) {
    ll.count_decision_bytes = 2 * sizeof(uint64_t) * static_cast<size_t>(max_local_experts) * num_ranks;
    EPCOMM_CUDA_CHECK(cudaMalloc(&ll.count_decisions, ll.count_decision_bytes));
  }
  if (env_value("EPCOMM_LL_PROBE") != 0) {
    const size_t bytes = sizeof(unsigned long long) * kLowLatencyProbeSlots * static_cast<size_t>(sm_count);
    EPCOMM_CUDA_CHECK(cudaMalloc(&ll.probe, bytes));
    EPCOMM_CUDA_CHECK(cudaMemsetAsync(ll.probe, 0, bytes, comm));
  }
  LowLatencyDeviceState init{};  // zeros; the call counters at options.first_call_number (tests)
  init.dispatch_seq = init.combine_seq = options.first_call_number;
  EPCOMM_CUDA_CHECK(cudaMemcpyAsync(ll.state, &init, sizeof(init), cudaMemcpyHostToDevice, comm));
  if (ll.count_decisions) EPCOMM_CUDA_CHECK(cudaMemsetAsync(ll.count_decisions, 0, ll.count_decision_bytes, comm));
  EPCOMM_CUDA_CHECK(cudaStreamSynchronize(comm));
}

void Buffer::Impl::release_low_latency() {
  if (ll.state) cudaFree(ll.state);
  if (ll.mask) cudaFree(ll.mask);
  if (ll.count_decisions) cudaFree(ll.count_decisions);
  if (ll.probe) cudaFree(ll.probe);
  ll.probe = nullptr;
  ll.state = nullptr;
  ll.mask = nullptr;
  ll.count_decisions = nullptr;
}

GinNetParams Buffer::Impl::low_latency_gin_params() const {
  char* local = static_cast<char*>(sym->local()) + ll.offset;
  return gin->params(ll.offset, gin_signals.low_latency_base(), local, reinterpret_cast<uint64_t*>(&ll.state->net_stats[0]),
                     group->ranks_per_node());
}

// Buffer::reset: as if new, the mask included.
void Buffer::Impl::reset_low_latency(cudaStream_t stream) {
  clear_low_latency_calls(*this, stream);
  EPCOMM_CUDA_CHECK(cudaMemsetAsync(ll.mask, 0, sizeof(int32_t) * num_ranks, stream));
}

size_t Buffer::low_latency_size_hint(int num_max_dispatch_tokens_per_rank, int hidden, int num_ranks, int num_experts) {
  check_problem(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts);
  return LowLatencyLayout::make(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts).total_bytes;
}

size_t Buffer::low_latency_net_size_hint(int num_max_dispatch_tokens_per_rank, int hidden, int num_ranks,
                                         int num_experts) {
  check_problem(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts);
  return LowLatencyNetLayout::make(
             LowLatencyLayout::make(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts))
      .end;
}

bool Buffer::low_latency_uses_network() const { return impl_->ll.net; }

Buffer::LowLatencyNetStats Buffer::low_latency_net_stats(bool reset) {
  Impl& m = *impl_;
  LowLatencyNetStats s;
  EPCOMM_CUDA_CHECK(cudaSetDevice(m.device));
  unsigned long long host[2] = {};
  unsigned long long* dev = &m.ll.state->net_stats[0];
  // On the comm stream (never the legacy default stream: ranks sharing a GPU must not wait for
  // each other's kernels).
  EPCOMM_CUDA_CHECK(cudaStreamSynchronize(m.comm));
  EPCOMM_CUDA_CHECK(cudaMemcpyAsync(host, dev, sizeof(host), cudaMemcpyDeviceToHost, m.comm));
  if (reset) EPCOMM_CUDA_CHECK(cudaMemsetAsync(dev, 0, sizeof(host), m.comm));
  EPCOMM_CUDA_CHECK(cudaStreamSynchronize(m.comm));
  s.puts = host[0];
  s.bytes = host[1];
  return s;
}

void Buffer::clean_low_latency_buffer(int num_max_dispatch_tokens_per_rank, int hidden, int num_experts,
                                      cudaStream_t stream) {
  Impl& m = *impl_;
  LowLatencyHostState saved = m.ll;
  m.ll.layout = LowLatencyLayout{};  // the new shape may differ from the fixed one
  LowLatencyLayout l;
  try {
    l = layout_for(m, num_max_dispatch_tokens_per_rank, hidden, num_experts);
  } catch (...) {
    m.ll = saved;
    throw;
  }
  EPCOMM_CUDA_CHECK(cudaSetDevice(m.device));
  // An error a failed call left is cleared as check_device_errors clears it (the record and the
  // device flags; this waits for the comm stream, only on this way back after a failure), and not
  // raised: clean is the way back after an LL timeout.
  if (m.record->error() != DeviceError::kNone) {
    try {
      check_device_errors();
    } catch (const Error&) {
    }
  }
  if (m.gin) {
    // Across real nodes the barriers are the group's (on the host): the clean's barrier kernel
    // reaches every peer by LSA stores. This clean waits for the host and cannot be captured.
    EPCOMM_CUDA_CHECK(cudaStreamSynchronize(stream));
    EPCOMM_CUDA_CHECK(cudaStreamSynchronize(m.comm));
    // What a failed call left with the transport lands first (Buffer::reset).
    m.gin->drain(m.comm, m.timeout_ns);
    // Nobody may still write into our region while we clear it, nor into a peer's before it cleared.
    m.group->barrier();
    clear_low_latency_calls(m, m.comm);
    EPCOMM_CUDA_CHECK(cudaStreamSynchronize(m.comm));
    m.ll.layout = l;
    m.group->barrier();
    return;
  }
  // Work on the caller's stream (params.hpp, LowLatencyCleanParams): barrier, zero, barrier. No
  // host wait, so it can be captured in a CUDA graph. An async_finish call still running on the
  // comm stream comes first (begin_call joins it, as for any LL call).
  LowLatencyCleanParams p;
  p.common = m.common(KernelId::kLowLatencyClean);
  // Ranks reach clean after their own earlier calls, each of which may wait up to a timeout (a
  // masked peer's first missing answer costs one per half): the barriers allow a rank three
  // timeouts and 10 s more to arrive, as the host allows the count exchange.
  p.common.wait.timeout_ns = 3 * m.timeout_ns + 10'000'000'000ull;
  p.clean_count = &m.counters->ll_cleans;
  if (m.options.enable_shrink) p.mask = m.ll.mask;
  const StreamOrder order{stream, nullptr, false};
  cudaStream_t s = begin_call(m, order);
  p.barrier = 1;
  launch_low_latency_clean_barrier(p, s);
  clear_low_latency_calls(m, s);
  p.barrier = 2;
  launch_low_latency_clean_barrier(p, s);
  end_call(m, order);
  m.ll.layout = l;
}

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

Event Buffer::low_latency_combine(const LowLatencyCombineInputs& in, const LowLatencyHandle& handle, const TensorView& out,
                                  bool return_recv_hook, const StreamOrder& order) {
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
  const LowLatencyLayout l =
      layout_for(m, handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts);
  check_handle(m, handle, l);
  void* base = static_cast<char*>(m.sym->local()) + m.ll.offset + l.message(handle.buffer_index, 0, 0, 0);
  return TensorView::contiguous(base, DType::kBF16,
                                {l.local_experts, static_cast<int64_t>(m.num_ranks) * l.max_tokens, l.hidden}, m.device);
}

void Buffer::low_latency_update_mask_buffer(int rank, bool mask, cudaStream_t stream) {
  Impl& m = *impl_;
  checks::in_range("rank_to_mask", rank, 0, m.num_ranks - 1);
  if (mask && rank == m.rank)
    throw ArgumentError("rank_to_mask = " + std::to_string(rank) + " is this rank: a rank cannot mask itself");
  if (mask && !m.options.enable_shrink)
    throw ArgumentError("low_latency_update_mask_buffer: masking rank " + std::to_string(rank) +
                        " needs shrink mode (BufferOptions::enable_shrink = true, Python enable_shrink=True)");
  EPCOMM_CUDA_CHECK(cudaSetDevice(m.device));
  launch_low_latency_set_mask(m.ll.mask, m.num_ranks, rank, mask ? 1 : 0, stream);
}

void Buffer::low_latency_query_mask_buffer(const TensorView& mask_status, cudaStream_t stream) {
  Impl& m = *impl_;
  checks::device_tensor("mask_status", mask_status, m.device, {DType::kI32}, 1);
  checks::dim("mask_status", mask_status, 0, m.num_ranks, "num_ranks");
  EPCOMM_CUDA_CHECK(cudaSetDevice(m.device));
  EPCOMM_CUDA_CHECK(cudaMemcpyAsync(mask_status.data, m.ll.mask, sizeof(int32_t) * m.num_ranks,
                                    cudaMemcpyDeviceToDevice, stream));
}

void Buffer::low_latency_clean_mask_buffer(cudaStream_t stream) {
  Impl& m = *impl_;
  EPCOMM_CUDA_CHECK(cudaSetDevice(m.device));
  launch_low_latency_set_mask(m.ll.mask, m.num_ranks, -1, 0, stream);
}

}  // namespace epcomm

namespace epcomm {

std::string Buffer::low_latency_probe_report() {
  Impl& m = *impl_;
  if (m.ll.probe == nullptr) return {};
  EPCOMM_CUDA_CHECK(cudaSetDevice(m.device));
  std::vector<unsigned long long> v(static_cast<size_t>(kLowLatencyProbeSlots) * m.sm_count);
  EPCOMM_CUDA_CHECK(cudaStreamSynchronize(m.comm));
  EPCOMM_CUDA_CHECK(cudaMemcpyAsync(v.data(), m.ll.probe, v.size() * sizeof(v[0]), cudaMemcpyDeviceToHost, m.comm));
  EPCOMM_CUDA_CHECK(cudaStreamSynchronize(m.comm));
  int khz = 0;
  EPCOMM_CUDA_CHECK(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, m.device));
  static const char* const names[] = {"entry",     "histogram",  "counts",    "tokens",
                                      "published", "recv entry", "recv done", "recv counts"};
  // In order of time within a block (the per-rank receive stamps its counts between entry and done).
  static const int order[] = {kProbeEntry,     kProbeHistogram,  kProbeCounts,     kProbeTokens,
                              kProbePublished, kProbeRecvEntry, kProbeRecvCounts, kProbeRecvDone};
  unsigned long long t0 = ~0ull;
  for (int b = 0; b < m.sm_count; ++b) {
    const unsigned long long e = v[static_cast<size_t>(b) * kLowLatencyProbeSlots + kProbeEntry];
    if (e != 0) t0 = std::min(t0, e);
  }
  if (t0 == ~0ull) return "LL probe: no dispatch recorded";
  const auto fmt = [](double x) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%.2f", x);
    return std::string(buf);
  };
  std::string s = "LL dispatch probe, rank " + std::to_string(m.rank) +
                  " (us after the first block's entry: min / median / max over blocks; then SM-clock median since the previous mark)";
  for (int oi = 0; oi < static_cast<int>(std::size(order)); ++oi) {
    const int mark = order[oi];
    std::vector<double> at, since;
    for (int b = 0; b < m.sm_count; ++b) {
      const unsigned long long* row = v.data() + static_cast<size_t>(b) * kLowLatencyProbeSlots;
      if (row[mark] == 0 || row[mark] < t0) continue;
      at.push_back(static_cast<double>(row[mark] - t0) / 1000.0);
      // The latest earlier mark stamped before this one (a split launch's receive half starts
      // before its warp 0 publishes).
      int pi = oi - 1;
      while (pi >= 0 && (row[order[pi]] == 0 || row[order[pi]] > row[mark])) --pi;
      if (pi >= 0 && khz > 0)
        since.push_back(static_cast<double>(row[8 + mark] - row[8 + order[pi]]) / khz * 1000.0);
    }
    if (at.empty()) continue;
    std::sort(at.begin(), at.end());
    std::sort(since.begin(), since.end());
    s += "\n  " + std::string(names[mark]) + ": " + fmt(at.front()) + " / " + fmt(at[at.size() / 2]) + " / " +
         fmt(at.back()) + " (" + std::to_string(at.size()) + " blocks)";
    if (!since.empty()) s += ", +" + fmt(since[since.size() / 2]) + " us";
  }
  // The per-rank send's sub-phases (median block; stamps of an earlier call are older than entry).
  {
    static const int subs[] = {kProbeSendCast, kProbeSendBarrier1, kProbeSendPass1, kProbeSendSlots};
    static const char* const sub_names[] = {"first cast", "barrier 1", "pass 1", "first slots"};
    std::string line;
    for (int i = 0; i < 4; ++i) {
      std::vector<double> at;
      for (int b = 0; b < m.sm_count; ++b) {
        const unsigned long long* row = v.data() + static_cast<size_t>(b) * kLowLatencyProbeSlots;
        if (row[subs[i]] >= row[kProbeEntry] && row[kProbeEntry] != 0 && row[subs[i]] != 0)
          at.push_back(static_cast<double>(row[subs[i]] - t0) / 1000.0);
      }
      if (at.empty()) continue;
      std::sort(at.begin(), at.end());
      line += std::string(line.empty() ? "" : ", ") + sub_names[i] + " " + fmt(at[at.size() / 2]);
    }
    if (!line.empty()) s += "\n  send sub-phases (median block, us after the first entry): " + line;
  }
  // The blocks whose receive finished last: their longest flag wait and copy of one item (part of a
  // staged token), and how many items their warps took.
  std::vector<std::pair<unsigned long long, int>> done;
  for (int b = 0; b < m.sm_count; ++b) {
    const unsigned long long d = v[static_cast<size_t>(b) * kLowLatencyProbeSlots + kProbeRecvDone];
    if (d >= t0) done.push_back({d, b});
  }
  std::sort(done.rbegin(), done.rend());
  if (!done.empty()) s += "\n  last receiving blocks (block: done at; longest item wait / copy; items):";
  for (size_t i = 0; i < done.size() && i < 5; ++i) {
    const unsigned long long* row = v.data() + static_cast<size_t>(done[i].second) * kLowLatencyProbeSlots;
    s += " " + std::to_string(done[i].second) + ": " + fmt((done[i].first - t0) / 1000.0) + "; " +
         fmt(row[kProbeItemWait] / 1000.0) + " / " + fmt(row[kProbeItemWork] / 1000.0) + "; " +
         std::to_string(row[kProbeItems]);
    const unsigned long long* slow = row + kProbeSlowItem;
    if (slow[1] + slow[2] + slow[3] > 0)
      s += " [slow item " + std::to_string(slow[0] & 0xffff) + " part " + std::to_string((slow[0] >> 16) & 0xff) +
           " rows " + std::to_string(slow[0] >> 24) + ": to rows " + fmt(slow[1] / 1000.0) + ", data " +
           fmt(slow[2] / 1000.0) + ", scales " + fmt(slow[3] / 1000.0) + "]";
    if (i + 1 < done.size() && i < 4) s += ",";
  }
  EPCOMM_CUDA_CHECK(cudaMemsetAsync(m.ll.probe, 0, v.size() * sizeof(v[0]), m.comm));
  EPCOMM_CUDA_CHECK(cudaStreamSynchronize(m.comm));
  return s;
}

}  // namespace epcomm
