// Stress: a long random sequence of calls on one buffer per rank, every call verified against the
// CPU reference. Each step draws (the same on every rank, from the test's seed) a mode and its
// options: normal mode (layout, dispatch BF16/FP8 with or without num_worst_tokens, combine, and
// sometimes a cached dispatch) with hidden 256/512/1008, or low-latency mode (dispatch FP8/BF16,
// with or without hooks, and combine); uniform, hot-rank or single-expert routing; T per rank from
// 0 to Tmax (both ends often). Ranks keep their outputs; verifier threads recompute every rank's
// inputs from the seed, run the reference and compare, while the GPUs go on with the next steps.
//
//   EPCOMM_STRESS_CALLS   verified calls to make (default 200; the lead's run: >= 10000)
//   EPCOMM_STRESS_RANKS   ranks of the distinct-GPU test (default min(GPUs, 4))
//   EPCOMM_STRESS_SEED    replay one sequence
// Small values make it the compute-sanitizer workload of scripts/gpu-check.sh (step "sanitizer").
// Ends with "stress: N verified calls, M mismatches" on stdout.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <random>
#include <string>
#include <thread>

#include "harness.hpp"
#include "ll_harness.hpp"
#include "stress_steps.hpp"

namespace epcomm::test::stress {
namespace {

// ---------------------------------------------------------------- the pipeline
struct StepResults {
  std::vector<NormalRankResult> normal;
  std::vector<RoundOutput> ll;
  std::atomic<int> ranks_done{0};
};

class Verifier {
 public:
  Verifier(const Problem& p, const std::vector<Step>& steps, std::vector<std::unique_ptr<StepResults>>& results)
      : p_(p), steps_(steps), results_(results) {
    const int n = std::max(2u, std::thread::hardware_concurrency() / 2);
    for (int i = 0; i < n; ++i) threads_.emplace_back([this] { work(); });
  }
  ~Verifier() { finish(); }

  void submit(int step) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(step);
    }
    cv_.notify_one();
  }
  // Steps submitted but not verified yet (the ranks slow down when it grows).
  int backlog() const { return submitted_.load() - verified_steps_.load(); }
  void note_submitted() { submitted_.fetch_add(1); }
  void finish() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_)
      if (t.joinable()) t.join();
  }
  long calls() const { return calls_.load(); }
  long mismatches() const { return mismatches_.load(); }
  std::vector<std::string> messages() {
    std::lock_guard<std::mutex> lock(mu_);
    return messages_;
  }

 private:
  void work() {
    for (;;) {
      int step;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return done_ || !queue_.empty(); });
        if (queue_.empty()) return;
        step = queue_.front();
        queue_.pop_front();
      }
      const Step& s = steps_[step];
      std::string m;
      try {
        if (s.low_latency) {
          std::vector<RoundInput> in;
          for (int r = 0; r < p_.num_ranks; ++r) in.push_back(ll_input(p_, s, step, r));
          m = check_round(ll_case(p_, s), in, results_[step]->ll);
        } else {
          m = check_normal(p_, s, step, results_[step]->normal);
        }
      } catch (const std::exception& e) {
        m = std::string("the reference threw: ") + e.what();
      }
      results_[step].reset();
      if (m.empty()) {
        calls_.fetch_add(s.calls());
      } else {
        mismatches_.fetch_add(1);
        std::lock_guard<std::mutex> lock(mu_);
        if (messages_.size() < 10)
          messages_.push_back("step " + std::to_string(step) + " (" + (s.low_latency ? "low-latency" : "normal") +
                              (s.fp8 ? " fp8" : " bf16") + ", hidden " + std::to_string(s.hidden) + ", K " +
                              std::to_string(s.num_topk) + ", routing " + std::to_string(s.routing) +
                              (s.worst ? ", num_worst_tokens" : "") + (s.cached ? ", cached" : "") +
                              (s.hook ? ", hook" : "") + "): " + m);
      }
      verified_steps_.fetch_add(1);
    }
  }

  const Problem& p_;
  const std::vector<Step>& steps_;
  std::vector<std::unique_ptr<StepResults>>& results_;
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<int> queue_;
  bool done_ = false;
  std::atomic<long> calls_{0}, mismatches_{0};
  std::atomic<int> submitted_{0}, verified_steps_{0};
  std::vector<std::string> messages_;
};

// Runs the whole sequence with `num_ranks` ranks; `devices` empty: run_ranks' choice (distinct GPUs
// through NCCL when there are enough), else a local group on these devices (ranks share GPUs).
void run_stress(int num_ranks, const std::vector<int>& devices) {
  Problem p;
  p.num_ranks = num_ranks;
  p.seed = std::getenv("EPCOMM_STRESS_SEED") ? std::strtoull(std::getenv("EPCOMM_STRESS_SEED"), nullptr, 10)
                                             : std::random_device{}();
  const long target = std::max(1, env_int("EPCOMM_STRESS_CALLS", 200));
  std::vector<Step> steps;
  for (long calls = 0; calls < target;) {
    steps.push_back(make_step(p, static_cast<int>(steps.size())));
    calls += steps.back().calls();
  }
  SCOPED_TRACE("R=" + std::to_string(num_ranks) + " steps=" + std::to_string(steps.size()) +
               " EPCOMM_STRESS_SEED=" + std::to_string(p.seed));
  std::vector<std::unique_ptr<StepResults>> results(steps.size());
  for (auto& r : results) {
    r = std::make_unique<StepResults>();
    r->normal.resize(num_ranks);
    r->ll.resize(num_ranks);
  }
  Verifier verifier(p, steps, results);
  const auto t0 = std::chrono::steady_clock::now();

  auto rank_main = [&](int rank, std::shared_ptr<Group> group) {
    const int dev = group->device();
    cudaDeviceProp prop{};
    cuda_ok(cudaGetDeviceProperties(&prop, dev), "props");
    int sharing = 0;
    for (int d : devices.empty() ? rank_devices(num_ranks) : devices) sharing += d == dev;
    const int ll_sms = std::max(1, (prop.multiProcessorCount - sharing) / sharing);
    const int normal_sms = std::min(8, ll_sms);
    Config dcfg = Config::dispatch_default(num_ranks), ccfg = Config::combine_default(num_ranks);
    dcfg.num_sms = ccfg.num_sms = normal_sms;
    BufferOptions bo;
    bo.num_nvl_bytes = std::max(dcfg.get_nvl_buffer_size_hint(kMaxHidden * 2, num_ranks),
                                ccfg.get_nvl_buffer_size_hint(kMaxHidden * 2, num_ranks));
    bo.num_rdma_bytes = Buffer::low_latency_size_hint(kLLTmax, kLLHidden, num_ranks, p.ll_experts());
    bo.max_tokens_per_rank = kNormalTmax;
    bo.max_experts_per_rank = 64;
    bo.timeout_ms = 0;  // EPCOMM_TIMEOUT_MS (default 100 s; the sanitizer step raises it)
    Buffer buf(group, bo);
    cudaStream_t stream;
    cuda_ok(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
    NormalDevice nd(num_ranks, p.normal_experts(), dev);
    LLDevice ld(p, dev, ll_sms);
    for (size_t i = 0; i < steps.size(); ++i) {
      while (verifier.backlog() > 256) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      const Step& s = steps[i];
      StepResults& res = *results[i];
      if (s.low_latency) res.ll[rank] = run_low_latency(p, s, static_cast<int>(i), rank, buf, ld, stream);
      else res.normal[rank] = run_normal(p, s, static_cast<int>(i), rank, buf, nd, stream, normal_sms);
      if (res.ranks_done.fetch_add(1) + 1 == num_ranks) {
        verifier.note_submitted();
        verifier.submit(static_cast<int>(i));
      }
    }
    ranks_meet();  // no rank frees its memory while another's last calls run (harness.hpp)
    cudaStreamDestroy(stream);
  };
  if (devices.empty()) run_ranks(num_ranks, rank_main);
  else run_local_ranks(devices, rank_main);
  verifier.finish();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (const std::string& m : verifier.messages()) ADD_FAILURE() << m;
  std::printf("stress: %ld verified calls, %ld mismatches (R=%d%s, %zu steps, %.1f s, seed %llu)\n", verifier.calls(),
              verifier.mismatches(), num_ranks, devices.empty() ? "" : ", ranks sharing GPUs", steps.size(), secs,
              static_cast<unsigned long long>(p.seed));
  std::fflush(stdout);
  EXPECT_EQ(verifier.mismatches(), 0);
  if (!::testing::Test::HasFailure()) {
    long want = 0;
    for (const Step& s : steps) want += s.calls();
    EXPECT_EQ(verifier.calls(), want) << "every step must be verified";
  }
}

TEST(StressGpu, RanksOnDistinctGpus) {
  const int gpus = device_count();
  const int R = env_int("EPCOMM_STRESS_RANKS", std::min(gpus, 4));
  if (R < 2 || gpus < R) GTEST_SKIP() << "needs at least 2 GPUs (" << gpus << " visible)";
  run_stress(R, {});
}

TEST(StressGpu, RanksSharingOneGpu) { run_stress(3, std::vector<int>(3, 0)); }

}  // namespace
}  // namespace epcomm::test::stress
