// The count exchange's check that ranks agree on a call (kernels/normal/receive_plan.cuh): the words it
// reports and what the host says. Ranks must agree on the rows (x's width, scale words, top-k) and,
// across nodes, on passing num_worst_tokens (it sets the rounds). The GPU side:
// NormalGpu.RowsNotAlikeIsAnErrorThenResetRecovers, InternodeGpu.NumWorstTokensNotAlikeIsAnErrorThenResetRecovers.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>

#include "cpu/test_reference_util.hpp"
#include "kernels/common/control.hpp"
#include "kernels/common/diagnostics.hpp"

namespace epcomm {
namespace {

using ref::testing_util::uniform;

DeviceErrorRecord notify_mismatch(int rank, int peer, uint64_t mine, uint64_t theirs) {
  DeviceErrorRecord r{};
  r.code = static_cast<int32_t>(DeviceError::kMismatch);
  r.kernel = KernelId::kNotifyDispatch;
  r.phase = WaitPhase::kNotifyMeta;
  r.rank = rank;
  r.peer = peer;
  r.expected = mine;
  r.observed = theirs;
  return r;
}

TEST(NotifyMismatch, WordKeepsEachFieldApart) {
  EPCOMM_SEEDED_RNG(rng);
  for (int i = 0; i < 100; ++i) {
    const int experts = uniform(rng, 1, 1 << 20), chunk = uniform(rng, 1, 32), worst = uniform(rng, 0, 1);
    const uint64_t w = notify_mismatch_word(experts, chunk, worst);
    EXPECT_EQ(w >> 32, static_cast<uint64_t>(experts));
    EXPECT_EQ(w >> 31 & 1, static_cast<uint64_t>(worst));
    EXPECT_EQ(w & 0x7fffffffu, static_cast<uint64_t>(chunk));
    EXPECT_NE(w, notify_mismatch_word(experts, chunk, 1 - worst));
  }
}

TEST(NotifyMismatch, NumWorstTokensNotAlikeIsNamed) {
  EPCOMM_SEEDED_RNG(rng);
  const int experts = 16 * uniform(rng, 1, 32), chunk = uniform(rng, 8, 32);
  const int rank = uniform(rng, 0, 7), peer = (rank + uniform(rng, 1, 7)) % 8;
  for (const int mine : {0, 1}) {
    const std::string msg = describe(notify_mismatch(rank, peer, notify_mismatch_word(experts, chunk, mine),
                                                     notify_mismatch_word(experts, chunk, 1 - mine)));
    EXPECT_NE(msg.find("num_worst_tokens"), std::string::npos) << msg;
    EXPECT_NE(msg.find(std::string("rank ") + std::to_string(rank) + (mine ? " passed" : " did not pass")),
              std::string::npos)
        << msg;
    EXPECT_NE(msg.find("peer " + std::to_string(peer) + (mine ? " did not" : " did")), std::string::npos) << msg;
    EXPECT_NE(msg.find("reset()"), std::string::npos) << msg;
  }
  // Another field apart: the general message, which does not blame num_worst_tokens.
  const std::string other = describe(notify_mismatch(rank, peer, notify_mismatch_word(experts, chunk, 1),
                                                     notify_mismatch_word(experts + 16, chunk, 1)));
  EXPECT_NE(other.find("ranks disagree on the call's parameters"), std::string::npos) << other;
  EXPECT_EQ(other.find("num_worst_tokens"), std::string::npos) << other;
}

TEST(NotifyMismatch, RowsNotAlikeAreNamed) {
  EPCOMM_SEEDED_RNG(rng);
  for (int i = 0; i < 20; ++i) {
    const int bytes = 16 * uniform(rng, 1, 1 << 16), scales = uniform(rng, 0, 1 << 12), topk = uniform(rng, 0, 16);
    const int other_bytes = bytes + 16 * uniform(rng, 1, 64);
    const int rank = uniform(rng, 0, 7), peer = (rank + uniform(rng, 1, 7)) % 8;
    const uint64_t mine = notify_rows_mismatch_word(bytes, notify_rows_words(scales, topk));
    EXPECT_NE(mine >> 63, 0u);  // told apart from notify_mismatch_word's (num_experts < 2^31)
    EXPECT_EQ(notify_mismatch_word(1 << 30, 32, 1) >> 63, 0u);
    const std::string msg = describe(
        notify_mismatch(rank, peer, mine, notify_rows_mismatch_word(other_bytes, notify_rows_words(scales, topk))));
    const std::string want = "rank " + std::to_string(rank) + " has rows of " + std::to_string(bytes) + " bytes, " +
                             std::to_string(scales) + " scale words, top-" + std::to_string(topk) + ", peer " +
                             std::to_string(peer) + " rows of " + std::to_string(other_bytes) + " bytes";
    EXPECT_NE(msg.find(want), std::string::npos) << msg;
    EXPECT_NE(msg.find("reset()"), std::string::npos) << msg;
    EXPECT_EQ(msg.find("num_worst_tokens"), std::string::npos) << msg;
  }
}

}  // namespace
}  // namespace epcomm
