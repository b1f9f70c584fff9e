// epcomm-bench --fake-nodes N: the bench's normal-mode and low-latency cases across N processes that
// are different nodes to NCCL (each its own NCCL_HOSTID), so that Buffer reaches the other nodes
// through NCCL GIN carried by a net plugin (on one machine: the test-only loopback plugin,
// tests/gin_loopback). What it is for: the bytes each rank moves over the network and over NVLink
// per call, read from the Buffer's counters. Times through a loopback mean nothing (NCCL's and
// GIN's traffic goes through host memory and TCP; fake nodes sharing a GPU time-slice), and the
// output says so.
//
// Parent: starts the processes with the launcher of epcomm_gin_tests (tests/common/
// process_launcher.*: a watchdog kills what still runs at --timeout-s, or 30 s after a process
// failed, and the last lines of each failed process's log are printed), then reads what each wrote
// (rows and checks as text; the LL results, which only all ranks together can check, as binary),
// checks the LL results against the CPU reference and prints one table (rank 0's view of all).
// Child (argv[1] = kFakeNodeChildFlag): node 0 writes the NCCL unique id to a file the others read;
// the process's ranks make their groups (one GPU each) and run the cases on threads.
#include <cuda_runtime_api.h>
#include <nccl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "bench.hpp"
#include "bench_util.hpp"
#include "cli.hpp"
#include "common/process_launcher.hpp"
#include "common/visible_gpus.hpp"

namespace epcomm::bench {
namespace {

using testing::ChildOutcome;
using testing::ChildSpec;
using testing::RunReport;

constexpr double kGraceS = 30;  // after a process failed, the others (waiting for it) get this long
constexpr double kDefaultTimeoutS = 240;

std::string self_exe() {
  char buf[PATH_MAX];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return "";
  buf[n] = '\0';
  return buf;
}

std::string join(const std::vector<int>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s;
}

std::string results_path(const std::string& dir, int node) { return dir + "/node" + std::to_string(node) + ".results"; }

// ---- what a process measured, as lines of tab-separated fields ----

void write_results(const std::string& path, const Report& r) {
  std::ofstream f(path, std::ios::trunc);
  f.precision(17);
  f << "ok\t" << (r.ok ? 1 : 0) << "\n";
  for (const std::string& c : r.checks) f << "check\t" << c << "\n";
  for (const Row& x : r.rows)
    f << "row\t" << x.system << "\t" << x.op << "\t" << x.rank << "\t" << x.sms << "\t" << x.us << "\t" << x.gbps
      << "\t" << x.net_bytes << "\t" << x.net_puts << "\t" << x.nvl_bytes << "\t" << x.note << "\n";
  if (!f) throw std::runtime_error("could not write " + path);
}

// Appends a process's rows and checks to `report`; false when the file is missing or malformed.
bool read_results(const std::string& path, Report& report) {
  std::ifstream f(path);
  if (!f) return false;
  bool ok_seen = false;
  for (std::string line; std::getline(f, line);) {
    std::vector<std::string> v;
    std::stringstream ss(line);
    for (std::string field; std::getline(ss, field, '\t');) v.push_back(field);
    if (v.size() == 2 && v[0] == "ok") {
      ok_seen = true;
      report.ok = report.ok && v[1] == "1";
    } else if (v.size() == 2 && v[0] == "check") {
      report.checks.push_back(v[1]);
    } else if ((v.size() == 10 || v.size() == 11) && v[0] == "row") {
      Row x;
      x.system = v[1];
      x.op = v[2];
      x.rank = std::atoi(v[3].c_str());
      x.sms = std::atoi(v[4].c_str());
      x.us = std::atof(v[5].c_str());
      x.gbps = std::atof(v[6].c_str());
      x.net_bytes = std::atof(v[7].c_str());
      x.net_puts = std::atof(v[8].c_str());
      x.nvl_bytes = std::atof(v[9].c_str());
      if (v.size() == 11) x.note = v[10];
      report.rows.push_back(x);
    } else {
      return false;
    }
  }
  return ok_seen;
}

// The problem of this mode when the command line leaves it open: small, so that a run on one
// shared GPU through the loopback stays within a minute or two (each call's puts go through host
// memory and TCP).
Options with_fake_node_defaults(Options o, int R) {
  if (o.tokens < 0) o.tokens = 256;  // LL: 32 (below)
  if (o.hidden <= 0) o.hidden = 2048;
  if (o.experts <= 0) o.experts = 16 * R;
  if (!o.iters_given) o.iters = 10;
  if (!o.warmup_given) o.warmup = 2;
  if (!o.mode_given) o.mode = "all";
  o.baseline = false;  // the NCCL all-to-all baseline runs in one process: not across fake nodes
  return o;
}

// LL's tokens per rank: --tokens, else 32.
Options low_latency_options(const Options& o, bool tokens_given) {
  Options l = o;
  if (!tokens_given) l.tokens = 32;
  return l;
}

// The options a child gets (the problem made explicit, so every process has the same).
std::vector<std::string> forwarded(const Options& o, int ll_tokens) {
  std::vector<std::string> a = {"--ranks",   std::to_string(o.ranks),   "--mode",      o.mode,
                                "--tokens",  std::to_string(o.tokens),  "--ll-tokens", std::to_string(ll_tokens),
                                "--hidden",  std::to_string(o.hidden),  "--topk",      std::to_string(o.topk),
                                "--experts", std::to_string(o.experts), "--dtype",     o.dtype,
                                "--iters",   std::to_string(o.iters),   "--warmup",    std::to_string(o.warmup),
                                "--seed",    std::to_string(o.seed)};
  if (o.sms_given) a.insert(a.end(), {"--sms", join(o.sms)});
  if (o.chunk > 0) a.insert(a.end(), {"--chunk", std::to_string(o.chunk)});
  if (o.ring > 0) a.insert(a.end(), {"--ring", std::to_string(o.ring)});
  if (!o.verify) a.push_back("--no-verify");
  return a;
}

// Rows grouped by op (in the order the ops first appear), then by rank.
void sort_rows(std::vector<Row>& rows) {
  std::map<std::string, size_t> first;
  for (size_t i = 0; i < rows.size(); ++i) first.emplace(rows[i].system + "\t" + rows[i].op, i);
  std::stable_sort(rows.begin(), rows.end(), [&](const Row& a, const Row& b) {
    const size_t fa = first[a.system + "\t" + a.op], fb = first[b.system + "\t" + b.op];
    return fa != fb ? fa < fb : a.rank < b.rank;
  });
}

}  // namespace

int run_fake_nodes(const Options& given) {
  const int N = given.fake_nodes;
  const int R = given.ranks > 0 ? given.ranks : N;
  if (N < 2 || R % N != 0) {
    std::fprintf(stderr,
                 "epcomm-bench: --fake-nodes N needs N >= 2 and --ranks a multiple of N (got %d nodes, %d ranks)\n", N,
                 R);
    return 2;
  }
  if (given.ranks_per_node > 0 || given.cpu) {
    std::fprintf(stderr,
                 "epcomm-bench: --fake-nodes goes with neither --ranks-per-node nor --cpu (the nodes are the "
                 "processes)\n");
    return 2;
  }
  const int P = R / N;
  std::string plugin = given.net_plugin;
  if (plugin.empty())
    if (const char* e = std::getenv("EPCOMM_TEST_NET_PLUGIN")) plugin = e;
  if (plugin.empty()) {
    std::fprintf(stderr,
                 "epcomm-bench: --fake-nodes needs an NCCL net plugin with GIN to carry the traffic between the "
                 "processes: --net-plugin PATH (or EPCOMM_TEST_NET_PLUGIN), e.g. "
                 "build/tests/gin_loopback/libnccl-net-epcomm-loopback.so (target nccl-net-epcomm-loopback)\n");
    return 2;
  }
  char resolved[PATH_MAX];
  if (access(plugin.c_str(), R_OK) != 0 || realpath(plugin.c_str(), resolved) == nullptr) {
    std::fprintf(stderr, "epcomm-bench: the net plugin %s is not readable (--net-plugin / EPCOMM_TEST_NET_PLUGIN)\n",
                 plugin.c_str());
    return 2;
  }
  plugin = resolved;  // the children's NCCL dlopens it: a path that works from any directory
  const bool dry_run = given.dry_run_gpus > 0;
  const int gpus = dry_run ? given.dry_run_gpus : epcomm::testing::visible_gpu_count();
  if (gpus == 0) {
    std::printf("epcomm-bench --fake-nodes: skipped (no GPU)\n");
    return 0;
  }
  if (testing::node_devices(0, N, P, gpus).empty()) {
    std::fprintf(stderr,
                 "epcomm-bench: a fake node's %d ranks are threads of one process and need %d distinct GPUs (NCCL "
                 "refuses two ranks of one host on one GPU); this machine has %d. Use at most %d ranks per node, e.g. "
                 "--ranks %d --fake-nodes %d\n",
                 P, P, gpus, gpus, N * std::min(gpus, P), N);
    return 2;
  }

  const bool tokens_given = given.tokens >= 0;
  Options o = with_fake_node_defaults(given, R);
  const Options ll = low_latency_options(o, tokens_given);
  o.ranks = R;
  if (o.seed == 0) o.seed = std::random_device{}() | 1;
  const double timeout_s = given.timeout_s > 0 ? given.timeout_s : kDefaultTimeoutS;
  std::string dir = o.log_dir;
  if (dir.empty() && dry_run) dir = "<log-dir>";
  if (dir.empty() && (dir = testing::make_log_dir("epcomm-bench-fake-", "epcomm-bench")).empty()) return 1;
  const std::string id_file = dir + "/nccl_unique_id";
  if (!dry_run) {
    mkdir(dir.c_str(), 0755);
    unlink(id_file.c_str());
    for (int n = 0; n < N; ++n) unlink(results_path(dir, n).c_str());
  }

  const bool shared = gpus < R;
  const char* env_timeout = std::getenv("EPCOMM_TIMEOUT_MS");
  const char* env_net = std::getenv("NCCL_NET");
  const char* env_gin_type = std::getenv("NCCL_GIN_TYPE");
  std::vector<ChildSpec> specs;
  std::string placement;
  for (int n = 0; n < N; ++n) {
    const std::vector<int> devices = testing::node_devices(n, N, P, gpus);
    ChildSpec s;
    s.name = "node " + std::to_string(n) + " (rank" + (P > 1 ? "s " + std::to_string(n * P) + "-" : " ") +
             std::to_string(n * P + P - 1) + ", GPU" + (P > 1 ? "s " : " ") + join(devices) + ")";
    placement += (n ? "; " : "") + s.name;
    s.log_path = dir + "/node" + std::to_string(n) + ".log";
    s.argv = {self_exe(),  kFakeNodeChildFlag, "--node",    std::to_string(n), "--nodes",   std::to_string(N),
              "--devices", join(devices),      "--id-file", id_file,           "--out-dir", dir};
    const std::vector<std::string> f = forwarded(o, ll.tokens);
    s.argv.insert(s.argv.end(), f.begin(), f.end());
    s.env = {{"NCCL_HOSTID", "epcomm-bench-fake-node" + std::to_string(n)},
             {"NCCL_NET_PLUGIN", plugin},
             // The loopback plugin's names; a caller with another plugin sets its own.
             {"NCCL_NET", env_net ? env_net : "EpcommLoopback"},
             {"NCCL_GIN_TYPE", env_gin_type ? env_gin_type : "2"},
             {"NCCL_NVLS_ENABLE", "0"},  // no NVLink multicast, as epcomm_gin_tests
             {"TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"},
             {"NVSHMEM_DISABLE_NVLS", "1"},
             {"EPCOMM_RANKS_PER_NODE", "0"},  // the node is what NCCL says: this process's ranks
             {"EPCOMM_TIMEOUT_MS", env_timeout ? env_timeout : "30000"}};
    specs.push_back(s);
  }
  const std::string warning =
      "TIMES THROUGH A LOOPBACK ARE NOT MEANINGFUL: NCCL's and GIN's traffic between the fake nodes goes through "
      "host memory and TCP" +
      std::string(shared ? ", and fake nodes sharing a GPU time-slice it" : "") +
      ". Read the byte counts (network and NVLink bytes per rank and call), not the us or GB/s";
  std::printf("epcomm-bench: %d ranks as %d fake nodes of %d (one process each%s): %s\n", R, N, P,
              shared ? "; fake nodes share GPUs" : "", placement.c_str());
  std::printf("epcomm-bench: net plugin %s, NCCL_NET=%s, NCCL_GIN_TYPE=%s, seed %llu, watchdog %.0f s, logs in %s\n",
              plugin.c_str(), env_net ? env_net : "EpcommLoopback", env_gin_type ? env_gin_type : "2",
              static_cast<unsigned long long>(o.seed), timeout_s, dir.c_str());
  std::printf("epcomm-bench: %s\n", warning.c_str());
  if (dry_run) {
    for (const ChildSpec& c : specs) {
      std::string line = "  " + c.name + ":";
      for (const auto& [k, v] : c.env) line += " " + k + "=" + v;
      for (const std::string& a : c.argv) line += " " + a;
      std::printf("%s > %s\n", line.c_str(), c.log_path.c_str());
    }
    return 0;
  }
  std::fflush(stdout);

  const RunReport run = testing::run_children(specs, timeout_s, kGraceS);
  std::printf("epcomm-bench: processes%s:\n%s", run.timed_out ? " (watchdog: some killed)" : "", run.summary.c_str());
  if (run.exit_code != 0) {
    for (const ChildOutcome& c : run.children)
      if (c.killed || c.signal || c.exit_code != 0)
        std::printf("----- last lines of %s (%s) -----\n%s\n----- end of %s -----\n", c.name.c_str(),
                    c.log_path.c_str(), testing::tail_of_file(c.log_path, 6000).c_str(), c.name.c_str());
    std::printf("epcomm-bench --fake-nodes: FAILED\n");
    return 1;
  }

  Report report;
  report.ranks = R;
  report.warning = warning;
  {
    cudaDeviceProp prop{};
    const bool named = cudaGetDeviceProperties(&prop, 0) == cudaSuccess;
    report.device = std::to_string(R) + " ranks on " + std::to_string(std::min(gpus, R)) + " x " +
                    (named ? prop.name : "GPU") + ", " + std::to_string(N) + " fake nodes (processes) of " +
                    std::to_string(P) + ", NCCL GIN through " + plugin.substr(plugin.rfind('/') + 1);
  }
  const auto problem = [&](const Options& x, const char* mode) {
    return std::string(mode) + ": tokens " + std::to_string(x.tokens) + "/rank, hidden " + std::to_string(x.hidden) +
           ", top-" + std::to_string(x.topk) + ", " + std::to_string(x.experts) + " experts, uniform routing";
  };
  if (o.mode != "low-latency") report.problem = problem(o, "normal");
  if (o.mode != "normal")
    report.problem += (report.problem.empty() ? "" : " | ") + problem(ll, "low-latency") + " (Tmax = tokens)";
  report.problem += "; " + std::to_string(o.iters) + " timed calls after " + std::to_string(o.warmup) + " warm-up";
  for (int n = 0; n < N; ++n)
    if (!read_results(results_path(dir, n), report)) {
      std::printf("epcomm-bench --fake-nodes: node %d exited 0 but left no readable results in %s: FAILED\n", n,
                  results_path(dir, n).c_str());
      return 1;
    }
  if (o.mode != "normal" && o.verify) {
    try {
      check_low_latency_results(ll, R, o.seed, dir, report);
    } catch (const std::exception& e) {
      report.checks.push_back(std::string("low-latency results: ") + e.what());
      report.ok = false;
    }
  }
  sort_rows(report.rows);
  print_table(report);
  if (!o.json.empty()) write_json(report, o.json);
  return report.ok ? 0 : 1;
}

// ---- child ----

namespace {

bool read_id(const std::string& path, ncclUniqueId& id) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return false;
  f.read(reinterpret_cast<char*>(&id), sizeof(id));
  return f.gcount() == static_cast<std::streamsize>(sizeof(id));
}

// Node 0 makes the id and renames it into place; the others wait for the file (the parent's
// watchdog bounds the wait as well).
ncclUniqueId shared_unique_id(int node, const std::string& path) {
  ncclUniqueId id{};
  if (node == 0) {
    if (ncclGetUniqueId(&id) != ncclSuccess) throw std::runtime_error("ncclGetUniqueId failed");
    const std::string tmp = path + ".tmp";
    {
      std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
      f.write(reinterpret_cast<const char*>(&id), sizeof(id));
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error("could not rename " + tmp);
    return id;
  }
  const auto t0 = std::chrono::steady_clock::now();
  while (!read_id(path, id)) {
    if (std::chrono::steady_clock::now() - t0 > std::chrono::seconds(180))
      throw std::runtime_error("no NCCL unique id in " + path + " after 180 s (node 0 did not start?)");
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return id;
}

}  // namespace

int fake_node_child_main(int argc, char** argv) {
  setvbuf(stdout, nullptr, _IOLBF, 0);  // the log shows progress even if the watchdog kills us
  Options o;
  o.baseline = false;
  std::vector<std::string> rest;
  const int rc = parse_options(argc, argv, 2, o, &rest);
  if (rc >= 0) return rc == 0 ? 2 : rc;
  int node = -1, nodes = 0, ll_tokens = -1;
  std::string devices_text, id_file, dir;
  for (size_t i = 0; i + 1 < rest.size(); i += 2) {
    const std::string& a = rest[i];
    const std::string& v = rest[i + 1];
    if (a == "--node") node = std::atoi(v.c_str());
    else if (a == "--nodes") nodes = std::atoi(v.c_str());
    else if (a == "--devices") devices_text = v;
    else if (a == "--id-file") id_file = v;
    else if (a == "--out-dir") dir = v;
    else if (a == "--ll-tokens") ll_tokens = std::atoi(v.c_str());
    else {
      std::printf("fake-node child: unknown option %s\n", a.c_str());
      return 2;
    }
  }
  const std::vector<int> devices = parse_list(devices_text);
  const int R = o.ranks, P = static_cast<int>(devices.size());
  if (node < 0 || nodes < 2 || P < 1 || R != nodes * P || id_file.empty() || dir.empty()) {
    std::printf(
        "fake-node child: needs --node, --nodes, --devices (one per rank of the node), --ranks, --id-file, "
        "--out-dir\n");
    return 2;
  }
  std::vector<int> ranks(P);
  for (int l = 0; l < P; ++l) ranks[l] = node * P + l;
  const char* hostid = std::getenv("NCCL_HOSTID");
  std::printf("[fake node %d of %d] ranks %d-%d on GPU(s) %s, NCCL_HOSTID=%s, seed %llu\n", node, nodes, ranks.front(),
              ranks.back(), devices_text.c_str(), hostid ? hostid : "(unset)", static_cast<unsigned long long>(o.seed));
  try {
    const ncclUniqueId id = shared_unique_id(node, id_file);
    std::vector<std::shared_ptr<Group>> groups = create_nccl_groups(id, R, ranks, devices, 0);
    for (size_t l = 0; l < groups.size(); ++l)
      std::printf("[fake node %d] rank %d: %d ranks per node (NCCL's load/store domain), %d nodes, transport %s\n",
                  node, ranks[l], groups[l]->ranks_per_node(), groups[l]->num_nodes(), groups[l]->transport().c_str());
    if (groups.front()->ranks_per_node() != P)
      throw std::runtime_error("NCCL's load/store domain has " + std::to_string(groups.front()->ranks_per_node()) +
                               " ranks, not this process's " + std::to_string(P) + " (is NCCL_HOSTID honoured?)");
    Report report;
    if (o.mode != "low-latency") {
      std::printf("[fake node %d] normal mode\n", node);
      run_gpu_normal_ranks(o, R, o.seed, ranks, groups, report);
    }
    if (o.mode != "normal") {
      std::printf("[fake node %d] low-latency mode\n", node);
      Options ll = o;
      ll.tokens = ll_tokens;  // the parent's choice (its own default, smaller than normal mode's)
      run_gpu_low_latency_ranks(ll, R, o.seed, ranks, groups, dir, report);
    }
    write_results(results_path(dir, node), report);
    std::printf("[fake node %d] done: %zu rows, verification %s\n", node, report.rows.size(),
                report.ok ? "passed" : "FAILED");
    destroy_groups(groups);
  } catch (const std::exception& e) {
    std::printf("[fake node %d] epcomm-bench: %s\n", node, e.what());
    return 1;
  }
  return 0;
}

}  // namespace epcomm::bench
