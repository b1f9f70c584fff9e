#include "core/call_check.hpp"

#include <cstring>
#include <string>

namespace epcomm::detail {

void throw_cuda_failure(cudaError_t e, const char* call, const char* file, int line) {
  const char* base = std::strrchr(file, '/');
  throw RuntimeFailure(std::string("CUDA error ") + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ") in " +
                       call + " at " + (base ? base + 1 : file) + ":" + std::to_string(line));
}

void throw_nccl_failure(ncclResult_t r, const char* call, const char* file, int line) {
  const char* base = std::strrchr(file, '/');
  std::string last = ncclGetLastError(nullptr) ? ncclGetLastError(nullptr) : "";
  throw RuntimeFailure(std::string("NCCL error ") + ncclGetErrorString(r) + " in " + call + " at " +
                       (base ? base + 1 : file) + ":" + std::to_string(line) + (last.empty() ? "" : ": " + last));
}

void throw_launch_failure(cudaError_t e, const char* kernel_name, const char* file, int line) {
  const char* base = std::strrchr(file, '/');
  throw RuntimeFailure(std::string("CUDA error ") + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) +
                       ") launching " + kernel_name + " at " + (base ? base + 1 : file) + ":" + std::to_string(line));
}

}  // namespace epcomm::detail
