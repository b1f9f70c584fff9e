// The CPU reference at production scale, low-latency mode (issue 21: up to 320 ranks) and ranks
// as threads (HostCluster at R = 320), against the per-token definition of docs/contract.md §3.3
// written out again here; the inputs and their skew: scale_problems.hpp, the normal-mode half:
// test_scale_normal.cpp.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>

#include "cpu/scale_problems.hpp"

namespace epcomm::ref {
namespace {

using namespace testing_util;
using namespace scale;

// Dispatch against the definition: local expert e of rank r receives, from each source i, one row
// per (t, k) with topk_idx[t][k] = e (as a multiset of tokens; the slot order is free), the FP8 cast
// (or BF16 row) of x[t], the scales, and a layout_range that tiles [0, recv_count).
void check_low_latency_dispatch(const LowLatencyProblem& p, const std::vector<LowLatencyDispatchOutput>& out) {
  const int R = p.R, K = p.o.num_topk, H = p.o.hidden, G = H / 128, W = (G + 3) / 4;
  const int per_rank = p.o.num_experts / R;
  const size_t S = static_cast<size_t>(R) * p.o.num_max_dispatch_tokens_per_rank;
  // want[e][i]: tokens of source i for global expert e.
  std::vector<std::vector<std::vector<int>>> want(p.o.num_experts, std::vector<std::vector<int>>(R));
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < p.inputs[i].num_tokens; ++t)
      for (int k = 0; k < K; ++k) {
        const int64_t e = p.inputs[i].topk_idx[static_cast<size_t>(t) * K + k];
        if (e >= 0) want[e][i].push_back(t);
      }
  for (int r = 0; r < R; ++r) {
    const auto& o = out[r];
    for (int le = 0; le < per_rank; ++le) {
      SCOPED_TRACE(::testing::Message() << "rank " << r << " local expert " << le);
      const int64_t e = int64_t{r} * per_rank + le;
      std::vector<bool> used(S, false);
      int count = 0;
      for (int i = 0; i < R; ++i) {
        const int64_t range = o.layout_range[static_cast<size_t>(le) * R + i];
        const int64_t begin = range_begin(range), n = range_count(range);
        ASSERT_EQ(n, static_cast<int64_t>(want[e][i].size())) << "source " << i;
        ASSERT_LE(begin + n, static_cast<int64_t>(S));
        std::vector<int> got;
        for (int64_t s = begin; s < begin + n; ++s) {
          ASSERT_FALSE(used[s]) << "slot " << s << " in two ranges";
          used[s] = true;
          const size_t slot = static_cast<size_t>(le) * S + s;
          const int t = o.src_info[slot];
          ASSERT_TRUE(t >= 0 && t < p.inputs[i].num_tokens) << "slot " << s;
          got.push_back(t);
          const uint16_t* x = &p.inputs[i].x[static_cast<size_t>(t) * H];
          if (!p.o.use_fp8) {
            for (int ch = 0; ch < H; ++ch)
              ASSERT_EQ(o.recv_x[slot * H * 2 + 2 * ch] | (o.recv_x[slot * H * 2 + 2 * ch + 1] << 8), x[ch]);
            continue;
          }
          for (int g = 0; g < G; ++g) {
            float amax = 0;
            for (int ch = 0; ch < 128; ++ch) amax = std::max(amax, std::fabs(bf16_to_float(x[g * 128 + ch])));
            const float scale = fp8_group_scale(amax, p.o.round_scale);
            if (p.o.use_ue8m0)
              ASSERT_EQ((static_cast<uint32_t>(o.recv_scales_ue8m0[slot * W + g / 4]) >> (8 * (g % 4))) & 0xff,
                        ue8m0_of(scale));
            else ASSERT_EQ(o.recv_scales[slot * G + g], scale);
            for (int ch = 0; ch < 128; ++ch)
              ASSERT_EQ(o.recv_x[slot * H + g * 128 + ch], float_to_e4m3(bf16_to_float(x[g * 128 + ch]) / scale));
          }
        }
        std::sort(got.begin(), got.end());
        ASSERT_EQ(got, want[e][i]) << "source " << i;
        count += static_cast<int>(n);
      }
      ASSERT_EQ(o.recv_count[le], count);
    }
  }
}

// Combine against the definition: out[t] = sum_k w[t,k] * y(topk[t,k], t) over k with an expert.
// Small integers times multiples of 1/8: exact in any order.
void check_low_latency_combine(const LowLatencyProblem& p, const std::vector<std::vector<uint16_t>>& out) {
  const int K = p.o.num_topk, H = p.o.hidden;
  for (int i = 0; i < p.R; ++i) {
    const auto& in = p.inputs[i];
    ASSERT_EQ(out[i].size(), static_cast<size_t>(in.num_tokens) * H) << "rank " << i;
    for (int t = 0; t < in.num_tokens; ++t)
      for (int c = 0; c < H; ++c) {
        float want = 0;
        for (int k = 0; k < K; ++k) {
          const int64_t e = in.topk_idx[static_cast<size_t>(t) * K + k];
          if (e >= 0) want += p.weights[i][static_cast<size_t>(t) * K + k] * expert_value(e, i, t, c);
        }
        ASSERT_EQ(out[i][static_cast<size_t>(t) * H + c], bf16(want))
            << "rank " << i << " token " << t << " channel " << c;
      }
  }
}

class ScaleLowLatency : public ::testing::TestWithParam<LowLatencyCase> {};

TEST_P(ScaleLowLatency, DispatchCombineAgainstPerTokenDefinition) {
  EPCOMM_SEEDED_RNG(rng);
  const LowLatencyCase c = GetParam();
  const auto start = std::chrono::steady_clock::now();
  const LowLatencyProblem p = make_low_latency(rng, c);
  SCOPED_TRACE(::testing::Message() << name_of(c) << " E=" << p.o.num_experts << " round_scale=" << p.o.round_scale);
  const auto out = low_latency_dispatch(p.inputs, p.o);
  check_low_latency_dispatch(p, out);
  const auto cin = low_latency_expert_outputs(p, out);
  check_low_latency_combine(p, low_latency_combine(cin, out, p.o));
  std::printf("[ scale    ] low-latency %s: %.2f s\n", name_of(c).c_str(), seconds_since(start));
}

INSTANTIATE_TEST_SUITE_P(Ranks, ScaleLowLatency,
                         ::testing::Values(LowLatencyCase{64, true, false}, LowLatencyCase{128, false, false},
                                           LowLatencyCase{256, true, true}, LowLatencyCase{320, true, false},
                                           LowLatencyCase{320, false, false}),
                         [](const auto& info) { return name_of(info.param); });

// ---- ranks as threads ----

// HostCluster at R = 320 (40 nodes x 8): each of R threads passes only its own inputs and gets
// exactly the all-ranks result (every collective, including combine's cross-rank handle checks,
// which each rank runs for its own handle: all of them on every rank took 8 s here).
TEST(ScaleHostCluster, NormalAndLowLatencyMatchAllRanks) {
  EPCOMM_SEEDED_RNG(rng);
  const auto start = std::chrono::steady_clock::now();
  const NormalCase nc{320, 8, DType::kBF16};
  const NormalProblem np = make_normal(rng, nc);
  const auto want = normal_dispatch(np.inputs, np.options);
  std::vector<NormalHandle> handles;
  for (const auto& o : want) handles.push_back(o.handle);
  const auto cin = expert_outputs(np, want, rng, false, true);
  const auto want_combined = normal_combine(cin, handles, np.hidden, np.K);
  std::vector<NormalDispatchOutput> got(np.R);
  std::vector<CombineOutput> got_combined(np.R);
  HostCluster normal_cluster(np.R, np.P);
  normal_cluster.run([&](int r) {
    got[r] = normal_cluster.dispatch(r, np.inputs[r], np.options);
    got_combined[r] = normal_cluster.combine(r, cin[r], got[r].handle, np.hidden, np.K);
  });
  for (int r = 0; r < np.R; ++r) {
    ASSERT_EQ(got[r].recv_x, want[r].recv_x) << "rank " << r;
    ASSERT_EQ(got[r].handle.rank_prefix_matrix, want[r].handle.rank_prefix_matrix) << "rank " << r;
    ASSERT_EQ(got_combined[r].combined_x, want_combined[r].combined_x) << "rank " << r;
    ASSERT_EQ(got_combined[r].combined_topk_weights, want_combined[r].combined_topk_weights) << "rank " << r;
  }
  const double normal_s = seconds_since(start);

  const LowLatencyProblem lp = make_low_latency(rng, {320, true, false});
  const auto ll_want = low_latency_dispatch(lp.inputs, lp.o);
  const auto ll_cin = low_latency_expert_outputs(lp, ll_want);
  const auto ll_want_combined = low_latency_combine(ll_cin, ll_want, lp.o);
  std::vector<LowLatencyDispatchOutput> ll_got(lp.R);
  std::vector<std::vector<uint16_t>> ll_got_combined(lp.R);
  HostCluster ll_cluster(lp.R, 8);
  ll_cluster.run([&](int r) {
    ll_got[r] = ll_cluster.low_latency_dispatch(r, lp.inputs[r], lp.o);
    ll_got_combined[r] = ll_cluster.low_latency_combine(r, ll_cin[r], ll_got[r], lp.o);
  });
  for (int r = 0; r < lp.R; ++r) {
    ASSERT_EQ(ll_got[r].recv_x, ll_want[r].recv_x) << "rank " << r;
    ASSERT_EQ(ll_got[r].src_info, ll_want[r].src_info) << "rank " << r;
    ASSERT_EQ(ll_got[r].layout_range, ll_want[r].layout_range) << "rank " << r;
    ASSERT_EQ(ll_got_combined[r], ll_want_combined[r]) << "rank " << r;
  }
  std::printf("[ scale    ] HostCluster normal R320 P8: %.2f s, low-latency R320: %.2f s\n", normal_s,
              seconds_since(start) - normal_s);
}

}  // namespace
}  // namespace epcomm::ref
