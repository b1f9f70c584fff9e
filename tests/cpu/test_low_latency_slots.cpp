// The per-rank dispatch's slot assignment by lanes (dispatch.cu assign_slots_by_lane) against lane
// 0's walk over k, which it replaced: for random tokens (repeated experts, -1 and out-of-range
// ids, experts past Tmax), the warp's masks are built as the
// intrinsics build them, every lane applies lane_slot (the same host/device function the kernel
// uses), and the destinations, staging slots, entries and counters must equal the walk's.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "cpu/test_reference_util.hpp"
#include "kernels/low_latency/params.hpp"

namespace epcomm {
namespace {

struct Assignment {
  std::vector<int> dest, dslot, nent;
  std::vector<std::vector<uint32_t>> entries;
  std::vector<int> hist, rank_hist;
  int dropped = 0;
  bool operator==(const Assignment& o) const {
    return dest == o.dest && dslot == o.dslot && nent == o.nent && entries == o.entries && hist == o.hist &&
           rank_hist == o.rank_hist && dropped == o.dropped;
  }
};

// Lane 0's walk (the kernel's path until run 44), written out on the host.
Assignment walk(const std::vector<int64_t>& ids, int E, int EL, int tmax, std::vector<int> hist,
                std::vector<int> rank_hist) {
  Assignment a;
  for (int k = 0; k < static_cast<int>(ids.size()); ++k) {
    const int64_t e = ids[k];
    if (e < 0 || e >= E) continue;
    const int d = static_cast<int>(e) / EL;
    size_t di = 0;
    while (di < a.dest.size() && a.dest[di] != d) ++di;
    if (di == a.dest.size()) {
      a.dest.push_back(d);
      a.dslot.push_back(rank_hist[d]++);
      a.nent.push_back(0);
      a.entries.emplace_back();
    }
    const int s = hist[e]++;
    if (s >= tmax) {
      ++a.dropped;
      continue;
    }
    a.entries[di].push_back(static_cast<uint32_t>(e % EL) | (static_cast<uint32_t>(s) << 16) |
                            (static_cast<uint32_t>(k) << 28));
    ++a.nent[di];
  }
  a.hist = hist;
  a.rank_hist = rank_hist;
  return a;
}

// The lanes: masks as __match_any_sync / __ballot_sync give them, then lane_slot per lane, reads
// before writes as the kernel's __syncwarp orders them.
Assignment by_lanes(const std::vector<int64_t>& ids, int E, int EL, int tmax, std::vector<int> hist,
                    std::vector<int> rank_hist) {
  constexpr int kLanes = 32;
  int64_t key_d[kLanes], key_e[kLanes];
  bool valid[kLanes];
  int e[kLanes], d[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    const int64_t id = l < static_cast<int>(ids.size()) ? ids[l] : -1;
    valid[l] = id >= 0 && id < E;
    e[l] = valid[l] ? static_cast<int>(id) : -1;
    d[l] = valid[l] ? e[l] / EL : -1 - l;
    key_d[l] = d[l];
    key_e[l] = valid[l] ? e[l] : -1 - l;
  }
  const auto match = [&](const int64_t* key, int l) {
    uint32_t m = 0;
    for (int j = 0; j < kLanes; ++j) m |= static_cast<uint32_t>(key[j] == key[l]) << j;
    return m;
  };
  uint32_t same_d[kLanes], same_e[kLanes], leaders = 0, kept_lanes = 0;
  int s[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    same_d[l] = match(key_d, l);
    same_e[l] = match(key_e, l);
    if (valid[l] && (same_d[l] & ((1u << l) - 1u)) == 0) leaders |= 1u << l;
  }
  LaneSlot ls[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    ls[l] = lane_slot(l, same_d[l], same_e[l], leaders);
    s[l] = valid[l] ? hist[e[l]] + ls[l].earlier_same : 0;
    if (valid[l] && s[l] < tmax) kept_lanes |= 1u << l;
  }
  Assignment a;
  const int nd = popc32(leaders);
  a.dest.assign(nd, -1);
  a.dslot.assign(nd, -1);
  a.nent.assign(nd, -1);
  a.entries.assign(nd, {});
  std::vector<std::vector<uint32_t>> slots(nd, std::vector<uint32_t>(kLanes, 0xffffffffu));
  for (int l = 0; l < kLanes; ++l) {
    if (valid[l] && ls[l].last_of_expert) hist[e[l]] += popc32(same_e[l]);
    if ((leaders >> l) & 1u) {
      a.dest[ls[l].place] = d[l];
      a.dslot[ls[l].place] = rank_hist[d[l]]++;
      a.nent[ls[l].place] = popc32(kept_lanes & same_d[l]);
    }
    if (valid[l] && !((kept_lanes >> l) & 1u)) ++a.dropped;
    if ((kept_lanes >> l) & 1u)
      slots[ls[l].place][lane_entry_position(l, same_d[l], kept_lanes)] =
          static_cast<uint32_t>(e[l] % EL) | (static_cast<uint32_t>(s[l]) << 16) | (static_cast<uint32_t>(l) << 28);
  }
  for (int di = 0; di < nd; ++di)
    for (int i = 0; i < a.nent[di]; ++i) a.entries[di].push_back(slots[di][i]);
  a.hist = hist;
  a.rank_hist = rank_hist;
  return a;
}

TEST(LowLatencySlots, LanesGiveTheWalksSlots) {
  EPCOMM_SEEDED_RNG(rng);
  int cases = 0, with_drops = 0, with_repeats = 0;
  for (int R : {1, 2, 3, 4, 8})
    for (int per_rank : {1, 2, 36})
      for (int K : {1, 2, 5, 8, 16})
        for (int rep = 0; rep < 40; ++rep) {
          const int E = R * per_rank, tmax = 1 + static_cast<int>(rng() % 6);
          std::vector<int64_t> ids(K);
          bool repeat = false;
          for (int k = 0; k < K; ++k) {
            const int u = static_cast<int>(rng() % 10);
            ids[k] = u == 0 ? -1 : u == 1 ? E + static_cast<int64_t>(rng() % 3) : static_cast<int64_t>(rng() % E);
            for (int j = 0; j < k; ++j) repeat |= ids[j] == ids[k] && ids[k] >= 0 && ids[k] < E;
          }
          std::vector<int> hist(E), rank_hist(R);
          for (int& h : hist) h = static_cast<int>(rng() % (tmax + 2));
          for (int& h : rank_hist) h = static_cast<int>(rng() % 100);
          const Assignment want = walk(ids, E, per_rank, tmax, hist, rank_hist);
          const Assignment got = by_lanes(ids, E, per_rank, tmax, hist, rank_hist);
          ++cases;
          with_drops += want.dropped > 0;
          with_repeats += repeat;
          if (!(got == want)) {
            std::string s;
            for (int64_t id : ids) s += std::to_string(id) + " ";
            ADD_FAILURE() << "R=" << R << " E=" << E << " K=" << K << " Tmax=" << tmax << " ids: " << s;
            return;
          }
        }
  // The random cases reach the paths that matter.
  EXPECT_GT(with_drops, cases / 20);
  EXPECT_GT(with_repeats, cases / 20);
}

}  // namespace
}  // namespace epcomm
