// The CPU reference at production scale (issue 21: LL up to 320 ranks, normal mode up to 128 and
// beyond, hierarchical over many nodes, 1 to 72 ranks per node), against the per-token definition
// of docs/contract.md §3 written out again here, token by token, without the reference's layout or
// handle: every expected value below comes from topk_idx, x and the weights only.
//
// Inputs are fresh random (seed printed on failure; EPCOMM_TEST_SEED replays one): skewed routing
// (hot ranks, a hot node, one expert everybody picks), dropped slots (topk_idx = -1), tokens that
// go nowhere, ranks with no tokens and ranks at Tmax. Shapes are small (T <= 8, hidden 16..128) so
// the whole file stays well under a minute on two cores.
//
// Normal mode across nodes has one more check: a model of the hierarchical path (each token
// crosses the network once per destination node to the forwarder with the source's local index,
// which fans it out over NVLink; combine sums inside the node first, then once per node at the
// origin) gives the reference's rows exactly and its combine within BF16 rounding (exactly where
// every sum is exact). That is the tolerance the GPU internode tests use; here it holds at 40 nodes.
// This file: normal mode; low-latency mode and HostCluster: test_scale_low_latency.cpp; the inputs:
// scale_problems.hpp.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>

#include "cpu/scale_problems.hpp"

namespace epcomm::ref {
namespace {

using namespace testing_util;
using namespace scale;

void check_layout(const NormalProblem& p) {
  const int per_rank = p.E / p.R, nodes = p.R / p.P;
  for (int i = 0; i < p.R; ++i) {
    const NormalInput& in = p.inputs[i];
    const Layout l = get_dispatch_layout(in.topk_idx, in.num_tokens, p.K, p.E, p.R, p.P);
    std::vector<int32_t> per_rank_count(p.R, 0), per_node(nodes, 0), per_expert(p.E, 0);
    std::vector<uint8_t> in_rank(static_cast<size_t>(in.num_tokens) * p.R, 0);
    for (int t = 0; t < in.num_tokens; ++t) {
      const int64_t* row = &in.topk_idx[static_cast<size_t>(t) * p.K];
      for (int k = 0; k < p.K; ++k)
        if (row[k] >= 0) ++per_expert[row[k]];
      int last_node = -1;
      for (int d : destinations(row, p.K, per_rank)) {
        ++per_rank_count[d];
        in_rank[static_cast<size_t>(t) * p.R + d] = 1;
        if (d / p.P != last_node) ++per_node[d / p.P], last_node = d / p.P;  // d ascending
      }
    }
    ASSERT_EQ(l.num_tokens_per_rank, per_rank_count) << "rank " << i;
    ASSERT_EQ(l.num_tokens_per_expert, per_expert) << "rank " << i;
    ASSERT_EQ(l.is_token_in_rank, in_rank) << "rank " << i;
    if (nodes > 1) ASSERT_EQ(l.num_tokens_per_node, per_node) << "rank " << i;
    else ASSERT_TRUE(l.num_tokens_per_node.empty());
  }
}

// Dispatch against the definition: receiver j gets, for source i ascending and token t ascending,
// every token with an expert on j, once; its local ids and weights; the prefix matrix; the
// per-expert totals rounded up to expert_alignment.
void check_normal_dispatch(const NormalProblem& p, const std::vector<NormalDispatchOutput>& out) {
  const int R = p.R, K = p.K, per_rank = p.E / R;
  const size_t rb = static_cast<size_t>(p.hidden) * dtype_size(p.options.dtype);
  const int sc = p.options.dtype == DType::kFP8E4M3 ? p.hidden / 128 : 0;
  // rows[j]: (source, token) pairs in order; expert totals.
  std::vector<std::vector<std::pair<int, int>>> rows(R);
  std::vector<int64_t> expert_total(p.E, 0);
  std::vector<int32_t> sent(static_cast<size_t>(R) * R, 0);  // [i][j]
  for (int i = 0; i < R; ++i) {
    const NormalInput& in = p.inputs[i];
    for (int t = 0; t < in.num_tokens; ++t) {
      const int64_t* row = &in.topk_idx[static_cast<size_t>(t) * K];
      for (int k = 0; k < K; ++k)
        if (row[k] >= 0) ++expert_total[row[k]];
      for (int j : destinations(row, K, per_rank)) rows[j].push_back({i, t}), ++sent[static_cast<size_t>(i) * R + j];
    }
  }
  for (int j = 0; j < R; ++j) {
    SCOPED_TRACE(::testing::Message() << "receiver " << j);
    const NormalDispatchOutput& o = out[j];
    ASSERT_EQ(o.handle.num_recv, static_cast<int>(rows[j].size()));
    ASSERT_EQ(o.num_rows, o.handle.num_recv);
    int32_t prefix = 0;
    for (int i = 0; i < R; ++i) {
      prefix += sent[static_cast<size_t>(i) * R + j];
      ASSERT_EQ(o.handle.rank_prefix_matrix[static_cast<size_t>(i) * R + j], prefix) << "source " << i;
    }
    for (size_t row = 0; row < rows[j].size(); ++row) {
      const auto [i, t] = rows[j][row];
      ASSERT_EQ(o.handle.recv_src_rank[row], i) << "row " << row;
      ASSERT_EQ(o.handle.recv_src_idx[row], t) << "row " << row;
      const NormalInput& in = p.inputs[i];
      ASSERT_TRUE(std::equal(in.x.begin() + t * rb, in.x.begin() + (t + 1) * rb, o.recv_x.begin() + row * rb))
          << "row " << row << " (source " << i << ", token " << t << ")";
      for (int s = 0; s < sc; ++s)
        ASSERT_EQ(bits(o.recv_scales[row * sc + s]), bits(in.scales[static_cast<size_t>(t) * sc + s]));
      for (int k = 0; k < K; ++k) {
        const int64_t e = in.topk_idx[static_cast<size_t>(t) * K + k];
        const bool local = e >= 0 && e / per_rank == j;
        ASSERT_EQ(o.recv_topk_idx[row * K + k], local ? e - int64_t{j} * per_rank : -1);
        ASSERT_EQ(o.recv_topk_weights[row * K + k], local ? in.topk_weights[static_cast<size_t>(t) * K + k] : 0.0f);
      }
    }
    const int a = p.options.expert_alignment;
    for (int e = 0; e < per_rank; ++e) {
      const int64_t total = expert_total[static_cast<size_t>(j) * per_rank + e];
      ASSERT_EQ(o.num_recv_tokens_per_expert[e], (total + a - 1) / a * a) << "local expert " << e;
    }
  }
}

// The row rank j returned for token t of rank i, as the test made it (no handle needed). Exact
// mode: a small integer (every sum exact). Otherwise the token's first destination returns +L and
// its last -L (L about 2^20..2^24, float32 steps of 1/8..2 there) and the others values of 2^-6..2^8
// with 8 significant bits: their sum cancels, and which bits of the small values survive depends on
// the order of the float32 additions, so a node-by-node sum can differ from the reference's.

// Combine against the definition: out[t] = sum over the destination ranks of t of their row, plus
// the biases, in float32, rounded once; weights come back whole. Exact here (small integers).
void check_normal_combine(const NormalProblem& p, const std::vector<CombineInput>& cin,
                          const std::vector<CombineOutput>& out) {
  const int R = p.R, K = p.K, H = p.hidden, per_rank = p.E / R;
  for (int i = 0; i < R; ++i) {
    const NormalInput& in = p.inputs[i];
    ASSERT_EQ(out[i].combined_x.size(), static_cast<size_t>(in.num_tokens) * H) << "rank " << i;
    for (int t = 0; t < in.num_tokens; ++t) {
      const int64_t* row = &in.topk_idx[static_cast<size_t>(t) * K];
      const std::vector<int> dest = destinations(row, K, per_rank);
      for (int c = 0; c < H; ++c) {
        const size_t n = static_cast<size_t>(t) * H + c;
        float want = 0.0f;
        for (int j : dest) want += expert_row(p, false, j, i, t, c);
        if (!cin[i].bias0.empty()) want += bf16_to_float(cin[i].bias0[n]) + bf16_to_float(cin[i].bias1[n]);
        ASSERT_EQ(out[i].combined_x[n], bf16(want)) << "rank " << i << " token " << t << " channel " << c;
      }
      for (int k = 0; k < K; ++k)
        ASSERT_EQ(out[i].combined_topk_weights[static_cast<size_t>(t) * K + k],
                  row[k] >= 0 ? in.topk_weights[static_cast<size_t>(t) * K + k] : 0.0f);
    }
  }
}

// ---- the hierarchical path, as a model ----

// What the hierarchical dispatch moves: source i = (n, l) puts token t once to the forwarder
// (m, l) of every other destination node m; the forwarder (or, for the own node, the source
// itself) hands it to each destination rank of its node. Receivers then order rows by (source,
// token), as the contract fixes.
struct HierarchicalDispatch {
  std::vector<std::vector<std::pair<int, int>>> rows;  // [receiver]: (source, token) in order
  std::vector<uint64_t> net_rows;                      // [source]: rows it puts over the network
  std::vector<uint64_t> forwarded_rows;                // [forwarder]: rows it receives from other nodes
  std::vector<uint64_t> max_from_one_source;           // [forwarder]: most rows from one source
};

HierarchicalDispatch model_hierarchical_dispatch(const NormalProblem& p) {
  const int R = p.R, P = p.P, N = R / P, K = p.K, per_rank = p.E / R;
  HierarchicalDispatch h;
  h.rows.resize(R);
  h.net_rows.assign(R, 0);
  h.forwarded_rows.assign(R, 0);
  h.max_from_one_source.assign(R, 0);
  // Per forwarder, per source: the tokens it holds and the local ranks (bits) each goes to.
  struct Held {
    int token;
    std::vector<int> locals;
  };
  std::vector<std::vector<std::vector<Held>>> held(R, std::vector<std::vector<Held>>(R));  // [forwarder][source]
  for (int i = 0; i < R; ++i) {
    const int n = i / P, l = i % P;
    for (int t = 0; t < p.inputs[i].num_tokens; ++t) {
      std::vector<std::vector<int>> per_node(N);  // the two-level mask: node, then local rank
      for (int d : destinations(&p.inputs[i].topk_idx[static_cast<size_t>(t) * K], K, per_rank))
        per_node[d / P].push_back(d % P);
      for (int m = 0; m < N; ++m) {
        if (per_node[m].empty()) continue;
        const int forwarder = m == n ? i : m * P + l;
        if (m != n) ++h.net_rows[i], ++h.forwarded_rows[forwarder];
        held[forwarder][i].push_back({t, per_node[m]});
      }
    }
  }
  for (int f = 0; f < R; ++f)
    for (int i = 0; i < R; ++i) {
      if (i / P != f / P) h.max_from_one_source[f] = std::max<uint64_t>(h.max_from_one_source[f], held[f][i].size());
      for (const Held& x : held[f][i])
        for (int d : x.locals) h.rows[(f / P) * P + d].push_back({i, x.token});
    }
  for (auto& r : h.rows) std::sort(r.begin(), r.end());
  return h;
}

// Hierarchical combine: forwarder (m, l) sums, in float32, the rows its node's ranks return for a
// token of origin (n, l), ascending local rank; the origin adds the node partials ascending node,
// then bias0, bias1, and rounds once (docs/design-internode.md "Combine mirrors it"). With
// `bf16_partials` (BufferOptions::internode_bf16_partials) each node partial is rounded to BF16
// before the origin adds it.
std::vector<std::vector<uint16_t>> model_hierarchical_combine(const NormalProblem& p,
                                                              const std::vector<CombineInput>& cin, bool real,
                                                              bool bf16_partials = false) {
  const int R = p.R, P = p.P, N = R / P, K = p.K, H = p.hidden, per_rank = p.E / R;
  std::vector<std::vector<uint16_t>> out(R);
  std::vector<float> partial(H), acc(H);
  for (int i = 0; i < R; ++i) {
    const NormalInput& in = p.inputs[i];
    out[i].resize(static_cast<size_t>(in.num_tokens) * H);
    for (int t = 0; t < in.num_tokens; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      const std::vector<int> dest = destinations(&in.topk_idx[static_cast<size_t>(t) * K], K, per_rank);
      for (int m = 0; m < N; ++m) {
        std::fill(partial.begin(), partial.end(), 0.0f);
        bool any = false;
        for (int j : dest) {
          if (j / P != m) continue;
          any = true;
          for (int c = 0; c < H; ++c) partial[c] += expert_row(p, real, j, i, t, c);
        }
        if (any)
          for (int c = 0; c < H; ++c) acc[c] += bf16_partials ? bf16_to_float(bf16(partial[c])) : partial[c];
      }
      for (int c = 0; c < H; ++c) {
        const size_t n = static_cast<size_t>(t) * H + c;
        float v = acc[c];
        if (!cin[i].bias0.empty()) v += bf16_to_float(cin[i].bias0[n]);
        if (!cin[i].bias1.empty()) v += bf16_to_float(cin[i].bias1[n]);
        out[i][n] = bf16(v);
      }
    }
  }
  return out;
}

// |a - b| within one BF16 unit of the larger, plus float32 reordering of `terms` summands whose
// magnitudes add up to `abs_sum`.
bool within_bf16_rounding(uint16_t a, uint16_t b, int terms, float abs_sum) {
  const float fa = bf16_to_float(a), fb = bf16_to_float(b);
  const float big = std::max(std::fabs(fa), std::fabs(fb));
  int exp = 0;
  std::frexp(big, &exp);
  const float ulp = big > 0 ? std::ldexp(1.0f, exp - 8) : 0.0f;  // BF16: 8 significant bits
  return std::fabs(fa - fb) <= ulp + terms * abs_sum * 0x1p-23f + 1e-30f;
}

class ScaleNormal : public ::testing::TestWithParam<NormalCase> {};

TEST_P(ScaleNormal, DispatchCombineAgainstPerTokenDefinition) {
  EPCOMM_SEEDED_RNG(rng);
  const NormalCase c = GetParam();
  const auto start = std::chrono::steady_clock::now();
  const NormalProblem p = make_normal(rng, c);
  SCOPED_TRACE(::testing::Message() << name_of(c) << " E=" << p.E << " K=" << p.K << " hidden=" << p.hidden
                                    << " alignment=" << p.options.expert_alignment);
  check_layout(p);
  const auto out = normal_dispatch(p.inputs, p.options);
  check_normal_dispatch(p, out);

  std::vector<NormalHandle> handles;
  for (const auto& o : out) handles.push_back(o.handle);
  // Cached dispatch of new bytes: the rows of a full dispatch of those bytes.
  std::vector<NormalInput> fresh(p.R);
  NormalProblem again = p;
  for (int r = 0; r < p.R; ++r) {
    for (auto& b : again.inputs[r].x) b = static_cast<uint8_t>(b ^ 0x5a);
    fresh[r].num_tokens = p.inputs[r].num_tokens;
    fresh[r].x = again.inputs[r].x;
    fresh[r].scales = again.inputs[r].scales;
  }
  const auto cached = normal_cached_dispatch(fresh, handles, p.options);
  const auto full = normal_dispatch(again.inputs, p.options);
  for (int j = 0; j < p.R; ++j) ASSERT_EQ(cached[j].recv_x, full[j].recv_x) << "receiver " << j;

  const auto cin = expert_outputs(p, out, rng, false, true);
  check_normal_combine(p, cin, normal_combine(cin, handles, p.hidden, p.K));
  std::printf("[ scale    ] normal %s: %.2f s\n", name_of(c).c_str(), seconds_since(start));
}

TEST_P(ScaleNormal, HierarchicalModelMatchesReference) {
  const NormalCase c = GetParam();
  if (c.P == c.R) GTEST_SKIP() << "one node: no hierarchical path";
  EPCOMM_SEEDED_RNG(rng);
  const auto start = std::chrono::steady_clock::now();
  const NormalProblem p = make_normal(rng, c);
  SCOPED_TRACE(::testing::Message() << name_of(c) << " E=" << p.E << " K=" << p.K);
  const int R = p.R, P = p.P, N = R / P, per_rank = p.E / R;
  const auto out = normal_dispatch(p.inputs, p.options);
  std::vector<NormalHandle> handles;
  for (const auto& o : out) handles.push_back(o.handle);

  // Dispatch: the two-level routing delivers exactly the reference's rows, and each token
  // crosses the network once per other destination node (no more than N - 1 times).
  const HierarchicalDispatch h = model_hierarchical_dispatch(p);
  uint64_t net_total = 0;
  for (int j = 0; j < R; ++j) {
    ASSERT_EQ(static_cast<int>(h.rows[j].size()), out[j].handle.num_recv) << "receiver " << j;
    for (size_t row = 0; row < h.rows[j].size(); ++row) {
      ASSERT_EQ(h.rows[j][row].first, out[j].handle.recv_src_rank[row]) << "receiver " << j << " row " << row;
      ASSERT_EQ(h.rows[j][row].second, out[j].handle.recv_src_idx[row]) << "receiver " << j << " row " << row;
    }
  }
  for (int i = 0; i < R; ++i) {
    const Layout l = get_dispatch_layout(p.inputs[i].topk_idx, p.inputs[i].num_tokens, p.K, p.E, R, P);
    uint64_t want = 0;  // tokens x other destination nodes, from the layout's per-node counts
    for (int m = 0; m < N; ++m)
      if (m != i / P) want += static_cast<uint64_t>(l.num_tokens_per_node[m]);
    ASSERT_EQ(h.net_rows[i], want) << "source " << i;
    ASSERT_LE(h.net_rows[i], static_cast<uint64_t>(p.inputs[i].num_tokens) * (N - 1)) << "source " << i;
    // A forwarder holds, per source, at most that source's T rows: what a per-source ring bounds.
    ASSERT_LE(h.max_from_one_source[i], 8u) << "forwarder " << i;
    net_total += h.net_rows[i];
  }

  // Combine: node by node equals the reference exactly on small integers...
  const auto exact_in = expert_outputs(p, out, rng, false, true);
  const auto exact_ref = normal_combine(exact_in, handles, p.hidden, p.K);
  const auto exact_model = model_hierarchical_combine(p, exact_in, false);
  for (int i = 0; i < R; ++i) ASSERT_EQ(exact_model[i], exact_ref[i].combined_x) << "origin " << i;
  // ...and within BF16 rounding on values whose sums round. With BF16 partials: within 3 x 2^-8 of
  // the sum of the contributions' absolute values (a partial's rounding, the result's, the
  // reference's), the bound the GPU tests use (NormalRank::expect_combine_bf16_partials), here up
  // to the largest node counts.
  const auto real_in = expert_outputs(p, out, rng, true, false);
  const auto real_ref = normal_combine(real_in, handles, p.hidden, p.K);
  const auto real_model = model_hierarchical_combine(p, real_in, true);
  const auto bf16_model = model_hierarchical_combine(p, real_in, true, /*bf16_partials=*/true);
  int differ = 0, total = 0, bf16_differ = 0;
  for (int i = 0; i < R; ++i) {
    const NormalInput& in = p.inputs[i];
    for (int t = 0; t < in.num_tokens; ++t) {
      const auto dest = destinations(&in.topk_idx[static_cast<size_t>(t) * p.K], p.K, per_rank);
      for (int ch = 0; ch < p.hidden; ++ch) {
        const size_t n = static_cast<size_t>(t) * p.hidden + ch;
        float abs_sum = 0;
        for (int j : dest) abs_sum += std::fabs(expert_row(p, true, j, i, t, ch));
        const uint16_t a = real_model[i][n], b = real_ref[i].combined_x[n];
        ++total;
        differ += a != b;
        ASSERT_TRUE(within_bf16_rounding(a, b, static_cast<int>(dest.size()), abs_sum))
            << "origin " << i << " token " << t << " channel " << ch << ": node by node " << bf16_to_float(a)
            << ", reference " << bf16_to_float(b);
        double abs_all = 0;  // the BF16 partials' bound: the contributions and the biases, in double
        for (int j : dest) abs_all += std::fabs(expert_row(p, true, j, i, t, ch));
        for (const std::vector<uint16_t>* bias : {&real_in[i].bias0, &real_in[i].bias1})
          if (!bias->empty()) abs_all += std::fabs(bf16_to_float((*bias)[n]));
        const uint16_t c = bf16_model[i][n];
        bf16_differ += c != b;
        ASSERT_LE(std::fabs(double(bf16_to_float(c)) - bf16_to_float(b)), 3.0 * std::ldexp(abs_all, -8) + 1e-30)
            << "origin " << i << " token " << t << " channel " << ch << " (BF16 partials)";
      }
    }
  }
  std::printf(
      "[ scale    ] hierarchical %s: %d nodes, %llu network rows, %d of %d outputs differ by rounding (BF16 partials: "
      "%d), %.2f s\n",
      name_of(c).c_str(), N, static_cast<unsigned long long>(net_total), differ, total, bf16_differ,
      seconds_since(start));
}

INSTANTIATE_TEST_SUITE_P(
    Ranks, ScaleNormal,
    ::testing::Values(NormalCase{64, 64, DType::kBF16},     // one NVLink domain of 64
                      NormalCase{72, 72, DType::kFP8E4M3},  // NVL72
                      NormalCase{64, 8, DType::kBF16},      // 8 nodes x 8
                      NormalCase{128, 8, DType::kBF16},     // 16 nodes x 8: the normal-mode target
                      NormalCase{128, 8, DType::kFP8E4M3}, NormalCase{144, 72, DType::kBF16},  // 2 x NVL72
                      NormalCase{256, 8, DType::kBF16},                                        // 32 nodes x 8
                      NormalCase{320, 8, DType::kBF16},                                        // 40 nodes x 8
                      NormalCase{320, 1, DType::kBF16}),                                       // 320 nodes of one rank
    [](const auto& info) { return name_of(info.param); });

}  // namespace
}  // namespace epcomm::ref
