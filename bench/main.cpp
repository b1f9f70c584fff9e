// epcomm-bench: the standard problems of docs/contract.md §7, verified against the CPU reference, beside an
// NCCL all-to-all baseline run in the same invocation. Without a CUDA device it says so and runs
// the CPU reference backend (4 thread-ranks, a smaller problem).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>

#include "bench.hpp"
#include "cli.hpp"
#include "core/env.hpp"

namespace epcomm::bench {

void print_table(const Report& r) {
  std::printf("\n%s | ranks %d | %s\n", r.device.c_str(), r.ranks, r.problem.c_str());
  std::printf("%-14s %-22s %5s %4s %11s %10s  %s\n", "system", "op", "rank", "SMs", "us", "GB/s", "note");
  for (const Row& row : r.rows) {
    char gb[32] = "-";
    if (row.gbps > 0) std::snprintf(gb, sizeof gb, "%.1f", row.gbps);
    std::printf("%-14s %-22s %5d %4d %11.1f %10s  %s\n", row.system.c_str(), row.op.c_str(), row.rank, row.sms, row.us,
                gb, row.note.c_str());
  }
  // Summary: the figure that counts per docs/contract.md §7 is the minimum over ranks.
  std::map<std::string, std::pair<double, double>> summary;  // key -> (max us, min GB/s)
  for (const Row& row : r.rows) {
    const std::string key = row.system + " " + row.op + " @" + std::to_string(row.sms) + " SMs";
    auto it = summary.find(key);
    if (it == summary.end()) summary[key] = {row.us, row.gbps};
    else it->second = {std::max(it->second.first, row.us), std::min(it->second.second, row.gbps)};
  }
  std::printf("\nsummary (slowest rank):\n");
  for (const auto& [key, v] : summary)
    std::printf("  %-48s %10.1f us %10.1f GB/s\n", key.c_str(), v.first, v.second);
  for (const auto& c : r.checks) std::printf("check: %s\n", c.c_str());
  std::printf("verification: %s\n", r.ok ? "PASSED" : "FAILED");
}

void write_json(const Report& r, const std::string& path) {
  std::ostringstream s;
  s << "{\n  \"device\": \"" << r.device << "\",\n  \"ranks\": " << r.ranks << ",\n  \"problem\": \"" << r.problem
    << "\",\n  \"verified\": " << (r.ok ? "true" : "false") << ",\n  \"rows\": [\n";
  for (size_t i = 0; i < r.rows.size(); ++i) {
    const Row& x = r.rows[i];
    s << "    {\"system\": \"" << x.system << "\", \"op\": \"" << x.op << "\", \"rank\": " << x.rank
      << ", \"sms\": " << x.sms << ", \"us\": " << x.us << ", \"gbps\": " << x.gbps << ", \"note\": \"" << x.note
      << "\"}" << (i + 1 < r.rows.size() ? "," : "") << "\n";
  }
  s << "  ]\n}\n";
  if (path == "-") {
    std::cout << s.str();
  } else {
    std::ofstream f(path);
    f << s.str();
  }
}

}  // namespace epcomm::bench

namespace {

void usage() {
  std::printf(
      "usage: epcomm-bench [options]\n"
      "  --mode normal|low-latency|all   which mode to measure (default normal)\n"
      "  --ranks N        ranks (default: every GPU; CPU backend: 4)\n"
      "  --tokens T       tokens per rank (default 4096 normal, 128 low-latency; CPU 512)\n"
      "  --hidden H       hidden size (default 7168; CPU 1024)\n"
      "  --topk K         experts per token (default 8)\n"
      "  --experts E      experts (default 256 normal, 288 low-latency; CPU 64)\n"
      "  --dtype bf16|fp8|both   dispatch input type (default both)\n"
      "  --sms A,B,...    SMs per normal-mode kernel to measure (default 24); low-latency mode: the\n"
      "                   first value, for dispatch and combine (default every SM)\n"
      "  --chunk N --ring N      Config.nvl_chunk_size / nvl_buffer_size of dispatch and combine (tokens)\n"
      "  --ranks-per-node P      normal mode across nodes: the GPUs as nodes of P ranks (virtual nodes;\n"
      "                   reports network-hop and NVLink bytes per rank)\n"
      "  --iters N --warmup N    timed and warm-up iterations (default 30, 5)\n"
      "  --no-baseline    skip the NCCL all-to-all baseline\n"
      "  --no-verify      skip the comparison with the CPU reference\n"
      "  --cpu            run the CPU reference backend even with a GPU\n"
      "  --json PATH      also write the results as JSON (- for stdout)\n"
      "  --print-env      list the EPCOMM_* environment variables and exit\n");
}

}  // namespace

int main(int argc, char** argv) {
  using namespace epcomm::bench;
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "epcomm-bench: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--mode") o.mode = next();
    else if (a == "--ranks") o.ranks = std::atoi(next());
    else if (a == "--tokens") o.tokens = std::atoi(next());
    else if (a == "--hidden") o.hidden = std::atoi(next());
    else if (a == "--topk") o.topk = std::atoi(next());
    else if (a == "--experts") o.experts = std::atoi(next());
    else if (a == "--dtype") o.dtype = next();
    else if (a == "--sms") {
      o.sms = parse_list(next());
      o.sms_given = true;
    }
    else if (a == "--chunk") o.chunk = std::atoi(next());
    else if (a == "--ring") o.ring = std::atoi(next());
    else if (a == "--ranks-per-node") o.ranks_per_node = std::atoi(next());
    else if (a == "--iters") o.iters = std::atoi(next());
    else if (a == "--warmup") o.warmup = std::atoi(next());
    else if (a == "--no-baseline") o.baseline = false;
    else if (a == "--no-verify") o.verify = false;
    else if (a == "--cpu") o.cpu = true;
    else if (a == "--json") o.json = next();
    else if (a == "--print-env") {
      for (const auto& p : epcomm::env_params())
        std::printf("%-28s default %-8lld %s\n", p.name, static_cast<long long>(p.default_value), p.meaning);
      return 0;
    } else if (a == "-h" || a == "--help") {
      usage();
      return 0;
    } else {
      std::fprintf(stderr, "epcomm-bench: unknown option %s\n", a.c_str());
      usage();
      return 2;
    }
  }
  if (o.mode != "normal" && o.mode != "low-latency" && o.mode != "all") {
    std::fprintf(stderr, "epcomm-bench: --mode must be normal, low-latency or all\n");
    return 2;
  }
  if (o.dtype != "bf16" && o.dtype != "fp8" && o.dtype != "both") {
    std::fprintf(stderr, "epcomm-bench: --dtype must be bf16, fp8 or both\n");
    return 2;
  }
  int gpus = 0;
  if (cudaGetDeviceCount(&gpus) != cudaSuccess) {
    cudaGetLastError();
    gpus = 0;
  }
  Report report;
  try {
    if (gpus == 0 || o.cpu) {
      if (gpus == 0) std::printf("epcomm-bench: no CUDA device found; running the CPU reference backend\n");
      run_cpu_reference(o, report);
    } else {
      if (o.mode == "normal" || o.mode == "all") {
        run_gpu_normal(o, report);
        if (o.baseline) run_nccl_baseline(o, report);
      }
      if (o.mode == "low-latency" || o.mode == "all") run_gpu_low_latency(o, report);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "epcomm-bench: %s\n", e.what());
    return 1;
  }
  print_table(report);
  if (!o.json.empty()) write_json(report, o.json);
  return report.ok ? 0 : 1;
}
