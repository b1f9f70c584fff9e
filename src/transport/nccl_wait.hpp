// Host waits on NCCL work that a dead or stalled peer could hold forever (the group's barrier and
// all-gather at setup and teardown): bounded by the buffer's timeout, and on expiry the
// communicator is aborted, so the NCCL kernels stop and the caller gets a TimeoutError instead of
// a process that never exits.
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstdint>

namespace epcomm {

// Waits for `stream` (which holds NCCL work on `comm`) at most `timeout_ms`. On expiry, or when NCCL
// reports an asynchronous error (a peer that vanished), throws a TimeoutError / RuntimeFailure
// naming `what`, this rank and the group size; first, where `owned` (epcomm made the communicator),
// aborts `comm` and sets *aborted. A borrowed communicator is the caller's to abort.
void wait_nccl_or_abort(ncclComm_t comm, bool owned, cudaStream_t stream, int64_t timeout_ms, const char* what,
                        int rank, int size, bool* aborted);

}  // namespace epcomm
