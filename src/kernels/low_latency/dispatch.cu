// Low-latency dispatch (see params.hpp for the scheme): the per-expert path's kernel and the host
// side of every dispatch launch. One kernel, two halves (send, receive); without a hook both run in
// one launch, with a hook two launches. The pieces:
//   dispatch_per_expert.cuh     the per-expert path's halves (one message per (token, k)), templates
//                               over the network: this file's kernel and dispatch_net.cu's
//   dispatch_per_rank_send.cuh  the per-rank path's send half (a token once per destination rank)
//   dispatch_per_rank.cu        its receive half (the fan-out into the rows) and kernel
//   dispatch_net.cu             the per-expert kernel across nodes (emulated transport, GIN)
//   dispatch_common.cuh         what both paths share; dispatch_smem.cuh: their shared memory
#include <cuda_runtime.h>

#include <algorithm>

#include "core/call_check.hpp"
#include "kernels/common/launch.hpp"
#include "kernels/low_latency/dispatch_per_expert.cuh"
#include "kernels/low_latency/dispatch_smem.cuh"

namespace epcomm {
namespace {

using namespace epcomm::dev;

// The per-expert path's kernel (p.per_rank false; the per-rank path has its own kernel, with its
// own registers: dispatch_per_rank.cu). kProbe: EPCOMM_LL_PROBE's instance.
template <bool kProbe>
__global__ void __launch_bounds__(kLowLatencyThreads, 1)
    low_latency_dispatch_kernel(const __grid_constant__ LowLatencyDispatchParams p) {
  extern __shared__ __align__(16) uint8_t smem[];
  const bool send = (p.phases & kLowLatencySend) != 0;
  const bool recv = (p.phases & kLowLatencyRecv) != 0;
  // Every block reads the number before any block can publish it (publishing waits for all).
  probe_mark<kProbe>(p, send ? kProbeEntry : kProbeRecvEntry);
  const uint32_t seq =
      send ? ld_volatile(&p.state->dispatch_seq) + 1u : ld_volatile(&p.state->buffer_dispatch_seq[p.buffer]);
  if (send && !call_number_left(p.common.wait, seq)) return;  // a receive half's number was checked by its send
  if (send) {
    const LowLatencyLayout& L = p.layout;
    SendSmem sm = carve_send_smem(L, smem);
    dispatch_send<LLNoNet, kProbe>(p, seq, sm, LLNoNet{}, nullptr);
    publish_dispatch(p, seq);  // starts with a barrier: the receive half may reuse the shared memory
    probe_mark<kProbe>(p, kProbePublished);
  }
  if (recv) {
    if (send) probe_mark<kProbe>(p, kProbeRecvEntry);
    dispatch_recv(p, seq, LLNoNet{});
    if constexpr (kProbe) {
      __syncthreads();
      probe_mark<kProbe>(p, kProbeRecvDone);
    }
  }
}

const KernelRegistration kKernels{reinterpret_cast<const void*>(low_latency_dispatch_kernel<false>),
                                  reinterpret_cast<const void*>(low_latency_dispatch_kernel<true>)};

}  // namespace

int low_latency_dispatch_shared_bytes(const LowLatencyLayout& layout, int num_blocks, int staging_buffers,
                                      bool per_rank) {
  if (per_rank)
    return static_cast<int>(dev::per_rank_staging_offset(layout, num_blocks) +
                            static_cast<size_t>(staging_buffers) * layout.msg_bytes);
  return static_cast<int>(align_up(sizeof(int32_t) * dev::send_smem_ints(layout.num_experts, num_blocks), 16) +
                          static_cast<size_t>(staging_buffers) * layout.msg_bytes);
}

int low_latency_dispatch_recv_shared_bytes(const LowLatencyLayout& layout, bool per_rank) {
  return per_rank ? static_cast<int>(sizeof(int32_t) * dev::recv_smem_ints(layout.num_experts, layout.num_ranks)) : 0;
}

int low_latency_dispatch_launch_shared_bytes(const LowLatencyLayout& layout, int num_blocks, int staging_buffers,
                                             bool per_rank, int phases) {
  const bool send = (phases & kLowLatencySend) != 0, recv = (phases & kLowLatencyRecv) != 0;
  const int recv_bytes = recv ? low_latency_dispatch_recv_shared_bytes(layout, per_rank) : 0;
  if (!send) return recv_bytes;
  if (per_rank && recv)  // the receive half's ints follow the send half's (low_latency_dispatch_per_rank_kernel)
    return static_cast<int>(dev::per_rank_recv_offset(layout, num_blocks, staging_buffers)) + recv_bytes;
  return std::max(low_latency_dispatch_shared_bytes(layout, num_blocks, staging_buffers, per_rank), recv_bytes);
}

void launch_low_latency_dispatch(const LowLatencyDispatchParams& p, int num_blocks, int smem_bytes, void* stream) {
  if (p.per_rank) {
    launch_low_latency_dispatch_per_rank(p, num_blocks, smem_bytes, stream);
    return;
  }
  // The limit goes to the device's maximum once per device (allow_max_dynamic_smem says why; the
  // receive half uses no shared memory).
  static OncePerDevice configured;
  configured.run([] {
    allow_max_dynamic_smem({reinterpret_cast<const void*>(low_latency_dispatch_kernel<false>),
                            reinterpret_cast<const void*>(low_latency_dispatch_kernel<true>)});
  });
  const auto s = static_cast<cudaStream_t>(stream);
  if (p.probe != nullptr) low_latency_dispatch_kernel<true><<<num_blocks, kLowLatencyThreads, smem_bytes, s>>>(p);
  else low_latency_dispatch_kernel<false><<<num_blocks, kLowLatencyThreads, smem_bytes, s>>>(p);
  EPCOMM_LAUNCH_CHECK("low_latency_dispatch_kernel");
}

}  // namespace epcomm
