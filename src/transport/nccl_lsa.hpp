#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <vector>

namespace epcomm {

// Ranks in this rank's NVLink load/store domain.
int nccl_lsa_size(ncclComm_t comm);
// For every world rank: the address of its part of `window` (offset 0), or nullptr outside the domain.
std::vector<void*> nccl_lsa_peer_pointers(ncclComm_t comm, ncclWindow_t window, cudaStream_t stream);

}  // namespace epcomm
