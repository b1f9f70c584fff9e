// Low-latency combine, docs/contract.md §3.3: each source rank gathers, for every (token, k), the expert
// output row that its token produced, weights it and sums over k. The expert rank's handle
// (layout_range, src_info) says where the row is; nothing assumes the canonical slot order.
#include <algorithm>

#include "reference/reference_internal.hpp"

namespace epcomm::ref::detail {
namespace {

// acc + w * y as a rounded multiply followed by a rounded add, never one fused operation: the GPU
// kernels do the same (__fmul_rn, __fadd_rn), so the results agree bit for bit. `volatile` keeps
// the compiler from contracting the two into an FMA whatever -ffp-contract / -march say.
float add_product(float acc, float w, float y) {
  volatile float product = w * y;
  return acc + product;
}

}  // namespace

void check_low_latency_combine_source(const LowLatencyCombineSource& s, int num_ranks) {
  const std::string who = rank_prefix(s.rank);
  const LowLatencyOptions& o = *s.options;
  check_low_latency_options(who, o, num_ranks);
  if (is_masked(o, s.rank)) return;  // shrink mode: takes no part, its inputs are not read
  const LowLatencyCombineInput& in = *s.input;
  const int T = in.num_tokens;
  const int Tmax = o.num_max_dispatch_tokens_per_rank;
  if (T < 0 || T > Tmax)
    fail(who, cat("num_tokens = ", T, " is out of range [0, num_max_dispatch_tokens_per_rank = ", Tmax, "]"));
  const int experts_per_rank = o.num_experts / num_ranks;
  const int64_t slots = int64_t{num_ranks} * Tmax;
  check_size(who, "y", in.y.size(), experts_per_rank * slots * o.hidden,
             cat("num_experts / num_ranks * num_ranks * num_max_dispatch_tokens_per_rank * hidden = ", experts_per_rank,
                 " * ", num_ranks, " * ", Tmax, " * ", o.hidden));
  check_topk_idx(who, "topk_idx", in.topk_idx, T, o.num_topk, o.num_experts);
  check_size(who, "topk_weights", in.topk_weights.size(), int64_t{T} * o.num_topk,
             cat("num_tokens * num_topk = ", T, " * ", o.num_topk));
  const LowLatencyDispatchOutput& d = *s.dispatch_output;
  check_size(who, "handle src_info", d.src_info.size(), experts_per_rank * slots,
             cat("num_experts / num_ranks * num_ranks * num_max_dispatch_tokens_per_rank = ", experts_per_rank, " * ",
                 num_ranks, " * ", Tmax));
  check_size(who, "handle layout_range", d.layout_range.size(), int64_t{experts_per_rank} * num_ranks,
             cat("num_experts / num_ranks * num_ranks = ", experts_per_rank, " * ", num_ranks));
  for (size_t k = 0; k < d.layout_range.size(); ++k) {
    const int64_t begin = d.layout_range[k] >> 32;
    const int64_t count = d.layout_range[k] & 0xffffffff;
    if (begin < 0 || begin + count > slots)
      fail(who, cat("handle layout_range[", k / num_ranks, "][", k % num_ranks, "] = (begin ", begin, ", count ", count,
                    ") runs past the ", slots, " slots of an expert"));
  }
}

void check_low_latency_combine_sources(const std::vector<const LowLatencyCombineSource*>& sources) {
  const LowLatencyOptions& o0 = *sources[0]->options;
  for (const LowLatencyCombineSource* s : sources) {
    check_same_low_latency_shape(rank_prefix(s->rank), *s->options, o0);
  }
}

std::vector<uint16_t> low_latency_combine_for_source(int rank,
                                                     const std::vector<const LowLatencyCombineSource*>& sources) {
  const int num_ranks = static_cast<int>(sources.size());
  const LowLatencyCombineInput& in = *sources[rank]->input;
  const LowLatencyOptions& o = *sources[rank]->options;
  if (is_masked(o, rank)) return {};
  const int K = o.num_topk;
  const int hidden = o.hidden;
  const int experts_per_rank = o.num_experts / num_ranks;
  const size_t slots = static_cast<size_t>(num_ranks) * o.num_max_dispatch_tokens_per_rank;

  std::vector<uint16_t> out(static_cast<size_t>(in.num_tokens) * hidden);
  std::vector<float> acc(hidden);
  for (int t = 0; t < in.num_tokens; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    const int64_t* idx = &in.topk_idx[static_cast<size_t>(t) * K];
    for (int k = 0; k < K; ++k) {
      if (idx[k] < 0) continue;
      // The n-th occurrence of an expert in this token's list is its n-th row on that expert.
      int occurrence = 0;
      for (int k2 = 0; k2 < k; ++k2) occurrence += idx[k2] == idx[k];
      const int owner = static_cast<int>(idx[k] / experts_per_rank);
      if (is_masked(o, owner)) continue;  // shrink mode: a masked rank's experts contribute nothing
      const int local = static_cast<int>(idx[k] % experts_per_rank);
      const LowLatencyDispatchOutput& d = *sources[owner]->dispatch_output;
      const int64_t range = d.layout_range[static_cast<size_t>(local) * num_ranks + rank];
      const size_t begin = static_cast<size_t>(range >> 32);
      const size_t end = begin + static_cast<size_t>(range & 0xffffffff);
      size_t slot = end;
      for (size_t s = begin; s < end; ++s)
        if (d.src_info[local * slots + s] == t && occurrence-- == 0) {
          slot = s;
          break;
        }
      if (slot == end)
        fail(rank_prefix(rank), cat("topk_idx[", t, "][", k, "] = ", idx[k], " has no row in rank ", owner,
                                    "'s handle (src_info/layout_range); pass the topk_idx and handles of "
                                    "the dispatch this combine answers"));
      const uint16_t* y = &sources[owner]->input->y[(local * slots + slot) * hidden];
      const float w = in.topk_weights[static_cast<size_t>(t) * K + k];
      for (int c = 0; c < hidden; ++c) acc[c] = add_product(acc[c], w, bf16_to_float(y[c]));
    }
    for (int c = 0; c < hidden; ++c) out[static_cast<size_t>(t) * hidden + c] = float_to_bf16(acc[c]);
  }
  return out;
}

}  // namespace epcomm::ref::detail
