// The per-rank dispatch's slot arithmetic of one lane, host and device (tests/cpu checks it against
// the walk it replaces).
#pragma once

#include <cstdint>

#include "kernels/common/control.hpp"

namespace epcomm {

// One lane's part of handing out a token's slots by lanes (dispatch_per_rank_send.cuh assign_slots_by_lane):
// lane k holds the token's k-th id; from the warp's masks (lanes with the same destination rank,
// with the same expert, the first lane of each destination, the entries that have room) it gets
// what lane 0's walk over k would give it. Host and device (tests/cpu checks it against the walk).
struct LaneSlot {
  int place;            // the destination's place among the token's destinations (first occurrence)
  int earlier_same;     // earlier lanes with the same expert (its slot is the expert's count + this)
  bool last_of_expert;  // the expert's last lane (it advances the expert's count)
};
EPCOMM_HD inline int popc32(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __popc(x);
#else
  return __builtin_popcount(x);
#endif
}
EPCOMM_HD inline LaneSlot lane_slot(int lane, uint32_t same_dest, uint32_t same_expert, uint32_t leaders) {
  const uint32_t leader_lane_bit = same_dest & (~same_dest + 1u);  // lowest lane of the destination
  LaneSlot s;
  s.place = popc32(leaders & (leader_lane_bit - 1u));
  s.earlier_same = popc32(same_expert & ((1u << lane) - 1u));
  s.last_of_expert = (same_expert >> lane) == 1u;
  return s;
}
// The entry's place among its destination's kept entries (k order); `kept`: lanes whose entry has room.
EPCOMM_HD inline int lane_entry_position(int lane, uint32_t same_dest, uint32_t kept) {
  return popc32(kept & same_dest & ((1u << lane) - 1u));
}

}  // namespace epcomm
