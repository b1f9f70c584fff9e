// Shrink mode's mask API (Buffer::low_latency_*_mask_buffer): a one-warp kernel on the caller's
// stream, so it orders with the LL calls on that stream and can be captured in a CUDA graph.
#include <cuda_runtime.h>

#include "core/call_check.hpp"
#include "kernels/common/launch.hpp"
#include "kernels/low_latency/params.hpp"

namespace epcomm {
namespace {

__global__ void low_latency_set_mask_kernel(int32_t* mask, int num_ranks, int rank, int value) {
  for (int r = static_cast<int>(threadIdx.x); r < num_ranks; r += static_cast<int>(blockDim.x))
    if (rank < 0 || r == rank) mask[r] = value;
  __threadfence_system();
}

const KernelRegistration kKernels{reinterpret_cast<const void*>(low_latency_set_mask_kernel)};

}  // namespace

void launch_low_latency_set_mask(int32_t* mask, int num_ranks, int rank, int value, void* stream) {
  low_latency_set_mask_kernel<<<1, 32, 0, static_cast<cudaStream_t>(stream)>>>(mask, num_ranks, rank, value);
  EPCOMM_LAUNCH_CHECK("low_latency_set_mask_kernel");
}

}  // namespace epcomm
