// The low-latency network path's area (LowLatencyNetLayout, kernels/low_latency/params.hpp): it
// follows the two LL buffers, its parts do not overlap, every put's source and destination is
// 16-byte aligned, and the size hints and the switch's default agree with it. Host only.
#include <gtest/gtest.h>

#include <cstdlib>
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

}  // namespace
}  // namespace epcomm
