// Low-latency mode for Python (docs/contract.md §3.3): Runtime methods over epcomm::Buffer's LL entry points,
// the LowLatencyCall each dispatch / combine returns (its event, the LL buffer it used, and recv():
// the receive half a hook runs), raw-memory views handed to torch through DLPack
// (get_next_low_latency_combine_buffer, get_local_buffer_tensor), the LL size hint, and the C++
// reference FP8 cast (for the tests of the torch reference). No PyTorch here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "bindings.hpp"
#include "epcomm/buffer.hpp"
#include "epcomm/error.hpp"
#include "epcomm/reference.hpp"
#include "runtime.hpp"
#include "views.hpp"

namespace epcomm::python {
namespace {

// ---------------------------------------------------------------- DLPack (the v0 ABI of dlpack.h)
// Declared here so the module needs no dlpack header; the layout is the stable one every consumer
// (torch.utils.dlpack.from_dlpack among them) reads from a capsule named "dltensor".
struct DLDevice {
  int32_t device_type;
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor* self);
};
constexpr int32_t kDLCPU = 1;
constexpr int32_t kDLCUDA = 2;
constexpr uint8_t kDLUInt = 1;

// One byte view: [nbytes] uint8 over memory epcomm owns, holding a reference to `owner` (the
// Python Buffer) until the consumer's tensor is freed.
struct MemoryView {
  DLManagedTensor managed{};
  int64_t shape[1] = {0};
  int64_t strides[1] = {1};
  PyObject* owner = nullptr;
};

void release_memory_view(DLManagedTensor* m) {
  auto* view = static_cast<MemoryView*>(m->manager_ctx);
  // The consumer may free its tensor on any thread, with or without the GIL (autograd, a caching
  // allocator callback); after interpreter shutdown the reference is simply dropped.
  if (view->owner != nullptr && Py_IsInitialized()) {
    const PyGILState_STATE state = PyGILState_Ensure();
    Py_DECREF(view->owner);
    PyGILState_Release(state);
  }
  delete view;
}

void destroy_capsule(PyObject* capsule) {
  // A consumer renames the capsule "used_dltensor" and owns the tensor from then on; an unused one
  // still owns it here.
  if (!PyCapsule_IsValid(capsule, "dltensor")) return;
  auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
  if (m != nullptr && m->deleter != nullptr) m->deleter(m);
}

py::object wrap_memory(uintptr_t ptr, int64_t nbytes, int device, py::object owner) {
  if (nbytes < 0) throw ArgumentError("nbytes = " + std::to_string(nbytes) + " must be >= 0");
  if (ptr == 0 && nbytes > 0) throw ArgumentError("ptr: a null pointer for " + std::to_string(nbytes) + " bytes");
  auto* view = new MemoryView;
  view->shape[0] = nbytes;
  DLTensor& t = view->managed.dl_tensor;
  t.data = reinterpret_cast<void*>(ptr);
  t.device = DLDevice{device < 0 ? kDLCPU : kDLCUDA, device < 0 ? 0 : device};
  t.ndim = 1;
  t.dtype = DLDataType{kDLUInt, 8, 1};
  t.shape = view->shape;
  t.strides = view->strides;
  t.byte_offset = 0;
  view->managed.manager_ctx = view;
  view->managed.deleter = &release_memory_view;
  if (!owner.is_none()) view->owner = owner.inc_ref().ptr();
  PyObject* capsule = PyCapsule_New(&view->managed, "dltensor", &destroy_capsule);
  if (capsule == nullptr) {
    release_memory_view(&view->managed);
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::object>(capsule);
}

// ---------------------------------------------------------------- views of the outputs
// Outputs arrive as tensors, or (cheaper: the Python layer allocated them with exactly these
// shapes) as the data pointer of one; a pointer becomes a view of `shape` and `strides`.
TensorView output_view(py::handle obj, const char* arg, DType dtype, std::initializer_list<int64_t> shape,
                       std::initializer_list<int64_t> strides, int device) {
  if (!py::isinstance<py::int_>(obj)) return to_view(obj, arg);
  return spec_view(reinterpret_cast<void*>(obj.cast<uintptr_t>()), tensor_spec(dtype, shape, strides), device);
}

// ---------------------------------------------------------------- a call and its hook
// What a low-latency dispatch or combine launched, kept for the receive half a hook runs later
// (same views, same stream). Holds the Python Runtime, not the C++ Buffer: after destroy() the
// hook raises instead of keeping the memory alive.
class LowLatencyCall {
 public:
  bool is_dispatch = true;
  py::object runtime;
  LowLatencyDispatchInputs din;
  LowLatencyDispatchOutputs dout;
  LowLatencyCombineInputs cin;
  TensorView out;
  LowLatencyHandle handle;
  StreamOrder order;
  py::object event = py::none();
  bool pending = false;

  py::object recv() {
    const char* what = is_dispatch ? "low_latency_dispatch hook" : "low_latency_combine hook";
    if (!pending)
      throw RuntimeFailure(
          std::string(what) +
          ": nothing to receive (the call was made without return_recv_hook, or the hook already ran)");
    Buffer& buf = runtime.cast<const Runtime&>().buffer();
    Event e;
    {
      py::gil_scoped_release release;
      e = is_dispatch ? buf.low_latency_dispatch_recv(din, dout, handle, order)
                      : buf.low_latency_combine_recv(cin, handle, out, order);
    }
    pending = false;
    return wrap_event(std::move(e), buf.device());
  }
};

std::unique_ptr<LowLatencyCall> low_latency_dispatch(
    const py::object& self, py::handle x, py::handle topk_idx, int num_max_dispatch_tokens_per_rank, int num_experts,
    py::handle cumulative_local_expert_recv_stats, py::handle dispatch_wait_recv_cost_stats, bool use_fp8,
    bool round_scale, bool use_ue8m0, py::handle recv_x, py::handle recv_x_scales, py::handle recv_count,
    py::handle src_info, py::handle layout_range, py::handle stream, bool async_finish, bool return_recv_hook) {
  Buffer& buf = self.cast<const Runtime&>().buffer();
  auto call = std::make_unique<LowLatencyCall>();
  call->is_dispatch = true;
  call->runtime = self;
  LowLatencyDispatchInputs& in = call->din;
  in.x = to_view(x, "x");
  in.topk_idx = to_view(topk_idx, "topk_idx");
  in.num_max_dispatch_tokens_per_rank = num_max_dispatch_tokens_per_rank;
  in.num_experts = num_experts;
  in.use_fp8 = use_fp8;
  in.round_scale = round_scale;
  in.use_ue8m0 = use_ue8m0;
  in.cumulative_local_expert_recv_stats =
      to_optional_view(cumulative_local_expert_recv_stats, "cumulative_local_expert_recv_stats");
  in.dispatch_wait_recv_cost_stats = to_optional_view(dispatch_wait_recv_cost_stats, "dispatch_wait_recv_cost_stats");

  // Shapes of pointer outputs; the core checks them (and everything else) before it launches.
  const int R = buf.num_ranks(), dev = buf.device();
  const int64_t EL = num_experts > 0 ? num_experts / R : 0;
  const int64_t RT =
      static_cast<int64_t>(R) * (num_max_dispatch_tokens_per_rank > 0 ? num_max_dispatch_tokens_per_rank : 0);
  const int64_t H = in.x.ndim == 2 ? in.x.shape[1] : 0, G = H / 128, W = (G + 3) / 4;
  LowLatencyDispatchOutputs& out = call->dout;
  out.recv_x = output_view(recv_x, "recv_x", use_fp8 ? DType::kFP8E4M3 : DType::kBF16, {EL, RT, H}, {}, dev);
  if (!recv_x_scales.is_none())
    out.recv_x_scales =
        use_ue8m0 ? output_view(recv_x_scales, "recv_x_scales", DType::kI32, {EL, RT, W}, {W * RT, 1, RT}, dev)
                  : output_view(recv_x_scales, "recv_x_scales", DType::kF32, {EL, RT, G}, {G * RT, 1, RT}, dev);
  out.recv_count = output_view(recv_count, "recv_count", DType::kI32, {EL}, {}, dev);
  out.src_info = output_view(src_info, "src_info", DType::kI32, {EL, RT}, {}, dev);
  out.layout_range = output_view(layout_range, "layout_range", DType::kI64, {EL, R}, {}, dev);
  call->order = StreamOrder{to_stream(stream, "stream"), nullptr, async_finish};
  Event e;
  {
    py::gil_scoped_release release;
    e = buf.low_latency_dispatch(in, out, call->handle, return_recv_hook, call->order);
  }
  call->event = wrap_event(std::move(e), dev);
  call->pending = return_recv_hook;
  return call;
}

LowLatencyHandle handle_from(py::handle src_info, py::handle layout_range, int num_max_dispatch_tokens_per_rank,
                             int hidden, int num_experts, int buffer_index) {
  LowLatencyHandle h;
  h.src_info = to_view(src_info, "handle.src_info");
  h.layout_range = to_view(layout_range, "handle.layout_range");
  h.num_max_dispatch_tokens_per_rank = num_max_dispatch_tokens_per_rank;
  h.hidden = hidden;
  h.num_experts = num_experts;
  h.buffer_index = buffer_index;
  return h;
}

std::unique_ptr<LowLatencyCall> low_latency_combine(const py::object& self, py::handle x, py::handle topk_idx,
                                                    py::handle topk_weights, py::handle src_info,
                                                    py::handle layout_range, int num_max_dispatch_tokens_per_rank,
                                                    int hidden, int num_experts, int buffer_index, py::handle out,
                                                    py::handle combine_wait_recv_cost_stats, bool use_logfmt,
                                                    bool zero_copy, py::handle stream, bool async_finish,
                                                    bool return_recv_hook) {
  Buffer& buf = self.cast<const Runtime&>().buffer();
  auto call = std::make_unique<LowLatencyCall>();
  call->is_dispatch = false;
  call->runtime = self;
  LowLatencyCombineInputs& in = call->cin;
  in.x = to_view(x, "x");
  in.topk_idx = to_view(topk_idx, "topk_idx");
  in.topk_weights = to_view(topk_weights, "topk_weights");
  in.zero_copy = zero_copy;
  in.use_logfmt = use_logfmt;
  in.combine_wait_recv_cost_stats = to_optional_view(combine_wait_recv_cost_stats, "combine_wait_recv_cost_stats");
  call->handle =
      handle_from(src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts, buffer_index);
  const int dev = buf.device();
  const int64_t T = in.topk_idx.ndim == 2 ? in.topk_idx.shape[0] : 0;
  call->out = output_view(out, "out", DType::kBF16, {T, static_cast<int64_t>(hidden)}, {}, dev);
  call->order = StreamOrder{to_stream(stream, "stream"), nullptr, async_finish};
  Event e;
  {
    py::gil_scoped_release release;
    e = buf.low_latency_combine(in, call->handle, call->out, return_recv_hook, call->order);
  }
  call->event = wrap_event(std::move(e), dev);
  call->pending = return_recv_hook;
  return call;
}

py::tuple next_combine_buffer(const Runtime& rt, py::handle src_info, py::handle layout_range,
                              int num_max_dispatch_tokens_per_rank, int hidden, int num_experts, int buffer_index) {
  const LowLatencyHandle h =
      handle_from(src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts, buffer_index);
  const TensorView v = rt.buffer().get_next_low_latency_combine_buffer(h);
  py::list shape;
  for (int i = 0; i < v.ndim; ++i) shape.append(v.shape[i]);
  return py::make_tuple(reinterpret_cast<uintptr_t>(v.data), v.nbytes(), py::tuple(shape));
}

// The C++ reference cast of docs/contract.md §3.3 (ref::fp8_group_scale, ref::float_to_e4m3): `x` holds BF16
// bit patterns (little-endian uint16, rows of `hidden`); returns (e4m3 bytes [T, hidden], float32
// scale bytes [T, hidden/128]).
py::tuple reference_fp8_cast(const py::bytes& x, int hidden, bool round_scale) {
  const std::string raw = x;
  if (hidden <= 0 || hidden % 128 != 0)
    throw ArgumentError("hidden = " + std::to_string(hidden) + " must be a positive multiple of 128");
  if (raw.size() % (2 * static_cast<size_t>(hidden)) != 0)
    throw ArgumentError("x: " + std::to_string(raw.size()) + " bytes are not whole rows of " + std::to_string(hidden) +
                        " bf16 values");
  const size_t n = raw.size() / 2, groups = n / 128;
  std::vector<uint16_t> v(n);
  std::memcpy(v.data(), raw.data(), raw.size());
  std::string q(n, '\0');
  std::vector<float> scales(groups);
  for (size_t g = 0; g < groups; ++g) {
    float amax = 0.0f;
    for (size_t c = 0; c < 128; ++c) {
      const float f = ref::bf16_to_float(v[g * 128 + c]);
      amax = std::fmax(amax, std::fabs(f));
    }
    const float scale = ref::fp8_group_scale(amax, round_scale);
    scales[g] = scale;
    for (size_t c = 0; c < 128; ++c)
      q[g * 128 + c] = static_cast<char>(ref::float_to_e4m3(ref::bf16_to_float(v[g * 128 + c]) / scale));
  }
  return py::make_tuple(py::bytes(q), py::bytes(reinterpret_cast<const char*>(scales.data()), groups * sizeof(float)));
}

}  // namespace

void bind_low_latency(py::module_& m) {
  py::class_<LowLatencyCall>(m, "LowLatencyCall",
                             "A low-latency dispatch or combine after its launch: the event (async_finish), the LL "
                             "buffer it used, and recv(), the receive half a hook runs.")
      .def_property_readonly(
          "event", [](const LowLatencyCall& c) { return c.event; }, "an Event with async_finish, else None")
      .def_property_readonly(
          "buffer_index", [](const LowLatencyCall& c) { return c.handle.buffer_index; },
          "which of the two LL buffers the dispatch used (0 or 1)")
      .def_property_readonly(
          "recv_pending", [](const LowLatencyCall& c) { return c.pending; },
          "whether recv() is still to run (return_recv_hook)")
      .def("recv", &LowLatencyCall::recv,
           "Launches the receive half on the stream of the send half (once). Returns None (or an Event when "
           "async_finish was set).");

  auto runtime = py::reinterpret_borrow<py::class_<Runtime>>(m.attr("Runtime"));
  runtime
      .def("low_latency_dispatch", &low_latency_dispatch, py::arg("x"), py::arg("topk_idx"),
           py::arg("num_max_dispatch_tokens_per_rank"), py::arg("num_experts"),
           py::arg("cumulative_local_expert_recv_stats"), py::arg("dispatch_wait_recv_cost_stats"), py::arg("use_fp8"),
           py::arg("round_scale"), py::arg("use_ue8m0"), py::arg("recv_x"), py::arg("recv_x_scales"),
           py::arg("recv_count"), py::arg("src_info"), py::arg("layout_range"), py::arg("stream"),
           py::arg("async_finish"), py::arg("return_recv_hook"),
           "Launches a low-latency dispatch (the send half only with return_recv_hook). Outputs are tensors or "
           "data pointers of tensors of the shapes the core expects (recv_x_scales: [E/R, R*Tmax, S] with the token "
           "dimension contiguous per expert, DeepEP's strides).")
      .def("low_latency_combine", &low_latency_combine, py::arg("x"), py::arg("topk_idx"), py::arg("topk_weights"),
           py::arg("src_info"), py::arg("layout_range"), py::arg("num_max_dispatch_tokens_per_rank"), py::arg("hidden"),
           py::arg("num_experts"), py::arg("buffer_index"), py::arg("out"), py::arg("combine_wait_recv_cost_stats"),
           py::arg("use_logfmt"), py::arg("zero_copy"), py::arg("stream"), py::arg("async_finish"),
           py::arg("return_recv_hook"), "Launches a low-latency combine into `out` (a tensor or a data pointer).")
      .def("next_combine_buffer", &next_combine_buffer, py::arg("src_info"), py::arg("layout_range"),
           py::arg("num_max_dispatch_tokens_per_rank"), py::arg("hidden"), py::arg("num_experts"),
           py::arg("buffer_index"),
           "(data pointer, bytes, shape) of the [E/R, R*Tmax, hidden] bf16 buffer a zero_copy combine of the handle "
           "reads")
      .def(
          "clean_low_latency_buffer",
          [](const Runtime& rt, int tmax, int hidden, int num_experts, py::handle stream) {
            Buffer& buf = rt.buffer();
            const cudaStream_t s = to_stream(stream, "stream");
            py::gil_scoped_release release;  // collective: barriers with the other ranks
            buf.clean_low_latency_buffer(tmax, hidden, num_experts, s);
          },
          py::arg("num_max_dispatch_tokens_per_rank"), py::arg("hidden"), py::arg("num_experts"), py::arg("stream"))
      // Shrink mode's mask (this rank's view), changed and read on `stream`.
      .def(
          "low_latency_update_mask_buffer",
          [](const Runtime& rt, int rank_to_mask, bool mask, py::handle stream) {
            rt.buffer().low_latency_update_mask_buffer(rank_to_mask, mask, to_stream(stream, "stream"));
          },
          py::arg("rank_to_mask"), py::arg("mask"), py::arg("stream"))
      .def(
          "low_latency_query_mask_buffer",
          [](const Runtime& rt, py::handle mask_status, py::handle stream) {
            rt.buffer().low_latency_query_mask_buffer(to_view(mask_status, "mask_status"), to_stream(stream, "stream"));
          },
          py::arg("mask_status"), py::arg("stream"))
      .def(
          "low_latency_clean_mask_buffer",
          [](const Runtime& rt, py::handle stream) {
            rt.buffer().low_latency_clean_mask_buffer(to_stream(stream, "stream"));
          },
          py::arg("stream"))
      .def_property_readonly(
          "enable_shrink", [](const Runtime& rt) { return rt.buffer().options().enable_shrink; },
          "whether low-latency shrink mode is on");

  m.def(
      "low_latency_size_hint",
      [](int tmax, int hidden, int num_ranks, int num_experts) {
        return Buffer::low_latency_size_hint(tmax, hidden, num_ranks, num_experts);
      },
      py::arg("num_max_dispatch_tokens_per_rank"), py::arg("hidden"), py::arg("num_ranks"), py::arg("num_experts"),
      "Bytes of num_rdma_bytes low-latency mode needs inside a node (both buffers); raises ValueError for a shape "
      "it cannot run.");
  m.def(
      "low_latency_net_size_hint",
      [](int tmax, int hidden, int num_ranks, int num_experts) {
        return Buffer::low_latency_net_size_hint(tmax, hidden, num_ranks, num_experts);
      },
      py::arg("num_max_dispatch_tokens_per_rank"), py::arg("hidden"), py::arg("num_ranks"), py::arg("num_experts"),
      "Bytes of num_rdma_bytes low-latency mode needs when it reaches other nodes through the network.");
  m.def("wrap_memory", &wrap_memory, py::arg("ptr"), py::arg("nbytes"), py::arg("device"), py::arg("owner"),
        "A DLPack capsule of [nbytes] uint8 at `ptr` (device -1: host memory) that holds a reference to `owner` "
        "until the consumer frees it: torch.utils.dlpack.from_dlpack(capsule) is a tensor over epcomm's memory.");
  m.def("_reference_fp8_cast", &reference_fp8_cast, py::arg("x"), py::arg("hidden"), py::arg("round_scale"),
        "The C++ reference FP8 cast (for tests): bf16 bit patterns -> (e4m3 bytes, float32 scale bytes).");
}

}  // namespace epcomm::python
