// Buffer: layout and normal-mode dispatch / combine (argument checks, ring geometry, launches).
#include <algorithm>
#include <chrono>
#include <limits>
#include <string>
#include <thread>

#include "core/buffer_impl.hpp"
#include "core/argument_checks.hpp"
#include "core/call_check.hpp"
#include "core/env.hpp"
#include "core/ring_geometry.hpp"
#include "epcomm/error.hpp"

namespace epcomm {
namespace {

constexpr int kStagerPieceBytes = 16384;
constexpr int kMaxPullerStages = 6;
constexpr int kPusherWarps = 4;
constexpr int kPusherStages = 2;  // run 6: 630 us with 2, 662 with 3 (4 pushers)
constexpr int kPusherPieceBytes = 16384;
constexpr int kReducerWarps = 12;

// FP8 scales travel as opaque 4-byte words, as many per token as x_scales has columns (DeepEP's
// rule): float32 scales of any group size (ceil(hidden / 128) for the usual 128-channel groups), or
// int32 words such as UE8M0 exponents packed four per word. Received scales are [rows, words]
// row-major, of the dtype x_scales had.
int scale_words(const std::optional<TensorView>& x_scales) {
  return x_scales ? static_cast<int>(x_scales->shape[1]) : 0;
}

struct DispatchKernelShape {
  int puller_warps = 0;
  int puller_stages = 0;
  int smem = 0;
};

// A kernel-shape override from the environment (tuning sweeps), clamped to [1, limit]; 0 = unset.
int shape_override(const char* name, int limit) {
  const int64_t v = env_value(name);
  return v <= 0 ? 0 : static_cast<int>(std::min<int64_t>(v, limit));
}

// Puller warps share the block's (chunk, source) segments. Each keeps about kPullerBytesInFlight of
// rows in flight (2 to 6 rows); there are as many warps as shared memory holds, up to 8, and fewer
// warps before fewer than two stages. More rows per warp is slower on the wire (run 6: BF16 rows of
// 14 KiB, 6 stages 591 us, 2 stages 567 us); more warps, each on its own segment, is faster (run 56:
// FP8 355 -> 337 us with 7 warps instead of 4, BF16 587 -> 579 with 5).
constexpr int kPullerBytesInFlight = 24576;
DispatchKernelShape shape_dispatch_kernel(int row_bytes, int chunk, int meta_row_bytes, int max_smem) {
  DispatchKernelShape k;
  const int want_warps = shape_override("EPCOMM_DISPATCH_PULLER_WARPS", dispatch_max_puller_warps());
  const int want_stages = shape_override("EPCOMM_DISPATCH_PULLER_STAGES", kMaxPullerStages);
  for (int warps = want_warps ? want_warps : dispatch_max_puller_warps(); warps >= 1; --warps) {
    int stages = want_stages ? want_stages : std::clamp(kPullerBytesInFlight / row_bytes, 2, kMaxPullerStages);
    while (stages >= 1 &&
           dispatch_shared_bytes(warps, stages, row_bytes, chunk, meta_row_bytes, kStagerPieceBytes) > max_smem)
      --stages;
    if (stages >= 2 || (warps == 1 && stages >= 1)) {
      k.puller_warps = warps;
      k.puller_stages = stages;
      k.smem = dispatch_shared_bytes(warps, stages, row_bytes, chunk, meta_row_bytes, kStagerPieceBytes);
      return k;
    }
  }
  throw ArgumentError("hidden, x_scales: a row of " + std::to_string(row_bytes) + " bytes with " +
                      std::to_string(meta_row_bytes) +
                      " bytes of scales and topk per token does not fit the shared "
                      "memory of one SM (" +
                      std::to_string(max_smem) + " bytes)");
}

// Chunks are dealt round-robin to num_sms blocks. Take the chunk (at most the config's, at least
// 8 tokens) that gives every block as nearly the same number of tokens as possible: 4096 tokens on
// 24 SMs -> 29 (no block has more than 174 tokens) rather than 32 (some blocks get 192); 128 tokens
// -> 8 (16 busy blocks) rather than 32 (4). `stride` bounds the chunk count (chunk_offset's width).
int balanced_chunk(int num_tokens, const Config& config, int stride) {
  const int c = config.chunk_tokens(), sms = config.num_sms;
  if (num_tokens <= 0) return c;
  const int per_block = (num_tokens + sms * c - 1) / (sms * c);
  const int chunk = std::clamp((num_tokens + sms * per_block - 1) / (sms * per_block), std::min(8, c), c);
  return (num_tokens + chunk - 1) / chunk <= stride - 2 ? chunk : c;
}

int ring_slots(const char* what, size_t region, int num_sms, size_t slot_bytes, int wanted, int max_slots,
               size_t num_nvl_bytes) {
  const size_t fit = region / (static_cast<size_t>(num_sms) * slot_bytes);
  if (fit < 1)
    throw ArgumentError(std::string("num_nvl_bytes = ") + std::to_string(num_nvl_bytes) + " is too small for " + what +
                        ": one ring slot per SM needs " + std::to_string(2 * num_sms * slot_bytes) +
                        " bytes (see Config.get_nvl_buffer_size_hint; pass it ranks_per_node where one node holds "
                        "more than 8 ranks and fewer GPUs are visible, or set EPCOMM_RANKS_PER_NODE)");
  return static_cast<int>(std::min<size_t>({fit, static_cast<size_t>(wanted), static_cast<size_t>(max_slots)}));
}

// The handle's tensors a dispatch fills (dispatch_prepare) or reads.
void check_handle_core(const Buffer::Impl& m, const DispatchHandle& h) {
  const int R = m.num_ranks;
  checks::device_tensor("handle.rank_prefix_matrix", h.rank_prefix_matrix, m.device, {DType::kI32}, 2);
  checks::dim("handle.rank_prefix_matrix", h.rank_prefix_matrix, 0, R, "ranks");
  checks::dim("handle.rank_prefix_matrix", h.rank_prefix_matrix, 1, R, "ranks");
  checks::device_tensor("handle.chunk_offset", h.chunk_offset, m.device, {DType::kI32}, 2);
  checks::dim("handle.chunk_offset", h.chunk_offset, 0, R, "ranks");
}

// A handle a dispatch returned, passed back (cached dispatch, combine): its tensors and its host facts.
void check_filled_handle(const Buffer::Impl& m, const DispatchHandle& h) {
  const int R = m.num_ranks;
  check_handle_core(m, h);
  checks::device_tensor("handle.is_token_in_rank", h.is_token_in_rank, m.device, {DType::kBool}, 2);
  // The host facts bound the kernels' loops and indices: a handle that was not made by a dispatch of
  // this group (edited, or from a buffer of another size) is refused here instead of read past.
  checks::dim("handle.is_token_in_rank", h.is_token_in_rank, 0, h.num_tokens, "handle.num_tokens");
  checks::dim("handle.is_token_in_rank", h.is_token_in_rank, 1, R, "ranks");
  checks::in_range("handle.num_tokens", h.num_tokens, 0, m.max_tokens);
  checks::in_range("handle.chunk", h.chunk, 1, 1 << 16);
  // chunk_offset: a column per chunk, then the end row and the tokens per chunk (chunk_offset_stride).
  checks::in_range("handle.max_chunks", h.max_chunks, (h.num_tokens + h.chunk - 1) / h.chunk,
                   h.chunk_offset.shape[1] - 2);
  checks::in_range("handle.num_rows", h.num_rows, 0, std::numeric_limits<int32_t>::max());
  checks::in_range("handle.num_recv_tokens", h.num_recv_tokens, -1, h.num_rows);
  checks::device_tensor("handle.recv_src_idx", h.recv_src_idx, m.device, {DType::kI32}, 1);
  checks::dim("handle.recv_src_idx", h.recv_src_idx, 0, h.num_rows, "handle.num_rows");
  checks::positive("handle.num_experts", h.num_experts);
  checks::divisible("handle.num_experts", h.num_experts, "num_ranks", R);
}

void check_x(const Buffer::Impl& m, const TensorView& x, const std::optional<TensorView>& scales,
             int num_tokens_expected) {
  checks::device_tensor("x", x, m.device, {DType::kBF16, DType::kFP8E4M3}, 2);
  checks::aligned("x", x, 16);
  const int64_t row_bytes = x.shape[1] * static_cast<int64_t>(dtype_size(x.dtype));
  if (row_bytes % 16 != 0 || row_bytes == 0)
    throw ArgumentError("x: a row must be a non-zero multiple of 16 bytes; hidden = " + std::to_string(x.shape[1]) +
                        " gives " + std::to_string(row_bytes));
  if (x.shape[0] > m.max_tokens)
    throw ArgumentError("x: " + std::to_string(x.shape[0]) + " tokens exceed the buffer's max_tokens_per_rank = " +
                        std::to_string(m.max_tokens) + " (EPCOMM_MAX_TOKENS_PER_RANK)");
  if (num_tokens_expected >= 0 && x.shape[0] != num_tokens_expected)
    throw ArgumentError("x: " + std::to_string(x.shape[0]) + " tokens, but the handle was made for " +
                        std::to_string(num_tokens_expected));
  if (x.dtype == DType::kFP8E4M3) {
    if (!scales)
      throw ArgumentError("x_scales: FP8 x needs its scales ([T, ceil(hidden/128)] float32, or packed int32 words)");
    checks::device_tensor("x_scales", *scales, m.device, {DType::kF32, DType::kI32}, 2, /*need_contiguous=*/false);
    checks::dim("x_scales", *scales, 0, x.shape[0], "tokens");
    checks::in_range("x_scales.shape[1] (scale words per token)", scales->shape[1], 1, kMaxScaleWords);
    if (scales->shape[0] > 1 && scales->strides[0] == 0)
      throw ArgumentError("x_scales: stride 0 along tokens (" + scales->describe() +
                          "); each token needs its own scales");
  } else if (scales) {
    throw ArgumentError("x_scales: given for BF16 x; scales belong to FP8 input only");
  }
}

// x_scales: the input's scales (FP8 only; its dtype and columns are what recv_x_scales must have).
void check_recv(const Buffer::Impl& m, const DispatchOutputs& out, const TensorView& x, const TensorView& x_scales,
                int rows, int num_topk) {
  checks::device_tensor("recv_x", out.recv_x, m.device, {x.dtype}, 2);
  checks::aligned("recv_x", out.recv_x, 16);
  checks::dim("recv_x", out.recv_x, 0, rows, "received rows");
  checks::dim("recv_x", out.recv_x, 1, x.shape[1], "hidden");
  if (x.dtype == DType::kFP8E4M3) {
    if (!out.recv_x_scales) throw ArgumentError("recv_x_scales: needed for FP8 dispatch");
    checks::device_tensor("recv_x_scales", *out.recv_x_scales, m.device, {x_scales.dtype}, 2);
    checks::dim("recv_x_scales", *out.recv_x_scales, 0, rows, "received rows");
    checks::dim("recv_x_scales", *out.recv_x_scales, 1, x_scales.shape[1], "x_scales.shape[1]");
  }
  if (num_topk > 0) {
    if (!out.recv_topk_idx) throw ArgumentError("recv_topk_idx: needed when topk_idx is given");
    checks::device_tensor("recv_topk_idx", *out.recv_topk_idx, m.device, {DType::kI64}, 2);
    checks::dim("recv_topk_idx", *out.recv_topk_idx, 0, rows, "received rows");
    checks::dim("recv_topk_idx", *out.recv_topk_idx, 1, num_topk, "topk");
    if (out.recv_topk_weights) {
      checks::device_tensor("recv_topk_weights", *out.recv_topk_weights, m.device, {DType::kF32}, 2);
      checks::dim("recv_topk_weights", *out.recv_topk_weights, 0, rows, "received rows");
      checks::dim("recv_topk_weights", *out.recv_topk_weights, 1, num_topk, "topk");
    }
  }
}

void wait_for_notify(Buffer& buffer, Buffer::Impl& m, int32_t token) {
  using clock = std::chrono::steady_clock;
  // The kernel may queue behind the caller's earlier work, so the host allows a multiple of the
  // GPU timeout before it gives up.
  const auto deadline = clock::now() + std::chrono::nanoseconds(3 * m.timeout_ns + 10'000'000'000ull);
  volatile int32_t* status = &m.host_result[kNotifyStatus];
  for (uint32_t spins = 0; *status != token && *status != -token; ++spins) {
    if (m.record->error() != DeviceError::kNone) break;
    if ((spins & 1023) == 0) {
      const cudaError_t e = cudaStreamQuery(m.comm);
      if (e != cudaSuccess && e != cudaErrorNotReady) EPCOMM_CUDA_CHECK(e);
      if (clock::now() > deadline)
        throw TimeoutError("epcomm rank " + std::to_string(m.rank) +
                           ": dispatch: the host gave up waiting for the count exchange (notify_dispatch kernel); "
                           "is every rank calling dispatch?");
      std::this_thread::yield();
    }
  }
  if (*status != token || m.record->error() != DeviceError::kNone) {
    buffer.check_device_errors();
    throw RuntimeFailure("dispatch: the count exchange failed without a diagnostic record");
  }
}

}  // namespace

int Buffer::chunk_offset_stride(const Config& config) const {
  // A column per chunk of the config's size (balanced_chunk only cuts finer when the chunks still
  // fit), the end row, and the source's tokens per chunk.
  return (impl_->max_tokens + config.chunk_tokens() - 1) / config.chunk_tokens() + 2;
}

Event Buffer::get_dispatch_layout(const TensorView& topk_idx, int num_experts, const LayoutOutputs& out,
                                  const StreamOrder& order) {
  Impl& m = *impl_;
  m.require_normal_mode("get_dispatch_layout");
  check_device_errors();
  const int R = m.num_ranks;
  checks::device_tensor("topk_idx", topk_idx, m.device, {DType::kI64}, 2);
  checks::in_range("num_topk", topk_idx.shape[1], 1, kMaxTopk);
  checks::positive("num_experts", num_experts);
  checks::divisible("num_experts", num_experts, "num_ranks", R);
  const int T = static_cast<int>(topk_idx.shape[0]);
  checks::device_tensor("num_tokens_per_rank", out.num_tokens_per_rank, m.device, {DType::kI32}, 1);
  checks::dim("num_tokens_per_rank", out.num_tokens_per_rank, 0, R, "ranks");
  checks::device_tensor("num_tokens_per_expert", out.num_tokens_per_expert, m.device, {DType::kI32}, 1);
  checks::dim("num_tokens_per_expert", out.num_tokens_per_expert, 0, num_experts, "experts");
  checks::device_tensor("is_token_in_rank", out.is_token_in_rank, m.device, {DType::kBool}, 2);
  checks::dim("is_token_in_rank", out.is_token_in_rank, 0, T, "tokens");
  checks::dim("is_token_in_rank", out.is_token_in_rank, 1, R, "ranks");
  const int nodes = m.group->num_nodes();
  if (out.num_tokens_per_node) {
    checks::device_tensor("num_tokens_per_rdma_rank", *out.num_tokens_per_node, m.device, {DType::kI32}, 1);
    checks::dim("num_tokens_per_rdma_rank", *out.num_tokens_per_node, 0, nodes, "nodes");
  }
  LayoutParams p;
  p.topk_idx = topk_idx.ptr<const int64_t>();
  p.num_tokens = T;
  p.num_topk = static_cast<int>(topk_idx.shape[1]);
  p.num_experts = num_experts;
  p.num_ranks = R;
  p.ranks_per_node = m.group->ranks_per_node();
  p.num_tokens_per_rank = out.num_tokens_per_rank.ptr<int32_t>();
  p.num_tokens_per_node = out.num_tokens_per_node ? out.num_tokens_per_node->ptr<int32_t>() : nullptr;
  p.num_tokens_per_expert = out.num_tokens_per_expert.ptr<int32_t>();
  p.is_token_in_rank = out.is_token_in_rank.ptr<uint8_t>();
  p.invalid_index = &m.counters->invalid_topk;
  m.enter(order);
  launch_layout(p, m.comm);
  return m.leave(order);
}

DispatchPlan Buffer::dispatch_prepare(const DispatchInputs& in, DispatchHandle& handle,
                                      const std::optional<TensorView>& num_recv_tokens_per_expert,
                                      const StreamOrder& order) {
  Impl& m = *impl_;
  m.require_normal_mode("dispatch");
  check_device_errors();
  const int R = m.num_ranks;
  check_x(m, in.x, in.x_scales, -1);
  const int T = static_cast<int>(in.x.shape[0]);
  if (in.topk_idx) {
    checks::device_tensor("topk_idx", *in.topk_idx, m.device, {DType::kI64}, 2);
    checks::dim("topk_idx", *in.topk_idx, 0, T, "tokens of x");
    checks::in_range("num_topk", in.topk_idx->shape[1], 1, kMaxTopk);
    if (in.topk_weights) {
      checks::device_tensor("topk_weights", *in.topk_weights, m.device, {DType::kF32}, 2);
      checks::dim("topk_weights", *in.topk_weights, 0, T, "tokens of x");
      checks::dim("topk_weights", *in.topk_weights, 1, in.topk_idx->shape[1], "topk");
    }
  } else if (in.topk_weights) {
    throw ArgumentError("topk_weights: given without topk_idx");
  }
  if (!in.num_tokens_per_rank || !in.is_token_in_rank || !in.num_tokens_per_expert)
    throw ArgumentError(
        "dispatch without a handle needs num_tokens_per_rank, is_token_in_rank and "
        "num_tokens_per_expert (from get_dispatch_layout)");
  checks::device_tensor("num_tokens_per_rank", *in.num_tokens_per_rank, m.device, {DType::kI32}, 1);
  checks::dim("num_tokens_per_rank", *in.num_tokens_per_rank, 0, R, "ranks");
  checks::device_tensor("is_token_in_rank", *in.is_token_in_rank, m.device, {DType::kBool}, 2);
  checks::dim("is_token_in_rank", *in.is_token_in_rank, 0, T, "tokens of x");
  checks::dim("is_token_in_rank", *in.is_token_in_rank, 1, R, "ranks");
  checks::device_tensor("num_tokens_per_expert", *in.num_tokens_per_expert, m.device, {DType::kI32}, 1);
  const int E = static_cast<int>(in.num_tokens_per_expert->shape[0]);
  checks::positive("num_experts", E);
  checks::divisible("num_experts", E, "num_ranks", R);
  if (E / R > m.max_local_experts)
    throw ArgumentError("num_experts / num_ranks = " + std::to_string(E / R) +
                        " exceeds the buffer's max_experts_per_rank = " + std::to_string(m.max_local_experts) +
                        " (EPCOMM_MAX_EXPERTS_PER_RANK)");
  checks::in_range("expert_alignment", in.expert_alignment, 1, 1 << 20);
  // No dispatch receives more rows than every rank's largest T (receive tensors of more are waste).
  checks::in_range("num_worst_tokens", in.num_worst_tokens, 0, static_cast<int64_t>(R) * m.max_tokens);
  in.config.validate(m.sm_count);
  check_handle_core(m, handle);
  checks::dim("handle.chunk_offset", handle.chunk_offset, 1, chunk_offset_stride(in.config),
              "Buffer::chunk_offset_stride");
  if (num_recv_tokens_per_expert) {
    checks::device_tensor("num_recv_tokens_per_expert", *num_recv_tokens_per_expert, m.device, {DType::kI32}, 1);
    checks::dim("num_recv_tokens_per_expert", *num_recv_tokens_per_expert, 0, E / R, "local experts");
  }
  // The ring must fit before anything is launched (the same check dispatch_run makes).
  const int hidden = static_cast<int>(in.x.shape[1]);
  const int row_bytes = hidden * static_cast<int>(dtype_size(in.x.dtype));
  const int num_scales = scale_words(in.x_scales);
  const int K = in.topk_idx ? static_cast<int>(in.topk_idx->shape[1]) : 0;
  if (m.inter.enabled)
    m.check_internode_dispatch(row_bytes, num_scales, K, in.config.chunk_tokens(), hidden, T,
                               in.num_worst_tokens == 0);  // across nodes: the internode region
  else
    ring_slots("dispatch", m.ring_region_bytes(), in.config.num_sms,
               ring::dispatch_slot_bytes(in.config.chunk_tokens(), row_bytes, num_scales, K), in.config.ring_slots(),
               dispatch_max_slots(), m.options.num_nvl_bytes);
  if (in.num_worst_tokens == 0 && m.capturing(order.stream))
    throw ArgumentError(
        "num_worst_tokens: a dispatch captured in a CUDA graph cannot wait for counts on the host; "
        "pass num_worst_tokens > 0");

  NotifyParams p;
  p.common = m.common(KernelId::kNotifyDispatch);
  p.num_tokens = T;
  p.num_experts = E;
  p.chunk_offset_stride = chunk_offset_stride(in.config);
  p.chunk = in.config.chunk_tokens();
  p.cut = balanced_chunk(T, in.config, p.chunk_offset_stride);
  p.num_blocks = in.config.num_sms;
  p.expert_alignment = in.expert_alignment;
  p.worst_tokens = in.num_worst_tokens > 0 ? 1 : 0;
  p.row_bytes = row_bytes;
  p.rows_words = notify_rows_words(num_scales, K);
  p.is_token_in_rank = in.is_token_in_rank->ptr<uint8_t>();
  p.num_tokens_per_rank = in.num_tokens_per_rank->ptr<int32_t>();
  p.num_tokens_per_expert = in.num_tokens_per_expert->ptr<int32_t>();
  p.parity_counter = &m.counters->notify_count;
  p.rank_prefix_matrix = handle.rank_prefix_matrix.ptr<int32_t>();
  p.chunk_offset = handle.chunk_offset.ptr<int32_t>();
  p.num_recv_tokens_per_expert =
      num_recv_tokens_per_expert ? num_recv_tokens_per_expert->ptr<int32_t>() : m.host_result_dev + kNotifyExpertCounts;
  p.invalid_topk = &m.counters->invalid_topk;
  p.host_result = m.host_result_dev;

  // Token in [1, 2^30): an earlier notify that finishes late cannot pass for this one.
  m.notify_token = m.notify_token % (1 << 30) + 1;
  p.host_token = m.notify_token;
  m.enter(order);
  if (m.inter.enabled) m.launch_internode_notify(p);  // across nodes (buffer_internode.cpp)
  else launch_notify_dispatch(p, m.comm);

  DispatchPlan plan;
  handle.chunk = p.chunk;
  handle.num_tokens = T;
  handle.num_experts = E;
  handle.is_token_in_rank = *in.is_token_in_rank;
  if (in.num_worst_tokens > 0) {
    plan.num_rows = in.num_worst_tokens;
    plan.num_recv_tokens = -1;
    plan.max_chunks = p.chunk_offset_stride - 2;
    return plan;
  }
  wait_for_notify(*this, m, p.host_token);
  plan.num_recv_tokens = m.host_result[kNotifyNumRecv];
  plan.num_rows = plan.num_recv_tokens;
  plan.max_chunks = m.host_result[kNotifyMaxChunks];
  plan.num_recv_tokens_per_expert.assign(m.host_result + kNotifyExpertCounts,
                                         m.host_result + kNotifyExpertCounts + E / R);
  if (m.host_result[kNotifyInvalidTopk] >= 0) plan.invalid_topk_index = m.host_result[kNotifyInvalidTopk];
  return plan;
}

namespace {

Event launch_dispatch_common(Buffer& buffer, Buffer::Impl& m, const TensorView& x,
                             const std::optional<TensorView>& x_scales, const std::optional<TensorView>& topk_idx,
                             const std::optional<TensorView>& topk_weights, const DispatchHandle& handle, int num_rows,
                             int num_worst_tokens, bool cached, const DispatchOutputs& out, const Config& config,
                             const StreamOrder& order) {
  const int R = m.num_ranks;
  const int hidden = static_cast<int>(x.shape[1]);
  const int row_bytes = hidden * static_cast<int>(dtype_size(x.dtype));
  const int num_scales = scale_words(x_scales);
  const int K = topk_idx ? static_cast<int>(topk_idx->shape[1]) : 0;
  check_recv(m, out, x, x_scales ? *x_scales : TensorView{}, num_rows, K);
  checks::device_tensor("handle.recv_src_idx", handle.recv_src_idx, m.device, {DType::kI32}, 1);
  checks::dim("handle.recv_src_idx", handle.recv_src_idx, 0, num_rows, "received rows");
  if (num_worst_tokens > 0 && handle.num_recv_tokens > num_worst_tokens)
    throw ArgumentError("num_worst_tokens = " + std::to_string(num_worst_tokens) + " is smaller than the " +
                        std::to_string(handle.num_recv_tokens) + " rows this rank receives");

  DispatchParams p;
  p.common = m.common(KernelId::kDispatch);
  p.num_blocks = config.num_sms;
  p.chunk = handle.chunk;
  p.max_chunks = handle.max_chunks;
  p.num_tokens = static_cast<int>(x.shape[0]);
  p.row_bytes = row_bytes;
  p.num_scales = num_scales;
  p.num_topk = K;
  p.experts_per_rank = handle.num_experts / R;
  p.cached = cached;
  p.ring.meta_row_bytes = ring::dispatch_meta_row_bytes(num_scales, K);
  p.ring.slot_bytes = ring::dispatch_slot_bytes(p.chunk, row_bytes, num_scales, K);
  p.ring.meta_offset = align_up(static_cast<size_t>(p.chunk) * row_bytes, 128);
  p.ring.offset = m.dispatch_ring_offset();
  const DispatchKernelShape shape = m.inter.enabled
                                        ? DispatchKernelShape{}
                                        : shape_dispatch_kernel(row_bytes, p.chunk, p.ring.meta_row_bytes, m.max_smem);
  if (!m.inter.enabled)
    p.ring.slots = ring_slots("dispatch", m.ring_region_bytes(), config.num_sms, p.ring.slot_bytes, config.ring_slots(),
                              dispatch_max_slots(), m.options.num_nvl_bytes);
  p.puller_warps = shape.puller_warps;
  p.puller_stages = shape.puller_stages;
  p.stager_piece_bytes = kStagerPieceBytes;
  p.x = x.ptr<const uint8_t>();
  if (x_scales) {
    p.x_scales = x_scales->ptr<const uint32_t>();
    p.scale_stride_token = x_scales->strides[0];
    p.scale_stride_group = x_scales->strides[1];
  }
  p.topk_idx = topk_idx ? topk_idx->ptr<const int64_t>() : nullptr;
  p.topk_weights = topk_weights ? topk_weights->ptr<const float>() : nullptr;
  p.is_token_in_rank = handle.is_token_in_rank.ptr<const uint8_t>();
  p.chunk_offset = handle.chunk_offset.ptr<const int32_t>();
  p.chunk_offset_stride = static_cast<int>(handle.chunk_offset.shape[1]);
  p.parity_counter = &m.counters->notify_count;
  p.recv_x = out.recv_x.ptr<uint8_t>();
  p.recv_scales = out.recv_x_scales ? out.recv_x_scales->ptr<uint32_t>() : nullptr;
  p.recv_topk_idx = out.recv_topk_idx ? out.recv_topk_idx->ptr<int64_t>() : nullptr;
  p.recv_topk_weights = out.recv_topk_weights ? out.recv_topk_weights->ptr<float>() : nullptr;
  p.recv_src_idx = handle.recv_src_idx.ptr<int32_t>();
  p.num_worst_tokens = num_worst_tokens;
  p.num_rows = num_rows;
  (void)buffer;
  if (m.inter.enabled) return m.run_internode_dispatch(p, handle, order);  // across nodes (buffer_internode.cpp)
  m.enter(order);
  launch_dispatch(p, shape.smem, m.comm);
  return m.leave(order);
}

}  // namespace

Event Buffer::dispatch_run(const DispatchInputs& in, const DispatchPlan& plan, DispatchHandle& handle,
                           const DispatchOutputs& out, const StreamOrder& order) {
  Impl& m = *impl_;
  handle.num_recv_tokens = plan.num_recv_tokens;
  handle.num_rows = plan.num_rows;
  handle.max_chunks = plan.max_chunks;
  Event e = launch_dispatch_common(*this, m, in.x, in.x_scales, in.topk_idx, in.topk_weights, handle, plan.num_rows,
                                   in.num_worst_tokens, /*cached=*/false, out, in.config, order);
  if (plan.invalid_topk_index >= 0)
    throw ArgumentError("topk_idx: entry at flat index " + std::to_string(plan.invalid_topk_index) +
                        " is out of range [-1, num_experts); it was treated as -1 so every rank could finish "
                        "this dispatch");
  return e;
}

Event Buffer::cached_dispatch(const TensorView& x, const std::optional<TensorView>& x_scales,
                              const DispatchHandle& handle, const DispatchOutputs& out, const Config& config,
                              const StreamOrder& order) {
  Impl& m = *impl_;
  m.require_normal_mode("dispatch (cached)");
  check_device_errors();
  check_x(m, x, x_scales, handle.num_tokens);
  config.validate(m.sm_count);
  check_filled_handle(m, handle);
  return launch_dispatch_common(*this, m, x, x_scales, std::nullopt, std::nullopt, handle, handle.num_rows,
                                handle.num_recv_tokens < 0 ? handle.num_rows : 0, /*cached=*/true, out, config, order);
}

Event Buffer::combine(const CombineInputs& in, const DispatchHandle& handle, const CombineOutputs& out,
                      const StreamOrder& order) {
  Impl& m = *impl_;
  m.require_normal_mode("combine");
  check_device_errors();
  const int R = m.num_ranks;
  check_filled_handle(m, handle);
  checks::device_tensor("x", in.x, m.device, {DType::kBF16}, 2);
  checks::aligned("x", in.x, 16);
  checks::dim("x", in.x, 0, handle.num_rows, "rows of the handle's dispatch");
  const int hidden = static_cast<int>(in.x.shape[1]);
  if ((hidden * 2) % 16 != 0)
    throw ArgumentError("x: hidden = " + std::to_string(hidden) + " must make rows a multiple of 16 bytes");
  const int T = handle.num_tokens;
  int K = 0;
  if (in.topk_weights) {
    checks::device_tensor("topk_weights", *in.topk_weights, m.device, {DType::kF32}, 2);
    checks::dim("topk_weights", *in.topk_weights, 0, handle.num_rows, "rows of the handle's dispatch");
    K = static_cast<int>(in.topk_weights->shape[1]);
    checks::in_range("num_topk", K, 1, kMaxTopk);
    if (!out.combined_topk_weights) throw ArgumentError("combined_topk_weights: needed when topk_weights is given");
    checks::device_tensor("combined_topk_weights", *out.combined_topk_weights, m.device, {DType::kF32}, 2);
    checks::dim("combined_topk_weights", *out.combined_topk_weights, 0, T, "tokens");
    checks::dim("combined_topk_weights", *out.combined_topk_weights, 1, K, "topk");
  }
  for (const auto* b : {&in.bias0, &in.bias1}) {
    if (!*b) continue;
    const char* name = b == &in.bias0 ? "bias[0]" : "bias[1]";
    checks::device_tensor(name, **b, m.device, {DType::kBF16}, 2);
    checks::aligned(name, **b, 16);
    checks::dim(name, **b, 0, T, "tokens");
    checks::dim(name, **b, 1, hidden, "hidden");
  }
  checks::device_tensor("combined_x", out.combined_x, m.device, {DType::kBF16}, 2);
  checks::aligned("combined_x", out.combined_x, 16);
  checks::dim("combined_x", out.combined_x, 0, T, "tokens");
  checks::dim("combined_x", out.combined_x, 1, hidden, "hidden");
  in.config.validate(m.sm_count);

  CombineParams p;
  p.common = m.common(KernelId::kCombine);
  p.num_blocks = in.config.num_sms;
  p.chunk = handle.chunk;
  p.max_chunks = handle.max_chunks;
  p.num_tokens = T;
  p.hidden = hidden;
  p.num_topk = K;
  p.ring.offset = m.combine_ring_offset();
  p.ring.slot_bytes = ring::combine_slot_bytes(p.chunk, R, hidden, K);
  p.ring.weights_offset = ring::combine_weights_offset(p.chunk, R, hidden);
  if (!m.inter.enabled)
    p.ring.slots = ring_slots("combine", m.ring_region_bytes(), in.config.num_sms, p.ring.slot_bytes,
                              in.config.ring_slots(), combine_max_slots(), m.options.num_nvl_bytes);
  // Four pusher warps (at most one per rank) share the block's segments (run 6: two warps were slower).
  const int pushers = shape_override("EPCOMM_COMBINE_PUSHER_WARPS", combine_max_pusher_warps());
  const int stages = shape_override("EPCOMM_COMBINE_PUSHER_STAGES", combine_max_pusher_bufs());
  const int reducers = shape_override("EPCOMM_COMBINE_REDUCER_WARPS", combine_max_reducer_warps());
  p.pusher_warps = std::min({pushers ? pushers : kPusherWarps, R, combine_max_pusher_warps()});
  p.pusher_stages = std::max(2, stages ? stages : kPusherStages);
  p.piece_bytes = kPusherPieceBytes;
  p.reducer_warps = reducers ? reducers : std::min(kReducerWarps, combine_max_reducer_warps());
  while (p.pusher_stages > 2 && combine_shared_bytes(p.pusher_warps, p.pusher_stages, p.piece_bytes) > m.max_smem)
    --p.pusher_stages;
  const int smem = combine_shared_bytes(p.pusher_warps, p.pusher_stages, p.piece_bytes);
  p.x = in.x.ptr<const uint16_t>();
  p.topk_weights = in.topk_weights ? in.topk_weights->ptr<const float>() : nullptr;
  p.chunk_offset = handle.chunk_offset.ptr<const int32_t>();
  p.chunk_offset_stride = static_cast<int>(handle.chunk_offset.shape[1]);
  p.is_token_in_rank = handle.is_token_in_rank.ptr<const uint8_t>();
  p.bias0 = in.bias0 ? in.bias0->ptr<const uint16_t>() : nullptr;
  p.bias1 = in.bias1 ? in.bias1->ptr<const uint16_t>() : nullptr;
  p.out = out.combined_x.ptr<uint16_t>();
  p.out_topk_weights = out.combined_topk_weights ? out.combined_topk_weights->ptr<float>() : nullptr;
  if (m.inter.enabled) return m.run_internode_combine(p, handle, order);  // across nodes (buffer_internode.cpp)
  m.enter(order);
  launch_combine(p, smem, m.comm);
  return m.leave(order);
}

}  // namespace epcomm
