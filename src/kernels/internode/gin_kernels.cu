// The internode kernels over NCCL GIN (transport/net_gin.cuh): the same bodies as kernels.cu with
// the real network transport. Buffer launches them when its group's ranks are not all load/store
// reachable (real nodes; buffer_internode.cpp); virtual nodes keep kernels.cu.
#include <cuda_runtime.h>

#include "core/call_check.hpp"
#include "kernels/common/launch.hpp"
#include "kernels/internode/combine.cuh"
#include "kernels/internode/dispatch.cuh"
#include "kernels/internode/notify.cuh"
#include "transport/net_gin.cuh"

namespace epcomm {
namespace {

using namespace epcomm::dev;

__global__ void __launch_bounds__(kInterNotifyThreads, 1)
    inter_notify_gin_kernel(const __grid_constant__ InterNotifyParams p, const __grid_constant__ GinNetParams g) {
  const uint32_t seq = call_sequence(p.ic.common);
  if (!call_number_left(p.ic.common.wait, seq)) return;
  inter_notify(p, GinNet(g, p.ic.common.rank));
  finish_call(p.ic.common, seq);
}

__global__ void __launch_bounds__(kInterThreads, 1)
    inter_dispatch_send_gin_kernel(const __grid_constant__ InterDispatchParams p,
                                   const __grid_constant__ GinNetParams g) {
  const uint32_t seq = call_sequence(p.ic.common);
  if (!call_number_left(p.ic.common.wait, seq)) return;
  inter_dispatch_send(p, GinNet(g, p.ic.common.rank));
  finish_call(p.ic.common, seq);
}

__global__ void __launch_bounds__(kInterThreads, 1)
    inter_dispatch_recv_gin_kernel(const __grid_constant__ InterDispatchParams p,
                                   const __grid_constant__ GinNetParams g) {
  const uint32_t seq = call_sequence(p.ic.common);
  if (!call_number_left(p.ic.common.wait, seq)) return;
  inter_dispatch_recv(p, GinNet(g, p.ic.common.rank), seq);
  finish_call(p.ic.common, seq);
}

__global__ void __launch_bounds__(kInterThreads, 1)
    inter_combine_gin_kernel(const __grid_constant__ InterCombineParams p, const __grid_constant__ GinNetParams g) {
  const uint32_t seq = call_sequence(p.ic.common);
  if (!call_number_left(p.ic.common.wait, seq)) return;
  inter_combine(p, GinNet(g, p.ic.common.rank), seq);
  finish_call(p.ic.common, seq);
}

const KernelRegistration kKernels({reinterpret_cast<const void*>(inter_notify_gin_kernel),
                                   reinterpret_cast<const void*>(inter_dispatch_send_gin_kernel),
                                   reinterpret_cast<const void*>(inter_dispatch_recv_gin_kernel),
                                   reinterpret_cast<const void*>(inter_combine_gin_kernel)},
                                  KernelSet::kGin);

}  // namespace

void launch_inter_notify_gin(const InterNotifyParams& p, const GinNetParams& g, void* stream) {
  inter_notify_gin_kernel<<<1, kInterNotifyThreads, 0, static_cast<cudaStream_t>(stream)>>>(p, g);
  EPCOMM_LAUNCH_CHECK("inter_notify_gin_kernel");
}
void launch_inter_dispatch_gin(const InterDispatchParams& p, const GinNetParams& g, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  inter_dispatch_send_gin_kernel<<<p.ic.num_blocks, kInterThreads, 0, s>>>(p, g);
  EPCOMM_LAUNCH_CHECK("inter_dispatch_send_gin_kernel");
  inter_dispatch_recv_gin_kernel<<<p.ic.num_blocks, kInterThreads, 0, s>>>(p, g);
  EPCOMM_LAUNCH_CHECK("inter_dispatch_recv_gin_kernel");
}
void launch_inter_combine_gin(const InterCombineParams& p, const GinNetParams& g, void* stream) {
  inter_combine_gin_kernel<<<p.ic.num_blocks, kInterThreads, 0, static_cast<cudaStream_t>(stream)>>>(p, g);
  EPCOMM_LAUNCH_CHECK("inter_combine_gin_kernel");
}

}  // namespace epcomm
