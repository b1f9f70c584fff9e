// A normal-mode problem for the GPU tests, inside one node (test_normal.cpp) and across virtual
// nodes (test_internode.cpp): every rank's random inputs and the CPU reference results that the
// device outputs are compared with.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "harness.hpp"

namespace epcomm::test {

struct NormalProblem {
  int num_ranks = 4;
  int ranks_per_node = 0;  // 0: one node
  DType dtype = DType::kBF16;
  int hidden = 1024;
  int num_topk = 8;
  int num_experts = 64;
  int max_tokens = 300;   // T of each rank drawn from [0, max_tokens]; rank 0 gets max_tokens
  int fixed_tokens = -1;  // >= 0: every rank has exactly this many tokens
  bool with_topk = true;
  bool skewed = false;
  bool worst = false;  // num_worst_tokens = R * max_tokens
  bool with_bias = true;
  bool graph = false;  // also capture layout + dispatch + combine in a CUDA graph and replay
  int num_sms = 8;
  int expert_alignment = 4;
  // FP8 scales (DeepEP's forms): float32 or int32 words (packed UE8M0 exponents), num_scales words per
  // token (0: ceil(hidden / 128)), on the device column-major with the column stride rounded up to
  // scale_token_align tokens (4: DeepGEMM's TMA-aligned form), or row-major.
  DType scale_dtype = DType::kF32;
  int num_scales = 0;
  int scale_token_align = 1;
  bool scales_row_major = false;
  // Optional routing: topk of rank r with T tokens (else random), and T per rank.
  std::function<std::vector<int64_t>(int rank, int num_tokens)> routing;
  std::function<int(int rank)> tokens;

  int nodes_split() const { return ranks_per_node > 0 ? ranks_per_node : num_ranks; }
  int scale_words() const { return num_scales > 0 ? num_scales : (hidden + 127) / 128; }
};

struct RankInputs {
  int num_tokens = 0;
  std::vector<uint8_t> x, x2;          // dispatch input, and a second one for the cached dispatch
  std::vector<float> scales, scales2;  // fp8 scale words, row-major (device layout: scale_layout)
  std::vector<int64_t> topk;
  std::vector<float> weights;
  ref::Layout layout;  // the reference layout (per-node counts with several nodes)
};

struct NormalReference {
  std::vector<RankInputs> in;
  int num_worst_tokens = 0;
  std::vector<ref::NormalDispatchOutput> dispatch;
  std::vector<ref::CombineInput> combine_in;  // random expert outputs (and biases) per rank
  std::vector<ref::CombineOutput> combine;
  std::vector<ref::NormalDispatchOutput> cached;  // cached dispatch of the second inputs (x2)
};

NormalReference make_normal_reference(const NormalProblem& c, uint64_t seed);

std::vector<float> column_major(const std::vector<float>& row_major, int rows, int cols);
TensorView column_major_view(const DeviceTensor& t, int rows, int cols);

// The problem's FP8 scales on the device: the host words in its layout (scale_layout), the device
// tensor that holds them (allocated to that size) and the [T, S] view dispatch takes.
std::vector<float> scale_layout(const NormalProblem& c, const std::vector<float>& row_major, int tokens);
DeviceTensor scale_tensor(const NormalProblem& c, int tokens, int device);
TensorView scale_view(const NormalProblem& c, const DeviceTensor& t, int tokens);
// Received scales compared bit for bit (as int32 words whichever the dtype).
::testing::AssertionResult same_scale_words(const DeviceTensor& got, const std::vector<float>& want,
                                            const std::string& what, size_t count);

}  // namespace epcomm::test
