// A peer process that dies: the group's host collectives are bounded and the survivor can leave.
//
// Two processes, each its own fake node (NCCL_HOSTID; they may share one GPU, as on the 1-GPU
// machines), make one NCCL group with Group::create_nccl (NCCL's socket net over loopback between
// them), with its creation bounded (EPCOMM_INIT_TIMEOUT_MS: a non-blocking init and a blocking
// split). Two scenarios, each with a fresh NCCL id:
//   barrier      both meet at a barrier; then one kills itself with SIGKILL, and the other calls the
//                barrier again: it must get an epcomm error (TimeoutError, or RuntimeFailure when NCCL
//                notices the closed connection first) naming the barrier, within EPCOMM_TIMEOUT_MS
//                plus a margin. Before the bounded waits, that barrier spun forever.
//   never-joins  one kills itself before it creates the group: the other's Group::create_nccl must
//                raise a TimeoutError naming ncclCommInitRank within EPCOMM_INIT_TIMEOUT_MS plus a
//                margin (NCCL's blocking init waits for ever there).
// Either way the survivor then destroys what it has and exits 0 within 30 s.
//
//   epcomm-peer-death-test          (exit 0 pass, 1 fail, 77 no GPU)
// The parent execs itself once per rank (`--rank r --id FILE --scenario S`): CUDA and fork do not mix.
#include <cuda_runtime_api.h>
#include <nccl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

#include "epcomm/error.hpp"
#include "epcomm/group.hpp"

namespace {

constexpr int kRanks = 2;
constexpr int kTimeoutMs = 4000;
constexpr double kMarginS = 10.0;
constexpr double kExitS = 30.0;

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int run_rank(int rank, const std::string& id_file, const std::string& scenario) {
  if (scenario == "never-joins" && rank == 1) raise(SIGKILL);  // dies before it joins the group
  ncclUniqueId id{};
  for (int tries = 0;; ++tries) {  // rank 0 writes the id (a whole file, renamed into place)
    FILE* f = std::fopen(id_file.c_str(), "rb");
    if (f && std::fread(&id, sizeof(id), 1, f) == 1) {
      std::fclose(f);
      break;
    }
    if (f) std::fclose(f);
    if (tries > 3000) {
      std::printf("rank %d: FAIL no NCCL id in %s\n", rank, id_file.c_str());
      return 1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  int devices = 0;
  cudaGetDeviceCount(&devices);
  if (scenario == "never-joins") {
    const auto t0 = std::chrono::steady_clock::now();
    try {
      auto group = epcomm::Group::create_nccl(id, kRanks, rank, rank % devices);
      std::printf("rank 0: FAIL the group was made without rank 1\n");
      return 1;
    } catch (const epcomm::TimeoutError& e) {
      const double s = seconds_since(t0);
      std::printf("rank 0: group creation without rank 1 raised after %.2f s: %s\n", s, e.what());
      if (s > kTimeoutMs / 1000.0 + kMarginS || std::strstr(e.what(), "ncclCommInitRank") == nullptr) {
        std::printf("rank 0: FAIL (late, or the message does not name ncclCommInitRank)\n");
        return 1;
      }
      return 0;
    }
  }
  auto group = epcomm::Group::create_nccl(id, kRanks, rank, rank % devices);
  group->barrier();
  std::printf("rank %d: group of %d made (%d node(s)), first barrier passed\n", rank, group->size(),
              group->num_nodes());
  std::fflush(stdout);
  if (rank == 1) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    raise(SIGKILL);  // dies as a killed process does: no teardown of anything
  }
  const auto t0 = std::chrono::steady_clock::now();
  try {
    group->barrier();
    std::printf("rank 0: FAIL the barrier with a dead peer returned\n");
    return 1;
  } catch (const epcomm::Error& e) {
    const double s = seconds_since(t0);
    std::printf("rank 0: barrier with a dead peer raised after %.2f s: %s\n", s, e.what());
    if (s > kTimeoutMs / 1000.0 + kMarginS || std::strstr(e.what(), "barrier") == nullptr) {
      std::printf("rank 0: FAIL (late, or the message does not name the barrier)\n");
      return 1;
    }
  }
  const auto t1 = std::chrono::steady_clock::now();
  group.reset();
  std::printf("rank 0: group destroyed in %.2f s\n", seconds_since(t1));
  return 0;
}

std::string self_path() {
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  return n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string();
}

// One scenario: a fresh id, two children, the verdict.
bool run_scenario(const std::string& scenario) {
  // The parent makes the id before any child starts (it touched CUDA only to count devices).
  ncclUniqueId id;
  if (ncclGetUniqueId(&id) != ncclSuccess) {
    std::printf("FAIL ncclGetUniqueId\n");
    return false;
  }
  char dir[] = "/tmp/epcomm-peer-death-XXXXXX";
  if (!mkdtemp(dir)) return false;
  const std::string id_file = std::string(dir) + "/id";
  {
    const std::string tmp = id_file + ".tmp";
    FILE* f = std::fopen(tmp.c_str(), "wb");
    std::fwrite(&id, sizeof(id), 1, f);
    std::fclose(f);
    std::rename(tmp.c_str(), id_file.c_str());
  }
  const std::string exe = self_path();
  pid_t pids[kRanks];
  for (int r = 0; r < kRanks; ++r) {
    pids[r] = fork();
    if (pids[r] == 0) {
      const std::string host = "epcomm-peer-death-node-" + std::to_string(r);
      setenv("NCCL_HOSTID", host.c_str(), 1);
      setenv("EPCOMM_TIMEOUT_MS", std::to_string(kTimeoutMs).c_str(), 1);
      setenv("EPCOMM_INIT_TIMEOUT_MS", std::to_string(kTimeoutMs).c_str(), 1);
      setenv("NCCL_SOCKET_IFNAME", "lo", 0);
      setenv("NCCL_NVLS_ENABLE", "0", 1);
      const std::string rank = std::to_string(r);
      execl(exe.c_str(), exe.c_str(), "--rank", rank.c_str(), "--id", id_file.c_str(), "--scenario", scenario.c_str(),
            static_cast<char*>(nullptr));
      _exit(127);
    }
  }
  // Rank 1 is killed by itself; rank 0 must finish within its timeout, the margin and the exit time.
  const auto t0 = std::chrono::steady_clock::now();
  int status0 = -1, status1 = -1;
  bool done0 = false, done1 = false;
  while (!(done0 && done1) && seconds_since(t0) < 120.0) {
    int st = 0;
    if (!done0 && waitpid(pids[0], &st, WNOHANG) == pids[0]) done0 = true, status0 = st;
    if (!done1 && waitpid(pids[1], &st, WNOHANG) == pids[1]) done1 = true, status1 = st;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (!done0) kill(pids[0], SIGKILL), waitpid(pids[0], &status0, 0);
  if (!done1) kill(pids[1], SIGKILL), waitpid(pids[1], &status1, 0);
  std::remove(id_file.c_str());
  rmdir(dir);
  const bool ok0 = done0 && WIFEXITED(status0) && WEXITSTATUS(status0) == 0;
  const bool killed1 = WIFSIGNALED(status1) && WTERMSIG(status1) == SIGKILL;
  std::printf("peer death (%s): survivor %s (%s), victim %s, %.1f s in all\n", scenario.c_str(),
              ok0 ? "exited 0" : "FAILED", done0 ? "finished" : "hung, killed after 120 s",
              killed1 ? "killed by SIGKILL" : "did not die as planned", seconds_since(t0));
  return ok0 && killed1 && seconds_since(t0) < kTimeoutMs / 1000.0 + kMarginS + kExitS + 30.0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 7 && std::strcmp(argv[1], "--rank") == 0) {
    try {
      return run_rank(std::atoi(argv[2]), argv[4], argv[6]);
    } catch (const std::exception& e) {
      std::printf("rank %s: FAIL %s\n", argv[2], e.what());
      return 1;
    }
  }
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    std::printf("epcomm peer-death test: skipped (no GPU)\n");
    return 77;
  }
  bool ok = true;
  for (const char* scenario : {"barrier", "never-joins"}) ok = run_scenario(scenario) && ok;
  return ok ? 0 : 1;
}
