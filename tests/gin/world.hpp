// The child side of epcomm_gin_tests: this process's ranks (one fake node to NCCL), their NCCL
// groups, and what the cases need across processes: running a body on every local rank, and the
// exchange of results (the low-latency comparisons need every rank's handles).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "epcomm/group.hpp"
#include "ll_case.hpp"
#include "shrink_case.hpp"

namespace epcomm::gin_test {

struct GinWorld {
  int node = 0, nodes = 1, ranks_per_node = 1, num_ranks = 1;
  uint64_t seed = 0;                           // the same in every process: every case's inputs derive from it
  bool expect_gin = true;                      // a net plugin was named (else the GinUnavailable cases run)
  bool shared_gpus = false;                    // fake nodes share GPUs (kernels of different processes time-slice)
  int64_t timeout_ms = 30000;                  // EPCOMM_TIMEOUT_MS, as the parent set it
  std::vector<int> ranks, devices;             // this process's ranks and their GPUs
  std::vector<std::shared_ptr<Group>> groups;  // one NCCL group per local rank
};
GinWorld& world();

// fn(rank, group) for every rank of this process, a thread each; failures become test failures
// naming the rank.
void run_world(const std::function<void(int rank, std::shared_ptr<Group> group)>& fn);

// Every rank's bytes in rank order (sizes first, then the padded payloads; two NCCL all-gathers).
std::vector<std::vector<uint8_t>> all_gather_bytes(Group& group, const std::vector<uint8_t>& mine);

// Runs `body` on this rank, then exchanges what it produced with every rank, also when it threw
// (an empty payload then), so that no rank waits for one that failed. Returns every rank's
// payload, or an empty vector when any rank failed (after rethrowing this rank's own exception).
std::vector<std::vector<uint8_t>> run_and_exchange(Group& group, const std::function<std::vector<uint8_t>()>& body);

std::vector<uint8_t> pack(const test::LLRankResult& r);
test::LLRankResult unpack_ll(const std::vector<uint8_t>& bytes);
std::vector<uint8_t> pack(const test::DeadRankResult& r);
test::DeadRankResult unpack_dead_rank(const std::vector<uint8_t>& bytes);

}  // namespace epcomm::gin_test
