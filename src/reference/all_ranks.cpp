// The all-ranks entry points of reference.hpp: every rank's inputs at once. Each runs the three
// steps of reference_internal.hpp in sequence; HostCluster runs the same steps on threads.
#include "reference/reference_internal.hpp"

namespace epcomm::ref {
namespace {

template <typename T>
std::vector<const T*> pointers(const std::vector<T>& items) {
  std::vector<const T*> out;
  for (const T& item : items) out.push_back(&item);
  return out;
}

void check_rank_lists(size_t num_inputs, size_t num_others, const char* others) {
  if (num_inputs == 0) detail::fail("", "inputs is empty; pass one entry per rank");
  if (num_others != num_inputs)
    detail::fail("", detail::cat(others, " has ", num_others, " entries but inputs has ", num_inputs,
                                 "; pass one per rank"));
}

}  // namespace

std::vector<NormalDispatchOutput> normal_dispatch(const std::vector<NormalInput>& inputs,
                                                  const NormalOptions& options) {
  check_rank_lists(inputs.size(), inputs.size(), "inputs");
  const int R = static_cast<int>(inputs.size());
  std::vector<detail::DispatchSource> sources;
  for (int r = 0; r < R; ++r) sources.push_back(detail::make_dispatch_source(r, R, inputs[r], options));
  const auto ptrs = pointers(sources);
  detail::check_dispatch_sources(ptrs);
  std::vector<NormalDispatchOutput> outputs;
  for (int r = 0; r < R; ++r) outputs.push_back(detail::receive_dispatch(r, ptrs));
  return outputs;
}

std::vector<NormalDispatchOutput> normal_cached_dispatch(const std::vector<NormalInput>& inputs,
                                                         const std::vector<NormalHandle>& handles,
                                                         const NormalOptions& options) {
  check_rank_lists(inputs.size(), handles.size(), "handles");
  const int R = static_cast<int>(inputs.size());
  std::vector<detail::DispatchSource> sources;
  for (int r = 0; r < R; ++r)
    sources.push_back(detail::make_cached_dispatch_source(r, R, inputs[r], handles[r], options));
  const auto ptrs = pointers(sources);
  detail::check_dispatch_sources(ptrs);
  std::vector<NormalDispatchOutput> outputs;
  for (int r = 0; r < R; ++r) outputs.push_back(detail::receive_dispatch(r, ptrs));
  return outputs;
}

std::vector<CombineOutput> normal_combine(const std::vector<CombineInput>& inputs,
                                          const std::vector<NormalHandle>& handles, int hidden, int num_topk) {
  check_rank_lists(inputs.size(), handles.size(), "handles");
  const int R = static_cast<int>(inputs.size());
  std::vector<detail::CombineSource> sources(R);
  for (int r = 0; r < R; ++r) {
    sources[r] = {r, &inputs[r], &handles[r], hidden, num_topk};
    detail::check_combine_source(sources[r], R);
  }
  const auto ptrs = pointers(sources);
  detail::check_combine_sources(ptrs);
  std::vector<CombineOutput> outputs;
  for (int r = 0; r < R; ++r) outputs.push_back(detail::combine_for_source(r, ptrs));
  return outputs;
}

std::vector<LowLatencyDispatchOutput> low_latency_dispatch(const std::vector<LowLatencyDispatchInput>& inputs,
                                                           const LowLatencyOptions& options) {
  check_rank_lists(inputs.size(), inputs.size(), "inputs");
  const int R = static_cast<int>(inputs.size());
  std::vector<detail::LowLatencySource> sources;
  for (int r = 0; r < R; ++r) sources.push_back(detail::make_low_latency_source(r, R, inputs[r], options));
  const auto ptrs = pointers(sources);
  detail::check_low_latency_sources(ptrs);
  std::vector<LowLatencyDispatchOutput> outputs;
  for (int r = 0; r < R; ++r) outputs.push_back(detail::receive_low_latency_dispatch(r, ptrs));
  return outputs;
}

std::vector<std::vector<uint16_t>> low_latency_combine(const std::vector<LowLatencyCombineInput>& inputs,
                                                       const std::vector<LowLatencyDispatchOutput>& dispatch_outputs,
                                                       const LowLatencyOptions& options) {
  check_rank_lists(inputs.size(), dispatch_outputs.size(), "dispatch_outputs");
  const int R = static_cast<int>(inputs.size());
  std::vector<detail::LowLatencyCombineSource> sources(R);
  for (int r = 0; r < R; ++r) {
    sources[r] = {r, &inputs[r], &dispatch_outputs[r], &options};
    detail::check_low_latency_combine_source(sources[r], R);
  }
  const auto ptrs = pointers(sources);
  detail::check_low_latency_combine_sources(ptrs);
  std::vector<std::vector<uint16_t>> outputs;
  for (int r = 0; r < R; ++r) outputs.push_back(detail::low_latency_combine_for_source(r, ptrs));
  return outputs;
}

}  // namespace epcomm::ref
