// Group of threads in one process (tests, debugging, several ranks on one GPU). Host collectives go
// through shared slots and a barrier; symmetric memory is cudaMalloc on each rank's device, reached
// by peers through peer access (or directly when two ranks share a GPU).
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <set>
#include <string>

#include "core/call_check.hpp"
#include "core/env.hpp"
#include "epcomm/group.hpp"

namespace epcomm {
namespace {

// The ranks' host barrier, bounded: a rank that never arrives (its thread threw in a Buffer's
// constructor, or stopped) fails every other rank's wait after the timeout with an error naming it,
// and the barrier stays broken (later waits fail at once) instead of hanging the process. The
// bound, 4 x EPCOMM_TIMEOUT_MS, allows a rank several GPU waits of its own before it arrives.
class TimedBarrier {
 public:
  explicit TimedBarrier(int n) : n_(n), arrived_at_(n, 0) {}

  // Throws RuntimeFailure naming the ranks that did not arrive.
  void arrive_and_wait(int rank) {
    std::string why;
    if (!try_arrive_and_wait(rank, &why)) throw RuntimeFailure(why);
  }

  // false (and `why`) where the barrier timed out or was broken; for destructors.
  bool try_arrive_and_wait(int rank, std::string* why) {
    std::unique_lock<std::mutex> lock(mu_);
    if (!broken_.empty()) {
      *why = broken_;
      return false;
    }
    const uint64_t gen = generation_;
    arrived_at_[rank] = gen + 1;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return true;
    }
    const auto timeout = std::chrono::milliseconds(4 * env_value("EPCOMM_TIMEOUT_MS"));
    if (cv_.wait_for(lock, timeout, [&] { return generation_ != gen || !broken_.empty(); }) && generation_ != gen)
      return true;
    if (broken_.empty()) {
      std::string missing;
      for (int r = 0; r < n_; ++r)
        if (arrived_at_[r] != gen + 1) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
      broken_ = "local group barrier: rank " + std::to_string(rank) + " waited " + std::to_string(timeout.count()) +
                " ms (4 x EPCOMM_TIMEOUT_MS) for rank(s) " + missing +
                ", which never arrived (a rank's thread threw or stopped); the group's barrier is broken";
      cv_.notify_all();
    }
    *why = broken_;
    return false;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int n_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
  std::vector<uint64_t> arrived_at_;  // per rank: 1 + the generation it last arrived at
  std::string broken_;
};

struct LocalFabric {
  explicit LocalFabric(int n) : size(n), sync(n), slots(n, nullptr) {}
  int size;
  TimedBarrier sync;
  std::vector<const void*> slots;
};

class LocalSymmetricMemory : public SymmetricMemory {
 public:
  LocalSymmetricMemory(int rank, size_t bytes, std::vector<void*> peers, std::shared_ptr<LocalFabric> fabric)
      : SymmetricMemory(rank, bytes), fabric_(std::move(fabric)) {
    peers_ = std::move(peers);
  }
  ~LocalSymmetricMemory() override {
    // Peers may still read or write this memory until everybody is done with it (a broken
    // barrier: the group failed; free it anyway rather than hang).
    std::string why;
    fabric_->sync.try_arrive_and_wait(rank_, &why);
    cudaFree(peers_[rank_]);
  }

 private:
  std::shared_ptr<LocalFabric> fabric_;
};

class LocalGroup : public Group {
 public:
  LocalGroup(int rank, int size, int device, int ranks_per_node, std::shared_ptr<LocalFabric> fabric,
             std::vector<int> devices)
      : Group(rank, size, device, ranks_per_node), fabric_(std::move(fabric)), devices_(std::move(devices)) {}

  std::string transport() const override { return "local threads (cudaMalloc + peer access)"; }

  void all_gather(const void* mine, void* all, size_t bytes) override {
    fabric_->slots[rank_] = mine;
    fabric_->sync.arrive_and_wait(rank_);
    for (int r = 0; r < size_; ++r) std::memcpy(static_cast<char*>(all) + r * bytes, fabric_->slots[r], bytes);
    fabric_->sync.arrive_and_wait(rank_);
  }

  std::unique_ptr<SymmetricMemory> allocate_symmetric(size_t bytes) override {
    EPCOMM_CUDA_CHECK(cudaSetDevice(device_));
    void* ptr = nullptr;
    EPCOMM_CUDA_CHECK(cudaMalloc(&ptr, bytes));
    // A private stream: ranks that share this GPU must not wait for each other's kernels.
    cudaStream_t s;
    EPCOMM_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    EPCOMM_CUDA_CHECK(cudaMemsetAsync(ptr, 0, bytes, s));
    EPCOMM_CUDA_CHECK(cudaStreamSynchronize(s));
    EPCOMM_CUDA_CHECK(cudaStreamDestroy(s));
    std::vector<void*> peers(size_);
    all_gather(&ptr, peers.data(), sizeof(void*));
    for (int r = 0; r < size_; ++r) {
      if (devices_[r] == device_) continue;
      int can = 0;
      EPCOMM_CUDA_CHECK(cudaDeviceCanAccessPeer(&can, device_, devices_[r]));
      if (!can)
        throw RuntimeFailure("local group: cuda:" + std::to_string(device_) +
                             " cannot access cuda:" + std::to_string(devices_[r]) + " directly (no NVLink/P2P)");
      cudaError_t e = cudaDeviceEnablePeerAccess(devices_[r], 0);
      if (e == cudaErrorPeerAccessAlreadyEnabled) {
        cudaGetLastError();
      } else {
        EPCOMM_CUDA_CHECK(e);
      }
    }
    return std::make_unique<LocalSymmetricMemory>(rank_, bytes, std::move(peers), fabric_);
  }

 private:
  std::shared_ptr<LocalFabric> fabric_;
  std::vector<int> devices_;
};

}  // namespace

std::vector<std::shared_ptr<Group>> Group::create_local(const std::vector<int>& devices, int ranks_per_node) {
  const int n = static_cast<int>(devices.size());
  if (n < 1) throw ArgumentError("create_local: devices must name at least one GPU");
  if (ranks_per_node == 0) ranks_per_node = n;
  if (ranks_per_node < 1 || n % ranks_per_node != 0)
    throw ArgumentError("ranks_per_node = " + std::to_string(ranks_per_node) + " must divide the number of ranks " +
                        std::to_string(n));
  auto fabric = std::make_shared<LocalFabric>(n);
  std::vector<std::shared_ptr<Group>> groups;
  for (int r = 0; r < n; ++r)
    groups.push_back(std::shared_ptr<Group>(new LocalGroup(r, n, devices[r], ranks_per_node, fabric, devices)));
  return groups;
}

}  // namespace epcomm
