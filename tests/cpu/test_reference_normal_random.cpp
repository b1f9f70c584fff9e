// Normal mode on random inputs at R = 1, 2, 3, 4, 8: dispatch agrees with the layout, combine
// inverts dispatch (combine(dispatch(x)) = x times the number of destination ranks, weights come
// back whole), cached dispatch equals dispatch, and HostCluster equals the all-ranks functions.
#include "cpu/test_reference_util.hpp"
#include "epcomm/host_cluster.hpp"

namespace epcomm::ref {
namespace {

using namespace testing_util;

struct Problem {
  int R = 1, E = 1, K = 1, hidden = 8;
  NormalOptions options;
  std::vector<NormalInput> inputs;
};

enum class Routing { kRandom, kSkewed, kNone };

Problem make_problem(std::mt19937& rng, int R, DType dtype, Routing routing, int fixed_T = -1) {
  Problem p;
  p.R = R;
  p.E = R * uniform(rng, 1, 4);
  p.K = uniform(rng, 1, std::min(8, p.E + 1));
  p.hidden = dtype == DType::kBF16 ? 8 * uniform(rng, 1, 4) : 16 * uniform(rng, 1, 12);
  p.options.dtype = dtype;
  p.options.hidden = p.hidden;
  p.options.num_topk = p.K;
  p.options.num_experts = p.E;
  p.options.expert_alignment = uniform(rng, 1, 4);
  p.inputs.resize(R);
  for (int r = 0; r < R; ++r) {
    NormalInput& in = p.inputs[r];
    in.num_tokens = fixed_T >= 0 ? fixed_T : uniform(rng, 0, 40);
    const int T = in.num_tokens;
    if (dtype == DType::kBF16) {
      in.x = as_bytes(random_small_bf16(rng, static_cast<size_t>(T) * p.hidden));
    } else {
      for (int i = 0; i < T * p.hidden; ++i) in.x.push_back(static_cast<uint8_t>(rng()));
      for (int i = 0; i < T * ((p.hidden + 127) / 128); ++i)
        in.scales.push_back(static_cast<float>(rng() % 1000) / 7.0f);
    }
    if (routing == Routing::kSkewed) {
      in.topk_idx.assign(static_cast<size_t>(T) * p.K, -1);
      for (int t = 0; t < T; ++t) in.topk_idx[static_cast<size_t>(t) * p.K + uniform(rng, 0, p.K - 1)] = p.E - 1;
    } else {
      in.topk_idx = random_topk(rng, T, p.K, p.E, 0.1);
    }
    in.topk_weights = random_weights(rng, in.topk_idx.size());
  }
  return p;
}

std::vector<Layout> layouts_of(const Problem& p) {
  std::vector<Layout> out;
  for (const auto& in : p.inputs) out.push_back(get_dispatch_layout(in.topk_idx, in.num_tokens, p.K, p.E, p.R, p.R));
  return out;
}

void check_dispatch_against_layout(const Problem& p, const std::vector<NormalDispatchOutput>& out) {
  const auto layouts = layouts_of(p);
  const int per_rank = p.E / p.R;
  for (int j = 0; j < p.R; ++j) {
    SCOPED_TRACE(::testing::Message() << "receiver " << j);
    const NormalDispatchOutput& o = out[j];
    int prefix = 0;
    for (int i = 0; i < p.R; ++i) {
      prefix += layouts[i].num_tokens_per_rank[j];
      EXPECT_EQ(o.handle.rank_prefix_matrix[i * p.R + j], prefix);
    }
    EXPECT_EQ(o.handle.num_recv, prefix);
    for (int e = 0; e < per_rank; ++e) {
      int total = 0;
      for (const auto& l : layouts) total += l.num_tokens_per_expert[j * per_rank + e];
      const int a = p.options.expert_alignment;
      EXPECT_EQ(o.num_recv_tokens_per_expert[e], (total + a - 1) / a * a);
    }
    // Every row: the source token's bytes, its local ids and weights; rows in canonical order.
    const size_t row_bytes = p.hidden * dtype_size(p.options.dtype);
    const int sc = p.options.dtype == DType::kFP8E4M3 ? (p.hidden + 127) / 128 : 0;
    for (int row = 0; row < o.handle.num_recv; ++row) {
      const int i = o.handle.recv_src_rank[row], t = o.handle.recv_src_idx[row];
      if (row > 0) {
        const int pi = o.handle.recv_src_rank[row - 1], pt = o.handle.recv_src_idx[row - 1];
        ASSERT_TRUE(pi < i || (pi == i && pt < t)) << "row " << row << " out of order";
      }
      const NormalInput& in = p.inputs[i];
      ASSERT_TRUE(std::equal(in.x.begin() + t * row_bytes, in.x.begin() + (t + 1) * row_bytes,
                             o.recv_x.begin() + row * row_bytes));
      ASSERT_TRUE(
          std::equal(in.scales.begin() + t * sc, in.scales.begin() + (t + 1) * sc, o.recv_scales.begin() + row * sc));
      for (int k = 0; k < p.K; ++k) {
        const int64_t e = in.topk_idx[t * p.K + k];
        const bool local = e >= int64_t{j} * per_rank && e < int64_t{j + 1} * per_rank;
        ASSERT_EQ(o.recv_topk_idx[row * p.K + k], local ? e - j * per_rank : -1);
        ASSERT_EQ(o.recv_topk_weights[row * p.K + k], local ? in.topk_weights[t * p.K + k] : 0.0f);
      }
    }
  }
}

std::vector<CombineInput> identity_combine_inputs(const Problem& p, const std::vector<NormalDispatchOutput>& out,
                                                  std::mt19937& rng, bool with_bias) {
  std::vector<CombineInput> in(p.R);
  for (int j = 0; j < p.R; ++j) {
    in[j].x = as_bf16(out[j].recv_x);
    in[j].topk_weights = out[j].recv_topk_weights;
    if (with_bias) {
      in[j].bias0 = random_small_bf16(rng, static_cast<size_t>(p.inputs[j].num_tokens) * p.hidden, 4);
      in[j].bias1 = random_small_bf16(rng, static_cast<size_t>(p.inputs[j].num_tokens) * p.hidden, 4);
    }
  }
  return in;
}

void check_combine_inverts_dispatch(const Problem& p, const std::vector<CombineInput>& cin,
                                    const std::vector<CombineOutput>& out) {
  const auto layouts = layouts_of(p);
  for (int i = 0; i < p.R; ++i) {
    const NormalInput& in = p.inputs[i];
    const auto x = as_bf16(in.x);
    for (int t = 0; t < in.num_tokens; ++t) {
      int copies = 0;
      for (int j = 0; j < p.R; ++j) copies += layouts[i].is_token_in_rank[t * p.R + j];
      for (int c = 0; c < p.hidden; ++c) {
        const size_t n = static_cast<size_t>(t) * p.hidden + c;
        float want = 0.0f;  // +0 for a token that went nowhere; small integers keep the rest exact
        for (int copy = 0; copy < copies; ++copy) want += bf16_to_float(x[n]);
        if (!cin[i].bias0.empty()) want = want + bf16_to_float(cin[i].bias0[n]) + bf16_to_float(cin[i].bias1[n]);
        ASSERT_EQ(out[i].combined_x[n], bf16(want)) << "rank " << i << " token " << t << " channel " << c;
      }
      // Every chosen expert's rank got the token, so each weight comes back exactly once.
      for (int k = 0; k < p.K; ++k) {
        const size_t n = static_cast<size_t>(t) * p.K + k;
        ASSERT_EQ(out[i].combined_topk_weights[n], in.topk_idx[n] >= 0 ? in.topk_weights[n] : 0.0f);
      }
    }
  }
}

void expect_same(const NormalDispatchOutput& a, const NormalDispatchOutput& b) {
  EXPECT_EQ(a.num_rows, b.num_rows);
  EXPECT_EQ(a.recv_x, b.recv_x);
  EXPECT_EQ(a.recv_scales, b.recv_scales);
  EXPECT_EQ(a.recv_topk_idx, b.recv_topk_idx);
  EXPECT_EQ(a.recv_topk_weights, b.recv_topk_weights);
  EXPECT_EQ(a.num_recv_tokens_per_expert, b.num_recv_tokens_per_expert);
  EXPECT_EQ(a.handle.rank_prefix_matrix, b.handle.rank_prefix_matrix);
  EXPECT_EQ(a.handle.recv_src_idx, b.handle.recv_src_idx);
  EXPECT_EQ(a.handle.recv_src_rank, b.handle.recv_src_rank);
  EXPECT_EQ(a.handle.is_token_in_rank, b.handle.is_token_in_rank);
  EXPECT_EQ(a.handle.num_recv, b.handle.num_recv);
  EXPECT_EQ(a.handle.num_tokens, b.handle.num_tokens);
}

// Runs dispatch, cached dispatch and combine on a HostCluster and compares with the all-ranks calls.
void check_host_cluster(const Problem& p, const std::vector<CombineInput>& cin) {
  const auto want = normal_dispatch(p.inputs, p.options);
  std::vector<NormalHandle> handles;
  for (const auto& o : want) handles.push_back(o.handle);
  std::vector<NormalInput> bare(p.R);  // cached dispatch: x and scales only
  for (int r = 0; r < p.R; ++r)
    bare[r].num_tokens = p.inputs[r].num_tokens, bare[r].x = p.inputs[r].x, bare[r].scales = p.inputs[r].scales;
  const auto want_cached = normal_cached_dispatch(bare, handles, p.options);
  const auto want_combined = normal_combine(cin, handles, p.hidden, p.K);

  std::vector<NormalDispatchOutput> got(p.R), got_cached(p.R);
  std::vector<CombineOutput> got_combined(p.R);
  HostCluster cluster(p.R, p.R);
  cluster.run([&](int rank) {
    got[rank] = cluster.dispatch(rank, p.inputs[rank], p.options);
    got_cached[rank] = cluster.cached_dispatch(rank, bare[rank], got[rank].handle, p.options);
    got_combined[rank] = cluster.combine(rank, cin[rank], got[rank].handle, p.hidden, p.K);
  });
  for (int r = 0; r < p.R; ++r) {
    SCOPED_TRACE(::testing::Message() << "rank " << r);
    expect_same(got[r], want[r]);
    expect_same(got_cached[r], want_cached[r]);
    EXPECT_EQ(got_combined[r].combined_x, want_combined[r].combined_x);
    EXPECT_EQ(got_combined[r].combined_topk_weights, want_combined[r].combined_topk_weights);
  }
}

class NormalRandom : public ::testing::TestWithParam<int> {};

TEST_P(NormalRandom, DispatchCombineRoundTrip) {
  EPCOMM_SEEDED_RNG(rng);
  const int R = GetParam();
  for (Routing routing : {Routing::kRandom, Routing::kSkewed}) {
    for (int fixed_T : {-1, 0, 1}) {
      for (int trial = 0; trial < 3; ++trial) {
        const Problem p = make_problem(rng, R, DType::kBF16, routing, fixed_T);
        SCOPED_TRACE(::testing::Message() << "E=" << p.E << " K=" << p.K << " hidden=" << p.hidden << " T=" << fixed_T
                                          << " skewed=" << (routing == Routing::kSkewed));
        const auto out = normal_dispatch(p.inputs, p.options);
        check_dispatch_against_layout(p, out);
        std::vector<NormalHandle> handles;
        for (const auto& o : out) handles.push_back(o.handle);
        const auto cin = identity_combine_inputs(p, out, rng, trial == 1);
        check_combine_inverts_dispatch(p, cin, normal_combine(cin, handles, p.hidden, p.K));
        check_host_cluster(p, cin);
      }
    }
  }
}

TEST_P(NormalRandom, Fp8DispatchAndCachedDispatch) {
  EPCOMM_SEEDED_RNG(rng);
  const int R = GetParam();
  for (int trial = 0; trial < 4; ++trial) {
    Problem p = make_problem(rng, R, DType::kFP8E4M3, trial == 3 ? Routing::kSkewed : Routing::kRandom);
    const auto out = normal_dispatch(p.inputs, p.options);
    check_dispatch_against_layout(p, out);
    // Cached dispatch of new bytes = full dispatch of the same bytes.
    std::vector<NormalHandle> handles;
    std::vector<NormalInput> fresh(R);
    for (int r = 0; r < R; ++r) {
      handles.push_back(out[r].handle);
      for (auto& b : p.inputs[r].x) b = static_cast<uint8_t>(rng());
      for (auto& s : p.inputs[r].scales) s = -s - 1.0f;
      fresh[r].num_tokens = p.inputs[r].num_tokens;
      fresh[r].x = p.inputs[r].x;
      fresh[r].scales = p.inputs[r].scales;
    }
    const auto cached = normal_cached_dispatch(fresh, handles, p.options);
    const auto full = normal_dispatch(p.inputs, p.options);
    for (int j = 0; j < R; ++j) {
      EXPECT_EQ(cached[j].recv_x, full[j].recv_x);
      EXPECT_EQ(cached[j].recv_scales, full[j].recv_scales);
    }
    check_host_cluster(p, identity_combine_inputs(
                              p,
                              [&] {
                                // Combine is BF16 only; give it BF16 rows of the received shape.
                                std::vector<NormalDispatchOutput> bf(R);
                                for (int j = 0; j < R; ++j) {
                                  bf[j] = full[j];
                                  bf[j].recv_x = as_bytes(
                                      random_small_bf16(rng, static_cast<size_t>(full[j].num_rows) * p.hidden));
                                }
                                return bf;
                              }(),
                              rng, true));
  }
}

TEST_P(NormalRandom, NumWorstTokensAndNoTopkMatchPlainDispatch) {
  EPCOMM_SEEDED_RNG(rng);
  const int R = GetParam();
  for (int trial = 0; trial < 4; ++trial) {
    Problem p = make_problem(rng, R, DType::kBF16, Routing::kRandom);
    const auto plain = normal_dispatch(p.inputs, p.options);
    int most = 0;
    for (const auto& o : plain) most = std::max(most, o.handle.num_recv);
    p.options.num_worst_tokens = most + uniform(rng, 0, 5) + (most == 0);
    const auto worst = normal_dispatch(p.inputs, p.options);
    for (int j = 0; j < R; ++j) {
      const size_t n = plain[j].recv_x.size();
      ASSERT_EQ(worst[j].num_rows, p.options.num_worst_tokens);
      EXPECT_TRUE(std::equal(plain[j].recv_x.begin(), plain[j].recv_x.end(), worst[j].recv_x.begin()));
      EXPECT_TRUE(std::all_of(worst[j].recv_x.begin() + n, worst[j].recv_x.end(), [](uint8_t b) { return b == 0; }));
      EXPECT_TRUE(std::all_of(worst[j].recv_topk_idx.begin() + plain[j].recv_topk_idx.size(),
                              worst[j].recv_topk_idx.end(), [](int64_t e) { return e == -1; }));
      EXPECT_EQ(worst[j].num_recv_tokens_per_expert, plain[j].num_recv_tokens_per_expert);
    }
    // The same routing without topk gives the same rows.
    const auto layouts = layouts_of(p);
    Problem bare = p;
    bare.options.num_topk = 0;
    bare.options.num_worst_tokens = 0;
    for (int r = 0; r < R; ++r) {
      bare.inputs[r].topk_idx.clear();
      bare.inputs[r].topk_weights.clear();
      bare.inputs[r].is_token_in_rank = layouts[r].is_token_in_rank;
    }
    const auto no_topk = normal_dispatch(bare.inputs, bare.options);
    for (int j = 0; j < R; ++j) {
      EXPECT_EQ(no_topk[j].recv_x, plain[j].recv_x);
      EXPECT_EQ(no_topk[j].handle.recv_src_idx, plain[j].handle.recv_src_idx);
      EXPECT_TRUE(no_topk[j].recv_topk_idx.empty());
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Ranks, NormalRandom, ::testing::Values(1, 2, 3, 4, 8),
                         [](const auto& info) { return "R" + std::to_string(info.param); });

}  // namespace
}  // namespace epcomm::ref
