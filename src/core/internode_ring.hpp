// Normal mode across nodes with bounded memory: the ring of chunks of docs/design-scale.md §4, its
// sizes. Host only; nothing uses it yet but the CPU model of its protocol
// (tests/cpu/test_internode_ring.cpp), which checks the design before the kernels are written.
//
// Per channel (a pair of blocks) and remote node, the sender keeps a staging ring and the
// forwarder a receive ring of `depth` token slots each; a slot holds one dispatch row (data, the
// source's meta, top-k ids and weights, scales) or one combine partial (float32 row and weights).
#pragma once

#include <algorithm>
#include <cstddef>

#include "kernels/common/control.hpp"

namespace epcomm::ring {

struct InternodeRingGeometry {
  int channels = 0;  // num_sms / 2
  int peers = 0;     // remote nodes: N - 1
  int chunk = 0;     // S: tokens a sender moves at a time
  int depth = 0;     // slots per ring
  size_t slot_bytes = 0;
  size_t control_bytes = 0;  // head and tail per ring and direction, 16 bytes each
  size_t total_bytes = 0;    // num_rdma_bytes this needs (0 with one node)

  // budget_tokens: B, the slots one channel's rings share before every peer gets its floor of two
  // chunks (DeepEP's num_max_rdma_chunked_recv_tokens plays this part).
  static InternodeRingGeometry make(int num_sms, int num_nodes, int hidden, int elem_bytes, int num_topk,
                                    int num_scales, int chunk = 8, int budget_tokens = 512) {
    InternodeRingGeometry g;
    g.channels = std::max(num_sms / 2, 1);
    g.peers = std::max(num_nodes - 1, 0);
    g.chunk = chunk;
    if (g.peers == 0) return g;
    g.depth = std::max(budget_tokens / g.peers / chunk * chunk, 2 * chunk);
    // Dispatch row: data, the source's meta (token index, local destination mask), ids and weights, scales.
    const size_t drow = align_up(static_cast<size_t>(hidden) * elem_bytes + 8 + 8 * static_cast<size_t>(num_topk) +
                                     4 * static_cast<size_t>(num_scales),
                                 16);
    // Combine partial: a float32 row and the weights.
    const size_t prow = align_up(4 * static_cast<size_t>(hidden) + 4 * static_cast<size_t>(num_topk), 16);
    g.slot_bytes = std::max(drow, prow);
    g.control_bytes = static_cast<size_t>(g.channels) * g.peers * 4 * 16;
    g.total_bytes = 2 * static_cast<size_t>(g.channels) * g.peers * g.depth * g.slot_bytes + g.control_bytes;
    return g;
  }
};

}  // namespace epcomm::ring
