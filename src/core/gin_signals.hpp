// Which GIN signals of its GinContext a Buffer gives to which kernels (ids relative to the device
// communicator's; transport/gin_context.hpp). Each region's kernels number their signals from 0
// (GinNetParams::signal_base is the region's first):
//   [0, 5R)     normal mode across nodes: InterLayout::signal_id(kind, peer) = kind * R + peer
//   [5R, 13R)   low-latency network path: LowLatencyNetLayout::signal_id(buffer, kind, peer)
//   [13R, 14R)  clean_low_latency_buffer's barriers on the device (clean_gin.cu): one per peer
// A region's signals are reset with the memory whose running totals ("shadows") count them:
// Buffer::reset() both, clean_low_latency_buffer the low-latency ones; the clean barriers' count
// cleans (with DeviceCounters::ll_cleans) and only Buffer::reset() resets them.
#pragma once

#include <cstdint>

#include "kernels/internode/params.hpp"
#include "kernels/low_latency/params.hpp"
#include "transport/net_params.hpp"

namespace epcomm {

struct GinSignalPlan {
  int num_ranks = 0;
  uint32_t internode_base() const { return 0; }
  uint32_t internode_count() const { return static_cast<uint32_t>(kNumSignals) * num_ranks; }
  uint32_t low_latency_base() const { return internode_count(); }
  uint32_t low_latency_count() const { return static_cast<uint32_t>(2 * kLLNetKinds) * num_ranks; }
  uint32_t clean_base() const { return low_latency_base() + low_latency_count(); }
  uint32_t clean_count() const { return static_cast<uint32_t>(num_ranks); }
  uint32_t total() const { return clean_base() + clean_count(); }
};
static_assert(kNumSignals + 2 * kLLNetKinds + 1 <= kGinSignalsPerRank,
              "the Buffer's GIN signals must fit what the symmetric memory's GinContext holds per rank");

}  // namespace epcomm
