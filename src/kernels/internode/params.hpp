// Normal mode across nodes (docs/contract.md §3.2, hierarchical): where things live in the internode region
// and the arguments of its three kernels. Plain data shared by host (core/buffer_internode.cpp) and
// device code (kernels/internode/*.cu). The design note is at the top of dispatch.cu.
//
// Rank r is (node r / P, local index r % P). Tm = max_tokens_per_rank + 32 rounded up to 32. Offsets are
// relative to the internode region of each rank (same on every rank).
//
//   control (fixed at construction)
//     signals  u64 [kNumSignals][R]   network signals, [kind][peer]; peers add into them
//     shadows  u64 [kNumSignals][R]   local: running totals this rank has waited for
//     flags    u64 [kNumFlags][max(N, P)]   node flags, set by node peers through LSA
//     counters u32 [kNumCounters]     local: last-block counters of the grid phases
//     stats    u64 [kNumStats]        local: network puts and bytes (tests, benchmarks)
//     meta_in  [2 parities][R sources] meta entries (counts, expert counts, chunk masks)
//     meta_out [R destinations]       staging of this rank's meta entries (put sources)
//   dispatch half (first half of the rest)
//     masks      u32 [N source nodes][Tm]  bit d: token goes to local rank d of *this* node;
//                                          [own node] is this rank's staging for its own node
//     send_masks u32 [N dest nodes][Tm]    staging: the masks for each destination node
//     rows       [N source nodes][Wd] drow  row + scales + topk idx + weights; [own node] = staging
//   combine half
//     in   [N origin nodes][P expert ranks][Wc] crow: tag u64 (pad 16), bf16 row, K f32 weights
//     out  [N origin nodes][Wc] prow: staging of node partial sums (f32 row, K f32)
//     net  [N source nodes][Wc] prow: node partial sums received (own node's written locally)
//   Wd, Wc: the windows (tokens per node at a time) that fill each half at the call's row sizes;
//   a call with more tokens runs in rounds of a window each (inter_window).
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/common/common_params.hpp"
#include "kernels/common/control.hpp"
#include "transport/net_params.hpp"

namespace epcomm {

enum InterSignal : int {
  kSigMeta = 0,
  kSigDispatchData,
  kSigDispatchFree,
  kSigCombineData,
  kSigCombineFree,
  kNumSignals
};
enum InterFlag : int {
  kFlagForwardReady = 0,  // [source node]: this rank (forwarder) holds that node's dispatch rows
  kFlagDispatchRead,      // [local rank]: that node peer finished reading this rank's dispatch rows
  kFlagCombinePushed,     // [local rank]: that node peer finished pushing into this rank's combine input
  kFlagCombineRead,       // [local rank]: that node peer finished reading the combine input it got
  kFlagOwnPartial,        // [0]: this rank's own-node partial sums are written (local)
  kNumFlags
};
enum InterCounter : int {
  kCountSendDone = 0,
  kCountRecvDone,
  kCountPushDone,
  kCountReduceDone,
  kCountFinalDone,
  kCountRowsReceived,
  kNumCounters = 8
};
enum InterStat : int { kStatPuts = 0, kStatPutBytes, kStatNvlBytes, kStatRowsSent, kNumStats = 8 };

struct InterLayout {
  int num_ranks = 0, ranks_per_node = 0, num_nodes = 0;
  int max_tokens = 0;  // Tm (multiple of 32)
  int max_chunks = 0;  // per source in the meta masks
  int max_local_experts = 0;
  size_t signals = 0, shadows = 0, flags = 0, counters = 0, stats = 0;
  size_t meta_in = 0, meta_out = 0;
  MetaEntryLayout meta_entry{};  // offsets inside one meta entry (as inside a node)
  size_t control_bytes = 0;
  size_t half_bytes = 0;  // of each data half
  int flag_stride = 0;

  static InterLayout make(int R, int P, int max_tokens, int max_chunks, int max_local_experts, size_t region_bytes) {
    InterLayout l;
    l.num_ranks = R;
    l.ranks_per_node = P;
    l.num_nodes = R / P;
    // One chunk of slack: the last chunk's masks are padded to a whole chunk.
    l.max_tokens = static_cast<int>(align_up(static_cast<size_t>(max_tokens) + 32, 32));
    l.max_chunks = max_chunks;
    l.max_local_experts = max_local_experts;
    l.flag_stride = l.num_nodes > P ? l.num_nodes : P;
    size_t off = 0;
    l.signals = off;
    off = align_up(off + sizeof(uint64_t) * kNumSignals * R, 128);
    l.shadows = off;
    off = align_up(off + sizeof(uint64_t) * kNumSignals * R, 128);
    l.flags = off;
    off = align_up(off + sizeof(uint64_t) * kNumFlags * l.flag_stride, 128);
    l.counters = off;
    off = align_up(off + sizeof(uint32_t) * kNumCounters, 128);
    l.stats = off;
    off = align_up(off + sizeof(uint64_t) * kNumStats, 128);
    // The meta entry of the intranode exchange (counts start after the whole NotifyHeader).
    l.meta_entry = meta_entry_layout(R, max_local_experts, max_chunks);
    l.meta_in = off;
    off += 2 * static_cast<size_t>(R) * l.meta_entry.stride;
    l.meta_out = off;
    off += static_cast<size_t>(R) * l.meta_entry.stride;
    l.control_bytes = align_up(off, 4096);
    l.half_bytes = region_bytes > l.control_bytes ? (region_bytes - l.control_bytes) / 2 / 4096 * 4096 : 0;
    return l;
  }

  EPCOMM_HD size_t signal(int kind, int peer) const {
    return signals + (static_cast<size_t>(kind) * num_ranks + peer) * 8;
  }
  EPCOMM_HD int signal_id(int kind, int peer) const { return kind * num_ranks + peer; }
  EPCOMM_HD size_t shadow(int kind, int peer) const {
    return shadows + (static_cast<size_t>(kind) * num_ranks + peer) * 8;
  }
  EPCOMM_HD size_t flag(int kind, int index) const {
    return flags + (static_cast<size_t>(kind) * flag_stride + index) * 8;
  }
  EPCOMM_HD size_t meta(int parity, int source) const {
    return meta_in + (static_cast<size_t>(parity) * num_ranks + source) * meta_entry.stride;
  }
  EPCOMM_HD size_t meta_staging(int dest) const { return meta_out + static_cast<size_t>(dest) * meta_entry.stride; }
  EPCOMM_HD size_t dispatch_base() const { return control_bytes; }
  EPCOMM_HD size_t combine_base() const { return control_bytes + half_bytes; }
};

// The tokens per source node the rows of a half hold at a time (a window): a call whose tokens
// do not fit runs in rounds of one window each (buffer_internode.cpp), so num_rdma_bytes bounds the
// memory whatever the number of nodes and tokens, and fewer bytes only mean more rounds. Windows
// are multiples of `step` (the call's chunk, and 4 so that the mask slices put per round stay
// 16-byte aligned) and at most the layout's token bound; 0 when not one step fits.
EPCOMM_HD inline int inter_window(size_t avail, size_t per_token, int step, int max_tokens) {
  if (per_token == 0 || step <= 0) return 0;
  const size_t fit = avail / per_token;
  const size_t cap = (static_cast<size_t>(max_tokens) + step - 1) / step * step;
  const size_t w = (fit < cap ? fit : cap) / step * step;
  return static_cast<int>(w);
}
EPCOMM_HD inline int inter_window_step(int chunk) {
  int a = chunk > 0 ? chunk : 1, b = 4;  // lcm(chunk, 4)
  while (b) {
    const int t = a % b;
    a = b;
    b = t;
  }
  return (chunk > 0 ? chunk : 1) / a * 4;
}

// Sizes of one dispatch's rows and where its arrays sit in the dispatch half: the masks of every
// token (small: 4 bytes per token and node), the rows of one window.
struct InterDispatchGeometry {
  size_t row_bytes = 0;                        // x row
  size_t drow = 0;                             // row + scales + topk idx + weights, 16-aligned
  size_t mask_bytes = 0;                       // of each mask array
  size_t masks = 0, send_masks = 0, rows = 0;  // offsets in the region
  int window = 0;                              // tokens per source node the rows hold (row stride)

  // step: inter_window_step(chunk); the window fills the half (0 when the layout has no half: sizes only).
  static InterDispatchGeometry make(const InterLayout& l, int row_bytes, int num_scales, int num_topk, int step = 4) {
    InterDispatchGeometry g;
    g.row_bytes = static_cast<size_t>(row_bytes);
    g.drow = align_up(g.row_bytes + sizeof(uint32_t) * (num_scales + 2 * num_topk), 16);
    g.mask_bytes = align_up(sizeof(uint32_t) * l.num_nodes * l.max_tokens, 128);
    g.masks = l.dispatch_base();
    g.send_masks = g.masks + g.mask_bytes;
    g.rows = g.send_masks + g.mask_bytes;
    const size_t fixed = 2 * g.mask_bytes;
    g.window = l.half_bytes > fixed
                   ? inter_window(l.half_bytes - fixed, static_cast<size_t>(l.num_nodes) * g.drow, step, l.max_tokens)
                   : 0;
    return g;
  }
  // Bytes of the half a window of `tokens` needs.
  size_t bytes_for(const InterLayout& l, int tokens) const {
    return 2 * mask_bytes + static_cast<size_t>(l.num_nodes) * tokens * drow;
  }
  EPCOMM_HD size_t mask(const InterLayout& l, int node, int t) const {
    return masks + (static_cast<size_t>(node) * l.max_tokens + t) * 4;
  }
  EPCOMM_HD size_t send_mask(const InterLayout& l, int node, int t) const {
    return send_masks + (static_cast<size_t>(node) * l.max_tokens + t) * 4;
  }
  // t: token index inside the window.
  EPCOMM_HD size_t row(const InterLayout& /*l*/, int node, int t) const {
    return rows + (static_cast<size_t>(node) * window + t) * drow;
  }
};

struct InterCombineGeometry {
  size_t crow = 0;  // tag (16) + bf16 row + K f32, 16-aligned
  size_t prow = 0;  // partial row (f32, or bf16 with bf16_partials) + K f32, 16-aligned
  size_t in = 0, out = 0, net = 0;
  int window = 0;              // tokens per origin node the arrays hold (row stride)
  bool bf16_partials = false;  // a node's partial sum of a token travels as BF16 (BufferOptions)
  // The rows node peers push (`in`) lie in the part of the region num_nvl_bytes gives (unused
  // otherwise by normal mode across nodes; offsets from the region's start, reached through
  // CommonParams::peer_base), so the combine half holds only the partials, where that holds more
  // tokens per round; false: the combine half holds them too (as it does with
  // BufferOptions::internode_combine_nvl off).
  bool in_nvl = false;

  // nvl_offset, nvl_bytes: that part (bytes 0: none).
  static InterCombineGeometry make(const InterLayout& l, int hidden, int num_topk, int step = 4,
                                   bool bf16_partials = false, size_t nvl_offset = 0, size_t nvl_bytes = 0) {
    InterCombineGeometry g;
    g.bf16_partials = bf16_partials;
    g.crow = 16 + align_up(static_cast<size_t>(hidden) * 2 + sizeof(float) * num_topk, 16);
    g.prow = align_up(g.partial_weights(hidden) + sizeof(float) * num_topk, 16);
    // Everything in the combine half, or the pushed rows in the part: whichever holds more tokens.
    const size_t partials = static_cast<size_t>(l.num_nodes) * 2 * g.prow;  // per token
    const int in_half = inter_window(l.half_bytes, g.in_bytes_for(l, 1) + partials, step, l.max_tokens);
    const int half_partials = inter_window(l.half_bytes, partials, step, l.max_tokens);
    const int in_part = inter_window(nvl_bytes, g.in_bytes_for(l, 1), step, l.max_tokens);
    const int split = half_partials < in_part ? half_partials : in_part;
    g.in_nvl = split > in_half;
    g.window = g.in_nvl ? split : in_half;
    const size_t w = static_cast<size_t>(g.window);
    g.in = g.in_nvl ? nvl_offset : l.combine_base();
    g.out = g.in_nvl ? l.combine_base() : g.in + g.in_bytes_for(l, g.window);
    g.net = g.out + static_cast<size_t>(l.num_nodes) * w * g.prow;
    return g;
  }
  // Bytes of the combine half a window of `tokens` needs.
  size_t bytes_for(const InterLayout& l, int tokens) const {
    return (in_nvl ? 0 : in_bytes_for(l, tokens)) + static_cast<size_t>(l.num_nodes) * tokens * 2 * prow;
  }
  // Bytes of the pushed rows of a window of `tokens`.
  EPCOMM_HD size_t in_bytes_for(const InterLayout& l, int tokens) const {
    return static_cast<size_t>(l.num_nodes) * l.ranks_per_node * tokens * crow;
  }
  // t: token index inside the window. in_row: from the base in_nvl says (the region's start, or the
  // internode region's like out_row and net_row).
  EPCOMM_HD size_t in_row(const InterLayout& l, int node, int expert_local, int t) const {
    return in + ((static_cast<size_t>(node) * l.ranks_per_node + expert_local) * window + t) * crow;
  }
  EPCOMM_HD size_t out_row(const InterLayout& /*l*/, int node, int t) const {
    return out + (static_cast<size_t>(node) * window + t) * prow;
  }
  EPCOMM_HD size_t net_row(const InterLayout& /*l*/, int node, int t) const {
    return net + (static_cast<size_t>(node) * window + t) * prow;
  }
  // Where a partial row's K weights start (after its hidden values).
  EPCOMM_HD size_t partial_weights(int hidden) const { return static_cast<size_t>(hidden) * (bf16_partials ? 2 : 4); }
};

// What every internode kernel carries.
struct InterCommon {
  CommonParams common;  // rank, wait context, call sequence (peer_base unused)
  InterLayout layout;
  EmulatedNetParams net;  // window[r]: internode region of rank r (LSA pointer where reachable)
  int num_blocks = 0;
};

struct InterNotifyParams {
  InterCommon ic;
  int num_tokens = 0, num_experts = 0, chunk = 0, expert_alignment = 1;
  int worst_tokens = 0;                          // 1: the dispatch passed num_worst_tokens (NotifyHeader::worst_tokens)
  int row_bytes = 0, rows_words = 0;             // NotifyHeader's
  const uint8_t* is_token_in_rank = nullptr;     // [T, R]
  const int32_t* num_tokens_per_rank = nullptr;  // [R]
  const int32_t* num_tokens_per_expert = nullptr;  // [E]
  uint32_t* parity_counter = nullptr;
  int32_t* rank_prefix_matrix = nullptr;  // [R, R]
  int32_t* chunk_offset = nullptr;        // [R, stride]
  int chunk_offset_stride = 0;
  int32_t* num_recv_tokens_per_expert = nullptr;
  int32_t* invalid_topk = nullptr;
  int32_t* host_result = nullptr;
  int32_t host_token = 0;
};

struct InterDispatchParams {
  InterCommon ic;
  InterDispatchGeometry geo;
  int chunk = 0, max_chunks = 0, num_tokens = 0, row_bytes = 0, num_scales = 0, num_topk = 0;
  // This round's tokens [window_begin, window_end) of every source (multiples of the chunk); the
  // last round also checks the row count and pads num_worst_tokens.
  int window_begin = 0, window_end = 0;
  bool last_round = true;
  int experts_per_rank = 0;
  bool cached = false;
  const uint8_t* x = nullptr;
  const uint32_t* x_scales = nullptr;  // [T, num_scales] 4-byte words (float32 or int32), any strides
  int64_t scale_stride_token = 0, scale_stride_group = 0;
  const int64_t* topk_idx = nullptr;
  const float* topk_weights = nullptr;
  const uint8_t* is_token_in_rank = nullptr;  // [T, R]
  const int32_t* chunk_offset = nullptr;      // [R, stride]
  int chunk_offset_stride = 0;
  uint8_t* recv_x = nullptr;
  uint32_t* recv_scales = nullptr;  // [rows, num_scales] words, row-major
  int64_t* recv_topk_idx = nullptr;
  float* recv_topk_weights = nullptr;
  int32_t* recv_src_idx = nullptr;
  int num_worst_tokens = 0;
  int num_rows = 0;
};

struct InterCombineParams {
  InterCommon ic;
  InterCombineGeometry geo;
  int chunk = 0, max_chunks = 0, num_tokens = 0, hidden = 0, num_topk = 0;
  int window_begin = 0, window_end = 0;  // this round's tokens of every origin
  const uint16_t* x = nullptr;           // [num_recv, hidden]
  const float* topk_weights = nullptr;   // [num_recv, K]
  const int32_t* rank_prefix_matrix = nullptr;
  const int32_t* recv_src_idx = nullptr;
  int num_rows = 0;
  const uint8_t* is_token_in_rank = nullptr;  // [T, R]
  const uint16_t* bias0 = nullptr;
  const uint16_t* bias1 = nullptr;
  uint16_t* out = nullptr;
  float* out_topk_weights = nullptr;
};

void launch_inter_notify(const InterNotifyParams& p, void* stream);
void launch_inter_dispatch(const InterDispatchParams& p, void* stream);  // send + receive kernels
void launch_inter_combine(const InterCombineParams& p, void* stream);
// The same kernels over NCCL GIN (gin_kernels.cu), for ranks of real nodes: `g` reaches every rank
// (ic.net.window then holds only this node's ranks, the others nullptr).
struct GinNetParams;
void launch_inter_notify_gin(const InterNotifyParams& p, const GinNetParams& g, void* stream);
void launch_inter_dispatch_gin(const InterDispatchParams& p, const GinNetParams& g, void* stream);
void launch_inter_combine_gin(const InterCombineParams& p, const GinNetParams& g, void* stream);

}  // namespace epcomm
