// The CUDA side of the GIN half: one private stream per GIN communicator, bounded waits on it, and
// the signal update. Only the GIN half calls CUDA, and only once a CUDA registration exists, so the
// net half (and the CPU test) runs where there is no GPU or driver.
#pragma once

#include <cuda.h>  // types of cuStreamWriteValue64 only: the driver is reached through cudart
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "nccl_plugin_abi.h"

namespace epcomm::loopback {

class CudaChannel {
 public:
  // Records the calling thread's current device (regMrSym runs on NCCL's caller thread, whose
  // device is the communicator's), and makes the stream there.
  ncclResult_t open();
  bool is_open() const { return stream_ != nullptr; }
  void close();

  // NCCL's progress thread never selects a device: every entry point that may touch CUDA calls this.
  ncclResult_t select_device() const;

  // Blocking copies on the private stream, each bounded by EPCOMM_LOOPBACK_TIMEOUT_MS. The stream
  // is created non-blocking: it must not wait behind the application's kernels on the legacy
  // default stream (those kernels may be spinning on the very signal this stream will write).
  ncclResult_t copy_to_host(void* dst, const void* src, size_t bytes, const char* what);
  ncclResult_t copy_to_device(void* dst, const void* src, size_t bytes, const char* what);
  // *signal += (op == INC ? 1 : value), ordered after every copy issued before it on this stream.
  ncclResult_t update_signal(uint64_t* signal, uint32_t op, uint64_t value);

 private:
  ncclResult_t wait(const char* what);

  using WriteValue64 = CUresult (*)(CUstream stream, CUdeviceptr addr, cuuint64_t value, unsigned int flags);
  int device_ = -1;
  cudaStream_t stream_ = nullptr;
  uint64_t* pinned_ = nullptr;  // [0] the signal read back, [1] its new value (fallback path)
  WriteValue64 write_value64_ = nullptr;
  bool write_value64_failed_ = false;
};

}  // namespace epcomm::loopback
