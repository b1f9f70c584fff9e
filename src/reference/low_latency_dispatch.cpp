// Low-latency dispatch, docs/contract.md §3.3: each (token, k) with an expert sends the token to that
// expert (a token goes once per expert, not once per rank), FP8-quantized per 128 channels at the
// sender. Receivers lay rows out per local expert in a canonical order (source rank, then token,
// then k) that GPUs need not follow; layout_range/src_info describe whichever order was used.
#include <algorithm>
#include <cmath>

#include "reference/reference_internal.hpp"

namespace epcomm::ref::detail {

void check_low_latency_options(const std::string& who, const LowLatencyOptions& o, int num_ranks) {
  if (o.hidden <= 0 || o.hidden % kScaleGroup != 0)
    fail(who, cat("hidden = ", o.hidden, " must be a positive multiple of ", kScaleGroup, " in low-latency mode"));
  check_num_topk(who, o.num_topk, 1);
  check_num_experts(who, o.num_experts, num_ranks, /*required=*/true);
  if (o.num_max_dispatch_tokens_per_rank < 1)
    fail(who, cat("num_max_dispatch_tokens_per_rank = ", o.num_max_dispatch_tokens_per_rank, " must be >= 1"));
  if (o.use_ue8m0 && !o.round_scale)
    fail(who, "use_ue8m0 = true requires round_scale = true (UE8M0 scales are powers of two)");
  if (!o.masked_ranks.empty()) {
    check_size(who, "masked_ranks", o.masked_ranks.size(), num_ranks, "num_ranks (or empty)");
    check_zero_one(who, "masked_ranks", o.masked_ranks);
  }
}

LowLatencySource make_low_latency_source(int rank, int num_ranks, const LowLatencyDispatchInput& in,
                                         const LowLatencyOptions& o) {
  const std::string who = rank_prefix(rank);
  check_low_latency_options(who, o, num_ranks);
  if (is_masked(o, rank)) return LowLatencySource{rank, &in, &o, {}, {}};  // takes no part: not read
  const int T = in.num_tokens;
  const int Tmax = o.num_max_dispatch_tokens_per_rank;
  if (T < 0 || T > Tmax)
    fail(who, cat("num_tokens = ", T, " is out of range [0, num_max_dispatch_tokens_per_rank = ", Tmax, "]"));
  check_size(who, "x", in.x.size(), int64_t{T} * o.hidden, cat("num_tokens * hidden = ", T, " * ", o.hidden));
  check_topk_idx(who, "topk_idx", in.topk_idx, T, o.num_topk, o.num_experts);
  // A token that lists an expert twice sends it twice; a source has Tmax slots per expert.
  std::vector<int> per_expert(o.num_experts, 0);
  for (int64_t e : in.topk_idx)
    if (e >= 0 && ++per_expert[e] > Tmax)
      fail(who, cat("topk_idx sends more than num_max_dispatch_tokens_per_rank = ", Tmax, " rows to expert ", e,
                    " (some token lists it more than once)"));

  LowLatencySource src;
  src.rank = rank;
  src.input = &in;
  src.options = &o;
  const size_t n = static_cast<size_t>(T) * o.hidden;
  if (!o.use_fp8) {
    src.payload.resize(n * 2);
    for (size_t i = 0; i < n; ++i) {
      src.payload[2 * i] = static_cast<uint8_t>(in.x[i] & 0xff);
      src.payload[2 * i + 1] = static_cast<uint8_t>(in.x[i] >> 8);
    }
    return src;
  }
  const int groups = o.hidden / kScaleGroup;
  src.payload.resize(n);
  src.scales.resize(static_cast<size_t>(T) * groups);
  for (size_t g = 0; g < src.scales.size(); ++g) {
    const size_t base = g * kScaleGroup;  // groups are consecutive in a row-major [T, hidden]
    float amax = 0.0f;
    for (int c = 0; c < kScaleGroup; ++c) amax = std::fmax(amax, std::fabs(bf16_to_float(in.x[base + c])));
    const float scale = fp8_group_scale(amax, o.round_scale);
    src.scales[g] = scale;
    for (int c = 0; c < kScaleGroup; ++c) src.payload[base + c] = float_to_e4m3(bf16_to_float(in.x[base + c]) / scale);
  }
  return src;
}

void check_low_latency_sources(const std::vector<const LowLatencySource*>& sources) {
  const LowLatencyOptions& o0 = *sources[0]->options;
  for (const LowLatencySource* s : sources) {
    const std::string who = rank_prefix(s->rank);
    const LowLatencyOptions& o = *s->options;
    check_same_low_latency_shape(who, o, o0);
    check_same(who, "use_fp8", o.use_fp8, o0.use_fp8);
    check_same(who, "round_scale", o.round_scale, o0.round_scale);
    check_same(who, "use_ue8m0", o.use_ue8m0, o0.use_ue8m0);
  }
}

LowLatencyDispatchOutput receive_low_latency_dispatch(int rank, const std::vector<const LowLatencySource*>& sources) {
  const int num_ranks = static_cast<int>(sources.size());
  const LowLatencyOptions& o = *sources[rank]->options;
  const int experts_per_rank = o.num_experts / num_ranks;
  const int K = o.num_topk;
  const size_t slots = static_cast<size_t>(num_ranks) * o.num_max_dispatch_tokens_per_rank;
  const size_t elt = o.use_fp8 ? 1 : 2;
  const size_t row_bytes = o.hidden * elt;
  const int groups = o.hidden / kScaleGroup;
  const int words = (groups + 3) / 4;
  const bool float_scales = o.use_fp8 && !o.use_ue8m0;
  const bool packed_scales = o.use_fp8 && o.use_ue8m0;

  LowLatencyDispatchOutput out;
  out.recv_x.assign(experts_per_rank * slots * row_bytes, 0);
  if (float_scales) out.recv_scales.assign(experts_per_rank * slots * groups, 0.0f);
  if (packed_scales) out.recv_scales_ue8m0.assign(experts_per_rank * slots * words, 0);
  out.recv_count.assign(experts_per_rank, 0);
  out.src_info.assign(experts_per_rank * slots, -1);
  out.layout_range.assign(static_cast<size_t>(experts_per_rank) * num_ranks, 0);

  for (int e = 0; e < experts_per_rank; ++e) {
    const int64_t global = int64_t{rank} * experts_per_rank + e;
    size_t count = 0;
    for (int i = 0; i < num_ranks; ++i) {
      const LowLatencySource& s = *sources[i];
      const size_t begin = count;
      // Shrink mode: nothing moves from or to a masked rank.
      const int num_tokens = is_masked(o, i) || is_masked(o, rank) ? 0 : s.input->num_tokens;
      for (int t = 0; t < num_tokens; ++t) {
        for (int k = 0; k < K; ++k) {
          if (s.input->topk_idx[static_cast<size_t>(t) * K + k] != global) continue;
          const size_t slot = e * slots + count++;
          out.src_info[slot] = t;
          std::copy_n(s.payload.begin() + t * row_bytes, row_bytes, out.recv_x.begin() + slot * row_bytes);
          const float* scales = s.scales.data() + static_cast<size_t>(t) * groups;
          if (float_scales) std::copy_n(scales, groups, out.recv_scales.begin() + slot * groups);
          for (int g = 0; packed_scales && g < groups; ++g) {
            const uint32_t byte = ue8m0_of(scales[g]);
            auto& word = out.recv_scales_ue8m0[slot * words + g / 4];
            word = static_cast<int32_t>(static_cast<uint32_t>(word) | (byte << (8 * (g % 4))));
          }
        }
      }
      out.layout_range[static_cast<size_t>(e) * num_ranks + i] =
          (static_cast<int64_t>(begin) << 32) | static_cast<int64_t>(count - begin);
    }
    out.recv_count[e] = static_cast<int32_t>(count);
  }
  return out;
}

}  // namespace epcomm::ref::detail
