// Private building blocks of the CPU reference backend.
//
// Every mode is split the same way, so that the all-ranks functions (reference.hpp) and HostCluster
// (host_cluster.hpp) share one implementation of the semantics:
//   1. make_*_source(rank, ...)   one rank's own inputs, validated and prepared (what it "sends");
//   2. check_*_sources(sources)   rules that involve several ranks (same options, same handles);
//   3. receive_* / *_for_source   the outputs of one rank, computed from every rank's source.
// The all-ranks functions run step 1 for each rank, then 2, then 3 for each rank; a HostCluster
// rank runs step 1 on its own inputs, publishes a pointer, waits for its peers and runs 2 and 3.
//
// Error messages start with `who` ("rank 3: ") so the failing rank is named wherever it is raised.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "epcomm/error.hpp"
#include "epcomm/reference.hpp"

namespace epcomm::ref::detail {

inline constexpr int kMaxTopk = 16;
inline constexpr int kScaleGroup = 128;           // channels per FP8 scale
inline constexpr int kNormalRowAlign = 16;        // bytes a normal-mode row must be a multiple of
inline constexpr int kMaxNormalScaleWords = 512;  // FP8 scale words per token (the library's kMaxScaleWords)

// ---- argument checking (validate.cpp) ----
// Messages are built without iostreams: GCC-built iostream code called from a process that has
// PyTorch loaded segfaults on the GPU machines (BENCHMARKS.md run 13), and the Python module calls
// into the reference.
inline void append_piece(std::string& s, const std::string& v) { s += v; }
inline void append_piece(std::string& s, const char* v) { s += v; }
inline void append_piece(std::string& s, char v) { s += v; }
template <typename T, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
void append_piece(std::string& s, T v) {
  s += std::to_string(v);
}
template <typename... Args>
std::string cat(const Args&... args) {
  std::string s;
  (append_piece(s, args), ...);
  return s;
}
std::string rank_prefix(int rank);  // "rank 3: "
[[noreturn]] void fail(const std::string& who, const std::string& message);
// "<name> has <actual> elements; expected <formula> = <expected>"
void check_size(const std::string& who, const char* name, size_t actual, int64_t expected, const std::string& formula);
void check_num_ranks(int num_ranks, int ranks_per_node);
void check_num_experts(const std::string& who, int num_experts, int num_ranks, bool required);
void check_num_topk(const std::string& who, int num_topk, int min_topk);
// Size [T, K] and every value in [-1, E).
void check_topk_idx(const std::string& who, const char* name, const std::vector<int64_t>& topk_idx, int num_tokens,
                    int num_topk, int num_experts);
void check_zero_one(const std::string& who, const char* name, const std::vector<uint8_t>& values);

// ---- layout (layout.cpp) ----
// Unchecked: topk_idx must already be valid.
Layout compute_layout(const int64_t* topk_idx, int num_tokens, int num_topk, int num_experts, int num_ranks,
                      int ranks_per_node);
Layout checked_layout(const std::string& who, const std::vector<int64_t>& topk_idx, int num_tokens, int num_topk,
                      int num_experts, int num_ranks, int ranks_per_node);

// ---- normal dispatch (normal_dispatch.cpp) ----
struct DispatchSource {
  int rank = 0;
  const NormalInput* input = nullptr;
  const NormalOptions* options = nullptr;
  const NormalHandle* handle = nullptr;        // cached dispatch only
  std::vector<uint8_t> is_token_in_rank;       // [T, R]: the routing, whatever its origin
  std::vector<int32_t> num_tokens_per_expert;  // [E]; empty without topk
};
DispatchSource make_dispatch_source(int rank, int num_ranks, const NormalInput& input, const NormalOptions& options);
DispatchSource make_cached_dispatch_source(int rank, int num_ranks, const NormalInput& input,
                                           const NormalHandle& handle, const NormalOptions& options);
// receiver >= 0 (HostCluster, where every rank checks its own part): the handle rules of that
// receiver only; -1: of every rank. The rules that are O(R) run for every rank either way.
void check_dispatch_sources(const std::vector<const DispatchSource*>& sources, int receiver = -1);
NormalDispatchOutput receive_dispatch(int rank, const std::vector<const DispatchSource*>& sources);

// Handles (normal_handle.cpp): one rank's handle on its own, then all handles together (the
// receivers' rows must be exactly what the senders' is_token_in_rank implies). With receiver >= 0
// only that receiver's handle is compared: O(R^2 T) instead of O(R^3 + R^2 T), so R ranks that each
// check their own part cost O(R^3 T) together, not O(R^4) (HostCluster at R = 320).
void check_handle(const std::string& who, const NormalHandle& handle, int num_ranks);
void check_handles_consistent(const std::vector<const NormalHandle*>& handles, int receiver = -1);

// ---- normal combine (normal_combine.cpp) ----
struct CombineSource {
  int rank = 0;
  const CombineInput* input = nullptr;
  const NormalHandle* handle = nullptr;
  int hidden = 0;
  int num_topk = 0;
};
void check_combine_source(const CombineSource& source, int num_ranks);
void check_combine_sources(const std::vector<const CombineSource*>& sources, int receiver = -1);
CombineOutput combine_for_source(int rank, const std::vector<const CombineSource*>& sources);

// ---- low-latency (low_latency_dispatch.cpp, low_latency_combine.cpp) ----
void check_low_latency_options(const std::string& who, const LowLatencyOptions& options, int num_ranks);
// Shrink mode: whether `rank` is in options.masked_ranks.
inline bool is_masked(const LowLatencyOptions& options, int rank) {
  return !options.masked_ranks.empty() && options.masked_ranks[rank] != 0;
}
struct LowLatencySource {
  int rank = 0;
  const LowLatencyDispatchInput* input = nullptr;
  const LowLatencyOptions* options = nullptr;
  std::vector<uint8_t> payload;  // [T, hidden]: FP8 bytes, or BF16 as 2 little-endian bytes each
  std::vector<float> scales;     // FP8: [T, hidden/128]
};
LowLatencySource make_low_latency_source(int rank, int num_ranks, const LowLatencyDispatchInput& input,
                                         const LowLatencyOptions& options);
void check_low_latency_sources(const std::vector<const LowLatencySource*>& sources);
LowLatencyDispatchOutput receive_low_latency_dispatch(int rank, const std::vector<const LowLatencySource*>& sources);

struct LowLatencyCombineSource {
  int rank = 0;
  const LowLatencyCombineInput* input = nullptr;
  const LowLatencyDispatchOutput* dispatch_output = nullptr;  // this rank's, as its experts' receiver
  const LowLatencyOptions* options = nullptr;
};
void check_low_latency_combine_source(const LowLatencyCombineSource& source, int num_ranks);
void check_low_latency_combine_sources(const std::vector<const LowLatencyCombineSource*>& sources);
std::vector<uint16_t> low_latency_combine_for_source(int rank,
                                                     const std::vector<const LowLatencyCombineSource*>& sources);

// Comparisons of options across ranks, shared by the normal and LL cross-rank checks.
template <typename T>
void check_same(const std::string& who, const char* name, const T& mine, const T& rank0s) {
  if (!(mine == rank0s))
    fail(who, cat(name, " = ", mine, " differs from rank 0's ", rank0s, "; every rank must pass the same value"));
}

// Shrink mode: every rank must pass the same masked_ranks.
inline void check_same_masks(const std::string& who, const std::vector<uint8_t>& mine,
                             const std::vector<uint8_t>& rank0s) {
  if (mine == rank0s) return;
  auto text = [](const std::vector<uint8_t>& m) {
    std::string s = "[";
    for (size_t i = 0; i < m.size(); ++i) s += (i ? ", " : "") + std::to_string(int{m[i]});
    return s + "]";
  };
  fail(who, cat("masked_ranks = ", text(mine), " differs from rank 0's ", text(rank0s),
                "; every rank must pass the same value"));
}

// The options both LL halves need alike on every rank: the shape (hidden, top-k, experts, Tmax) and
// shrink mode's masked ranks.
inline void check_same_low_latency_shape(const std::string& who, const LowLatencyOptions& o,
                                         const LowLatencyOptions& o0) {
  check_same(who, "hidden", o.hidden, o0.hidden);
  check_same(who, "num_topk", o.num_topk, o0.num_topk);
  check_same(who, "num_experts", o.num_experts, o0.num_experts);
  check_same(who, "num_max_dispatch_tokens_per_rank", o.num_max_dispatch_tokens_per_rank,
             o0.num_max_dispatch_tokens_per_rank);
  check_same_masks(who, o.masked_ranks, o0.masked_ranks);
}

}  // namespace epcomm::ref::detail
