// EPCOMM_LL_PROBE: the slots of the per-block phase times the LL dispatch kernels stamp
// (LowLatencyHostState::probe), read by Buffer::low_latency_probe_report.
#pragma once

namespace epcomm {

// Probe marks of the LL dispatch kernel: global-timer ns in slot m, SM clock in slot 8 + m.
enum LowLatencyProbeMark : int {
  kProbeEntry = 0,       // kernel entry
  kProbeHistogram = 1,   // send: the topk histogram is built
  kProbeCounts = 2,      // send: counts released
  kProbeTokens = 3,      // send: every message stored and released
  kProbePublished = 4,   // send: publish_dispatch done
  kProbeRecvEntry = 5,   // receive half starts
  kProbeRecvDone = 6,    // receive half done
  kProbeRecvCounts = 7,  // per-rank receive: every count read, the begins computed (between 5 and 6)
};
// Past the marks (per-rank receive, per block): the longest flag wait of one of its warps' items
// (ns), the longest copy after the flag (ns), the items its warps took, and the last item that took
// over 2 us after its flag (item | part << 16 | rows << 24, then ns to its rows, data, scales).
constexpr int kProbeItemWait = 16, kProbeItemWork = 17, kProbeItems = 18, kProbeSlowItem = 19;
// Per-rank send, global-timer ns stamped by thread 0: the first token cast, the barrier after it,
// the barrier after pass 1 of the histogram, the first token's slots handed out (its copy starts).
constexpr int kProbeSendCast = 24, kProbeSendBarrier1 = 25, kProbeSendPass1 = 26, kProbeSendSlots = 27;
constexpr int kLowLatencyProbeSlots = 32;

}  // namespace epcomm
