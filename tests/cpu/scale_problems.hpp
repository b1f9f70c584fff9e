// Problems of the CPU scale tests (test_scale_normal.cpp, test_scale_low_latency.cpp): skewed
// routing with dropped slots, the inputs of each mode at R ranks, and expert outputs that the checks
// recompute from (rank, source, token, channel) alone. What the tests check and why: their heads.
#pragma once

#include <chrono>
#include <cmath>
#include <cstdio>
#include <numeric>

#include "cpu/test_reference_util.hpp"
#include "epcomm/host_cluster.hpp"

namespace epcomm::ref::scale {

using namespace testing_util;

// ---- routing with skew and dropped slots ----

// [T, K] distinct expert ids per token (-1 = dropped slot). A third of the picks go to "hot"
// experts: those of rank 0, the last rank and every rank of one node, and expert E - 1, which
// about one token in five picks; one token in twenty drops every slot.
inline std::vector<int64_t> skewed_topk(std::mt19937& rng, int T, int K, int E, int R, int P, int hot_node) {
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
inline std::vector<int> token_counts(std::mt19937& rng, int R, int Tmax) {
  std::vector<int> T(R);
  for (int& t : T) t = uniform(rng, 0, Tmax);
  const int empty = uniform(rng, 0, R - 1);
  T[empty] = 0;
  T[(empty + 1 + uniform(rng, 0, R - 2)) % R] = Tmax;
  return T;
}

// The destination ranks of one token, ascending, each once (docs/contract.md §3.2).
inline std::vector<int> destinations(const int64_t* row, int K, int per_rank) {
  std::vector<int> d;
  for (int k = 0; k < K; ++k)
    if (row[k] >= 0) d.push_back(static_cast<int>(row[k] / per_rank));
  std::sort(d.begin(), d.end());
  d.erase(std::unique(d.begin(), d.end()), d.end());
  return d;
}

// A value that depends on every index, so a row put in the wrong place shows: a small nonzero
// integer (sums of a few hundred stay exact in float32; BF16 holds integers up to 256 exactly).
inline float cell(uint64_t a, uint64_t b, uint64_t c, uint64_t d) {
  uint64_t h = a * 0x9e3779b97f4a7c15ull ^ (b + 0x632be59bd9b4e019ull) * 0xbf58476d1ce4e5b9ull ^
               (c + 0x8cb92ba72f3d8dd7ull) * 0x94d049bb133111ebull ^ (d + 1) * 0x2545f4914f6cdd1dull;
  h ^= h >> 31;
  const int v = static_cast<int>(h % 7) - 3;
  return static_cast<float>(v == 0 ? 4 : v);
}

inline double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// ---- normal mode ----

struct NormalCase {
  int R, P;  // ranks, ranks per node (P = R: one node)
  DType dtype;
};

inline std::string name_of(const NormalCase& c) {
  return "R" + std::to_string(c.R) + "_P" + std::to_string(c.P) + (c.dtype == DType::kBF16 ? "_bf16" : "_fp8");
}

struct NormalProblem {
  int R = 0, P = 0, E = 0, K = 0, hidden = 0;
  NormalOptions options;
  std::vector<NormalInput> inputs;
  std::vector<std::vector<std::pair<int, int>>> first_last;  // [rank][token]: first, last destination
};

inline NormalProblem make_normal(std::mt19937& rng, const NormalCase& c) {
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

inline float expert_row(const NormalProblem& p, bool real, int j, int i, int t, int c) {
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
inline std::vector<CombineInput> expert_outputs(const NormalProblem& p, const std::vector<NormalDispatchOutput>& out,
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

// ---- low-latency mode ----

struct LowLatencyCase {
  int R;
  bool use_fp8, ue8m0;
};

inline std::string name_of(const LowLatencyCase& c) {
  return "R" + std::to_string(c.R) + (c.use_fp8 ? (c.ue8m0 ? "_fp8_ue8m0" : "_fp8") : "_bf16");
}

struct LowLatencyProblem {
  int R = 0;
  LowLatencyOptions o;
  std::vector<LowLatencyDispatchInput> inputs;
  std::vector<std::vector<float>> weights;
};

inline LowLatencyProblem make_low_latency(std::mt19937& rng, const LowLatencyCase& c) {
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
inline float expert_value(int64_t e, int i, int t, int c) { return cell(e, i, t, c); }

// Expert outputs written into each rank's slots through its handle (src_info, layout_range).
inline std::vector<LowLatencyCombineInput> low_latency_expert_outputs(
    const LowLatencyProblem& p, const std::vector<LowLatencyDispatchOutput>& out) {
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

}  // namespace epcomm::ref::scale
