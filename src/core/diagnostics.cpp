#include "kernels/common/diagnostics.hpp"

#include <cstdint>
#include <string>

namespace epcomm {

const char* kernel_name(KernelId k) {
  switch (k) {
    case KernelId::kNone:
      return "none";
    case KernelId::kLayout:
      return "layout";
    case KernelId::kNotifyDispatch:
      return "notify_dispatch";
    case KernelId::kDispatch:
      return "dispatch";
    case KernelId::kCombine:
      return "combine";
    case KernelId::kLowLatencyDispatch:
      return "low_latency_dispatch";
    case KernelId::kLowLatencyCombine:
      return "low_latency_combine";
    case KernelId::kBarrier:
      return "barrier";
    case KernelId::kLowLatencyClean:
      return "clean_low_latency_buffer";
  }
  return "?";
}

const char* phase_name(WaitPhase p) {
  switch (p) {
    case WaitPhase::kNone:
      return "none";
    case WaitPhase::kNotifyMeta:
      return "waiting for the peer's counts (notify)";
    case WaitPhase::kDispatchReady:
      return "waiting for the peer to stage a chunk (dispatch receive)";
    case WaitPhase::kDispatchSlotFree:
      return "waiting for the peer to release a ring slot (dispatch send)";
    case WaitPhase::kCombineReady:
      return "waiting for the peer's rows (combine receive)";
    case WaitPhase::kCombineSlotFree:
      return "waiting for the peer to release a ring slot (combine send)";
    case WaitPhase::kLowLatencyRecv:
      return "waiting for the peer's tokens (low-latency receive)";
    case WaitPhase::kBarrier:
      return "waiting at a barrier";
    case WaitPhase::kLowLatencyDispatchCount:
      return "waiting for the peer's row count of a local expert (low-latency dispatch receive)";
    case WaitPhase::kLowLatencyDispatchMessage:
      return "waiting for a token row from the peer (low-latency dispatch receive)";
    case WaitPhase::kLowLatencyCombineRow:
      return "waiting for an expert output row from the peer (low-latency combine receive; was the combine "
             "given the topk_idx and handle of its dispatch?)";
    case WaitPhase::kLowLatencyCombineDone:
      return "waiting for the peer to finish sending (low-latency combine)";
    case WaitPhase::kLowLatencyCombineWeights:
      return "waiting for the peer's topk_weights (low-latency per-rank combine send)";
    case WaitPhase::kLowLatencyClean:
      return "waiting for the peer to reach clean_low_latency_buffer (is every rank calling it?)";
    case WaitPhase::kNetworkFlush:
      return "waiting for the network transport to take this rank's puts to the peer (GIN flush)";
  }
  return "?";
}

namespace {

// Lowercase hex without leading zeros (what `std::hex << v` printed).
std::string hex(uint64_t v) {
  static const char digits[] = "0123456789abcdef";
  std::string out;
  do {
    out.insert(out.begin(), digits[v & 15]);
    v >>= 4;
  } while (v != 0);
  return out;
}

}  // namespace

// Built with std::string and std::to_string, no iostreams: the text ends up in exceptions raised in
// the Python process (see TensorView::describe).
std::string describe(const DeviceErrorRecord& r) {
  using std::to_string;
  if (r.error() == DeviceError::kCallNumbersUsedUp)
    return std::string("kernel ") + kernel_name(r.kernel) + " on rank " + to_string(r.rank) + " did not run: this " +
           "buffer has used its " + to_string(r.expected) + " call numbers (32-bit, compared by every flag, so they " +
           "must not come round again); call reset() on every rank (clean_low_latency_buffer for low-latency " +
           "calls) to start them again";
  if (r.error() == DeviceError::kBadArgument && r.kernel == KernelId::kLowLatencyDispatch)
    return "low_latency_dispatch on rank " + to_string(r.rank) +
           ": topk_idx sends more than num_max_dispatch_tokens_per_rank = " + to_string(r.expected) +
           " rows to expert " + to_string(r.peer) + " (some token lists it more than once); the rows past it were " +
           "dropped";
  if (r.error() == DeviceError::kBadArgument && r.kernel == KernelId::kCombine)
    return "combine on rank " + to_string(r.rank) + ": handle.recv_src_idx holds token " +
           to_string(static_cast<int32_t>(r.observed)) + ", outside [0, " + to_string(r.expected) +
           "); is the handle from a dispatch that failed or from another buffer? (those rows were skipped)";
  if (r.error() == DeviceError::kBadArgument && static_cast<int32_t>(r.observed) < 0)
    return "dispatch on rank " + to_string(r.rank) + " (kernel " + kernel_name(r.kernel) +
           "): the receive plan's row count is " + to_string(static_cast<int32_t>(r.observed)) +
           " (handle.chunk_offset was not written by this dispatch's count "
           "exchange); the num_worst_tokens padding was skipped";
  if (r.error() == DeviceError::kBadArgument)
    return "num_worst_tokens = " + to_string(r.expected) + " is smaller than the " + to_string(r.observed) +
           " rows rank " + to_string(r.rank) + " received; the rows past it were dropped (kernel " +
           kernel_name(r.kernel) + ")";
  if (r.error() == DeviceError::kMismatch && r.phase == WaitPhase::kNotifyMeta && (r.expected >> 63) != 0) {
    const auto rows = [](uint64_t word) {
      const uint32_t packed = static_cast<uint32_t>(word);
      return "rows of " + to_string(static_cast<int64_t>(word >> 32 & 0x7fffffff)) + " bytes, " +
             to_string(packed >> 8) + " scale words, top-" + to_string(packed & 0xff);
    };
    return "dispatch: ranks disagree on the rows: rank " + to_string(r.rank) + " has " + rows(r.expected) + ", peer " +
           to_string(r.peer) + " " + rows(r.observed) + " (kernel " + kernel_name(r.kernel) +
           "); every rank must pass x, x_scales and topk_idx of the same widths (the count exchange stopped; " +
           "reset() recovers)";
  }
  if (r.error() == DeviceError::kMismatch && r.phase == WaitPhase::kNotifyMeta && ((r.expected ^ r.observed) >> 31 & 1))
    return "dispatch across nodes: rank " + to_string(r.rank) + ((r.expected >> 31 & 1) ? " passed" : " did not pass") +
           " num_worst_tokens but peer " + to_string(r.peer) + ((r.observed >> 31 & 1) ? " did" : " did not") +
           " (kernel " + kernel_name(r.kernel) + "); every rank must pass it alike, zero or not: it sets the rounds " +
           "of the call (the count exchange stopped; reset() recovers)";
  if (r.error() == DeviceError::kMismatch)
    return std::string("ranks disagree on the call's parameters: kernel ") + kernel_name(r.kernel) + ", rank " +
           to_string(r.rank) + " expected 0x" + hex(r.expected) + " but peer " + to_string(r.peer) + " sent 0x" +
           hex(r.observed) + " (every rank must pass the same num_experts, config and chunk size)";
  return std::string("GPU wait timed out: kernel ") + kernel_name(r.kernel) + ", phase '" + phase_name(r.phase) +
         "', rank " + to_string(r.rank) + ", peer " + to_string(r.peer) + ", block " + to_string(r.block) +
         ", expected flag >= 0x" + hex(r.expected) + ", saw 0x" + hex(r.observed) + " (is peer " + to_string(r.peer) +
         " alive and making the same calls? raise EPCOMM_TIMEOUT_MS if it is only slow)";
}

}  // namespace epcomm
