// What both C++ examples share: CUDA error checks, device allocations, and one thread per GPU, each
// a rank of a group epcomm creates from one ncclUniqueId.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "epcomm/error.hpp"
#include "epcomm/group.hpp"

namespace example {

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

template <typename T>
T* device_alloc(size_t n) {
  T* p = nullptr;
  check(cudaMalloc(&p, sizeof(T) * (n ? n : 1)), "cudaMalloc");
  return p;
}

template <typename T>
T* device_copy(const std::vector<T>& host) {
  T* p = device_alloc<T>(host.size());
  check(cudaMemcpy(p, host.data(), sizeof(T) * host.size(), cudaMemcpyHostToDevice), "copy");
  return p;
}

// Runs rank_main(rank, R, group) on one thread per visible GPU (rank = device) and returns the
// process's exit status: 0 when every rank returned true, 1 otherwise (an epcomm::Error is printed
// and counts as a failure). Without a GPU it prints `no_gpu` and returns 0.
inline int run_on_every_gpu(const char* no_gpu,
                            const std::function<bool(int, int, std::shared_ptr<epcomm::Group>)>& rank_main) {
  int R = 0;
  if (cudaGetDeviceCount(&R) != cudaSuccess || R == 0) {
    std::printf("%s\n", no_gpu);
    return 0;
  }
  ncclUniqueId id;
  if (ncclGetUniqueId(&id) != ncclSuccess) return 1;
  std::vector<std::thread> threads;
  std::vector<int> failures(R, 0);
  for (int rank = 0; rank < R; ++rank)
    threads.emplace_back([&, rank] {
      try {
        check(cudaSetDevice(rank), "cudaSetDevice");
        failures[rank] = !rank_main(rank, R, epcomm::Group::create_nccl(id, R, rank, rank));
      } catch (const epcomm::Error& e) {
        std::fprintf(stderr, "rank %d: %s\n", rank, e.what());
        failures[rank] = 1;
      }
    });
  for (auto& t : threads) t.join();
  for (int f : failures)
    if (f) return 1;
  return 0;
}

}  // namespace example
