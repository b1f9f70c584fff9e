// The eager low-latency calls from Python (no async_finish, no hook: the decode path without CUDA
// graphs) in one C call each: the arguments read, the outputs made through _torch_ops's allocator,
// the kernels launched on PyTorch's current stream, and the whole return tuple built, with no
// LowLatencyCall, event or Python-side handle assembly (BENCHMARKS runs 80-86).
//
// Two ways in:
// - `_low_latency_fast_calls(runtime, handle_type, overlap_type, raw_stream)` returns two plain C
//   functions (METH_FASTCALL, no pybind11 argument machinery) bound to one Buffer's runtime, which
//   epcomm.Buffer calls first from low_latency_dispatch / low_latency_combine with every argument
//   in its signature's order: they return the call's result tuple, or None having done nothing.
// - `Runtime.low_latency_dispatch_eager` / `low_latency_combine_eager` (pybind11): the same work
//   with the stream passed in, returning the outputs' parts (session 15's path, kept for the
//   benchmarks' comparison in one process).
// Either declines (None) anything it does not take as it comes: no allocator, async_finish or a
// hook, a destroyed buffer, an argument not of the exact type the fast path reads, a tensor the
// reader declines. The Python layer then makes the call its usual way, which accepts or rejects it
// as before. What the core checks it checks here too, with the same errors.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "bindings.hpp"
#include "epcomm/buffer.hpp"
#include "epcomm/error.hpp"
#include "runtime.hpp"
#include "views.hpp"

namespace epcomm::python {
namespace {

// An exact int (not bool) >= lo that fits an int.
bool exact_int(PyObject* obj, int lo, int* out) {
  if (!PyLong_CheckExact(obj)) return false;
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
  if (overflow != 0 || v < lo || v > INT32_MAX) return false;
  *out = static_cast<int>(v);
  return true;
}

bool exact_bool(PyObject* obj, bool* out) {
  if (obj != Py_True && obj != Py_False) return false;
  *out = obj == Py_True;
  return true;
}

// A readable tensor of `ndim` dimensions into `v` (none: an absent optional one, if allowed).
bool eager_view(PyObject* obj, int ndim, TensorView& v) { return try_read_view(obj, v) && v.ndim == ndim; }
bool eager_optional(PyObject* obj, int ndim, std::optional<TensorView>& v) {
  if (obj == Py_None) return true;
  TensorView t;
  if (!eager_view(obj, ndim, t)) return false;
  v = t;
  return true;
}

// ---------------------------------------------------------------- dispatch
// false: declined. Arguments in Buffer.low_latency_dispatch's order, from x to use_ue8m0.
bool read_dispatch(PyObject* const* a, LowLatencyDispatchInputs& in) {
  bool use_fp8 = false, round_scale = false, use_ue8m0 = false;
  if (!tensor_allocator_set() || !exact_int(a[2], 1, &in.num_max_dispatch_tokens_per_rank) ||
      !exact_int(a[3], 1, &in.num_experts) || !exact_bool(a[6], &use_fp8) || !exact_bool(a[7], &round_scale) ||
      !exact_bool(a[8], &use_ue8m0) || !eager_view(a[0], 2, in.x) || !eager_view(a[1], 2, in.topk_idx) ||
      !eager_optional(a[4], 1, in.cumulative_local_expert_recv_stats) ||
      !eager_optional(a[5], 1, in.dispatch_wait_recv_cost_stats) || in.x.shape[1] > INT32_MAX)
    return false;
  in.use_fp8 = use_fp8;
  in.round_scale = round_scale;
  in.use_ue8m0 = use_ue8m0;
  return true;
}

struct DispatchMade {
  py::object recv;        // (recv_x, scales) or recv_x
  py::object recv_count;  // [E/R] int32
  py::object src_info, layout_range;
  int64_t hidden = 0;
  int buffer_index = 0;
};

DispatchMade run_dispatch(Buffer& buf, const LowLatencyDispatchInputs& in, cudaStream_t stream) {
  const int R = buf.num_ranks(), dev = buf.device(), tmax = in.num_max_dispatch_tokens_per_rank;
  const int64_t H = in.x.shape[1];
  // The shape first (a bad Tmax raises instead of allocating for it), as the Python layer does.
  Buffer::low_latency_size_hint(tmax, static_cast<int>(H), R, in.num_experts);
  const int64_t EL = in.num_experts / R, RT = static_cast<int64_t>(R) * tmax, G = H / 128, W = (G + 3) / 4;
  const bool fp8 = in.use_fp8;
  // Two allocations, as the Python layer makes them: the rows with their scales (DeepEP's strides,
  // tokens contiguous per expert), and the counts with the handle's tensors.
  std::vector<EpcommTensorSpec> rows{tensor_spec(fp8 ? DType::kFP8E4M3 : DType::kBF16, {EL, RT, H})};
  if (fp8)
    rows.push_back(in.use_ue8m0 ? tensor_spec(DType::kI32, {EL, RT, W}, {W * RT, 1, RT})
                                : tensor_spec(DType::kF32, {EL, RT, G}, {G * RT, 1, RT}));
  const std::vector<EpcommTensorSpec> small{tensor_spec(DType::kI32, {EL}), tensor_spec(DType::kI32, {EL, RT}),
                                            tensor_spec(DType::kI64, {EL, R})};
  void* row_data[2] = {};
  void* small_data[3] = {};
  const py::tuple row_tensors = allocate_tensors(dev, rows, true, row_data);
  const py::tuple small_tensors = allocate_tensors(dev, small, true, small_data);
  LowLatencyDispatchOutputs out;
  out.recv_x = spec_view(row_data[0], rows[0], dev);
  if (fp8) out.recv_x_scales = spec_view(row_data[1], rows[1], dev);
  out.recv_count = spec_view(small_data[0], small[0], dev);
  out.src_info = spec_view(small_data[1], small[1], dev);
  out.layout_range = spec_view(small_data[2], small[2], dev);
  LowLatencyHandle h;
  {
    py::gil_scoped_release release;
    buf.low_latency_dispatch(in, out, h, false, StreamOrder{stream, nullptr, false});  // no event
  }
  DispatchMade m;
  m.recv = fp8 ? py::object(row_tensors) : py::object(row_tensors[0]);
  m.recv_count = small_tensors[0];
  m.src_info = small_tensors[1];
  m.layout_range = small_tensors[2];
  m.hidden = H;
  m.buffer_index = h.buffer_index;
  return m;
}

// The handle's six fields in LowLatencyHandle's order.
py::tuple handle_fields(const DispatchMade& m, const LowLatencyDispatchInputs& in) {
  return py::make_tuple(m.src_info, m.layout_range, in.num_max_dispatch_tokens_per_rank, m.hidden, in.num_experts,
                        m.buffer_index);
}

// ---------------------------------------------------------------- combine
struct CombineArgs {
  LowLatencyCombineInputs in;
  LowLatencyHandle h;
  TensorView out;
  bool has_out = false;
};

// false: declined. x, topk_idx, topk_weights, handle, use_logfmt, zero_copy, out, wait_stats.
bool read_combine(PyObject* x, PyObject* topk_idx, PyObject* topk_weights, PyObject* handle, PyObject* use_logfmt_obj,
                  PyObject* zero_copy_obj, PyObject* out_obj, PyObject* wait_stats, CombineArgs& c) {
  LowLatencyCombineInputs& in = c.in;
  LowLatencyHandle& h = c.h;
  bool use_logfmt = false, zero_copy = false;
  // The handle as low_latency_dispatch returned it: a tuple (LowLatencyHandle is one) of six.
  if (!tensor_allocator_set() || !PyTuple_Check(handle) || PyTuple_GET_SIZE(handle) != 6 ||
      !eager_view(PyTuple_GET_ITEM(handle, 0), 2, h.src_info) ||
      !eager_view(PyTuple_GET_ITEM(handle, 1), 2, h.layout_range) ||
      !exact_int(PyTuple_GET_ITEM(handle, 2), 1, &h.num_max_dispatch_tokens_per_rank) ||
      !exact_int(PyTuple_GET_ITEM(handle, 3), 1, &h.hidden) ||
      !exact_int(PyTuple_GET_ITEM(handle, 4), 1, &h.num_experts) ||
      !exact_int(PyTuple_GET_ITEM(handle, 5), 0, &h.buffer_index) || !exact_bool(use_logfmt_obj, &use_logfmt) ||
      !exact_bool(zero_copy_obj, &zero_copy) || !eager_view(x, 3, in.x) || !eager_view(topk_idx, 2, in.topk_idx) ||
      !eager_view(topk_weights, 2, in.topk_weights) || !eager_optional(wait_stats, 1, in.combine_wait_recv_cost_stats))
    return false;
  c.has_out = out_obj != Py_None;
  if (c.has_out && !eager_view(out_obj, 2, c.out)) return false;
  in.use_logfmt = use_logfmt;
  in.zero_copy = zero_copy;
  return true;
}

// combined_x: `out_obj` itself when given.
py::object run_combine(Buffer& buf, CombineArgs& c, PyObject* out_obj, cudaStream_t stream) {
  const int dev = buf.device();
  Buffer::low_latency_size_hint(c.h.num_max_dispatch_tokens_per_rank, c.h.hidden, buf.num_ranks(), c.h.num_experts);
  py::object result = py::reinterpret_borrow<py::object>(out_obj);
  if (!c.has_out) {
    const std::vector<EpcommTensorSpec> spec{tensor_spec(DType::kBF16, {c.in.topk_idx.shape[0], c.h.hidden})};
    void* data = nullptr;
    result = allocate_tensors(dev, spec, false, &data)[0];
    c.out = spec_view(data, spec[0], dev);
  }
  {
    py::gil_scoped_release release;
    buf.low_latency_combine(c.in, c.h, c.out, false, StreamOrder{stream, nullptr, false});
  }
  return result;
}

// ---------------------------------------------------------------- the fast calls
// A fast call's state (its `self`): (runtime, LowLatencyHandle, EventOverlap, raw_stream), where
// raw_stream() returns the current stream of the buffer's device when _torch_ops cannot.
enum { kStateRuntime, kStateHandleType, kStateOverlapType, kStateRawStream, kStateSize };

// The runtime of `state`, or nullptr once destroyed (the Python layer then raises its error).
Buffer* state_buffer(PyObject* state) {
  const Runtime& rt = py::handle(PyTuple_GET_ITEM(state, kStateRuntime)).cast<const Runtime&>();
  return rt.destroyed() ? nullptr : &rt.buffer();
}

// PyTorch's current stream of `device`: through _torch_ops where it can, else raw_stream().
cudaStream_t current_stream(PyObject* state, int device) {
  cudaStream_t s = nullptr;
  if (torch_current_stream(device, &s)) return s;
  PyObject* r = PyObject_CallNoArgs(PyTuple_GET_ITEM(state, kStateRawStream));
  if (r == nullptr) throw py::error_already_set();
  const py::object owned = py::reinterpret_steal<py::object>(r);
  return to_stream(owned, "the current stream");
}

// An instance of the tuple subclass `type` (a namedtuple) holding `items`, as tuple.__new__(type,
// items) makes it, without the namedtuple's Python __new__.
py::object new_tuple_of(PyObject* type, const py::tuple& items) {
  const py::tuple args = py::make_tuple(items);
  PyObject* t = PyTuple_Type.tp_new(reinterpret_cast<PyTypeObject*>(type), args.ptr(), nullptr);
  if (t == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(t);
}

py::object new_overlap(PyObject* state) {
  PyObject* o = PyObject_CallNoArgs(PyTuple_GET_ITEM(state, kStateOverlapType));
  if (o == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(o);
}

// What both fast calls share: `want` arguments, async_finish and return_recv_hook at
// args[flags_at] and args[flags_at + 1] (None, declined, unless both are False), and C++ errors
// raised as the Python ones the module's translators give. `body` returns a new reference.
template <class Body>
PyObject* fast_call(const char* name, PyObject* const* args, Py_ssize_t nargs, Py_ssize_t want, int flags_at,
                    Body&& body) {
  if (nargs != want) {
    PyErr_Format(PyExc_TypeError, "epcomm._epcomm.%s takes %zd arguments (%zd given)", name, want, nargs);
    return nullptr;
  }
  if (args[flags_at] != Py_False || args[flags_at + 1] != Py_False) Py_RETURN_NONE;
  try {
    return body();
  } catch (...) {
    set_python_error();
    return nullptr;
  }
}

// (x, topk_idx, Tmax, num_experts, cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats,
// use_fp8, round_scale, use_ue8m0, async_finish, return_recv_hook) -> (recv_x, recv_count, handle,
// EventOverlap(), None) or None.
PyObject* fast_dispatch(PyObject* state, PyObject* const* args, Py_ssize_t nargs) {
  return fast_call("low_latency_dispatch fast call", args, nargs, 11, 9, [&]() -> PyObject* {
    LowLatencyDispatchInputs d;
    Buffer* buf = state_buffer(state);
    if (buf == nullptr || !read_dispatch(args, d)) return py::none().release().ptr();
    const DispatchMade m = run_dispatch(*buf, d, current_stream(state, buf->device()));
    const py::object handle = new_tuple_of(PyTuple_GET_ITEM(state, kStateHandleType), handle_fields(m, d));
    return py::make_tuple(m.recv, m.recv_count, handle, new_overlap(state), py::none()).release().ptr();
  });
}

// (x, topk_idx, topk_weights, handle, use_logfmt, zero_copy, async_finish, return_recv_hook, out,
// combine_wait_recv_cost_stats) -> (combined_x, EventOverlap(), None) or None.
PyObject* fast_combine(PyObject* state, PyObject* const* args, Py_ssize_t nargs) {
  return fast_call("low_latency_combine fast call", args, nargs, 10, 6, [&]() -> PyObject* {
    CombineArgs c;
    Buffer* buf = state_buffer(state);
    if (buf == nullptr || !read_combine(args[0], args[1], args[2], args[3], args[4], args[5], args[8], args[9], c))
      return py::none().release().ptr();
    const py::object y = run_combine(*buf, c, args[8], current_stream(state, buf->device()));
    return py::make_tuple(y, new_overlap(state), py::none()).release().ptr();
  });
}

// A METH_FASTCALL function as PyMethodDef holds it (through void(*)(): no cast-function-type warning).
PyCFunction fastcall(PyObject* (*fn)(PyObject*, PyObject* const*, Py_ssize_t)) {
  return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fn));
}

PyMethodDef fast_dispatch_def = {"low_latency_dispatch_fast", fastcall(fast_dispatch), METH_FASTCALL,
                                 "Buffer.low_latency_dispatch's arguments in order -> its result, or None (declined)."};
PyMethodDef fast_combine_def = {"low_latency_combine_fast", fastcall(fast_combine), METH_FASTCALL,
                                "Buffer.low_latency_combine's arguments in order -> its result, or None (declined)."};

py::object fast_calls(py::handle runtime, py::handle handle_type, py::handle overlap_type, py::handle raw_stream) {
  if (!py::isinstance<Runtime>(runtime)) return py::none();  // a stand-in of the CPU tests
  if (!PyType_Check(handle_type.ptr()) ||
      !PyType_IsSubtype(reinterpret_cast<PyTypeObject*>(handle_type.ptr()), &PyTuple_Type))
    throw ArgumentError("handle_type: a tuple subclass (LowLatencyHandle) is required");
  if (!PyCallable_Check(overlap_type.ptr()) || !PyCallable_Check(raw_stream.ptr()))
    throw ArgumentError("overlap_type, raw_stream: callables are required");
  const py::tuple state = py::make_tuple(runtime, handle_type, overlap_type, raw_stream);
  static_assert(kStateSize == 4, "the state tuple above");
  PyObject* d = PyCFunction_New(&fast_dispatch_def, state.ptr());
  if (d == nullptr) throw py::error_already_set();
  const py::object dispatch = py::reinterpret_steal<py::object>(d);
  PyObject* c = PyCFunction_New(&fast_combine_def, state.ptr());
  if (c == nullptr) throw py::error_already_set();
  return py::make_tuple(dispatch, py::reinterpret_steal<py::object>(c));
}

// ---------------------------------------------------------------- the pybind11 methods
// -> ((recv_x, scales) or recv_x, recv_count, (src_info, layout_range, Tmax, hidden, num_experts,
// buffer_index)), or None.
py::object dispatch_eager(const Runtime& rt, py::handle x, py::handle topk_idx, py::handle tmax, py::handle experts,
                          py::handle cum_stats, py::handle wait_stats, py::handle use_fp8, py::handle round_scale,
                          py::handle use_ue8m0, py::handle stream) {
  PyObject* const args[9] = {x.ptr(),          topk_idx.ptr(), tmax.ptr(),        experts.ptr(),  cum_stats.ptr(),
                             wait_stats.ptr(), use_fp8.ptr(),  round_scale.ptr(), use_ue8m0.ptr()};
  LowLatencyDispatchInputs d;
  if (!py::isinstance<py::int_>(stream) || !read_dispatch(args, d)) return py::none();
  const DispatchMade m = run_dispatch(rt.buffer(), d, to_stream(stream, "stream"));
  return py::make_tuple(m.recv, m.recv_count, handle_fields(m, d));
}

// -> combined_x ([T, hidden] bf16: `out` itself when given), or None.
py::object combine_eager(const Runtime& rt, py::handle x, py::handle topk_idx, py::handle topk_weights,
                         py::handle handle, py::handle use_logfmt, py::handle zero_copy, py::handle out,
                         py::handle wait_stats, py::handle stream) {
  CombineArgs c;
  if (!py::isinstance<py::int_>(stream) ||
      !read_combine(x.ptr(), topk_idx.ptr(), topk_weights.ptr(), handle.ptr(), use_logfmt.ptr(), zero_copy.ptr(),
                    out.ptr(), wait_stats.ptr(), c))
    return py::none();
  return run_combine(rt.buffer(), c, out.ptr(), to_stream(stream, "stream"));
}

}  // namespace

void bind_eager(py::module_& m) {
  auto runtime = py::reinterpret_borrow<py::class_<Runtime>>(m.attr("Runtime"));
  runtime
      .def("low_latency_dispatch_eager", &dispatch_eager, py::arg("x"), py::arg("topk_idx"),
           py::arg("num_max_dispatch_tokens_per_rank"), py::arg("num_experts"),
           py::arg("cumulative_local_expert_recv_stats"), py::arg("dispatch_wait_recv_cost_stats"), py::arg("use_fp8"),
           py::arg("round_scale"), py::arg("use_ue8m0"), py::arg("stream"),
           "The eager dispatch in one call (no async_finish, no hook), its outputs made through _torch_ops: "
           "((recv_x, scales) or recv_x, recv_count, (src_info, layout_range, Tmax, hidden, num_experts, "
           "buffer_index)), or None when it does not take these arguments as they come (then nothing was done).")
      .def("low_latency_combine_eager", &combine_eager, py::arg("x"), py::arg("topk_idx"), py::arg("topk_weights"),
           py::arg("handle"), py::arg("use_logfmt"), py::arg("zero_copy"), py::arg("out"),
           py::arg("combine_wait_recv_cost_stats"), py::arg("stream"),
           "The eager combine in one call: combined_x (`out` when given), or None when it does not take these "
           "arguments as they come (then nothing was done).");
  m.def("_low_latency_fast_calls", &fast_calls, py::arg("runtime"), py::arg("handle_type"), py::arg("overlap_type"),
        py::arg("raw_stream"),
        "(dispatch, combine), or None where `runtime` is not a Runtime: C functions over `runtime` taking "
        "Buffer.low_latency_dispatch's / "
        "low_latency_combine's arguments in order (self left out) and returning the call's result tuple, or None "
        "having done nothing when they do not take the arguments as they come (async_finish, a hook, other types).");
  m.def("_set_current_stream_reader", &set_current_stream_reader, py::arg("capsule"),
        "Hands over _torch_ops.current_stream (None: none): PyTorch's current stream read in C++.");
}

}  // namespace epcomm::python
