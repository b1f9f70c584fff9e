#include "harness.hpp"

#include <nccl.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>

#include "common/thread_barrier.hpp"

namespace epcomm::test {

void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

DeviceTensor::DeviceTensor(DType dtype, std::vector<int64_t> shape, int device) {
  view_.dtype = dtype;
  view_.device = device;
  view_.ndim = static_cast<int>(shape.size());
  int64_t stride = 1;
  for (int i = view_.ndim - 1; i >= 0; --i) {
    view_.shape[i] = shape[i];
    view_.strides[i] = stride;
    stride *= shape[i];
  }
  void* p = nullptr;
  cuda_ok(cudaSetDevice(device), "cudaSetDevice");
  cuda_ok(cudaMalloc(&p, std::max<size_t>(view_.nbytes(), 16)), "cudaMalloc");
  // Poison: every output element must be written by the code under test.
  // This thread's stream only: ranks sharing a GPU must never wait for each other's kernels.
  cuda_ok(cudaMemsetAsync(p, 0xA5, std::max<size_t>(view_.nbytes(), 16), cudaStreamPerThread), "cudaMemset");
  cuda_ok(cudaStreamSynchronize(cudaStreamPerThread), "sync after poison");
  mem_ = std::shared_ptr<void>(p, [device](void* q) {
    cudaSetDevice(device);
    cudaFree(q);
  });
  view_.data = p;
}

void DeviceTensor::fill_bytes(int byte) const {
  cuda_ok(cudaMemsetAsync(view_.data, byte, view_.nbytes(), cudaStreamPerThread), "cudaMemset");
  cuda_ok(cudaStreamSynchronize(cudaStreamPerThread), "sync after fill");
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

std::vector<int> rank_devices(int num_ranks) {
  const int n = device_count();
  // Distinct GPUs when there are enough, else round robin (ranks then share GPUs, and ranks on
  // different GPUs still talk over NVLink).
  std::vector<int> devices(num_ranks, 0);
  for (int r = 0; r < num_ranks; ++r) devices[r] = n > 0 ? r % n : 0;
  return devices;
}

int test_num_sms(int num_ranks, int wanted) {
  const int n = std::max(device_count(), 1);
  if (n >= num_ranks) return wanted;
  cudaDeviceProp prop{};
  cuda_ok(cudaGetDeviceProperties(&prop, 0), "props");
  // Every rank's blocks (plus a notify block each) must be resident at once on a shared GPU.
  const int per_gpu = (num_ranks + n - 1) / n;
  return std::max(1, std::min(wanted, (prop.multiProcessorCount - per_gpu) / per_gpu));
}

namespace {

thread_local testing::ThreadBarrier* t_meeting = nullptr;

// fn on one thread per rank (ranks[i] on devices[i]); failures become test failures naming the rank.
void run_rank_threads(const std::vector<int>& ranks, const std::vector<int>& devices,
                      const std::function<std::shared_ptr<Group>(int)>& group_of,
                      const std::function<void(int, std::shared_ptr<Group>)>& fn) {
  const int n = static_cast<int>(devices.size());
  testing::ThreadBarrier meeting(n);
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(n);
  for (int i = 0; i < n; ++i)
    threads.emplace_back([&, i] {
      t_meeting = &meeting;
      try {
        cuda_ok(cudaSetDevice(devices[i]), "cudaSetDevice");
        fn(ranks[i], group_of(i));
      } catch (...) {
        errors[i] = std::current_exception();
      }
      meeting.leave();
      t_meeting = nullptr;
    });
  for (auto& t : threads) t.join();
  for (int i = 0; i < n; ++i)
    if (errors[i]) {
      try {
        std::rethrow_exception(errors[i]);
      } catch (const std::exception& e) {
        ADD_FAILURE() << "rank " << ranks[i] << " threw: " << e.what();
      }
    }
}

std::vector<int> iota_ranks(int n) {
  std::vector<int> r(n);
  for (int i = 0; i < n; ++i) r[i] = i;
  return r;
}

}  // namespace

void ranks_meet() {
  if (t_meeting != nullptr) t_meeting->wait();
}

void run_ranks(int num_ranks, const std::function<void(int, std::shared_ptr<Group>)>& fn, int ranks_per_node) {
  const std::vector<int> devices = rank_devices(num_ranks);
  const bool distinct = device_count() >= num_ranks;
  const char* forced = std::getenv("EPCOMM_TEST_TRANSPORT");
  const bool use_nccl = forced ? std::strcmp(forced, "nccl") == 0 : distinct;
  std::vector<std::shared_ptr<Group>> local;
  ncclUniqueId id{};
  if (use_nccl) {
    if (ncclGetUniqueId(&id) != ncclSuccess) throw std::runtime_error("ncclGetUniqueId failed");
  } else {
    local = Group::create_local(devices, ranks_per_node);
  }
  run_rank_threads(
      iota_ranks(num_ranks), devices,
      [&](int r) { return use_nccl ? Group::create_nccl(id, num_ranks, r, devices[r], ranks_per_node) : local[r]; },
      fn);
}

bool run_ranks_cleanly(int num_ranks, const std::function<void(int, std::shared_ptr<Group>)>& fn, int ranks_per_node) {
  const auto* result = ::testing::UnitTest::GetInstance()->current_test_info()->result();
  const int parts_before = result->total_part_count();
  run_ranks(num_ranks, fn, ranks_per_node);
  return result->total_part_count() == parts_before;
}

void run_local_ranks(const std::vector<int>& devices, const std::function<void(int, std::shared_ptr<Group>)>& fn) {
  const std::vector<std::shared_ptr<Group>> local = Group::create_local(devices);
  run_rank_threads(
      iota_ranks(static_cast<int>(devices.size())), devices, [&](int r) { return local[r]; }, fn);
}

void run_group_threads(const std::vector<int>& ranks, const std::vector<std::shared_ptr<Group>>& groups,
                       const std::function<void(int, std::shared_ptr<Group>)>& fn) {
  std::vector<int> devices;
  for (const auto& g : groups) devices.push_back(g->device());
  run_rank_threads(
      ranks, devices, [&](int i) { return groups[i]; }, fn);
}

::testing::AssertionResult close_bf16(const std::vector<uint16_t>& got, const std::vector<uint16_t>& want,
                                      const std::string& what, double tol) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << what << ": size " << got.size() << " vs " << want.size();
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = ref::bf16_to_float(got[i]), w = ref::bf16_to_float(want[i]);
    if (!(std::fabs(g - w) <= tol * std::max(1.0, std::fabs(w))))
      return ::testing::AssertionFailure() << what << ": element " << i << " got " << g << " want " << w;
  }
  return ::testing::AssertionSuccess();
}

}  // namespace epcomm::test
