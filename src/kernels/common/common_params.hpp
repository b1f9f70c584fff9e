// What every communication kernel needs to find its peers and report: the first member of each
// mode's kernel arguments (normal, internode, low-latency, the clean barrier).
#pragma once

#include <cstdint>

#include "kernels/common/control.hpp"
#include "kernels/common/diagnostics.hpp"

namespace epcomm {

struct CommonParams {
  int rank = 0;
  int num_ranks = 0;
  char* peer_base[kMaxNvlRanks] = {};  // symmetric region of each rank (peer_base[rank] is local)
  ControlLayout ctl;
  uint32_t* seq_counter = nullptr;   // device: sequence number of the last finished call
  uint32_t* done_counter = nullptr;  // device: blocks finished in the current call
  WaitContext wait{};
};

}  // namespace epcomm
