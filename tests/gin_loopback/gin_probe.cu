// epcomm-gin-probe: proves NCCL's real GIN path on one host with no NIC, through the loopback
// plugin (libnccl-net-epcomm-loopback.so). The launcher (this file) starts P processes, each its
// own fake node, with R ranks each (one thread per rank), all possibly sharing one GPU:
//
//   epcomm-gin-probe --procs 2 [--ranks-per-proc 1] [--device-of-rank 0,0] [--rounds 6]
//                    [--bytes 1048576] [--timeout 300] [--kernel-timeout 60] [--wait-ms 20000]
//                    [--plugin PATH]
//
// Each process gets, unless already set: NCCL_NET_PLUGIN=<plugin> (default: the .so next to this
// executable), NCCL_NET=EpcommLoopback (no silent fallback to NCCL's own nets), NCCL_GIN_TYPE=2
// (proxy); and always NCCL_HOSTID=epcomm-gin-probe-node-<k>, which makes it a node of its own.
// What each rank does is in gin_probe_node.cu, what a round checks in gin_probe_kernel.cuh.
//
// Every wait is bounded: the kernel's signal waits (--wait-ms), each rank's wait for a kernel
// (--kernel-timeout), each process's watchdog (--timeout minus 5 s: prints where each rank is and
// exits), and this launcher, which kills a process still running at --timeout and says so.
// Exit: 0 every rank passed, 77 no GPU (skipped), 1 a failure, 2 bad arguments.
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <climits>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "gin_probe.h"
#include "gin_probe_kernel.cuh"

namespace epcomm::gin_probe {
namespace {

using Clock = std::chrono::steady_clock;

[[noreturn]] void usage(const std::string& why) {
  fprintf(stderr,
          "epcomm-gin-probe: %s\nusage: epcomm-gin-probe [--procs P] [--ranks-per-proc R] [--device-of-rank d0,d1,...] "
          "[--rounds N (1..%d)] [--bytes B] [--timeout S] [--kernel-timeout S] [--wait-ms MS] [--plugin PATH] "
          "[--put-value]\n",
          why.c_str(), kMaxRounds);
  exit(2);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> const char* {
      if (i + 1 >= argc) usage("missing value after " + a);
      return argv[++i];
    };
    if (a == "--procs") o.procs = atoi(value());
    else if (a == "--ranks-per-proc") o.ranks_per_proc = atoi(value());
    else if (a == "--rounds") o.rounds = atoi(value());
    else if (a == "--bytes") o.bytes = strtoull(value(), nullptr, 10);
    else if (a == "--timeout") o.timeout_s = atoi(value());
    else if (a == "--kernel-timeout") o.kernel_timeout_s = atoi(value());
    else if (a == "--wait-ms") o.wait_ms = atoi(value());
    else if (a == "--put-value") o.put_value = true;
    else if (a == "--plugin") o.plugin = value();
    else if (a == "--child") o.child = atoi(value());
    else if (a == "--dir") o.dir = value();
    else if (a == "--device-of-rank") {
      for (const char* s = value(); *s;) {
        char* end = nullptr;
        o.device_of_rank.push_back(int(strtol(s, &end, 10)));
        if (end == s) usage("--device-of-rank wants a comma-separated list of device numbers");
        s = *end == ',' ? end + 1 : end;
      }
    } else {
      usage("unknown argument " + a);
    }
  }
  if (o.procs < 1 || o.ranks_per_proc < 1 || o.rounds < 1 || o.rounds > kMaxRounds || o.timeout_s < 10 ||
      o.kernel_timeout_s < 1 || o.wait_ms < 1 || o.bytes < 1)
    usage("a count, size or timeout is out of range (--timeout >= 10)");
  if (!o.device_of_rank.empty() && int(o.device_of_rank.size()) != o.procs * o.ranks_per_proc)
    usage("--device-of-rank needs one device per rank (procs x ranks-per-proc)");
  return o;
}

std::string self_exe() {
  char path[PATH_MAX] = {};
  const ssize_t n = readlink("/proc/self/exe", path, sizeof(path) - 1);
  return n > 0 ? std::string(path, size_t(n)) : std::string();
}

std::string default_plugin() {
  if (const char* env = getenv("NCCL_NET_PLUGIN")) return env;
  std::string exe = self_exe();
  return exe.substr(0, exe.rfind('/') + 1) + "libnccl-net-epcomm-loopback.so";
}

// The child side of fork: this node's environment, then this program again as `--child k`.
[[noreturn]] void exec_node(const std::string& plugin, const std::string& dir, int k, char** argv) {
  const std::string host_id = "epcomm-gin-probe-node-" + std::to_string(k);
  setenv("NCCL_HOSTID", host_id.c_str(), 1);
  setenv("NCCL_NET_PLUGIN", plugin.c_str(), 1);
  setenv("NCCL_NET", "EpcommLoopback", 0);
  setenv("NCCL_GIN_TYPE", "2", 0);
  std::vector<std::string> args;
  for (int i = 0; argv[i]; ++i) args.push_back(argv[i]);
  args.insert(args.end(), {"--child", std::to_string(k), "--dir", dir, "--plugin", plugin});
  std::vector<char*> cargs;
  for (auto& a : args) cargs.push_back(a.data());
  cargs.push_back(nullptr);
  const std::string exe = self_exe();
  execv(exe.c_str(), cargs.data());
  fprintf(stderr, "[gin-probe] node %d: execv(%s) failed: %s\n", k, exe.c_str(), strerror(errno));
  _exit(127);
}

int run_launcher(const Options& o, char** argv) {
  const std::string plugin = o.plugin.empty() ? default_plugin() : o.plugin;
  if (plugin.find('/') != std::string::npos && access(plugin.c_str(), R_OK) != 0) {
    say(-1,
        "FAIL: the loopback plugin %s is not readable (%s); build the target nccl-net-epcomm-loopback or pass "
        "--plugin",
        plugin.c_str(), strerror(errno));
    return 1;
  }
  char dir[] = "/tmp/epcomm-gin-probe-XXXXXX";
  if (!mkdtemp(dir)) {
    say(-1, "FAIL: mkdtemp: %s", strerror(errno));
    return 1;
  }
  say(-1, "%d processes (fake nodes) x %d ranks, %d rounds, up to %zu bytes per put; plugin %s", o.procs,
      o.ranks_per_proc, o.rounds, o.bytes, plugin.c_str());
  std::vector<pid_t> pids(o.procs, -1);
  std::vector<int> status(o.procs, -1);
  fflush(stdout);
  fflush(stderr);
  for (int k = 0; k < o.procs; ++k) {
    pids[k] = fork();
    if (pids[k] == 0) exec_node(plugin, dir, k, argv);
    if (pids[k] < 0) say(-1, "FAIL: fork for node %d: %s", k, strerror(errno));
  }
  const auto deadline = Clock::now() + std::chrono::seconds(o.timeout_s);
  for (int running = o.procs; running > 0 && Clock::now() < deadline;) {
    running = 0;
    for (int k = 0; k < o.procs; ++k) {
      if (pids[k] <= 0 || status[k] != -1) continue;
      int st = 0;
      const pid_t r = waitpid(pids[k], &st, WNOHANG);
      if (r == pids[k]) {
        status[k] = st;
      } else {
        ++running;
      }
    }
    if (running > 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  int passed = 0, skipped = 0;
  for (int k = 0; k < o.procs; ++k) {
    if (pids[k] <= 0) continue;
    if (status[k] == -1) {
      say(-1, "node %d (pid %d) still running after %d s (--timeout): killed", k, int(pids[k]), o.timeout_s);
      kill(pids[k], SIGKILL);
      waitpid(pids[k], &status[k], 0);
      continue;
    }
    if (WIFEXITED(status[k]) && WEXITSTATUS(status[k]) == 0) ++passed;
    else if (WIFEXITED(status[k]) && WEXITSTATUS(status[k]) == kExitNoGpu) ++skipped;
    else if (WIFSIGNALED(status[k])) say(-1, "node %d ended by signal %d", k, WTERMSIG(status[k]));
    else say(-1, "node %d exited with %d", k, WEXITSTATUS(status[k]));
  }
  unlink((std::string(dir) + "/nccl-unique-id").c_str());
  rmdir(dir);
  if (skipped == o.procs) {
    say(-1, "skipped (no GPU)");
    return kExitNoGpu;
  }
  if (passed == o.procs) {
    say(-1, "PASS: %d processes x %d ranks", o.procs, o.ranks_per_proc);
    return 0;
  }
  say(-1, "FAIL: %d of %d processes passed (the rank lines above say why)", passed, o.procs);
  return 1;
}

}  // namespace

void say(int rank, const char* fmt, ...) {
  static std::mutex mutex;
  char text[4096];
  va_list args;
  va_start(args, fmt);
  vsnprintf(text, sizeof(text), fmt, args);
  va_end(args);
  std::lock_guard<std::mutex> lock(mutex);
  if (rank >= 0) printf("[gin-probe rank %d] %s\n", rank, text);
  else printf("[gin-probe] %s\n", text);
  fflush(stdout);
}

}  // namespace epcomm::gin_probe

int main(int argc, char** argv) {
  using namespace epcomm::gin_probe;
  const Options o = parse(argc, argv);
  return o.child >= 0 ? run_node(o) : run_launcher(o, argv);
}
