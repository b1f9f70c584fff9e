// The parts of a Buffer's symmetric region (core/region_plan.hpp, what Buffer::Impl's constructor
// allocates): num_rdma_bytes is held once whatever the mode, as DeepEP's (until session 17 a
// normal-mode buffer across nodes held it twice); across nodes normal mode's control part comes on
// top and its data halves lie on the LL region; and the size functions users call
// (internode_size_hint, internode_windows) describe the region the Buffer lays out. Random sizes
// and group shapes, the seed printed.
#include <gtest/gtest.h>

#include <random>
#include <string>

#include "core/region_plan.hpp"
#include "epcomm/buffer.hpp"

namespace epcomm {
namespace {

struct Shape {
  int R, P;
};

TEST(RegionPlan, RdmaBytesHeldOnceAndNormalDataOnTheLowLatencyRegion) {
  const unsigned seed = std::random_device{}();
  std::mt19937 rng(seed);
  SCOPED_TRACE("seed=" + std::to_string(seed));
  const auto pick = [&](size_t lo, size_t hi) { return std::uniform_int_distribution<size_t>(lo, hi)(rng); };
  int across = 0;
  for (const Shape s : {Shape{8, 8}, Shape{4, 2}, Shape{4, 1}, Shape{16, 8}, Shape{32, 8}, Shape{64, 8}, Shape{128, 8},
                        Shape{72, 72}}) {
    for (int i = 0; i < 25; ++i) {
      const size_t nvl = pick(0, 1) != 0 ? pick(1, size_t{1} << 31) : 0;
      const size_t rdma = pick(0, 3) != 0 ? pick(1, size_t{1} << 32) : 0;
      const int T = static_cast<int>(pick(1, 8192)), EL = static_cast<int>(pick(1, 64));
      const bool internode = s.R > s.P;
      SCOPED_TRACE("R=" + std::to_string(s.R) + " P=" + std::to_string(s.P) + " nvl=" + std::to_string(nvl) +
                   " rdma=" + std::to_string(rdma) + " T=" + std::to_string(T) + " EL=" + std::to_string(EL));
      const RegionPlan p = plan_regions(nvl, rdma, s.R, s.P, T, EL, internode);
      const size_t rdma_held = align_up(rdma, 4096), nvl_held = align_up(nvl, 4096);
      EXPECT_EQ(p.data_offset, p.ctl.total);
      EXPECT_EQ(p.data_bytes, nvl_held);
      EXPECT_EQ(p.ll_bytes, rdma_held);
      EXPECT_EQ(p.ll_offset + p.ll_bytes, p.total);  // the LL region ends the allocation
      if (!internode) {
        EXPECT_EQ(p.inter_bytes, 0u);
        EXPECT_EQ(p.total, p.ctl.total + nvl_held + rdma_held);
        continue;
      }
      ++across;
      const InterLayout l = InterLayout::make(s.R, s.P, T, (T + 7) / 8, EL, p.inter_bytes);
      // num_rdma_bytes once: only normal mode's control part comes on top of it.
      EXPECT_EQ(p.total, p.ctl.total + nvl_held + l.control_bytes + rdma_held);
      EXPECT_EQ(p.inter_offset, p.data_offset + p.data_bytes);
      EXPECT_EQ(p.inter_offset + l.control_bytes, p.ll_offset);             // the control part right before
      EXPECT_EQ(p.inter_offset + p.inter_bytes, p.ll_offset + p.ll_bytes);  // the data halves on the LL region
      EXPECT_EQ(p.inter_offset + l.dispatch_base(), p.ll_offset);
      EXPECT_LE(l.combine_base() + l.half_bytes, p.inter_bytes);
      EXPECT_EQ(l.half_bytes, rdma_held / 2 / 4096 * 4096);
    }
  }
  EXPECT_GT(across, 100);
}

// internode_size_hint is the num_rdma_bytes whose region holds every token in one round, exactly
// (the data halves; no control part inside it), and internode_windows reads the region the Buffer
// lays out for a given num_rdma_bytes.
TEST(RegionPlan, SizeFunctionsDescribeTheBuffersRegion) {
  for (const Shape s : {Shape{4, 2}, Shape{16, 8}, Shape{64, 8}, Shape{128, 4}})
    for (const int T : {1, 128, 4096}) {
      const int hidden = 7168, K = 8, EL = 8;
      SCOPED_TRACE("R=" + std::to_string(s.R) + " P=" + std::to_string(s.P) + " T=" + std::to_string(T));
      const size_t hint = Buffer::internode_size_hint(T, hidden, s.R, s.P, K, EL);
      const RegionPlan p = plan_regions(0, hint, s.R, s.P, T, EL, true);
      const InterLayout l = InterLayout::make(s.R, s.P, T, (T + 7) / 8, EL, p.inter_bytes);
      EXPECT_EQ(2 * l.half_bytes, hint);
      // The windows the size function gives are those of the region the Buffer lays out, at the
      // hint and at smaller regions (which run in rounds).
      for (const size_t bytes : {hint, hint / 3, hint / 10}) {
        const Buffer::InternodeWindows w = Buffer::internode_windows(bytes, T, hidden, s.R, s.P, K, EL);
        const InterLayout b =
            InterLayout::make(s.R, s.P, T, (T + 7) / 8, EL, plan_regions(0, bytes, s.R, s.P, T, EL, true).inter_bytes);
        const int step = inter_window_step(32);
        EXPECT_EQ(w.dispatch, InterDispatchGeometry::make(b, 2 * hidden, 0, K, step).window) << bytes;
        EXPECT_EQ(w.combine, InterCombineGeometry::make(b, hidden, K, step).window) << bytes;
        if (bytes == hint) {
          EXPECT_GE(w.dispatch, T);
          EXPECT_GE(w.combine, T);
        }
      }
    }
}

}  // namespace
}  // namespace epcomm
