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
  // Symmetric region of the load/store-reachable ranks lsa_first, lsa_first + 1, ...: every rank
  // when the group has at most kMaxLsaRanks (lsa_first 0: normal mode indexes it by rank), else
  // this rank's node (low-latency mode, which reaches other nodes through the network). Use
  // lsa_peer(c, r).
  char* peer_base[kMaxLsaRanks] = {};
  int lsa_first = 0;
  ControlLayout ctl;
  uint32_t* seq_counter = nullptr;   // device: sequence number of the last finished call
  uint32_t* done_counter = nullptr;  // device: blocks finished in the current call
  WaitContext wait{};
};

// The symmetric region of rank r, which must be load/store reachable (lsa_first <= r <
// lsa_first + entries).
// Which ranks CommonParams::peer_base lists for `rank`: every rank when the group fits the table,
// else the rank's node (ranks_per_node <= kMaxLsaRanks, which Buffer checks).
struct LsaWindow {
  int first = 0, count = 0;
};
inline LsaWindow lsa_window(int rank, int num_ranks, int ranks_per_node) {
  if (num_ranks <= kMaxLsaRanks) return {0, num_ranks};
  return {rank / ranks_per_node * ranks_per_node, ranks_per_node};
}

EPCOMM_HD inline char* lsa_peer(const CommonParams& c, int r) { return c.peer_base[r - c.lsa_first]; }

}  // namespace epcomm
