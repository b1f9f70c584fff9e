#include "epcomm/group.hpp"

#include <cstring>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "epcomm/error.hpp"

namespace epcomm {
namespace {

// What each rank contributes to a barrier: which step it is at, and how many barriers of this group
// it passed before.
struct BarrierTag {
  uint64_t count = 0;
  char step[48] = {};
};
static_assert(sizeof(BarrierTag) == 56, "gathered as raw bytes");

// "0-3, 6" for the ranks {0, 1, 2, 3, 6}.
std::string rank_list(const std::vector<int>& ranks) {
  std::string out;
  for (size_t i = 0; i < ranks.size();) {
    size_t j = i;
    while (j + 1 < ranks.size() && ranks[j + 1] == ranks[j] + 1) ++j;
    if (!out.empty()) out += ", ";
    out += std::to_string(ranks[i]);
    if (j > i) out.append("-").append(std::to_string(ranks[j]));
    i = j + 1;
  }
  return out;
}

}  // namespace

Group::Group(int rank, int size, int device, int ranks_per_node)
    : rank_(rank), size_(size), device_(device), ranks_per_node_(ranks_per_node) {}
Group::~Group() = default;
SymmetricMemory::~SymmetricMemory() = default;

void Group::barrier(const char* step) {
  BarrierTag mine;
  mine.count = barriers_++;
  std::strncpy(mine.step, step, sizeof(mine.step) - 1);
  std::vector<BarrierTag> all(static_cast<size_t>(size_));
  try {
    all_gather(&mine, all.data(), sizeof(BarrierTag));
  } catch (const RuntimeFailure& e) {  // a peer that never came (or died): name the barrier
    throw RuntimeFailure("group barrier at '" + std::string(mine.step) + "': " + e.what());
  } catch (const TimeoutError& e) {
    throw TimeoutError("group barrier at '" + std::string(mine.step) + "': " + e.what());
  }
  bool same = true;
  for (const BarrierTag& t : all) same = same && t.count == all[0].count && std::strcmp(t.step, all[0].step) == 0;
  if (same) return;
  // Every rank gathered the same tags, so every rank throws the same message.
  std::map<std::pair<uint64_t, std::string>, std::vector<int>> at;
  for (int r = 0; r < size_; ++r) at[{all[r].count, all[r].step}].push_back(r);
  std::string where;
  for (const auto& [tag, ranks] : at) {
    if (!where.empty()) where += "; ";
    where.append(ranks.size() > 1 ? "ranks " : "rank ").append(rank_list(ranks));
    where.append(" at '").append(tag.second).append("' (group barrier ").append(std::to_string(tag.first)).append(")");
  }
  throw RuntimeFailure("group barrier: the ranks are at different collective steps: " + where +
                       "; every rank must make the same collective calls (Buffer construction, reset, "
                       "clean_low_latency_buffer, destruction) in the same order");
}

}  // namespace epcomm
