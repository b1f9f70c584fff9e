// Low-latency combine across nodes (EPCOMM_LL_NET / BufferOptions::low_latency_net, ll_net.cuh):
// the per-expert path (combine_per_expert.cuh) with rows to origins of other nodes through the
// emulated transport (virtual nodes) or NCCL GIN (real nodes). The per-rank path has no network
// variant.
#include <cuda_runtime.h>

#include "core/call_check.hpp"
#include "kernels/common/launch.hpp"
#include "kernels/low_latency/combine_per_expert.cuh"
#include "kernels/low_latency/ll_net.cuh"
#include "kernels/low_latency/ll_net_gin.cuh"

namespace epcomm {
namespace {

using namespace epcomm::dev;

// Network path (ll_net.cuh): the per-expert combine with rows to origins of other nodes through
// the transport. NetParams: EmulatedNetParams (virtual nodes) or GinNetParams (real nodes).
template <class NetParams>
__global__ void __launch_bounds__(kLowLatencyThreads, 1)
    low_latency_combine_net_kernel(const __grid_constant__ LowLatencyCombineParams p,
                                   const __grid_constant__ LowLatencyNetArgs a, const __grid_constant__ NetParams np) {
  __shared__ NetCombineSmem ns;
  const auto net = make_ll_net(p, a, np);
  const bool send = (p.phases & kLowLatencySend) != 0;
  const bool recv = (p.phases & kLowLatencyRecv) != 0;
  const uint32_t seq =
      send ? ld_volatile(&p.state->combine_seq) + 1u : ld_volatile(&p.state->buffer_combine_seq[p.buffer]);
  if (send && !call_number_left(p.common.wait, seq)) return;  // a receive half's number was checked by its send
  if (send) {
    combine_send(p, seq, net, &ns);
    finish_combine_send(p, seq, net);
  }
  if (recv) {
    combine_recv(p, seq, net, &ns);
    finish_combine_recv_net(p, net, &ns);
  }
}
static_assert(sizeof(NetCombineSmem) <= kLowLatencyNetStaticSmem, "kLowLatencyNetStaticSmem");

const KernelRegistration kKernels{reinterpret_cast<const void*>(low_latency_combine_net_kernel<EmulatedNetParams>)};
const KernelRegistration kGinKernels({reinterpret_cast<const void*>(low_latency_combine_net_kernel<GinNetParams>)},
                                     KernelSet::kGin);

}  // namespace

void launch_low_latency_combine_net(const LowLatencyCombineParams& p, const LowLatencyNetArgs& a,
                                    const EmulatedNetParams& net, int num_blocks, void* stream) {
  low_latency_combine_net_kernel<EmulatedNetParams>
      <<<num_blocks, kLowLatencyThreads, 0, static_cast<cudaStream_t>(stream)>>>(p, a, net);
  EPCOMM_LAUNCH_CHECK("low_latency_combine_net_kernel");
}

// The same over NCCL GIN (Buffer launches it when its group spans real nodes).
void launch_low_latency_combine_gin(const LowLatencyCombineParams& p, const LowLatencyNetArgs& a, const GinNetParams& g,
                                    int num_blocks, void* stream) {
  low_latency_combine_net_kernel<GinNetParams>
      <<<num_blocks, kLowLatencyThreads, 0, static_cast<cudaStream_t>(stream)>>>(p, a, g);
  EPCOMM_LAUNCH_CHECK("low_latency_combine_gin_kernel");
}

}  // namespace epcomm
