// Low-latency (LL) mode, docs/contract.md §3.3: where things live in the LL region, the device-side call
// counters, and the arguments of the two kernels. Plain data shared by host (core/
// buffer_low_latency.cpp) and device code (kernels/low_latency/*.cu).
//
// The algorithm in one paragraph. The LL region holds two buffers; each dispatch takes the next one
// (the handle records which) and its combine uses the same one. Dispatch: every block counts, from
// topk_idx, how many rows each expert gets from this rank, tells the experts it owns their count
// (one flag per (expert, source), `tag(seq, count + 1)`), then casts its own tokens (FP8 once per
// token, in shared memory) and stores one message per (token, k) into the owner's slot
// [local expert][source][slot], slot = rank of (token, k) among this rank's rows for that expert, so
// the order is deterministic (ascending token, then k). Each message carries its own flag (its
// header, `tag(seq, (t | k << 16) + 1)`), released after the message's stores, so receivers copy a
// message out as soon as it lands, while others are still in flight. Receivers learn the counts
// first, so each (expert, source) knows where its rows start in the packed output before any
// message arrives. Combine pushes each packed row back to its origin's slot [t][k] (t and k from
// the dispatch header the expert rank still holds), with a per-row flag; the origin sums a token as
// soon as its rows are there. When an expert rank has pushed everything it tells every origin
// (`done`), and an origin's combine ends only after all ranks said so: after that no rank reads its
// buffer any more, so the next dispatch into it is safe even when a CUDA graph reuses one buffer.
// Flags carry the call's sequence number (device counters, fresh at every graph replay) and are
// never reset.
//
// EPCOMM_LL_PER_RANK >= 1 switches to the per-rank variants (dispatch.cu, combine.cu): a token goes
// once to each destination rank (staged, then fanned out by the receiver into the same rows), and
// with 2, 3 or 4 (the default) the expert rank returns one pre-weighted partial per (token, rank).
// Same layout.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "kernels/common/common_params.hpp"
#include "kernels/common/control.hpp"

namespace epcomm {

constexpr int kLowLatencyMaxTokens = 4096;   // Tmax limit (token index fits 16 bits of a header)
constexpr int kLowLatencyThreads = 512;      // threads per block of both LL kernels
constexpr int kLowLatencyScaleGroup = 128;   // channels per FP8 scale
constexpr int kLowLatencySend = 1;           // kernel phases
constexpr int kLowLatencyRecv = 2;

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
  int kslots = 0;      // combine rows per token = min(kMaxTopk, E): topk may not exceed it
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

  // Per-rank dispatch (EPCOMM_LL_PER_RANK=1, see dispatch.cu): a source stores each token once per
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

  // Per-rank combine (EPCOMM_LL_PER_RANK=2..4, see combine.cu): the expert rank sums, per (token,
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

// The low-latency paths' level: BufferOptions::low_latency_per_rank per buffer, whose default (-1)
// is EPCOMM_LL_PER_RANK (core/env.cpp; read once per process, on the host; default 4). 0 keeps the
// per-expert dispatch, 1 asks for the per-rank dispatch (same outputs bit for bit), 2 also for the
// per-rank combine with BF16 partials, 3 with fine partials, 4 with float32 partials (none is
// bit-identical to the per-expert sum; combine.cu gives their error bounds). A call uses them only
// where the layout and shared memory allow.
int low_latency_per_rank_level();  // the environment's level
constexpr int kLowLatencyPerRankMaxLevel = 4;
// The level a buffer uses: its option (0..4) where set, else the environment's (`from_env`).
inline int low_latency_per_rank_choice(int option, int from_env) { return option >= 0 ? option : from_env; }

// What the expert rank returns to an origin in the combine of a per-rank dispatch.
enum class LowLatencyPartials : int {
  kNone = 0,  // per-expert rows (bit-exact)
  kBf16 = 1,  // one BF16 partial per (token, destination rank)
  kFine = 2,  // per (token, destination rank): the BF16 row itself when one expert of the rank was
              // selected, else the float32 partial rounded to 16 significant bits (24-bit float)
  kF32 = 3,   // the same with the float32 partial as it is (only float32 reordering)
};
// Bytes per element of a partial's row (the single-expert rows are BF16 in every kind).
EPCOMM_HD constexpr int partial_bytes(LowLatencyPartials k) {
  return k == LowLatencyPartials::kF32 ? 4 : k == LowLatencyPartials::kFine ? 3 : 2;
}
// A fine partial's rounding: float32 bits rounded to nearest at 16 significant bits (ties away
// from zero; a carry moves into the exponent, so it stays nearest), low 8 bits zero. Inf stays Inf
// (and a finite value within half a unit of the largest rounds to it); NaN becomes the canonical
// NaN, whose payload could sit in the dropped bits.
EPCOMM_HD inline uint32_t fine_round_bits(uint32_t bits) {
  if ((bits & 0x7f800000u) != 0x7f800000u) return (bits + 0x80u) & 0xffffff00u;
  return (bits & 0x007fffffu) != 0u ? 0x7fc00000u : bits;
}

// One lane's part of handing out a token's slots by lanes (dispatch.cu assign_slots_by_lane):
// lane k holds the token's k-th id; from the warp's masks (lanes with the same destination rank,
// with the same expert, the first lane of each destination, the entries that have room) it gets
// what lane 0's walk over k would give it. Host and device (tests/cpu checks it against the walk).
struct LaneSlot {
  int place;            // the destination's place among the token's destinations (first occurrence)
  int earlier_same;     // earlier lanes with the same expert (its slot is the expert's count + this)
  bool last_of_expert;  // the expert's last lane (it advances the expert's count)
};
EPCOMM_HD inline int popc32(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __popc(x);
#else
  return __builtin_popcount(x);
#endif
}
EPCOMM_HD inline LaneSlot lane_slot(int lane, uint32_t same_dest, uint32_t same_expert, uint32_t leaders) {
  const uint32_t leader_lane_bit = same_dest & (~same_dest + 1u);  // lowest lane of the destination
  LaneSlot s;
  s.place = popc32(leaders & (leader_lane_bit - 1u));
  s.earlier_same = popc32(same_expert & ((1u << lane) - 1u));
  s.last_of_expert = (same_expert >> lane) == 1u;
  return s;
}
// The entry's place among its destination's kept entries (k order); `kept`: lanes whose entry has room.
EPCOMM_HD inline int lane_entry_position(int lane, uint32_t same_dest, uint32_t kept) {
  return popc32(kept & same_dest & ((1u << lane) - 1u));
}

inline LowLatencyPartials low_latency_partials(const LowLatencyLayout& l, int level) {
  if (level < 2 || !l.per_rank_combine_fits()) return LowLatencyPartials::kNone;
  if (level == 2) return LowLatencyPartials::kBf16;
  const LowLatencyPartials k = level == 3 ? LowLatencyPartials::kFine : LowLatencyPartials::kF32;
  return l.pr_wide_fits(partial_bytes(k)) ? k : LowLatencyPartials::kNone;
}

// The per-rank dispatch where it is asked for and the layout allows it (entries carry the local
// expert in 16 bits); the library also needs its shared memory to fit (every test and bench shape
// does), and the combine of such a dispatch returns low_latency_partials(l, level).
inline bool low_latency_per_rank_wanted(const LowLatencyLayout& l, bool use_fp8, int level) {
  return level >= 1 && l.per_rank_fits(use_fp8) && l.local_experts <= 0xffff;
}

// What the tests and the bench check a per-rank combine against, relative to sum_k |w_k y_k|: each
// kind's bound (combine.cu) with slack, and the kind's name in their messages.
inline float low_latency_partials_tolerance(LowLatencyPartials k) {
  return k == LowLatencyPartials::kF32 ? 1.0f / 262144.0f : k == LowLatencyPartials::kFine ? 1.0f / 16384.0f : 1.0f / 256.0f;
}
inline const char* low_latency_partials_name(LowLatencyPartials k) {
  return k == LowLatencyPartials::kF32 ? "float32" : k == LowLatencyPartials::kFine ? "fine" : "BF16";
}

// LL across nodes through the network transport (EPCOMM_LL_NET=1 / BufferOptions::low_latency_net,
// with more than one node; see ll_net.cuh for the protocol). Ranks of the same node keep the LSA
// path; ranks of other nodes get puts from the sender's own window and signal adds. The area
// follows the two buffers inside the LL region (offsets from the region's start, like the
// layout's), and is zeroed with them:
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
  EPCOMM_HD int signal_id(int b, int kind, int peer) const { return (b * kLLNetKinds + kind) * num_ranks + peer; }
  EPCOMM_HD size_t shadow(int b, int kind, int peer) const { return shadows + sizeof(uint64_t) * signal_id(b, kind, peer); }
  EPCOMM_HD size_t out_entry(int b, int dest) const { return meta_out + (static_cast<size_t>(b) * num_ranks + dest) * entry_bytes; }
  EPCOMM_HD size_t in_entry(int b, int src) const { return meta_in + (static_cast<size_t>(b) * num_ranks + src) * entry_bytes; }
  EPCOMM_HD size_t header_in_entry(int le, int slot) const {
    return counts_bytes + (static_cast<size_t>(le) * tpad + slot) * sizeof(uint32_t);
  }
  EPCOMM_HD size_t token(int b, int t) const { return tokens + (static_cast<size_t>(b) * max_tokens + t) * msg_bytes; }
};

// EPCOMM_LL_NET (core/env.cpp), read once per process; host only. BufferOptions::low_latency_net
// overrides it per buffer.
bool low_latency_net_requested();

// Counters of this rank's LL calls, in device memory, so a CUDA graph replay gets fresh numbers.
// Every rank makes the same LL calls in the same order, so the numbers agree without exchange.
struct LowLatencyDeviceState {
  uint32_t dispatch_seq;            // last dispatch whose send half finished
  uint32_t combine_seq;
  uint32_t dispatch_blocks_done;    // blocks past the send half of the running dispatch
  uint32_t combine_blocks_done;
  uint32_t buffer_dispatch_seq[2];  // the dispatch that last sent into buffer b (read by its receive)
  uint32_t buffer_combine_seq[2];
  // Network path only (LowLatencyNetLayout), appended: last-block counters of its grid phases
  // ([0] dispatch send, [1] dispatch receive, [2] combine receive) and its traffic counters
  // ([0] puts to ranks of other nodes, [1] their bytes).
  uint32_t net_blocks_done[4];
  unsigned long long net_stats[2];
};

// What Buffer keeps on the host for LL mode (core/buffer_low_latency.cpp).
struct LowLatencyHostState {
  size_t offset = 0;         // of the LL region inside the symmetric allocation (after the data part)
  size_t bytes = 0;          // its size: num_rdma_bytes rounded up to 4096
  int next_buffer = 0;       // the buffer the next dispatch takes
  bool per_rank[2] = {false, false};  // buffer b's dispatch used the per-rank path (its hook receive must too)
  LowLatencyPartials partials[2] = {LowLatencyPartials::kNone, LowLatencyPartials::kNone};  // ... and wrote the
                                                 // per-rank combine's plan (its combine returns these)
  bool net = false;          // network path for ranks of other nodes (LowLatencyNetLayout)
  int per_rank_level = 0;    // low_latency_per_rank_choice(BufferOptions::low_latency_per_rank, env)
  // The src_info of buffer b's latest dispatch: a handle is this buffer's (and still current) only
  // if it holds that tensor, so a handle of another Buffer or of a dispatch since overwritten is
  // refused instead of combining another call's plan. Cleared with the calls.
  const void* issued_src_info[2] = {nullptr, nullptr};
  int issued_tokens[2] = {0, 0};  // ... and its topk_idx's [T, K], which its combine must pass again
  int issued_topk[2] = {0, 0};
  LowLatencyLayout layout;   // fixed by the first call or clean_low_latency_buffer (max_tokens 0 before)
  LowLatencyDeviceState* state = nullptr;  // device memory
  // Shrink mode (kernels/low_latency/shrink.cuh), device memory: the mask [R] int32 (1 = masked;
  // always allocated, so the mask API works without shrink) and the dispatch's count decisions
  // [2][max_local_experts * R] u64 (only with BufferOptions::enable_shrink).
  int32_t* mask = nullptr;
  uint64_t* count_decisions = nullptr;
  size_t count_decision_bytes = 0;
  // EPCOMM_LL_PROBE=1: per-block phase times of the last LL dispatch (kLowLatencyProbeSlots u64 per
  // block, device memory), read by Buffer::low_latency_probe_report. nullptr when off.
  unsigned long long* probe = nullptr;
};

struct LowLatencyDispatchParams {
  CommonParams common;       // peers, rank, wait context (the control layout is not used)
  LowLatencyLayout layout;
  size_t region = 0;         // offset of the LL region inside the symmetric allocation
  LowLatencyDeviceState* state = nullptr;
  int buffer = 0;            // 0 or 1
  int phases = 0;            // kLowLatencySend | kLowLatencyRecv
  int num_tokens = 0;        // T of this rank
  int num_topk = 0;
  int staging_buffers = 2;   // token staging areas in shared memory (2: cast the next while sending)
  bool use_fp8 = true;
  bool round_scale = false;
  bool use_ue8m0 = false;
  bool per_rank = false;     // per-rank path (staging slots, fan-out on the receiver), see dispatch.cu
  bool per_rank_combine = false;  // (per_rank only) write the per-rank combine's plan instead of headers
  // inputs (send half)
  const uint16_t* x = nullptr;         // [T, hidden] bf16
  const int64_t* topk_idx = nullptr;   // [T, K]
  // outputs (receive half)
  uint8_t* recv_x = nullptr;           // [E/R, R*Tmax, hidden] fp8 or bf16
  float* recv_scales = nullptr;        // fp8: [E/R][G][R*Tmax] (transposed)
  int32_t* recv_scales_packed = nullptr;  // ue8m0: [E/R][ceil(G/4)][R*Tmax]
  int32_t* recv_count = nullptr;       // [E/R]
  int32_t* src_info = nullptr;         // [E/R, R*Tmax]
  int64_t* layout_range = nullptr;     // [E/R, R]
  int32_t* cumulative_recv_stats = nullptr;  // [E/R], optional
  int64_t* wait_cost_stats = nullptr;        // [R], optional: clock cycles spent waiting per source
  // shrink mode (nullptr when off): see kernels/low_latency/shrink.cuh
  int32_t* mask = nullptr;                   // [R]: 1 = masked peer (skipped; a timed-out wait sets it)
  uint64_t* count_decisions = nullptr;       // [2][E]: each count settled once per call
  unsigned long long* probe = nullptr;       // diagnostics (EPCOMM_LL_PROBE): see LowLatencyHostState
};

// Probe marks of the LL dispatch kernel: global-timer ns in slot m, SM clock in slot 8 + m.
enum LowLatencyProbeMark : int {
  kProbeEntry = 0,      // kernel entry
  kProbeHistogram = 1,  // send: the topk histogram is built
  kProbeCounts = 2,     // send: counts released
  kProbeTokens = 3,     // send: every message stored and released
  kProbePublished = 4,  // send: publish_dispatch done
  kProbeRecvEntry = 5,  // receive half starts
  kProbeRecvDone = 6,   // receive half done
  kProbeRecvCounts = 7, // per-rank receive: every count read, the begins computed (between 5 and 6)
};
// Past the marks (per-rank receive, per block): the longest flag wait of one of its warps' items
// (ns), the longest copy after the flag (ns), the items its warps took, and the last item that took
// over 2 us after its flag (item | part << 16 | rows << 24, then ns to its rows, data, scales).
constexpr int kProbeItemWait = 16, kProbeItemWork = 17, kProbeItems = 18, kProbeSlowItem = 19;
// Per-rank send, global-timer ns stamped by thread 0: the first token cast, the barrier after it,
// the barrier after pass 1 of the histogram, the first token's slots handed out (its copy starts).
constexpr int kProbeSendCast = 24, kProbeSendBarrier1 = 25, kProbeSendPass1 = 26, kProbeSendSlots = 27;
constexpr int kLowLatencyProbeSlots = 32;

struct LowLatencyCombineParams {
  CommonParams common;
  LowLatencyLayout layout;
  size_t region = 0;
  LowLatencyDeviceState* state = nullptr;
  int buffer = 0;
  int phases = 0;
  int num_tokens = 0;        // T of this rank (origin side)
  int num_topk = 0;
  // expert side
  const uint16_t* y = nullptr;            // [E/R, R*Tmax, hidden] bf16 (user tensor or the zero-copy area)
  const int64_t* layout_range = nullptr;  // [E/R, R] from the dispatch handle
  LowLatencyPartials partials = LowLatencyPartials::kNone;  // kNone: per-expert rows; else the per-rank
                                                             // combine (the dispatch wrote its plan), see combine.cu
  // origin side
  const int64_t* topk_idx = nullptr;      // [T, K]
  const float* topk_weights = nullptr;    // [T, K]
  uint16_t* out = nullptr;                // [T, hidden] bf16
  int64_t* wait_cost_stats = nullptr;     // [R], optional
  int32_t* mask = nullptr;                // shrink mode: [R] masked peers (nullptr when off)
};

// Host-side launchers (kernels/low_latency/*.cu). Grids of at most one block per SM: without a
// hook a block waits for rows its sibling blocks send to this rank, so all of them must be resident
// together (plain launches: several ranks' kernels share one GPU in the tests, each with a
// share of the SMs).
int low_latency_dispatch_shared_bytes(const LowLatencyLayout& layout, int num_blocks, int staging_buffers,
                                      bool per_rank = false);
// Shared memory of the per-rank path's receive half (0 for the per-expert path, whose receive uses none).
int low_latency_dispatch_recv_shared_bytes(const LowLatencyLayout& layout, bool per_rank);
// Dynamic shared memory of one dispatch launch with these phases (kLowLatencySend | kLowLatencyRecv).
int low_latency_dispatch_launch_shared_bytes(const LowLatencyLayout& layout, int num_blocks, int staging_buffers,
                                             bool per_rank, int phases);
void launch_low_latency_dispatch(const LowLatencyDispatchParams& p, int num_blocks, int smem_bytes, void* stream);
void launch_low_latency_combine(const LowLatencyCombineParams& p, int num_blocks, void* stream);
// Network path (LowLatencyNetLayout): the same kernels with sends to ranks of other nodes through
// the emulated network transport (kernels/low_latency/ll_net.cuh). `net` holds each rank's LL
// region (window), the signal array offset and the statistics; ranks_per_node picks the path.
struct EmulatedNetParams;
struct LowLatencyNetArgs {
  LowLatencyNetLayout layout;
  int ranks_per_node = 1;
  bool y_in_window = false;  // combine: y is the zero-copy area (already in this rank's window)
};
void launch_low_latency_dispatch_net(const LowLatencyDispatchParams& p, const LowLatencyNetArgs& a,
                                     const EmulatedNetParams& net, int num_blocks, int smem_bytes, void* stream);
void launch_low_latency_combine_net(const LowLatencyCombineParams& p, const LowLatencyNetArgs& a,
                                    const EmulatedNetParams& net, int num_blocks, void* stream);
// The same kernels over NCCL GIN (ll_net_gin.cuh), for ranks of real nodes: `g` reaches every rank
// (p.common.peer_base then holds only this node's ranks, the others nullptr).
struct GinNetParams;
void launch_low_latency_dispatch_gin(const LowLatencyDispatchParams& p, const LowLatencyNetArgs& a,
                                     const GinNetParams& g, int num_blocks, int smem_bytes, void* stream);
void launch_low_latency_combine_gin(const LowLatencyCombineParams& p, const LowLatencyNetArgs& a,
                                    const GinNetParams& g, int num_blocks, void* stream);
// Static shared memory the network path's kernels add to the dynamic amount.
constexpr int kLowLatencyNetStaticSmem = 1024;
// clean_low_latency_buffer as work on the caller's stream (kernels/low_latency/clean.cu), no host
// wait and capturable: barrier(1), zero this rank's LL region and counters, barrier(2). Barrier n
// of the c-th clean: each rank stores tag(c, n) into its slot of every rank's clean flags, then
// waits until every slot of its own holds at least that. After barrier 1 no rank has LL work left
// that could write into a region (each came to it after its earlier LL calls on that stream);
// after barrier 2 every region is zeroed, so the next LL call may write. `c` is a device counter
// (DeviceCounters::ll_cleans), the same on every rank, and barrier 2 advances it. Every rank takes
// part, masked ones included (clean.cu says why).
constexpr size_t kLowLatencyCleanFlagBytes = sizeof(uint64_t) * kMaxNvlRanks;  // u64 [R] in the control part
struct LowLatencyCleanParams {
  CommonParams common;           // peers, rank, wait context; ctl.ll_region holds the flags
  uint32_t* clean_count = nullptr;  // device: cleans finished
  int barrier = 1;               // 1: before zeroing, 2: after (and count this clean)
  int32_t* mask = nullptr;       // shrink mode: a peer that never arrives is masked (nullptr: a record)
};
void launch_low_latency_clean_barrier(const LowLatencyCleanParams& p, void* stream);

// Shrink mode's mask API (kernels/low_latency/mask.cu): sets mask[rank] = value, or every entry
// when rank < 0, on `stream`.
void launch_low_latency_set_mask(int32_t* mask, int num_ranks, int rank, int value, void* stream);

}  // namespace epcomm
