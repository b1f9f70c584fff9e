#include "transport/nccl_wait.hpp"

#include <chrono>
#include <string>
#include <thread>

#include "core/call_check.hpp"
#include "epcomm/error.hpp"

namespace epcomm {

void wait_nccl_or_abort(ncclComm_t comm, bool owned, cudaStream_t stream, int64_t timeout_ms, const char* what,
                        int rank, int size, bool* aborted) {
  const auto abort = [&]() -> std::string {
    if (!owned) return "; the communicator is the caller's (Group::from_nccl): abort it with ncclCommAbort";
    ncclCommAbort(comm);  // stops the NCCL kernels the stream waits for
    *aborted = true;
    return "; the communicator was aborted, this buffer and group can only be destroyed";
  };
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  const std::string where = std::string(what) + " on rank " + std::to_string(rank) + " of " + std::to_string(size);
  for (int polls = 0;; ++polls) {
    const cudaError_t e = cudaStreamQuery(stream);
    if (e == cudaSuccess) return;
    if (e != cudaErrorNotReady) EPCOMM_CUDA_CHECK(e);
    ncclResult_t async = ncclSuccess;
    if (ncclCommGetAsyncError(comm, &async) == ncclSuccess && async != ncclSuccess && async != ncclInProgress) {
      const std::string nccl_says = ncclGetLastError(comm) ? ncclGetLastError(comm) : "";
      throw RuntimeFailure(where + ": NCCL reported " + ncclGetErrorString(async) +
                           (nccl_says.empty() ? std::string() : " (" + nccl_says + ")") +
                           " (a peer process died or its network failed)" + abort());
    }
    if (std::chrono::steady_clock::now() > deadline)
      throw TimeoutError(where + ": the other ranks did not take part within " + std::to_string(timeout_ms) +
                         " ms (a rank that died or stopped calling; EPCOMM_TIMEOUT_MS)" + abort());
    // Short polls first (the usual barrier takes microseconds), then at most every millisecond.
    std::this_thread::sleep_for(std::chrono::microseconds(polls < 100 ? 10 : 1000));
  }
}

}  // namespace epcomm
