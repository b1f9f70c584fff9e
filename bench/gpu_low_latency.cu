// Low-latency benchmark on the GPUs (docs/contract.md §7): one thread per GPU, an NCCL group, the standard
// LL problem (128 tokens per rank, hidden 7168, top-8, 288 experts, FP8 dispatch, BF16 combine).
// Times, with CUDA events on the caller's stream, median over --iters after --warmup:
//   ll-dispatch-fp8 / ll-dispatch-bf16 / ll-combine   one call (send and receive in one launch)
//   ll-*-send / ll-*-recv                             hook mode: the two halves, with a 50 us spin
//                                                     kernel between them (the overlapped compute)
//                                                     so the receive half does not measure peer skew
//   ll-*-kernel                                       the same calls' kernel durations as a profiler
//                                                     records them (CUPTI: no launch or queue time),
//                                                     DeepEP's way of timing (kineto)
// checks an FP8 dispatch and combine against the CPU reference before and after the timed loops, prints the LL buffer size
// beside DeepEP's get_low_latency_rdma_size_hint, and runs the NCCL all-to-all baseline at the same
// token count.
#include <cstdio>
#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <mutex>
#include <random>
#include <stdexcept>

#include "bench.hpp"
#include "bench_util.hpp"
#include "common/thread_barrier.hpp"
#include "kernel_clock.hpp"
#include "epcomm/buffer.hpp"
#include "epcomm/reference.hpp"
#include "kernels/low_latency/params.hpp"

namespace epcomm::bench {
namespace {

__global__ void spin_kernel(uint64_t ns) {
  uint64_t start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < ns);
}

double median(std::vector<double> v) {
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return v[v.size() / 2];
}

// Median times of the two halves of a hook-mode call.
std::pair<double, double> time_halves(cudaStream_t s, int warmup, int iters, const std::function<void()>& send,
                                      const std::function<void()>& recv) {
  constexpr uint64_t kGapNs = 50000;
  for (int i = 0; i < warmup; ++i) {
    send();
    spin_kernel<<<1, 1, 0, s>>>(kGapNs);
    recv();
  }
  cuda_check(cudaStreamSynchronize(s), "warmup");
  std::vector<cudaEvent_t> ev(4 * iters);
  for (auto& e : ev) cuda_check(cudaEventCreate(&e), "event");
  for (int i = 0; i < iters; ++i) {
    cuda_check(cudaEventRecord(ev[4 * i], s), "record");
    send();
    cuda_check(cudaEventRecord(ev[4 * i + 1], s), "record");
    spin_kernel<<<1, 1, 0, s>>>(kGapNs);
    cuda_check(cudaEventRecord(ev[4 * i + 2], s), "record");
    recv();
    cuda_check(cudaEventRecord(ev[4 * i + 3], s), "record");
  }
  cuda_check(cudaStreamSynchronize(s), "timed");
  std::vector<double> a(iters), b(iters);
  for (int i = 0; i < iters; ++i) {
    float ms = 0;
    cuda_check(cudaEventElapsedTime(&ms, ev[4 * i], ev[4 * i + 1]), "elapsed");
    a[i] = ms * 1e3;
    cuda_check(cudaEventElapsedTime(&ms, ev[4 * i + 2], ev[4 * i + 3]), "elapsed");
    b[i] = ms * 1e3;
  }
  for (auto& e : ev) cudaEventDestroy(e);
  return {median(a), median(b)};
}

// The CUPTI timestamps around `iters` calls of fn (after `warmup` more), the stream idle at both ends.
std::pair<uint64_t, uint64_t> clock_window(cudaStream_t s, int warmup, int iters, const std::function<void()>& fn) {
  for (int i = 0; i < warmup; ++i) fn();
  cuda_check(cudaStreamSynchronize(s), "warmup");
  const uint64_t t0 = KernelClock::now();
  for (int i = 0; i < iters; ++i) fn();
  cuda_check(cudaStreamSynchronize(s), "timed");
  return {t0, KernelClock::now()};
}

// Per-call time of `iters` calls captured in one CUDA graph: no host launch cost in it, the figure
// a decode step replayed as a graph sees. Median of 5 replays.
double time_graph_us(cudaStream_t s, int iters, const std::function<void()>& fn) {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  cuda_check(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), "begin capture");
  try {
    for (int i = 0; i < iters; ++i) fn();
  } catch (...) {
    cudaStreamEndCapture(s, &graph);
    throw;
  }
  cuda_check(cudaStreamEndCapture(s, &graph), "end capture");
  cuda_check(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
  cuda_check(cudaGraphLaunch(exec, s), "warmup replay");
  cuda_check(cudaStreamSynchronize(s), "warmup replay");
  cudaEvent_t a, b;
  cuda_check(cudaEventCreate(&a), "event");
  cuda_check(cudaEventCreate(&b), "event");
  std::vector<double> t(5);
  for (auto& v : t) {
    cuda_check(cudaEventRecord(a, s), "record");
    cuda_check(cudaGraphLaunch(exec, s), "replay");
    cuda_check(cudaEventRecord(b, s), "record");
    cuda_check(cudaStreamSynchronize(s), "replay");
    float ms = 0;
    cuda_check(cudaEventElapsedTime(&ms, a, b), "elapsed");
    v = ms * 1e3 / iters;
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  return median(t);
}

struct RankData {
  std::vector<uint16_t> x, y;
  std::vector<int64_t> topk;
  std::vector<float> weights;
};

struct RankResult {  // one checked FP8 dispatch and combine
  std::vector<int32_t> recv_count, src_info;
  std::vector<int64_t> layout_range;
  std::vector<uint8_t> recv_x;
  std::vector<float> scales;  // as stored: [E/R][G][R*Tmax]
  std::vector<uint16_t> out;
};

template <typename T>
std::vector<T> download(const DevMem& m, size_t count) {
  std::vector<T> v(count);
  if (count) cuda_check(cudaMemcpy(v.data(), m.get(), count * sizeof(T), cudaMemcpyDeviceToHost), "download");
  return v;
}

// Rows per (local expert, source) as sets, counts exactly; combine bit for bit through the GPU's
// handles (per-rank combine: within its bound, and `inexact` counts the elements that are not bit
// for bit the per-expert sum). Returns "" or what differs.
std::string verify(const std::vector<RankData>& data, const std::vector<RankResult>& got, int T, int Tmax, int H, int K,
                   int E, LowLatencyPartials partials, size_t* inexact = nullptr) {
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

}  // namespace

void run_gpu_low_latency(const Options& o, Report& report) {
  const int R = gpu_ranks(o.ranks);
  const int T = o.tokens >= 0 ? o.tokens : 128;
  const int Tmax = std::max(T, 1);
  const int H = o.hidden > 0 ? o.hidden : 7168;
  const int K = o.topk;
  const int E = o.experts > 0 ? o.experts : 288;
  const int EL = E / R, G = H / 128;
  const int64_t RT = static_cast<int64_t>(R) * Tmax;
  if (report.device.empty()) report.device = device_description(R);
  report.ranks = R;
  const std::string problem = "low-latency: tokens " + std::to_string(T) + "/rank (Tmax " + std::to_string(Tmax) +
                              "), hidden " + std::to_string(H) + ", top-" + std::to_string(K) + ", " +
                              std::to_string(E) + " experts, uniform routing";
  report.problem = report.problem.empty() ? problem : report.problem + " | " + problem;

  const size_t ours = Buffer::low_latency_size_hint(Tmax, H, R, E);
  const size_t deepep = deepep_low_latency_size_hint(Tmax, H, R, E);
  report.checks.push_back("low-latency buffer: epcomm " + std::to_string(ours) + " bytes (" +
                          std::to_string(ours >> 20) + " MiB) vs DeepEP get_low_latency_rdma_size_hint " +
                          std::to_string(deepep) + " bytes (" + std::to_string(deepep >> 20) + " MiB), ratio " +
                          std::to_string(static_cast<double>(ours) / static_cast<double>(deepep)));
  if (ours > deepep) report.ok = false;
  {
    // Which dispatch path ran (EPCOMM_LL_PER_RANK, read by the library as here): per-rank where the
    // staging slots fit the layout, per-expert otherwise (the fp8 and bf16 calls may differ).
    const LowLatencyLayout l = LowLatencyLayout::make(Tmax, H, R, E);
    const int level = low_latency_per_rank_level();  // the bench's buffers leave BufferOptions' -1
    auto path = [&](bool fp8) {
      return low_latency_per_rank_wanted(l, fp8, level) ? std::string("per-rank") : std::string("per-expert");
    };
    // The combine follows the dispatch it combines (fp8 here): per-rank partials with level 2 or 3
    // where the plan fits, else one row per (token, expert).
    const LowLatencyPartials kind =
        low_latency_per_rank_wanted(l, true, level) ? low_latency_partials(l, level) : LowLatencyPartials::kNone;
    report.checks.push_back("low-latency paths (EPCOMM_LL_PER_RANK=" + std::to_string(low_latency_per_rank_level()) +
                            "): dispatch fp8 " + path(true) + ", dispatch bf16 " + path(false) + ", combine " +
                            (kind == LowLatencyPartials::kNone
                                 ? std::string("per (token, expert)")
                                 : std::string("per-rank (") + low_latency_partials_name(kind) + " partials per token and rank)"));
  }

  const uint64_t seed = std::random_device{}();
  std::vector<RankData> data(R);
  std::vector<RankResult> got(R), got_last(R);  // first checked round, and the one after the timed loops
  run_threads(R, [&](int r) {
    std::mt19937_64 rng(seed * 31 + r);
    data[r].x = random_bf16(rng, static_cast<size_t>(T) * H);
    data[r].topk = uniform_topk(rng, T, K, E);
    data[r].weights = random_floats(rng, static_cast<size_t>(T) * K);
    data[r].y = testing::fast_bf16(seed + r, static_cast<size_t>(EL) * RT * H);
  });

  ncclUniqueId id;
  if (ncclGetUniqueId(&id) != ncclSuccess) throw std::runtime_error("ncclGetUniqueId failed");
  std::mutex mu;
  testing::ThreadBarrier all_ranks(R);  // CUPTI recording is switched on and off while no rank launches
  bool clock_on = false;
  run_threads(R, [&](int r) {
    testing::LeaveOnThrow leave_on_throw(all_ranks);  // a rank that throws must not strand the others here
    cuda_check(cudaSetDevice(r), "cudaSetDevice");
    auto group = Group::create_nccl(id, R, r, r);
    BufferOptions bo;
    // EPCOMM_LL_NET=1 (with several nodes, e.g. EPCOMM_RANKS_PER_NODE) takes the network path,
    // whose area follows the two buffers.
    bo.num_rdma_bytes = low_latency_net_requested() ? Buffer::low_latency_net_size_hint(Tmax, H, R, E) : ours;
    bo.low_latency_mode = true;
    Buffer buf(group, bo);
    if (r == 0 && buf.low_latency_uses_network()) {
      std::lock_guard<std::mutex> lock(mu);
      report.checks.push_back("low-latency path: ranks of other nodes through the network transport (EPCOMM_LL_NET=1, " +
                              std::to_string(group->ranks_per_node()) + " ranks per node)");
    }
    cudaStream_t stream;
    cuda_check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
    const StreamOrder order{stream, nullptr, false};
    cudaDeviceProp prop{};
    cuda_check(cudaGetDeviceProperties(&prop, r), "props");
    const int sms = o.sms_given && !o.sms.empty() ? std::min(o.sms.front(), prop.multiProcessorCount) : prop.multiProcessorCount;
    const RankData& d = data[r];
    DevMem x(d.x), topk(d.topk), weights(d.weights), y(d.y);
    DevMem recv8(static_cast<size_t>(EL) * RT * H), recv16(static_cast<size_t>(EL) * RT * H * 2);
    DevMem scales(sizeof(float) * EL * G * RT), count(sizeof(int32_t) * EL), src(sizeof(int32_t) * EL * RT);
    DevMem range(sizeof(int64_t) * EL * R), out(static_cast<size_t>(T) * H * 2);

    LowLatencyDispatchInputs din;
    din.x = view(x, DType::kBF16, {T, H}, r);
    din.topk_idx = view(topk, DType::kI64, {T, K}, r);
    din.num_max_dispatch_tokens_per_rank = Tmax;
    din.num_experts = E;
    din.num_sms = sms;
    LowLatencyDispatchOutputs d8;
    d8.recv_x = view(recv8, DType::kFP8E4M3, {EL, RT, H}, r);
    d8.recv_x_scales = strided(scales, DType::kF32, {EL, RT, G}, {G * RT, 1, RT}, r);
    d8.recv_count = view_i32(count, {EL}, r);
    d8.src_info = view_i32(src, {EL, RT}, r);
    d8.layout_range = view(range, DType::kI64, {EL, R}, r);
    LowLatencyDispatchOutputs d16 = d8;
    d16.recv_x = view(recv16, DType::kBF16, {EL, RT, H}, r);
    d16.recv_x_scales.reset();
    LowLatencyDispatchInputs din16 = din;
    din16.use_fp8 = false;
    LowLatencyCombineInputs cin;
    cin.x = view(y, DType::kBF16, {EL, RT, H}, r);
    cin.topk_idx = din.topk_idx;
    cin.topk_weights = view(weights, DType::kF32, {T, K}, r);
    cin.num_sms = sms;
    const TensorView outv = view(out, DType::kBF16, {T, H}, r);
    LowLatencyHandle h8, h16, hh;

    // A dispatch and a combine whose outputs are checked: the first calls, and again after every
    // timed loop (a path that goes wrong only after many calls must not be timed silently).
    const auto checked_round = [&](RankResult& g) {
      buf.low_latency_dispatch(din, d8, h8, false, order);
      cuda_check(cudaStreamSynchronize(stream), "dispatch");
      g.recv_count = download<int32_t>(count, EL);
      g.src_info = download<int32_t>(src, static_cast<size_t>(EL) * RT);
      g.layout_range = download<int64_t>(range, static_cast<size_t>(EL) * R);
      g.recv_x = download<uint8_t>(recv8, static_cast<size_t>(EL) * RT * H);
      g.scales = download<float>(scales, static_cast<size_t>(EL) * G * RT);
      buf.low_latency_combine(cin, h8, outv, false, order);
      cuda_check(cudaStreamSynchronize(stream), "combine");
      g.out = download<uint16_t>(out, static_cast<size_t>(T) * H);
    };
    checked_round(got[r]);

    auto row = [&](const std::string& op, double us, const std::string& note) {
      std::lock_guard<std::mutex> lock(mu);
      report.rows.push_back({"epcomm", op, r, sms, us, 0, note});
    };
    // EPCOMM_LL_PROBE=1: where one dispatch's time goes, per phase (ranks 0 and R-1).
    const auto probe = [&](const char* what) {
      const std::string s = buf.low_latency_probe_report();
      if (s.empty() || (r != 0 && r != R - 1)) return;
      std::lock_guard<std::mutex> lock(mu);
      std::fprintf(stderr, "[%s] %s\n", what, s.c_str());
    };
    if (o.dtype != "bf16") {
      row("ll-dispatch-fp8", time_us(stream, o.warmup, o.iters, [&] { buf.low_latency_dispatch(din, d8, h8, false, order); }),
          "one launch");
      buf.low_latency_dispatch(din, d8, h8, false, order);
      probe("fp8 dispatch, one launch, after the timed loop");
    }
    if (o.dtype != "fp8")
      row("ll-dispatch-bf16",
          time_us(stream, o.warmup, o.iters, [&] { buf.low_latency_dispatch(din16, d16, h16, false, order); }),
          "one launch");
    // A fresh dispatch, then combines of its handle (repeating a combine rewrites the same rows).
    buf.low_latency_dispatch(din, d8, h8, false, order);
    row("ll-combine", time_us(stream, o.warmup, o.iters, [&] { buf.low_latency_combine(cin, h8, outv, false, order); }),
        "bf16, one launch");

    // An even number of dispatches per graph, so replays keep alternating the two buffers.
    const int graph_iters = std::max(2, o.iters + (o.iters & 1));
    row("ll-dispatch-fp8-graph",
        time_graph_us(stream, graph_iters, [&] { buf.low_latency_dispatch(din, d8, h8, false, order); }),
        "per call, calls replayed from one CUDA graph");
    buf.low_latency_dispatch(din, d8, h8, false, order);
    row("ll-combine-graph", time_graph_us(stream, graph_iters, [&] { buf.low_latency_combine(cin, h8, outv, false, order); }),
        "per call, calls replayed from one CUDA graph");

    const auto dh = time_halves(
        stream, o.warmup, o.iters, [&] { buf.low_latency_dispatch(din, d8, hh, true, order); },
        [&] { buf.low_latency_dispatch_recv(din, d8, hh, order); });
    probe("fp8 dispatch, hook mode (send, 50 us of other work, receive)");
    row("ll-dispatch-fp8-send", dh.first, "hook mode");
    row("ll-dispatch-fp8-recv", dh.second, "hook mode, after 50 us of other work");
    buf.low_latency_dispatch(din, d8, h8, false, order);
    const auto ch = time_halves(
        stream, o.warmup, o.iters, [&] { buf.low_latency_combine(cin, h8, outv, true, order); },
        [&] { buf.low_latency_combine_recv(cin, h8, outv, order); });
    row("ll-combine-send", ch.first, "hook mode");
    row("ll-combine-recv", ch.second, "hook mode, after 50 us of other work");

    // Kernel durations as a profiler records them (CUPTI: start to end on the GPU, no launch or
    // queue time), the way DeepEP's tests time theirs (kineto): the figures to set beside its
    // numbers. Recorded in loops of their own, so the CUDA-event figures above carry no CUPTI cost.
    all_ranks.wait();
    if (r == 0) clock_on = KernelClock::start();
    all_ranks.wait();
    std::pair<uint64_t, uint64_t> wd{}, wc{}, wdh{}, wch{};
    if (clock_on) {
      constexpr uint64_t kGapNs = 50000;
      wd = clock_window(stream, o.warmup, o.iters, [&] { buf.low_latency_dispatch(din, d8, h8, false, order); });
      buf.low_latency_dispatch(din, d8, h8, false, order);
      wc = clock_window(stream, o.warmup, o.iters, [&] { buf.low_latency_combine(cin, h8, outv, false, order); });
      wdh = clock_window(stream, o.warmup, o.iters, [&] {
        buf.low_latency_dispatch(din, d8, hh, true, order);
        spin_kernel<<<1, 1, 0, stream>>>(kGapNs);
        buf.low_latency_dispatch_recv(din, d8, hh, order);
      });
      buf.low_latency_dispatch(din, d8, h8, false, order);
      wch = clock_window(stream, o.warmup, o.iters, [&] {
        buf.low_latency_combine(cin, h8, outv, true, order);
        spin_kernel<<<1, 1, 0, stream>>>(kGapNs);
        buf.low_latency_combine_recv(cin, h8, outv, order);
      });
    }
    all_ranks.wait();
    if (r == 0) KernelClock::stop();
    all_ranks.wait();
    if (clock_on) {
      const auto kernel_median = [&](const char* name, std::pair<uint64_t, uint64_t> w, int every, int first) {
        const std::vector<double> all = KernelClock::durations(r, name, w.first, w.second);
        std::vector<double> v;
        for (size_t i = first; i < all.size(); i += every) v.push_back(all[i]);
        return v.empty() ? -1.0 : median(v);
      };
      const auto krow = [&](const char* op, double us) {
        if (us >= 0) row(op, us, "kernel time (CUPTI), as DeepEP's kineto figures");
      };
      krow("ll-dispatch-fp8-kernel", kernel_median("low_latency_dispatch_kernel", wd, 1, 0));
      krow("ll-combine-kernel", kernel_median("low_latency_combine_kernel", wc, 1, 0));
      krow("ll-dispatch-fp8-send-kernel", kernel_median("low_latency_dispatch_kernel", wdh, 2, 0));
      krow("ll-dispatch-fp8-recv-kernel", kernel_median("low_latency_dispatch_kernel", wdh, 2, 1));
      krow("ll-combine-send-kernel", kernel_median("low_latency_combine_kernel", wch, 2, 0));
      krow("ll-combine-recv-kernel", kernel_median("low_latency_combine_kernel", wch, 2, 1));
    }
    checked_round(got_last[r]);
    cuda_check(cudaStreamSynchronize(stream), "final");
    buf.check_device_errors();
    cudaStreamDestroy(stream);
  });

  if (o.verify) {
    const LowLatencyLayout l = LowLatencyLayout::make(Tmax, H, R, E);
    const int level = low_latency_per_rank_level();
    const LowLatencyPartials kind =
        low_latency_per_rank_wanted(l, true, level) ? low_latency_partials(l, level) : LowLatencyPartials::kNone;
    for (const auto* results : {&got, &got_last}) {
      size_t inexact = 0;
      const std::string diff = verify(data, *results, T, Tmax, H, K, E, kind, &inexact);
      const std::string exactness = kind == LowLatencyPartials::kNone
                                        ? ""
                                        : " (combine within the partials' bound; " + std::to_string(inexact) + " of " +
                                              std::to_string(static_cast<size_t>(R) * T * H) +
                                              " elements not bit for bit the per-expert sum)";
      report.checks.push_back(std::string("low-latency dispatch fp8 + combine, ") +
                              (results == &got ? "first calls" : "after the timed calls") + ", ranks 0.." +
                              std::to_string(R - 1) +
                              (diff.empty() ? ": match the reference" + exactness : ": MISMATCH: " + diff));
      report.ok = report.ok && diff.empty();
    }
  }

  if (o.baseline) {
    Options base = o;
    base.tokens = T;
    base.hidden = H;
    base.experts = E;
    const size_t first = report.rows.size();
    run_nccl_baseline(base, report);
    for (size_t i = first; i < report.rows.size(); ++i) report.rows[i].op += "@" + std::to_string(T) + "tok";
  }
}

}  // namespace epcomm::bench
