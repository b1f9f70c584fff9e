// Shrink mode in the reference (LowLatencyOptions::masked_ranks): a masked rank takes no part. On
// random problems, every live rank's dispatch and combine equal those of the unmasked reference
// run on inputs where the masked ranks have no tokens and the live ranks' choices of masked
// experts are -1; masked ranks get empty outputs; bad masks are argument errors.
#include "cpu/test_reference_util.hpp"
#include "epcomm/host_cluster.hpp"

namespace epcomm::ref {
namespace {

using namespace testing_util;

struct Problem {
  int R = 0;
  LowLatencyOptions o;
  std::vector<LowLatencyDispatchInput> in;
  std::vector<std::vector<float>> w;
};

Problem random_problem(std::mt19937& rng, int R, bool fp8) {
  Problem p;
  p.R = R;
  p.o.num_experts = R * uniform(rng, 1, 4);
  p.o.num_topk = uniform(rng, 1, std::min(8, p.o.num_experts));
  p.o.num_max_dispatch_tokens_per_rank = uniform(rng, 1, 20);
  p.o.hidden = 128 * uniform(rng, 1, 3);
  p.o.use_fp8 = fp8;
  p.in.resize(R);
  p.w.resize(R);
  for (int r = 0; r < R; ++r) {
    p.in[r].num_tokens = uniform(rng, 0, p.o.num_max_dispatch_tokens_per_rank);
    p.in[r].x = random_small_bf16(rng, static_cast<size_t>(p.in[r].num_tokens) * p.o.hidden);
    p.in[r].topk_idx = random_topk(rng, p.in[r].num_tokens, p.o.num_topk, p.o.num_experts, 0.1);
    p.w[r] = random_weights(rng, p.in[r].topk_idx.size());
  }
  return p;
}

// Expert outputs y = recv rows (BF16 mode) or any values: per slot, from the rank's dispatch.
std::vector<LowLatencyCombineInput> combine_inputs(const Problem& p, std::mt19937& rng) {
  std::vector<LowLatencyCombineInput> c(p.R);
  const size_t y_size =
      static_cast<size_t>(p.o.num_experts / p.R) * p.R * p.o.num_max_dispatch_tokens_per_rank * p.o.hidden;
  for (int r = 0; r < p.R; ++r) c[r] = {p.in[r].num_tokens, random_small_bf16(rng, y_size), p.in[r].topk_idx, p.w[r]};
  return c;
}

TEST(ReferenceShrink, LiveRanksSeeTheMaskedRanksAsAbsent) {
  EPCOMM_SEEDED_RNG(rng);
  for (int iter = 0; iter < 60; ++iter) {
    const int R = uniform(rng, 2, 6);
    Problem p = random_problem(rng, R, iter % 2 == 0);
    std::vector<uint8_t> masked(R, 0);
    const int num_masked = uniform(rng, 1, R - 1);
    for (int i = 0; i < num_masked; ++i) masked[uniform(rng, 0, R - 1)] = 1;
    const int Epr = p.o.num_experts / R;
    SCOPED_TRACE("iteration " + std::to_string(iter) + ", R = " + std::to_string(R));

    // The equivalent unmasked problem.
    Problem q = p;
    for (int r = 0; r < R; ++r) {
      if (masked[r]) {
        q.in[r] = {0, {}, {}};
        q.w[r].clear();
        continue;
      }
      for (auto& e : q.in[r].topk_idx)
        if (e >= 0 && masked[e / Epr]) e = -1;
    }
    // The masked problem: the masked ranks' inputs are garbage (they are not read).
    for (int r = 0; r < R; ++r)
      if (masked[r]) p.in[r] = {5, {}, {-7}};
    p.o.masked_ranks = masked;

    const auto got = low_latency_dispatch(p.in, p.o);
    const auto want = low_latency_dispatch(q.in, q.o);
    auto cin = combine_inputs(q, rng);
    const auto want_out = low_latency_combine(cin, want, q.o);
    auto pin = cin;
    for (int r = 0; r < R; ++r)
      if (masked[r]) pin[r] = {3, {}, {}, {}};
      else pin[r].topk_idx = p.in[r].topk_idx;  // the original choices, masked experts included
    const auto got_out = low_latency_combine(pin, got, p.o);
    for (int r = 0; r < R; ++r) {
      SCOPED_TRACE("rank " + std::to_string(r) + (masked[r] ? " (masked)" : ""));
      if (masked[r]) {
        EXPECT_EQ(got[r].recv_count, std::vector<int32_t>(Epr, 0));
        for (int64_t range : got[r].layout_range) EXPECT_EQ(range & 0xffffffff, 0);
        EXPECT_TRUE(got_out[r].empty());
        continue;
      }
      EXPECT_EQ(got[r].recv_count, want[r].recv_count);
      EXPECT_EQ(got[r].layout_range, want[r].layout_range);
      EXPECT_EQ(got[r].src_info, want[r].src_info);
      EXPECT_EQ(got[r].recv_x, want[r].recv_x);
      EXPECT_EQ(got[r].recv_scales, want[r].recv_scales);
      EXPECT_EQ(got_out[r], want_out[r]);
    }
  }
}

TEST(ReferenceShrink, NoMaskAndAllZeroMaskAgree) {
  EPCOMM_SEEDED_RNG(rng);
  Problem p = random_problem(rng, 3, true);
  const auto a = low_latency_dispatch(p.in, p.o);
  p.o.masked_ranks = {0, 0, 0};
  const auto b = low_latency_dispatch(p.in, p.o);
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(a[r].recv_x, b[r].recv_x);
    EXPECT_EQ(a[r].layout_range, b[r].layout_range);
  }
}

TEST(ReferenceShrink, BadMasksAreArgumentErrors) {
  EPCOMM_SEEDED_RNG(rng);
  Problem p = random_problem(rng, 3, false);
  auto expect_error = [&](const std::vector<uint8_t>& mask, const char* needle) {
    p.o.masked_ranks = mask;
    try {
      low_latency_dispatch(p.in, p.o);
      ADD_FAILURE() << "no error for masked_ranks of size " << mask.size();
    } catch (const ArgumentError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error({1, 0}, "masked_ranks");
  expect_error({0, 2, 0}, "masked_ranks element 1 = 2");
  // Ranks of a HostCluster that disagree on the mask.
  HostCluster cluster(2, 2);
  Problem q = random_problem(rng, 2, false);
  try {
    cluster.run([&](int rank) {
      LowLatencyOptions o = q.o;
      o.masked_ranks = rank == 0 ? std::vector<uint8_t>{0, 0} : std::vector<uint8_t>{1, 0};
      cluster.low_latency_dispatch(rank, q.in[rank], o);
    });
    ADD_FAILURE() << "ranks disagreeing on masked_ranks were not reported";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("masked_ranks"), std::string::npos) << e.what();
  }
}

// The per-rank API gives the same as the all-ranks one with a mask (masked ranks still call).
TEST(ReferenceShrink, HostClusterAgrees) {
  EPCOMM_SEEDED_RNG(rng);
  Problem p = random_problem(rng, 4, true);
  p.o.masked_ranks = {0, 0, 1, 0};
  const auto want = low_latency_dispatch(p.in, p.o);
  HostCluster cluster(4, 4);
  std::vector<LowLatencyDispatchOutput> got(4);
  cluster.run([&](int rank) { got[rank] = cluster.low_latency_dispatch(rank, p.in[rank], p.o); });
  for (int r = 0; r < 4; ++r) {
    EXPECT_EQ(got[r].recv_x, want[r].recv_x) << "rank " << r;
    EXPECT_EQ(got[r].layout_range, want[r].layout_range) << "rank " << r;
  }
}

}  // namespace
}  // namespace epcomm::ref
