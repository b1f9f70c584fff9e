// Buffer::reset: the collective way back after an error, without rebuilding the buffer.
#include <cstring>

#include "core/buffer_impl.hpp"
#include "core/call_check.hpp"
#include "transport/gin_context.hpp"

namespace epcomm {

void Buffer::reset() {
  Impl& m = *impl_;
  EPCOMM_CUDA_CHECK(cudaSetDevice(m.device));
  // Kernels that saw a timeout have left; wait for whatever else is queued.
  m.sync_comm();
  // Across real nodes: a kernel that gave up may have left puts and signals with the transport;
  // they must land before the peers clear their signals (bounded: a peer that is gone cannot hold
  // the reset; what is still pending then is not waited for).
  if (m.gin) m.gin->drain(m.comm, m.timeout_ns);
  // Nobody may still signal into our control region while we clear it, and nobody may signal
  // into a peer's before that peer has cleared its own.
  m.group->barrier("Buffer::reset (before clearing)");
  EPCOMM_CUDA_CHECK(cudaMemsetAsync(m.sym->local(), 0, m.ctl.total, m.comm));
  m.reset_low_latency(m.comm);
  m.reset_internode(m.comm);
  DeviceCounters init{};
  init.invalid_topk = -1;
  EPCOMM_CUDA_CHECK(cudaMemcpyAsync(m.counters, &init, sizeof(init), cudaMemcpyHostToDevice, m.comm));
  EPCOMM_CUDA_CHECK(cudaStreamSynchronize(m.comm));
  std::memset(m.record, 0, sizeof(DeviceErrorRecord));
  m.group->barrier("Buffer::reset (after clearing)");
}

}  // namespace epcomm
