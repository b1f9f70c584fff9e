// One macro per library that turns a failed call into an epcomm::RuntimeFailure naming the call
// and the place.
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <string>

#include "epcomm/error.hpp"

namespace epcomm::detail {

[[noreturn]] void throw_cuda_failure(cudaError_t e, const char* call, const char* file, int line);
[[noreturn]] void throw_nccl_failure(ncclResult_t r, const char* call, const char* file, int line);
[[noreturn]] void throw_launch_failure(cudaError_t e, const char* kernel_name, const char* file, int line);

}  // namespace epcomm::detail

#define EPCOMM_CUDA_CHECK(expr)                                                                                   \
  do {                                                                                                            \
    cudaError_t epcomm_err_ = (expr);                                                                             \
    if (epcomm_err_ != cudaSuccess) ::epcomm::detail::throw_cuda_failure(epcomm_err_, #expr, __FILE__, __LINE__); \
  } while (0)

#define EPCOMM_NCCL_CHECK(expr)                                                                                   \
  do {                                                                                                            \
    ncclResult_t epcomm_res_ = (expr);                                                                            \
    if (epcomm_res_ != ncclSuccess) ::epcomm::detail::throw_nccl_failure(epcomm_res_, #expr, __FILE__, __LINE__); \
  } while (0)

// After a kernel launch: launch-configuration errors surface here, with the kernel's name.
#define EPCOMM_LAUNCH_CHECK(kernel_name)                                                    \
  do {                                                                                      \
    cudaError_t epcomm_err_ = cudaPeekAtLastError();                                        \
    if (epcomm_err_ != cudaSuccess)                                                         \
      ::epcomm::detail::throw_launch_failure(epcomm_err_, kernel_name, __FILE__, __LINE__); \
  } while (0)
