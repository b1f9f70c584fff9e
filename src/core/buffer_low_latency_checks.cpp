// Buffer, low-latency mode (docs/contract.md §3.3): the argument checks of its calls (shape,
// buffer size, tensors, the handle). Every rule throws ArgumentError naming the argument.
#include <string>

#include "core/argument_checks.hpp"
#include "core/buffer_low_latency.hpp"
#include "epcomm/error.hpp"

namespace epcomm::low_latency {
namespace {

std::string shape_text(int tmax, int hidden, int num_ranks, int num_experts) {
  return "num_max_dispatch_tokens_per_rank = " + std::to_string(tmax) + ", hidden = " + std::to_string(hidden) +
         ", num_ranks = " + std::to_string(num_ranks) + ", num_experts = " + std::to_string(num_experts);
}

}  // namespace

void check_problem(int tmax, int hidden, int num_ranks, int num_experts) {
  checks::in_range("num_max_dispatch_tokens_per_rank", tmax, 1, kLowLatencyMaxTokens);
  if (hidden <= 0 || hidden % kLowLatencyScaleGroup != 0)
    throw ArgumentError("hidden = " + std::to_string(hidden) + " must be a positive multiple of " +
                        std::to_string(kLowLatencyScaleGroup) + " in low-latency mode");
  checks::positive("num_ranks", num_ranks);
  checks::positive("num_experts", num_experts);
  checks::divisible("num_experts", num_experts, "num_ranks", num_ranks);
}

LowLatencyLayout layout_for(const Buffer::Impl& m, int tmax, int hidden, int num_experts) {
  check_problem(tmax, hidden, m.num_ranks, num_experts);
  if (num_experts / m.num_ranks > m.max_local_experts)
    throw ArgumentError("num_experts / num_ranks = " + std::to_string(num_experts / m.num_ranks) +
                        " exceeds the buffer's max_experts_per_rank = " + std::to_string(m.max_local_experts) +
                        " (EPCOMM_MAX_EXPERTS_PER_RANK)");
  const LowLatencyLayout l = LowLatencyLayout::make(tmax, hidden, m.num_ranks, num_experts);
  if (l.total_bytes > m.options.num_rdma_bytes)
    throw ArgumentError(
        "num_rdma_bytes = " + std::to_string(m.options.num_rdma_bytes) + " is too small for low-latency mode with " +
        shape_text(tmax, hidden, m.num_ranks, num_experts) + ": it needs " + std::to_string(l.total_bytes) +
        " bytes (Buffer::low_latency_size_hint, Python get_low_latency_rdma_size_hint)");
  if (m.ll.net && LowLatencyNetLayout::make(l).end > m.options.num_rdma_bytes)
    throw ArgumentError("num_rdma_bytes = " + std::to_string(m.options.num_rdma_bytes) +
                        " is too small for low-latency mode through the network transport (EPCOMM_LL_NET / "
                        "BufferOptions::low_latency_net) with " +
                        shape_text(tmax, hidden, m.num_ranks, num_experts) + ": it needs " +
                        std::to_string(LowLatencyNetLayout::make(l).end) +
                        " bytes (Buffer::low_latency_net_size_hint)");
  if (m.ll.layout.max_tokens != 0 && !m.ll.layout.same_shape(l))
    throw ArgumentError("low-latency shape changed from " +
                        shape_text(m.ll.layout.max_tokens, m.ll.layout.hidden, m.num_ranks, m.ll.layout.num_experts) +
                        " to " + shape_text(tmax, hidden, m.num_ranks, num_experts) +
                        ": call clean_low_latency_buffer with the new shape on every rank first");
  return l;
}

namespace {

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

}  // namespace

DispatchCall check_dispatch(const Buffer::Impl& m, const LowLatencyDispatchInputs& in,
                            const LowLatencyDispatchOutputs& out) {
  DispatchCall call;
  m.require_low_latency_data();
  const int R = m.num_ranks;
  checks::device_tensor("x", in.x, m.device, {DType::kBF16}, 2);
  checks::aligned("x", in.x, 16);
  const LowLatencyLayout l =
      layout_for(m, in.num_max_dispatch_tokens_per_rank, static_cast<int>(in.x.shape[1]), in.num_experts);
  const int EL = l.local_experts, H = l.hidden, G = H / kLowLatencyScaleGroup, W = (G + 3) / 4;
  const int64_t RT = static_cast<int64_t>(R) * l.max_tokens;
  const int T = static_cast<int>(in.x.shape[0]);
  if (T > l.max_tokens)
    throw ArgumentError("x: " + std::to_string(T) +
                        " tokens exceed num_max_dispatch_tokens_per_rank = " + std::to_string(l.max_tokens));
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
    checks::device_tensor("dispatch_wait_recv_cost_stats", *in.dispatch_wait_recv_cost_stats, m.device, {DType::kI64},
                          1);
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

CombineCall check_combine(const Buffer::Impl& m, const LowLatencyCombineInputs& in, const LowLatencyHandle& h,
                          const TensorView& out) {
  CombineCall call;
  m.require_low_latency_data();
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
    throw ArgumentError("topk_idx: " + std::to_string(T) +
                        " tokens exceed num_max_dispatch_tokens_per_rank = " + std::to_string(l.max_tokens));
  if (K < 1 || K > l.kslots)
    throw ArgumentError("num_topk = " + std::to_string(K) + " must be in [1, " + std::to_string(l.kslots) +
                        "] (low-latency mode: at most min(16, num_experts))");
  // The dispatch's plan covers its own tokens and top-k slots: a combine over others would wait for
  // rows that never come or read weights past their end.
  if (T != m.ll.issued_tokens[h.buffer_index] || K != m.ll.issued_topk[h.buffer_index])
    throw ArgumentError("topk_idx: [" + std::to_string(T) + ", " + std::to_string(K) +
                        "], but the dispatch of this "
                        "handle had [" +
                        std::to_string(m.ll.issued_tokens[h.buffer_index]) + ", " +
                        std::to_string(m.ll.issued_topk[h.buffer_index]) +
                        "]: a combine takes its dispatch's topk_idx");
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

}  // namespace epcomm::low_latency
