// Buffer: normal mode across nodes (docs/contract.md §3.2, hierarchical). buffer_normal.cpp checks the
// arguments and fills the intranode params exactly as for one node; with several nodes it hands
// them here instead of launching the intranode kernels. The algorithm is in
// kernels/internode/dispatch.cuh; the network hop is the emulated transport over virtual nodes
// (every rank load/store reachable), NCCL GIN across real nodes (Impl::gin, gin_kernels.cu).
#include <algorithm>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "core/buffer_impl.hpp"
#include "core/argument_checks.hpp"
#include "core/call_check.hpp"
#include "core/env.hpp"
#include "core/internode_tokens.hpp"
#include "core/region_plan.hpp"
#include "epcomm/error.hpp"
#include "transport/gin_context.hpp"

namespace epcomm {
namespace {

// The num_rdma_bytes whose data halves hold `half` bytes each: the control part comes on top of
// num_rdma_bytes (Buffer::Impl's constructor lays the halves on the LL region).
size_t required_bytes(size_t half) { return 2 * align_up(half, 4096); }

// The layout a Buffer of these arguments makes (the size functions' arguments checked first).
InterLayout sizing_layout(int max_tokens_per_rank, int hidden, int num_ranks, int ranks_per_node,
                          int max_experts_per_rank, size_t num_rdma_bytes) {
  checks::positive("max_tokens_per_rank", max_tokens_per_rank);
  checks::positive("hidden", hidden);
  checks::positive("ranks_per_node", ranks_per_node);
  checks::divisible("num_ranks", num_ranks, "ranks_per_node", ranks_per_node);
  // The region a Buffer lays out for these (core/region_plan.hpp): the control part on top of num_rdma_bytes.
  const size_t region =
      plan_regions(0, num_rdma_bytes, num_ranks, ranks_per_node, max_tokens_per_rank, max_experts_per_rank, true)
          .inter_bytes;
  return InterLayout::make(num_ranks, ranks_per_node, max_tokens_per_rank, (max_tokens_per_rank + 7) / 8,
                           max_experts_per_rank, region);
}

}  // namespace

void Buffer::Impl::init_internode() {
  if (!inter.enabled || !normal_mode_fits()) return;  // a group for low-latency mode alone
  inter.tokens = max_tokens;
  const char* env = std::getenv("EPCOMM_MAX_TOKENS_PER_RANK");
  inter.tokens_given = options.max_tokens_per_rank > 0 || (env != nullptr && *env != '\0');
  inter.bf16_partials = options.internode_bf16_partials >= 0 ? options.internode_bf16_partials != 0
                                                             : env_value("EPCOMM_INTER_BF16_PARTIALS") != 0;
  if (options.internode_combine_nvl >= 0 ? options.internode_combine_nvl != 0
                                         : env_value("EPCOMM_INTER_COMBINE_NVL") != 0) {
    inter.nvl_offset = data_offset;
    inter.nvl_bytes = data_bytes;
  }
  // Chunk masks per source in the meta entries: the smallest chunk is 8 tokens.
  inter.layout = InterLayout::make(num_ranks, group->ranks_per_node(), max_tokens, (max_tokens + 7) / 8,
                                   max_local_experts, inter.bytes);
}

void Buffer::Impl::require_low_latency_data() const {
  if (inter.normal_since_clean)
    throw ArgumentError(
        "low-latency call after a normal-mode call across nodes: both modes share num_rdma_bytes, so call "
        "clean_low_latency_buffer on every rank first (as with DeepEP)");
}

// The control part (shadows, flags, counters, stats) and, across real nodes, the GIN signals whose
// running totals the shadows keep. The data halves lie on the LL region, which reset_low_latency
// zeroes. Every rank is between two barriers (Buffer::reset).
void Buffer::Impl::reset_internode(cudaStream_t stream) {
  inter.normal_since_clean = false;
  if (gin) gin->reset_signals(gin_signals.internode_base(), gin_signals.internode_count(), stream);
  if (!inter.enabled || inter.bytes == 0) return;
  EPCOMM_CUDA_CHECK(
      cudaMemsetAsync(static_cast<char*>(sym->local()) + inter.offset, 0, inter.layout.control_bytes, stream));
  // The combine's pushed rows in num_nvl_bytes's part carry call numbers, which restart now.
  if (inter.nvl_bytes > 0)
    EPCOMM_CUDA_CHECK(cudaMemsetAsync(static_cast<char*>(sym->local()) + inter.nvl_offset, 0, inter.nvl_bytes, stream));
}

size_t Buffer::internode_size_hint(int max_tokens_per_rank, int hidden, int num_ranks, int ranks_per_node, int num_topk,
                                   int max_experts_per_rank) {
  const InterLayout l = sizing_layout(max_tokens_per_rank, hidden, num_ranks, ranks_per_node, max_experts_per_rank, 0);
  // The widest dispatch row: BF16 (FP8 rows plus scales are smaller). Rows for the layout's token
  // bound (T + 32 or more), so that every token fits one round for the chunks whose windows' step
  // (inter_window_step) plus the chunk is at most 34 (8, 10, 12, 16, 32; the default 32); a smaller
  // region works in rounds of what it holds.
  const InterDispatchGeometry d = InterDispatchGeometry::make(l, hidden * 2, 0, num_topk);
  const InterCombineGeometry c = InterCombineGeometry::make(l, hidden, num_topk);
  return required_bytes(std::max(d.bytes_for(l, l.max_tokens), c.bytes_for(l, l.max_tokens)));
}

Buffer::InternodeWindows Buffer::internode_windows(size_t num_rdma_bytes, int max_tokens_per_rank, int hidden,
                                                   int num_ranks, int ranks_per_node, int num_topk,
                                                   int max_experts_per_rank, int chunk, size_t num_nvl_bytes) {
  checks::positive("chunk", chunk);
  const InterLayout l =
      sizing_layout(max_tokens_per_rank, hidden, num_ranks, ranks_per_node, max_experts_per_rank, num_rdma_bytes);
  const int step = inter_window_step(chunk);
  InternodeWindows w;
  w.dispatch = InterDispatchGeometry::make(l, hidden * 2, 0, num_topk, step).window;
  // The part's offset does not change the window; its size, aligned as Buffer allocates it, does.
  const size_t nvl = align_up(num_nvl_bytes, 4096);  // 0: the option is off
  w.combine = InterCombineGeometry::make(l, hidden, num_topk, step, false, 0, nvl).window;
  return w;
}

InterCommon Buffer::Impl::inter_common(KernelId kernel, int num_blocks) const {
  InterCommon ic;
  ic.common = common(kernel);
  ic.layout = inter.layout;
  ic.net.window = inter_windows();
  ic.net.signals = inter.layout.signals;
  ic.net.ranks_per_node = inter.layout.ranks_per_node;
  ic.net.stats = reinterpret_cast<uint64_t*>(static_cast<char*>(sym->local()) + inter.offset + inter.layout.stats);
  ic.num_blocks = num_blocks;
  return ic;
}

GinNetParams Buffer::Impl::inter_gin_params() const {
  char* local = static_cast<char*>(sym->local()) + inter.offset;
  return gin->params(inter.offset, gin_signals.internode_base(), local,
                     reinterpret_cast<uint64_t*>(local + inter.layout.stats), group->ranks_per_node());
}

void Buffer::Impl::require_internode_region() const {
  if (inter.bytes == 0 || options.num_rdma_bytes == 0)
    throw ArgumentError(
        "num_rdma_bytes = 0: normal mode across nodes needs the internode region "
        "(num_rdma_bytes > 0; see Buffer::internode_size_hint)");
}

void Buffer::Impl::check_internode_dispatch(int row_bytes, int num_scales, int num_topk, int chunk, int hidden,
                                            int num_tokens, bool counts_on_host) {
  require_internode_region();
  const int step = inter_window_step(chunk);
  if (!inter.tokens_given && !inter.fitted && hidden > 0) {
    // A dispatch that does not wait for the counts (num_worst_tokens) runs its rounds for the token
    // limit, not the group's largest T: without a limit given, that is what one round holds at the
    // first dispatch's hidden (BF16 rows, top-k up to kMaxTopk: later calls still fit). Every rank's
    // first dispatch has the same hidden, so every rank finds the same.
    const int t = internode_round_capacity(inter.layout, hidden, kMaxTopk, step, inter.nvl_offset, inter.nvl_bytes);
    if (t > 0) inter.tokens = t;
    inter.fitted = true;
  }
  const InterDispatchGeometry g = InterDispatchGeometry::make(inter.layout, row_bytes, num_scales, num_topk, step);
  if (g.window == 0)
    throw ArgumentError("num_rdma_bytes = " + std::to_string(options.num_rdma_bytes) +
                        " is too small for this dispatch across nodes: rows of " + std::to_string(row_bytes) +
                        " bytes need " + std::to_string(required_bytes(g.bytes_for(inter.layout, step))) +
                        " for the smallest round (" + std::to_string(step) + " tokens per node), " +
                        std::to_string(required_bytes(g.bytes_for(inter.layout, std::max(num_tokens, step)))) +
                        " for all " + std::to_string(num_tokens) + " tokens in one (Buffer::internode_size_hint)");
  if (!counts_on_host && num_tokens > inter.tokens)
    throw ArgumentError("x: " + std::to_string(num_tokens) + " tokens per rank with num_worst_tokens; this buffer " +
                        "runs such dispatches for at most " + std::to_string(inter.tokens) +
                        " (no token limit was given: one round of its internode region, num_rdma_bytes = " +
                        std::to_string(options.num_rdma_bytes) +
                        "; set EPCOMM_MAX_TOKENS_PER_RANK or BufferOptions::max_tokens_per_rank)");
}

int Buffer::Impl::internode_round_tokens(const DispatchHandle& h) const {
  const int t = h.max_chunks * h.chunk;  // the group's largest T, rounded up to chunks
  if (h.num_recv_tokens >= 0) return t;
  // num_worst_tokens: the host never saw the counts, so the rounds cover the token limit.
  return std::min(t, static_cast<int>(align_up(static_cast<size_t>(inter.tokens), static_cast<size_t>(h.chunk))));
}

void Buffer::Impl::launch_internode_notify(const NotifyParams& np) {
  InterNotifyParams p;
  p.ic = inter_common(KernelId::kNotifyDispatch, np.num_blocks);
  p.num_tokens = np.num_tokens;
  p.num_experts = np.num_experts;
  p.chunk = np.chunk;
  p.expert_alignment = np.expert_alignment;
  p.worst_tokens = np.worst_tokens;
  p.row_bytes = np.row_bytes;
  p.rows_words = np.rows_words;
  p.is_token_in_rank = np.is_token_in_rank;
  p.num_tokens_per_rank = np.num_tokens_per_rank;
  p.num_tokens_per_expert = np.num_tokens_per_expert;
  p.parity_counter = np.parity_counter;
  p.rank_prefix_matrix = np.rank_prefix_matrix;
  p.chunk_offset = np.chunk_offset;
  p.chunk_offset_stride = np.chunk_offset_stride;
  p.num_recv_tokens_per_expert = np.num_recv_tokens_per_expert;
  p.invalid_topk = np.invalid_topk;
  p.host_result = np.host_result;
  p.host_token = np.host_token;
  if (gin) launch_inter_notify_gin(p, inter_gin_params(), comm);
  else launch_inter_notify(p, comm);
}

// Launches a call's rounds: each sets the params' window (and, for dispatch, whether it is the last),
// then `launch` (dispatch: the send and receive kernels; combine: its kernel).
template <class Params, class Launch>
void Buffer::Impl::run_internode_rounds(const DispatchHandle& handle, Params& p, Launch&& launch) {
  for_each_internode_round(internode_round_tokens(handle), p.geo.window, [&](int begin, int end, bool last) {
    p.window_begin = begin;
    p.window_end = end;
    if constexpr (std::is_same_v<Params, InterDispatchParams>) p.last_round = last;
    ++inter.rounds;
    inter.normal_since_clean = true;
    launch();
  });
}

Event Buffer::Impl::run_internode_dispatch(const DispatchParams& dp, const DispatchHandle& handle,
                                           const StreamOrder& order) {
  check_internode_dispatch(dp.row_bytes, dp.num_scales, dp.num_topk, dp.chunk, 0, dp.num_tokens,
                           handle.num_recv_tokens >= 0);
  InterDispatchParams p;
  p.ic = inter_common(KernelId::kDispatch, dp.num_blocks);
  p.geo =
      InterDispatchGeometry::make(inter.layout, dp.row_bytes, dp.num_scales, dp.num_topk, inter_window_step(dp.chunk));
  p.chunk = dp.chunk;
  p.max_chunks = dp.max_chunks;
  p.num_tokens = dp.num_tokens;
  p.row_bytes = dp.row_bytes;
  p.num_scales = dp.num_scales;
  p.num_topk = dp.num_topk;
  p.experts_per_rank = dp.experts_per_rank;
  p.cached = dp.cached;
  p.x = dp.x;
  p.x_scales = dp.x_scales;
  p.scale_stride_token = dp.scale_stride_token;
  p.scale_stride_group = dp.scale_stride_group;
  p.topk_idx = dp.topk_idx;
  p.topk_weights = dp.topk_weights;
  p.is_token_in_rank = dp.is_token_in_rank;
  p.chunk_offset = dp.chunk_offset;
  p.chunk_offset_stride = dp.chunk_offset_stride;
  p.recv_x = dp.recv_x;
  p.recv_scales = dp.recv_scales;
  p.recv_topk_idx = dp.recv_topk_idx;
  p.recv_topk_weights = dp.recv_topk_weights;
  p.recv_src_idx = dp.recv_src_idx;
  p.num_worst_tokens = dp.num_worst_tokens;
  p.num_rows = dp.num_rows;
  enter(order);
  run_internode_rounds(handle, p, [&] {
    if (gin) launch_inter_dispatch_gin(p, inter_gin_params(), comm);
    else launch_inter_dispatch(p, comm);
  });
  return leave(order);
}

Event Buffer::Impl::run_internode_combine(const CombineParams& cp, const DispatchHandle& handle,
                                          const StreamOrder& order) {
  require_internode_region();
  InterCombineParams p;
  p.ic = inter_common(KernelId::kCombine, cp.num_blocks);
  const int step = inter_window_step(cp.chunk);
  p.geo = InterCombineGeometry::make(inter.layout, cp.hidden, cp.num_topk, step, inter.bf16_partials, inter.nvl_offset,
                                     inter.nvl_bytes);
  if (p.geo.window == 0)
    throw ArgumentError("num_rdma_bytes = " + std::to_string(options.num_rdma_bytes) +
                        " is too small for this combine across nodes: hidden = " + std::to_string(cp.hidden) +
                        " needs " + std::to_string(required_bytes(p.geo.bytes_for(inter.layout, step))) +
                        " for the smallest round (" + std::to_string(step) +
                        " tokens per node; Buffer::internode_size_hint)");
  checks::device_tensor("handle.recv_src_idx", handle.recv_src_idx, device, {DType::kI32}, 1);
  checks::dim("handle.recv_src_idx", handle.recv_src_idx, 0, handle.num_rows, "received rows");
  p.chunk = cp.chunk;
  p.max_chunks = cp.max_chunks;
  p.num_tokens = cp.num_tokens;
  p.hidden = cp.hidden;
  p.num_topk = cp.num_topk;
  p.x = cp.x;
  p.topk_weights = cp.topk_weights;
  p.rank_prefix_matrix = handle.rank_prefix_matrix.ptr<const int32_t>();
  p.recv_src_idx = handle.recv_src_idx.ptr<const int32_t>();
  p.num_rows = handle.num_rows;
  p.is_token_in_rank = cp.is_token_in_rank;
  p.bias0 = cp.bias0;
  p.bias1 = cp.bias1;
  p.out = cp.out;
  p.out_topk_weights = cp.out_topk_weights;
  enter(order);
  run_internode_rounds(handle, p, [&] {
    if (gin) launch_inter_combine_gin(p, inter_gin_params(), comm);
    else launch_inter_combine(p, comm);
  });
  return leave(order);
}

Buffer::InternodeStats Buffer::internode_stats(bool reset) {
  Impl& m = *impl_;
  InternodeStats s;
  if (!m.inter.enabled || m.inter.bytes == 0) return s;
  EPCOMM_CUDA_CHECK(cudaSetDevice(m.device));
  // One read of the region's control words and traffic counters (the counters follow them), after
  // this rank's calls on the comm stream; never the legacy default stream: ranks that share a GPU
  // (threads of one process) must not wait for each other's work.
  const InterLayout& L = m.inter.layout;
  char* region = static_cast<char*>(m.sym->local()) + m.inter.offset;
  std::vector<uint64_t> words(L.stats / 8 + kNumStats);
  // Wait for this rank's calls first, with a plain stream sync: a copy into pageable memory blocks
  // inside the driver until the stream reaches it, and while it waits there other threads of the
  // process cannot launch on the same GPU (seen with ranks sharing a GPU: a rank blocked here on its
  // own notify kept a co-resident rank from launching the notify it was waiting for).
  m.sync_comm();
  EPCOMM_CUDA_CHECK(cudaMemcpyAsync(words.data(), region, words.size() * 8, cudaMemcpyDeviceToHost, m.comm));
  if (reset) EPCOMM_CUDA_CHECK(cudaMemsetAsync(region + L.stats, 0, sizeof(uint64_t) * kNumStats, m.comm));
  DeviceCounters dc{};
  EPCOMM_CUDA_CHECK(cudaMemcpyAsync(&dc, m.counters, sizeof(dc), cudaMemcpyDeviceToHost, m.comm));
  EPCOMM_CUDA_CHECK(cudaStreamSynchronize(m.comm));
  // Across real nodes the signals are NCCL's (GIN), not words of the region.
  const std::vector<uint64_t> gin_signals =
      m.gin ? m.gin->read_signals(m.gin_signals.internode_base(), m.gin_signals.internode_count(), m.comm)
            : std::vector<uint64_t>();
  const uint64_t* host = words.data() + L.stats / 8;
  {
    std::string& t = s.control;
    const auto num = [&t](uint64_t v) { t.append(std::to_string(v)); };
    t.append("rank ");
    num(static_cast<uint64_t>(m.rank));
    t.append(" seq ");
    num(dc.seq);
    t.append(" notify_count ");
    num(dc.notify_count);
    t.append(" abort ");
    num(static_cast<uint64_t>(dc.abort));
    const char* kinds[kNumSignals] = {"meta", "dispatch_data", "dispatch_free", "combine_data", "combine_free"};
    for (int k = 0; k < kNumSignals; ++k) {
      t.append("\n  ").append(kinds[k]).append(" signal/shadow by peer:");
      for (int r = 0; r < m.num_ranks; ++r) {
        t.push_back(' ');
        num(m.gin ? gin_signals[L.signal_id(k, r)] : words[L.signal(k, r) / 8]);
        t.push_back('/');
        num(words[L.shadow(k, r) / 8]);
      }
    }
    t.append("\n  flags (seq.value):");
    for (int k = 0; k < kNumFlags; ++k)
      for (int i = 0; i < L.flag_stride; ++i) {
        const uint64_t f = words[L.flag(k, i) / 8];
        t.push_back(' ');
        num(f >> 32);
        t.push_back('.');
        num(f & 0xffffffffu);
      }
    t.append("\n  counters:");
    const auto* counters = reinterpret_cast<const uint32_t*>(words.data() + L.counters / 8);
    for (int i = 0; i < kNumCounters; ++i) {
      t.push_back(' ');
      num(counters[i]);
    }
  }
  s.network_puts = host[kStatPuts];
  s.network_bytes = host[kStatPutBytes];
  s.network_rows = host[kStatRowsSent];
  s.nvlink_bytes = host[kStatNvlBytes];
  s.rounds = m.inter.rounds;
  if (reset) m.inter.rounds = 0;
  return s;
}

}  // namespace epcomm
