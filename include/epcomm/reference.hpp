// The CPU reference backend: the exact semantics of docs/contract.md §3, on host memory.
//
// Each function here takes the inputs of ALL ranks and returns the outputs of all ranks; it is the
// oracle that GPU tests compare with. `HostCluster` (host_cluster.hpp) runs the same semantics with
// R ranks as threads, each calling with its own inputs only.
//
// Element storage: BF16 as uint16_t bit patterns, FP8 e4m3 as uint8_t bit patterns, scales float.
#pragma once

#include <cstdint>
#include <vector>

#include "epcomm/types.hpp"

namespace epcomm::ref {

// ---- number formats (exact, bit-for-bit what the GPU kernels produce) ----
float bf16_to_float(uint16_t v);
uint16_t float_to_bf16(float f);  // round to nearest even, NaN stays NaN
float e4m3_to_float(uint8_t v);
uint8_t float_to_e4m3(float f);  // round to nearest even, saturating to ±448, NaN -> 0x7f
// FP8 scale of one 128-channel group, docs/contract.md §3.3: max(amax, 1e-4) / 448, optionally rounded up
// to a power of two (by exponent arithmetic, no log/exp).
float fp8_group_scale(float amax, bool round_scale);
// The UE8M0 byte of a power-of-two scale (its biased exponent).
uint8_t ue8m0_of(float power_of_two_scale);

// ---- layout (docs/contract.md §3.1) ----
struct Layout {
  std::vector<int32_t> num_tokens_per_rank;    // [R]
  std::vector<int32_t> num_tokens_per_node;    // [R / ranks_per_node]; empty when one node
  std::vector<int32_t> num_tokens_per_expert;  // [E]
  std::vector<uint8_t> is_token_in_rank;       // [T, R], 0/1
};
// topk_idx: [T, K] row-major, values in [-1, E). ranks_per_node = R for one node.
Layout get_dispatch_layout(const std::vector<int64_t>& topk_idx, int num_tokens, int num_topk, int num_experts,
                           int num_ranks, int ranks_per_node);

// ---- normal mode (docs/contract.md §3.2) ----
struct NormalInput {  // one rank's inputs
  int num_tokens = 0;
  std::vector<uint8_t> x;  // [T, hidden] elements of `dtype`, row-major, as bytes
  // FP8 only: [T, S] row-major, S = NormalOptions::scale_words(): 4-byte words moved bit for bit
  // (float32 scales, or int32 words such as packed UE8M0 exponents, held here by their bits:
  // scale_words_from / scale_words_as_int).
  std::vector<float> scales;
  std::vector<int64_t> topk_idx;    // [T, K]; empty for a dispatch without topk (num_topk = 0)
  std::vector<float> topk_weights;  // [T, K]; required with topk_idx
  // [T, R] 0/1: the routing of a dispatch without topk (required then). With topk_idx it may be
  // left empty; if given it must equal the routing topk_idx implies.
  std::vector<uint8_t> is_token_in_rank;
};
struct NormalOptions {
  DType dtype = DType::kBF16;  // kBF16 or kFP8E4M3
  int hidden = 0;
  int num_topk = 0;  // 0: dispatch without topk (routing from is_token_in_rank)
  int num_experts = 0;
  int expert_alignment = 1;
  int num_worst_tokens = 0;  // >0: outputs have exactly this many rows
  // FP8: 4-byte scale words per token; 0 = ceil(hidden / 128) (float32 scales of 128-channel groups).
  // Any other count is carried the same way (DeepEP passes x_scales' columns through as they are).
  int num_scales = 0;
  int scale_words() const { return num_scales > 0 ? num_scales : (hidden + 127) / 128; }
};
// int32 scale words <-> the float storage of NormalInput::scales, bit for bit.
std::vector<float> scale_words_from(const std::vector<int32_t>& words);
std::vector<int32_t> scale_words_as_int(const std::vector<float>& words);

struct NormalHandle {                       // what combine and a cached dispatch need (per receiving rank)
  std::vector<int32_t> rank_prefix_matrix;  // [R, R], entry [i][j] = tokens ranks 0..i send to j
  std::vector<int32_t> recv_src_idx;        // [num_recv]: source token index of each row
  std::vector<int32_t> recv_src_rank;       // [num_recv]: source rank of each row
  std::vector<uint8_t> is_token_in_rank;    // [T, R] of this rank (as sender)
  int num_recv = 0;
  int num_tokens = 0;  // T of this rank
};
struct NormalDispatchOutput {
  int num_rows = 0;                                 // num_recv, or num_worst_tokens
  std::vector<uint8_t> recv_x;                      // [num_rows, hidden] elements as bytes
  std::vector<float> recv_scales;                   // FP8: [num_rows, S] row-major words (as NormalInput::scales)
  std::vector<int64_t> recv_topk_idx;               // [num_rows, K] local ids or -1 (rows past num_recv: -1)
  std::vector<float> recv_topk_weights;             // [num_rows, K], 0 where idx is -1
  std::vector<int32_t> num_recv_tokens_per_expert;  // [E/R]: each expert's total, rounded up to
                                                    // expert_alignment; empty without topk
  NormalHandle handle;
};
// Rows on rank j: source rank 0's rows first, then rank 1, ...; inside a source, ascending token.
// Rows in [num_recv, num_worst_tokens) have recv_x zero, topk idx -1, weights 0, scales 0.
std::vector<NormalDispatchOutput> normal_dispatch(const std::vector<NormalInput>& inputs, const NormalOptions& options);
// Cached dispatch: same routing as `handles` (one per rank, from one dispatch), new x (and
// scales); topk_idx/topk_weights must be empty and the options' topk fields are not used. Outputs
// recv_x/recv_scales (padded to num_worst_tokens if set) and the handle again; topk outputs empty.
std::vector<NormalDispatchOutput> normal_cached_dispatch(const std::vector<NormalInput>& inputs,
                                                         const std::vector<NormalHandle>& handles,
                                                         const NormalOptions& options);

struct CombineInput {                  // one rank's inputs
  std::vector<uint16_t> x;             // [rows >= num_recv, hidden] BF16; rows past num_recv ignored
  std::vector<float> topk_weights;     // [rows, K] when num_topk > 0, else empty
  std::vector<uint16_t> bias0, bias1;  // [T, hidden] BF16 or empty
};
struct CombineOutput {
  std::vector<uint16_t> combined_x;          // [T, hidden] BF16: float32 sum, rounded once
  std::vector<float> combined_topk_weights;  // [T, K]; empty when num_topk = 0
};
// num_topk = 0: no weights to combine (every topk_weights empty, combined_topk_weights empty).
std::vector<CombineOutput> normal_combine(const std::vector<CombineInput>& inputs,
                                          const std::vector<NormalHandle>& handles, int hidden, int num_topk);

// ---- low-latency mode (docs/contract.md §3.3) ----
struct LowLatencyOptions {
  int hidden = 0;
  int num_topk = 0;
  int num_experts = 0;
  int num_max_dispatch_tokens_per_rank = 0;  // Tmax
  bool use_fp8 = true;
  bool round_scale = false;
  bool use_ue8m0 = false;
  // Shrink mode: [R] 0/1, or empty (no rank masked). A masked rank takes no part: its inputs are
  // not read (they may be empty), it sends nothing and its outputs are empty (dispatch: no rows,
  // zero counts; combine: an empty vector). Live ranks get no rows from it, and their combine
  // leaves out every (token, k) whose expert it owns.
  std::vector<uint8_t> masked_ranks;
};
struct LowLatencyDispatchInput {
  int num_tokens = 0;
  std::vector<uint16_t> x;        // [T, hidden] BF16
  std::vector<int64_t> topk_idx;  // [T, K]
};
struct LowLatencyDispatchOutput {
  // Slot s of local expert e holds the s-th received row; canonical order here: source ranks
  // ascending, tokens ascending inside a source (GPUs may order differently; compare per source
  // rank as sets). Rows past recv_count are zero.
  std::vector<uint8_t> recv_x;             // [E/R, R*Tmax, hidden] FP8 bytes, or BF16 as 2 bytes each
  std::vector<float> recv_scales;          // fp8 && !ue8m0: [E/R, R*Tmax, hidden/128] (logical order)
  std::vector<int32_t> recv_scales_ue8m0;  // fp8 && ue8m0: [E/R, R*Tmax, ceil(hidden/512)]
  std::vector<int32_t> recv_count;         // [E/R]
  std::vector<int32_t> src_info;           // [E/R, R*Tmax]: source token index (-1 past count)
  std::vector<int64_t> layout_range;       // [E/R, R]: (begin << 32) | count
};
std::vector<LowLatencyDispatchOutput> low_latency_dispatch(const std::vector<LowLatencyDispatchInput>& inputs,
                                                           const LowLatencyOptions& options);

struct LowLatencyCombineInput {
  int num_tokens = 0;
  std::vector<uint16_t> y;          // [E/R, R*Tmax, hidden] BF16 (expert outputs, per slot)
  std::vector<int64_t> topk_idx;    // [T, K] (as given to dispatch)
  std::vector<float> topk_weights;  // [T, K]
};
// out[t] = sum_k w[t,k] * y(expert topk[t,k], slot of token t), float32, in k order; rounded once.
// Slots are found through each expert rank's src_info/layout_range (`dispatch_outputs`).
std::vector<std::vector<uint16_t>> low_latency_combine(const std::vector<LowLatencyCombineInput>& inputs,
                                                       const std::vector<LowLatencyDispatchOutput>& dispatch_outputs,
                                                       const LowLatencyOptions& options);

}  // namespace epcomm::ref
