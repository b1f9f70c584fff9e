// The parent side of the programs that start one process per fake node (epcomm_gin_tests,
// epcomm-bench --fake-nodes): child processes, each a fake node to NCCL, started with their own
// environment and log, watched against a deadline, killed when they hang, and reported one line
// each. POSIX only (fork/execve/waitpid) and no CUDA, so the CPU tests exercise it with plain
// shells (tests/cpu/test_gin_launcher.cpp).
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace epcomm::testing {

struct ChildSpec {
  std::string name;                                      // for the report, e.g. "node 1 (rank 1, GPU 0)"
  std::vector<std::string> argv;                         // argv[0] is the program's path (execve)
  std::vector<std::pair<std::string, std::string>> env;  // set in the child (over the parent's environment)
  std::string log_path;                                  // the child's stdout and stderr
};

struct ChildOutcome {
  std::string name, log_path;
  bool exited = false;  // it ended by itself: exit_code or signal says how
  int exit_code = -1;
  int signal = 0;
  bool killed = false;   // the watchdog ended it (it was still running at the deadline)
  double seconds = 0.0;  // from start until it ended or was killed
};

struct RunReport {
  std::vector<ChildOutcome> children;
  bool timed_out = false;  // the deadline came with children still running
  // 0: every child exited 0; 77: every child exited 77 (nothing to run); 1: anything else.
  int exit_code = 1;
  std::string summary;  // one line per child: name, how it ended, seconds, log
};

// Starts every child (each in a process group of its own), waits until all have ended or
// timeout_s has passed since the start; once a child has ended with a failure, the others get at
// most grace_s more (they are most likely waiting for it inside a collective). Children still
// running then are killed (SIGKILL to their process group) and reported as hung.
RunReport run_children(const std::vector<ChildSpec>& children, double timeout_s, double grace_s);

// The last max_bytes of a file (the start of a partial first line dropped), or "" if unreadable.
std::string tail_of_file(const std::string& path, size_t max_bytes);

// A new directory $TMPDIR/<prefix>XXXXXX (or under /tmp) for the children's logs; "" after printing
// why (as `who`) when it cannot be made.
std::string make_log_dir(const char* prefix, const char* who);

// "2x1" -> {2, 1}: nodes x ranks per node; {0, 0} when malformed.
std::pair<int, int> parse_layout(const std::string& text);

// GPUs of the ranks of node `node` (P ranks each) on a machine with `gpus` GPUs: distinct GPUs for
// all ranks when there are enough, else every node on GPUs 0..P-1 (fake nodes may share a GPU: to
// NCCL they are different hosts); empty when P > gpus (ranks of one process need distinct GPUs).
std::vector<int> node_devices(int node, int nodes, int ranks_per_node, int gpus);

}  // namespace epcomm::testing
