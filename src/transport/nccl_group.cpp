// Group over an NCCL communicator: host collectives through NCCL, symmetric memory through
// ncclMemAlloc + a symmetric window, peers reached by LSA (NVLink load/store) pointers, and across
// real nodes NCCL GIN (gin_context.hpp) for the ranks that are not.
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "core/call_check.hpp"
#include "core/env.hpp"
#include "epcomm/error.hpp"
#include "epcomm/group.hpp"
#include "transport/gin_context.hpp"
#include "transport/nccl_lsa.hpp"
#include "transport/nccl_wait.hpp"

namespace epcomm {
namespace {

class NcclSymmetricMemory : public SymmetricMemory {
 public:
  // Across real nodes (NCCL's LSA team smaller than the group) the GIN device communicator comes
  // first: a failure then leaves no window registered, and every rank fails in GinContext::create
  // alike. The window is registered after it, so NCCL registers it with GIN at registration.
  // `aborted`: the group's flag; after an abort the window and the device communicator cannot be
  // released through NCCL (ncclCommAbort freed the communicator), only the memory.
  NcclSymmetricMemory(ncclComm_t comm, int rank, int size, size_t bytes, cudaStream_t stream, const bool* aborted)
      : SymmetricMemory(rank, bytes), comm_(comm), aborted_(aborted) {
    void* ptr = nullptr;
    EPCOMM_NCCL_CHECK(ncclMemAlloc(&ptr, bytes));
    base_ = ptr;
    try {
      EPCOMM_CUDA_CHECK(cudaMemsetAsync(ptr, 0, bytes, stream));
      EPCOMM_CUDA_CHECK(cudaStreamSynchronize(stream));
      if (nccl_lsa_size(comm) < size) gin_ = GinContext::create(comm, rank, size, kGinSignalsPerRank * size, stream);
      EPCOMM_NCCL_CHECK(ncclCommWindowRegister(comm, ptr, bytes, &window_, NCCL_WIN_COLL_SYMMETRIC));
      if (gin_) gin_->set_window(window_);
      peers_ = nccl_lsa_peer_pointers(comm, window_, stream);
    } catch (...) {
      release();
      throw;
    }
  }
  ~NcclSymmetricMemory() override { release(); }

  const GinContext* gin() const override { return gin_.get(); }

 private:
  // The reverse of construction: window, then the device communicator (its signals), then memory.
  // The caller has made sure that no kernel and no peer uses them any more (Buffer's destructor
  // synchronizes and meets every rank at a barrier first).
  void release() {
    if (window_ && !*aborted_) ncclCommWindowDeregister(comm_, window_);
    window_ = nullptr;
    if (*aborted_) (void)gin_.release();  // its communicator is gone: nothing of it may be called, the memory is lost
    else gin_.reset();
    if (base_) ncclMemFree(base_);
    base_ = nullptr;
  }

  ncclComm_t comm_;
  const bool* aborted_;
  ncclWindow_t window_ = nullptr;
  void* base_ = nullptr;
  std::unique_ptr<GinContext> gin_;
};

class NcclGroup : public Group {
 public:
  NcclGroup(ncclComm_t comm, bool owned, int rank, int size, int device, int ranks_per_node)
      : Group(rank, size, device, ranks_per_node), comm_(comm), owned_(owned) {
    EPCOMM_CUDA_CHECK(cudaSetDevice(device));
    EPCOMM_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  }
  ~NcclGroup() override {
    cudaStreamDestroy(stream_);
    if (owned_ && !aborted_) ncclCommDestroy(comm_);  // an aborted communicator is already freed
  }

  ncclComm_t nccl_comm() const override { return comm_; }
  std::string transport() const override {
    return nccl_lsa_size(comm_) < size_ ? "NCCL symmetric memory (LSA; GIN to other nodes)"
                                        : "NCCL symmetric memory (LSA)";
  }

  void all_gather(const void* mine, void* all, size_t bytes) override {
    require_alive("all_gather");
    void* dev = nullptr;
    EPCOMM_CUDA_CHECK(cudaMallocAsync(&dev, bytes * size_, stream_));
    EPCOMM_CUDA_CHECK(
        cudaMemcpyAsync(static_cast<char*>(dev) + rank_ * bytes, mine, bytes, cudaMemcpyHostToDevice, stream_));
    EPCOMM_NCCL_CHECK(ncclAllGather(static_cast<char*>(dev) + rank_ * bytes, dev, bytes, ncclUint8, comm_, stream_));
    // Bounded wait for the collective first: a copy into pageable host memory queued behind it
    // would block this thread until it finished, without a bound (a dead peer hung the barrier so).
    wait_nccl_or_abort(comm_, owned_, stream_, timeout_ms(), "group all_gather", rank_, size_, &aborted_);
    EPCOMM_CUDA_CHECK(cudaMemcpyAsync(all, dev, bytes * size_, cudaMemcpyDeviceToHost, stream_));
    EPCOMM_CUDA_CHECK(cudaFreeAsync(dev, stream_));
    EPCOMM_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  std::unique_ptr<SymmetricMemory> allocate_symmetric(size_t bytes) override {
    EPCOMM_CUDA_CHECK(cudaSetDevice(device_));
    require_alive("allocate_symmetric");
    return std::make_unique<NcclSymmetricMemory>(comm_, rank_, size_, bytes, stream_, &aborted_);
  }

 private:
  static int64_t timeout_ms() { return env_value("EPCOMM_TIMEOUT_MS"); }
  void require_alive(const char* what) const {
    if (aborted_)
      throw RuntimeFailure(std::string("group ") + what + " on rank " + std::to_string(rank_) +
                           ": the communicator was aborted after a peer did not answer; destroy the buffer and group");
  }

  ncclComm_t comm_;
  bool owned_;
  bool aborted_ = false;  // by wait_nccl_or_abort: a peer never answered
  cudaStream_t stream_ = nullptr;
};

int resolve_ranks_per_node(ncclComm_t comm, int size, int requested) {
  int rpn = requested > 0 ? requested : static_cast<int>(env_value("EPCOMM_RANKS_PER_NODE"));
  const int lsa = nccl_lsa_size(comm);
  if (rpn <= 0) rpn = lsa;
  if (rpn > lsa)
    throw ArgumentError("ranks_per_node = " + std::to_string(rpn) + " exceeds the NVLink domain NCCL reports (" +
                        std::to_string(lsa) + " ranks)");
  if (size % rpn != 0)
    throw ArgumentError("ranks_per_node = " + std::to_string(rpn) + " must divide the number of ranks " +
                        std::to_string(size));
  return rpn;
}

}  // namespace

std::shared_ptr<Group> Group::from_nccl(ncclComm_t comm, int ranks_per_node) {
  if (comm == nullptr) throw ArgumentError("from_nccl: comm must not be null");
  int size = 0, rank = 0, device = 0;
  EPCOMM_NCCL_CHECK(ncclCommCount(comm, &size));
  EPCOMM_NCCL_CHECK(ncclCommUserRank(comm, &rank));
  EPCOMM_NCCL_CHECK(ncclCommCuDevice(comm, &device));
  const int rpn = resolve_ranks_per_node(comm, size, ranks_per_node);
  return std::shared_ptr<Group>(new NcclGroup(comm, false, rank, size, device, rpn));
}

namespace {

// Polls `*comm` (non-blocking) until NCCL's asynchronous state leaves ncclInProgress, at most
// `timeout_ms`; on expiry or an error, aborts `*comm` (if NCCL has handed it out) and throws naming
// `what`, the rank and the group. While a split is in flight `*comm` is still null (NCCL sets it when
// the child is complete): then `parent`'s state tells an error. `parent` is never aborted here.
void wait_nonblocking(ncclComm_t* comm, ncclComm_t parent, int64_t timeout_ms, const char* what, int rank, int size) {
  const auto start = std::chrono::steady_clock::now();
  const auto where = [&] {
    return std::string(what) + " on rank " + std::to_string(rank) + " of " + std::to_string(size);
  };
  const auto give_up = [&] {
    if (*comm != nullptr) ncclCommAbort(*comm);
    *comm = nullptr;
  };
  for (;;) {
    ncclResult_t state = ncclInProgress;
    ncclComm_t watched = *comm != nullptr ? *comm : parent;
    if (watched != nullptr) {
      ncclResult_t r = ncclInProgress;
      EPCOMM_NCCL_CHECK(ncclCommGetAsyncError(watched, &r));
      // The parent's success says nothing about the child still being made.
      state = (watched == parent && r == ncclSuccess) ? ncclInProgress : r;
    }
    if (state == ncclSuccess) return;
    if (state != ncclInProgress) {
      const std::string last = watched ? ncclGetLastError(watched) : "";
      give_up();
      throw RuntimeFailure(where() + " failed: " + ncclGetErrorString(state) + (last.empty() ? "" : " (" + last + ")"));
    }
    const auto waited =
        std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start).count();
    if (waited > timeout_ms) {
      give_up();
      throw TimeoutError(where() + " did not finish within " + std::to_string(timeout_ms) +
                         " ms (EPCOMM_INIT_TIMEOUT_MS): a rank of the group never joined or died while joining; "
                         "the communicator was aborted");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

// ncclCommInitRank waits without a bound for every rank to join, so a rank that dies before joining
// (a process killed while the others build their Buffer) holds the others for ever. With a bound
// (EPCOMM_INIT_TIMEOUT_MS > 0) the communicator is made non-blocking and polled; the rest of epcomm
// calls NCCL in blocking mode, so a blocking communicator is then split off it (every rank has just
// joined) and the non-blocking one destroyed. Returns the blocking communicator.
ncclComm_t init_bounded(const ncclUniqueId& id, int num_ranks, int rank, int64_t timeout_ms) {
  ncclConfig_t nonblocking = NCCL_CONFIG_INITIALIZER;
  nonblocking.blocking = 0;
  ncclComm_t parent = nullptr;
  const ncclResult_t r = ncclCommInitRankConfig(&parent, num_ranks, id, rank, &nonblocking);
  if (r != ncclSuccess && r != ncclInProgress) {
    if (parent) ncclCommAbort(parent);
    EPCOMM_NCCL_CHECK(r);
  }
  wait_nonblocking(&parent, nullptr, timeout_ms, "ncclCommInitRank", rank, num_ranks);  // aborts it on failure
  ncclConfig_t blocking = NCCL_CONFIG_INITIALIZER;
  blocking.blocking = 1;
  // NCCL's split job writes the child into *slot from its own thread when it ends, which after a
  // timeout may be after this function returned: the slot lives on the heap, left behind on failure.
  auto* slot = new ncclComm_t(nullptr);
  try {
    const ncclResult_t s = ncclCommSplit(parent, 0, rank, slot, &blocking);
    if (s != ncclSuccess && s != ncclInProgress) EPCOMM_NCCL_CHECK(s);
    wait_nonblocking(slot, parent, timeout_ms, "ncclCommSplit (the blocking communicator)", rank, num_ranks);
  } catch (...) {
    ncclCommAbort(parent);  // also stops a child still being made (NCCL's child abort flag)
    throw;
  }
  const ncclComm_t comm = *slot;
  delete slot;
  ncclCommDestroy(parent);  // non-blocking: may finish in the background
  return comm;
}

}  // namespace

std::shared_ptr<Group> Group::create_nccl(const ncclUniqueId& id, int num_ranks, int rank, int device,
                                          int ranks_per_node) {
  if (num_ranks < 1 || rank < 0 || rank >= num_ranks)
    throw ArgumentError("create_nccl: rank " + std::to_string(rank) + " must be in [0, " + std::to_string(num_ranks) +
                        ")");
  EPCOMM_CUDA_CHECK(cudaSetDevice(device));
  ncclComm_t comm = nullptr;
  const int64_t init_timeout_ms = env_value("EPCOMM_INIT_TIMEOUT_MS");
  if (init_timeout_ms > 0) {
    comm = init_bounded(id, num_ranks, rank, init_timeout_ms);
  } else {
    EPCOMM_NCCL_CHECK(ncclCommInitRank(&comm, num_ranks, id, rank));
  }
  try {
    const int rpn = resolve_ranks_per_node(comm, num_ranks, ranks_per_node);
    return std::shared_ptr<Group>(new NcclGroup(comm, true, rank, num_ranks, device, rpn));
  } catch (...) {
    ncclCommDestroy(comm);
    throw;
  }
}

}  // namespace epcomm
