// The low-latency bench's problem, every rank's inputs (from one seed) and the check of a dispatch
// and combine against the CPU reference. Shared by the in-process run (gpu_low_latency.cu) and the
// fake-node processes, whose results travel to the parent as files and are checked there.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "bench.hpp"

namespace epcomm::bench {

struct LLShape {
  int R = 0, T = 0, Tmax = 1, H = 0, K = 0, E = 0, EL = 0, G = 0;
  int64_t RT = 0;  // R * Tmax: rows per local expert in the receive buffer
};
LLShape ll_shape(const Options& o, int R);  // the options' problem, LL defaults where unset

struct LLRankData {
  std::vector<uint16_t> x, y;  // y: the expert outputs the combine sends back, [E/R][R*Tmax][H]
  std::vector<int64_t> topk;
  std::vector<float> weights;
};
LLRankData make_ll_rank_data(const LLShape& p, uint64_t seed, int rank);

struct LLRankResult {  // one checked FP8 dispatch and combine
  std::vector<int32_t> recv_count, src_info;
  std::vector<int64_t> layout_range;
  std::vector<uint8_t> recv_x;
  std::vector<float> scales;  // as stored: [E/R][G][R*Tmax]
  std::vector<uint16_t> out;
};
// A rank's two checked rounds (first calls, after the timed calls) in a file, and back.
void write_ll_results(const std::string& path, const LLRankResult& first, const LLRankResult& last);
void read_ll_results(const std::string& path, LLRankResult& first, LLRankResult& last);  // throws if unreadable

// Both rounds of every rank against the reference: one check line each, report.ok cleared on a
// mismatch. over_network: the buffers took the network path (no per-rank partials: exact combine).
void check_ll(const LLShape& p, const std::vector<LLRankData>& data, const std::vector<LLRankResult>& first,
              const std::vector<LLRankResult>& last, bool over_network, Report& report);

}  // namespace epcomm::bench
