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
#include <chrono>
#include <cmath>
#include <cstdio>
#include <numeric>

#include "cpu/test_reference_util.hpp"
#include "epcomm/host_cluster.hpp"

namespace epcomm::ref {
namespace {

using namespace testing_util;

// ---- routing with skew and dropped slots ----

// [T, K] distinct expert ids per token (-1 = dropped slot). A third of the picks go to "hot"
// experts: those of rank 0, the last rank and every rank of one node, and expert E - 1, which
// about one token in five picks; one token in twenty drops every slot.
std::vector<int64_t> skewed_topk(std::mt19937& rng, int T, int K, int E, int R, int P, int hot_node) {
  const int per_rank = E / R;
  std::vector<int64_t> hot;
  for (int e = 0; e < per_rank; ++e) hot.push_back(e), hot.push_back(int64_t{R - 1} * per_rank + e);
  for (int d = 0; d < P; ++d)
    for (int e = 0; e < per_rank; ++e) hot.push_back(int64_t{hot_node * P + d} * per_rank + e);
  std::vector<int64_t> idx(static_cast<size_t>(T) * K, -1);
  std::bernoulli_distribution drop(0.15), drop_all(0.05), pick_hot(0.33), pick_last(0.2);
  for (int t = 0; t < T; ++t) {
    if (drop_all(rng)) continue;
    int64_t* row = &idx[static_cast<size_t>(t) * K];
    for (int k = 0; k < std::min(K, E); ++k) {
      if (drop(rng)) continue;
      for (;;) {  // distinct inside the token (K <= E / 2 keeps this short)
        const int64_t e = k == 0 && pick_last(rng) ? E - 1
                          : pick_hot(rng)          ? hot[uniform(rng, 0, static_cast<int>(hot.size()) - 1)]
                                                   : uniform(rng, 0, E - 1);
        if (std::find(row, row + k, e) == row + k) {
          row[k] = e;
          break;
        }
      }
    }
  }
  return idx;
}

// Token counts per rank: random in [0, Tmax], one rank with none and one (another) with Tmax.
std::vector<int> token_counts(std::mt19937& rng, int R, int Tmax) {
  std::vector<int> T(R);
  for (int& t : T) t = uniform(rng, 0, Tmax);
  const int empty = uniform(rng, 0, R - 1);
  T[empty] = 0;
  T[(empty + 1 + uniform(rng, 0, R - 2)) % R] = Tmax;
  return T;
}

// The destination ranks of one token, ascending, each once (docs/contract.md §3.2).
std::vector<int> destinations(const int64_t* row, int K, int per_rank) {
  std::vector<int> d;
  for (int k = 0; k < K; ++k)
    if (row[k] >= 0) d.push_back(static_cast<int>(row[k] / per_rank));
  std::sort(d.begin(), d.end());
  d.erase(std::unique(d.begin(), d.end()), d.end());
  return d;
}

// A value that depends on every index, so a row put in the wrong place shows: a small nonzero
// integer (sums of a few hundred stay exact in float32; BF16 holds integers up to 256 exactly).
float cell(uint64_t a, uint64_t b, uint64_t c, uint64_t d) {
  uint64_t h = a * 0x9e3779b97f4a7c15ull ^ (b + 0x632be59bd9b4e019ull) * 0xbf58476d1ce4e5b9ull ^
               (c + 0x8cb92ba72f3d8dd7ull) * 0x94d049bb133111ebull ^ (d + 1) * 0x2545f4914f6cdd1dull;
  h ^= h >> 31;
  const int v = static_cast<int>(h % 7) - 3;
  return static_cast<float>(v == 0 ? 4 : v);
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// ---- normal mode ----

struct NormalCase {
  int R, P;  // ranks, ranks per node (P = R: one node)
  DType dtype;
};

std::string name_of(const NormalCase& c) {
  return "R" + std::to_string(c.R) + "_P" + std::to_string(c.P) + (c.dtype == DType::kBF16 ? "_bf16" : "_fp8");
}

struct NormalProblem {
  int R = 0, P = 0, E = 0, K = 0, hidden = 0;
  NormalOptions options;
  std::vector<NormalInput> inputs;
  std::vector<std::vector<std::pair<int, int>>> first_last;  // [rank][token]: first, last destination
};

NormalProblem make_normal(std::mt19937& rng, const NormalCase& c) {
  NormalProblem p;
  p.R = c.R, p.P = c.P;
  p.E = c.R * (c.R <= 128 ? 2 : 1);
  p.K = std::min(8, p.E / 2);
  p.hidden = c.dtype == DType::kBF16 ? 16 : 128;
  p.options.dtype = c.dtype;
  p.options.hidden = p.hidden;
  p.options.num_topk = p.K;
  p.options.num_experts = p.E;
  p.options.expert_alignment = uniform(rng, 1, 4);
  const int hot_node = uniform(rng, 0, c.R / c.P - 1);
  const std::vector<int> T = token_counts(rng, c.R, 8);
  p.inputs.resize(c.R);
  for (int r = 0; r < c.R; ++r) {
    NormalInput& in = p.inputs[r];
    in.num_tokens = T[r];
    const size_t n = static_cast<size_t>(T[r]) * p.hidden;
    if (c.dtype == DType::kBF16) {
      in.x = as_bytes(random_small_bf16(rng, n));
    } else {
      in.x.resize(n);
      for (auto& b : in.x) b = static_cast<uint8_t>(rng());
      in.scales.resize(static_cast<size_t>(T[r]) * (p.hidden / 128));
      for (auto& s : in.scales) s = static_cast<float>(rng() % 4096) / 64.0f;
    }
    in.topk_idx = skewed_topk(rng, T[r], p.K, p.E, c.R, c.P, hot_node);
    in.topk_weights = random_weights(rng, in.topk_idx.size());
  }
  p.first_last.resize(c.R);
  for (int r = 0; r < c.R; ++r)
    for (int t = 0; t < T[r]; ++t) {
      const auto d = destinations(&p.inputs[r].topk_idx[static_cast<size_t>(t) * p.K], p.K, p.E / c.R);
      p.first_last[r].push_back(d.empty() ? std::pair{-1, -1} : std::pair{d.front(), d.back()});
    }
  return p;
}

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
float expert_row(const NormalProblem& p, bool real, int j, int i, int t, int c) {
  const float v = cell(j, i, t, c);
  if (!real) return v;
  const auto [first, last] = p.first_last[i][t];
  if (first != last && (j == first || j == last)) {
    const float big = std::ldexp(1.0f + (cell(i, t, c, 5) + 3) / 8.0f, 20 + static_cast<int>(cell(c, t, i, 7) + 3) / 2);
    return bf16_to_float(bf16(j == first ? big : -big));
  }
  const int exponent = static_cast<int>(cell(c, j, t, 9) + cell(t, c, i, 3)) - 2;  // in [-8, 6]
  return bf16_to_float(bf16(std::ldexp(v * (1.0f + cell(i, t, c, j) / 11.0f), exponent)));
}

// Expert outputs: rank j's row for (source i, token t) is expert_row(real, j, i, t, c), placed
// through the handle's row list; the checks recompute it from (j, i, t, c) alone.
std::vector<CombineInput> expert_outputs(const NormalProblem& p, const std::vector<NormalDispatchOutput>& out,
                                         std::mt19937& rng, bool real, bool with_bias) {
  std::vector<CombineInput> cin(p.R);
  for (int j = 0; j < p.R; ++j) {
    const NormalHandle& h = out[j].handle;
    cin[j].x.resize(static_cast<size_t>(h.num_recv) * p.hidden);
    for (int row = 0; row < h.num_recv; ++row)
      for (int c = 0; c < p.hidden; ++c) {
        cin[j].x[static_cast<size_t>(row) * p.hidden + c] =
            bf16(expert_row(p, real, j, h.recv_src_rank[row], h.recv_src_idx[row], c));
      }
    cin[j].topk_weights = out[j].recv_topk_weights;
    if (with_bias) {
      cin[j].bias0 = random_small_bf16(rng, static_cast<size_t>(p.inputs[j].num_tokens) * p.hidden, 4);
      cin[j].bias1 = random_small_bf16(rng, static_cast<size_t>(p.inputs[j].num_tokens) * p.hidden, 4);
    }
  }
  return cin;
}

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
// then bias0, bias1, and rounds once (docs/design-internode.md "Combine mirrors it").
std::vector<std::vector<uint16_t>> model_hierarchical_combine(const NormalProblem& p,
                                                              const std::vector<CombineInput>& cin, bool real) {
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
          for (int c = 0; c < H; ++c) acc[c] += partial[c];
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
  // ...and within BF16 rounding on values whose sums round.
  const auto real_in = expert_outputs(p, out, rng, true, false);
  const auto real_ref = normal_combine(real_in, handles, p.hidden, p.K);
  const auto real_model = model_hierarchical_combine(p, real_in, true);
  int differ = 0, total = 0;
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
      }
    }
  }
  std::
      printf("[ scale    ] hierarchical %s: %d nodes, %llu network rows, %d of %d outputs differ by rounding, %.2f s\n",
             name_of(c).c_str(), N, static_cast<unsigned long long>(net_total), differ, total, seconds_since(start));
}

INSTANTIATE_TEST_SUITE_P(
    Ranks, ScaleNormal,
    ::testing::Values(NormalCase{64, 64, DType::kBF16},     // one NVLink domain of 64
                      NormalCase{72, 72, DType::kFP8E4M3},  // NVL72
                      NormalCase{64, 8, DType::kBF16},      // 8 nodes x 8
                      NormalCase{128, 8, DType::kBF16},     // 16 nodes x 8: the issue's normal-mode target
                      NormalCase{128, 8, DType::kFP8E4M3}, NormalCase{144, 72, DType::kBF16},  // 2 x NVL72
                      NormalCase{256, 8, DType::kBF16},                                        // 32 nodes x 8
                      NormalCase{320, 8, DType::kBF16},                                        // 40 nodes x 8
                      NormalCase{320, 1, DType::kBF16}),                                       // 320 nodes of one rank
    [](const auto& info) { return name_of(info.param); });

// ---- low-latency mode ----

struct LowLatencyCase {
  int R;
  bool use_fp8, ue8m0;
};

std::string name_of(const LowLatencyCase& c) {
  return "R" + std::to_string(c.R) + (c.use_fp8 ? (c.ue8m0 ? "_fp8_ue8m0" : "_fp8") : "_bf16");
}

struct LowLatencyProblem {
  int R = 0;
  LowLatencyOptions o;
  std::vector<LowLatencyDispatchInput> inputs;
  std::vector<std::vector<float>> weights;
};

LowLatencyProblem make_low_latency(std::mt19937& rng, const LowLatencyCase& c) {
  LowLatencyProblem p;
  p.R = c.R;
  p.o.num_experts = c.R * (c.R <= 128 ? 2 : 1);
  p.o.num_topk = 8;
  p.o.num_max_dispatch_tokens_per_rank = 6;
  p.o.hidden = 128;
  p.o.use_fp8 = c.use_fp8;
  p.o.round_scale = c.ue8m0 || (c.use_fp8 && rng() % 2);
  p.o.use_ue8m0 = c.ue8m0;
  const int P = 8, hot_node = uniform(rng, 0, c.R / P - 1);
  const std::vector<int> T = token_counts(rng, c.R, p.o.num_max_dispatch_tokens_per_rank);
  p.inputs.resize(c.R);
  p.weights.resize(c.R);
  for (int r = 0; r < c.R; ++r) {
    auto& in = p.inputs[r];
    in.num_tokens = T[r];
    in.x = random_bf16(rng, static_cast<size_t>(T[r]) * p.o.hidden, 3.0f);
    in.topk_idx = skewed_topk(rng, T[r], p.o.num_topk, p.o.num_experts, c.R, P, hot_node);
    p.weights[r] = random_weights(rng, in.topk_idx.size());
  }
  return p;
}

// The value of rank r's expert e at (source i, token t, channel c): what a test expert returns.
float expert_value(int64_t e, int i, int t, int c) { return cell(e, i, t, c); }

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

// Expert outputs written into each rank's slots through its handle (src_info, layout_range).
std::vector<LowLatencyCombineInput> low_latency_expert_outputs(const LowLatencyProblem& p,
                                                               const std::vector<LowLatencyDispatchOutput>& out) {
  const int R = p.R, H = p.o.hidden, per_rank = p.o.num_experts / R;
  const size_t S = static_cast<size_t>(R) * p.o.num_max_dispatch_tokens_per_rank;
  std::vector<LowLatencyCombineInput> cin(R);
  for (int r = 0; r < R; ++r) {
    cin[r].num_tokens = p.inputs[r].num_tokens;
    cin[r].topk_idx = p.inputs[r].topk_idx;
    cin[r].topk_weights = p.weights[r];
    cin[r].y.assign(static_cast<size_t>(per_rank) * S * H, bf16(99.0f));  // unused slots: never read
    for (int le = 0; le < per_rank; ++le)
      for (int i = 0; i < R; ++i) {
        const int64_t range = out[r].layout_range[static_cast<size_t>(le) * R + i];
        for (int64_t s = range_begin(range); s < range_begin(range) + range_count(range); ++s) {
          const size_t slot = static_cast<size_t>(le) * S + s;
          for (int c = 0; c < H; ++c)
            cin[r].y[slot * H + c] = bf16(expert_value(int64_t{r} * per_rank + le, i, out[r].src_info[slot], c));
        }
      }
  }
  return cin;
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
