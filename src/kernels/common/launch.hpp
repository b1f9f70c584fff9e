// Launch helpers shared by the kernel files.
#pragma once

#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <utility>

#include "core/check.hpp"

namespace epcomm {

// Raises a kernel's dynamic shared-memory limit only when a launch on this device needs more than
// it was given before (the attribute call would otherwise cost microseconds on every launch).
inline void allow_dynamic_smem(const void* kernel, int bytes) {
  static std::mutex mu;
  static std::map<std::pair<int, const void*>, int> granted;
  int device = 0;
  EPCOMM_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mu);
  int& have = granted[{device, kernel}];
  if (have >= bytes) return;
  EPCOMM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  have = bytes;
}

}  // namespace epcomm
