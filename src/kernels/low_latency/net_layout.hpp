// Low-latency mode across nodes: the network path's area of the LL region (signals, shadows,
// staged counts, headers and tokens). Plain data shared by host and device code.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/common/control.hpp"
#include "kernels/low_latency/region_layout.hpp"

namespace epcomm {

// LL across nodes through the network transport (EPCOMM_LL_NET=1 / BufferOptions::low_latency_net,
// with more than one node; see ll_net.cuh for the protocol). Ranks of the same node keep the LSA
// path; ranks of other nodes get puts from the sender's own window and signal adds. The area
// follows the two buffers inside the LL region (offsets from the region's start, like the
// layout's); a clean zeroes its signals and shadows with the buffers' flags (flags_begin):
//   signals  u64 [2 buffers][kLLNetKinds][R]   peers add into them (emulated transport)
//   shadows  u64 [2][kLLNetKinds][R]            local: running totals this rank has waited for
//   meta_out [2][R dests] entries              staging: counts + headers for each destination
//   meta_in  [2][R sources] entries            received: a source's counts + headers
//   tokens   [2][Tmax] msg_bytes               staging: this rank's tokens (put sources)
// An entry: counts u32 [E/R] (padded to 16 bytes), then headers u32 [E/R][Tpad] (t | k << 16 of
// slot s, Tpad = Tmax rounded up to 4).
enum LowLatencyNetKind : int { kLLNetMeta = 0, kLLNetData, kLLNetCombineData, kLLNetCombineDone, kLLNetKinds };

struct LowLatencyNetLayout {
  int num_ranks = 0, local_experts = 0, max_tokens = 0, tpad = 0;
  size_t msg_bytes = 0;
  size_t signals = 0, shadows = 0, meta_out = 0, meta_in = 0, tokens = 0;
  size_t entry_bytes = 0, counts_bytes = 0;
  size_t end = 0;  // bytes of the LL region this needs (both buffers and this area)

  static LowLatencyNetLayout make(const LowLatencyLayout& l) {
    LowLatencyNetLayout n;
    n.num_ranks = l.num_ranks;
    n.local_experts = l.local_experts;
    n.max_tokens = l.max_tokens;
    n.tpad = static_cast<int>(align_up(static_cast<size_t>(l.max_tokens), 4));
    n.msg_bytes = l.msg_bytes;
    const size_t sig = sizeof(uint64_t) * 2 * kLLNetKinds * static_cast<size_t>(l.num_ranks);
    n.counts_bytes = align_up(sizeof(uint32_t) * static_cast<size_t>(l.local_experts), 16);
    n.entry_bytes = n.counts_bytes + sizeof(uint32_t) * static_cast<size_t>(l.local_experts) * n.tpad;
    size_t off = l.total_bytes;
    n.signals = off;
    off = align_up(off + sig, 128);
    n.shadows = off;
    off = align_up(off + sig, 128);
    n.meta_out = off;
    off += 2 * static_cast<size_t>(l.num_ranks) * n.entry_bytes;
    n.meta_in = off;
    off += 2 * static_cast<size_t>(l.num_ranks) * n.entry_bytes;
    n.tokens = off;
    off += 2 * static_cast<size_t>(l.max_tokens) * l.msg_bytes;
    n.end = align_up(off, 128);
    return n;
  }
  // What clean_low_latency_buffer zeroes of this area: the signals and shadows (meta entries and
  // tokens are data, read only after a signal says they arrived).
  EPCOMM_HD size_t flags_begin() const { return signals; }
  EPCOMM_HD size_t flags_end() const { return meta_out; }
  EPCOMM_HD int signal_id(int b, int kind, int peer) const { return (b * kLLNetKinds + kind) * num_ranks + peer; }
  EPCOMM_HD size_t shadow(int b, int kind, int peer) const {
    return shadows + sizeof(uint64_t) * signal_id(b, kind, peer);
  }
  EPCOMM_HD size_t out_entry(int b, int dest) const {
    return meta_out + (static_cast<size_t>(b) * num_ranks + dest) * entry_bytes;
  }
  EPCOMM_HD size_t in_entry(int b, int src) const {
    return meta_in + (static_cast<size_t>(b) * num_ranks + src) * entry_bytes;
  }
  EPCOMM_HD size_t header_in_entry(int le, int slot) const {
    return counts_bytes + (static_cast<size_t>(le) * tpad + slot) * sizeof(uint32_t);
  }
  EPCOMM_HD size_t token(int b, int t) const { return tokens + (static_cast<size_t>(b) * max_tokens + t) * msg_bytes; }
};

// EPCOMM_LL_NET (core/env.cpp), read once per process; host only. BufferOptions::low_latency_net
// overrides it per buffer.
bool low_latency_net_requested();

}  // namespace epcomm
