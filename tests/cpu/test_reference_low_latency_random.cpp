// Low-latency mode on random inputs at R = 1, 2, 3, 4, 8: received slots agree with the layout and
// the sources, combine with identity experts gives sum_k w * x, combine does not depend on the slot
// order, and HostCluster equals the all-ranks functions.
#include <cmath>
#include <numeric>

#include "cpu/test_reference_util.hpp"
#include "epcomm/host_cluster.hpp"

namespace epcomm::ref {
namespace {

using namespace testing_util;

enum class Mode { kBf16, kFp8, kFp8Ue8m0 };

struct Problem {
  int R = 1;
  LowLatencyOptions o;
  std::vector<LowLatencyDispatchInput> inputs;
  std::vector<std::vector<float>> weights;  // per rank [T, K]
  int slots() const { return R * o.num_max_dispatch_tokens_per_rank; }
  int experts_per_rank() const { return o.num_experts / R; }
};

Problem make_problem(std::mt19937& rng, int R, Mode mode, bool skewed, int fixed_T = -1) {
  Problem p;
  p.R = R;
  p.o.num_experts = R * uniform(rng, 1, 4);
  p.o.num_topk = uniform(rng, 1, std::min(8, p.o.num_experts));
  p.o.num_max_dispatch_tokens_per_rank = std::max(fixed_T, uniform(rng, 1, 24));
  p.o.hidden = 128 * uniform(rng, 1, 5);
  p.o.use_fp8 = mode != Mode::kBf16;
  p.o.round_scale = mode == Mode::kFp8Ue8m0 || (mode == Mode::kFp8 && rng() % 2);
  p.o.use_ue8m0 = mode == Mode::kFp8Ue8m0;
  const int K = p.o.num_topk, E = p.o.num_experts;
  p.inputs.resize(R);
  p.weights.resize(R);
  for (int r = 0; r < R; ++r) {
    auto& in = p.inputs[r];
    in.num_tokens = fixed_T >= 0 ? fixed_T : uniform(rng, 0, p.o.num_max_dispatch_tokens_per_rank);
    in.x = mode == Mode::kBf16 ? random_small_bf16(rng, static_cast<size_t>(in.num_tokens) * p.o.hidden)
                               : random_bf16(rng, static_cast<size_t>(in.num_tokens) * p.o.hidden, 3.0f);
    if (skewed) {
      in.topk_idx.assign(static_cast<size_t>(in.num_tokens) * K, -1);
      for (int t = 0; t < in.num_tokens; ++t) in.topk_idx[static_cast<size_t>(t) * K + uniform(rng, 0, K - 1)] = E - 1;
    } else {
      in.topk_idx = random_topk(rng, in.num_tokens, K, E, 0.1);
    }
    p.weights[r] = random_weights(rng, in.topk_idx.size());
  }
  return p;
}

void check_dispatch(const Problem& p, const std::vector<LowLatencyDispatchOutput>& out) {
  const int Epr = p.experts_per_rank(), S = p.slots(), H = p.o.hidden, G = H / 128, W = (G + 3) / 4;
  std::vector<Layout> layouts;
  for (const auto& in : p.inputs)
    layouts.push_back(get_dispatch_layout(in.topk_idx, in.num_tokens, p.o.num_topk, p.o.num_experts, p.R, p.R));
  for (int r = 0; r < p.R; ++r) {
    const auto& o = out[r];
    for (int e = 0; e < Epr; ++e) {
      SCOPED_TRACE(::testing::Message() << "rank " << r << " local expert " << e);
      const int global = r * Epr + e;
      int total = 0;
      for (int i = 0; i < p.R; ++i) {
        const int64_t range = o.layout_range[e * p.R + i];
        ASSERT_EQ(range_begin(range), total);
        ASSERT_EQ(range_count(range), layouts[i].num_tokens_per_expert[global]);
        const auto& in = p.inputs[i];
        for (int s = total; s < total + range_count(range); ++s) {
          const int t = o.src_info[e * S + s];
          ASSERT_TRUE(t >= 0 && t < in.num_tokens);
          const auto* row = &in.topk_idx[static_cast<size_t>(t) * p.o.num_topk];
          ASSERT_NE(std::find(row, row + p.o.num_topk, global), row + p.o.num_topk);
          const size_t slot = static_cast<size_t>(e) * S + s;
          const uint16_t* x = &in.x[static_cast<size_t>(t) * H];
          if (!p.o.use_fp8) {
            ASSERT_TRUE(std::equal(x, x + H, as_bf16(o.recv_x).begin() + slot * H));
            continue;
          }
          for (int g = 0; g < G; ++g) {
            float amax = 0;
            for (int c = 0; c < 128; ++c) amax = std::max(amax, std::fabs(bf16_to_float(x[g * 128 + c])));
            const float scale = fp8_group_scale(amax, p.o.round_scale);
            if (p.o.use_ue8m0) {
              const uint32_t word = static_cast<uint32_t>(o.recv_scales_ue8m0[slot * W + g / 4]);
              ASSERT_EQ((word >> (8 * (g % 4))) & 0xff, ue8m0_of(scale));
            } else {
              ASSERT_EQ(o.recv_scales[slot * G + g], scale);
            }
            for (int c = 0; c < 128; ++c)
              ASSERT_EQ(o.recv_x[slot * H + g * 128 + c], float_to_e4m3(bf16_to_float(x[g * 128 + c]) / scale));
          }
        }
        total += static_cast<int>(range_count(range));
      }
      ASSERT_EQ(o.recv_count[e], total);
      // Unused slots: src_info -1, data zero.
      const size_t elt = p.o.use_fp8 ? 1 : 2;
      for (int s = total; s < S; ++s) ASSERT_EQ(o.src_info[e * S + s], -1);
      ASSERT_TRUE(std::all_of(o.recv_x.begin() + (static_cast<size_t>(e) * S + total) * H * elt,
                              o.recv_x.begin() + (static_cast<size_t>(e) + 1) * S * H * elt,
                              [](uint8_t b) { return b == 0; }));
    }
  }
}

// The expert outputs an identity expert would produce: the received row, dequantized, as BF16.
std::vector<LowLatencyCombineInput> identity_combine_inputs(const Problem& p,
                                                            const std::vector<LowLatencyDispatchOutput>& out) {
  const int Epr = p.experts_per_rank(), S = p.slots(), H = p.o.hidden, G = H / 128, W = (G + 3) / 4;
  std::vector<LowLatencyCombineInput> cin(p.R);
  for (int r = 0; r < p.R; ++r) {
    cin[r].num_tokens = p.inputs[r].num_tokens;
    cin[r].topk_idx = p.inputs[r].topk_idx;
    cin[r].topk_weights = p.weights[r];
    if (!p.o.use_fp8) {
      cin[r].y = as_bf16(out[r].recv_x);
      continue;
    }
    cin[r].y.resize(static_cast<size_t>(Epr) * S * H);
    for (size_t slot = 0; slot < static_cast<size_t>(Epr) * S; ++slot)
      for (int c = 0; c < H; ++c) {
        const int g = c / 128;
        const float scale =
            p.o.use_ue8m0
                ? std::exp2(
                      static_cast<float>(
                          (static_cast<uint32_t>(out[r].recv_scales_ue8m0[slot * W + g / 4]) >> (8 * (g % 4))) & 0xff) -
                      127.0f)
                : out[r].recv_scales[slot * G + g];
        cin[r].y[slot * H + c] = bf16(e4m3_to_float(out[r].recv_x[slot * H + c]) * scale);
      }
  }
  return cin;
}

void check_identity_combine(const Problem& p, const std::vector<std::vector<uint16_t>>& out) {
  const int K = p.o.num_topk, H = p.o.hidden;
  for (int r = 0; r < p.R; ++r) {
    const auto& in = p.inputs[r];
    ASSERT_EQ(out[r].size(), static_cast<size_t>(in.num_tokens) * H);
    for (int t = 0; t < in.num_tokens; ++t) {
      for (int c = 0; c < H; ++c) {
        const float x = bf16_to_float(in.x[static_cast<size_t>(t) * H + c]);
        float want = 0, weight_sum = 0;
        for (int k = 0; k < K; ++k)
          if (in.topk_idx[t * K + k] >= 0) want += p.weights[r][t * K + k] * x, weight_sum += p.weights[r][t * K + k];
        const float got = bf16_to_float(out[r][static_cast<size_t>(t) * H + c]);
        if (!p.o.use_fp8) {  // small integers times multiples of 1/8: every step exact
          ASSERT_EQ(got, bf16_to_float(bf16(want))) << "rank " << r << " token " << t << " channel " << c;
        } else {  // e4m3 keeps 3 mantissa bits; scales up to 2x coarser with round_scale
          float amax = 0;
          for (int i = 0; i < 128; ++i)
            amax = std::max(amax, std::fabs(bf16_to_float(in.x[static_cast<size_t>(t) * H + c / 128 * 128 + i])));
          // Per element: e4m3 half-ulp (1/16 relative) or, below e4m3's normal range, half a subnormal
          // step (2^-10 of a scale up to 2 * amax / 448); BF16 rounding of y and of the output.
          const float tol = weight_sum * (std::fabs(x) * (1.0f / 16 + 1.0f / 256) + amax / 448 * 0x1p-9f) +
                            std::fabs(want) / 128 + 1e-6f;
          ASSERT_NEAR(got, want, tol) << "rank " << r << " token " << t << " channel " << c;
        }
      }
    }
  }
}

class LowLatencyRandom : public ::testing::TestWithParam<int> {};

TEST_P(LowLatencyRandom, IdentityExpertsRoundTrip) {
  EPCOMM_SEEDED_RNG(rng);
  const int R = GetParam();
  for (Mode mode : {Mode::kBf16, Mode::kFp8, Mode::kFp8Ue8m0}) {
    for (int variant = 0; variant < 5; ++variant) {
      const bool skewed = variant == 1;
      const int fixed_T = variant == 2 ? 0 : variant == 3 ? 1 : -1;
      const Problem p = make_problem(rng, R, mode, skewed, fixed_T);
      SCOPED_TRACE(::testing::Message() << "mode " << static_cast<int>(mode) << " E=" << p.o.num_experts
                                        << " K=" << p.o.num_topk << " Tmax=" << p.o.num_max_dispatch_tokens_per_rank
                                        << " hidden=" << p.o.hidden << " skewed=" << skewed << " T=" << fixed_T);
      const auto out = low_latency_dispatch(p.inputs, p.o);
      check_dispatch(p, out);
      const auto cin = identity_combine_inputs(p, out);
      const auto combined = low_latency_combine(cin, out, p.o);
      check_identity_combine(p, combined);

      std::vector<LowLatencyDispatchOutput> got(R);
      std::vector<std::vector<uint16_t>> got_combined(R);
      HostCluster cluster(R, R);
      cluster.run([&](int rank) {
        got[rank] = cluster.low_latency_dispatch(rank, p.inputs[rank], p.o);
        got_combined[rank] = cluster.low_latency_combine(rank, cin[rank], got[rank], p.o);
      });
      for (int r = 0; r < R; ++r) {
        EXPECT_EQ(got[r].recv_x, out[r].recv_x);
        EXPECT_EQ(got[r].recv_scales, out[r].recv_scales);
        EXPECT_EQ(got[r].recv_scales_ue8m0, out[r].recv_scales_ue8m0);
        EXPECT_EQ(got[r].recv_count, out[r].recv_count);
        EXPECT_EQ(got[r].src_info, out[r].src_info);
        EXPECT_EQ(got[r].layout_range, out[r].layout_range);
        EXPECT_EQ(got_combined[r], combined[r]);
      }
    }
  }
}

TEST_P(LowLatencyRandom, CombineDoesNotDependOnSlotOrder) {
  // GPUs fill slots in arrival order. Shuffle each source's rows inside its range (src_info and y
  // together) and move whole ranges around: combine must give the same result.
  EPCOMM_SEEDED_RNG(rng);
  const int R = GetParam();
  const Problem p = make_problem(rng, R, Mode::kBf16, false);
  auto out = low_latency_dispatch(p.inputs, p.o);
  auto cin = identity_combine_inputs(p, out);
  const auto want = low_latency_combine(cin, out, p.o);
  const int Epr = p.experts_per_rank(), S = p.slots(), H = p.o.hidden;
  for (int r = 0; r < R; ++r) {
    for (int e = 0; e < Epr; ++e) {
      std::vector<int> order(R);  // new position of each source's range
      std::iota(order.begin(), order.end(), 0);
      std::shuffle(order.begin(), order.end(), rng);
      std::vector<int32_t> src(S, -1);
      std::vector<uint16_t> y(static_cast<size_t>(S) * H, 0);
      int next = 0;
      for (int i : order) {
        const int64_t range = out[r].layout_range[e * R + i];
        std::vector<int> rows(range_count(range));
        std::iota(rows.begin(), rows.end(), static_cast<int>(range_begin(range)));
        std::shuffle(rows.begin(), rows.end(), rng);
        out[r].layout_range[e * R + i] = (int64_t{next} << 32) | range_count(range);
        for (int old : rows) {
          src[next] = out[r].src_info[e * S + old];
          std::copy_n(cin[r].y.begin() + (static_cast<size_t>(e) * S + old) * H, H,
                      y.begin() + static_cast<size_t>(next) * H);
          ++next;
        }
      }
      std::copy(src.begin(), src.end(), out[r].src_info.begin() + e * S);
      std::copy(y.begin(), y.end(), cin[r].y.begin() + static_cast<size_t>(e) * S * H);
    }
  }
  EXPECT_EQ(low_latency_combine(cin, out, p.o), want);
}

INSTANTIATE_TEST_SUITE_P(Ranks, LowLatencyRandom, ::testing::Values(1, 2, 3, 4, 8),
                         [](const auto& info) { return "R" + std::to_string(info.param); });

}  // namespace
}  // namespace epcomm::ref
