// A barrier for the rank threads of one process, shared by the GPU tests (harness ranks_meet) and
// epcomm-bench. leave() breaks it for good: a thread that leaves (a rank that threw or returned)
// releases every waiter and later waits return at once, so no rank waits for one that is gone.
// The tests' ranks leave when they end; the bench's when they throw (LeaveOnThrow).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>

namespace epcomm::testing {

class ThreadBarrier {
 public:
  explicit ThreadBarrier(int threads) : threads_(threads) {}

  void wait() {
    std::unique_lock<std::mutex> lock(mu_);
    if (broken_) return;
    const uint64_t generation = generation_;
    if (++arrived_ == threads_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lock, [&] { return generation_ != generation || broken_; });
  }

  void leave() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      broken_ = true;
    }
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int threads_ = 0, arrived_ = 0;
  uint64_t generation_ = 0;
  bool broken_ = false;
};

// Leaves `barrier` when the scope ends by an exception (not when it ends normally): for threads
// that must keep meeting the others to the end (epcomm-bench's ranks), but must not strand them
// when they throw.
class LeaveOnThrow {
 public:
  explicit LeaveOnThrow(ThreadBarrier& barrier) : barrier_(barrier) {}
  ~LeaveOnThrow() {
    if (std::uncaught_exceptions() > exceptions_) barrier_.leave();
  }
  LeaveOnThrow(const LeaveOnThrow&) = delete;
  LeaveOnThrow& operator=(const LeaveOnThrow&) = delete;

 private:
  ThreadBarrier& barrier_;
  int exceptions_ = std::uncaught_exceptions();
};

}  // namespace epcomm::testing
