// Low-latency combine (see params.hpp for the scheme): the per-expert path's kernel and the host
// side of every combine launch. One kernel, two halves (send, receive); without a hook both run in
// one launch (warp 0 ends the send half while the others receive), with a hook two launches. The
// pieces:
//   combine_per_expert.cuh  the per-expert path's halves (one row per (token, k), summed in k order),
//                           templates over the network: this file's kernel and combine_net.cu's
//   combine_per_rank.cu     the per-rank combine (one partial per (token, rank)) and its kernels
//   combine_net.cu          the per-expert kernel across nodes (emulated transport, GIN)
//   combine_common.cuh      what both paths share
#include <cuda_runtime.h>

#include "core/call_check.hpp"
#include "kernels/common/launch.hpp"
#include "kernels/low_latency/combine_per_expert.cuh"

namespace epcomm {
namespace {

using namespace epcomm::dev;

// The per-expert path's kernel (p.partials == kNone; the per-rank combine has its own kernels, with
// their own registers: combine_per_rank.cu).
__global__ void __launch_bounds__(kLowLatencyThreads, 1)
    low_latency_combine_kernel(const __grid_constant__ LowLatencyCombineParams p) {
  const bool send = (p.phases & kLowLatencySend) != 0;
  const bool recv = (p.phases & kLowLatencyRecv) != 0;
  const uint32_t seq =
      send ? ld_volatile(&p.state->combine_seq) + 1u : ld_volatile(&p.state->buffer_combine_seq[p.buffer]);
  if (send && !call_number_left(p.common.wait, seq)) return;  // a receive half's number was checked by its send
  if (send) {
    combine_send(p, seq, LLNoNet{}, nullptr);
    if (recv) {
      // One launch: warps 1.. count themselves in and receive at once; warp 0 waits for them, tells
      // the origins this rank is done (finish_combine_send) and waits for every rank's `done`.
      if (warp_id() != 0) {
        bar_arrive(1, kLowLatencyThreads);
        combine_recv<LLNoNet, 1>(p, seq, LLNoNet{}, nullptr);
      } else {
        bar_sync(1, kLowLatencyThreads);
        finish_combine_send<LLNoNet, false>(p, seq, LLNoNet{});
        wait_all_done(p, seq, LLNoNet{});
      }
      return;
    }
    finish_combine_send(p, seq, LLNoNet{});
  }
  if (recv) combine_recv(p, seq, LLNoNet{}, nullptr);
}

const KernelRegistration kKernels{reinterpret_cast<const void*>(low_latency_combine_kernel)};

}  // namespace

void launch_low_latency_combine(const LowLatencyCombineParams& p, int num_blocks, void* stream) {
  if (p.partials != LowLatencyPartials::kNone) {
    launch_low_latency_combine_per_rank(p, num_blocks, stream);
    return;
  }
  low_latency_combine_kernel<<<num_blocks, kLowLatencyThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  EPCOMM_LAUNCH_CHECK("low_latency_combine_kernel");
}

}  // namespace epcomm
