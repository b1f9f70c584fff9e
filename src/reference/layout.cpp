// Dispatch layout, docs/contract.md §3.1: who receives each token, and how many tokens each rank, node and
// expert gets. A token counts once per rank (and per node) however many of its experts live there,
// but once per (token, k) entry for an expert.
#include "reference/reference_internal.hpp"

namespace epcomm::ref {
namespace detail {

Layout compute_layout(const int64_t* topk_idx, int num_tokens, int num_topk, int num_experts, int num_ranks,
                      int ranks_per_node) {
  const int experts_per_rank = num_experts / num_ranks;
  const int num_nodes = num_ranks / ranks_per_node;
  Layout layout;
  layout.num_tokens_per_rank.assign(num_ranks, 0);
  layout.num_tokens_per_expert.assign(num_experts, 0);
  layout.is_token_in_rank.assign(static_cast<size_t>(num_tokens) * num_ranks, 0);
  if (num_nodes > 1) layout.num_tokens_per_node.assign(num_nodes, 0);
  std::vector<uint8_t> in_node(num_nodes);
  for (int t = 0; t < num_tokens; ++t) {
    uint8_t* in_rank = &layout.is_token_in_rank[static_cast<size_t>(t) * num_ranks];
    std::fill(in_node.begin(), in_node.end(), 0);
    for (int k = 0; k < num_topk; ++k) {
      const int64_t e = topk_idx[static_cast<size_t>(t) * num_topk + k];
      if (e < 0) continue;
      ++layout.num_tokens_per_expert[e];
      const int r = static_cast<int>(e / experts_per_rank);
      in_rank[r] = 1;
      in_node[r / ranks_per_node] = 1;
    }
    for (int r = 0; r < num_ranks; ++r) layout.num_tokens_per_rank[r] += in_rank[r];
    if (num_nodes > 1)
      for (int n = 0; n < num_nodes; ++n) layout.num_tokens_per_node[n] += in_node[n];
  }
  return layout;
}

Layout checked_layout(const std::string& who, const std::vector<int64_t>& topk_idx, int num_tokens, int num_topk,
                      int num_experts, int num_ranks, int ranks_per_node) {
  check_num_ranks(num_ranks, ranks_per_node);
  if (num_tokens < 0) fail(who, cat("num_tokens = ", num_tokens, " must be >= 0"));
  check_num_topk(who, num_topk, 1);
  check_num_experts(who, num_experts, num_ranks, /*required=*/true);
  check_topk_idx(who, "topk_idx", topk_idx, num_tokens, num_topk, num_experts);
  return compute_layout(topk_idx.data(), num_tokens, num_topk, num_experts, num_ranks, ranks_per_node);
}

}  // namespace detail

Layout get_dispatch_layout(const std::vector<int64_t>& topk_idx, int num_tokens, int num_topk, int num_experts,
                           int num_ranks, int ranks_per_node) {
  return detail::checked_layout("", topk_idx, num_tokens, num_topk, num_experts, num_ranks, ranks_per_node);
}

}  // namespace epcomm::ref
