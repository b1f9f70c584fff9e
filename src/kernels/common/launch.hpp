// Launch helpers shared by the kernel files.
#pragma once

#include <cuda_runtime.h>

#include <initializer_list>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "core/call_check.hpp"

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

// Runs `configure` once per device (every time on a device index past kMaxDevices). Each launcher
// keeps its own (a function-local static), for the kernels it launches.
class OncePerDevice {
 public:
  template <class F>
  void run(F&& configure) {
    int device = 0;
    EPCOMM_CUDA_CHECK(cudaGetDevice(&device));
    if (device >= 0 && device < kMaxDevices) std::call_once(configured_[device], configure);
    else configure();
  }

 private:
  static constexpr int kMaxDevices = 64;
  std::once_flag configured_[kMaxDevices];
};

// Sets each kernel's dynamic shared-memory limit to the device's maximum less `static_bytes` (the
// kernel's static shared memory). Launchers call it once per device (OncePerDevice), never lowering
// it: ranks driven by threads of one process launch a kernel concurrently with different sizes,
// and the launch path stays free of attribute calls.
inline void allow_max_dynamic_smem(std::initializer_list<const void*> kernels, int static_bytes = 0) {
  int device = 0, max_smem = 0;
  EPCOMM_CUDA_CHECK(cudaGetDevice(&device));
  EPCOMM_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  for (const void* kernel : kernels) {
    EPCOMM_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem - static_bytes));
  }
}

// CUDA loads each kernel at its first launch by default (CUDA_MODULE_LOADING=LAZY), and loading may
// wait until the device is idle. Ranks driven by threads of one process on one GPU would deadlock
// there: a rank's first launch of a kernel waits for a peer's kernel, which spins until this rank's
// kernel runs. So each kernel file registers every kernel a Buffer may launch, and the Buffer's
// constructor loads them all (preload_kernels) before its closing barrier, i.e. before any rank
// launches one. The GIN set (kernels over NCCL GIN, launched only across real nodes) is loaded only
// by buffers that use GIN.
enum class KernelSet : int { kAlways = 0, kGin = 1 };

inline std::vector<const void*>& kernel_registry(KernelSet set) {
  static std::vector<const void*> kernels[2];
  return kernels[static_cast<int>(set)];
}

// A file-scope object of each kernel file: registers its kernels during static initialization.
struct KernelRegistration {
  KernelRegistration(std::initializer_list<const void*> kernels, KernelSet set = KernelSet::kAlways) {
    std::vector<const void*>& r = kernel_registry(set);
    r.insert(r.end(), kernels.begin(), kernels.end());
  }
};

// Loads every registered kernel of the sets asked for on the current device (a no-op for those
// already loaded).
inline void preload_kernels(bool with_gin) {
  for (KernelSet set : {KernelSet::kAlways, KernelSet::kGin}) {
    if (set == KernelSet::kGin && !with_gin) continue;
    for (const void* kernel : kernel_registry(set)) {
      cudaFuncAttributes attributes{};
      EPCOMM_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    }
  }
}

}  // namespace epcomm
