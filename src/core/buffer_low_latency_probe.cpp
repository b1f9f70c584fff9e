// Buffer, low-latency mode: EPCOMM_LL_PROBE's report of the last dispatch (per-block phase times,
// kernels/low_latency/probe.hpp), printed by epcomm-bench --mode low-latency.
#include <algorithm>
#include <cstdio>
#include <iterator>
#include <string>
#include <vector>

#include "core/buffer_impl.hpp"
#include "core/call_check.hpp"

namespace epcomm {

std::string Buffer::low_latency_probe_report() {
  Impl& m = *impl_;
  if (m.ll.probe == nullptr) return {};
  EPCOMM_CUDA_CHECK(cudaSetDevice(m.device));
  std::vector<unsigned long long> v(static_cast<size_t>(kLowLatencyProbeSlots) * m.sm_count);
  m.sync_comm();
  EPCOMM_CUDA_CHECK(cudaMemcpyAsync(v.data(), m.ll.probe, v.size() * sizeof(v[0]), cudaMemcpyDeviceToHost, m.comm));
  EPCOMM_CUDA_CHECK(cudaStreamSynchronize(m.comm));
  int khz = 0;
  EPCOMM_CUDA_CHECK(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, m.device));
  static const char* const names[] = {"entry",     "histogram",  "counts",    "tokens",
                                      "published", "recv entry", "recv done", "recv counts"};
  // In order of time within a block (the per-rank receive stamps its counts between entry and done).
  static const int order[] = {kProbeEntry,     kProbeHistogram, kProbeCounts,     kProbeTokens,
                              kProbePublished, kProbeRecvEntry, kProbeRecvCounts, kProbeRecvDone};
  unsigned long long t0 = ~0ull;
  for (int b = 0; b < m.sm_count; ++b) {
    const unsigned long long e = v[static_cast<size_t>(b) * kLowLatencyProbeSlots + kProbeEntry];
    if (e != 0) t0 = std::min(t0, e);
  }
  if (t0 == ~0ull) return "LL probe: no dispatch recorded";
  const auto fmt = [](double x) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%.2f", x);
    return std::string(buf);
  };
  std::string s = "LL dispatch probe, rank " + std::to_string(m.rank) +
                  " (us after the first block's entry: min / median / max over blocks; then SM-clock median since the "
                  "previous mark)";
  for (int oi = 0; oi < static_cast<int>(std::size(order)); ++oi) {
    const int mark = order[oi];
    std::vector<double> at, since;
    for (int b = 0; b < m.sm_count; ++b) {
      const unsigned long long* row = v.data() + static_cast<size_t>(b) * kLowLatencyProbeSlots;
      if (row[mark] == 0 || row[mark] < t0) continue;
      at.push_back(static_cast<double>(row[mark] - t0) / 1000.0);
      // The latest earlier mark stamped before this one (a split launch's receive half starts
      // before its warp 0 publishes).
      int pi = oi - 1;
      while (pi >= 0 && (row[order[pi]] == 0 || row[order[pi]] > row[mark])) --pi;
      if (pi >= 0 && khz > 0) since.push_back(static_cast<double>(row[8 + mark] - row[8 + order[pi]]) / khz * 1000.0);
    }
    if (at.empty()) continue;
    std::sort(at.begin(), at.end());
    std::sort(since.begin(), since.end());
    s += "\n  " + std::string(names[mark]) + ": " + fmt(at.front()) + " / " + fmt(at[at.size() / 2]) + " / " +
         fmt(at.back()) + " (" + std::to_string(at.size()) + " blocks)";
    if (!since.empty()) s += ", +" + fmt(since[since.size() / 2]) + " us";
  }
  // The per-rank send's sub-phases (median block; stamps of an earlier call are older than entry).
  {
    static const int subs[] = {kProbeSendCast, kProbeSendBarrier1, kProbeSendPass1, kProbeSendSlots};
    static const char* const sub_names[] = {"first cast", "barrier 1", "pass 1", "first slots"};
    std::string line;
    for (int i = 0; i < 4; ++i) {
      std::vector<double> at;
      for (int b = 0; b < m.sm_count; ++b) {
        const unsigned long long* row = v.data() + static_cast<size_t>(b) * kLowLatencyProbeSlots;
        if (row[subs[i]] >= row[kProbeEntry] && row[kProbeEntry] != 0 && row[subs[i]] != 0)
          at.push_back(static_cast<double>(row[subs[i]] - t0) / 1000.0);
      }
      if (at.empty()) continue;
      std::sort(at.begin(), at.end());
      line += std::string(line.empty() ? "" : ", ") + sub_names[i] + " " + fmt(at[at.size() / 2]);
    }
    if (!line.empty()) s += "\n  send sub-phases (median block, us after the first entry): " + line;
  }
  // The blocks whose receive finished last: their longest flag wait and copy of one item (part of a
  // staged token), and how many items their warps took.
  std::vector<std::pair<unsigned long long, int>> done;
  for (int b = 0; b < m.sm_count; ++b) {
    const unsigned long long d = v[static_cast<size_t>(b) * kLowLatencyProbeSlots + kProbeRecvDone];
    if (d >= t0) done.push_back({d, b});
  }
  std::sort(done.rbegin(), done.rend());
  if (!done.empty()) s += "\n  last receiving blocks (block: done at; longest item wait / copy; items):";
  for (size_t i = 0; i < done.size() && i < 5; ++i) {
    const unsigned long long* row = v.data() + static_cast<size_t>(done[i].second) * kLowLatencyProbeSlots;
    s += ' ';  // (not " " + std::to_string(...): GCC 12 warns -Wrestrict there, a false positive)
    s += std::to_string(done[i].second) + ": " + fmt((done[i].first - t0) / 1000.0) + "; " +
         fmt(row[kProbeItemWait] / 1000.0) + " / " + fmt(row[kProbeItemWork] / 1000.0) + "; " +
         std::to_string(row[kProbeItems]);
    const unsigned long long* slow = row + kProbeSlowItem;
    if (slow[1] + slow[2] + slow[3] > 0)
      s += " [slow item " + std::to_string(slow[0] & 0xffff) + " part " + std::to_string((slow[0] >> 16) & 0xff) +
           " rows " + std::to_string(slow[0] >> 24) + ": to rows " + fmt(slow[1] / 1000.0) + ", data " +
           fmt(slow[2] / 1000.0) + ", scales " + fmt(slow[3] / 1000.0) + "]";
    if (i + 1 < done.size() && i < 4) s += ",";
  }
  EPCOMM_CUDA_CHECK(cudaMemsetAsync(m.ll.probe, 0, v.size() * sizeof(v[0]), m.comm));
  EPCOMM_CUDA_CHECK(cudaStreamSynchronize(m.comm));
  return s;
}

}  // namespace epcomm
