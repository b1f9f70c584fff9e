// Low-latency dispatch across nodes (EPCOMM_LL_NET / BufferOptions::low_latency_net, ll_net.cuh):
// the per-expert path (dispatch_per_expert.cuh) with sends to ranks of other nodes through the
// emulated transport (virtual nodes) or NCCL GIN (real nodes). The per-rank path has no network
// variant.
#include <cuda_runtime.h>

#include "core/call_check.hpp"
#include "kernels/common/launch.hpp"
#include "kernels/low_latency/dispatch_per_expert.cuh"
#include "kernels/low_latency/ll_net.cuh"
#include "kernels/low_latency/ll_net_gin.cuh"

namespace epcomm {
namespace {

using namespace epcomm::dev;

// Network path (ll_net.cuh): the per-expert kernel with sends to ranks of other nodes through the
// transport. NetParams: EmulatedNetParams (virtual nodes) or GinNetParams (real nodes).
template <class NetParams>
__global__ void __launch_bounds__(kLowLatencyThreads, 1)
    low_latency_dispatch_net_kernel(const __grid_constant__ LowLatencyDispatchParams p,
                                    const __grid_constant__ LowLatencyNetArgs a, const __grid_constant__ NetParams np) {
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ NetSendSmem ns;
  const auto net = make_ll_net(p, a, np);
  const bool send = (p.phases & kLowLatencySend) != 0;
  const bool recv = (p.phases & kLowLatencyRecv) != 0;
  const uint32_t seq =
      send ? ld_volatile(&p.state->dispatch_seq) + 1u : ld_volatile(&p.state->buffer_dispatch_seq[p.buffer]);
  if (send && !call_number_left(p.common.wait, seq)) return;  // a receive half's number was checked by its send
  if (send) {
    const SendSmem sm = carve_send_smem(p.layout, smem);
    dispatch_send(p, seq, sm, net, &ns);
    publish_dispatch(p, seq);
  }
  if (recv) {
    dispatch_recv(p, seq, net);
    finish_dispatch_recv_net(p, net, &ns);
  }
}
static_assert(sizeof(NetSendSmem) <= kLowLatencyNetStaticSmem, "kLowLatencyNetStaticSmem");

template <class NetParams>
void launch_dispatch_net_kernel(const LowLatencyDispatchParams& p, const LowLatencyNetArgs& a, const NetParams& np,
                                int num_blocks, int smem_bytes, void* stream) {
  static OncePerDevice configured;
  configured.run([] {
    allow_max_dynamic_smem({reinterpret_cast<const void*>(low_latency_dispatch_net_kernel<NetParams>)},
                           kLowLatencyNetStaticSmem);
  });
  low_latency_dispatch_net_kernel<NetParams>
      <<<num_blocks, kLowLatencyThreads, smem_bytes, static_cast<cudaStream_t>(stream)>>>(p, a, np);
  EPCOMM_LAUNCH_CHECK("low_latency_dispatch_net_kernel");
}

const KernelRegistration kKernels{reinterpret_cast<const void*>(low_latency_dispatch_net_kernel<EmulatedNetParams>)};
const KernelRegistration kGinKernels({reinterpret_cast<const void*>(low_latency_dispatch_net_kernel<GinNetParams>)},
                                     KernelSet::kGin);

}  // namespace

void launch_low_latency_dispatch_net(const LowLatencyDispatchParams& p, const LowLatencyNetArgs& a,
                                     const EmulatedNetParams& net, int num_blocks, int smem_bytes, void* stream) {
  launch_dispatch_net_kernel(p, a, net, num_blocks, smem_bytes, stream);
}

// The same over NCCL GIN (Buffer launches it when its group spans real nodes).
void launch_low_latency_dispatch_gin(const LowLatencyDispatchParams& p, const LowLatencyNetArgs& a,
                                     const GinNetParams& g, int num_blocks, int smem_bytes, void* stream) {
  launch_dispatch_net_kernel(p, a, g, num_blocks, smem_bytes, stream);
}

}  // namespace epcomm
