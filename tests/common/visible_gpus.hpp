// The number of GPUs this process sees (0 where CUDA finds none or fails), for the programs that
// start one process per fake node (epcomm_gin_tests, epcomm-bench --fake-nodes).
#pragma once

#include <cuda_runtime_api.h>

namespace epcomm::testing {

inline int visible_gpu_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear it, so that a later CUDA call does not report it
    return 0;
  }
  return n;
}

}  // namespace epcomm::testing
