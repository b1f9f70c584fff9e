// How many tokens per rank normal mode's internode region holds (buffer_internode.cpp): the region
// keeps every token of every source node (InterLayout, until the ring of docs/design-scale.md §4),
// so its rows bound T. A Buffer whose token limit was not given (BufferOptions::max_tokens_per_rank,
// EPCOMM_MAX_TOKENS_PER_RANK) lays its rows out for as many tokens as num_rdma_bytes holds at the
// first dispatch's row size, instead of refusing every dispatch for the default 65536.
#pragma once

#include <algorithm>
#include <cstddef>

#include "kernels/internode/params.hpp"

namespace epcomm {

// Whether T tokens per rank fit (the control part keeps max_chunks chunk masks per source: the
// Buffer's token limit fixes them, whatever T is): the widest dispatch row (BF16; FP8 rows with the usual scales are
// narrower, and each call still checks its own) and the combine's rows of `hidden`, top-k num_topk.
inline bool internode_tokens_fit(int num_ranks, int ranks_per_node, int tokens, int max_chunks, int max_local_experts,
                                 size_t region_bytes, int hidden, int num_topk) {
  const InterLayout l =
      InterLayout::make(num_ranks, ranks_per_node, tokens, max_chunks, max_local_experts, region_bytes);
  const size_t d = InterDispatchGeometry::make(l, 2 * hidden, 0, num_topk).bytes;
  const size_t c = InterCombineGeometry::make(l, hidden, num_topk).bytes;
  return l.half_bytes > 0 && std::max(d, c) <= l.half_bytes;
}

// The most tokens per rank (1 .. max_tokens) that fit; 0 when not even one does.
inline int internode_token_capacity(int num_ranks, int ranks_per_node, int max_tokens, int max_chunks,
                                    int max_local_experts, size_t region_bytes, int hidden, int num_topk) {
  auto fits = [&](int t) {
    return internode_tokens_fit(num_ranks, ranks_per_node, t, max_chunks, max_local_experts, region_bytes, hidden,
                                num_topk);
  };
  if (!fits(1)) return 0;
  if (fits(max_tokens)) return max_tokens;
  int lo = 1, hi = max_tokens;  // fits(lo), !fits(hi): bytes grow with T
  while (hi - lo > 1) {
    const int mid = lo + (hi - lo) / 2;
    (fits(mid) ? lo : hi) = mid;
  }
  return lo;
}

}  // namespace epcomm
