// The host barrier of a group of threads (Group::create_local, src/transport/local_group.cpp): ranks
// meet at every barrier and all_gather, and a rank that never arrives (its thread threw in a
// Buffer's constructor) fails the others' waits after 4 x EPCOMM_TIMEOUT_MS, naming it, instead of
// hanging the process; the barrier then stays broken. Barriers are named (Group::barrier(step)):
// ranks at different steps all throw the same error naming each rank's step, and the group goes on.
// No GPU: barriers and all_gather touch none.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <future>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "epcomm/error.hpp"
#include "epcomm/group.hpp"

namespace epcomm {
namespace {

TEST(LocalGroupBarrier, RanksMeetAtEveryBarrierAndGather) {
  const auto groups = Group::create_local({0, 0, 0, 0});
  std::atomic<int> passed{0};
  std::atomic<bool> early{false}, wrong{false};
  std::vector<std::thread> threads;
  for (int r = 0; r < 4; ++r) {
    threads.emplace_back([&, r] {
      for (int round = 0; round < 40; ++round) {
        passed.fetch_add(1);
        groups[r]->barrier();
        if (passed.load() < 4 * (round + 1)) early = true;  // left before every rank arrived
        const int mine = 100 * round + r;
        int all[4] = {};
        groups[r]->all_gather(&mine, all, sizeof(int));
        for (int p = 0; p < 4; ++p)
          if (all[p] != 100 * round + p) wrong = true;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_FALSE(early.load());
  EXPECT_FALSE(wrong.load());
  EXPECT_EQ(passed.load(), 160);
}

TEST(LocalGroupBarrier, RanksAtDifferentStepsAllThrowNamingEachStep) {
  const uint32_t seed = std::random_device{}();
  std::mt19937 rng(seed);
  const std::vector<std::string> steps = {"Buffer::reset (before clearing)", "Buffer destructor",
                                          "clean_low_latency_buffer (before)",
                                          "a step named past its 47-byte limit, cut there"};
  for (int trial = 0; trial < 20; ++trial) {
    const int n = 2 + static_cast<int>(rng() % 6);
    const auto groups = Group::create_local(std::vector<int>(n, 0));
    // Every rank at steps[0] but a random nonempty proper subset, each at a random other step.
    std::vector<int> at(n, 0);
    const int odd = 1 + static_cast<int>(rng() % (n - 1));
    for (int k = 0; k < odd; ++k) at[rng() % n] = 1 + static_cast<int>(rng() % 3);
    const bool differ = std::any_of(at.begin(), at.end(), [&](int s) { return s != at[0]; });
    std::vector<std::string> got(n);
    std::vector<std::thread> threads;
    for (int r = 0; r < n; ++r) {
      threads.emplace_back([&, r] {
        groups[r]->barrier("warm-up");  // one barrier passed: the tags' counts say 1
        try {
          groups[r]->barrier(steps[at[r]].c_str());
          got[r] = "passed";
        } catch (const RuntimeFailure& e) {
          got[r] = e.what();
        }
        groups[r]->barrier("after");  // the group goes on
      });
    }
    for (auto& t : threads) t.join();
    SCOPED_TRACE("seed " + std::to_string(seed) + " trial " + std::to_string(trial));
    if (!differ) {
      for (const std::string& g : got) EXPECT_EQ(g, "passed");
      continue;
    }
    for (int r = 0; r < n; ++r) {
      EXPECT_EQ(got[r], got[0]) << "rank " << r;  // the same message everywhere
      EXPECT_NE(got[r].find("different collective steps"), std::string::npos) << got[r];
    }
    for (int r = 0; r < n; ++r) {
      // Each rank's step (cut at 47 bytes) and the count of barriers it passed before.
      const std::string name = steps[at[r]].substr(0, 47);
      EXPECT_NE(got[0].find("'" + name + "' (group barrier 1)"), std::string::npos) << got[0];
    }
    // Rank lists: the ranks at steps[at[0]] are listed together, rank 0 first among them.
    std::string first = "rank";
    if (std::count(at.begin(), at.end(), at[0]) > 1) first += "s";
    EXPECT_NE(got[0].find(first + " 0"), std::string::npos) << got[0];
  }
}

TEST(LocalGroupBarrier, ARankThatNeverArrivesFailsTheOthersNamingIt) {
  ::setenv("EPCOMM_TIMEOUT_MS", "100", 1);  // the bound is 4 x this
  const auto groups = Group::create_local({0, 0, 0});
  const auto start = std::chrono::steady_clock::now();
  auto wait = [&](int r) {
    try {
      groups[r]->barrier();
    } catch (const RuntimeFailure& e) {
      return std::string(e.what());
    }
    return std::string("passed");
  };
  auto a = std::async(std::launch::async, wait, 0);
  auto b = std::async(std::launch::async, wait, 1);  // rank 2 never comes
  const std::string ea = a.get(), eb = b.get();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ::unsetenv("EPCOMM_TIMEOUT_MS");
  for (const std::string& e : {ea, eb}) {
    EXPECT_NE(e.find("rank(s) 2,"), std::string::npos) << e;
    EXPECT_NE(e.find("never arrived"), std::string::npos) << e;
  }
  EXPECT_GE(s, 0.35);
  EXPECT_LT(s, 5.0);
  // Broken for good: the next wait fails at once, even for the late rank.
  const auto again = std::chrono::steady_clock::now();
  EXPECT_THROW(groups[2]->barrier(), RuntimeFailure);
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - again).count(), 0.1);
}

}  // namespace
}  // namespace epcomm
