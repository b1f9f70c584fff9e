// The one place that touches NCCL's device API on the host side of setup: which ranks share the
// NVLink (LSA) domain, and the load/store address of each peer's part of a symmetric window.
#include <nccl.h>
#include <nccl_device.h>

#include "core/call_check.hpp"
#include "transport/nccl_lsa.hpp"

namespace epcomm {
namespace {

__global__ void lsa_pointers_kernel(ncclWindow_t window, const int* lsa_index, void** out, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x)
    out[i] = lsa_index[i] >= 0 ? ncclGetLsaPointer(window, 0, lsa_index[i]) : nullptr;
}

}  // namespace

int nccl_lsa_size(ncclComm_t comm) { return ncclTeamLsa(comm).nRanks; }

std::vector<void*> nccl_lsa_peer_pointers(ncclComm_t comm, ncclWindow_t window, cudaStream_t stream) {
  int n = 0;
  EPCOMM_NCCL_CHECK(ncclCommCount(comm, &n));
  const ncclTeam_t world = ncclTeamWorld(comm);
  const ncclTeam_t lsa = ncclTeamLsa(comm);
  std::vector<int> index(n, -1);
  for (int peer = 0; peer < n; ++peer)
    if (ncclTeamRankIsMember(lsa, world, peer)) index[peer] = ncclTeamRankToTeam(lsa, world, peer);
  int* d_index = nullptr;
  void** d_out = nullptr;
  EPCOMM_CUDA_CHECK(cudaMallocAsync(&d_index, sizeof(int) * n, stream));
  EPCOMM_CUDA_CHECK(cudaMallocAsync(&d_out, sizeof(void*) * n, stream));
  EPCOMM_CUDA_CHECK(cudaMemcpyAsync(d_index, index.data(), sizeof(int) * n, cudaMemcpyHostToDevice, stream));
  lsa_pointers_kernel<<<1, 128, 0, stream>>>(window, d_index, d_out, n);
  EPCOMM_LAUNCH_CHECK("lsa_pointers_kernel");
  std::vector<void*> out(n);
  EPCOMM_CUDA_CHECK(cudaMemcpyAsync(out.data(), d_out, sizeof(void*) * n, cudaMemcpyDeviceToHost, stream));
  EPCOMM_CUDA_CHECK(cudaFreeAsync(d_index, stream));
  EPCOMM_CUDA_CHECK(cudaFreeAsync(d_out, stream));
  EPCOMM_CUDA_CHECK(cudaStreamSynchronize(stream));
  return out;
}

}  // namespace epcomm
