#include "kernels/common/diagnostics.hpp"

#include <sstream>

namespace epcomm {

const char* kernel_name(KernelId k) {
  switch (k) {
    case KernelId::kNone: return "none";
    case KernelId::kLayout: return "layout";
    case KernelId::kNotifyDispatch: return "notify_dispatch";
    case KernelId::kDispatch: return "dispatch";
    case KernelId::kCombine: return "combine";
    case KernelId::kLowLatencyDispatch: return "low_latency_dispatch";
    case KernelId::kLowLatencyCombine: return "low_latency_combine";
    case KernelId::kBarrier: return "barrier";
  }
  return "?";
}

const char* phase_name(WaitPhase p) {
  switch (p) {
    case WaitPhase::kNone: return "none";
    case WaitPhase::kNotifyMeta: return "waiting for the peer's counts (notify)";
    case WaitPhase::kDispatchReady: return "waiting for the peer to stage a chunk (dispatch receive)";
    case WaitPhase::kDispatchSlotFree: return "waiting for the peer to release a ring slot (dispatch send)";
    case WaitPhase::kCombineReady: return "waiting for the peer's rows (combine receive)";
    case WaitPhase::kCombineSlotFree: return "waiting for the peer to release a ring slot (combine send)";
    case WaitPhase::kLowLatencyRecv: return "waiting for the peer's tokens (low-latency receive)";
    case WaitPhase::kBarrier: return "waiting at a barrier";
    case WaitPhase::kLowLatencyDispatchCount:
      return "waiting for the peer's row count of a local expert (low-latency dispatch receive)";
    case WaitPhase::kLowLatencyDispatchMessage:
      return "waiting for a token row from the peer (low-latency dispatch receive)";
    case WaitPhase::kLowLatencyCombineRow:
      return "waiting for an expert output row from the peer (low-latency combine receive; was the combine "
             "given the topk_idx and handle of its dispatch?)";
    case WaitPhase::kLowLatencyCombineDone:
      return "waiting for the peer to finish sending (low-latency combine)";
  }
  return "?";
}

std::string describe(const DeviceErrorRecord& r) {
  std::ostringstream s;
  if (r.code == 3 && r.kernel == KernelId::kLowLatencyDispatch) {
    s << "low_latency_dispatch on rank " << r.rank << ": topk_idx sends more than num_max_dispatch_tokens_per_rank = "
      << r.expected << " rows to expert " << r.peer << " (some token lists it more than once); the rows past it were "
      << "dropped";
    return s.str();
  }
  if (r.code == 3) {
    s << "num_worst_tokens = " << r.expected << " is smaller than the " << r.observed << " rows rank " << r.rank
      << " received; the rows past it were dropped (kernel " << kernel_name(r.kernel) << ")";
    return s.str();
  }
  if (r.code == 2) {
    s << "ranks disagree on the call's parameters: kernel " << kernel_name(r.kernel) << ", rank " << r.rank
      << " expected 0x" << std::hex << r.expected << " but peer " << std::dec << r.peer << " sent 0x" << std::hex
      << r.observed << " (every rank must pass the same num_experts, config and chunk size)";
    return s.str();
  }
  s << "GPU wait timed out: kernel " << kernel_name(r.kernel) << ", phase '" << phase_name(r.phase) << "', rank "
    << r.rank << ", peer " << r.peer << ", block " << r.block << ", expected flag >= 0x" << std::hex << r.expected
    << ", saw 0x" << r.observed << std::dec << " (is peer " << r.peer
    << " alive and making the same calls? raise EPCOMM_TIMEOUT_MS if it is only slow)";
  return s.str();
}

}  // namespace epcomm
