// Random inputs shared by the GPU tests and epcomm-bench: never zeros, never NaN.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace epcomm::testing {

struct RoutingSpec {
  int num_experts = 64;
  int num_topk = 8;
  bool skewed = false;     // every token picks expert 0 (other slots -1)
  double drop_rate = 0.1;  // chance that a slot is -1
};

// Distinct experts per token (a random sample), with -1 entries at drop_rate.
std::vector<int64_t> random_topk(std::mt19937_64& rng, int num_tokens, const RoutingSpec& spec);
std::vector<float> random_weights(std::mt19937_64& rng, size_t count);  // in [0.01, 1)
std::vector<uint16_t> random_bf16(std::mt19937_64& rng, size_t count);  // normal(0, 1) as bf16
std::vector<uint8_t> random_fp8(std::mt19937_64& rng, size_t count);    // any e4m3 pattern but NaN
std::vector<float> random_scales(std::mt19937_64& rng, size_t count);   // in [1e-3, 4)
// Cheap noise for large tensors (expert outputs): multiples of 1/256 in [-4, 4], from a seed.
std::vector<uint16_t> fast_bf16(uint64_t seed, size_t count);

}  // namespace epcomm::testing
