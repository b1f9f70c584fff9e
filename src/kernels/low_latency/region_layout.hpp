// Low-latency mode: where things live in one rank's LL region (two buffers of the same layout),
// as offsets every rank computes alike from (Tmax, hidden, R, E). Plain data shared by host and
// device code; the scheme is in params.hpp.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/common/control.hpp"

namespace epcomm {

constexpr int kLowLatencyMaxTokens = 4096;  // Tmax limit (token index fits 16 bits of a header)
constexpr int kLowLatencyScaleGroup = 128;  // channels per FP8 scale

// One LL buffer (offsets inside it), and the two of them. Everything depends only on (Tmax,
// hidden, R, E), so every rank computes the same layout.
//
//   combine_rows    [Tmax][kslots] rows of 2*hidden bytes   (origin side: expert outputs come here)
//   dispatch_data   [E/R][R][Tmax] messages of 2*hidden bytes: FP8 row + f32 scales (padded to 16
//                   bytes), or the BF16 row. Also the zero-copy combine input [E/R][R*Tmax][hidden]
//   dispatch_header [E/R][R][Tmax] u64 tags: the message's flag and its (token, k)
//   dispatch_count  [E/R][R] u64 tags: rows source r sends to local expert e
//   combine_flags   [Tmax][kslots] u64 tags
//   combine_done    [R] u64 tags: expert rank r has pushed all its rows of this combine
struct LowLatencyLayout {
  int num_ranks = 0;
  int max_tokens = 0;  // Tmax
  int hidden = 0;
  int num_experts = 0;
  int local_experts = 0;
  int kslots = 0;  // combine rows per token = min(kMaxTopk, E): topk may not exceed it
  size_t msg_bytes = 0;
  size_t combine_rows = 0, dispatch_data = 0, dispatch_header = 0, dispatch_count = 0, combine_flags = 0,
         combine_done = 0;
  size_t buffer_bytes = 0;  // one buffer, 16-byte aligned
  size_t total_bytes = 0;   // both buffers: the LL size hint

  static LowLatencyLayout make(int max_tokens, int hidden, int num_ranks, int num_experts) {
    LowLatencyLayout l;
    l.num_ranks = num_ranks;
    l.max_tokens = max_tokens;
    l.hidden = hidden;
    l.num_experts = num_experts;
    l.local_experts = num_experts / num_ranks;
    l.kslots = num_experts < kMaxTopk ? num_experts : kMaxTopk;
    l.msg_bytes = 2 * static_cast<size_t>(hidden);
    const size_t messages = static_cast<size_t>(num_experts) * max_tokens;
    const size_t rows = static_cast<size_t>(max_tokens) * l.kslots;
    size_t off = 0;
    l.combine_rows = off;
    off += rows * l.msg_bytes;
    l.dispatch_data = off;
    off += messages * l.msg_bytes;
    l.dispatch_header = off;
    off += messages * sizeof(uint64_t);
    l.dispatch_count = off;
    off += static_cast<size_t>(num_experts) * sizeof(uint64_t);
    l.combine_flags = off;
    off += rows * sizeof(uint64_t);
    l.combine_done = off;
    off += static_cast<size_t>(num_ranks) * sizeof(uint64_t);
    l.buffer_bytes = align_up(off, 16);
    l.total_bytes = align_up(2 * l.buffer_bytes, 128);
    return l;
  }

  // Per-rank dispatch (EPCOMM_LL_PER_RANK=1, see dispatch_per_rank.cu): a source stores each token once per
  // destination rank into the destination's staging slot [source][slot] = [payload: FP8 row +
  // scales, or the BF16 row][entries: kslots u32, padded to 16 bytes][head u32: t | entries << 16 |
  // d << 21, padded to 16]. The staging slots overlay dispatch_data of the same buffer (free until
  // the receiver fanned them out into recv_x; the zero-copy combine input is written only after
  // that), so the region does not grow: the path is used only where they fit (always for E/R >= 2).
  //
  // The slot's arrival flag is NOT in the slot: dispatch_data also holds the other format's slots
  // (FP8 and BF16 strides differ), the per-expert path's messages and the zero-copy combine input,
  // so whatever word a flag had there may hold row data at the next call into the buffer, which
  // compares >= any tag and passes for an arrived token (the bench's 400-call runs hung in the
  // combine after such reads). The flag is a u32 call number (>= seq: arrived) in the high half of
  // the per-expert header [0][source][slot]: only flags ever land there (the per-expert path's
  // senders store whole headers of earlier calls, with smaller numbers; the per-rank receiver
  // stores only the low half, the (t, k) the per-expert combine reads; the per-rank combine's
  // plan starts after that header row, see pr_base).
  EPCOMM_HD int staged_payload16(bool use_fp8) const {
    const int groups = hidden / kLowLatencyScaleGroup;
    return use_fp8 ? (hidden + ((4 * groups + 15) / 16) * 16) / 16 : hidden / 8;
  }
  EPCOMM_HD int staged_entry16() const { return (kslots + 3) / 4; }
  EPCOMM_HD size_t staged_stride(bool use_fp8) const {
    return static_cast<size_t>(staged_payload16(use_fp8) + staged_entry16() + 1) * 16;
  }
  EPCOMM_HD size_t staged(int b, int src, int slot, bool use_fp8) const {
    return buffer(b) + dispatch_data + (static_cast<size_t>(src) * max_tokens + slot) * staged_stride(use_fp8);
  }
  EPCOMM_HD size_t staged_head_offset(bool use_fp8) const {
    return static_cast<size_t>(staged_payload16(use_fp8) + staged_entry16()) * 16;
  }
  EPCOMM_HD size_t staged_flag(int b, int src, int slot) const { return header(b, 0, src, slot) + 4; }
  bool per_rank_fits(bool use_fp8) const {
    // [R][Tmax] staged messages inside [E/R][R][Tmax] messages of msg_bytes
    return staged_stride(use_fp8) <= static_cast<size_t>(local_experts) * msg_bytes;
  }

  // Per-rank combine (EPCOMM_LL_PER_RANK=2..4, see combine_per_rank.cu): the expert rank sums, per (token,
  // origin), its local experts' rows weighted by the origin's topk_weights and sends one BF16
  // partial row to the origin's combine row [t][d], d = the rank's place among the token's
  // destination ranks (first occurrence in k order), in pr_parts parts with a flag each
  // ([t][d * parts + part]). Its plan lives where the per-expert path's headers are (unused then),
  // after their first row [0][R][Tmax] (pr_base), whose high halves hold the staged tokens' flags:
  //   pr_head    [R][Tmax] u32: t | entries << 16 | d << 21 of the source's staged token j
  //   pr_entries [R][Tmax][kslots] u32: the staged token's entries (le | slot << 16 | k << 28)
  //   pr_weights [R][Tmax * kslots] u64: tag(seq, bits of origin r's topk_weights[t][k]) at
  //              t * kslots + k, each its own flag (one 8-byte store, no release needed)
  //   pr_count   [R] u32: staged tokens of each source
  // Used only where that fits (E/R > kslots, roughly), so the region does not grow.
  EPCOMM_HD int pr_dests() const { return kslots < num_ranks ? kslots : num_ranks; }
  EPCOMM_HD int pr_parts() const {
    const int p = kslots / pr_dests();
    return p < 1 ? 1 : (p > 4 ? 4 : p);
  }
  EPCOMM_HD size_t pr_base() const {  // past the header row [0][R][Tmax] (the staged flags)
    return dispatch_header + static_cast<size_t>(num_ranks) * max_tokens * sizeof(uint64_t);
  }
  EPCOMM_HD size_t pr_head(int b, int src, int j) const {
    return buffer(b) + pr_base() + (static_cast<size_t>(src) * max_tokens + j) * 4;
  }
  EPCOMM_HD size_t pr_entries(int b, int src, int j) const {
    return buffer(b) + pr_base() + static_cast<size_t>(num_ranks) * max_tokens * 4 +
           (static_cast<size_t>(src) * max_tokens + j) * kslots * 4;
  }
  EPCOMM_HD size_t pr_weights(int b, int src) const {  // 8-byte aligned
    return buffer(b) + pr_base() + pr_weights_begin() + static_cast<size_t>(src) * max_tokens * kslots * 8;
  }
  EPCOMM_HD size_t pr_count(int b, int src) const {
    return buffer(b) + pr_base() + pr_weights_begin() + static_cast<size_t>(num_ranks) * max_tokens * kslots * 8 +
           static_cast<size_t>(src) * 4;
  }
  bool per_rank_combine_fits() const {
    return pr_count(0, num_ranks) <= dispatch_header + static_cast<size_t>(num_experts) * max_tokens * 8;
  }
  EPCOMM_HD size_t pr_weights_begin() const {  // past pr_head and pr_entries, 8-byte aligned
    return (static_cast<size_t>(num_ranks) * max_tokens * 4 * (1 + kslots) + 7) / 8 * 8;
  }
  // Wide per-rank rows (fine partials, EPCOMM_LL_PER_RANK=3: 3 bytes per element, [high 16 bits of
  // each float32 partial: 2 * hidden][next 8 bits: hidden]; float32 partials, =4: 4 bytes,
  // [channels 8g..8g+3 of every 8-channel group g: 2 * hidden][channels 8g+4..8g+7: 2 * hidden]):
  // destination d's row of token t is at d * bytes * hidden inside the token's kslots combine rows,
  // which must hold pr_dests() such rows.
  EPCOMM_HD size_t pr_wide_row(int b, int t, int d, int bytes_per_element) const {
    return combine_row(b, t, 0) + static_cast<size_t>(d) * bytes_per_element * static_cast<size_t>(hidden);
  }
  bool pr_wide_fits(int bytes_per_element) const { return bytes_per_element * pr_dests() <= 2 * kslots; }

  bool same_shape(const LowLatencyLayout& o) const {
    return num_ranks == o.num_ranks && max_tokens == o.max_tokens && hidden == o.hidden && num_experts == o.num_experts;
  }

  EPCOMM_HD size_t buffer(int b) const { return static_cast<size_t>(b) * buffer_bytes; }
  // Every word an LL call waits on in buffer b (message headers with the staged tokens' flags and
  // the per-rank plan, counts, combine flags, done) lies in the buffer's tail [flags_begin(b),
  // flags_end(b)); the rows before it (combine rows, messages, staged slots) never hold one. So
  // clean_low_latency_buffer zeroes only the two tails (and, across nodes, the network area's
  // signals and shadows): well under 1% of the region at the standard problem.
  EPCOMM_HD size_t flags_begin(int b) const { return buffer(b) + dispatch_header; }
  EPCOMM_HD size_t flags_end(int b) const { return buffer(b) + buffer_bytes; }
  EPCOMM_HD size_t message_index(int le, int src, int slot) const {
    return (static_cast<size_t>(le) * num_ranks + src) * max_tokens + slot;
  }
  EPCOMM_HD size_t message(int b, int le, int src, int slot) const {
    return buffer(b) + dispatch_data + message_index(le, src, slot) * msg_bytes;
  }
  EPCOMM_HD size_t header(int b, int le, int src, int slot) const {
    return buffer(b) + dispatch_header + message_index(le, src, slot) * sizeof(uint64_t);
  }
  EPCOMM_HD size_t count(int b, int le, int src) const {
    return buffer(b) + dispatch_count + (static_cast<size_t>(le) * num_ranks + src) * sizeof(uint64_t);
  }
  EPCOMM_HD size_t combine_row(int b, int t, int k) const {
    return buffer(b) + combine_rows + (static_cast<size_t>(t) * kslots + k) * msg_bytes;
  }
  EPCOMM_HD size_t combine_flag(int b, int t, int k) const {
    return buffer(b) + combine_flags + (static_cast<size_t>(t) * kslots + k) * sizeof(uint64_t);
  }
  EPCOMM_HD size_t done(int b, int src) const {
    return buffer(b) + combine_done + static_cast<size_t>(src) * sizeof(uint64_t);
  }
};

// DeepEP 1.x's get_low_latency_rdma_size_hint for the same problem, restated from its published
// formula (two send buffers, two receive buffers, two signal areas; messages of BF16 rows or FP8
// rows + scales with a 16-byte header). Only used to show that epcomm's buffer is no larger.
inline size_t deepep_low_latency_size_hint(int max_tokens, int hidden, int num_ranks, int num_experts) {
  (void)num_ranks;
  const size_t T = static_cast<size_t>(max_tokens), E = static_cast<size_t>(num_experts);
  const size_t H = static_cast<size_t>(hidden), scales = H / 128;
  const size_t dispatch_msg = 16 + (2 * H > H + 4 * scales ? 2 * H : H + 4 * scales);
  const size_t combine_msg = 4 * scales + 2 * H;
  const size_t send = T * dispatch_msg > E * T * combine_msg ? T * dispatch_msg : E * T * combine_msg;
  const size_t recv = E * T * dispatch_msg > E * T * combine_msg ? E * T * dispatch_msg : E * T * combine_msg;
  const size_t signal = align_up(E * sizeof(int), 128);
  const size_t total = 2 * (send + recv + signal);
  return (total + 128) / 128 * 128;
}

}  // namespace epcomm
