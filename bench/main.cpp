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

namespace {

bool has_bytes(const Report& r) {
  return std::any_of(r.rows.begin(), r.rows.end(), [](const Row& x) { return x.net_bytes >= 0 || x.nvl_bytes >= 0; });
}

std::string count_text(double v) {  // a byte or put count, "-" where not counted
  if (v < 0) return "-";
  char b[32];
  std::snprintf(b, sizeof b, "%.0f", v);
  return b;
}

std::string json_count(double v) { return v < 0 ? "null" : count_text(v); }

void print_warning(const Report& r) {
  if (!r.warning.empty()) std::printf("\n!!!!! %s !!!!!\n", r.warning.c_str());
}

}  // namespace

void print_table(const Report& r) {
  print_warning(r);
  std::printf("\n%s | ranks %d | %s\n", r.device.c_str(), r.ranks, r.problem.c_str());
  const bool bytes = has_bytes(r);
  if (bytes) {
    std::printf(
        "bytes: what this rank moved in one call (Buffer counters): to ranks of other nodes (network puts)\n"
        "and to / from ranks of its node over NVLink; \"-\" = not counted\n");
    std::printf("%-14s %-22s %5s %4s %11s %10s %12s %8s %12s  %s\n", "system", "op", "rank", "SMs", "us", "GB/s",
                "net bytes", "net puts", "NVLink bytes", "note");
  } else {
    std::printf("%-14s %-22s %5s %4s %11s %10s  %s\n", "system", "op", "rank", "SMs", "us", "GB/s", "note");
  }
  for (const Row& row : r.rows) {
    char gb[32] = "-";
    if (row.gbps > 0) std::snprintf(gb, sizeof gb, "%.1f", row.gbps);
    if (bytes)
      std::printf("%-14s %-22s %5d %4d %11.1f %10s %12s %8s %12s  %s\n", row.system.c_str(), row.op.c_str(), row.rank,
                  row.sms, row.us, gb, count_text(row.net_bytes).c_str(), count_text(row.net_puts).c_str(),
                  count_text(row.nvl_bytes).c_str(), row.note.c_str());
    else
      std::printf("%-14s %-22s %5d %4d %11.1f %10s  %s\n", row.system.c_str(), row.op.c_str(), row.rank, row.sms,
                  row.us, gb, row.note.c_str());
  }
  // Summary: the figure that counts per docs/contract.md §7 is the minimum over ranks; bytes as the
  // range over ranks.
  struct Sum {
    double us = 0, gbps = 0, net_lo = -1, net_hi = -1, nvl_lo = -1, nvl_hi = -1;
    bool first = true;
  };
  std::map<std::string, Sum> summary;
  const auto widen = [](double& lo, double& hi, double v) {
    if (v < 0) return;
    lo = lo < 0 ? v : std::min(lo, v);
    hi = std::max(hi, v);
  };
  for (const Row& row : r.rows) {
    Sum& s = summary[row.system + " " + row.op + " @" + std::to_string(row.sms) + " SMs"];
    s.us = s.first ? row.us : std::max(s.us, row.us);
    s.gbps = s.first ? row.gbps : std::min(s.gbps, row.gbps);
    s.first = false;
    widen(s.net_lo, s.net_hi, row.net_bytes);
    widen(s.nvl_lo, s.nvl_hi, row.nvl_bytes);
  }
  std::printf("\nsummary (slowest rank%s):\n", bytes ? "; bytes per rank and call, lowest..highest rank" : "");
  for (const auto& [key, v] : summary) {
    std::printf("  %-48s %10.1f us %10.1f GB/s", key.c_str(), v.us, v.gbps);
    if (v.net_lo >= 0) std::printf("   net %s..%s B", count_text(v.net_lo).c_str(), count_text(v.net_hi).c_str());
    if (v.nvl_lo >= 0) std::printf("   NVLink %s..%s B", count_text(v.nvl_lo).c_str(), count_text(v.nvl_hi).c_str());
    std::printf("\n");
  }
  for (const auto& c : r.checks) std::printf("check: %s\n", c.c_str());
  std::printf("verification: %s\n", r.ok ? "PASSED" : "FAILED");
  print_warning(r);
}

void write_json(const Report& r, const std::string& path) {
  std::ostringstream s;
  s << "{\n  \"device\": \"" << r.device << "\",\n  \"ranks\": " << r.ranks << ",\n  \"problem\": \"" << r.problem
    << "\",\n  \"verified\": " << (r.ok ? "true" : "false") << ",\n";
  if (!r.warning.empty()) s << "  \"warning\": \"" << r.warning << "\",\n";
  s << "  \"rows\": [\n";
  for (size_t i = 0; i < r.rows.size(); ++i) {
    const Row& x = r.rows[i];
    s << "    {\"system\": \"" << x.system << "\", \"op\": \"" << x.op << "\", \"rank\": " << x.rank
      << ", \"sms\": " << x.sms << ", \"us\": " << x.us << ", \"gbps\": " << x.gbps;
    // Bytes one call moved (null: not counted); present where any row was counted.
    if (has_bytes(r))
      s << ", \"net_bytes\": " << json_count(x.net_bytes) << ", \"net_puts\": " << json_count(x.net_puts)
        << ", \"nvl_bytes\": " << json_count(x.nvl_bytes);
    s << ", \"note\": \"" << x.note << "\"}" << (i + 1 < r.rows.size() ? "," : "") << "\n";
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
      "  --seed N         the inputs' seed (default: random)\n"
      "  --print-env      list the EPCOMM_* environment variables and exit\n"
      "across fake nodes (NCCL GIN through a net plugin; for the byte counts, NOT for timings):\n"
      "  --fake-nodes N   N processes of ranks/N ranks each, every process a node to NCCL (its own\n"
      "                   NCCL_HOSTID), one NCCL group across them. Ranks on distinct GPUs where there\n"
      "                   are enough, else every node's ranks on GPUs 0..ranks/N-1 (fake nodes share\n"
      "                   GPUs, as epcomm_gin_tests places them; a process's ranks need distinct GPUs:\n"
      "                   --ranks 4 --fake-nodes 2 needs 2 GPUs, --ranks 4 --fake-nodes 4 runs on one).\n"
      "                   Normal mode (layout, dispatch BF16/FP8, cached dispatch, combine) and LL\n"
      "                   (dispatch FP8/BF16, combine) with --mode all (the default here), each row with\n"
      "                   the bytes one call moved over the network and over NVLink. Small defaults:\n"
      "                   normal 256 tokens, LL 32, hidden 2048, 16 experts per rank, 10 iterations, 2\n"
      "                   warm-up; no NCCL baseline. Times through a loopback net mean nothing.\n"
      "  --net-plugin P   the NCCL net plugin with GIN (default $EPCOMM_TEST_NET_PLUGIN), e.g.\n"
      "                   build/tests/gin_loopback/libnccl-net-epcomm-loopback.so\n"
      "  --timeout-s S    watchdog: processes still running after S seconds are killed (default 240)\n"
      "  --log-dir DIR    the processes' logs and results (default: a new directory under $TMPDIR)\n"
      "  --dry-run G      print each process (environment, command line) for a machine of G GPUs and\n"
      "                   exit without starting any (no GPU needed)\n"
      "  Exits 0 with \"skipped (no GPU)\" on a machine without a GPU.\n");
}

}  // namespace

namespace epcomm::bench {

int parse_options(int argc, char** argv, int first, Options& o, std::vector<std::string>* rest) {
  for (int i = first; i < argc; ++i) {
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
    } else if (a == "--chunk") o.chunk = std::atoi(next());
    else if (a == "--ring") o.ring = std::atoi(next());
    else if (a == "--ranks-per-node") o.ranks_per_node = std::atoi(next());
    else if (a == "--iters") {
      o.iters = std::atoi(next());
      o.iters_given = true;
    } else if (a == "--warmup") {
      o.warmup = std::atoi(next());
      o.warmup_given = true;
    } else if (a == "--no-baseline") o.baseline = false;
    else if (a == "--no-verify") o.verify = false;
    else if (a == "--cpu") o.cpu = true;
    else if (a == "--json") o.json = next();
    else if (a == "--seed") o.seed = std::strtoull(next(), nullptr, 10);
    else if (a == "--fake-nodes") o.fake_nodes = std::atoi(next());
    else if (a == "--net-plugin") o.net_plugin = next();
    else if (a == "--timeout-s") o.timeout_s = std::atof(next());
    else if (a == "--log-dir") o.log_dir = next();
    else if (a == "--dry-run") o.dry_run_gpus = std::max(1, std::atoi(next()));
    else if (a == "--print-env") {
      for (const auto& p : epcomm::env_params())
        std::printf("%-28s default %-8lld %s\n", p.name, static_cast<long long>(p.default_value), p.meaning);
      return 0;
    } else if (a == "-h" || a == "--help") {
      usage();
      return 0;
    } else if (rest) {
      rest->push_back(a);
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
  if (o.iters < 1 || o.warmup < 0) {
    std::fprintf(stderr, "epcomm-bench: --iters must be at least 1 and --warmup at least 0\n");
    return 2;
  }
  return -1;
}

}  // namespace epcomm::bench

int main(int argc, char** argv) {
  using namespace epcomm::bench;
  if (argc > 1 && std::strcmp(argv[1], kFakeNodeChildFlag) == 0) return fake_node_child_main(argc, argv);
  Options o;
  // --mode's default is normal, except across fake nodes (both modes): note whether it was given.
  for (int i = 1; i < argc; ++i)
    if (std::strcmp(argv[i], "--mode") == 0) o.mode_given = true;
  const int rc = parse_options(argc, argv, 1, o, nullptr);
  if (rc >= 0) return rc;
  if (o.fake_nodes > 0) return run_fake_nodes(o);
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
