// get_dispatch_layout (docs/contract.md §3.1): per-rank, per-node and per-expert token counts and the
// token x rank membership matrix, from topk_idx. One thread per token; counts go through shared
// memory histograms, then one global atomic per bin per block. Outputs are zeroed by the launcher.
#include <cuda_runtime.h>

#include "core/call_check.hpp"
#include "kernels/common/launch.hpp"
#include "kernels/normal/params.hpp"

namespace epcomm {
namespace {

constexpr int kLayoutThreads = 256;
constexpr int kMaxRanksInMask = 64;  // a token's destination ranks as a 64-bit mask per word

__global__ void __launch_bounds__(kLayoutThreads) layout_kernel(LayoutParams p) {
  extern __shared__ int32_t smem[];
  int32_t* expert_hist = smem;                       // [E]
  int32_t* rank_hist = expert_hist + p.num_experts;  // [R]
  int32_t* node_hist = rank_hist + p.num_ranks;      // [nodes]
  const int num_nodes = p.num_ranks / p.ranks_per_node;
  for (int i = threadIdx.x; i < p.num_experts + p.num_ranks + num_nodes; i += blockDim.x) smem[i] = 0;
  __syncthreads();

  const int experts_per_rank = p.num_experts / p.num_ranks;
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t < p.num_tokens) {
    uint64_t rank_mask[(kMaxNvlRanks * 8 + kMaxRanksInMask - 1) / kMaxRanksInMask] = {};
    constexpr int kWords = sizeof(rank_mask) / sizeof(rank_mask[0]);
    uint64_t node_mask[kWords] = {};
    const int64_t* row = p.topk_idx + static_cast<int64_t>(t) * p.num_topk;
    for (int k = 0; k < p.num_topk; ++k) {
      const int64_t e = row[k];
      if (e < 0 || e >= p.num_experts) {
        if (e != -1) atomicCAS(p.invalid_index, -1, t * p.num_topk + k);
        continue;
      }
      atomicAdd(&expert_hist[e], 1);
      const int r = static_cast<int>(e) / experts_per_rank;
      const int n = r / p.ranks_per_node;
      rank_mask[r / 64] |= 1ull << (r % 64);
      node_mask[n / 64] |= 1ull << (n % 64);
    }
    uint8_t* in_rank = p.is_token_in_rank + static_cast<int64_t>(t) * p.num_ranks;
#pragma unroll
    for (int w = 0; w < kWords; ++w) {
      for (int r = w * 64; r < p.num_ranks && r < (w + 1) * 64; ++r) {
        const bool hit = (rank_mask[w] >> (r % 64)) & 1;
        in_rank[r] = hit;
        if (hit) atomicAdd(&rank_hist[r], 1);
      }
      for (int n = w * 64; n < num_nodes && n < (w + 1) * 64; ++n)
        if ((node_mask[w] >> (n % 64)) & 1) atomicAdd(&node_hist[n], 1);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < p.num_experts; i += blockDim.x)
    if (expert_hist[i]) atomicAdd(&p.num_tokens_per_expert[i], expert_hist[i]);
  for (int i = threadIdx.x; i < p.num_ranks; i += blockDim.x)
    if (rank_hist[i]) atomicAdd(&p.num_tokens_per_rank[i], rank_hist[i]);
  if (p.num_tokens_per_node != nullptr)
    for (int i = threadIdx.x; i < num_nodes; i += blockDim.x)
      if (node_hist[i]) atomicAdd(&p.num_tokens_per_node[i], node_hist[i]);
}

const KernelRegistration kKernels{reinterpret_cast<const void*>(layout_kernel)};

}  // namespace

void launch_layout(const LayoutParams& p, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const int num_nodes = p.num_ranks / p.ranks_per_node;
  EPCOMM_CUDA_CHECK(cudaMemsetAsync(p.num_tokens_per_expert, 0, sizeof(int32_t) * p.num_experts, stream));
  EPCOMM_CUDA_CHECK(cudaMemsetAsync(p.num_tokens_per_rank, 0, sizeof(int32_t) * p.num_ranks, stream));
  if (p.num_tokens_per_node)
    EPCOMM_CUDA_CHECK(cudaMemsetAsync(p.num_tokens_per_node, 0, sizeof(int32_t) * num_nodes, stream));
  if (p.num_tokens == 0) return;
  const int blocks = (p.num_tokens + kLayoutThreads - 1) / kLayoutThreads;
  const size_t smem = sizeof(int32_t) * (p.num_experts + p.num_ranks + num_nodes);
  if (smem > 48 * 1024)
    EPCOMM_CUDA_CHECK(
        cudaFuncSetAttribute(layout_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  layout_kernel<<<blocks, kLayoutThreads, smem, stream>>>(p);
  EPCOMM_LAUNCH_CHECK("layout_kernel");
}

}  // namespace epcomm
