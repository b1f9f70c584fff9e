#include "random_inputs.hpp"

#include <utility>

#include "epcomm/reference.hpp"

namespace epcomm::testing {

std::vector<int64_t> random_topk(std::mt19937_64& rng, int num_tokens, const RoutingSpec& spec) {
  std::vector<int64_t> idx(static_cast<size_t>(num_tokens) * spec.num_topk, -1);
  std::vector<int64_t> experts(spec.num_experts);
  std::uniform_real_distribution<double> u(0, 1);
  for (int t = 0; t < num_tokens; ++t) {
    int64_t* row = idx.data() + static_cast<size_t>(t) * spec.num_topk;
    if (spec.skewed) {
      row[0] = 0;
      continue;
    }
    for (int e = 0; e < spec.num_experts; ++e) experts[e] = e;
    for (int k = 0; k < spec.num_topk && k < spec.num_experts; ++k) {
      std::uniform_int_distribution<int> pick(k, spec.num_experts - 1);
      std::swap(experts[k], experts[pick(rng)]);
      row[k] = (spec.drop_rate > 0 && u(rng) < spec.drop_rate) ? -1 : experts[k];
    }
  }
  return idx;
}

std::vector<float> random_weights(std::mt19937_64& rng, size_t count) {
  std::uniform_real_distribution<float> d(0.01f, 1.0f);
  std::vector<float> w(count);
  for (auto& v : w) v = d(rng);
  return w;
}

std::vector<uint16_t> random_bf16(std::mt19937_64& rng, size_t count) {
  std::normal_distribution<float> d(0.f, 1.f);
  std::vector<uint16_t> v(count);
  for (auto& x : v) x = ref::float_to_bf16(d(rng));
  return v;
}

std::vector<uint8_t> random_fp8(std::mt19937_64& rng, size_t count) {
  std::uniform_int_distribution<int> d(0, 255);
  std::vector<uint8_t> v(count);
  for (auto& x : v) {
    int b = d(rng);
    if ((b & 0x7f) == 0x7f) b ^= 1;  // 0x7f / 0xff are NaN in e4m3
    x = static_cast<uint8_t>(b);
  }
  return v;
}

std::vector<float> random_scales(std::mt19937_64& rng, size_t count) {
  std::uniform_real_distribution<float> d(1e-3f, 4.f);
  std::vector<float> v(count);
  for (auto& x : v) x = d(rng);
  return v;
}

std::vector<uint16_t> fast_bf16(uint64_t seed, size_t count) {
  std::vector<uint16_t> v(count);
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (auto& e : v) {  // xorshift64
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    e = ref::float_to_bf16(static_cast<float>(static_cast<int>((s >> 40) % 2049) - 1024) / 256.0f);
  }
  return v;
}

}  // namespace epcomm::testing
