// The low-latency network path's area (LowLatencyNetLayout, kernels/low_latency/params.hpp): it
// follows the two LL buffers, its parts do not overlap, every put's source and destination is
// 16-byte aligned, and the size hints and the switch's default agree with it. And what
// clean_low_latency_buffer zeroes (flags_begin / flags_end): every flag an LL call waits on, no row.
// Host only.
#include <gtest/gtest.h>

#include <cstdlib>
#include <random>
#include <string>

#include "core/env.hpp"
#include "epcomm/buffer.hpp"
#include "epcomm/error.hpp"
#include "kernels/low_latency/params.hpp"

namespace epcomm {
namespace {

struct Shape {
  int tmax, hidden, R, E;
};

TEST(LowLatencyNetLayout, AreasFollowTheBuffersAlignedAndDisjoint) {
  for (const Shape s : {Shape{1, 128, 2, 2}, Shape{33, 512, 4, 16}, Shape{48, 512, 4, 16}, Shape{128, 7168, 8, 256},
                        Shape{7, 2048, 3, 24}, Shape{4096, 128, 32, 32}, Shape{65, 1024, 16, 1024}}) {
    SCOPED_TRACE("Tmax=" + std::to_string(s.tmax) + " hidden=" + std::to_string(s.hidden) +
                 " R=" + std::to_string(s.R) + " E=" + std::to_string(s.E));
    const LowLatencyLayout l = LowLatencyLayout::make(s.tmax, s.hidden, s.R, s.E);
    const LowLatencyNetLayout n = LowLatencyNetLayout::make(l);
    const int EL = s.E / s.R;
    EXPECT_GE(n.signals, l.total_bytes);
    EXPECT_EQ(n.signals % 128, 0u);
    EXPECT_EQ(n.shadows % 128, 0u);
    const size_t sig_bytes = 8ull * 2 * kLLNetKinds * s.R;
    EXPECT_GE(n.shadows, n.signals + sig_bytes);
    EXPECT_GE(n.meta_out, n.shadows + sig_bytes);
    EXPECT_EQ(n.entry_bytes % 16, 0u);
    EXPECT_EQ(n.counts_bytes % 16, 0u);
    EXPECT_GE(n.counts_bytes, 4ull * EL);
    EXPECT_EQ(n.tpad % 4, 0);
    EXPECT_GE(n.tpad, s.tmax);
    // The last header of an entry lies inside it.
    EXPECT_LE(n.header_in_entry(EL - 1, s.tmax - 1) + 4, n.entry_bytes);
    EXPECT_EQ(n.header_in_entry(0, 0), n.counts_bytes);
    // meta_out [2][R], meta_in [2][R], tokens [2][Tmax]: back to back, each put 16-byte aligned.
    EXPECT_EQ(n.meta_in, n.out_entry(1, s.R - 1) + n.entry_bytes);
    EXPECT_EQ(n.tokens, n.in_entry(1, s.R - 1) + n.entry_bytes);
    EXPECT_LE(n.token(1, s.tmax - 1) + l.msg_bytes, n.end);
    for (int b = 0; b < 2; ++b)
      for (int r = 0; r < s.R; ++r) {
        EXPECT_EQ(n.out_entry(b, r) % 16, 0u);
        EXPECT_EQ(n.in_entry(b, r) % 16, 0u);
      }
    EXPECT_EQ(n.token(0, 0) % 16, 0u);
    EXPECT_EQ(l.msg_bytes % 16, 0u);
    // Message slots and combine rows (the put destinations) are 16-byte aligned as well.
    EXPECT_EQ(l.message(1, EL - 1, s.R - 1, s.tmax - 1) % 16, 0u);
    EXPECT_EQ(l.combine_row(1, s.tmax - 1, l.kslots - 1) % 16, 0u);
    // Signal ids and shadows: one per (buffer, kind, peer), inside their arrays.
    EXPECT_EQ(n.signal_id(1, kLLNetKinds - 1, s.R - 1), 2 * kLLNetKinds * s.R - 1);
    EXPECT_EQ(n.shadow(1, kLLNetKinds - 1, s.R - 1) + 8, n.shadows + sig_bytes);
    // The hints: the network one is the area's end, never less than the LSA one.
    EXPECT_EQ(Buffer::low_latency_net_size_hint(s.tmax, s.hidden, s.R, s.E), n.end);
    EXPECT_GE(n.end, l.total_bytes);
  }
}

TEST(LowLatencyNetLayout, SwitchDefaultsToOffAndHintChecksItsArguments) {
  if (std::getenv("EPCOMM_LL_NET") == nullptr) {
    EXPECT_EQ(env_value("EPCOMM_LL_NET"), 0);
    EXPECT_FALSE(low_latency_net_requested());
  }
  EXPECT_EQ(BufferOptions{}.low_latency_net, -1);                                 // -1: the environment decides
  EXPECT_THROW(Buffer::low_latency_net_size_hint(16, 100, 2, 4), ArgumentError);  // hidden not a multiple of 128
  EXPECT_THROW(Buffer::low_latency_net_size_hint(16, 128, 3, 4), ArgumentError);  // E not a multiple of R
  EXPECT_THROW(Buffer::low_latency_net_size_hint(0, 128, 2, 4), ArgumentError);
}

// clean_low_latency_buffer zeroes only each buffer's tail [flags_begin, flags_end) and the network
// area's signals and shadows (BENCHMARKS run 86: zeroing the whole region took 654 us). Every word
// an LL call waits on must lie there, and no row (rows a tail held would be zeroed for nothing;
// a flag outside would keep what the last call or normal mode left). Random shapes, seed printed.
TEST(LowLatencyLayout, CleanZeroesEveryFlagAndNoRow) {
  const unsigned seed = std::random_device{}();
  std::mt19937 rng(seed);
  SCOPED_TRACE("seed=" + std::to_string(seed));
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  for (int i = 0; i < 300; ++i) {
    const int R = i == 0 ? 8 : pick(1, 64), EL = i == 0 ? 32 : pick(1, 48), E = R * EL;
    const int tmax = i == 0 ? 128 : pick(1, 300), hidden = i == 0 ? 7168 : 128 * pick(1, 64);
    SCOPED_TRACE("Tmax=" + std::to_string(tmax) + " hidden=" + std::to_string(hidden) + " R=" + std::to_string(R) +
                 " E=" + std::to_string(E));
    const LowLatencyLayout l = LowLatencyLayout::make(tmax, hidden, R, E);
    const size_t KS = static_cast<size_t>(l.kslots);
    for (int b = 0; b < 2; ++b) {
      const size_t fb = l.flags_begin(b), fe = l.flags_end(b);
      auto in_tail = [&](size_t off, size_t bytes) { return off >= fb && off + bytes <= fe; };
      auto before_tail = [&](size_t off, size_t bytes) { return off >= l.buffer(b) && off + bytes <= fb; };
      // The flags: headers (the staged tokens' flags in the first row's high halves), counts,
      // combine flags, done.
      EXPECT_TRUE(in_tail(l.header(b, 0, 0, 0), 8));
      EXPECT_TRUE(in_tail(l.header(b, EL - 1, R - 1, tmax - 1), 8));
      EXPECT_TRUE(in_tail(l.staged_flag(b, R - 1, tmax - 1), 4));
      EXPECT_TRUE(in_tail(l.count(b, 0, 0), 8));
      EXPECT_TRUE(in_tail(l.count(b, EL - 1, R - 1), 8));
      EXPECT_TRUE(in_tail(l.combine_flag(b, 0, 0), 8));
      EXPECT_TRUE(in_tail(l.combine_flag(b, tmax - 1, l.kslots - 1), 8));
      EXPECT_TRUE(in_tail(l.done(b, 0), 8));
      EXPECT_TRUE(in_tail(l.done(b, R - 1), 8));
      // The per-rank combine's plan (its weights are flags) where the path is used.
      if (l.per_rank_combine_fits()) {
        EXPECT_TRUE(in_tail(l.pr_head(b, 0, 0), 4));
        EXPECT_TRUE(in_tail(l.pr_entries(b, R - 1, tmax - 1), 4 * KS));
        EXPECT_TRUE(in_tail(l.pr_weights(b, R - 1) + (static_cast<size_t>(tmax) * KS - 1) * 8, 8));
        EXPECT_TRUE(in_tail(l.pr_count(b, R - 1), 4));
      }
      // The rows: combine rows, messages, and the per-rank staged slots over the messages.
      EXPECT_TRUE(before_tail(l.combine_row(b, 0, 0), l.msg_bytes));
      EXPECT_TRUE(before_tail(l.combine_row(b, tmax - 1, l.kslots - 1), l.msg_bytes));
      EXPECT_TRUE(before_tail(l.message(b, 0, 0, 0), l.msg_bytes));
      EXPECT_TRUE(before_tail(l.message(b, EL - 1, R - 1, tmax - 1), l.msg_bytes));
      for (const bool fp8 : {false, true})
        if (l.per_rank_fits(fp8)) EXPECT_TRUE(before_tail(l.staged(b, R - 1, tmax - 1, fp8), l.staged_stride(fp8)));
      // Nothing but flags in the tail: its size is theirs (rounded to 16 bytes).
      const size_t flags = 8 * (static_cast<size_t>(E) * tmax + E + static_cast<size_t>(tmax) * KS + R);
      EXPECT_EQ(fe - fb, align_up(flags, 16));
    }
    // The network area: signals and shadows, not the meta entries or tokens.
    const LowLatencyNetLayout n = LowLatencyNetLayout::make(l);
    EXPECT_EQ(n.flags_begin(), n.signals);
    EXPECT_LE(n.signals + 8 * (static_cast<size_t>(n.signal_id(1, kLLNetKinds - 1, R - 1)) + 1), n.shadows);
    EXPECT_LE(n.shadow(1, kLLNetKinds - 1, R - 1) + 8, n.flags_end());
    EXPECT_EQ(n.flags_end(), n.out_entry(0, 0));
    EXPECT_GE(n.flags_begin(), l.flags_end(1));
  }
  // The standard problem: the flags are 0.05% of the region.
  const LowLatencyLayout s = LowLatencyLayout::make(128, 7168, 8, 256);
  const size_t zeroed = 2 * (s.flags_end(0) - s.flags_begin(0));
  EXPECT_LT(zeroed * 1000, s.total_bytes);
}

}  // namespace
}  // namespace epcomm
