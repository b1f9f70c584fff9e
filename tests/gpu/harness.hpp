// Helpers for GPU tests: device memory, uploads/downloads, random inputs, and running R ranks as
// threads (on distinct GPUs through NCCL when there are enough, else several ranks per GPU).
#pragma once

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "epcomm/buffer.hpp"
#include "epcomm/group.hpp"
#include "epcomm/reference.hpp"
#include "common/random_inputs.hpp"

namespace epcomm::test {

void cuda_ok(cudaError_t e, const char* what);

// Runs `call`, which must throw an E whose message holds every fragment; `context` (e.g. the rank)
// starts each failure. Returns the message ("" when nothing was thrown). Another type propagates.
template <class E>
std::string expect_error(const std::function<void()>& call, const std::vector<std::string>& fragments,
                         const std::string& context = "") {
  try {
    call();
  } catch (const E& e) {
    const std::string msg = e.what();
    for (const auto& f : fragments)
      EXPECT_NE(msg.find(f), std::string::npos) << context << ": '" << f << "' not in: " << msg;
    return msg;
  }
  ADD_FAILURE() << context << ": no error; expected one naming '" << (fragments.empty() ? "" : fragments[0]) << "'";
  return "";
}

// Owned device memory with a view.
class DeviceTensor {
 public:
  DeviceTensor() = default;
  DeviceTensor(DType dtype, std::vector<int64_t> shape, int device);
  TensorView view() const { return view_; }
  template <typename T>
  void upload(const std::vector<T>& host) const;
  template <typename T>
  std::vector<T> download() const;
  void fill_bytes(int byte) const;

 private:
  std::shared_ptr<void> mem_;
  TensorView view_;
};

template <typename T>
void DeviceTensor::upload(const std::vector<T>& host) const {
  ASSERT_EQ(host.size() * sizeof(T), view_.nbytes()) << "upload size mismatch";
  if (!host.empty())
    cuda_ok(cudaMemcpyAsync(view_.data, host.data(), view_.nbytes(), cudaMemcpyHostToDevice, cudaStreamPerThread),
            "upload");
  cuda_ok(cudaStreamSynchronize(cudaStreamPerThread), "sync after upload");
}
template <typename T>
std::vector<T> DeviceTensor::download() const {
  std::vector<T> host(view_.nbytes() / sizeof(T));
  if (!host.empty())
    cuda_ok(cudaMemcpyAsync(host.data(), view_.data, view_.nbytes(), cudaMemcpyDeviceToHost, cudaStreamPerThread),
            "download");
  cuda_ok(cudaStreamSynchronize(cudaStreamPerThread), "sync after download");
  return host;
}

int device_count();
// Device of each rank: distinct GPUs when there are R of them, else all on GPU 0.
std::vector<int> rank_devices(int num_ranks);

// Runs fn(rank, group) on R threads. Transport: NCCL when ranks have distinct GPUs (or
// EPCOMM_TEST_TRANSPORT=nccl), else the local peer-pointer group.
void run_ranks(int num_ranks, const std::function<void(int rank, std::shared_ptr<Group> group)>& fn,
               int ranks_per_node = 0);
// The same with the local group on the given devices (ranks share a GPU where devices repeat).
void run_local_ranks(const std::vector<int>& devices,
                     const std::function<void(int rank, std::shared_ptr<Group> group)>& fn);
// fn(ranks[i], groups[i]) on one thread each (cuda device set to the group's), failures as test
// failures naming the rank; ranks_meet() meets these threads. For groups made elsewhere (the ranks
// of one process among several, tests/gin).
void run_group_threads(const std::vector<int>& ranks, const std::vector<std::shared_ptr<Group>>& groups,
                       const std::function<void(int rank, std::shared_ptr<Group> group)>& fn);

// run_ranks, then whether every rank finished without a failure: a rank that failed left its
// outputs incomplete, so a comparison of every rank's results afterwards is skipped when false.
bool run_ranks_cleanly(int num_ranks, const std::function<void(int rank, std::shared_ptr<Group> group)>& fn,
                       int ranks_per_node = 0);

// The threads of the running run_ranks / run_local_ranks meet here; a no-op outside them, and
// released at once when a rank has left (thrown or returned). A rank calls it before it frees its
// tensors and Buffer: ranks sharing a GPU are threads of one process, and a rank that finished
// early would free device memory (a device-wide synchronization, which also holds back the other
// threads' launches) while a co-resident rank's kernel waits for a rank not launched yet
// (NormalGpu.AllToOneExpertWithAnIdleRank: an idle rank hung the others' combine that way).
void ranks_meet();

// SMs per rank that keep every rank's blocks resident when ranks share a GPU.
int test_num_sms(int num_ranks, int wanted);

// ---- random inputs (tests/common) ----
using testing::random_bf16;
using testing::random_fp8;
using testing::random_scales;
using testing::random_topk;
using testing::random_weights;
using testing::RoutingSpec;

// ---- comparison ----
template <typename T>
::testing::AssertionResult same_values(const std::vector<T>& got, const std::vector<T>& want, const std::string& what,
                                       size_t count = SIZE_MAX) {
  count = std::min({count, got.size(), want.size()});
  if (got.size() < count || want.size() < count) return ::testing::AssertionFailure() << what << ": size mismatch";
  for (size_t i = 0; i < count; ++i)
    if (!(got[i] == want[i]))
      return ::testing::AssertionFailure() << what << ": first mismatch at element " << i << " of " << count << " (got "
                                           << +got[i] << ", want " << +want[i] << ")";
  return ::testing::AssertionSuccess();
}

// BF16 tensors compared as floats: |got - want| <= tol * max(1, |want|).
::testing::AssertionResult close_bf16(const std::vector<uint16_t>& got, const std::vector<uint16_t>& want,
                                      const std::string& what, double tol);

}  // namespace epcomm::test
