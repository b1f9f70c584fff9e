// epcomm_gin_tests: the internode cases across processes that are different nodes to NCCL, so that
// Buffer takes NCCL GIN (not the emulated transport of virtual nodes) between them.
//
// Parent (default): for each layout NxP (N processes of P ranks; default 2x1 and 4x1, and 2x2 with
// 4 or more GPUs) it fork/execs N children of itself with NCCL_HOSTID=<one per process> (one fake
// node per process: ranks of one process share a host hash), NCCL_NET_PLUGIN from --net-plugin or
// EPCOMM_TEST_NET_PLUGIN (a net plugin whose GIN carries the puts between the processes, e.g. the
// test-only loopback plugin), and NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
// NVSHMEM_DISABLE_NVLS=1 always; watches them (a deadline per layout; a grace period once a child
// failed), kills and names the ones that hang, and prints each child's log tail on failure.
// Without a plugin the children run only GinUnavailable.* (NCCL has no GIN then: every rank must
// get the same RuntimeFailure, none may hang). Exit: 0 pass, 1 fail, 77 no GPU.
//
// Child (--child): node 0 writes the NCCL unique id to a file the others read; each local rank
// creates its group (Group::create_nccl) on its GPU; then GoogleTest runs the cases (test_gin.cpp)
// against the CPU reference, the same seed in every process.
#include <gtest/gtest.h>
#include <nccl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/process_launcher.hpp"
#include "common/visible_gpus.hpp"
#include "gin/world.hpp"

namespace epcomm::gin_test {
namespace {

using testing::ChildOutcome;
using testing::ChildSpec;
using testing::make_log_dir;
using testing::node_devices;
using testing::parse_layout;
using testing::run_children;
using testing::RunReport;
using testing::tail_of_file;

const char* const kUsage =
    "usage: epcomm_gin_tests [--layouts 2x1,4x1,...] [--net-plugin PATH] [--timeout-s S] [--grace-s S]\n"
    "                        [--log-dir DIR] [--seed N] [GoogleTest flags passed to the children]\n"
    "  --layouts     nodes x ranks per node, one process per node (default 2x1,4x1, plus 2x2 with >= 4 GPUs)\n"
    "  --net-plugin  NCCL net plugin with GIN for the children (default: $EPCOMM_TEST_NET_PLUGIN); without\n"
    "                one only GinUnavailable.* runs (NCCL then has no GIN between the processes)\n"
    "  --timeout-s   watchdog per layout (default 900); --grace-s: after a child failed (default 60)\n"
    "  --log-dir     where each child's log goes (default: a new directory under $TMPDIR or /tmp)\n"
    "  --dry-run N   print each layout's children (command line, environment) for a machine of N GPUs\n"
    "                and exit without starting them (no GPU needed)\n";

std::string self_exe() {
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return "";
  buf[n] = '\0';
  return buf;
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    const size_t end = s.find(sep, start);
    const std::string part = s.substr(start, end == std::string::npos ? std::string::npos : end - start);
    if (!part.empty()) out.push_back(part);
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return out;
}

std::string join(const std::vector<int>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s;
}

int parent_main(int argc, char** argv) {
  std::vector<std::string> layouts, passthrough;
  const char* env_plugin = std::getenv("EPCOMM_TEST_NET_PLUGIN");
  std::string plugin = env_plugin ? env_plugin : "";
  double timeout_s = 900, grace_s = 60;
  std::string log_dir;
  uint64_t seed = std::random_device{}();
  int dry_run_gpus = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const auto value = [&](const char* name) -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "epcomm_gin_tests: %s needs a value\n%s", name, kUsage);
        std::exit(1);
      }
      return argv[++i];
    };
    if (a == "--help" || a == "-h") {
      std::printf("%s", kUsage);
      return 0;
    } else if (a == "--layouts") {
      layouts = split(value("--layouts"), ',');
    } else if (a == "--net-plugin") {
      plugin = value("--net-plugin");
    } else if (a == "--timeout-s") {
      timeout_s = std::atof(value("--timeout-s").c_str());
    } else if (a == "--grace-s") {
      grace_s = std::atof(value("--grace-s").c_str());
    } else if (a == "--log-dir") {
      log_dir = value("--log-dir");
    } else if (a == "--seed") {
      seed = std::strtoull(value("--seed").c_str(), nullptr, 10);
    } else if (a == "--dry-run") {
      dry_run_gpus = std::max(1, std::atoi(value("--dry-run").c_str()));
    } else {
      passthrough.push_back(a);
    }
  }
  const int gpus = dry_run_gpus > 0 ? dry_run_gpus : epcomm::testing::visible_gpu_count();
  if (gpus == 0) {
    std::printf("epcomm GIN tests: skipped (no GPU)\n");
    return 77;
  }
  if (layouts.empty()) {
    layouts = {"2x1", "4x1"};
    if (gpus >= 4) layouts.push_back("2x2");
  }
  if (!plugin.empty() && dry_run_gpus == 0 && access(plugin.c_str(), R_OK) != 0) {
    std::printf("epcomm_gin_tests: the net plugin %s is not readable (--net-plugin / EPCOMM_TEST_NET_PLUGIN)\n",
                plugin.c_str());
    return 1;
  }
  if (log_dir.empty() && dry_run_gpus > 0) log_dir = "<log-dir>";
  if (log_dir.empty() && (log_dir = make_log_dir("epcomm-gin-", "epcomm_gin_tests")).empty()) return 1;
  if (dry_run_gpus == 0) mkdir(log_dir.c_str(), 0755);
  const std::string exe = self_exe();
  const char* env_timeout = std::getenv("EPCOMM_TIMEOUT_MS");
  std::printf("epcomm GIN tests: %d GPU(s), net plugin %s, seed %llu, logs in %s\n", gpus,
              plugin.empty() ? "none (only GinUnavailable.* runs)" : plugin.c_str(),
              static_cast<unsigned long long>(seed), log_dir.c_str());
  std::fflush(stdout);

  bool failed = false;
  int ran = 0;
  for (const std::string& layout : layouts) {
    const auto [nodes, per_node] = parse_layout(layout);
    if (nodes < 2) {
      std::printf("[gin] layout '%s': not NxP with N >= 2, skipped\n", layout.c_str());
      failed = failed || nodes == 0;
      continue;
    }
    if (node_devices(0, nodes, per_node, gpus).empty()) {
      std::printf("[gin] layout %s: skipped (a process's %d ranks need %d GPUs; this machine has %d)\n", layout.c_str(),
                  per_node, per_node, gpus);
      continue;
    }
    const std::string dir = log_dir + "/" + layout;
    const std::string id_file = dir + "/nccl_unique_id";
    if (dry_run_gpus == 0) {
      mkdir(dir.c_str(), 0755);
      unlink(id_file.c_str());
    }
    const bool shared = gpus < nodes * per_node;
    std::vector<ChildSpec> specs;
    std::string placement;
    for (int n = 0; n < nodes; ++n) {
      const std::vector<int> devices = node_devices(n, nodes, per_node, gpus);
      ChildSpec s;
      const int first = n * per_node, last = first + per_node - 1;
      s.name = "node " + std::to_string(n) + " (rank" + (per_node > 1 ? "s " + std::to_string(first) + "-" : " ") +
               std::to_string(last) + ", GPU" + (per_node > 1 ? "s " : " ") + join(devices) + ")";
      placement += (n ? "; " : "") + s.name;
      s.log_path = dir + "/node" + std::to_string(n) + ".log";
      s.argv = {exe,
                "--child",
                "--node",
                std::to_string(n),
                "--nodes",
                std::to_string(nodes),
                "--ranks-per-node",
                std::to_string(per_node),
                "--devices",
                join(devices),
                "--id-file",
                id_file,
                "--seed",
                std::to_string(seed)};
      if (plugin.empty()) s.argv.push_back("--no-gin");
      if (shared) s.argv.push_back("--shared-gpus");
      s.argv.insert(s.argv.end(), passthrough.begin(), passthrough.end());
      s.env = {{"NCCL_HOSTID", "epcomm-gin-" + layout + "-node" + std::to_string(n)},
               {"NCCL_NVLS_ENABLE", "0"},
               {"TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"},
               {"NVSHMEM_DISABLE_NVLS", "1"},
               {"EPCOMM_RANKS_PER_NODE", "0"},  // the node is what NCCL says: this process's ranks
               {"EPCOMM_TIMEOUT_MS", env_timeout ? env_timeout : "30000"}};
      if (!plugin.empty()) s.env.push_back({"NCCL_NET_PLUGIN", plugin});
      specs.push_back(s);
    }
    std::printf("[gin] layout %s: %d processes of %d rank(s)%s: %s\n", layout.c_str(), nodes, per_node,
                shared ? " (fake nodes share GPUs: their kernels time-slice)" : "", placement.c_str());
    std::fflush(stdout);
    if (dry_run_gpus > 0) {
      for (const ChildSpec& s : specs) {
        std::string line = "  " + s.name + ":";
        for (const auto& [k, v] : s.env) line += " " + k + "=" + v;
        for (const std::string& a : s.argv) line += " " + a;
        std::printf("%s > %s\n", line.c_str(), s.log_path.c_str());
      }
      continue;
    }
    const RunReport report = run_children(specs, timeout_s, grace_s);
    ++ran;
    const bool ok = report.exit_code == 0;
    failed = failed || !ok;
    std::printf("[gin] layout %s: %s%s\n%s", layout.c_str(),
                ok                       ? "PASSED"
                : report.exit_code == 77 ? "skipped by the children"
                                         : "FAILED",
                report.timed_out ? " (watchdog: children killed)" : "", report.summary.c_str());
    if (!ok)
      for (const ChildOutcome& o : report.children)
        if (o.killed || o.signal || (o.exit_code != 0 && o.exit_code != 77))
          std::printf("----- last lines of %s (%s) -----\n%s\n----- end of %s -----\n", o.name.c_str(),
                      o.log_path.c_str(), tail_of_file(o.log_path, 6000).c_str(), o.name.c_str());
    std::fflush(stdout);
  }
  if (dry_run_gpus > 0) return 0;
  if (ran == 0 && !failed) {
    std::printf("epcomm GIN tests: no layout could run on %d GPU(s)\n", gpus);
    return 77;
  }
  std::printf("epcomm GIN tests: %s\n", failed ? "FAILED" : "passed");
  return failed ? 1 : 0;
}

// ---- child ----

bool read_id(const std::string& path, ncclUniqueId& id) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return false;
  f.read(reinterpret_cast<char*>(&id), sizeof(id));
  return f.gcount() == static_cast<std::streamsize>(sizeof(id));
}

int child_main(int argc, char** argv) {
  setvbuf(stdout, nullptr, _IOLBF, 0);  // the log shows progress even if the watchdog kills us
  GinWorld& w = world();
  std::string id_file, devices;
  std::vector<std::string> gtest_args = {argv[0]};
  bool filter_given = false;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    const auto next = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
    if (a == "--node") w.node = std::atoi(next().c_str());
    else if (a == "--nodes") w.nodes = std::atoi(next().c_str());
    else if (a == "--ranks-per-node") w.ranks_per_node = std::atoi(next().c_str());
    else if (a == "--devices") devices = next();
    else if (a == "--id-file") id_file = next();
    else if (a == "--seed") w.seed = std::strtoull(next().c_str(), nullptr, 10);
    else if (a == "--no-gin") w.expect_gin = false;
    else if (a == "--shared-gpus") w.shared_gpus = true;
    else {
      filter_given = filter_given || a.rfind("--gtest_filter", 0) == 0;
      gtest_args.push_back(a);
    }
  }
  w.num_ranks = w.nodes * w.ranks_per_node;
  if (const char* t = std::getenv("EPCOMM_TIMEOUT_MS")) w.timeout_ms = std::atoll(t);
  for (const std::string& d : split(devices, ',')) w.devices.push_back(std::atoi(d.c_str()));
  for (int l = 0; l < w.ranks_per_node; ++l) w.ranks.push_back(w.node * w.ranks_per_node + l);
  if (static_cast<int>(w.devices.size()) != w.ranks_per_node) {
    std::printf("child: --devices must name %d GPU(s)\n", w.ranks_per_node);
    return 1;
  }
  const char* hostid = std::getenv("NCCL_HOSTID");
  const char* plugin = std::getenv("NCCL_NET_PLUGIN");
  std::printf(
      "[gin child] node %d of %d: ranks %d-%d on GPU(s) %s, NCCL_HOSTID=%s, NCCL_NET_PLUGIN=%s, timeout %lld ms\n",
      w.node, w.nodes, w.ranks.front(), w.ranks.back(), devices.c_str(), hostid ? hostid : "(unset)",
      plugin ? plugin : "(unset)", static_cast<long long>(w.timeout_ms));

  // The unique id: node 0 makes it and renames it into place; the others wait for the file.
  ncclUniqueId id{};
  if (w.node == 0) {
    if (ncclGetUniqueId(&id) != ncclSuccess) {
      std::printf("child: ncclGetUniqueId failed: %s\n", ncclGetLastError(nullptr));
      return 1;
    }
    const std::string tmp = id_file + ".tmp";
    {
      std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
      f.write(reinterpret_cast<const char*>(&id), sizeof(id));
    }
    if (std::rename(tmp.c_str(), id_file.c_str()) != 0) {
      std::perror("child: rename of the unique id file");
      return 1;
    }
  } else {
    const auto t0 = std::chrono::steady_clock::now();
    while (!read_id(id_file, id)) {
      if (std::chrono::steady_clock::now() - t0 > std::chrono::seconds(180)) {
        std::printf("child: no NCCL unique id in %s after 180 s (node 0 did not start?)\n", id_file.c_str());
        return 1;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }

  // One group per local rank, created together (ncclCommInitRank is collective).
  w.groups.resize(w.ranks_per_node);
  std::vector<std::string> errors(w.ranks_per_node);
  {
    std::vector<std::thread> threads;
    for (int l = 0; l < w.ranks_per_node; ++l)
      threads.emplace_back([&, l] {
        try {
          w.groups[l] = Group::create_nccl(id, w.num_ranks, w.ranks[l], w.devices[l]);
        } catch (const std::exception& e) {
          errors[l] = e.what();
        }
      });
    for (auto& t : threads) t.join();
  }
  for (int l = 0; l < w.ranks_per_node; ++l)
    if (!errors[l].empty()) {
      std::printf("child: rank %d: Group::create_nccl failed: %s\n", w.ranks[l], errors[l].c_str());
      return 1;
    }
  for (int l = 0; l < w.ranks_per_node; ++l)
    std::printf("[gin child] rank %d: %d ranks per node (NCCL's load/store domain), %d nodes, transport %s\n",
                w.ranks[l], w.groups[l]->ranks_per_node(), w.groups[l]->num_nodes(), w.groups[l]->transport().c_str());

  if (!filter_given)
    gtest_args.push_back(w.expect_gin ? "--gtest_filter=-GinUnavailable.*" : "--gtest_filter=GinUnavailable.*");
  std::vector<char*> gargv;
  for (auto& a : gtest_args) gargv.push_back(a.data());
  int gargc = static_cast<int>(gargv.size());
  gargv.push_back(nullptr);
  ::testing::InitGoogleTest(&gargc, gargv.data());
  const int rc = RUN_ALL_TESTS();
  w.groups.clear();
  return rc;
}

}  // namespace
}  // namespace epcomm::gin_test

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "--child") == 0) return epcomm::gin_test::child_main(argc, argv);
  return epcomm::gin_test::parent_main(argc, argv);
}
