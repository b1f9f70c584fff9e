// HostCluster: ranks as threads. A collective has three steps, each ending at a barrier:
//   1. prepare: validate this rank's inputs, build its source (reference_internal.hpp) and
//      publish a pointer to it in this rank's slot;
//   2. check: run the cross-rank checks, each rank the part that concerns it as a receiver (its
//      handle against every sender's routing), so R ranks together do the work of one all-ranks
//      check and not R times it (O(R^4) at R = 320 was seconds per call);
//   3. receive: compute this rank's outputs from every source, now that all of them passed.
// The barrier after step 3 also keeps every source alive until all ranks have read it.
// Errors are exchanged like data, so all ranks leave a failing collective the same way.
#include "epcomm/host_cluster.hpp"

#include <array>
#include <atomic>
#include <barrier>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>

#include "reference/reference_internal.hpp"

namespace epcomm::ref {
namespace {

using detail::cat;
using detail::rank_prefix;

// Raised on a rank whose collective was abandoned because another rank failed; run() reports the
// failure that caused it instead.
class PeerAborted : public Error {
 public:
  using Error::Error;
};

struct Slot {
  const char* op = nullptr;
  int phase = 0;
  uint64_t step = 0;  // how many steps this rank has made in this run(), this one included
  const void* payload = nullptr;
  std::exception_ptr error;
};

}  // namespace

struct HostCluster::State {
  int num_ranks = 0;
  int ranks_per_node = 0;
  std::unique_ptr<std::barrier<>> barrier;
  std::atomic<bool> running{false};
  std::atomic<bool> aborted{false};
  // Two slot sets, alternating by step: a rank may start writing step n+1 while slower ranks still
  // read step n, but cannot reach step n+2 before they have all arrived at step n+1.
  std::array<std::vector<Slot>, 2> slots;
  std::vector<uint64_t> steps;  // per rank, touched only by that rank's thread
  std::mutex failure_mutex;
  std::exception_ptr first_failure, first_abort;

  void check_rank(int rank, const char* method) const {
    if (!running.load()) throw Error(cat("HostCluster::", method, " called outside HostCluster::run"));
    if (rank < 0 || rank >= num_ranks) detail::fail("", cat("rank = ", rank, " is out of range [0, ", num_ranks, ")"));
  }

  void record_failure(std::exception_ptr e) {
    std::lock_guard<std::mutex> lock(failure_mutex);
    try {
      std::rethrow_exception(e);
    } catch (const PeerAborted&) {
      if (!first_abort) first_abort = e;
    } catch (...) {
      if (!first_failure) first_failure = e;
    }
    aborted.store(true);  // before this rank drops out of the barrier, so released peers see it
  }

  // Runs `local` (which may throw and may publish a payload), waits for every rank, and returns the
  // slots of this step. If any rank's `local` threw, every rank rethrows the lowest such rank's
  // exception, so all leave the collective the same way.
  const std::vector<Slot>& step(int rank, const char* op, int phase, const std::function<void(Slot&)>& local) {
    const uint64_t n = ++steps[rank];
    std::vector<Slot>& buffer = slots[n % 2];
    Slot& mine = buffer[rank];
    mine = Slot{op, phase, n, nullptr, nullptr};
    try {
      local(mine);
    } catch (...) {
      mine.error = std::current_exception();
    }
    barrier->arrive_and_wait();
    if (aborted.load())
      throw PeerAborted(cat(rank_prefix(rank), "HostCluster ", op, " abandoned because another rank failed"));
    for (int r = 0; r < num_ranks; ++r) {
      const Slot& s = buffer[r];
      if (s.step != n || std::strcmp(s.op, op) != 0 || s.phase != phase)
        throw Error(cat(rank_prefix(rank), "HostCluster collective #", (n + kSteps - 1) / kSteps, " is ", op,
                        " here but rank ", r,
                        s.step == n ? cat(" is in ", s.op) : std::string(" is elsewhere (returned from run?)"),
                        "; every rank must make the same collective calls in the same order"));
    }
    for (int r = 0; r < num_ranks; ++r)
      if (buffer[r].error) std::rethrow_exception(buffer[r].error);
    return buffer;
  }

  // The three steps of a collective: make() builds and validates this rank's source, check()
  // runs this rank's part of the cross-rank rules, and receive() turns every rank's source into
  // this rank's output once every rank's check has passed (a receiver reads every sender's source,
  // so it must not start before the others' parts are checked). An error in any rank's check
  // reaches every rank as the lowest failing rank's, the one the all-ranks check names first.
  static constexpr uint64_t kSteps = 3;
  template <typename Source, typename Make, typename Check, typename Receive>
  auto collective(int rank, const char* op, Make make, Check check, Receive receive) {
    check_rank(rank, op);
    Source mine;
    const std::vector<Slot>& sent = step(rank, op, 0, [&](Slot& slot) {
      mine = make();
      slot.payload = &mine;
    });
    std::vector<const Source*> sources;
    for (const Slot& slot : sent) sources.push_back(static_cast<const Source*>(slot.payload));
    step(rank, op, 1, [&](Slot&) { check(sources); });
    decltype(receive(sources)) out;
    step(rank, op, 2, [&](Slot&) { out = receive(sources); });
    return out;
  }
};

HostCluster::HostCluster(int num_ranks, int ranks_per_node) : state_(std::make_unique<State>()) {
  detail::check_num_ranks(num_ranks, ranks_per_node);
  state_->num_ranks = num_ranks;
  state_->ranks_per_node = ranks_per_node;
}

HostCluster::~HostCluster() = default;

int HostCluster::num_ranks() const { return state_->num_ranks; }
int HostCluster::ranks_per_node() const { return state_->ranks_per_node; }

void HostCluster::run(const std::function<void(int rank)>& fn) {
  State& s = *state_;
  if (s.running.exchange(true)) throw Error("HostCluster::run is already running; it does not nest");
  // A fresh barrier per run: ranks that finished (or failed) dropped out of the previous one.
  s.barrier = std::make_unique<std::barrier<>>(s.num_ranks);
  s.aborted.store(false);
  s.first_failure = s.first_abort = nullptr;
  for (auto& buffer : s.slots) buffer.assign(s.num_ranks, Slot{});
  s.steps.assign(s.num_ranks, 0);

  std::vector<std::thread> threads;
  try {
    for (int r = 0; r < s.num_ranks; ++r)
      threads.emplace_back([&s, &fn, r] {
        try {
          fn(r);
        } catch (...) {
          s.record_failure(std::current_exception());
        }
        s.barrier->arrive_and_drop();
      });
  } catch (...) {  // could not start every thread: stand in for the missing ranks
    s.record_failure(std::current_exception());
    for (size_t r = threads.size(); r < static_cast<size_t>(s.num_ranks); ++r) s.barrier->arrive_and_drop();
  }
  for (std::thread& t : threads) t.join();
  s.barrier.reset();
  s.running.store(false);
  if (s.first_failure) std::rethrow_exception(s.first_failure);
  if (s.first_abort) std::rethrow_exception(s.first_abort);
}

Layout HostCluster::get_dispatch_layout(int rank, const std::vector<int64_t>& topk_idx, int num_tokens, int num_topk,
                                        int num_experts) const {
  state_->check_rank(rank, "get_dispatch_layout");
  return detail::checked_layout(rank_prefix(rank), topk_idx, num_tokens, num_topk, num_experts, state_->num_ranks,
                                state_->ranks_per_node);
}

NormalDispatchOutput HostCluster::dispatch(int rank, const NormalInput& input, const NormalOptions& options) {
  const int R = state_->num_ranks;
  return state_->collective<detail::DispatchSource>(
      rank, "dispatch", [&] { return detail::make_dispatch_source(rank, R, input, options); },
      [&](const auto& sources) { detail::check_dispatch_sources(sources, rank); },
      [&](const auto& sources) { return detail::receive_dispatch(rank, sources); });
}

NormalDispatchOutput HostCluster::cached_dispatch(int rank, const NormalInput& input, const NormalHandle& handle,
                                                  const NormalOptions& options) {
  const int R = state_->num_ranks;
  return state_->collective<detail::DispatchSource>(
      rank, "cached_dispatch", [&] { return detail::make_cached_dispatch_source(rank, R, input, handle, options); },
      [&](const auto& sources) { detail::check_dispatch_sources(sources, rank); },
      [&](const auto& sources) { return detail::receive_dispatch(rank, sources); });
}

CombineOutput HostCluster::combine(int rank, const CombineInput& input, const NormalHandle& handle, int hidden,
                                   int num_topk) {
  const int R = state_->num_ranks;
  return state_->collective<detail::CombineSource>(
      rank, "combine",
      [&] {
        detail::CombineSource source{rank, &input, &handle, hidden, num_topk};
        detail::check_combine_source(source, R);
        return source;
      },
      [&](const auto& sources) { detail::check_combine_sources(sources, rank); },
      [&](const auto& sources) { return detail::combine_for_source(rank, sources); });
}

LowLatencyDispatchOutput HostCluster::low_latency_dispatch(int rank, const LowLatencyDispatchInput& input,
                                                           const LowLatencyOptions& options) {
  const int R = state_->num_ranks;
  return state_->collective<detail::LowLatencySource>(
      rank, "low_latency_dispatch", [&] { return detail::make_low_latency_source(rank, R, input, options); },
      [](const auto& sources) { detail::check_low_latency_sources(sources); },
      [&](const auto& sources) { return detail::receive_low_latency_dispatch(rank, sources); });
}

std::vector<uint16_t> HostCluster::low_latency_combine(int rank, const LowLatencyCombineInput& input,
                                                       const LowLatencyDispatchOutput& my_dispatch_output,
                                                       const LowLatencyOptions& options) {
  const int R = state_->num_ranks;
  return state_->collective<detail::LowLatencyCombineSource>(
      rank, "low_latency_combine",
      [&] {
        detail::LowLatencyCombineSource source{rank, &input, &my_dispatch_output, &options};
        detail::check_low_latency_combine_source(source, R);
        return source;
      },
      [](const auto& sources) { detail::check_low_latency_combine_sources(sources); },
      [&](const auto& sources) { return detail::low_latency_combine_for_source(rank, sources); });
}

}  // namespace epcomm::ref
