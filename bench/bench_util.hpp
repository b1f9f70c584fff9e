// Small helpers of epcomm-bench: device memory, views, timing, threads, random inputs.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <nccl.h>

#include "common/random_inputs.hpp"
#include "epcomm/group.hpp"
#include "epcomm/types.hpp"

namespace epcomm::bench {

using testing::random_bf16;
using testing::random_fp8;
using testing::random_scales;

inline void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

inline std::vector<float> random_floats(std::mt19937_64& rng, size_t n) { return testing::random_weights(rng, n); }
inline std::vector<int64_t> uniform_topk(std::mt19937_64& rng, int T, int K, int E) {
  return testing::random_topk(rng, T, testing::RoutingSpec{E, K, false, 0.0});
}

// Device memory of the current device, optionally initialised from a host vector.
class DevMem {
 public:
  explicit DevMem(size_t bytes) : bytes_(bytes) {
    void* p = nullptr;
    cuda_check(cudaMalloc(&p, std::max<size_t>(bytes, 16)), "cudaMalloc");
    ptr_ = std::shared_ptr<void>(p, [](void* q) { cudaFree(q); });
  }
  template <typename T>
  explicit DevMem(const std::vector<T>& host) : DevMem(host.size() * sizeof(T)) {
    if (!host.empty()) cuda_check(cudaMemcpy(get(), host.data(), bytes_, cudaMemcpyHostToDevice), "upload");
  }
  void* get() const { return ptr_.get(); }
  size_t bytes() const { return bytes_; }

 private:
  size_t bytes_;
  std::shared_ptr<void> ptr_;
};

inline TensorView view(const DevMem& m, DType dtype, std::initializer_list<int64_t> shape, int device) {
  return TensorView::contiguous(m.get(), dtype, shape, device);
}
inline TensorView view_i32(const DevMem& m, std::initializer_list<int64_t> shape, int device) {
  return view(m, DType::kI32, shape, device);
}
inline TensorView strided(const DevMem& m, DType dtype, std::initializer_list<int64_t> shape,
                          std::initializer_list<int64_t> strides, int device) {
  TensorView v = TensorView::contiguous(m.get(), dtype, shape, device);
  int i = 0;
  for (int64_t s : strides) v.strides[i++] = s;
  return v;
}

inline bool equal_bytes(const DevMem& m, const void* want, size_t bytes) {
  std::vector<uint8_t> got(bytes);
  if (bytes) cuda_check(cudaMemcpy(got.data(), m.get(), bytes, cudaMemcpyDeviceToHost), "download");
  return bytes == 0 || std::memcmp(got.data(), want, bytes) == 0;
}

// Median host microseconds of one call of fn (a host clock around it, the GPU left to run behind;
// synchronized every 50 calls outside the timed stretch so the launch queue never fills).
inline double time_host_us(cudaStream_t s, int warmup, int iters, const std::function<void()>& fn) {
  for (int i = 0; i < warmup; ++i) fn();
  cuda_check(cudaStreamSynchronize(s), "warmup");
  std::vector<double> t(iters);
  for (int i = 0; i < iters; ++i) {
    if (i % 50 == 0) cuda_check(cudaStreamSynchronize(s), "host time");
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    t[i] = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  }
  cuda_check(cudaStreamSynchronize(s), "host time");
  std::nth_element(t.begin(), t.begin() + iters / 2, t.end());
  return t[iters / 2];
}

// Median time of fn per call, in microseconds, from events on `stream` around each call.
inline double time_us(cudaStream_t stream, int warmup, int iters, const std::function<void()>& fn) {
  for (int i = 0; i < warmup; ++i) fn();
  cuda_check(cudaStreamSynchronize(stream), "warmup");
  std::vector<cudaEvent_t> ev(2 * iters);
  for (auto& e : ev) cuda_check(cudaEventCreate(&e), "event");
  for (int i = 0; i < iters; ++i) {
    cuda_check(cudaEventRecord(ev[2 * i], stream), "record");
    fn();
    cuda_check(cudaEventRecord(ev[2 * i + 1], stream), "record");
  }
  cuda_check(cudaStreamSynchronize(stream), "timed");
  std::vector<double> t(iters);
  for (int i = 0; i < iters; ++i) {
    float ms = 0;
    cuda_check(cudaEventElapsedTime(&ms, ev[2 * i], ev[2 * i + 1]), "elapsed");
    t[i] = ms * 1e3;
  }
  for (auto& e : ev) cudaEventDestroy(e);
  std::nth_element(t.begin(), t.begin() + iters / 2, t.end());
  return t[iters / 2];
}

// Medians of (start -> phase 1 done on `second`) and (-> phase 2 done on `first`) over iters calls.
template <typename Phase1, typename Phase2>
std::pair<double, double> split_dispatch_us(cudaStream_t first, cudaStream_t second, int iters, Phase1 phase1,
                                            Phase2 phase2) {
  std::vector<cudaEvent_t> ev(3 * iters);
  for (auto& e : ev) cuda_check(cudaEventCreate(&e), "event");
  for (int i = 0; i < iters; ++i) {
    cuda_check(cudaEventRecord(ev[3 * i], first), "record");
    auto plan = phase1();
    cuda_check(cudaEventRecord(ev[3 * i + 1], second), "record");
    phase2(plan);
    cuda_check(cudaEventRecord(ev[3 * i + 2], first), "record");
  }
  cuda_check(cudaStreamSynchronize(first), "split");
  std::vector<double> a(iters), b(iters);
  for (int i = 0; i < iters; ++i) {
    float x = 0, y = 0;
    cuda_check(cudaEventElapsedTime(&x, ev[3 * i], ev[3 * i + 1]), "elapsed");
    cuda_check(cudaEventElapsedTime(&y, ev[3 * i + 1], ev[3 * i + 2]), "elapsed");
    a[i] = x * 1e3;
    b[i] = y * 1e3;
  }
  for (auto& e : ev) cudaEventDestroy(e);
  std::nth_element(a.begin(), a.begin() + iters / 2, a.end());
  std::nth_element(b.begin(), b.begin() + iters / 2, b.end());
  return {a[iters / 2], b[iters / 2]};
}

// Ranks of a GPU run: --ranks, or every visible GPU (up to 8); one GPU per rank.
inline int gpu_ranks(int requested) {
  int gpus = 0;
  cuda_check(cudaGetDeviceCount(&gpus), "cudaGetDeviceCount");
  const int R = requested > 0 ? requested : std::min(gpus, 8);
  if (R > gpus)
    throw std::runtime_error("--ranks " + std::to_string(R) + " exceeds the " + std::to_string(gpus) + " GPUs");
  return R;
}

// Runs fn(rank) on n threads; rethrows the first failure.
inline void run_threads(int n, const std::function<void(int)>& fn) {
  std::vector<std::thread> th;
  std::vector<std::exception_ptr> err(n);
  for (int r = 0; r < n; ++r)
    th.emplace_back([&, r] {
      try {
        fn(r);
      } catch (...) {
        err[r] = std::current_exception();
      }
    });
  for (auto& t : th) t.join();
  for (auto& e : err)
    if (e) std::rethrow_exception(e);
}

// One NCCL group per rank of this process (ranks[i] on devices[i]) out of num_ranks, made together
// (ncclCommInitRank is collective); every rank of every process calls it with the same id.
inline std::vector<std::shared_ptr<Group>> create_nccl_groups(const ncclUniqueId& id, int num_ranks,
                                                              const std::vector<int>& ranks,
                                                              const std::vector<int>& devices, int ranks_per_node) {
  std::vector<std::shared_ptr<Group>> groups(ranks.size());
  run_threads(static_cast<int>(ranks.size()),
              [&](int i) { groups[i] = Group::create_nccl(id, num_ranks, ranks[i], devices[i], ranks_per_node); });
  return groups;
}
// The same for a run whose ranks are all threads of this process.
inline std::vector<std::shared_ptr<Group>> create_nccl_groups(int num_ranks, const std::vector<int>& ranks,
                                                              const std::vector<int>& devices, int ranks_per_node) {
  ncclUniqueId id;
  if (ncclGetUniqueId(&id) != ncclSuccess) throw std::runtime_error("ncclGetUniqueId failed");
  return create_nccl_groups(id, num_ranks, ranks, devices, ranks_per_node);
}

// Drops the groups, each on a thread of its own, all at once (as the ranks' own threads would: an
// NCCL communicator's teardown may wait for the other ranks').
inline void destroy_groups(std::vector<std::shared_ptr<Group>>& groups) {
  run_threads(static_cast<int>(groups.size()), [&](int i) { groups[i].reset(); });
  groups.clear();
}

inline std::string device_description(int n) {
  cudaDeviceProp p{};
  cuda_check(cudaGetDeviceProperties(&p, 0), "props");
  return std::to_string(n) + " x " + p.name + " (" + std::to_string(p.multiProcessorCount) + " SMs)";
}

}  // namespace epcomm::bench
