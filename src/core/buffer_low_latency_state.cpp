// Buffer, low-latency mode: the LL region's state across calls. Setup and release of the device
// counters, reset, clean_low_latency_buffer, the size hints, the network path's statistics and
// shrink mode's mask API.
#include <algorithm>
#include <array>
#include <string>

#include "core/argument_checks.hpp"
#include "core/buffer_low_latency.hpp"
#include "core/call_check.hpp"
#include "core/env.hpp"
#include "epcomm/error.hpp"
#include "transport/gin_context.hpp"

namespace epcomm {

using namespace low_latency;

namespace {

// The host's record of the LL calls, which starts again with the counters.
void forget_low_latency_calls(Buffer::Impl& m) {
  m.ll.next_buffer = 0;
  m.ll.issued_src_info[0] = m.ll.issued_src_info[1] = nullptr;
}

// What a clean zeroes on this rank: the flags of `flags_of` in the LL region (both buffers' tails
// and, on the network path, its signals and shadows: LowLatencyLayout::flags_begin), or the whole
// region where `flags_of` is null (Buffer::reset: normal mode's data halves lie on the region too,
// and their row tags restart with its call numbers); the call counters and shrink mode's count
// decisions (whose tags restart with the counters); bytes 0 where there is none. Not the mask:
// clean_low_latency_buffer keeps it.
using ZeroRanges = std::array<LowLatencyCleanParams::Range, LowLatencyCleanParams::kZeroRanges>;
ZeroRanges low_latency_zero_ranges(const Buffer::Impl& m, const LowLatencyLayout* flags_of) {
  char* const region = static_cast<char*>(m.sym->local()) + m.ll.offset;
  ZeroRanges z{};
  if (flags_of == nullptr) {
    z[0] = {region, m.ll.bytes};
  } else {
    const LowLatencyLayout& l = *flags_of;
    for (int b = 0; b < 2; ++b) z[b] = {region + l.flags_begin(b), l.flags_end(b) - l.flags_begin(b)};
    if (m.ll.net) {
      const LowLatencyNetLayout n = LowLatencyNetLayout::make(l);
      z[2] = {region + n.flags_begin(), n.flags_end() - n.flags_begin()};
    }
  }
  z[3] = {reinterpret_cast<char*>(m.ll.state), sizeof(LowLatencyDeviceState)};
  z[4] = {reinterpret_cast<char*>(m.ll.count_decisions), m.ll.count_decisions ? m.ll.count_decision_bytes : 0};
  return z;
}

// Zeroes low_latency_zero_ranges on `stream`; across real nodes also the LL GIN signals (their
// shadows are in the region). Every rank is between two barriers.
void clear_low_latency_calls(Buffer::Impl& m, cudaStream_t stream, const LowLatencyLayout* flags_of) {
  for (const LowLatencyCleanParams::Range& r : low_latency_zero_ranges(m, flags_of))
    if (r.bytes > 0) EPCOMM_CUDA_CHECK(cudaMemsetAsync(r.data, 0, r.bytes, stream));
  if (m.gin) m.gin->reset_signals(m.gin_signals.low_latency_base(), m.gin_signals.low_latency_count(), stream);
  forget_low_latency_calls(m);
}

}  // namespace

void Buffer::Impl::init_low_latency() {
  // Across real nodes always (the constructor refused low_latency_net = 0 there).
  const bool asked = options.low_latency_net < 0 ? low_latency_net_requested() : options.low_latency_net != 0;
  // More ranks than one CommonParams::peer_base holds (kMaxLsaRanks): the kernels reach only this
  // node's ranks by load/store, the others through the network, over virtual nodes too (the
  // constructor refused low_latency_net = 0 there).
  const bool too_many_for_lsa = num_ranks > kMaxLsaRanks;
  ll.net = (gin != nullptr || asked || too_many_for_lsa) && group->ranks_per_node() < num_ranks;
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
  return gin->params(ll.offset, gin_signals.low_latency_base(), local,
                     reinterpret_cast<uint64_t*>(&ll.state->net_stats[0]), group->ranks_per_node());
}

// Buffer::reset: as if new, the mask included.
void Buffer::Impl::reset_low_latency(cudaStream_t stream) {
  clear_low_latency_calls(*this, stream, nullptr);
  // The clean barriers' signals count cleans, which start again with the counters (Buffer::reset).
  if (gin) gin->reset_signals(gin_signals.clean_base(), gin_signals.clean_count(), stream);
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
  m.sync_comm();
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
  // Normal mode's data on the region may stay: clean zeroes every word an LL call waits on.
  m.inter.normal_since_clean = false;
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
  // Across real nodes: the device barriers (clean_gin.cu) while capturing or when asked; else the
  // host's, which first drain what a failed call left with the transport. Every rank decides alike
  // (ranks capture the same graphs; the environment is the job's).
  const bool on_device = m.gin == nullptr || m.capturing(stream) || env_value("EPCOMM_LL_CLEAN_ON_DEVICE") != 0;
  if (!on_device) {
    // The group's barriers, on the host: this clean waits for the host and cannot be captured.
    if (!m.wait_bounded(stream)) m.throw_stuck("the caller's stream");
    m.sync_comm();
    // What a failed call left with the transport lands first (Buffer::reset).
    m.gin->drain(m.comm, m.timeout_ns);
    // Nobody may still write into our region while we clear it, nor into a peer's before it cleared.
    m.group->barrier("clean_low_latency_buffer (before)");
    clear_low_latency_calls(m, m.comm, &l);
    EPCOMM_CUDA_CHECK(cudaStreamSynchronize(m.comm));
    m.ll.layout = l;
    m.group->barrier("clean_low_latency_buffer (after)");
    return;
  }
  // Work on the caller's stream (kernel_params.hpp, LowLatencyCleanParams): barrier, zero, barrier. No
  // host wait, so it can be captured in a CUDA graph. An async_finish call still running on the
  // comm stream comes first (begin_call joins it, as for any LL call).
  LowLatencyCleanParams p;
  p.common = m.common(KernelId::kLowLatencyClean);
  p.peers = m.peer_regions();
  // Ranks reach clean after their own earlier calls, each of which may wait up to a timeout (a
  // masked peer's first missing answer costs one per half): the barriers allow a rank three
  // timeouts and 10 s more to arrive, as the host allows the count exchange.
  p.common.wait.timeout_ns = 3 * m.timeout_ns + 10'000'000'000ull;
  p.clean_count = &m.counters->ll_cleans;
  if (m.options.enable_shrink) p.mask = m.ll.mask;
  const StreamOrder order{stream, nullptr, false};
  cudaStream_t s = begin_call(m, order);
  if (m.gin) {
    // Across real nodes: GIN signal barriers around the stream-ordered zeroing (one process per
    // GPU there, so no peer's barrier queues behind this rank's work).
    const GinNetParams g =
        m.gin->params(m.ll.offset, m.gin_signals.clean_base(), static_cast<char*>(m.sym->local()) + m.ll.offset,
                      nullptr, m.group->ranks_per_node());
    p.barrier = 1;
    launch_low_latency_clean_barrier_gin(p, g, s);
    clear_low_latency_calls(m, s, &l);
    p.barrier = 2;
    launch_low_latency_clean_barrier_gin(p, g, s);
  } else {
    // One kernel: the barriers and the zeroing (low_latency_zero_ranges). Its blocks wait
    // for block 0's barrier 1, so where ranks share this GPU they are few (every rank's blocks
    // must be resident at once); alone on it, up to 32 (the flags zero in about a microsecond).
    const ZeroRanges zero = low_latency_zero_ranges(m, &l);
    std::copy(zero.begin(), zero.end(), p.zero);
    p.go = &m.counters->ll_clean_go;
    p.zeroed = &m.counters->ll_clean_zeroed;
    const int blocks = m.gpu_sharers > 1 ? std::max(1, std::min(8, m.sm_count / (4 * m.gpu_sharers)))
                                         : std::max(1, std::min(32, m.sm_count / 4));
    launch_low_latency_clean(p, blocks, s);
    forget_low_latency_calls(m);
  }
  end_call(m, order);
  m.ll.layout = l;
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
  EPCOMM_CUDA_CHECK(
      cudaMemcpyAsync(mask_status.data, m.ll.mask, sizeof(int32_t) * m.num_ranks, cudaMemcpyDeviceToDevice, stream));
}

void Buffer::low_latency_clean_mask_buffer(cudaStream_t stream) {
  Impl& m = *impl_;
  EPCOMM_CUDA_CHECK(cudaSetDevice(m.device));
  launch_low_latency_set_mask(m.ll.mask, m.num_ranks, -1, 0, stream);
}

}  // namespace epcomm
