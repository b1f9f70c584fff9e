// epcomm-gin-probe's pieces: the options, the launcher (gin_probe.cu) that starts one process per
// fake node and watches them, and the node (gin_probe_node.cu) that runs its ranks.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace epcomm::gin_probe {

struct Options {
  int procs = 2, ranks_per_proc = 1, rounds = 6;
  size_t bytes = 1 << 20;  // the largest put; the rounds cycle through smaller and odd sizes too
  int timeout_s = 300, kernel_timeout_s = 60, wait_ms = 20000;
  // putValue (NCCL's inline path) is off by default: in NCCL 2.28.9's proxy GIN it cannot work.
  // ncclGinProxyProgress copies each descriptor to the stack, and proxyGinProcessGfd takes the
  // inline slot's index as (that copy - the queue), so the source offset it hands iput is garbage
  // (seen on 1 x H100, run 62: offset 18446744073703305976 into a 512-byte inline buffer).
  // epcomm's kernels never use putValue.
  bool put_value = false;
  std::vector<int> device_of_rank;  // empty: rank r on GPU r % device count
  std::string plugin, dir;          // dir: where node 0 leaves the NCCL unique id
  int child = -1;                   // >= 0: this process is fake node `child`
};

// One line on stdout, "[gin-probe rank R] ..." (rank < 0: "[gin-probe] ..."), whole even when
// ranks print from several threads.
void say(int rank, const char* fmt, ...) __attribute__((format(printf, 2, 3)));

// A fake node's process: its ranks, one thread each. Exit code 0 = every rank passed, 1 = a rank
// failed, 77 = no GPU.
int run_node(const Options& options);

constexpr int kExitNoGpu = 77;

}  // namespace epcomm::gin_probe
