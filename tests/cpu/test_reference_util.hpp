// Shared helpers of the reference-backend tests: seeded randomness (seed printed on failure, fixed
// by EPCOMM_TEST_SEED to replay one), random inputs, and checks of ArgumentError messages.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <random>
#include <string>
#include <vector>

#include "epcomm/error.hpp"
#include "epcomm/reference.hpp"

namespace epcomm::ref::testing_util {

inline uint32_t fresh_seed() {
  if (const char* s = std::getenv("EPCOMM_TEST_SEED")) return static_cast<uint32_t>(std::strtoul(s, nullptr, 10));
  return std::random_device{}();
}

// Declares `rng`, seeded freshly, with the seed in every failure message of the enclosing scope.
#define EPCOMM_SEEDED_RNG(rng)                                                                      \
  const uint32_t rng##_seed = ::epcomm::ref::testing_util::fresh_seed();                            \
  SCOPED_TRACE(::testing::Message() << "seed " << rng##_seed << " (EPCOMM_TEST_SEED=" << rng##_seed \
                                    << " replays it)");                                             \
  std::mt19937 rng(rng##_seed)

inline int uniform(std::mt19937& rng, int lo, int hi) {  // [lo, hi]
  return std::uniform_int_distribution<int>(lo, hi)(rng);
}

inline uint16_t bf16(float f) { return float_to_bf16(f); }

// A float's bits and back.
inline uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Small nonzero integers: sums of a few of them are exact in float32 and in BF16.
inline std::vector<uint16_t> random_small_bf16(std::mt19937& rng, size_t n, int magnitude = 8) {
  std::vector<uint16_t> v(n);
  for (auto& x : v) {
    int i = 0;
    while (i == 0) i = uniform(rng, -magnitude, magnitude);
    x = bf16(static_cast<float>(i));
  }
  return v;
}

// Any finite BF16 values over a wide range (for FP8 quantization tests).
inline std::vector<uint16_t> random_bf16(std::mt19937& rng, size_t n, float scale = 1.0f) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = bf16(normal(rng));
  return v;
}

// [T, K] expert ids, distinct inside a token unless `allow_duplicates`, some -1 when `p_none` > 0.
inline std::vector<int64_t> random_topk(std::mt19937& rng, int T, int K, int E, double p_none = 0.1,
                                        bool allow_duplicates = false) {
  std::vector<int64_t> idx(static_cast<size_t>(T) * K, -1);
  std::vector<int64_t> experts(E);
  for (int e = 0; e < E; ++e) experts[e] = e;
  std::bernoulli_distribution none(p_none);
  for (int t = 0; t < T; ++t) {
    std::shuffle(experts.begin(), experts.end(), rng);
    for (int k = 0; k < K; ++k) {
      const int64_t e = allow_duplicates ? experts[uniform(rng, 0, E - 1)] : experts[k % E];
      idx[static_cast<size_t>(t) * K + k] = (none(rng) || (!allow_duplicates && k >= E)) ? -1 : e;
    }
  }
  return idx;
}

// Weights that are small multiples of 1/8, so products with small integers and their sums are exact.
inline std::vector<float> random_weights(std::mt19937& rng, size_t n) {
  std::vector<float> w(n);
  for (auto& x : w) x = static_cast<float>(uniform(rng, 1, 16)) / 8.0f;
  return w;
}

inline std::vector<uint8_t> as_bytes(const std::vector<uint16_t>& v) {
  std::vector<uint8_t> b(v.size() * 2);
  if (!b.empty()) std::memcpy(b.data(), v.data(), b.size());
  return b;
}

inline std::vector<uint16_t> as_bf16(const std::vector<uint8_t>& b) {
  std::vector<uint16_t> v(b.size() / 2);
  if (!v.empty()) std::memcpy(v.data(), b.data(), v.size() * 2);
  return v;
}

inline int64_t range_begin(int64_t range) { return range >> 32; }
inline int64_t range_count(int64_t range) { return range & 0xffffffff; }

// Runs f, expects an ArgumentError whose message contains every fragment; returns the message.
inline std::string expect_argument_error(const std::function<void()>& f, std::initializer_list<std::string> fragments) {
  try {
    f();
  } catch (const ArgumentError& e) {
    const std::string message = e.what();
    for (const std::string& fragment : fragments)
      EXPECT_NE(message.find(fragment), std::string::npos)
          << "message \"" << message << "\" lacks \"" << fragment << "\"";
    return message;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected ArgumentError, got another exception: " << e.what();
    return {};
  }
  ADD_FAILURE() << "expected ArgumentError, nothing was thrown";
  return {};
}

}  // namespace epcomm::ref::testing_util
