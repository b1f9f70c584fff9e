// Sizes of the normal-mode ring slots, shared by the buffer (which lays the rings out) and by the
// Config size hints (which tell users how much to allocate).
#pragma once

#include <cstddef>

#include "kernels/common/control.hpp"

namespace epcomm::ring {

// Per token in a dispatch slot: [scales f32][topk idx i32][topk weights f32], padded to 16 bytes.
inline int dispatch_meta_row_bytes(int num_scales, int num_topk) {
  const int raw = 4 * (num_scales + 2 * num_topk);
  return raw == 0 ? 0 : static_cast<int>(align_up(raw, 16));
}
inline size_t dispatch_slot_bytes(int chunk, int row_bytes, int num_scales, int num_topk) {
  return align_up(static_cast<size_t>(chunk) * row_bytes, 128) +
         align_up(static_cast<size_t>(chunk) * dispatch_meta_row_bytes(num_scales, num_topk), 128);
}
inline size_t combine_weights_offset(int chunk, int num_ranks, int hidden) {
  return align_up(static_cast<size_t>(num_ranks) * chunk * hidden * 2, 128);
}
inline size_t combine_slot_bytes(int chunk, int num_ranks, int hidden, int num_topk) {
  return combine_weights_offset(chunk, num_ranks, hidden) +
         align_up(static_cast<size_t>(num_ranks) * chunk * num_topk * 4, 128);
}

}  // namespace epcomm::ring
