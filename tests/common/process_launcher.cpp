// See process_launcher.hpp.
#include "common/process_launcher.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

extern char** environ;

namespace epcomm::testing {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// The parent's environment with `overrides` set (built before fork: the child may only call
// async-signal-safe functions until it execs).
std::vector<std::string> child_environment(const std::vector<std::pair<std::string, std::string>>& overrides) {
  std::vector<std::string> env;
  for (char** e = environ; e && *e; ++e) {
    const std::string entry = *e;
    const std::string name = entry.substr(0, entry.find('='));
    const bool replaced =
        std::any_of(overrides.begin(), overrides.end(), [&](const auto& o) { return o.first == name; });
    if (!replaced) env.push_back(entry);
  }
  for (const auto& [name, value] : overrides) env.push_back(name + "=" + value);
  return env;
}

std::vector<char*> pointers(std::vector<std::string>& strings) {
  std::vector<char*> p;
  for (auto& s : strings) p.push_back(s.data());
  p.push_back(nullptr);
  return p;
}

std::string fmt_seconds(double s) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f s", s);
  return buf;
}

// Children started and not yet reaped, for the signal handler (a Ctrl-C must not leave them running).
volatile sig_atomic_t g_num_running = 0;
pid_t g_running[256];

void kill_children_and_leave(int sig) {
  for (int i = 0; i < g_num_running; ++i)
    if (g_running[i] > 0) kill(-g_running[i], SIGKILL);
  signal(sig, SIG_DFL);
  raise(sig);
}

}  // namespace

RunReport run_children(const std::vector<ChildSpec>& specs, double timeout_s, double grace_s) {
  RunReport report;
  const size_t n = specs.size();
  std::vector<pid_t> pids(n, -1);
  std::vector<bool> done(n, false);
  report.children.resize(n);
  const Clock::time_point start = Clock::now();
  struct sigaction sa {
  }, old_int{}, old_term{};
  sa.sa_handler = kill_children_and_leave;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, &old_int);
  sigaction(SIGTERM, &sa, &old_term);

  for (size_t i = 0; i < n; ++i) {
    ChildOutcome& o = report.children[i];
    o.name = specs[i].name;
    o.log_path = specs[i].log_path;
    std::vector<std::string> args = specs[i].argv;
    std::vector<std::string> env = child_environment(specs[i].env);
    std::vector<char*> argv = pointers(args), envp = pointers(env);
    const std::string log = specs[i].log_path;
    const pid_t pid = fork();
    if (pid == 0) {
      setpgid(0, 0);
      const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (fd >= 0) {
        dup2(fd, STDOUT_FILENO);
        dup2(fd, STDERR_FILENO);
        close(fd);
      }
      execve(argv[0], argv.data(), envp.data());
      const char msg[] = "process launcher: execve failed\n";
      (void)!write(STDERR_FILENO, msg, sizeof(msg) - 1);
      _exit(127);
    }
    if (pid < 0) {
      o.exited = true;
      o.exit_code = 127;
      done[i] = true;
      continue;
    }
    setpgid(pid, pid);  // also here: whichever of parent and child runs first
    pids[i] = pid;
    if (i < sizeof(g_running) / sizeof(g_running[0])) {
      g_running[i] = pid;
      g_num_running = static_cast<sig_atomic_t>(i + 1);
    }
  }

  Clock::time_point deadline =
      start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s));
  bool failure_seen = false;
  for (;;) {
    size_t running = 0;
    for (size_t i = 0; i < n; ++i) {
      if (done[i]) continue;
      // Ended? Look without reaping it: while it is a zombie its process group id stays ours, so
      // what it left behind in the group can be killed before the id could go to anyone else.
      siginfo_t info;
      std::memset(&info, 0, sizeof(info));
      if (waitid(P_PID, static_cast<id_t>(pids[i]), &info, WEXITED | WNOHANG | WNOWAIT) == 0 &&
          info.si_pid == pids[i]) {
        kill(-pids[i], SIGKILL);
        int status = 0;
        waitpid(pids[i], &status, 0);
        if (i < sizeof(g_running) / sizeof(g_running[0])) g_running[i] = 0;
        ChildOutcome& o = report.children[i];
        done[i] = true;
        o.exited = true;
        o.seconds = seconds_between(start, Clock::now());
        if (WIFEXITED(status)) o.exit_code = WEXITSTATUS(status);
        if (WIFSIGNALED(status)) o.signal = WTERMSIG(status);
        if (o.exit_code != 0 && o.exit_code != 77 && !failure_seen) {
          failure_seen = true;
          const auto grace =
              start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(o.seconds + grace_s));
          deadline = std::min(deadline, grace);
        }
      } else {
        ++running;
      }
    }
    if (running == 0) break;
    if (Clock::now() >= deadline) {
      report.timed_out = true;
      for (size_t i = 0; i < n; ++i) {
        if (done[i]) continue;
        kill(-pids[i], SIGKILL);
        int status = 0;
        waitpid(pids[i], &status, 0);
        if (i < sizeof(g_running) / sizeof(g_running[0])) g_running[i] = 0;
        ChildOutcome& o = report.children[i];
        o.killed = true;
        o.seconds = seconds_between(start, Clock::now());
        done[i] = true;
      }
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  g_num_running = 0;
  sigaction(SIGINT, &old_int, nullptr);
  sigaction(SIGTERM, &old_term, nullptr);

  bool all_zero = true, all_skipped = n > 0;
  for (const ChildOutcome& o : report.children) {
    all_zero = all_zero && o.exited && o.signal == 0 && o.exit_code == 0;
    all_skipped = all_skipped && o.exited && o.signal == 0 && o.exit_code == 77;
    std::string how;
    if (o.killed) how = "HUNG: still running after " + fmt_seconds(o.seconds) + ", killed by the watchdog";
    else if (o.signal) how = "died of signal " + std::to_string(o.signal) + " (" + strsignal(o.signal) + ")";
    else if (o.exit_code == 0) how = "passed";
    else if (o.exit_code == 77) how = "skipped (exit 77)";
    else how = "FAILED (exit " + std::to_string(o.exit_code) + ")";
    report.summary += "  " + o.name + ": " + how + (o.killed ? "" : " after " + fmt_seconds(o.seconds)) + "; log " +
                      o.log_path + "\n";
  }
  report.exit_code = all_zero ? 0 : all_skipped ? 77 : 1;
  return report;
}

std::string make_log_dir(const char* prefix, const char* who) {
  const char* tmp = std::getenv("TMPDIR");
  std::string tmpl = std::string(tmp && *tmp ? tmp : "/tmp") + "/" + prefix + "XXXXXX";
  if (mkdtemp(tmpl.data()) == nullptr) {
    std::perror((std::string(who) + ": mkdtemp").c_str());
    return "";
  }
  return tmpl;
}

std::string tail_of_file(const std::string& path, size_t max_bytes) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return "";
  std::stringstream ss;
  ss << f.rdbuf();
  std::string s = ss.str();
  if (s.size() <= max_bytes) return s;
  s = s.substr(s.size() - max_bytes);
  const size_t nl = s.find('\n');
  return nl == std::string::npos ? s : s.substr(nl + 1);
}

std::pair<int, int> parse_layout(const std::string& text) {
  const size_t x = text.find('x');
  if (x == std::string::npos || x == 0 || x + 1 >= text.size()) return {0, 0};
  try {
    size_t used = 0;
    const int nodes = std::stoi(text.substr(0, x), &used);
    if (used != x) return {0, 0};
    const int per_node = std::stoi(text.substr(x + 1), &used);
    if (used != text.size() - x - 1 || nodes < 1 || per_node < 1) return {0, 0};
    return {nodes, per_node};
  } catch (...) {
    return {0, 0};
  }
}

std::vector<int> node_devices(int node, int nodes, int ranks_per_node, int gpus) {
  if (ranks_per_node > gpus || gpus < 1) return {};
  std::vector<int> d(ranks_per_node);
  const bool distinct = gpus >= nodes * ranks_per_node;
  for (int l = 0; l < ranks_per_node; ++l) d[l] = distinct ? node * ranks_per_node + l : l;
  return d;
}

}  // namespace epcomm::testing
