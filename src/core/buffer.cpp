// Buffer construction, memory, stream ordering and error reporting. The modes live in
// buffer_normal.cpp and buffer_low_latency*.cpp.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "core/buffer_impl.hpp"
#include "core/argument_checks.hpp"
#include "core/call_check.hpp"
#include "core/env.hpp"
#include "core/region_plan.hpp"
#include "kernels/common/launch.hpp"
#include "epcomm/error.hpp"
#include "transport/gin_context.hpp"
#include "transport/nccl_lsa.hpp"

namespace epcomm {

Event& Event::operator=(Event&& o) noexcept {
  if (this != &o) {
    if (event_) cudaEventDestroy(event_);
    event_ = o.event_;
    o.event_ = nullptr;
  }
  return *this;
}
Event::~Event() {
  if (event_) cudaEventDestroy(event_);
}
void Event::wait_on(cudaStream_t stream) const {
  if (event_) EPCOMM_CUDA_CHECK(cudaStreamWaitEvent(stream, event_, 0));
}
void Event::synchronize() const {
  if (event_) EPCOMM_CUDA_CHECK(cudaEventSynchronize(event_));
}

Buffer::Buffer(std::shared_ptr<Group> group, const BufferOptions& options) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  if (!group) throw ArgumentError("Buffer: group must not be null");
  m.group = std::move(group);
  m.options = options;
  m.rank = m.group->rank();
  m.num_ranks = m.group->size();
  m.device = m.group->device();
  if (m.group->ranks_per_node() > kMaxLsaRanks)
    throw ArgumentError("ranks per node = " + std::to_string(m.group->ranks_per_node()) + " exceeds the " +
                        std::to_string(kMaxLsaRanks) + " one NVLink domain may hold");
  if (m.num_ranks > kMaxLowLatencyRanks)
    throw ArgumentError("num_ranks = " + std::to_string(m.num_ranks) + " exceeds the " +
                        std::to_string(kMaxLowLatencyRanks) + " ranks epcomm supports");
  m.inter.enabled = m.group->num_nodes() > 1;  // normal mode across nodes (buffer_internode.cpp)
  if (m.num_ranks > kMaxLsaRanks && options.low_latency_net == 0)
    throw ArgumentError("low_latency_net = 0 with " + std::to_string(m.num_ranks) +
                        " ranks: low-latency mode reaches at most " + std::to_string(kMaxLsaRanks) +
                        " ranks by load/store, the others through the network (leave it -1 or set 1)");
  // Larger groups than normal mode's kernels hold are for low-latency mode alone.
  if (!m.normal_mode_fits() && !options.low_latency_mode)
    throw ArgumentError(m.normal_mode_limit_text() +
                        "; a buffer for low-latency mode alone (low_latency_mode = true) "
                        "takes up to " +
                        std::to_string(kMaxLsaRanks) + " ranks per node and " + std::to_string(kMaxLowLatencyRanks) +
                        " in all");

  // Checked before anything collective, so every rank throws alike.
  checks::in_range("BufferOptions::low_latency_per_rank", options.low_latency_per_rank, -1, kLowLatencyPerRankMaxLevel);

  int device_count = 0;
  if (cudaGetDeviceCount(&device_count) != cudaSuccess || device_count == 0) {
    cudaGetLastError();
    throw RuntimeFailure(
        "Buffer: no CUDA device is visible (epcomm's GPU backend needs one; the CPU reference "
        "backend is epcomm::ref::HostCluster)");
  }
  EPCOMM_CUDA_CHECK(cudaSetDevice(m.device));
  if (options.comm_stream) {  // checked before anything collective, so every rank can throw alike
    int stream_device = -1;
    EPCOMM_CUDA_CHECK(cudaStreamGetDevice(options.comm_stream, &stream_device));
    if (stream_device != m.device)
      throw ArgumentError("comm_stream: a stream of cuda:" + std::to_string(stream_device) +
                          "; the buffer's device is cuda:" + std::to_string(m.device));
  }
  // Across real nodes the low-latency kernels reach the ranks of other nodes only through the
  // network (buffer_low_latency.cpp): the LSA path to every rank cannot be asked for there.
  if (options.low_latency_net == 0 && m.group->nccl_comm() != nullptr &&
      nccl_lsa_size(m.group->nccl_comm()) < m.num_ranks)
    throw ArgumentError(
        "low_latency_net = 0: the ranks of other nodes are not load/store reachable (NCCL's NVLink "
        "domain has " +
        std::to_string(nccl_lsa_size(m.group->nccl_comm())) + " of " + std::to_string(m.num_ranks) +
        " ranks), so low-latency mode reaches them through the network "
        "(leave it -1 or set 1)");
  cudaDeviceProp prop{};
  EPCOMM_CUDA_CHECK(cudaGetDeviceProperties(&prop, m.device));
  if (prop.major < 9)
    throw RuntimeFailure("Buffer: cuda:" + std::to_string(m.device) + " is sm_" +
                         std::to_string(prop.major * 10 + prop.minor) + "; epcomm needs Hopper (sm_90) or newer");
  m.sm_count = prop.multiProcessorCount;
  m.max_smem = static_cast<int>(prop.sharedMemPerBlockOptin);

  m.max_tokens = options.max_tokens_per_rank > 0 ? options.max_tokens_per_rank
                                                 : static_cast<int>(env_value("EPCOMM_MAX_TOKENS_PER_RANK"));
  m.max_local_experts = options.max_experts_per_rank > 0 ? options.max_experts_per_rank
                                                         : static_cast<int>(env_value("EPCOMM_MAX_EXPERTS_PER_RANK"));
  const int64_t timeout_ms = options.timeout_ms > 0 ? options.timeout_ms : env_value("EPCOMM_TIMEOUT_MS");
  m.timeout_ns = static_cast<uint64_t>(timeout_ms) * 1000000ull;

  // The parts of the symmetric region (core/region_plan.hpp): num_rdma_bytes held once, normal
  // mode's data across nodes on the LL region.
  const RegionPlan plan =
      plan_regions(options.num_nvl_bytes, options.num_rdma_bytes, m.num_ranks, m.group->ranks_per_node(), m.max_tokens,
                   m.max_local_experts, m.inter.enabled && m.normal_mode_fits());
  m.ctl = plan.ctl;
  m.data_offset = plan.data_offset;
  m.data_bytes = plan.data_bytes;
  m.ll.offset = plan.ll_offset;  // low-latency region (buffer_low_latency.cpp)
  m.ll.bytes = plan.ll_bytes;
  m.inter.offset = plan.inter_offset;  // internode region (buffer_internode.cpp)
  m.inter.bytes = plan.inter_bytes;
  // Across real nodes this also creates NCCL GIN, or throws on every rank (gin_context.hpp).
  m.sym = m.group->allocate_symmetric(plan.total);
  m.gin = m.sym->gin();
  m.gin_signals.num_ranks = m.num_ranks;
  if (m.gin && static_cast<uint32_t>(m.gin->num_signals()) < m.gin_signals.total())
    throw RuntimeFailure("Buffer: the GIN context holds " + std::to_string(m.gin->num_signals()) + " signals; " +
                         std::to_string(m.gin_signals.total()) + " are needed");
  // Ranks of this rank's node by load/store; ranks of other nodes by load/store too (one node,
  // virtual nodes) or only through GIN (real nodes). Every rank sees the same reachability.
  const int P = m.group->ranks_per_node();
  for (int r = 0; r < m.num_ranks; ++r) {
    if (m.sym->peers()[r] != nullptr) continue;
    if (r / P == m.rank / P)
      throw RuntimeFailure("Buffer: rank " + std::to_string(r) + " of rank " + std::to_string(m.rank) + "'s node (" +
                           std::to_string(P) + " ranks per node) is not reachable by NVLink load/store");
    if (m.gin == nullptr)
      throw RuntimeFailure("Buffer: rank " + std::to_string(r) + " is not reachable by NVLink load/store from rank " +
                           std::to_string(m.rank) + ", and the group gave no network transport to reach it (" +
                           m.group->transport() + ")");
  }

  {
    // How many of the group's ranks run on this GPU (by UUID: processes sharing one count too):
    // the clean's kernel sizes its grid by it (clean.cu).
    std::vector<cudaUUID_t> uuids(static_cast<size_t>(m.num_ranks));
    m.group->all_gather(&prop.uuid, uuids.data(), sizeof(cudaUUID_t));
    m.gpu_sharers = 0;
    for (const cudaUUID_t& u : uuids) m.gpu_sharers += std::memcmp(&u, &prop.uuid, sizeof(cudaUUID_t)) == 0;
  }
  if (options.comm_stream) {
    m.comm = options.comm_stream;  // borrowed: the caller keeps it alive (BufferOptions::comm_stream)
  } else {
    EPCOMM_CUDA_CHECK(cudaStreamCreateWithFlags(&m.comm, cudaStreamNonBlocking));
    m.owns_comm = true;
  }
  EPCOMM_CUDA_CHECK(cudaEventCreateWithFlags(&m.order_event, cudaEventDisableTiming));
  EPCOMM_CUDA_CHECK(cudaEventCreateWithFlags(&m.done_event, cudaEventDisableTiming));
  EPCOMM_CUDA_CHECK(cudaEventCreateWithFlags(&m.direct_event, cudaEventDisableTiming));
  m.join_each_call = env_value("EPCOMM_LL_JOIN_EACH_CALL") != 0;
  {
    std::vector<char*> tables(3 * static_cast<size_t>(m.num_ranks), nullptr);
    for (int r = 0; r < m.num_ranks; ++r) {
      char* base = static_cast<char*>(m.sym->peers()[r]);
      tables[r] = base;
      tables[m.num_ranks + r] = base ? base + m.ll.offset : nullptr;
      tables[2 * static_cast<size_t>(m.num_ranks) + r] = base ? base + m.inter.offset : nullptr;
    }
    EPCOMM_CUDA_CHECK(cudaMalloc(&m.peer_tables, sizeof(char*) * tables.size()));
    // On the comm stream, never the legacy default stream: ranks sharing a GPU may be in calls.
    EPCOMM_CUDA_CHECK(
        cudaMemcpyAsync(m.peer_tables, tables.data(), sizeof(char*) * tables.size(), cudaMemcpyHostToDevice, m.comm));
    EPCOMM_CUDA_CHECK(cudaStreamSynchronize(m.comm));
  }
  EPCOMM_CUDA_CHECK(cudaMalloc(&m.counters, sizeof(DeviceCounters)));
  DeviceCounters init{};
  init.seq = m.options.first_call_number;
  init.invalid_topk = -1;
  EPCOMM_CUDA_CHECK(cudaMemcpyAsync(m.counters, &init, sizeof(init), cudaMemcpyHostToDevice, m.comm));
  EPCOMM_CUDA_CHECK(cudaStreamSynchronize(m.comm));
  m.init_low_latency();
  EPCOMM_CUDA_CHECK(cudaHostAlloc(&m.record, sizeof(DeviceErrorRecord), cudaHostAllocMapped));
  std::memset(m.record, 0, sizeof(DeviceErrorRecord));
  EPCOMM_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&m.record_dev), m.record, 0));
  const size_t result_ints = kNotifyExpertCounts + static_cast<size_t>(m.max_local_experts);
  EPCOMM_CUDA_CHECK(cudaHostAlloc(&m.host_result, sizeof(int32_t) * result_ints, cudaHostAllocMapped));
  std::memset(m.host_result, 0, sizeof(int32_t) * result_ints);
  EPCOMM_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&m.host_result_dev), m.host_result, 0));
  m.init_internode();
  // Every kernel is loaded before any rank launches one (launch.hpp: lazy loading and ranks that
  // share a GPU).
  preload_kernels(/*with_gin=*/m.gin != nullptr);
  // Every rank must have its region zeroed before anyone signals into it.
  m.group->barrier("Buffer constructor");
}

Buffer::~Buffer() {
  Impl& m = *impl_;
  cudaSetDevice(m.device);
  bool idle = true;
  if (m.comm) {
    // join_direct_calls and sync_comm, without their throws (a destructor)
    if (m.direct_pending) cudaStreamWaitEvent(m.comm, m.direct_event, 0);
    try {
      idle = m.wait_bounded(m.comm);
    } catch (...) {
    }
  }
  try {
    m.group->barrier("Buffer destructor");  // no peer may still write into our region
  } catch (...) {
  }
  if (!idle) {
    // A kernel still runs on this memory: leave it allocated rather than free it under the kernel
    // (or hang the process's exit waiting for it).
    std::fprintf(stderr,
                 "epcomm rank %d: the communication stream still runs %lld ms after the Buffer's destruction began "
                 "(a kernel stuck in a wait epcomm cannot bound); its memory is left allocated\n",
                 m.rank, static_cast<long long>(m.comm_bound_ms()));
    (void)m.sym.release();
    return;
  }
  m.sym.reset();
  cudaFree(m.peer_tables);
  cudaFree(m.counters);
  m.release_low_latency();
  cudaFreeHost(m.record);
  cudaFreeHost(m.host_result);
  cudaEventDestroy(m.order_event);
  cudaEventDestroy(m.done_event);
  cudaEventDestroy(m.direct_event);
  if (m.owns_comm) cudaStreamDestroy(m.comm);
}

int Buffer::rank() const { return impl_->rank; }
int Buffer::num_ranks() const { return impl_->num_ranks; }
int Buffer::device() const { return impl_->device; }
const Group& Buffer::group() const { return *impl_->group; }
cudaStream_t Buffer::comm_stream() const { return impl_->comm; }
std::pair<void*, size_t> Buffer::local_buffer(bool rdma) const {
  char* base = static_cast<char*>(impl_->sym->local());
  return rdma ? std::pair<void*, size_t>{base + impl_->ll.offset, impl_->ll.bytes}
              : std::pair<void*, size_t>{base + impl_->data_offset, impl_->data_bytes};
}
const BufferOptions& Buffer::options() const { return impl_->options; }
int Buffer::max_tokens_per_rank() const { return impl_->max_tokens; }

void Buffer::Impl::enter(const StreamOrder& order) {
  EPCOMM_CUDA_CHECK(cudaSetDevice(device));
  join_direct_calls();  // the comm stream's work comes after every earlier call, as it always did
  if (order.previous_event) {
    EPCOMM_CUDA_CHECK(cudaStreamWaitEvent(comm, order.previous_event, 0));
  } else {
    EPCOMM_CUDA_CHECK(cudaEventRecord(order_event, order.stream));
    EPCOMM_CUDA_CHECK(cudaStreamWaitEvent(comm, order_event, 0));
  }
  comm_unjoined = comm_unjoined || order.async_finish;
}

Event Buffer::Impl::leave(const StreamOrder& order) {
  if (!order.async_finish) {
    // A reused event: recording captures the work so far, so one event serves every call.
    EPCOMM_CUDA_CHECK(cudaEventRecord(done_event, comm));
    EPCOMM_CUDA_CHECK(cudaStreamWaitEvent(order.stream, done_event, 0));
    return Event();
  }
  cudaEvent_t e = nullptr;
  EPCOMM_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  EPCOMM_CUDA_CHECK(cudaEventRecord(e, comm));
  return Event(e);
}

void Buffer::Impl::note_direct_call(cudaStream_t stream) {
  if (join_each_call) {
    EPCOMM_CUDA_CHECK(cudaEventRecord(order_event, stream));
    EPCOMM_CUDA_CHECK(cudaStreamWaitEvent(comm, order_event, 0));
    return;
  }
  // Stream ids are never reused (a handle may be, once its stream is destroyed): a call on another
  // stream first makes the comm stream wait for the latest call on the previous one.
  unsigned long long id = 0;
  EPCOMM_CUDA_CHECK(cudaStreamGetId(stream, &id));
  if (direct_pending && id != direct_stream_id) join_direct_calls();
  EPCOMM_CUDA_CHECK(cudaEventRecord(direct_event, stream));
  direct_stream_id = id;
  direct_pending = true;
}

void Buffer::Impl::join_direct_calls() {
  if (!direct_pending) return;
  EPCOMM_CUDA_CHECK(cudaStreamWaitEvent(comm, direct_event, 0));
  direct_pending = false;
}

bool Buffer::Impl::wait_bounded(cudaStream_t stream) const {
  cudaError_t e = cudaStreamQuery(stream);
  const auto start = std::chrono::steady_clock::now();
  auto pause = std::chrono::microseconds(20);
  while (e == cudaErrorNotReady) {
    if (std::chrono::steady_clock::now() - start > std::chrono::milliseconds(comm_bound_ms())) return false;
    std::this_thread::sleep_for(pause);
    pause = std::min(2 * pause, std::chrono::microseconds(1000));
    e = cudaStreamQuery(stream);
  }
  EPCOMM_CUDA_CHECK(e);
  return true;
}

void Buffer::Impl::sync_comm() {
  join_direct_calls();
  if (!wait_bounded(comm)) throw_stuck("the communication stream");
}

void Buffer::Impl::throw_stuck(const char* which) const {
  throw RuntimeFailure("epcomm rank " + std::to_string(rank) + ": " + which + " still runs after " +
                       std::to_string(comm_bound_ms()) +
                       " ms (4 x the timeout + 1 s): a kernel is stuck in a wait epcomm cannot bound (NCCL GIN's "
                       "put waits for queue credits without a bound once the network transport stops), or work "
                       "the calls were ordered after has not finished; this buffer can be neither used nor reset: "
                       "end the process");
}

bool Buffer::Impl::capturing(cudaStream_t stream) const {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  EPCOMM_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

std::string Buffer::Impl::normal_mode_limit_text() const {
  return "normal mode takes at most " + std::to_string(kMaxNvlRanks) + " ranks per node and, across nodes, " +
         std::to_string(kMaxInterRanks) + " ranks on at most " + std::to_string(kMaxInterNodes) +
         " nodes; this group has " + std::to_string(num_ranks) + " ranks, " + std::to_string(group->ranks_per_node()) +
         " per node";
}

void Buffer::Impl::require_normal_mode(const char* call) const {
  if (!normal_mode_fits()) throw ArgumentError(std::string(call) + ": " + normal_mode_limit_text());
}

CommonParams Buffer::Impl::common(KernelId kernel) const {
  CommonParams c;
  c.rank = rank;
  c.num_ranks = num_ranks;
  // Every rank where the group fits the table (normal mode indexes it by rank), else this rank's
  // node (low-latency mode: other nodes through the network; the constructor checked P).
  const LsaWindow w = lsa_window(rank, num_ranks, group->ranks_per_node());
  c.lsa_first = w.first;
  for (int i = 0; i < w.count; ++i) c.peer_base[i] = static_cast<char*>(sym->peers()[w.first + i]);
  c.ctl = ctl;
  c.seq_counter = &counters->seq;
  c.done_counter = &counters->done;
  c.wait.record = record_dev;
  c.wait.abort_flag = &counters->abort;
  c.wait.record_claimed = &counters->record_claimed;
  c.wait.timeout_ns = timeout_ns;
  c.wait.kernel = kernel;
  c.wait.rank = rank;
  return c;
}

void Buffer::check_device_errors() {
  Impl& m = *impl_;
  if (m.record->error() != DeviceError::kNone) {
    // The kernels that saw the error have left; make the buffer usable for the next call. (One
    // stuck where epcomm cannot bound its wait: the error says so, with what was recorded.)
    try {
      m.sync_comm();
    } catch (const RuntimeFailure& e) {
      throw RuntimeFailure(std::string(e.what()) + "; recorded first: " + describe(*m.record));
    }
    const DeviceErrorRecord r = *m.record;
    std::memset(m.record, 0, sizeof(DeviceErrorRecord));
    EPCOMM_CUDA_CHECK(cudaMemsetAsync(&m.counters->abort, 0, 2 * sizeof(int32_t), m.comm));  // abort, record_claimed
    EPCOMM_CUDA_CHECK(cudaStreamSynchronize(m.comm));
    const std::string what = "epcomm rank " + std::to_string(m.rank) + ": " + describe(r);
    if (r.error() == DeviceError::kBadArgument) throw ArgumentError(what);
    if (r.error() == DeviceError::kCallNumbersUsedUp) throw RuntimeFailure(what);
    throw TimeoutError(what);
  }
}

}  // namespace epcomm
