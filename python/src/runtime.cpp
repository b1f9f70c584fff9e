// epcomm._epcomm.Runtime: one rank's NCCL communicator and epcomm::Buffer, called with tensor-like
// objects, integer streams and events. No PyTorch here: the Python layer (epcomm/buffer.py) owns
// allocation and stream rules; this file converts arguments, releases the GIL and calls the core.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstring>
#include <memory>
#include <string>

#include "bindings.hpp"
#include "epcomm/buffer.hpp"
#include "epcomm/error.hpp"
#include "epcomm/group.hpp"
#include "runtime.hpp"
#include "views.hpp"

namespace epcomm::python {

Runtime::Runtime(const py::bytes& unique_id, int num_ranks, int rank, int device, size_t num_nvl_bytes,
                 size_t num_rdma_bytes, bool low_latency_mode, int max_tokens_per_rank, int max_experts_per_rank,
                 int64_t timeout_ms, bool enable_shrink, uintptr_t comm_stream) {
  const std::string id_bytes = unique_id;
  ncclUniqueId id;
  if (id_bytes.size() != sizeof(id.internal))
    throw ArgumentError("unique_id: must be the " + std::to_string(sizeof(id.internal)) +
                        " bytes get_unique_id() returns, got " + std::to_string(id_bytes.size()));
  std::memcpy(id.internal, id_bytes.data(), sizeof(id.internal));
  if (num_ranks < 1) throw ArgumentError("num_ranks = " + std::to_string(num_ranks) + " must be positive");
  if (rank < 0 || rank >= num_ranks)
    throw ArgumentError("rank = " + std::to_string(rank) + " must be in [0, " + std::to_string(num_ranks) + ")");
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    cudaGetLastError();
    throw RuntimeFailure(
        "epcomm.Buffer: no CUDA device is visible to this process; epcomm's normal and "
        "low-latency modes run on Hopper (sm_90) GPUs");
  }
  if (device < 0 || device >= count)
    throw ArgumentError("device = " + std::to_string(device) + " must be in [0, " + std::to_string(count) + ")");
  BufferOptions options;
  options.num_nvl_bytes = num_nvl_bytes;
  options.num_rdma_bytes = num_rdma_bytes;
  options.low_latency_mode = low_latency_mode;
  options.max_tokens_per_rank = max_tokens_per_rank;
  options.max_experts_per_rank = max_experts_per_rank;
  options.timeout_ms = timeout_ms;
  options.enable_shrink = enable_shrink;
  options.comm_stream = reinterpret_cast<cudaStream_t>(comm_stream);
  // Collective and blocking (NCCL init, symmetric allocation, barrier): other Python threads run.
  py::gil_scoped_release release;
  group_ = Group::create_nccl(id, num_ranks, rank, device);
  buffer_ = std::make_shared<Buffer>(group_, options);
}

namespace {

// Handle metadata crosses to Python as a tuple of ints in this order (epcomm/handle.py, HandleMeta).
constexpr int kMetaFields = 6;

py::tuple handle_meta(const DispatchHandle& h) {
  return py::make_tuple(h.num_recv_tokens, h.num_rows, h.max_chunks, h.chunk, h.num_tokens, h.num_experts);
}

DispatchHandle handle_from(py::handle rank_prefix_matrix, py::handle chunk_offset, py::handle recv_src_idx,
                           py::handle is_token_in_rank, py::handle meta) {
  DispatchHandle h;
  h.rank_prefix_matrix = to_view(rank_prefix_matrix, "handle.rank_prefix_matrix");
  h.chunk_offset = to_view(chunk_offset, "handle.chunk_offset");
  h.recv_src_idx = to_view(recv_src_idx, "handle.recv_src_idx");
  h.is_token_in_rank = to_view(is_token_in_rank, "handle.is_token_in_rank");
  const py::sequence m = py::reinterpret_borrow<py::sequence>(meta);
  if (py::len(m) != kMetaFields)
    throw ArgumentError("handle.meta: expected " + std::to_string(kMetaFields) + " integers, got " +
                        std::to_string(py::len(m)));
  h.num_recv_tokens = m[0].cast<int>();
  h.num_rows = m[1].cast<int>();
  h.max_chunks = m[2].cast<int>();
  h.chunk = m[3].cast<int>();
  h.num_tokens = m[4].cast<int>();
  h.num_experts = m[5].cast<int>();
  if (h.num_rows < 0 || h.max_chunks < 0 || h.chunk <= 0 || h.num_tokens < 0 || h.num_experts <= 0)
    throw ArgumentError("handle.meta: values do not come from an epcomm dispatch");
  return h;
}

StreamOrder order_from(py::handle stream, py::handle previous_event, bool async_finish) {
  StreamOrder o;
  o.stream = to_stream(stream, "stream");
  o.previous_event = to_event(previous_event, "previous_event");
  o.async_finish = async_finish;
  return o;
}

// Receive memory the Python layer reserved before the count exchange: data pointers of contiguous
// tensors of `capacity` rows each (columns as DispatchCall::run expects; null for an output not
// wanted). When the rows that arrive fit, the data kernel is launched right after the counts are
// known, in the same GIL-free stretch: no Python runs while the GPU waits between the phases.
struct ReservedOutputs {
  void* recv_x = nullptr;
  void* recv_x_scales = nullptr;
  void* recv_topk_idx = nullptr;
  void* recv_topk_weights = nullptr;
  void* recv_src_idx = nullptr;
  int64_t capacity = 0;
};

void* pointer_or_null(py::handle obj, const char* arg) {
  if (obj.is_none()) return nullptr;
  if (!py::isinstance<py::int_>(obj))
    throw ArgumentError(std::string("reserved ") + arg + ": expected a data pointer (int) or None, got " +
                        py::str(py::type::handle_of(obj).attr("__name__")).cast<std::string>());
  return reinterpret_cast<void*>(obj.cast<uintptr_t>());
}

std::optional<ReservedOutputs> reserved_from(py::handle obj) {
  if (obj.is_none()) return std::nullopt;
  const py::sequence s = py::reinterpret_borrow<py::sequence>(obj);
  if (py::len(s) != 6)
    throw ArgumentError(
        "reserved: expected (recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, recv_src_idx, "
        "capacity), got " +
        std::to_string(py::len(s)) + " items");
  ReservedOutputs r;
  r.recv_x = pointer_or_null(s[0], "recv_x");
  r.recv_x_scales = pointer_or_null(s[1], "recv_x_scales");
  r.recv_topk_idx = pointer_or_null(s[2], "recv_topk_idx");
  r.recv_topk_weights = pointer_or_null(s[3], "recv_topk_weights");
  r.recv_src_idx = pointer_or_null(s[4], "recv_src_idx");
  r.capacity = s[5].cast<int64_t>();
  if (!r.recv_x || !r.recv_src_idx) throw ArgumentError("reserved: recv_x and recv_src_idx are required");
  if (r.capacity < 0) throw ArgumentError("reserved: capacity = " + std::to_string(r.capacity) + " must be >= 0");
  return r;
}

// A dispatch between its two phases: the counts are known (unless num_worst_tokens). With reserved
// outputs that are big enough, prepare() also ran the data phase; otherwise the Python layer
// allocates the receive tensors with num_rows rows and run() moves the data.
class DispatchCall {
 public:
  DispatchCall(std::shared_ptr<Buffer> buffer, DispatchInputs in, DispatchHandle handle, StreamOrder order)
      : buffer_(std::move(buffer)), in_(std::move(in)), handle_(std::move(handle)), order_(order) {}

  void prepare(const std::optional<ReservedOutputs>& reserved) {
    py::gil_scoped_release release;  // the host waits for the count exchange
    plan_ = buffer_->dispatch_prepare(in_, handle_, std::nullopt, order_);
    if (reserved && plan_.num_rows <= reserved->capacity) {
      const auto& r = *reserved;
      launch(outputs_at(r.recv_x, r.recv_x_scales, r.recv_topk_idx, r.recv_topk_weights),
             contiguous(r.recv_src_idx, DType::kI32, -1));
    }
  }

  // Each output is a tensor, or the data pointer of a contiguous tensor of the shape and dtype this
  // call expects (cheaper).
  py::object run(py::handle recv_x, py::handle recv_x_scales, py::handle recv_topk_idx, py::handle recv_topk_weights,
                 py::handle recv_src_idx) {
    if (ran_) throw RuntimeFailure("DispatchCall.run: already ran");
    if (recv_x.is_none()) throw ArgumentError("recv_x: a tensor is required, got None");
    if (recv_src_idx.is_none()) throw ArgumentError("recv_src_idx: a tensor is required, got None");
    DispatchOutputs out;
    out.recv_x = *out_view(recv_x, "recv_x", in_.x.dtype, in_.x.shape[1]);
    out.recv_x_scales = out_view(recv_x_scales, "recv_x_scales", scale_dtype(), num_scales());
    out.recv_topk_idx = out_view(recv_topk_idx, "recv_topk_idx", DType::kI64, num_topk());
    out.recv_topk_weights = out_view(recv_topk_weights, "recv_topk_weights", DType::kF32, num_topk());
    const TensorView src = *out_view(recv_src_idx, "recv_src_idx", DType::kI32, -1);
    {
      py::gil_scoped_release release;
      launch(std::move(out), src);
    }
    return take_event();
  }

  bool ran() const { return ran_; }
  // The event of the data phase (async_finish), once; None otherwise.
  py::object take_event() { return wrap_event(std::move(event_), buffer_->device()); }
  int num_rows() const { return plan_.num_rows; }
  const std::vector<int>& num_recv_tokens_per_expert() const { return plan_.num_recv_tokens_per_expert; }
  py::tuple meta() const {
    if (!ran_) throw RuntimeFailure("DispatchCall.meta: run() has not been called");
    return handle_meta(handle_);
  }

 private:
  int64_t num_scales() const { return in_.x_scales ? in_.x_scales->shape[1] : 0; }
  // Received scales have the dtype the input's had (float32, or int32 words).
  DType scale_dtype() const { return in_.x_scales ? in_.x_scales->dtype : DType::kF32; }
  int64_t num_topk() const { return in_.topk_idx ? in_.topk_idx->shape[1] : 0; }

  // A contiguous [num_rows, cols] (or [num_rows] when cols < 0) view at ptr.
  TensorView contiguous(void* ptr, DType dtype, int64_t cols) const {
    const int64_t rows = plan_.num_rows;
    const int device = buffer_->device();
    return cols < 0 ? TensorView::contiguous(ptr, dtype, {rows}, device)
                    : TensorView::contiguous(ptr, dtype, {rows, cols}, device);
  }

  std::optional<TensorView> out_view(py::handle obj, const char* arg, DType dtype, int64_t cols) const {
    if (obj.is_none()) return std::nullopt;
    if (!py::isinstance<py::int_>(obj)) return to_view(obj, arg);
    return contiguous(reinterpret_cast<void*>(obj.cast<uintptr_t>()), dtype, cols);
  }

  DispatchOutputs outputs_at(void* x, void* scales, void* idx, void* weights) const {
    DispatchOutputs out;
    out.recv_x = contiguous(x, in_.x.dtype, in_.x.shape[1]);
    if (scales) out.recv_x_scales = contiguous(scales, scale_dtype(), num_scales());
    if (idx) out.recv_topk_idx = contiguous(idx, DType::kI64, num_topk());
    if (weights) out.recv_topk_weights = contiguous(weights, DType::kF32, num_topk());
    return out;
  }

  // Without the GIL.
  void launch(const DispatchOutputs& out, const TensorView& recv_src_idx) {
    handle_.recv_src_idx = recv_src_idx;
    ran_ = true;
    event_ = buffer_->dispatch_run(in_, plan_, handle_, out, order_);
  }

  std::shared_ptr<Buffer> buffer_;
  DispatchInputs in_;
  DispatchHandle handle_;
  DispatchPlan plan_;
  StreamOrder order_;
  Event event_;
  bool ran_ = false;
};

py::object get_dispatch_layout(const Runtime& rt, py::handle topk_idx, int num_experts, py::handle num_tokens_per_rank,
                               py::handle num_tokens_per_rdma_rank, py::handle num_tokens_per_expert,
                               py::handle is_token_in_rank, py::handle stream, py::handle previous_event,
                               bool async_finish) {
  Buffer& buf = rt.buffer();
  const TensorView idx = to_view(topk_idx, "topk_idx");
  LayoutOutputs out{to_view(num_tokens_per_rank, "num_tokens_per_rank"),
                    to_optional_view(num_tokens_per_rdma_rank, "num_tokens_per_rdma_rank"),
                    to_view(num_tokens_per_expert, "num_tokens_per_expert"),
                    to_view(is_token_in_rank, "is_token_in_rank")};
  const StreamOrder order = order_from(stream, previous_event, async_finish);
  Event e;
  {
    py::gil_scoped_release release;
    e = buf.get_dispatch_layout(idx, num_experts, out, order);
  }
  return wrap_event(std::move(e), buf.device());
}

std::unique_ptr<DispatchCall> dispatch_prepare(
    const Runtime& rt, py::handle x, py::handle x_scales, py::handle topk_idx, py::handle topk_weights,
    py::handle num_tokens_per_rank, py::handle is_token_in_rank, py::handle num_tokens_per_expert, int expert_alignment,
    int num_worst_tokens, const Config& config, py::handle rank_prefix_matrix, py::handle chunk_offset,
    py::handle stream, py::handle previous_event, bool async_finish, py::handle reserved) {
  const std::optional<ReservedOutputs> reserve = reserved_from(reserved);
  DispatchInputs in;
  in.x = to_view(x, "x");
  in.x_scales = to_optional_view(x_scales, "x_scales");
  in.topk_idx = to_optional_view(topk_idx, "topk_idx");
  in.topk_weights = to_optional_view(topk_weights, "topk_weights");
  in.num_tokens_per_rank = to_optional_view(num_tokens_per_rank, "num_tokens_per_rank");
  in.is_token_in_rank = to_optional_view(is_token_in_rank, "is_token_in_rank");
  in.num_tokens_per_expert = to_optional_view(num_tokens_per_expert, "num_tokens_per_expert");
  in.expert_alignment = expert_alignment;
  in.num_worst_tokens = num_worst_tokens;
  in.config = config;
  DispatchHandle handle;
  handle.rank_prefix_matrix = to_view(rank_prefix_matrix, "rank_prefix_matrix");
  handle.chunk_offset = to_view(chunk_offset, "chunk_offset");
  auto call = std::make_unique<DispatchCall>(rt.shared(), std::move(in), std::move(handle),
                                             order_from(stream, previous_event, async_finish));
  call->prepare(reserve);
  return call;
}

py::object cached_dispatch(const Runtime& rt, py::handle x, py::handle x_scales, py::handle rank_prefix_matrix,
                           py::handle chunk_offset, py::handle recv_src_idx, py::handle is_token_in_rank,
                           py::handle meta, py::handle recv_x, py::handle recv_x_scales, const Config& config,
                           py::handle stream, py::handle previous_event, bool async_finish) {
  Buffer& buf = rt.buffer();
  const TensorView xv = to_view(x, "x");
  const std::optional<TensorView> sv = to_optional_view(x_scales, "x_scales");
  const DispatchHandle h = handle_from(rank_prefix_matrix, chunk_offset, recv_src_idx, is_token_in_rank, meta);
  DispatchOutputs out;
  out.recv_x = to_view(recv_x, "recv_x");
  out.recv_x_scales = to_optional_view(recv_x_scales, "recv_x_scales");
  const StreamOrder order = order_from(stream, previous_event, async_finish);
  Event e;
  {
    py::gil_scoped_release release;
    e = buf.cached_dispatch(xv, sv, h, out, config, order);
  }
  return wrap_event(std::move(e), buf.device());
}

py::object combine(const Runtime& rt, py::handle x, py::handle topk_weights, py::handle bias0, py::handle bias1,
                   py::handle rank_prefix_matrix, py::handle chunk_offset, py::handle recv_src_idx,
                   py::handle is_token_in_rank, py::handle meta, py::handle combined_x,
                   py::handle combined_topk_weights, const Config& config, py::handle stream, py::handle previous_event,
                   bool async_finish) {
  Buffer& buf = rt.buffer();
  CombineInputs in;
  in.x = to_view(x, "x");
  in.topk_weights = to_optional_view(topk_weights, "topk_weights");
  in.bias0 = to_optional_view(bias0, "bias[0]");
  in.bias1 = to_optional_view(bias1, "bias[1]");
  in.config = config;
  const DispatchHandle h = handle_from(rank_prefix_matrix, chunk_offset, recv_src_idx, is_token_in_rank, meta);
  CombineOutputs out{to_view(combined_x, "combined_x"),
                     to_optional_view(combined_topk_weights, "combined_topk_weights")};
  const StreamOrder order = order_from(stream, previous_event, async_finish);
  Event e;
  {
    py::gil_scoped_release release;
    e = buf.combine(in, h, out, order);
  }
  return wrap_event(std::move(e), buf.device());
}

}  // namespace

void bind_runtime(py::module_& m) {
  py::class_<DispatchCall>(m, "DispatchCall",
                           "A normal-mode dispatch between its phases: counts known, receive tensors not yet given.")
      .def_property_readonly("num_rows", &DispatchCall::num_rows, "rows every receive tensor must have")
      .def_property_readonly("num_recv_tokens_per_expert", &DispatchCall::num_recv_tokens_per_expert,
                             "received tokens per local expert, aligned (empty with num_worst_tokens)")
      .def_property_readonly("meta", &DispatchCall::meta,
                             "(num_recv_tokens, num_rows, max_chunks, chunk, num_tokens, num_experts) after run()")
      .def_property_readonly("ran", &DispatchCall::ran,
                             "True once the data phase was launched (by dispatch_prepare into the reserved "
                             "outputs, or by run())")
      .def("take_event", &DispatchCall::take_event,
           "The data phase's Event when async_finish (once; None afterwards and without async_finish)")
      .def("run", &DispatchCall::run, py::arg("recv_x"), py::arg("recv_x_scales"), py::arg("recv_topk_idx"),
           py::arg("recv_topk_weights"), py::arg("recv_src_idx"),
           "Moves the data; returns an Event when async_finish, else None. Each output is a tensor or the "
           "data_ptr() of a contiguous one of the expected shape.");

  py::class_<Runtime>(m, "Runtime",
                      "One rank's NCCL communicator (made from a unique id) and epcomm::Buffer. Collective.")
      .def(py::init<const py::bytes&, int, int, int, size_t, size_t, bool, int, int, int64_t, bool, uintptr_t>(),
           py::arg("unique_id"), py::arg("num_ranks"), py::arg("rank"), py::arg("device"), py::arg("num_nvl_bytes") = 0,
           py::arg("num_rdma_bytes") = 0, py::arg("low_latency_mode") = false, py::arg("max_tokens_per_rank") = 0,
           py::arg("max_experts_per_rank") = 0, py::arg("timeout_ms") = 0, py::arg("enable_shrink") = false,
           py::arg("comm_stream") = 0,
           "comm_stream: a cudaStream_t integer of `device` that outlives everything recorded on it "
           "(BufferOptions::comm_stream); 0 = the buffer makes and destroys its own")
      .def_property_readonly("rank", [](const Runtime& r) { return r.buffer().rank(); })
      .def_property_readonly("num_ranks", [](const Runtime& r) { return r.buffer().num_ranks(); })
      .def_property_readonly("device", [](const Runtime& r) { return r.buffer().device(); })
      .def_property_readonly("num_nodes", [](const Runtime& r) { return r.group().num_nodes(); })
      .def_property_readonly("ranks_per_node", [](const Runtime& r) { return r.group().ranks_per_node(); })
      .def_property_readonly("transport", [](const Runtime& r) { return r.group().transport(); })
      .def_property_readonly("max_tokens_per_rank", [](const Runtime& r) { return r.buffer().max_tokens_per_rank(); })
      .def_property_readonly("num_nvl_bytes", [](const Runtime& r) { return r.buffer().options().num_nvl_bytes; })
      .def_property_readonly(
          "comm_stream", [](const Runtime& r) { return reinterpret_cast<uintptr_t>(r.buffer().comm_stream()); },
          "the communication stream, as a cudaStream_t integer")
      .def_property_readonly("destroyed", &Runtime::destroyed)
      .def(
          "chunk_offset_stride", [](const Runtime& r, const Config& c) { return r.buffer().chunk_offset_stride(c); },
          py::arg("config"))
      .def("check_device_errors", [](const Runtime& r) { r.buffer().check_device_errors(); })
      .def(
          "reset", [](const Runtime& r) { r.buffer().reset(); }, py::call_guard<py::gil_scoped_release>(),
          "collective: clears the flags and call counters after a failed call (Buffer::reset)")
      .def(
          "local_buffer",
          [](const Runtime& r, bool rdma) {
            const auto [ptr, bytes] = r.buffer().local_buffer(rdma);
            return py::make_tuple(reinterpret_cast<uintptr_t>(ptr), bytes);
          },
          py::arg("rdma"),
          "(data pointer, bytes) of this rank's normal-mode region (rdma=False) or low-latency region (rdma=True)")
      .def("destroy", &Runtime::destroy)
      .def("get_dispatch_layout", &get_dispatch_layout, py::arg("topk_idx"), py::arg("num_experts"),
           py::arg("num_tokens_per_rank"), py::arg("num_tokens_per_rdma_rank"), py::arg("num_tokens_per_expert"),
           py::arg("is_token_in_rank"), py::arg("stream"), py::arg("previous_event"), py::arg("async_finish"))
      .def("dispatch_prepare", &dispatch_prepare, py::arg("x"), py::arg("x_scales"), py::arg("topk_idx"),
           py::arg("topk_weights"), py::arg("num_tokens_per_rank"), py::arg("is_token_in_rank"),
           py::arg("num_tokens_per_expert"), py::arg("expert_alignment"), py::arg("num_worst_tokens"),
           py::arg("config"), py::arg("rank_prefix_matrix"), py::arg("chunk_offset"), py::arg("stream"),
           py::arg("previous_event"), py::arg("async_finish"), py::arg("reserved") = py::none(),
           "Phase 1 of a dispatch (count exchange; the host waits for the counts unless num_worst_tokens). "
           "`reserved` = (recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, recv_src_idx, capacity): data "
           "pointers of contiguous tensors of `capacity` rows; when num_rows <= capacity the data phase runs "
           "into them at once (DispatchCall.ran), else the caller allocates num_rows rows and calls run().")
      .def("cached_dispatch", &cached_dispatch, py::arg("x"), py::arg("x_scales"), py::arg("rank_prefix_matrix"),
           py::arg("chunk_offset"), py::arg("recv_src_idx"), py::arg("is_token_in_rank"), py::arg("meta"),
           py::arg("recv_x"), py::arg("recv_x_scales"), py::arg("config"), py::arg("stream"), py::arg("previous_event"),
           py::arg("async_finish"))
      .def("combine", &combine, py::arg("x"), py::arg("topk_weights"), py::arg("bias0"), py::arg("bias1"),
           py::arg("rank_prefix_matrix"), py::arg("chunk_offset"), py::arg("recv_src_idx"), py::arg("is_token_in_rank"),
           py::arg("meta"), py::arg("combined_x"), py::arg("combined_topk_weights"), py::arg("config"),
           py::arg("stream"), py::arg("previous_event"), py::arg("async_finish"));
}

}  // namespace epcomm::python
