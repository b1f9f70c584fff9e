// How many tokens per node one round of normal mode's internode region holds (buffer_internode.cpp):
// the rows hold a window of tokens (kernels/internode/params.hpp, inter_window), and a call with more
// runs in rounds. A dispatch that does not wait for the counts (num_worst_tokens) cannot know how
// many tokens the group has, so without a token limit given (BufferOptions::max_tokens_per_rank,
// EPCOMM_MAX_TOKENS_PER_RANK) its limit is what one round holds at the first dispatch's hidden.
#pragma once

#include <algorithm>

#include "kernels/internode/params.hpp"

namespace epcomm {

// The tokens one round holds for the widest dispatch row (BF16; FP8 rows with the usual scales are
// narrower, and each call still checks its own) and for the combine at `hidden`, top-k num_topk;
// 0 when not one step (inter_window_step) fits. nvl_offset, nvl_bytes: the part of the region
// num_nvl_bytes gives (InterCombineGeometry::make).
inline int internode_round_capacity(const InterLayout& l, int hidden, int num_topk, int step, size_t nvl_offset = 0,
                                    size_t nvl_bytes = 0) {
  const int d = InterDispatchGeometry::make(l, 2 * hidden, 0, num_topk, step).window;
  // float32 partials: the wider rows (BF16 partials hold at least as many tokens).
  const int c = InterCombineGeometry::make(l, hidden, num_topk, step, false, nvl_offset, nvl_bytes).window;
  return std::min(d, c);
}

// Runs launch(window_begin, window_end, last) for each window of `window` tokens in [0, tokens)
// (tokens: the group's largest T rounded up to the chunk; the last window cut there, so no round
// loops over tokens no rank has): at least once, a call with no tokens still takes part in the flow
// control.
template <class Launch>
void for_each_internode_round(int tokens, int window, Launch&& launch) {
  const int rounds = std::max((tokens + window - 1) / window, 1);
  for (int k = 0; k < rounds; ++k) launch(k * window, std::min((k + 1) * window, tokens), k == rounds - 1);
}

}  // namespace epcomm
