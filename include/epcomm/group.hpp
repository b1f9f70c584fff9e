// The set of ranks that exchange tokens, and how they reach each other. A Group wraps an NCCL
// communicator (borrowed from the caller or created by epcomm), or, for tests and debugging, threads
// of one process that share GPUs without NCCL.
#pragma once

#include <nccl.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace epcomm {

class SymmetricMemory;
class GinContext;  // internal (src/transport/gin_context.hpp): NCCL GIN between nodes

class Group {
 public:
  virtual ~Group();
  Group(const Group&) = delete;
  Group& operator=(const Group&) = delete;

  // Borrow a communicator; epcomm never destroys it. ranks_per_node = 0: the NVLink domain NCCL
  // reports (or EPCOMM_RANKS_PER_NODE).
  static std::shared_ptr<Group> from_nccl(ncclComm_t comm, int ranks_per_node = 0);
  // Create (and own) a communicator: a collective call of all `num_ranks` ranks. Sets `device`.
  static std::shared_ptr<Group> create_nccl(const ncclUniqueId& id, int num_ranks, int rank, int device,
                                            int ranks_per_node = 0);
  // Threads of this process, rank r on devices[r] (devices may repeat: several ranks on one GPU).
  // Peers' memory is reached by plain pointers (cudaMalloc + peer access); no NCCL.
  static std::vector<std::shared_ptr<Group>> create_local(const std::vector<int>& devices, int ranks_per_node = 0);

  int rank() const { return rank_; }
  int size() const { return size_; }
  int device() const { return device_; }
  int ranks_per_node() const { return ranks_per_node_; }
  int num_nodes() const { return size_ / ranks_per_node_; }
  int node() const { return rank_ / ranks_per_node_; }
  virtual ncclComm_t nccl_comm() const { return nullptr; }
  virtual std::string transport() const = 0;

  // Collective host-side operations, used at setup and in rare control paths.
  //
  // barrier: every rank names the collective step it is at; the ranks gather the names (one
  // all_gather), and where any rank is at another step, or has passed a different number of
  // barriers of this group, every rank throws the same RuntimeFailure naming each rank's step,
  // instead of pairing one rank's step with another's (a rank that skipped a collective call, or
  // reset() on one rank meeting the destructor on another). Names longer than 47 bytes are cut.
  void barrier(const char* step = "Group::barrier");
  virtual void all_gather(const void* mine, void* all, size_t bytes_per_rank) = 0;
  // Memory every rank of this NVLink domain can load from and store to. Collective. Across real
  // nodes (an NCCL group whose ranks are not all load/store reachable) it also comes with NCCL GIN
  // to reach the others (SymmetricMemory::gin), or throws RuntimeFailure on every rank naming what
  // NCCL lacks.
  virtual std::unique_ptr<SymmetricMemory> allocate_symmetric(size_t bytes) = 0;

 protected:
  Group(int rank, int size, int device, int ranks_per_node);
  int rank_, size_, device_, ranks_per_node_;

 private:
  uint64_t barriers_ = 0;  // barriers this rank passed on this group
};

// A symmetric allocation: the same size on every rank, reachable from every rank of the domain.
class SymmetricMemory {
 public:
  virtual ~SymmetricMemory();
  void* local() const { return peers_[rank_]; }
  // Address of rank r's allocation as this rank sees it (nullptr where not load/store reachable).
  const std::vector<void*>& peers() const { return peers_; }
  size_t bytes() const { return bytes_; }
  // The network transport to ranks that are not load/store reachable (NCCL GIN over this
  // allocation's window), or nullptr when every rank is. An internal type: only the library's
  // kernels use it.
  virtual const GinContext* gin() const { return nullptr; }

 protected:
  SymmetricMemory(int rank, size_t bytes) : rank_(rank), bytes_(bytes) {}
  int rank_;
  size_t bytes_;
  std::vector<void*> peers_;
};

}  // namespace epcomm
