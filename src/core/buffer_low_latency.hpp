// What the low-latency Buffer files share (buffer_low_latency*.cpp): the argument checks of a call
// (buffer_low_latency_checks.cpp) and the stream order of LL work (buffer_low_latency.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include "core/buffer_impl.hpp"
#include "epcomm/buffer.hpp"
#include "kernels/low_latency/params.hpp"

namespace epcomm::low_latency {

void check_problem(int tmax, int hidden, int num_ranks, int num_experts);

// The layout of this call, checked against the buffer (size, and the shape fixed earlier). Not
// committed: the caller commits it once every other check passed.
LowLatencyLayout layout_for(const Buffer::Impl& m, int tmax, int hidden, int num_experts);

struct DispatchCall {
  LowLatencyLayout layout;
  int num_tokens = 0, num_topk = 0, blocks = 0;
};
DispatchCall check_dispatch(const Buffer::Impl& m, const LowLatencyDispatchInputs& in,
                            const LowLatencyDispatchOutputs& out);

void check_handle(const Buffer::Impl& m, const LowLatencyHandle& h, const LowLatencyLayout& l);

struct CombineCall {
  LowLatencyLayout layout;
  int num_tokens = 0, num_topk = 0, blocks = 0;
};
CombineCall check_combine(const Buffer::Impl& m, const LowLatencyCombineInputs& in, const LowLatencyHandle& h,
                          const TensorView& out);

// The stream an LL call's work goes on, and the Event it returns (buffer_low_latency.cpp).
cudaStream_t begin_call(Buffer::Impl& m, const StreamOrder& order);
Event end_call(Buffer::Impl& m, const StreamOrder& order);

}  // namespace epcomm::low_latency
