// The internode kernels over the emulated network (virtual nodes), and their launchers. The bodies
// (notify.cuh, dispatch.cuh, combine.cuh) are templates over the transport; gin_kernels.cu
// instantiates the same bodies with GinNet.
#include <cuda_runtime.h>

#include "core/call_check.hpp"
#include "kernels/common/launch.hpp"
#include "kernels/internode/combine.cuh"
#include "kernels/internode/dispatch.cuh"
#include "kernels/internode/notify.cuh"

namespace epcomm {
namespace {

using namespace epcomm::dev;

__global__ void __launch_bounds__(kInterNotifyThreads, 1)
    inter_notify_kernel(const __grid_constant__ InterNotifyParams p) {
  const uint32_t seq = call_sequence(p.ic.common);
  if (!call_number_left(p.ic.common.wait, seq)) return;
  inter_notify(p, EmulatedNet{p.ic.net, p.ic.common.rank});
  finish_call(p.ic.common, seq);
}

__global__ void __launch_bounds__(kInterThreads, 1)
    inter_dispatch_send_kernel(const __grid_constant__ InterDispatchParams p) {
  const uint32_t seq = call_sequence(p.ic.common);
  if (!call_number_left(p.ic.common.wait, seq)) return;
  inter_dispatch_send(p, EmulatedNet{p.ic.net, p.ic.common.rank});
  finish_call(p.ic.common, seq);
}

__global__ void __launch_bounds__(kInterThreads, 1)
    inter_dispatch_recv_kernel(const __grid_constant__ InterDispatchParams p) {
  const uint32_t seq = call_sequence(p.ic.common);
  if (!call_number_left(p.ic.common.wait, seq)) return;
  inter_dispatch_recv(p, EmulatedNet{p.ic.net, p.ic.common.rank}, seq);
  finish_call(p.ic.common, seq);
}

__global__ void __launch_bounds__(kInterThreads, 1) inter_combine_kernel(const __grid_constant__ InterCombineParams p) {
  const uint32_t seq = call_sequence(p.ic.common);
  if (!call_number_left(p.ic.common.wait, seq)) return;
  inter_combine(p, EmulatedNet{p.ic.net, p.ic.common.rank}, seq);
  finish_call(p.ic.common, seq);
}

const KernelRegistration kKernels{reinterpret_cast<const void*>(inter_notify_kernel),
                                  reinterpret_cast<const void*>(inter_dispatch_send_kernel),
                                  reinterpret_cast<const void*>(inter_dispatch_recv_kernel),
                                  reinterpret_cast<const void*>(inter_combine_kernel)};

}  // namespace

void launch_inter_notify(const InterNotifyParams& p, void* stream) {
  inter_notify_kernel<<<1, kInterNotifyThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  EPCOMM_LAUNCH_CHECK("inter_notify_kernel");
}

void launch_inter_dispatch(const InterDispatchParams& p, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  inter_dispatch_send_kernel<<<p.ic.num_blocks, kInterThreads, 0, s>>>(p);
  EPCOMM_LAUNCH_CHECK("inter_dispatch_send_kernel");
  inter_dispatch_recv_kernel<<<p.ic.num_blocks, kInterThreads, 0, s>>>(p);
  EPCOMM_LAUNCH_CHECK("inter_dispatch_recv_kernel");
}

void launch_inter_combine(const InterCombineParams& p, void* stream) {
  inter_combine_kernel<<<p.ic.num_blocks, kInterThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  EPCOMM_LAUNCH_CHECK("inter_combine_kernel");
}

}  // namespace epcomm
