// The host side of NCCL GIN across real nodes, on the host: the Buffer's signal plan (every
// kernel's signal id lands in its own region, and the regions fit what a GinContext holds), and
// the agreement on NCCL's GIN settings that runs before ncclDevCommCreate (which ranks differ, what
// counts as a difference). The GIN kernels themselves need a GPU and a GIN network (tests/gin).
#include <gtest/gtest.h>

#include <cstdlib>
#include <set>
#include <string>

#include "core/gin_signals.hpp"
#include "transport/gin_context.hpp"

namespace epcomm {
namespace {

TEST(GinSignalPlan, EveryKernelSignalHasItsOwnIdAndFits) {
  for (int R : {2, 3, 4, 8, 16, 32, 64, 320, kMaxLowLatencyRanks}) {
    SCOPED_TRACE("R=" + std::to_string(R));
    GinSignalPlan plan;
    plan.num_ranks = R;
    EXPECT_EQ(plan.internode_base(), 0u);
    EXPECT_EQ(plan.low_latency_base(), plan.internode_count());
    EXPECT_LE(plan.total(), static_cast<uint32_t>(kGinSignalsPerRank) * R);
    EXPECT_LT(static_cast<uint32_t>(kGinSignalsPerRank) * R, 1u << 16) << "NCCL's proxy carries 16-bit signal ids";
    std::set<uint32_t> ids;
    const InterLayout inter = InterLayout::make(R, 1, 64, 8, 8, 0);
    for (int kind = 0; kind < kNumSignals; ++kind)
      for (int peer = 0; peer < R; ++peer) {
        const uint32_t id = plan.internode_base() + static_cast<uint32_t>(inter.signal_id(kind, peer));
        EXPECT_LT(id, plan.internode_base() + plan.internode_count());
        EXPECT_TRUE(ids.insert(id).second) << "internode kind " << kind << " peer " << peer;
      }
    const LowLatencyNetLayout ll = LowLatencyNetLayout::make(LowLatencyLayout::make(16, 128, R, 2 * R));
    for (int b = 0; b < 2; ++b)
      for (int kind = 0; kind < kLLNetKinds; ++kind)
        for (int peer = 0; peer < R; ++peer) {
          const uint32_t id = plan.low_latency_base() + static_cast<uint32_t>(ll.signal_id(b, kind, peer));
          EXPECT_GE(id, plan.low_latency_base());
          EXPECT_LT(id, plan.clean_base());
          EXPECT_TRUE(ids.insert(id).second) << "LL buffer " << b << " kind " << kind << " peer " << peer;
        }
    // clean_low_latency_buffer's device barriers (clean_gin.cu): signal clean_base + sender.
    for (int peer = 0; peer < R; ++peer) {
      const uint32_t id = plan.clean_base() + static_cast<uint32_t>(peer);
      EXPECT_LT(id, plan.total());
      EXPECT_TRUE(ids.insert(id).second) << "clean barrier peer " << peer;
    }
    EXPECT_EQ(ids.size(), plan.total()) << "the plan has no unused gaps";
  }
}

TEST(GinSettings, RanksThatDifferFromRankZeroAreNamed) {
  EXPECT_TRUE(ranks_disagreeing({7}).empty());
  EXPECT_TRUE(ranks_disagreeing({7, 7, 7}).empty());
  EXPECT_EQ(ranks_disagreeing({7, 8, 7, 9}), (std::vector<int>{1, 3}));
  EXPECT_EQ(ranks_disagreeing({8, 7, 7}), (std::vector<int>{1, 2}));  // rank 0 is the reference
  EXPECT_NE(settings_hash("a"), settings_hash("b"));
  EXPECT_EQ(settings_hash("NCCL_GIN_ENABLE=1"), settings_hash("NCCL_GIN_ENABLE=1"));
}

// Restores an environment variable when the test ends.
class EnvGuard {
 public:
  explicit EnvGuard(const char* name) : name_(name) {
    const char* v = std::getenv(name);
    had_ = v != nullptr;
    if (had_) old_ = v;
  }
  ~EnvGuard() {
    if (had_) setenv(name_, old_.c_str(), 1);
    else unsetenv(name_);
  }

 private:
  const char* name_;
  bool had_ = false;
  std::string old_;
};

TEST(GinSettings, TheLineNamesWhatDecidesWhetherGinExists) {
  EnvGuard plugin("NCCL_NET_PLUGIN"), enable("NCCL_GIN_ENABLE"), type("NCCL_GIN_TYPE"), net("NCCL_NET");
  unsetenv("NCCL_NET_PLUGIN");
  unsetenv("NCCL_GIN_ENABLE");
  unsetenv("NCCL_GIN_TYPE");
  unsetenv("NCCL_NET");
  const std::string none = gin_settings_line();
  EXPECT_NE(none.find("NCCL_NET_PLUGIN unset"), std::string::npos) << none;
  EXPECT_NE(none.find("NCCL_GIN_ENABLE=(unset)"), std::string::npos) << none;
  // A plugin's path may differ between nodes: only whether one is named counts.
  setenv("NCCL_NET_PLUGIN", "/a/libnccl-net-x.so", 1);
  const std::string a = gin_settings_line();
  setenv("NCCL_NET_PLUGIN", "/b/libnccl-net-x.so", 1);
  EXPECT_EQ(gin_settings_line(), a);
  EXPECT_NE(a, none);
  setenv("NCCL_GIN_ENABLE", "0", 1);
  EXPECT_NE(gin_settings_line(), a);
  EXPECT_NE(gin_settings_line().find("NCCL_GIN_ENABLE=0"), std::string::npos);
  setenv("NCCL_GIN_TYPE", "2", 1);
  EXPECT_NE(gin_settings_line().find("NCCL_GIN_TYPE=2"), std::string::npos);
}

}  // namespace
}  // namespace epcomm
