// The CUDA side of the GIN half (loopback_cuda.h).
#include "loopback_cuda.h"

#include <thread>

#include "loopback_socket.h"

#define LB_CUDACHECK(expr, what)                                                            \
  do {                                                                                      \
    cudaError_t lb_err_ = (expr);                                                           \
    if (lb_err_ != cudaSuccess) {                                                           \
      LB_WARN("loopback gin: %s: %s failed: %s", what, #expr, cudaGetErrorString(lb_err_)); \
      return ncclUnhandledCudaError;                                                        \
    }                                                                                       \
  } while (0)

namespace epcomm::loopback {

ncclResult_t CudaChannel::open() {
  if (stream_) return ncclSuccess;
  LB_CUDACHECK(cudaGetDevice(&device_), "setting up the GIN copy stream");
  LB_CUDACHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "setting up the GIN copy stream");
  // Pinned, so that the 8-byte signal read is a real stream-ordered copy.
  LB_CUDACHECK(cudaHostAlloc(reinterpret_cast<void**>(&pinned_), 2 * sizeof(uint64_t), cudaHostAllocDefault),
               "setting up the GIN copy stream");
  // cuStreamWriteValue64 writes the signal as one 64-bit store, after the stream's earlier work
  // (its default flag keeps the memory barrier before the write). Found through cudart, so the
  // plugin does not link libcuda (the net half must load where there is no driver).
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found{};
  if (cudaGetDriverEntryPointByVersion("cuStreamWriteValue64", &fn, 12000, cudaEnableDefault, &found) == cudaSuccess &&
      found == cudaDriverEntryPointSuccess) {
    write_value64_ = reinterpret_cast<WriteValue64>(fn);
  } else {
    LB_INFO("loopback gin: cuStreamWriteValue64 not found; signals are written with an 8-byte cudaMemcpyAsync");
  }
  LB_INFO("loopback gin: copy stream on CUDA device %d", device_);
  return ncclSuccess;
}

void CudaChannel::close() {
  if (!stream_) return;
  if (select_device() == ncclSuccess) {
    cudaStreamDestroy(stream_);
    cudaFreeHost(pinned_);
  }
  stream_ = nullptr;
  pinned_ = nullptr;
}

ncclResult_t CudaChannel::select_device() const {
  int current = -1;
  LB_CUDACHECK(cudaGetDevice(&current), "selecting the GIN device");
  if (current != device_) LB_CUDACHECK(cudaSetDevice(device_), "selecting the GIN device");
  return ncclSuccess;
}

ncclResult_t CudaChannel::wait(const char* what) {
  const Deadline deadline(timeout_ms());
  for (;;) {
    const cudaError_t e = cudaStreamQuery(stream_);
    if (e == cudaSuccess) return ncclSuccess;
    if (e != cudaErrorNotReady) {
      LB_WARN("loopback gin: %s on device %d failed: %s", what, device_, cudaGetErrorString(e));
      return ncclUnhandledCudaError;
    }
    if (deadline.expired()) {
      LB_WARN("loopback gin: %s on device %d did not finish within %d ms (EPCOMM_LOOPBACK_TIMEOUT_MS)", what, device_,
              timeout_ms());
      return ncclSystemError;
    }
    std::this_thread::yield();
  }
}

ncclResult_t CudaChannel::copy_to_host(void* dst, const void* src, size_t bytes, const char* what) {
  LB_CHECK(select_device());
  LB_CUDACHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_), what);
  return wait(what);
}

ncclResult_t CudaChannel::copy_to_device(void* dst, const void* src, size_t bytes, const char* what) {
  LB_CHECK(select_device());
  LB_CUDACHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_), what);
  return wait(what);
}

ncclResult_t CudaChannel::update_signal(uint64_t* signal, uint32_t op, uint64_t value) {
  LB_CHECK(select_device());
  // The read is ordered after this stream's data copies, and the wait makes both complete before
  // the new value is written: data first, then the signal. One thread (the progress thread) updates
  // a communicator's signals, so the read-modify-write does not race with another update.
  LB_CUDACHECK(cudaMemcpyAsync(&pinned_[0], signal, sizeof(uint64_t), cudaMemcpyDeviceToHost, stream_),
               "reading a GIN signal");
  LB_CHECK(wait("reading a GIN signal"));
  const uint64_t next = pinned_[0] + (op == abi::kSignalOpInc ? 1 : value);
  if (write_value64_ && !write_value64_failed_) {
    const CUresult r = write_value64_(reinterpret_cast<CUstream>(stream_), reinterpret_cast<CUdeviceptr>(signal), next,
                                      CU_STREAM_WRITE_VALUE_DEFAULT);
    if (r == CUDA_SUCCESS) return wait("writing a GIN signal");
    // Devices without 64-bit stream memory operations refuse it; the copy below still works.
    LB_INFO("loopback gin: cuStreamWriteValue64 failed (CUresult %d); signals are written with cudaMemcpyAsync",
            static_cast<int>(r));
    write_value64_failed_ = true;
  }
  pinned_[1] = next;
  LB_CUDACHECK(cudaMemcpyAsync(signal, &pinned_[1], sizeof(uint64_t), cudaMemcpyHostToDevice, stream_),
               "writing a GIN signal");
  return wait("writing a GIN signal");
}

}  // namespace epcomm::loopback
