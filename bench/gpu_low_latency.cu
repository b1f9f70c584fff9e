// Low-latency benchmark on the GPUs (docs/contract.md §7): one thread per rank, an NCCL group, the standard
// LL problem (128 tokens per rank, hidden 7168, top-8, 288 experts, FP8 dispatch, BF16 combine).
// Times, with CUDA events on the caller's stream, median over --iters after --warmup:
//   ll-dispatch-fp8 / ll-dispatch-bf16 / ll-combine   one call (send and receive in one launch)
//   ll-*-send / ll-*-recv                             hook mode: the two halves, with a 50 us spin
//                                                     kernel between them (the overlapped compute)
//                                                     so the receive half does not measure peer skew
//   ll-*-kernel                                       the same calls' kernel durations as a profiler
//                                                     records them (CUPTI: no launch or queue time),
//                                                     DeepEP's way of timing (kineto)
//   ll-*-host                                         host time of one call from C++ (a host clock
//                                                     around it): the floor under the Python layer's
//   host-empty-launch                                 an empty kernel's launch, the floor under both
//   host-params-launch, host-stream-bookkeeping       the same with the dispatch's parameter bytes;
//                                                     the CUDA calls a call on the caller's stream makes
//   ll-clean                                          clean_low_latency_buffer at the problem's shape
// checks an FP8 dispatch and combine against the CPU reference before and after the timed loops, prints the LL buffer
// size beside DeepEP's get_low_latency_rdma_size_hint, and runs the NCCL all-to-all baseline at the same token count.
#include <cstdio>
#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <mutex>
#include <random>
#include <stdexcept>

#include "bench.hpp"
#include "bench_util.hpp"
#include "ll_check.hpp"
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

__global__ void empty_kernel() {}

// A kernel that takes as many parameter bytes as the LL dispatch kernel and does nothing: its launch
// beside empty_kernel's is what the dispatch's parameter block costs the host.
struct DispatchSizedParams {
  char bytes[sizeof(LowLatencyDispatchParams)];
};
__global__ void params_kernel(DispatchSizedParams) {}

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

template <typename T>
std::vector<T> download(const DevMem& m, size_t count) {
  std::vector<T> v(count);
  if (count) cuda_check(cudaMemcpy(v.data(), m.get(), count * sizeof(T), cudaMemcpyDeviceToHost), "download");
  return v;
}

// The ranks' bodies (ranks[i] through groups[i]; data and results indexed by rank). In-process
// runs (fake = false) time every op; a fake node's processes time one launch of each op (and no
// graphs, hook halves or kernel clocks: through a loopback net times mean nothing). Where the
// buffer takes the network path, each op's row carries the network bytes one call moved.
void run_ll_ranks(const Options& o, const LLShape& p, const std::vector<LLRankData>& data,
                  const std::vector<int>& ranks, const std::vector<std::shared_ptr<Group>>& groups, bool fake,
                  Report& report, std::vector<LLRankResult>& got, std::vector<LLRankResult>& got_last) {
  const int R = p.R, T = p.T, Tmax = p.Tmax, H = p.H, K = p.K, E = p.E, EL = p.EL, G = p.G;
  const int64_t RT = p.RT;
  const int local = static_cast<int>(ranks.size());
  std::mutex mu;
  testing::ThreadBarrier all_ranks(local);  // CUPTI recording is switched on and off while no rank launches
  bool clock_on = false;
  run_threads(local, [&](int i) {
    testing::LeaveOnThrow leave_on_throw(all_ranks);  // a rank that throws must not strand the others here
    const int r = ranks[i];
    const std::shared_ptr<Group>& group = groups[i];
    const int dev = group->device();
    cuda_check(cudaSetDevice(dev), "cudaSetDevice");
    BufferOptions bo;
    // EPCOMM_LL_NET=1 (with several nodes, e.g. EPCOMM_RANKS_PER_NODE) takes the network path,
    // whose area follows the two buffers.
    // Across real (or fake) nodes the network path is the only one, and past kMaxLsaRanks ranks too.
    const bool net_path = low_latency_net_requested() || fake || (R > kMaxLsaRanks && group->num_nodes() > 1);
    bo.num_rdma_bytes =
        net_path ? Buffer::low_latency_net_size_hint(Tmax, H, R, E) : Buffer::low_latency_size_hint(Tmax, H, R, E);
    bo.low_latency_mode = true;
    Buffer buf(group, bo);
    const bool net = buf.low_latency_uses_network();
    if ((r == 0 && net) || (fake && !net)) {
      std::lock_guard<std::mutex> lock(mu);
      report.checks.push_back(net ? "low-latency path: ranks of other nodes through the network transport (" +
                                        std::to_string(group->ranks_per_node()) + " ranks per node)"
                                  : "low-latency path of rank " + std::to_string(r) +
                                        ": NOT the network transport across fake nodes");
      report.ok = report.ok && net;
    }
    cudaStream_t stream;
    cuda_check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
    const StreamOrder order{stream, nullptr, false};
    cudaDeviceProp prop{};
    cuda_check(cudaGetDeviceProperties(&prop, dev), "props");
    const int sms =
        o.sms_given && !o.sms.empty() ? std::min(o.sms.front(), prop.multiProcessorCount) : prop.multiProcessorCount;
    const LLRankData& d = data[r];
    DevMem x(d.x), topk(d.topk), weights(d.weights), y(d.y);
    DevMem recv8(static_cast<size_t>(EL) * RT * H), recv16(static_cast<size_t>(EL) * RT * H * 2);
    DevMem scales(sizeof(float) * EL * G * RT), count(sizeof(int32_t) * EL), src(sizeof(int32_t) * EL * RT);
    DevMem range(sizeof(int64_t) * EL * R), out(static_cast<size_t>(T) * H * 2);

    LowLatencyDispatchInputs din;
    din.x = view(x, DType::kBF16, {T, H}, dev);
    din.topk_idx = view(topk, DType::kI64, {T, K}, dev);
    din.num_max_dispatch_tokens_per_rank = Tmax;
    din.num_experts = E;
    din.num_sms = sms;
    LowLatencyDispatchOutputs d8;
    d8.recv_x = view(recv8, DType::kFP8E4M3, {EL, RT, H}, dev);
    d8.recv_x_scales = strided(scales, DType::kF32, {EL, RT, G}, {G * RT, 1, RT}, dev);
    d8.recv_count = view_i32(count, {EL}, dev);
    d8.src_info = view_i32(src, {EL, RT}, dev);
    d8.layout_range = view(range, DType::kI64, {EL, R}, dev);
    LowLatencyDispatchOutputs d16 = d8;
    d16.recv_x = view(recv16, DType::kBF16, {EL, RT, H}, dev);
    d16.recv_x_scales.reset();
    LowLatencyDispatchInputs din16 = din;
    din16.use_fp8 = false;
    LowLatencyCombineInputs cin;
    cin.x = view(y, DType::kBF16, {EL, RT, H}, dev);
    cin.topk_idx = din.topk_idx;
    cin.topk_weights = view(weights, DType::kF32, {T, K}, dev);
    cin.num_sms = sms;
    const TensorView outv = view(out, DType::kBF16, {T, H}, dev);
    LowLatencyHandle h8, h16, hh;

    // A dispatch and a combine whose outputs are checked: the first calls, and again after every
    // timed loop (a path that goes wrong only after many calls must not be timed silently).
    const auto checked_round = [&](LLRankResult& g) {
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
    // One call of fn with the network counters around it (its bytes beside the timing), then the
    // timed calls.
    auto timed_row = [&](const std::string& op, const std::function<void()>& fn, const std::string& note) {
      Buffer::LowLatencyNetStats st;
      if (net) {
        buf.low_latency_net_stats(/*reset=*/true);
        fn();
        cuda_check(cudaStreamSynchronize(stream), "counted call");
        st = buf.low_latency_net_stats(/*reset=*/true);
      }
      Row x{"epcomm",
            op,
            r,
            sms,
            time_us(stream, o.warmup, o.iters, fn),
            0,
            net ? note + "; NVLink bytes: no LL counter" : note};
      if (net) {
        x.net_bytes = static_cast<double>(st.bytes);
        x.net_puts = static_cast<double>(st.puts);
      }
      std::lock_guard<std::mutex> lock(mu);
      report.rows.push_back(x);
    };
    // EPCOMM_LL_PROBE=1: where one dispatch's time goes, per phase (ranks 0 and R-1).
    const auto probe = [&](const char* what) {
      const std::string s = buf.low_latency_probe_report();
      if (s.empty() || (r != 0 && r != R - 1)) return;
      std::lock_guard<std::mutex> lock(mu);
      std::fprintf(stderr, "[%s] %s\n", what, s.c_str());
    };
    if (o.dtype != "bf16") {
      timed_row(
          "ll-dispatch-fp8", [&] { buf.low_latency_dispatch(din, d8, h8, false, order); }, "one launch");
      buf.low_latency_dispatch(din, d8, h8, false, order);
      probe("fp8 dispatch, one launch, after the timed loop");
    }
    if (o.dtype != "fp8")
      timed_row(
          "ll-dispatch-bf16", [&] { buf.low_latency_dispatch(din16, d16, h16, false, order); }, "one launch");
    // A fresh dispatch, then combines of its handle (repeating a combine rewrites the same rows).
    buf.low_latency_dispatch(din, d8, h8, false, order);
    timed_row(
        "ll-combine", [&] { buf.low_latency_combine(cin, h8, outv, false, order); }, "bf16, one launch");
    if (fake) {
      checked_round(got_last[r]);
      cuda_check(cudaStreamSynchronize(stream), "final");
      buf.check_device_errors();
      cudaStreamDestroy(stream);
      return;
    }

    // An even number of dispatches per graph, so replays keep alternating the two buffers.
    const int graph_iters = std::max(2, o.iters + (o.iters & 1));
    row("ll-dispatch-fp8-graph",
        time_graph_us(stream, graph_iters, [&] { buf.low_latency_dispatch(din, d8, h8, false, order); }),
        "per call, calls replayed from one CUDA graph");
    buf.low_latency_dispatch(din, d8, h8, false, order);
    row("ll-combine-graph",
        time_graph_us(stream, graph_iters, [&] { buf.low_latency_combine(cin, h8, outv, false, order); }),
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

    // Host time per call from C++ (no allocations: the outputs are the bench's own), and an empty
    // kernel's launch beside it: what the Python layer's host time sits on.
    row("ll-dispatch-fp8-host",
        time_host_us(stream, o.warmup, o.iters, [&] { buf.low_latency_dispatch(din, d8, h8, false, order); }),
        "host time per call (host clock around it)");
    buf.low_latency_dispatch(din, d8, h8, false, order);
    row("ll-combine-host",
        time_host_us(stream, o.warmup, o.iters, [&] { buf.low_latency_combine(cin, h8, outv, false, order); }),
        "host time per call (host clock around it)");
    row("host-empty-launch", time_host_us(stream, o.warmup, o.iters, [&] { empty_kernel<<<1, 32, 0, stream>>>(); }),
        "host time of an empty kernel's launch");
    // The other pieces of an eager call's host time in the core (BENCHMARKS run 87: the dispatch
    // takes ~2 us over an empty launch): the parameter block, and the stream bookkeeping of a call
    // on the caller's stream (Impl::note_direct_call: a capture query, the stream's id, an event).
    const DispatchSizedParams blob{};
    row("host-params-launch",
        time_host_us(stream, o.warmup, o.iters, [&] { params_kernel<<<1, 32, 0, stream>>>(blob); }),
        "host time of an empty kernel's launch with " + std::to_string(sizeof(blob)) + " parameter bytes");
    cudaEvent_t probe_event = nullptr;
    cuda_check(cudaEventCreateWithFlags(&probe_event, cudaEventDisableTiming), "event");
    row("host-stream-bookkeeping",
        time_host_us(stream, o.warmup, o.iters,
                     [&] {
                       cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
                       unsigned long long id = 0;
                       cuda_check(cudaSetDevice(dev), "cudaSetDevice");
                       cuda_check(cudaStreamIsCapturing(stream, &status), "cudaStreamIsCapturing");
                       cuda_check(cudaStreamGetId(stream, &id), "cudaStreamGetId");
                       cuda_check(cudaEventRecord(probe_event, stream), "cudaEventRecord");
                     }),
        "cudaSetDevice, cudaStreamIsCapturing, cudaStreamGetId and cudaEventRecord on the caller's stream");
    cuda_check(cudaEventDestroy(probe_event), "event");
    // clean_low_latency_buffer at this shape (one kernel within a node: both barriers and the
    // zeroing of the LL flags). Later calls start from fresh handles.
    const LowLatencyLayout cl = LowLatencyLayout::make(Tmax, H, R, E);
    row("ll-clean", time_us(stream, o.warmup, o.iters, [&] { buf.clean_low_latency_buffer(Tmax, H, E, stream); }),
        "barrier, zero the LL flags (" + std::to_string((2 * (cl.flags_end(0) - cl.flags_begin(0))) >> 10) +
            " KiB of the " + std::to_string(buf.low_latency_size_hint(Tmax, H, R, E) >> 20) + " MiB region), barrier");

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
}

// The problem's line and the buffer-size and path checks.
void describe_ll(const LLShape& p, bool fake, Report& report) {
  const int R = p.R, Tmax = p.Tmax, H = p.H, E = p.E;
  report.ranks = R;
  const std::string problem = "low-latency: tokens " + std::to_string(p.T) + "/rank (Tmax " + std::to_string(Tmax) +
                              "), hidden " + std::to_string(H) + ", top-" + std::to_string(p.K) + ", " +
                              std::to_string(E) + " experts, uniform routing";
  report.problem = report.problem.empty() ? problem : report.problem + " | " + problem;
  if (fake) return;  // across nodes: the network path's buffer, no per-rank paths
  const size_t ours = Buffer::low_latency_size_hint(Tmax, H, R, E);
  const size_t deepep = deepep_low_latency_size_hint(Tmax, H, R, E);
  report.checks.push_back("low-latency buffer: epcomm " + std::to_string(ours) + " bytes (" +
                          std::to_string(ours >> 20) + " MiB) vs DeepEP get_low_latency_rdma_size_hint " +
                          std::to_string(deepep) + " bytes (" + std::to_string(deepep >> 20) + " MiB), ratio " +
                          std::to_string(static_cast<double>(ours) / static_cast<double>(deepep)));
  if (ours > deepep) report.ok = false;
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
  report.checks.push_back(
      "low-latency paths (EPCOMM_LL_PER_RANK=" + std::to_string(low_latency_per_rank_level()) + "): dispatch fp8 " +
      path(true) + ", dispatch bf16 " + path(false) + ", combine " +
      (kind == LowLatencyPartials::kNone
           ? std::string("per (token, expert)")
           : std::string("per-rank (") + low_latency_partials_name(kind) + " partials per token and rank)"));
}

}  // namespace

void run_gpu_low_latency(const Options& o, Report& report) {
  const int R = gpu_ranks(o.ranks);
  const LLShape p = ll_shape(o, R);
  if (report.device.empty()) report.device = device_description(R);
  describe_ll(p, false, report);
  const uint64_t seed = o.seed ? o.seed : std::random_device{}();
  std::vector<LLRankData> data(R);
  run_threads(R, [&](int r) { data[r] = make_ll_rank_data(p, seed, r); });
  std::vector<int> ranks(R);
  for (int r = 0; r < R; ++r) ranks[r] = r;
  std::vector<LLRankResult> got(R), got_last(R);  // first checked round, and the one after the timed loops
  {
    auto groups = create_nccl_groups(R, ranks, ranks, 0);
    run_ll_ranks(o, p, data, ranks, groups, false, report, got, got_last);
    destroy_groups(groups);
  }
  if (o.verify) check_ll(p, data, got, got_last, /*over_network=*/false, report);

  if (o.baseline) {
    Options base = o;
    base.tokens = p.T;
    base.hidden = p.H;
    base.experts = p.E;
    const size_t first = report.rows.size();
    run_nccl_baseline(base, report);
    for (size_t i = first; i < report.rows.size(); ++i) report.rows[i].op += "@" + std::to_string(p.T) + "tok";
  }
}

std::string ll_results_path(const std::string& dir, int rank) {
  return dir + "/ll-rank" + std::to_string(rank) + ".bin";
}

void run_gpu_low_latency_ranks(const Options& o, int R, uint64_t seed, const std::vector<int>& ranks,
                               const std::vector<std::shared_ptr<Group>>& groups, const std::string& dir,
                               Report& report) {
  const LLShape p = ll_shape(o, R);
  describe_ll(p, true, report);
  std::vector<LLRankData> data(R);  // this process's ranks only
  for (int r : ranks) data[r] = make_ll_rank_data(p, seed, r);
  std::vector<LLRankResult> got(R), got_last(R);
  run_ll_ranks(o, p, data, ranks, groups, true, report, got, got_last);
  for (int r : ranks) write_ll_results(ll_results_path(dir, r), got[r], got_last[r]);
}

void check_low_latency_results(const Options& o, int R, uint64_t seed, const std::string& dir, Report& report) {
  const LLShape p = ll_shape(o, R);
  std::vector<LLRankData> data(R);
  std::vector<LLRankResult> got(R), got_last(R);
  for (int r = 0; r < R; ++r) {
    data[r] = make_ll_rank_data(p, seed, r);
    read_ll_results(ll_results_path(dir, r), got[r], got_last[r]);
  }
  check_ll(p, data, got, got_last, /*over_network=*/true, report);
}

}  // namespace epcomm::bench
