// The CPU reference backend under the benchmark's loop: R thread-ranks (HostCluster), a smaller
// problem, and the property checks that tie dispatch and combine together.
#include <chrono>
#include <cstring>
#include <mutex>
#include <random>

#include "bench.hpp"
#include "bench_util.hpp"
#include "epcomm/host_cluster.hpp"

namespace epcomm::bench {

void run_cpu_reference(const Options& o, Report& report) {
  const int R = o.ranks > 0 ? o.ranks : 4;
  const int T = o.tokens >= 0 ? o.tokens : 512;
  const int H = o.hidden > 0 ? o.hidden : 1024;
  const int K = o.topk;
  const int E = o.experts > 0 ? o.experts : 64;
  report.device = "CPU reference backend (" + std::to_string(R) + " thread-ranks)";
  report.ranks = R;
  report.problem = "normal: tokens " + std::to_string(T) + "/rank, hidden " + std::to_string(H) + ", top-" +
                   std::to_string(K) + ", " + std::to_string(E) + " experts, uniform routing";
  const uint64_t seed = std::random_device{}();
  ref::HostCluster cluster(R, R);
  std::mutex mu;
  cluster.run([&](int r) {
    std::mt19937_64 rng(seed + r);
    // Small integers as bf16 so that sums are exact: combine(dispatch(x)) = x * destinations.
    std::vector<uint16_t> x(static_cast<size_t>(T) * H);
    std::uniform_int_distribution<int> small(-8, 8);
    for (auto& v : x) {
      const int i = small(rng);
      v = ref::float_to_bf16(static_cast<float>(i == 0 ? 1 : i));
    }
    ref::NormalInput in;
    in.num_tokens = T;
    in.x.resize(x.size() * 2);
    std::memcpy(in.x.data(), x.data(), in.x.size());
    in.topk_idx = uniform_topk(rng, T, K, E);
    in.topk_weights = random_floats(rng, static_cast<size_t>(T) * K);
    ref::NormalOptions opt;
    opt.hidden = H;
    opt.num_topk = K;
    opt.num_experts = E;

    using clock = std::chrono::steady_clock;
    auto t0 = clock::now();
    const ref::Layout lay = cluster.get_dispatch_layout(r, in.topk_idx, T, K, E);
    auto t1 = clock::now();
    ref::NormalDispatchOutput d;
    for (int i = 0; i < std::max(1, o.iters / 10); ++i) d = cluster.dispatch(r, in, opt);
    auto t2 = clock::now();
    ref::CombineInput ci;
    ci.x.resize(d.recv_x.size() / 2);
    std::memcpy(ci.x.data(), d.recv_x.data(), d.recv_x.size());
    ci.topk_weights = d.recv_topk_weights;
    ref::CombineOutput c;
    for (int i = 0; i < std::max(1, o.iters / 10); ++i) c = cluster.combine(r, ci, d.handle, H, K);
    auto t3 = clock::now();
    const int n = std::max(1, o.iters / 10);
    const double lay_us = std::chrono::duration<double, std::micro>(t1 - t0).count();
    const double d_us = std::chrono::duration<double, std::micro>(t2 - t1).count() / n;
    const double c_us = std::chrono::duration<double, std::micro>(t3 - t2).count() / n;

    // combine(dispatch(x))[t] = x[t] * (number of ranks t went to); weights come back whole.
    bool ok = true;
    for (int t = 0; t < T && ok; ++t) {
      int dests = 0;
      for (int j = 0; j < R; ++j) dests += lay.is_token_in_rank[static_cast<size_t>(t) * R + j];
      for (int h = 0; h < H && ok; ++h)
        ok = ref::bf16_to_float(c.combined_x[static_cast<size_t>(t) * H + h]) ==
             ref::bf16_to_float(x[static_cast<size_t>(t) * H + h]) * dests;
      for (int k = 0; k < K && ok; ++k)
        ok = c.combined_topk_weights[static_cast<size_t>(t) * K + k] == in.topk_weights[static_cast<size_t>(t) * K + k];
    }
    std::lock_guard<std::mutex> lock(mu);
    report.rows.push_back({"reference-cpu", "layout", r, 0, lay_us, 0, ""});
    report.rows.push_back({"reference-cpu", "dispatch-bf16", r, 0, d_us, d.num_rows * 2.0 * H / d_us / 1e3,
                           std::to_string(d.num_rows) + " rows"});
    report.rows.push_back({"reference-cpu", "combine", r, 0, c_us, d.num_rows * 2.0 * H / c_us / 1e3, ""});
    report.checks.push_back(
        "rank " + std::to_string(r) +
        ": combine(dispatch(x)) == x * destination ranks, weights restored: " + (ok ? "yes" : "NO"));
    report.ok = report.ok && ok;
  });
}

}  // namespace epcomm::bench
