// The rank threads' barrier (tests/common/thread_barrier.hpp): threads meet at every wait, and a
// thread that throws inside LeaveOnThrow releases the others instead of leaving them waiting
// (epcomm-bench's ranks; a hang there had no timeout).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <future>
#include <stdexcept>
#include <thread>

#include "common/thread_barrier.hpp"

namespace epcomm::testing {
namespace {

TEST(ThreadBarrier, ThreadsMeetAtEveryWait) {
  ThreadBarrier barrier(3);
  std::atomic<int> passed{0};
  std::atomic<bool> early{false};
  auto body = [&] {
    for (int round = 0; round < 50; ++round) {
      passed.fetch_add(1);
      barrier.wait();
      if (passed.load() < 3 * (round + 1)) early = true;  // left before every thread arrived
      barrier.wait();
    }
  };
  std::thread a(body), b(body), c(body);
  a.join();
  b.join();
  c.join();
  EXPECT_FALSE(early.load());
  EXPECT_EQ(passed.load(), 150);
}

TEST(ThreadBarrier, AThreadThatThrowsReleasesTheOthers) {
  ThreadBarrier barrier(2);
  auto waiter = std::async(std::launch::async, [&] {
    barrier.wait();  // the first meeting: both arrive
    barrier.wait();  // the other thread never comes: released when it throws
    barrier.wait();  // and later waits return at once
    return true;
  });
  std::thread thrower([&] {
    try {
      LeaveOnThrow guard(barrier);
      barrier.wait();
      throw std::runtime_error("rank failed");
    } catch (const std::runtime_error&) {
    }
  });
  thrower.join();
  const bool released = waiter.wait_for(std::chrono::seconds(10)) == std::future_status::ready;
  if (!released) barrier.leave();  // let the waiter end, so the failure does not hang the binary
  EXPECT_TRUE(released) << "the waiter was stranded";
  EXPECT_TRUE(waiter.get());
}

TEST(ThreadBarrier, LeaveOnThrowKeepsTheBarrierWhenNothingThrows) {
  ThreadBarrier barrier(2);
  std::atomic<int> stage{0};
  std::thread first([&] {
    { LeaveOnThrow guard(barrier); }  // ends normally: the barrier must still hold
    barrier.wait();
    stage = 1;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(stage.load(), 0) << "a guard that ended without an exception broke the barrier";
  barrier.wait();
  first.join();
  EXPECT_EQ(stage.load(), 1);
}

}  // namespace
}  // namespace epcomm::testing
