// epcomm-bench: options, result rows and the runners (GPU normal mode, NCCL baseline, CPU
// reference backend).
#pragma once

#include <string>
#include <vector>

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
  bool baseline = true;         // also run the NCCL all-to-all baseline
  bool verify = true;
  bool cpu = false;             // force the CPU reference backend
  std::string json;             // write results as JSON to this file ("-" = stdout)
};

struct Row {
  std::string system;   // epcomm | nccl-a2a | reference-cpu
  std::string op;       // layout, dispatch-bf16, dispatch-fp8, cached-dispatch-bf16, combine, ...
  int rank = 0;
  int sms = 0;
  double us = 0;        // median per call
  double gbps = 0;      // logical GB/s (docs/contract.md §7), 0 where it does not apply
  std::string note;
};

struct Report {
  std::string device;   // e.g. "4 x NVIDIA H100 80GB HBM3"
  int ranks = 0;
  std::string problem;
  std::vector<Row> rows;
  std::vector<std::string> checks;  // verification lines ("dispatch bf16: rank 0..3 match the reference")
  bool ok = true;
};

void run_gpu_normal(const Options& o, Report& report);
// Low-latency mode (gpu_low_latency.cu): LL dispatch / combine, hook halves, buffer size vs DeepEP,
// and the NCCL baseline at the same token count.
void run_gpu_low_latency(const Options& o, Report& report);
void run_nccl_baseline(const Options& o, Report& report);
void run_cpu_reference(const Options& o, Report& report);

void print_table(const Report& report);
void write_json(const Report& report, const std::string& path);

}  // namespace epcomm::bench
