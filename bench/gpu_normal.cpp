// Normal-mode benchmark on the GPUs: one thread per rank, an NCCL group, the standard problem (or,
// in a fake-node process, that process's ranks of a group across processes).
// Times layout, dispatch (BF16 / FP8, counts exchange and host sync included, as users see it),
// cached dispatch and combine, and each call's host time (`*-host`: a host clock around it, the floor
// under the Python layer's); checks the results against the CPU reference after the first call and
// again after the timed calls.
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <thread>

#include "bench.hpp"
#include "bench_util.hpp"
#include "epcomm/buffer.hpp"
#include "epcomm/reference.hpp"

namespace epcomm::bench {
namespace {

struct RankData {
  int num_tokens = 0;
  std::vector<uint16_t> x;  // bf16
  std::vector<uint8_t> x_fp8;
  std::vector<float> scales;  // row-major [T, G]
  std::vector<int64_t> topk;
  std::vector<float> weights;
};

RankData make_rank_data(uint64_t seed, int rank, int T, int H, int K, int E) {
  std::mt19937_64 rng(seed * 977 + rank);
  RankData d;
  d.num_tokens = T;
  d.x = random_bf16(rng, static_cast<size_t>(T) * H);
  d.x_fp8 = random_fp8(rng, static_cast<size_t>(T) * H);
  d.scales = random_scales(rng, static_cast<size_t>(T) * ((H + 127) / 128));
  d.topk = uniform_topk(rng, T, K, E);
  d.weights = random_floats(rng, static_cast<size_t>(T) * K);
  return d;
}

// Hierarchical mode (--ranks-per-node): bytes a rank's tokens need on the network by DeepEP's
// "RDMA" count (tokens x destination nodes x row bytes, own node included) and the rows that really
// cross it (other nodes only), from the routing.
struct NodeTraffic {
  double deepep_rdma_rows = 0, network_rows = 0;
};
NodeTraffic node_traffic(const RankData& d, int rank, int K, int E, int R, int P) {
  NodeTraffic n;
  const int per_rank = E / R;
  for (int t = 0; t < d.num_tokens; ++t) {
    uint64_t nodes = 0;
    for (int k = 0; k < K; ++k) {
      const int64_t e = d.topk[static_cast<size_t>(t) * K + k];
      if (e >= 0) nodes |= 1ull << ((e / per_rank) / P);
    }
    n.deepep_rdma_rows += __builtin_popcountll(nodes);
    n.network_rows += __builtin_popcountll(nodes & ~(1ull << (rank / P)));
  }
  return n;
}

// BF16 outputs equal within one rounding step (the hierarchical combine sums node by node).
bool close_bf16_bytes(const DevMem& m, const std::vector<uint16_t>& want) {
  std::vector<uint16_t> got(want.size());
  if (!got.empty()) cuda_check(cudaMemcpy(got.data(), m.get(), got.size() * 2, cudaMemcpyDeviceToHost), "download");
  auto f = [](uint16_t b) {
    uint32_t u = static_cast<uint32_t>(b) << 16;
    float v;
    std::memcpy(&v, &u, 4);
    return v;
  };
  for (size_t i = 0; i < got.size(); ++i)
    if (std::abs(f(got[i]) - f(want[i])) > 1e-2f * std::max(1.f, std::abs(f(want[i])))) return false;
  return true;
}

// A timed row with the bytes one call moved (the counters of the checked first call).
void with_bytes(Row& row, const Buffer::InternodeStats& s) {
  row.net_bytes = static_cast<double>(s.network_bytes);
  row.net_puts = static_cast<double>(s.network_puts);
  row.nvl_bytes = static_cast<double>(s.nvlink_bytes);
}

}  // namespace

void run_gpu_normal(const Options& o, Report& report) {
  const int R = gpu_ranks(o.ranks);
  std::vector<int> ranks(R);
  for (int r = 0; r < R; ++r) ranks[r] = r;
  report.device = device_description(R);
  auto groups = create_nccl_groups(R, ranks, ranks, o.ranks_per_node);
  run_gpu_normal_ranks(o, R, o.seed ? o.seed : std::random_device{}(), ranks, groups, report);
  destroy_groups(groups);
}

void run_gpu_normal_ranks(const Options& o, int R, uint64_t seed, const std::vector<int>& ranks,
                          const std::vector<std::shared_ptr<Group>>& groups, Report& report) {
  const int T = o.tokens >= 0 ? o.tokens : 4096;
  const int H = o.hidden > 0 ? o.hidden : 7168;
  const int K = o.topk;
  const int E = o.experts > 0 ? o.experts : 256;
  const int G = (H + 127) / 128;
  report.ranks = R;
  report.problem = "normal: tokens " + std::to_string(T) + "/rank, hidden " + std::to_string(H) + ", top-" +
                   std::to_string(K) + ", " + std::to_string(E) + " experts, uniform routing";
  // Nodes as the groups see them: --ranks-per-node (virtual nodes), or NCCL's (fake nodes).
  const int P = groups.front()->ranks_per_node();
  const bool internode = P < R;
  if (internode)
    report.problem += ", " + std::to_string(R / P) + (o.fake_nodes > 0 ? " (fake) nodes x " : " (virtual) nodes x ") +
                      std::to_string(P);
  std::vector<RankData> data(R);
  for (int r = 0; r < R; ++r) data[r] = make_rank_data(seed, r, T, H, K, E);

  // Reference results (only what the checks need).
  std::vector<ref::NormalDispatchOutput> want_bf16, want_fp8;
  std::vector<ref::CombineOutput> want_comb;
  if (o.verify) {
    std::vector<ref::NormalInput> in(R), in8(R);
    for (int r = 0; r < R; ++r) {
      in[r].num_tokens = T;
      in[r].x.resize(data[r].x.size() * 2);
      std::memcpy(in[r].x.data(), data[r].x.data(), in[r].x.size());
      in[r].topk_idx = data[r].topk;
      in[r].topk_weights = data[r].weights;
      in8[r] = in[r];
      in8[r].x = data[r].x_fp8;
      in8[r].scales = data[r].scales;
    }
    ref::NormalOptions opt;
    opt.hidden = H;
    opt.num_topk = K;
    opt.num_experts = E;
    want_bf16 = ref::normal_dispatch(in, opt);
    opt.dtype = DType::kFP8E4M3;
    want_fp8 = ref::normal_dispatch(in8, opt);
    std::vector<ref::CombineInput> ci(R);
    std::vector<ref::NormalHandle> handles;
    for (int r = 0; r < R; ++r) {
      ci[r].x.resize(want_bf16[r].recv_x.size() / 2);
      std::memcpy(ci[r].x.data(), want_bf16[r].recv_x.data(), want_bf16[r].recv_x.size());
      ci[r].topk_weights = want_bf16[r].recv_topk_weights;
      handles.push_back(want_bf16[r].handle);
    }
    want_comb = ref::normal_combine(ci, handles, H, K);
  }

  std::vector<bool> dtypes;  // true = fp8
  if (o.dtype != "fp8") dtypes.push_back(false);
  if (o.dtype != "bf16") dtypes.push_back(true);
  const int max_sms = *std::max_element(o.sms.begin(), o.sms.end());

  std::mutex mu;
  run_threads(static_cast<int>(ranks.size()), [&](int i) {
    const int r = ranks[i];
    const std::shared_ptr<Group>& group = groups[i];
    const int dev = group->device();
    cuda_check(cudaSetDevice(dev), "cudaSetDevice");
    Config big = Config::dispatch_default(R);
    big.num_sms = max_sms;
    Config bigc = Config::combine_default(R);
    bigc.num_sms = max_sms;
    if (o.ring > 0) big.nvl_buffer_size = bigc.nvl_buffer_size = o.ring;
    BufferOptions bo;
    bo.num_nvl_bytes = std::max(big.get_nvl_buffer_size_hint(H * 2, R), bigc.get_nvl_buffer_size_hint(H * 2, R));
    if (internode) {  // the internode region holds whole per-node buffers: size it for this T only
      bo.max_tokens_per_rank = std::max(T, 1);
      bo.num_rdma_bytes = Buffer::internode_size_hint(bo.max_tokens_per_rank, H, R, P, K);
    }
    Buffer buf(group, bo);
    cudaStream_t stream;
    cuda_check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
    const StreamOrder order{stream, nullptr, false};
    const RankData& d = data[r];
    const int cap = R * T;
    DevMem x(d.x), x8(d.x_fp8), topk(d.topk), weights(d.weights);
    // Scales column-major, as MoE frameworks usually hold them.
    std::vector<float> sc_cm(d.scales.size());
    for (int t = 0; t < T; ++t)
      for (int g = 0; g < G; ++g) sc_cm[static_cast<size_t>(g) * T + t] = d.scales[static_cast<size_t>(t) * G + g];
    DevMem sc(sc_cm);
    DevMem per_rank(sizeof(int32_t) * R), per_expert(sizeof(int32_t) * E), in_rank(static_cast<size_t>(T) * R);
    Config smallest_chunk;
    smallest_chunk.nvl_chunk_size = 8;
    DevMem prefix(sizeof(int32_t) * R * R), chunk_off(sizeof(int32_t) * R * buf.chunk_offset_stride(smallest_chunk));
    DevMem recv_x(static_cast<size_t>(cap) * H * 2), recv_sc(sizeof(float) * cap * G),
        recv_idx(sizeof(int64_t) * cap * K);
    DevMem recv_w(sizeof(float) * cap * K), src_idx(sizeof(int32_t) * cap), out(static_cast<size_t>(T) * H * 2);
    DevMem out_w(sizeof(float) * T * K), cached_x(static_cast<size_t>(cap) * H * 2);

    LayoutOutputs lo{view_i32(per_rank, {R}, dev), std::nullopt, view_i32(per_expert, {E}, dev),
                     view(in_rank, DType::kBool, {T, R}, dev)};
    auto layout = [&] { buf.get_dispatch_layout(view(topk, DType::kI64, {T, K}, dev), E, lo, order); };
    layout();
    cuda_check(cudaStreamSynchronize(stream), "layout");
    const double layout_us = time_us(stream, o.warmup, o.iters, layout);
    {
      std::lock_guard<std::mutex> lock(mu);
      report.rows.push_back({"epcomm", "layout", r, 0, layout_us, 0, ""});
    }

    for (int sms : o.sms) {
      Config cfg = Config::dispatch_default(R);
      cfg.num_sms = sms;
      Config ccfg = Config::combine_default(R);
      ccfg.num_sms = sms;
      if (o.chunk > 0) cfg.nvl_chunk_size = ccfg.nvl_chunk_size = o.chunk;
      if (o.ring > 0) cfg.nvl_buffer_size = ccfg.nvl_buffer_size = o.ring;
      const int stride = buf.chunk_offset_stride(cfg);
      DispatchHandle h;
      h.rank_prefix_matrix = view_i32(prefix, {R, R}, dev);
      h.chunk_offset = view_i32(chunk_off, {R, stride}, dev);
      for (bool fp8 : dtypes) {
        DispatchInputs di;
        di.x = fp8 ? view(x8, DType::kFP8E4M3, {T, H}, dev) : view(x, DType::kBF16, {T, H}, dev);
        if (fp8) di.x_scales = strided(sc, DType::kF32, {T, G}, {1, T}, dev);
        di.topk_idx = view(topk, DType::kI64, {T, K}, dev);
        di.topk_weights = view(weights, DType::kF32, {T, K}, dev);
        di.num_tokens_per_rank = lo.num_tokens_per_rank;
        di.is_token_in_rank = lo.is_token_in_rank;
        di.num_tokens_per_expert = lo.num_tokens_per_expert;
        di.config = cfg;
        int rows = 0;
        auto prepare = [&] { return buf.dispatch_prepare(di, h, std::nullopt, order); };
        auto run = [&](const DispatchPlan& plan) {
          rows = plan.num_rows;
          h.recv_src_idx = view_i32(src_idx, {rows}, dev);
          DispatchOutputs dout;
          dout.recv_x = view(recv_x, di.x.dtype, {rows, H}, dev);
          if (fp8) dout.recv_x_scales = view(recv_sc, DType::kF32, {rows, G}, dev);
          dout.recv_topk_idx = view(recv_idx, DType::kI64, {rows, K}, dev);
          dout.recv_topk_weights = view(recv_w, DType::kF32, {rows, K}, dev);
          buf.dispatch_run(di, plan, h, dout, order);
        };
        auto dispatch = [&] { run(prepare()); };
        if (internode) buf.internode_stats(/*reset=*/true);
        dispatch();
        cuda_check(cudaStreamSynchronize(stream), "dispatch");
        Buffer::InternodeStats dispatch_bytes;  // of this first call (every call moves the same)
        if (internode) {
          const Buffer::InternodeStats s = buf.internode_stats(true);
          dispatch_bytes = s;
          const NodeTraffic nt = node_traffic(d, r, K, E, R, P);
          const double rb = fp8 ? H + 4.0 * G : 2.0 * H;
          char note[256];
          std::snprintf(note, sizeof note,
                        "network %.1f MB (%llu rows, expected %.0f; %llu puts), NVLink %.1f MB; DeepEP RDMA bytes %.1f "
                        "MB",
                        s.network_bytes / 1e6, static_cast<unsigned long long>(s.network_rows), nt.network_rows,
                        static_cast<unsigned long long>(s.network_puts), s.nvlink_bytes / 1e6,
                        nt.deepep_rdma_rows * rb / 1e6);
          std::lock_guard<std::mutex> lock(mu);
          report.rows.push_back(
              {"epcomm", std::string(fp8 ? "dispatch-fp8" : "dispatch-bf16") + ":traffic", r, sms, 0, 0, note});
          if (s.network_rows != static_cast<uint64_t>(nt.network_rows)) report.ok = false;
        }
        // The outputs against the reference: after the first call, and again after the timed calls
        // (every timed call writes the same tensors; a path that goes wrong late must not pass).
        const auto verify_dispatch = [&](const char* when) {
          if (!o.verify) return;
          const auto& want = fp8 ? want_fp8[r] : want_bf16[r];
          const size_t row_bytes = static_cast<size_t>(H) * (fp8 ? 1 : 2);
          bool ok = rows == want.num_rows && equal_bytes(recv_x, want.recv_x.data(), rows * row_bytes) &&
                    equal_bytes(recv_idx, want.recv_topk_idx.data(), sizeof(int64_t) * rows * K) &&
                    equal_bytes(recv_w, want.recv_topk_weights.data(), sizeof(float) * rows * K) &&
                    equal_bytes(src_idx, want.handle.recv_src_idx.data(), sizeof(int32_t) * rows) &&
                    (!fp8 || equal_bytes(recv_sc, want.recv_scales.data(), sizeof(float) * rows * G));
          const std::string check = std::string(fp8 ? "dispatch fp8" : "dispatch bf16") + " @" + std::to_string(sms) +
                                    " SMs rank " + std::to_string(r) + ", " + when +
                                    (ok ? ": matches the reference" : ": MISMATCH");
          std::lock_guard<std::mutex> lock(mu);
          report.checks.push_back(check);
          report.ok = report.ok && ok;
        };
        verify_dispatch("first call");
        const double us = time_us(stream, o.warmup, o.iters, dispatch);
        // The call's host time (a host clock around it): the floor under the Python layer's.
        const double host_us = time_host_us(stream, o.warmup, o.iters, dispatch);
        // Where the time goes: count exchange + host wait (start -> counts known on the comm
        // stream), then the data phase.
        const auto split = split_dispatch_us(stream, buf.comm_stream(), o.iters, prepare, run);
        cuda_check(cudaStreamSynchronize(stream), "timed dispatch");
        verify_dispatch("after the timed calls");
        const double row_bytes = fp8 ? H + 4.0 * H / 128 : 2.0 * H;
        const std::string op = fp8 ? "dispatch-fp8" : "dispatch-bf16";
        {
          std::lock_guard<std::mutex> lock(mu);
          Row row{"epcomm", op, r, sms, us, rows * row_bytes / us / 1e3, std::to_string(rows) + " rows"};
          if (internode) with_bytes(row, dispatch_bytes);
          report.rows.push_back(row);
          report.rows.push_back({"epcomm", op + ":counts", r, sms, split.first, 0, "notify + host wait"});
          report.rows.push_back({"epcomm", op + ":data", r, sms, split.second, 0, "launch + data kernel"});
          report.rows.push_back(
              {"epcomm", op + "-host", r, sms, host_us, 0, "host time per call (the count exchange's wait included)"});
        }
        if (fp8) continue;

        // Cached dispatch and combine reuse the BF16 routing.
        auto cached = [&] {
          DispatchOutputs cout_;
          cout_.recv_x = view(cached_x, DType::kBF16, {rows, H}, dev);
          buf.cached_dispatch(di.x, std::nullopt, h, cout_, cfg, order);
        };
        if (internode) buf.internode_stats(/*reset=*/true);
        cached();
        cuda_check(cudaStreamSynchronize(stream), "cached dispatch");
        const Buffer::InternodeStats cached_bytes = internode ? buf.internode_stats(true) : Buffer::InternodeStats{};
        const double cus = time_us(stream, o.warmup, o.iters, cached);
        const double cached_host_us = time_host_us(stream, o.warmup, o.iters, cached);
        CombineInputs ci;
        ci.x = view(recv_x, DType::kBF16, {rows, H}, dev);
        ci.topk_weights = view(recv_w, DType::kF32, {rows, K}, dev);
        ci.config = ccfg;
        CombineOutputs co{view(out, DType::kBF16, {T, H}, dev), view(out_w, DType::kF32, {T, K}, dev)};
        auto combine = [&] { buf.combine(ci, h, co, order); };
        if (internode) buf.internode_stats(/*reset=*/true);
        combine();
        cuda_check(cudaStreamSynchronize(stream), "combine");
        Buffer::InternodeStats combine_bytes;
        if (internode) {
          const Buffer::InternodeStats s = buf.internode_stats(true);
          combine_bytes = s;
          char note[160];
          std::snprintf(note, sizeof note, "network %.1f MB (%llu partial rows, f32), NVLink %.1f MB",
                        s.network_bytes / 1e6, static_cast<unsigned long long>(s.network_rows), s.nvlink_bytes / 1e6);
          std::lock_guard<std::mutex> lock(mu);
          report.rows.push_back({"epcomm", "combine:traffic", r, sms, 0, 0, note});
        }
        const auto verify_combine = [&](const char* when) {
          if (!o.verify) return;
          const bool ok =
              (internode ? close_bf16_bytes(out, want_comb[r].combined_x)
                         : equal_bytes(out, want_comb[r].combined_x.data(), static_cast<size_t>(T) * H * 2)) &&
              equal_bytes(out_w, want_comb[r].combined_topk_weights.data(), sizeof(float) * T * K);
          std::lock_guard<std::mutex> lock(mu);
          report.checks.push_back("combine @" + std::to_string(sms) + " SMs rank " + std::to_string(r) + ", " + when +
                                  (ok ? ": matches the reference" : ": MISMATCH"));
          report.ok = report.ok && ok;
        };
        verify_combine("first call");
        const double comb_us = time_us(stream, o.warmup, o.iters, combine);
        const double comb_host_us = time_host_us(stream, o.warmup, o.iters, combine);
        cuda_check(cudaStreamSynchronize(stream), "timed combine");
        verify_combine("after the timed calls");
        if (o.verify) {  // the timed cached dispatches moved the same x: the same rows as the dispatch
          const bool ok = equal_bytes(cached_x, want_bf16[r].recv_x.data(), static_cast<size_t>(rows) * H * 2);
          std::lock_guard<std::mutex> lock(mu);
          report.checks.push_back("cached dispatch bf16 @" + std::to_string(sms) + " SMs rank " + std::to_string(r) +
                                  ", after the timed calls" + (ok ? ": matches the reference" : ": MISMATCH"));
          report.ok = report.ok && ok;
        }
        std::lock_guard<std::mutex> lock(mu);
        Row cached_row{"epcomm", "cached-dispatch-bf16", r, sms, cus, rows * 2.0 * H / cus / 1e3, ""};
        if (internode) with_bytes(cached_row, cached_bytes);
        report.rows.push_back(cached_row);
        Row crow{"epcomm", "combine", r, sms, comb_us, rows * 2.0 * H / comb_us / 1e3, ""};
        if (internode) with_bytes(crow, combine_bytes);
        report.rows.push_back(crow);
        report.rows.push_back({"epcomm", "cached-dispatch-bf16-host", r, sms, cached_host_us, 0, "host time per call"});
        report.rows.push_back({"epcomm", "combine-host", r, sms, comb_host_us, 0, "host time per call"});
      }
    }
    cuda_check(cudaStreamSynchronize(stream), "final");
    cudaStreamDestroy(stream);
  });
}

}  // namespace epcomm::bench
