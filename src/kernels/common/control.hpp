// Where things live inside each rank's symmetric region. The same offsets hold on every rank, so a
// peer's address is peer_base[peer] + offset. Plain data, shared by host and device code.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define EPCOMM_HD __host__ __device__
#else
#define EPCOMM_HD
#endif

namespace epcomm {

constexpr int kMaxNvlRanks = 32;  // ranks per node in normal mode (its masks: u32 over a node's ranks)
// Ranks of a group in normal mode across nodes (a token's destination ranks are one 128-bit mask in
// the internode kernels: internode/common.cuh token_ranks).
constexpr int kMaxInterRanks = 128;
constexpr int kMaxInterNodes = 32;  // ... and its nodes (lane = node in their warp loops)
// Ranks one load/store (NVLink) domain may hold (NVL72): CommonParams::peer_base's entries.
constexpr int kMaxLsaRanks = 72;
// Ranks of a group in low-latency mode (design-scale.md §5: nothing R-sized is left in kernel
// parameters or on the stack; the network path's per-rank counters take 3 x 4 KB of shared memory).
constexpr int kMaxLowLatencyRanks = 1024;
constexpr int kMaxBlocks = 160;      // blocks (SMs) one communication kernel may use
constexpr int kMaxChunkTokens = 32;  // tokens per chunk: one bit each in a 32-bit mask
constexpr int kMaxTopk = 16;
// FP8 scale words (4 bytes each: float32 scales or packed int32) one token carries in normal mode.
constexpr int kMaxScaleWords = 512;
// Call numbers are 32 bits and flags compare them with >=, so a number must never come round again:
// a kernel whose number would pass this one leaves at once with a record (DeviceError::kCallNumbersUsedUp) instead of
// running; Buffer::reset (and, for low-latency calls, clean_low_latency_buffer) starts them again.
constexpr uint32_t kLastCallNumber = 0xffffff00u;
// Numbers 1 .. kLastCallNumber may run (0 is where the counter would come round to).
EPCOMM_HD constexpr bool call_number_usable(uint32_t seq) { return seq - 1u < kLastCallNumber; }

constexpr size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

// Header of the counts and masks one source rank sends to one destination before a dispatch.
struct NotifyHeader {
  int32_t num_tokens;
  int32_t num_experts;
  int32_t chunk_tokens;  // ring geometry: rows per slot, the same on every rank
  int32_t num_blocks;
  int32_t cut_tokens;  // this rank's tokens per chunk (<= chunk_tokens; see balanced_chunk)
  // Across nodes: 1 when this dispatch passed num_worst_tokens (its rounds then cover the token
  // limit instead of the group's largest T), which every rank must do alike; 0 inside a node.
  int32_t worst_tokens;
  // The dispatch's rows, which every rank must pass alike: x's row bytes, and its scale words and
  // top-k packed (rows_words). A peer that differs would read the rings at other offsets.
  int32_t row_bytes;
  int32_t rows_words;  // (num_scales << 8) | num_topk
};
static_assert(sizeof(NotifyHeader) <= 32, "the counts start 32 bytes into a meta entry");

EPCOMM_HD inline int32_t notify_rows_words(int num_scales, int num_topk) { return (num_scales << 8) | num_topk; }
// The word a count exchange reports where ranks disagree on the rows (bit 63 set, unlike
// notify_mismatch_word's): row bytes above bit 32, rows_words below.
EPCOMM_HD inline uint64_t notify_rows_mismatch_word(int row_bytes, int32_t rows_words) {
  return (uint64_t{1} << 63) | (static_cast<uint64_t>(static_cast<uint32_t>(row_bytes) & 0x7fffffffu) << 32) |
         static_cast<uint32_t>(rows_words);
}

// The word a count exchange reports in a kMismatch record (expected: this rank's, observed: the
// peer's): num_experts in the high half, the worst_tokens flag at bit 31, the chunk below it.
EPCOMM_HD inline uint64_t notify_mismatch_word(int num_experts, int chunk, int worst_tokens) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(num_experts)) << 32) |
         (static_cast<uint64_t>(worst_tokens != 0) << 31) | static_cast<uint32_t>(chunk & 0x7fffffff);
}

// Byte offsets inside one meta entry: the header, counts_to_rank[R], expert_counts[max_local_experts],
// masks[max_chunks]. The intranode and internode exchanges use the same entry (receive_plan.cuh).
struct MetaEntryLayout {
  size_t counts, experts, masks, stride;
};
constexpr MetaEntryLayout meta_entry_layout(int num_ranks, int max_local_experts, int max_chunks) {
  const size_t counts = align_up(sizeof(NotifyHeader), 16);
  const size_t experts = align_up(counts + sizeof(int32_t) * num_ranks, 16);
  const size_t masks = align_up(experts + sizeof(int32_t) * max_local_experts, 16);
  return {counts, experts, masks, align_up(masks + sizeof(uint32_t) * max_chunks, 128)};
}

struct ControlLayout {
  int num_ranks = 0;
  int max_chunks = 0;  // per source, = ceil(max tokens per rank / chunk)
  int max_local_experts = 0;

  size_t notify_flags = 0;       // uint64 [R]: source i sets entry i after writing its meta
  size_t notify_meta = 0;        // meta [2 parities][R sources], meta_entry.stride bytes each
  MetaEntryLayout meta_entry{};  // offsets inside one meta entry
  size_t dispatch_ready = 0;     // uint64 [R][kMaxBlocks]: sender i staged iteration n of block b
  size_t dispatch_ack = 0;       // uint64 [R][kMaxBlocks]: receiver j released iteration n of block b
  size_t combine_ready = 0;      // uint64 [R][kMaxBlocks]: expert rank j pushed iteration n of block b
  size_t combine_ack = 0;        // uint64 [R][kMaxBlocks]: origin i reduced iteration n of block b
  size_t ll_region = 0;          // low-latency flags and counters
  size_t ll_bytes = 0;
  size_t total = 0;  // bytes of the control part; the data part starts here (aligned)

  static ControlLayout make(int num_ranks, int max_chunks, int max_local_experts, size_t ll_bytes) {
    ControlLayout c;
    c.num_ranks = num_ranks;
    c.max_chunks = max_chunks;
    c.max_local_experts = max_local_experts;
    size_t off = 0;
    c.notify_flags = off;
    off = align_up(off + sizeof(uint64_t) * num_ranks, 128);
    c.meta_entry = meta_entry_layout(num_ranks, max_local_experts, max_chunks);
    c.notify_meta = off;
    off += 2 * num_ranks * c.meta_entry.stride;
    const size_t flags_bytes = sizeof(uint64_t) * num_ranks * kMaxBlocks;
    c.dispatch_ready = off;
    off = align_up(off + flags_bytes, 128);
    c.dispatch_ack = off;
    off = align_up(off + flags_bytes, 128);
    c.combine_ready = off;
    off = align_up(off + flags_bytes, 128);
    c.combine_ack = off;
    off = align_up(off + flags_bytes, 128);
    c.ll_region = off;
    c.ll_bytes = ll_bytes;
    off = align_up(off + ll_bytes, 4096);
    c.total = off;
    return c;
  }

  EPCOMM_HD size_t meta(int parity, int source) const {
    return notify_meta + (static_cast<size_t>(parity) * num_ranks + source) * meta_entry.stride;
  }
  EPCOMM_HD size_t flag(size_t base, int peer, int block) const {
    return base + (static_cast<size_t>(peer) * kMaxBlocks + block) * sizeof(uint64_t);
  }
};

}  // namespace epcomm
