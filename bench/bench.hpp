// epcomm-bench: options, result rows and the runners (GPU normal mode, NCCL baseline, CPU
// reference backend, fake nodes).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "epcomm/group.hpp"

namespace epcomm::bench {

struct Options {
  std::string mode = "normal";  // normal | low-latency | all
  int ranks = 0;                // 0: every visible GPU (CPU backend: 4)
  int tokens = -1;              // -1: the standard problem's (normal 4096, LL 128; CPU 512)
  int hidden = -1;              // -1: 7168 (CPU: 1024)
  int topk = 8;
  int experts = -1;             // -1: 256 (LL: 288; CPU: 64)
  std::string dtype = "both";   // bf16 | fp8 | both
  std::vector<int> sms = {24};  // normal mode: SM counts to measure
  bool sms_given = false;       // --sms on the command line (low-latency mode: its first value; else every SM)
  int chunk = 0;                // normal mode: Config.nvl_chunk_size (0 = default)
  int ring = 0;                 // normal mode: Config.nvl_buffer_size for dispatch (0 = default)
  int ranks_per_node = 0;       // normal mode: > 0 splits the GPUs into (virtual) nodes of this many
  int iters = 30;
  int warmup = 5;
  bool baseline = true;  // also run the NCCL all-to-all baseline
  bool verify = true;
  bool cpu = false;  // force the CPU reference backend
  std::string json;  // write results as JSON to this file ("-" = stdout)
  // --fake-nodes N: N processes, each a node to NCCL (NCCL_HOSTID), through a net plugin with GIN
  // (fake_nodes.cpp). Byte counts are the point; times through a loopback mean nothing.
  int fake_nodes = 0;
  std::string net_plugin;  // --net-plugin (default $EPCOMM_TEST_NET_PLUGIN)
  double timeout_s = 0;    // watchdog for the processes (0: 240 s)
  std::string log_dir;     // the processes' logs and results (default: a new directory)
  uint64_t seed = 0;       // inputs of every rank (0: random); the same in every process
  int dry_run_gpus = 0;    // --dry-run G: print the processes for a machine of G GPUs, start none
  bool iters_given = false, warmup_given = false, mode_given = false;
};

// The command line from argv[first] into o. Returns -1 to go on, else the exit code (0 after --help
// or --print-env, 2 for a bad option). rest: where options it does not know go (else an error).
int parse_options(int argc, char** argv, int first, Options& o, std::vector<std::string>* rest);

struct Row {
  std::string system;  // epcomm | nccl-a2a | reference-cpu
  std::string op;      // layout, dispatch-bf16, dispatch-fp8, cached-dispatch-bf16, combine, ...
  int rank = 0;
  int sms = 0;
  double us = 0;    // median per call
  double gbps = 0;  // logical GB/s (docs/contract.md §7), 0 where it does not apply
  std::string note;
  // Bytes this rank moved in one call, from the Buffer's counters (-1: not counted): to ranks of
  // other nodes (network puts) and to / from ranks of its node over NVLink.
  double net_bytes = -1, net_puts = -1, nvl_bytes = -1;
};

struct Report {
  std::string device;  // e.g. "4 x NVIDIA H100 80GB HBM3"
  int ranks = 0;
  std::string problem;
  std::vector<Row> rows;
  std::vector<std::string> checks;  // verification lines ("dispatch bf16: rank 0..3 match the reference")
  std::string warning;              // printed loudly above and below the table
  bool ok = true;
};

void run_gpu_normal(const Options& o, Report& report);
// The normal-mode cases on some of R ranks (the ranks of one fake node), their groups made by the
// caller; every rank's inputs from `seed`. Each rank checks its own outputs.
void run_gpu_normal_ranks(const Options& o, int R, uint64_t seed, const std::vector<int>& ranks,
                          const std::vector<std::shared_ptr<Group>>& groups, Report& report);
// Low-latency mode (gpu_low_latency.cu): LL dispatch / combine, hook halves, buffer size vs DeepEP,
// and the NCCL baseline at the same token count.
void run_gpu_low_latency(const Options& o, Report& report);
// The LL cases of a fake node (one launch each: FP8 and BF16 dispatch, combine, with network
// bytes) on its ranks; each rank's checked results go to ll_results_path(dir, rank) for the parent.
void run_gpu_low_latency_ranks(const Options& o, int R, uint64_t seed, const std::vector<int>& ranks,
                               const std::vector<std::shared_ptr<Group>>& groups, const std::string& dir,
                               Report& report);
std::string ll_results_path(const std::string& dir, int rank);
// The parent's check of those results against the CPU reference (the same inputs from `seed`).
void check_low_latency_results(const Options& o, int R, uint64_t seed, const std::string& dir, Report& report);
void run_nccl_baseline(const Options& o, Report& report);
void run_cpu_reference(const Options& o, Report& report);

// Fake nodes (fake_nodes.cpp): the parent starts one process per node (argv[1] = kFakeNodeChildFlag)
// and prints what they measured.
inline constexpr const char* kFakeNodeChildFlag = "--fake-node-child";
int run_fake_nodes(const Options& o);
int fake_node_child_main(int argc, char** argv);

void print_table(const Report& report);
void write_json(const Report& report, const std::string& path);

}  // namespace epcomm::bench
