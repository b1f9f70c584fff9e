// The CPU backend with R ranks as threads in one process: each rank calls with its own inputs only,
// as it would on a GPU, and gets its own outputs, identical bit for bit to the all-ranks functions
// of reference.hpp (both run the same code). Useful where there is no GPU, and as a model of the
// per-rank API for tests of code that drives epcomm.
//
//   epcomm::ref::HostCluster cluster(4, 4);
//   cluster.run([&](int rank) {
//     auto out = cluster.dispatch(rank, my_inputs[rank], options);
//     ...
//   });
//
// Every method but get_dispatch_layout is a collective: all ranks of the running `run` must make
// the same calls in the same order (a mismatch raises epcomm::Error on every rank). An argument
// error on any rank raises the same ArgumentError, naming that rank, on every rank, after which the
// cluster remains usable. An exception that leaves a rank's function ends the collectives of the
// others (they raise instead of waiting forever), and `run` rethrows it.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "epcomm/reference.hpp"

namespace epcomm::ref {

class HostCluster {
 public:
  // ranks_per_node only matters for the layout's per-node counts.
  HostCluster(int num_ranks, int ranks_per_node);
  ~HostCluster();
  HostCluster(const HostCluster&) = delete;
  HostCluster& operator=(const HostCluster&) = delete;

  int num_ranks() const;
  int ranks_per_node() const;

  // Runs fn(rank) on num_ranks threads and joins them. Rethrows the exception of the rank that
  // failed first (one that caused the others to abandon their collectives, not theirs).
  void run(const std::function<void(int rank)>& fn);

  // ---- per-rank calls, from inside run() ----
  // Local: no exchange needed, so not a collective.
  Layout get_dispatch_layout(int rank, const std::vector<int64_t>& topk_idx, int num_tokens, int num_topk,
                             int num_experts) const;
  NormalDispatchOutput dispatch(int rank, const NormalInput& input, const NormalOptions& options);
  NormalDispatchOutput cached_dispatch(int rank, const NormalInput& input, const NormalHandle& handle,
                                       const NormalOptions& options);
  CombineOutput combine(int rank, const CombineInput& input, const NormalHandle& handle, int hidden, int num_topk);
  LowLatencyDispatchOutput low_latency_dispatch(int rank, const LowLatencyDispatchInput& input,
                                                const LowLatencyOptions& options);
  // my_dispatch_output: what this rank's low_latency_dispatch returned (its experts' handle).
  std::vector<uint16_t> low_latency_combine(int rank, const LowLatencyCombineInput& input,
                                            const LowLatencyDispatchOutput& my_dispatch_output,
                                            const LowLatencyOptions& options);

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace epcomm::ref
