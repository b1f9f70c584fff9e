// The process launcher of epcomm_gin_tests and epcomm-bench --fake-nodes (tests/common/process_launcher.*), with plain
// shells as children: exit codes, each child's own environment and log, and the watchdog that kills children that hang
// (after the deadline, or a grace period after another child failed) and names them.
#include <gtest/gtest.h>

#include <stdlib.h>
#include <unistd.h>

#include <chrono>
#include <string>

#include "common/process_launcher.hpp"

namespace epcomm::testing {
namespace {

class LauncherTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/epcomm-launcher-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    for (const std::string& f : files_) unlink(f.c_str());
    rmdir(dir_.c_str());
  }
  ChildSpec shell(const std::string& name, const std::string& script) {
    ChildSpec s;
    s.name = name;
    s.argv = {"/bin/sh", "-c", script};
    s.log_path = dir_ + "/" + name + ".log";
    files_.push_back(s.log_path);
    return s;
  }
  std::string dir_;
  std::vector<std::string> files_;
};

double seconds_of(const std::function<void()>& fn) {
  const auto t0 = std::chrono::steady_clock::now();
  fn();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

TEST_F(LauncherTest, ChildrenThatPassGetTheirEnvironmentAndLog) {
  ChildSpec a = shell("a", "echo from-a; test \"$EPCOMM_LAUNCHER_X\" = one");
  a.env = {{"EPCOMM_LAUNCHER_X", "one"}};
  ChildSpec b = shell("b", "echo from-b 1>&2; test \"$EPCOMM_LAUNCHER_X\" = two");
  b.env = {{"EPCOMM_LAUNCHER_X", "two"}};
  const RunReport r = run_children({a, b}, 30, 5);
  EXPECT_EQ(r.exit_code, 0) << r.summary;
  EXPECT_FALSE(r.timed_out);
  ASSERT_EQ(r.children.size(), 2u);
  EXPECT_TRUE(r.children[0].exited);
  EXPECT_EQ(r.children[1].exit_code, 0);
  EXPECT_NE(tail_of_file(a.log_path, 100).find("from-a"), std::string::npos);
  EXPECT_NE(tail_of_file(b.log_path, 100).find("from-b"), std::string::npos) << "stderr goes to the log too";
  EXPECT_NE(r.summary.find("a: passed"), std::string::npos) << r.summary;
}

TEST_F(LauncherTest, AFailureCutsTheOthersShortAndNamesTheHungChild) {
  double secs = 0;
  RunReport r;
  secs = seconds_of([&] { r = run_children({shell("node0", "exit 3"), shell("node1", "sleep 30")}, 60, 1); });
  EXPECT_LT(secs, 15.0) << "the grace period after a failure must end the wait";
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(r.timed_out);
  EXPECT_EQ(r.children[0].exit_code, 3);
  EXPECT_FALSE(r.children[0].killed);
  EXPECT_TRUE(r.children[1].killed);
  EXPECT_NE(r.summary.find("node0: FAILED (exit 3)"), std::string::npos) << r.summary;
  EXPECT_NE(r.summary.find("node1: HUNG"), std::string::npos) << r.summary;
}

TEST_F(LauncherTest, TheDeadlineKillsEveryChildStillRunningWithWhatItStarted) {
  RunReport r;
  // The second child starts a grandchild in its group and waits for it: killing the group ends both.
  const double secs = seconds_of([&] {
    r = run_children({shell("x", "sleep 30"), shell("y", "sleep 30 & wait")}, 1, 1);
  });
  EXPECT_LT(secs, 15.0);
  EXPECT_TRUE(r.timed_out);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(r.children[0].killed);
  EXPECT_TRUE(r.children[1].killed);
}

TEST_F(LauncherTest, SkippedEverywhereIsSkippedAndDeathBySignalIsAFailure) {
  EXPECT_EQ(run_children({shell("a", "exit 77"), shell("b", "exit 77")}, 30, 5).exit_code, 77);
  EXPECT_EQ(run_children({shell("a", "exit 77"), shell("b", "exit 0")}, 30, 5).exit_code, 1);
  const RunReport r = run_children({shell("a", "kill -SEGV $$")}, 30, 5);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_EQ(r.children[0].signal, 11);
  EXPECT_NE(r.summary.find("signal 11"), std::string::npos) << r.summary;
  ChildSpec missing;
  missing.name = "missing";
  missing.argv = {dir_ + "/no-such-program"};
  missing.log_path = dir_ + "/missing.log";
  files_.push_back(missing.log_path);
  EXPECT_EQ(run_children({missing}, 30, 5).children[0].exit_code, 127);
}

TEST(GinLauncherLayout, LayoutsAndDevices) {
  EXPECT_EQ(parse_layout("2x1"), (std::pair<int, int>{2, 1}));
  EXPECT_EQ(parse_layout("4x1"), (std::pair<int, int>{4, 1}));
  EXPECT_EQ(parse_layout("2x2"), (std::pair<int, int>{2, 2}));
  for (const char* bad : {"", "x1", "2x", "2y1", "0x1", "2x0", "2x1x", "a2x1", "2x1 "})
    EXPECT_EQ(parse_layout(bad), (std::pair<int, int>{0, 0})) << bad;
  // One GPU: every fake node on GPU 0.
  EXPECT_EQ(node_devices(1, 2, 1, 1), std::vector<int>{0});
  EXPECT_EQ(node_devices(3, 4, 1, 1), std::vector<int>{0});
  // Enough GPUs: one per rank.
  EXPECT_EQ(node_devices(1, 2, 2, 4), (std::vector<int>{2, 3}));
  EXPECT_EQ(node_devices(3, 4, 1, 4), std::vector<int>{3});
  // Fewer: nodes share GPUs 0..P-1; never two ranks of one process on one GPU.
  EXPECT_EQ(node_devices(1, 2, 2, 2), (std::vector<int>{0, 1}));
  EXPECT_TRUE(node_devices(0, 2, 2, 1).empty());
}

}  // namespace
}  // namespace epcomm::testing
