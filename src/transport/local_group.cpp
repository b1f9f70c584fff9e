// Group of threads in one process (tests, debugging, several ranks on one GPU). Host collectives go
// through shared slots and a barrier; symmetric memory is cudaMalloc on each rank's device, reached
// by peers through peer access (or directly when two ranks share a GPU).
#include <barrier>
#include <cstring>
#include <mutex>
#include <set>

#include "core/call_check.hpp"
#include "epcomm/group.hpp"

namespace epcomm {
namespace {

struct LocalFabric {
  explicit LocalFabric(int n) : size(n), sync(n), slots(n, nullptr) {}
  int size;
  std::barrier<> sync;
  std::vector<const void*> slots;
};

class LocalSymmetricMemory : public SymmetricMemory {
 public:
  LocalSymmetricMemory(int rank, size_t bytes, std::vector<void*> peers, std::shared_ptr<LocalFabric> fabric)
      : SymmetricMemory(rank, bytes), fabric_(std::move(fabric)) {
    peers_ = std::move(peers);
  }
  ~LocalSymmetricMemory() override {
    // Peers may still read or write this memory until everybody is done with it.
    fabric_->sync.arrive_and_wait();
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

  void barrier() override { fabric_->sync.arrive_and_wait(); }

  void all_gather(const void* mine, void* all, size_t bytes) override {
    fabric_->slots[rank_] = mine;
    fabric_->sync.arrive_and_wait();
    for (int r = 0; r < size_; ++r) std::memcpy(static_cast<char*>(all) + r * bytes, fabric_->slots[r], bytes);
    fabric_->sync.arrive_and_wait();
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
