// Plain data of the network transports (shared by host and device code): what a kernel needs to
// reach the internode region of every rank. See net_emulated.cuh for the transport interface.
#pragma once

#include <cstddef>
#include <cstdint>

namespace epcomm {

// GIN signals a GinContext (gin_context.hpp) holds per rank of its group, ids [0,
// kGinSignalsPerRank * R). The Buffer's plan (core/gin_signals.hpp) uses 13 per rank. NCCL's proxy
// descriptor carries a signal id in 16 bits, and its pool (NCCL_GIN_SIGNAL_POOL_SIZE) holds 64K by
// default: 16 x 1024 ranks (kMaxLowLatencyRanks) fits both.
constexpr int kGinSignalsPerRank = 16;

struct EmulatedNetParams {
  // Device array [R]: the region of each rank (internode or LL, as the kernel's mode): an LSA
  // pointer for ranks of this node (for the emulated network: for every rank), nullptr where not
  // load/store reachable. [rank] is this rank's own. Written once at Buffer creation (PeerTables).
  char* const* window = nullptr;
  size_t signals = 0;         // offset of the uint64 signal array inside a region (emulated)
  uint64_t* stats = nullptr;  // local: [0] puts, [1] bytes put (to ranks of other nodes)
  int ranks_per_node = 1;     // for the statistics: which puts cross the network
};

}  // namespace epcomm
