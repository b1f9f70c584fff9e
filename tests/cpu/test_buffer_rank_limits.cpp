// Buffer's rank limits (README "Limits", docs/design-scale.md §3), checked before anything touches
// a GPU or a peer: a stub group of any shape, every rank of it refused alike with an ArgumentError
// that names the limit, or let through to the next step (which, on a machine without a GPU, is
// "no CUDA device"; with one, the stub's allocation).
#include <gtest/gtest.h>

#include <memory>
#include <stdexcept>
#include <string>

#include "epcomm/buffer.hpp"
#include "epcomm/error.hpp"
#include "epcomm/group.hpp"

namespace epcomm {
namespace {

class StubGroup : public Group {
 public:
  StubGroup(int rank, int size, int ranks_per_node) : Group(rank, size, 0, ranks_per_node) {}
  std::string transport() const override { return "stub"; }
  void all_gather(const void*, void*, size_t) override { throw std::logic_error("stub group: all_gather"); }
  std::unique_ptr<SymmetricMemory> allocate_symmetric(size_t) override {
    throw std::logic_error("stub group: past the rank checks");
  }
};

// What Buffer's constructor throws for a group of R ranks, P per node ("" when it got past the rank
// checks: to the device, or to the stub's allocation).
std::string rank_error(int R, int P, bool low_latency_mode, int low_latency_net = -1) {
  BufferOptions o;
  o.low_latency_mode = low_latency_mode;
  o.low_latency_net = low_latency_net;
  std::string got;
  for (int rank : {0, R - 1}) {  // every rank alike
    std::string what;
    try {
      Buffer b(std::make_shared<StubGroup>(rank, R, P), o);
      what = "constructed";
    } catch (const ArgumentError& e) {
      what = e.what();
    } catch (const std::exception&) {
      what = "";  // past the rank checks
    }
    if (rank == 0) got = what;
    EXPECT_EQ(what, got) << "rank " << rank << " of R=" << R << " P=" << P;
  }
  return got;
}

TEST(BufferRankLimits, NormalModeUpTo32PerNodeAnd128AcrossNodes) {
  EXPECT_EQ(rank_error(8, 8, false), "");
  EXPECT_EQ(rank_error(32, 32, false), "");
  EXPECT_EQ(rank_error(64, 8, false), "");   // 8 nodes of 8
  EXPECT_EQ(rank_error(64, 2, false), "");   // 32 nodes of 2
  EXPECT_EQ(rank_error(128, 8, false), "");  // 16 nodes of 8
  EXPECT_EQ(rank_error(128, 4, false), "");  // 32 nodes of 4
  for (const auto& [R, P] : {std::pair{64, 64}, std::pair{40, 40}, std::pair{136, 8}, std::pair{66, 2}}) {
    const std::string e = rank_error(R, P, false);
    SCOPED_TRACE("R=" + std::to_string(R) + " P=" + std::to_string(P));
    EXPECT_NE(e.find("normal mode takes at most 32 ranks per node"), std::string::npos) << e;
    EXPECT_NE(e.find("128 ranks on at most 32 nodes"), std::string::npos) << e;
    EXPECT_NE(e.find("low_latency_mode = true"), std::string::npos) << e;
    EXPECT_EQ(rank_error(R, P, true), "") << "a buffer for low-latency mode alone takes it";
  }
}

TEST(BufferRankLimits, LowLatencyUpTo72PerNodeAnd1024InAll) {
  EXPECT_EQ(rank_error(72, 72, true), "");
  EXPECT_EQ(rank_error(320, 8, true), "");
  EXPECT_EQ(rank_error(1024, 8, true), "");
  EXPECT_NE(rank_error(80, 80, true).find("exceeds the 72 one NVLink domain may hold"), std::string::npos);
  EXPECT_NE(rank_error(1032, 8, true).find("exceeds the 1024 ranks"), std::string::npos);
  // Past 72 ranks the other nodes are reached only through the network.
  const std::string e = rank_error(128, 8, true, /*low_latency_net=*/0);
  EXPECT_NE(e.find("low_latency_net = 0 with 128 ranks"), std::string::npos) << e;
  EXPECT_EQ(rank_error(72, 8, true, 0), "");
}

}  // namespace
}  // namespace epcomm
