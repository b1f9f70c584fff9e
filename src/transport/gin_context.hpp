// NCCL GIN for a symmetric allocation whose group spans real nodes (NCCL's LSA team smaller than
// the group): the device communicator with its GIN signals, created collectively before the
// allocation's window is registered, destroyed after the window is deregistered. Owned by the
// allocation (NcclSymmetricMemory, nccl_group.cpp) and reached through SymmetricMemory::gin().
//
// Facts of NCCL 2.28.9 this relies on (read from its source, src/dev_runtime.cc, src/gin/*):
// - ncclDevCommCreate switches GIN on when the communicator has more than one node, or any GIN
//   signal is asked for, or ginForceEnable; it then connects GIN once per communicator and
//   registers every symmetric memory that exists already; memory registered later is registered
//   with GIN at its registration. So the order of window and device communicator does not matter
//   to NCCL; creating the device communicator first means a failure leaves no window behind.
// - Without a GIN implementation (net plugin without a GIN table) it fails with ncclInvalidUsage
//   and the warning "GIN not supported." before any collective step, on every rank alike; the
//   communicator stays usable for collectives (blocking communicators keep no async error).
// - A device communicator's signals are a range of a per-communicator pool (src/gin/gin_host.cc,
//   ncclGinAllocSignalsCounters), zeroed once when GIN connects and not when a range is given back:
//   create() zeroes its range. Resetting is device-side only (ncclGin::resetSignal, "may not race
//   with concurrent modifications").
// - Signals are per GIN context (proxy and GDAKI keep one array per context), see gin_params.hpp.
// - ginContextCount is a hint that 2.28.9 does not read: the count is min(4, NCCL_GIN_NCONTEXTS).
// - NCCL_WIN_COLL_SYMMETRIC only affects NCCL's own symmetric collective kernels, not GIN.
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "transport/gin_params.hpp"
#include "transport/net_params.hpp"  // kGinSignalsPerRank

namespace epcomm {

class GinContext {
 public:
  // Collective over `comm` (every rank calls it): checks that the ranks agree on NCCL's GIN
  // settings, calls ncclDevCommCreate with num_signals GIN signals, and lets every rank learn
  // whether every other rank succeeded. Throws RuntimeFailure on every rank when any rank failed,
  // naming what is missing, the failing ranks and NCCL's error text; no rank is left inside a
  // collective. `stream`: for the agreement's small collectives.
  static std::unique_ptr<GinContext> create(ncclComm_t comm, int rank, int size, int num_signals, cudaStream_t stream);
  ~GinContext();  // ncclDevCommDestroy (every use of the signals must have ended)
  GinContext(const GinContext&) = delete;
  GinContext& operator=(const GinContext&) = delete;

  // The allocation's window, once registered (its puts' source and destination).
  void set_window(ncclWindow_t window) { window_ = window; }
  ncclWindow_t window() const { return window_; }
  int num_signals() const { return num_signals_; }
  int num_contexts() const { return dev_.ginContextCount; }
  int backend() const { return dev_.ginContextCount > 0 ? dev_.ginTypes[kGinContext] : 0; }  // ncclNetDeviceType

  // Kernel arguments for a region of the window (offset `region`) whose signals start at signal_base.
  GinNetParams params(size_t region, uint32_t signal_base, char* local, uint64_t* stats, int ranks_per_node) const;
  // Sets signals [first, first + count) to zero on every context, on `stream` (a small kernel: NCCL
  // resets signals on the device only). Nothing may signal them meanwhile: the caller holds every
  // rank between two barriers with no kernel of its own running.
  void reset_signals(uint32_t first, uint32_t count, cudaStream_t stream) const;
  // Waits until the transport has taken every put and signal this rank posted (a kernel that timed
  // out may have left some behind its flush), at most timeout_ns per peer; returns how many
  // (context, peer) queues were still pending. Buffer::reset and clean_low_latency_buffer call it
  // before their first barrier, so that no signal of an earlier call lands after a peer's reset.
  int drain(cudaStream_t stream, uint64_t timeout_ns) const;
  // Their current values as kGinContext sees them (diagnostics); waits for `stream`.
  std::vector<uint64_t> read_signals(uint32_t first, uint32_t count, cudaStream_t stream) const;

 private:
  GinContext(ncclComm_t comm, const ncclDevComm& dev, int num_signals)
      : comm_(comm), dev_(dev), num_signals_(num_signals) {}
  ncclComm_t comm_;
  ncclDevComm dev_;
  int num_signals_;
  ncclWindow_t window_ = nullptr;
};

// The NCCL settings that decide whether GIN exists on a rank, as one line (the ranks must agree on
// them: a rank with GIN would wait in NCCL's GIN connection for a rank without it). Exposed for
// the CPU tests.
std::string gin_settings_line();
// Ranks (other than 0) whose settings line differs from rank 0's, from every rank's hash.
std::vector<int> ranks_disagreeing(const std::vector<uint64_t>& hashes);
uint64_t settings_hash(const std::string& line);

}  // namespace epcomm
