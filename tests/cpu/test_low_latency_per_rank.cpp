// Which low-latency paths a buffer takes (kernels/low_latency/params.hpp): the level from
// BufferOptions::low_latency_per_rank, or EPCOMM_LL_PER_RANK where the option is -1, and what each
// level gives for a layout. The outputs' rounding depends on it (docs/design-low-latency.md).
#include <gtest/gtest.h>

#include <cstdlib>

#include "core/env.hpp"
#include "epcomm/buffer.hpp"
#include "kernels/low_latency/params.hpp"

namespace epcomm {
namespace {

TEST(LowLatencyPerRank, OptionOverridesTheEnvironmentWhereSet) {
  EXPECT_EQ(BufferOptions{}.low_latency_per_rank, -1);  // -1: the environment decides
  for (int env = 0; env <= kLowLatencyPerRankMaxLevel; ++env) {
    EXPECT_EQ(low_latency_per_rank_choice(-1, env), env);
    for (int option = 0; option <= kLowLatencyPerRankMaxLevel; ++option)
      EXPECT_EQ(low_latency_per_rank_choice(option, env), option) << "option " << option << ", env " << env;
  }
  if (std::getenv("EPCOMM_LL_PER_RANK") == nullptr) EXPECT_EQ(low_latency_per_rank_level(), 4);
}

TEST(LowLatencyPerRank, LevelsOnTheStandardProblem) {
  // docs/contract.md §7: 128 tokens, hidden 7168, 4 ranks, 288 experts.
  const LowLatencyLayout l = LowLatencyLayout::make(128, 7168, 4, 288);
  EXPECT_FALSE(low_latency_per_rank_wanted(l, true, 0));
  EXPECT_EQ(low_latency_partials(l, 0), LowLatencyPartials::kNone);
  for (int level = 1; level <= kLowLatencyPerRankMaxLevel; ++level) {
    EXPECT_TRUE(low_latency_per_rank_wanted(l, true, level)) << level;
    EXPECT_TRUE(low_latency_per_rank_wanted(l, false, level)) << level;
  }
  EXPECT_EQ(low_latency_partials(l, 1), LowLatencyPartials::kNone);  // per (token, expert), k order
  EXPECT_EQ(low_latency_partials(l, 2), LowLatencyPartials::kBf16);
  EXPECT_EQ(low_latency_partials(l, 3), LowLatencyPartials::kFine);
  EXPECT_EQ(low_latency_partials(l, 4), LowLatencyPartials::kF32);
}

TEST(LowLatencyPerRank, PartialsFallBackWhereTheLayoutHasNoRoom) {
  // Fewer than 26 experts per rank: no room for the per-rank plan, so no partials at any level.
  const LowLatencyLayout few = LowLatencyLayout::make(128, 7168, 4, 4 * 25);
  for (int level = 2; level <= kLowLatencyPerRankMaxLevel; ++level)
    EXPECT_EQ(low_latency_partials(few, level), LowLatencyPartials::kNone) << level;
  // Float32 partials need at most 8 ranks, fine partials at most 10; BF16 partials go further.
  const LowLatencyLayout r10 = LowLatencyLayout::make(64, 7168, 10, 10 * 32);
  EXPECT_EQ(low_latency_partials(r10, 4), LowLatencyPartials::kNone);
  EXPECT_EQ(low_latency_partials(r10, 3), LowLatencyPartials::kFine);
  EXPECT_EQ(low_latency_partials(r10, 2), LowLatencyPartials::kBf16);
  const LowLatencyLayout r12 = LowLatencyLayout::make(64, 7168, 12, 12 * 32);
  EXPECT_EQ(low_latency_partials(r12, 3), LowLatencyPartials::kNone);
  const LowLatencyLayout r8 = LowLatencyLayout::make(64, 7168, 8, 8 * 32);
  EXPECT_EQ(low_latency_partials(r8, 4), LowLatencyPartials::kF32);
}

}  // namespace
}  // namespace epcomm
