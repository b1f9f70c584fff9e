// epcomm._epcomm.Runtime: one rank's NCCL communicator and epcomm::Buffer (runtime.cpp binds the
// normal mode, low_latency.cpp the low-latency mode and the memory views).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>

#include "epcomm/buffer.hpp"
#include "epcomm/error.hpp"
#include "epcomm/group.hpp"

namespace epcomm::python {

namespace py = pybind11;

class Runtime {
 public:
  // Collective: creates the communicator from `unique_id` and the Buffer (the GIL is released).
  Runtime(const py::bytes& unique_id, int num_ranks, int rank, int device, size_t num_nvl_bytes, size_t num_rdma_bytes,
          bool low_latency_mode, int max_tokens_per_rank, int max_experts_per_rank, int64_t timeout_ms,
          bool enable_shrink = false, uintptr_t comm_stream = 0);

  Buffer& buffer() const {
    if (!buffer_) throw RuntimeFailure("epcomm.Buffer: this buffer was destroyed (destroy() was called)");
    return *buffer_;
  }
  std::shared_ptr<Buffer> shared() const {
    buffer();
    return buffer_;
  }
  const Group& group() const {
    buffer();
    return *group_;
  }
  bool destroyed() const { return !buffer_; }

  void destroy() {
    py::gil_scoped_release release;  // the destructor synchronizes and runs a barrier
    buffer_.reset();
    group_.reset();
  }

 private:
  std::shared_ptr<Group> group_;
  std::shared_ptr<Buffer> buffer_;
};

}  // namespace epcomm::python
