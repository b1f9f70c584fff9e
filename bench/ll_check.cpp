// See ll_check.hpp.
#include "ll_check.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <random>
#include <stdexcept>

#include "bench_util.hpp"
#include "epcomm/reference.hpp"
#include "kernels/low_latency/params.hpp"

namespace epcomm::bench {
namespace {

// Rows per (local expert, source) as sets, counts exactly; combine bit for bit through the GPU's
// handles (per-rank combine: within its bound, and `inexact` counts the elements that are not bit
// for bit the per-expert sum). Returns "" or what differs.
std::string verify(const std::vector<LLRankData>& data, const std::vector<LLRankResult>& got, int T, int Tmax, int H,
                   int K, int E, LowLatencyPartials partials, size_t* inexact = nullptr) {
  const int R = static_cast<int>(data.size()), EL = E / R, G = H / 128;
  const int64_t RT = static_cast<int64_t>(R) * Tmax;
  ref::LowLatencyOptions opt;
  opt.hidden = H;
  opt.num_topk = K;
  opt.num_experts = E;
  opt.num_max_dispatch_tokens_per_rank = Tmax;
  std::vector<ref::LowLatencyDispatchInput> din(R);
  for (int r = 0; r < R; ++r) din[r] = {T, data[r].x, data[r].topk};
  const auto want = ref::low_latency_dispatch(din, opt);
  for (int j = 0; j < R; ++j) {
    if (got[j].recv_count != want[j].recv_count) return "rank " + std::to_string(j) + ": recv_count differs";
    for (int e = 0; e < EL; ++e)
      for (int s = 0; s < R; ++s) {
        const int64_t gr = got[j].layout_range[e * R + s], wr = want[j].layout_range[e * R + s];
        if ((gr & 0xffffffff) != (wr & 0xffffffff))
          return "rank " + std::to_string(j) + ": layout_range count of expert " + std::to_string(e) + " differs";
        using RowKey = std::pair<int32_t, std::vector<uint8_t>>;
        std::vector<RowKey> a, b;
        for (int64_t i = 0; i < (gr & 0xffffffff); ++i) {
          const int64_t gs = e * RT + (gr >> 32) + i, ws = e * RT + (wr >> 32) + i;
          RowKey ka{got[j].src_info[gs], {got[j].recv_x.begin() + gs * H, got[j].recv_x.begin() + (gs + 1) * H}};
          RowKey kb{want[j].src_info[ws], {want[j].recv_x.begin() + ws * H, want[j].recv_x.begin() + (ws + 1) * H}};
          for (int g = 0; g < G; ++g) {
            const float sa = got[j].scales[(static_cast<int64_t>(e) * G + g) * RT + (gs - e * RT)];
            const float sb = want[j].recv_scales[ws * G + g];
            const auto* pa = reinterpret_cast<const uint8_t*>(&sa);
            const auto* pb = reinterpret_cast<const uint8_t*>(&sb);
            ka.second.insert(ka.second.end(), pa, pa + 4);
            kb.second.insert(kb.second.end(), pb, pb + 4);
          }
          a.push_back(std::move(ka));
          b.push_back(std::move(kb));
        }
        std::sort(a.begin(), a.end());
        std::sort(b.begin(), b.end());
        if (a != b)
          return "rank " + std::to_string(j) + ": rows of expert " + std::to_string(e) + " from rank " +
                 std::to_string(s) + " differ";
      }
  }
  std::vector<ref::LowLatencyDispatchOutput> handles(R);
  std::vector<ref::LowLatencyCombineInput> cin(R);
  for (int r = 0; r < R; ++r) {
    handles[r].src_info = got[r].src_info;
    handles[r].layout_range = got[r].layout_range;
    cin[r] = {T, data[r].y, data[r].topk, data[r].weights};
  }
  const auto out = ref::low_latency_combine(cin, handles, opt);
  if (partials != LowLatencyPartials::kNone) {
    // Partials per (token, rank): BF16 within 2^-9 sum_k |w_k y_k| (the reference's sum of |w| |y|,
    // tested with 2^-8), fine within 2^-16 of it (tested with 2^-14), float32 within float32
    // reordering (tested with 2^-18), plus the two final roundings (tests/gpu/ll_harness.cpp checks
    // the same bounds).
    const float rel = low_latency_partials_tolerance(partials);
    std::vector<ref::LowLatencyCombineInput> abs_in = cin;
    for (auto& a : abs_in) {
      for (auto& v : a.y) v &= 0x7fff;
      for (auto& w : a.topk_weights) w = std::fabs(w);
    }
    const auto abs_out = ref::low_latency_combine(abs_in, handles, opt);
    auto value = [](uint16_t b) {
      const uint32_t u = static_cast<uint32_t>(b) << 16;
      float f;
      std::memcpy(&f, &u, 4);
      return f;
    };
    for (int r = 0; r < R; ++r) {
      if (got[r].out.size() != out[r].size()) return "rank " + std::to_string(r) + ": combined x size differs";
      for (size_t i = 0; i < out[r].size(); ++i) {
        const float g = value(got[r].out[i]), w = value(out[r][i]), a = value(abs_out[r][i]);
        if (inexact && got[r].out[i] != out[r][i]) ++*inexact;
        if (!(std::fabs(g - w) <= a * rel + std::fabs(w) / 128.0f))
          return "rank " + std::to_string(r) + ": combined x (per-rank partials) outside the bound at element " +
                 std::to_string(i);
      }
    }
    return "";
  }
  for (int r = 0; r < R; ++r)
    if (got[r].out != out[r]) return "rank " + std::to_string(r) + ": combined x differs";
  (void)EL;
  return "";
}

template <typename T>
void put(std::ofstream& f, const std::vector<T>& v) {
  const uint64_t n = v.size();
  f.write(reinterpret_cast<const char*>(&n), sizeof(n));
  f.write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(n * sizeof(T)));
}

template <typename T>
void get(std::ifstream& f, std::vector<T>& v, const std::string& path) {
  uint64_t n = 0;
  f.read(reinterpret_cast<char*>(&n), sizeof(n));
  if (!f || n > (uint64_t{1} << 36)) throw std::runtime_error("truncated low-latency results in " + path);
  v.resize(n);
  f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(n * sizeof(T)));
  if (!f) throw std::runtime_error("truncated low-latency results in " + path);
}

}  // namespace

LLShape ll_shape(const Options& o, int R) {
  LLShape p;
  p.R = R;
  p.T = o.tokens >= 0 ? o.tokens : 128;
  p.Tmax = std::max(p.T, 1);
  p.H = o.hidden > 0 ? o.hidden : 7168;
  p.K = o.topk;
  p.E = o.experts > 0 ? o.experts : 288;
  p.EL = p.E / R;
  p.G = p.H / 128;
  p.RT = static_cast<int64_t>(R) * p.Tmax;
  return p;
}

LLRankData make_ll_rank_data(const LLShape& p, uint64_t seed, int r) {
  std::mt19937_64 rng(seed * 31 + r);
  LLRankData d;
  d.x = random_bf16(rng, static_cast<size_t>(p.T) * p.H);
  d.topk = uniform_topk(rng, p.T, p.K, p.E);
  d.weights = random_floats(rng, static_cast<size_t>(p.T) * p.K);
  d.y = testing::fast_bf16(seed + r, static_cast<size_t>(p.EL) * p.RT * p.H);
  return d;
}

void write_ll_results(const std::string& path, const LLRankResult& first, const LLRankResult& last) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  for (const LLRankResult* g : {&first, &last}) {
    put(f, g->recv_count);
    put(f, g->src_info);
    put(f, g->layout_range);
    put(f, g->recv_x);
    put(f, g->scales);
    put(f, g->out);
  }
  if (!f) throw std::runtime_error("could not write " + path);
}

void read_ll_results(const std::string& path, LLRankResult& first, LLRankResult& last) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("no low-latency results in " + path);
  for (LLRankResult* g : {&first, &last}) {
    get(f, g->recv_count, path);
    get(f, g->src_info, path);
    get(f, g->layout_range, path);
    get(f, g->recv_x, path);
    get(f, g->scales, path);
    get(f, g->out, path);
  }
}

void check_ll(const LLShape& p, const std::vector<LLRankData>& data, const std::vector<LLRankResult>& got,
              const std::vector<LLRankResult>& got_last, bool over_network, Report& report) {
  const LowLatencyLayout l = LowLatencyLayout::make(p.Tmax, p.H, p.R, p.E);
  const int level = low_latency_per_rank_level();
  // The network path (across nodes) uses no per-rank partials: its combine is exact.
  const LowLatencyPartials kind = !over_network && low_latency_per_rank_wanted(l, true, level)
                                      ? low_latency_partials(l, level)
                                      : LowLatencyPartials::kNone;
  for (const auto* results : {&got, &got_last}) {
    size_t inexact = 0;
    const std::string diff = verify(data, *results, p.T, p.Tmax, p.H, p.K, p.E, kind, &inexact);
    const std::string exactness = kind == LowLatencyPartials::kNone
                                      ? ""
                                      : " (combine within the partials' bound; " + std::to_string(inexact) + " of " +
                                            std::to_string(static_cast<size_t>(p.R) * p.T * p.H) +
                                            " elements not bit for bit the per-expert sum)";
    report.checks.push_back(std::string("low-latency dispatch fp8 + combine, ") +
                            (results == &got ? "first calls" : "after the timed calls") + ", ranks 0.." +
                            std::to_string(p.R - 1) +
                            (diff.empty() ? ": match the reference" + exactness : ": MISMATCH: " + diff));
    report.ok = report.ok && diff.empty();
  }
}

}  // namespace epcomm::bench
