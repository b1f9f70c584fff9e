#include "views.hpp"

#include <cuda_runtime_api.h>

#include <cstdint>
#include <unordered_map>

#include "epcomm/error.hpp"
#include "tensor_reader.h"

namespace epcomm::python {
namespace {

std::string type_name(py::handle obj) { return py::str(py::type::handle_of(obj).attr("__name__")); }

[[noreturn]] void cuda_failure(cudaError_t e, const char* what) {
  throw RuntimeFailure(std::string(what) + " failed: " + cudaGetErrorString(e));
}

// Elements of a shape or strides sequence, as int64.
int copy_dims(py::handle seq, std::array<int64_t, TensorView::kMaxDims>& out, const char* arg) {
  // The hot path: a tuple (torch.Size is one) of plain ints, read without pybind's accessors.
  if (PyTuple_Check(seq.ptr())) {
    const Py_ssize_t n = PyTuple_GET_SIZE(seq.ptr());
    bool plain = n <= TensorView::kMaxDims;
    for (Py_ssize_t i = 0; plain && i < n; ++i) {
      PyObject* item = PyTuple_GET_ITEM(seq.ptr(), i);
      int overflow = 0;
      const long long v = PyLong_CheckExact(item) ? PyLong_AsLongLongAndOverflow(item, &overflow) : 0;
      plain = PyLong_CheckExact(item) && overflow == 0 && !(v == -1 && PyErr_Occurred());
      out[i] = v;
    }
    if (plain) return static_cast<int>(n);
    PyErr_Clear();  // anything else takes the general path below, which raises as it always did
  }
  const py::sequence s = py::reinterpret_borrow<py::sequence>(seq);
  const size_t n = py::len(s);
  if (n > static_cast<size_t>(TensorView::kMaxDims))
    throw ArgumentError(std::string(arg) + ": " + std::to_string(n) + " dimensions; epcomm takes at most " +
                        std::to_string(TensorView::kMaxDims));
  for (size_t i = 0; i < n; ++i) out[i] = s[i].cast<int64_t>();
  return static_cast<int>(n);
}

// The attribute names to_view reads on every tensor of every call, made (and hashed) once.
struct TensorAttrs {
  py::str data_ptr{"data_ptr"}, dtype{"dtype"}, shape{"shape"}, stride{"stride"}, get_device{"get_device"};
};
const TensorAttrs& tensor_attrs() {
  static const TensorAttrs* names = new TensorAttrs;  // never freed: Python may be gone at exit
  return *names;
}

// obj.name, raising what pybind11's obj.attr(name) raises.
py::object attr(py::handle obj, const py::str& name) {
  PyObject* v = PyObject_GetAttr(obj.ptr(), name.ptr());
  if (v == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(v);
}

// obj.name(), raising what pybind11's obj.attr(name)() raises.
py::object call_method(py::handle obj, const py::str& name) {
  PyObject* v = PyObject_CallMethodNoArgs(obj.ptr(), name.ptr());
  if (v == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(v);
}

TensorView from_tuple(py::handle obj, const char* arg) {
  const py::tuple t = py::reinterpret_borrow<py::tuple>(obj);
  if (t.size() != 5)
    throw ArgumentError(std::string(arg) + ": a raw tensor tuple is (data_ptr, dtype, shape, strides, device); got " +
                        std::to_string(t.size()) + " items");
  TensorView v;
  v.data = reinterpret_cast<void*>(t[0].cast<uintptr_t>());
  v.dtype = dtype_from_object(t[1], arg);
  v.ndim = copy_dims(t[2], v.shape, arg);
  std::array<int64_t, TensorView::kMaxDims> strides{};
  const int nstrides = copy_dims(t[3], strides, arg);
  if (nstrides != v.ndim)
    throw ArgumentError(std::string(arg) + ": shape has " + std::to_string(v.ndim) + " dimensions but strides " +
                        std::to_string(nstrides));
  v.strides = strides;
  v.device = t[4].cast<int>();
  return v;
}

// Set by set_tensor_reader (epcomm/_alloc.py, when it uses epcomm._torch_ops); read with the GIL held.
EpcommReadTensor tensor_reader = nullptr;

// A torch.Tensor's facts through the reader; false where it declines (the Python path decides then).
bool read_with_reader(py::handle obj, TensorView& v) {
  EpcommTensorFacts f;
  if (tensor_reader == nullptr || tensor_reader(obj.ptr(), &f) != 1 || f.ndim > TensorView::kMaxDims || f.dtype < 0 ||
      f.dtype > static_cast<int>(DType::kBool))
    return false;
  v.data = f.data;
  v.dtype = static_cast<DType>(f.dtype);
  v.ndim = f.ndim;
  for (int i = 0; i < f.ndim; ++i) {
    v.shape[i] = f.shape[i];
    v.strides[i] = f.strides[i];
  }
  v.device = f.device;
  return true;
}

// The C function a capsule of _torch_ops holds (`name` checked), nullptr for None.
void* capsule_function(py::handle capsule, const char* name) {
  if (capsule.is_none()) return nullptr;
  void* fn = PyCapsule_GetPointer(capsule.ptr(), name);
  if (fn == nullptr) throw py::error_already_set();
  return fn;
}

EpcommAllocTensors tensor_allocator = nullptr;        // set with the reader; read with the GIL held
EpcommCurrentStream current_stream_reader = nullptr;  // likewise

}  // namespace

void set_tensor_reader(py::handle capsule) {
  tensor_reader = reinterpret_cast<EpcommReadTensor>(capsule_function(capsule, EPCOMM_TENSOR_READER_NAME));
}

bool tensor_reader_set() { return tensor_reader != nullptr; }

bool try_read_view(py::handle obj, TensorView& v) { return read_with_reader(obj, v); }

void set_tensor_allocator(py::handle capsule) {
  tensor_allocator = reinterpret_cast<EpcommAllocTensors>(capsule_function(capsule, EPCOMM_TENSOR_ALLOCATOR_NAME));
}

bool tensor_allocator_set() { return tensor_allocator != nullptr; }

py::tuple allocate_tensors(int device, const std::vector<EpcommTensorSpec>& specs, bool shared, void** data) {
  if (tensor_allocator == nullptr) throw RuntimeFailure("epcomm: no tensor allocator was set (_set_tensor_allocator)");
  PyObject* t = tensor_allocator(device, static_cast<int>(specs.size()), specs.data(), shared ? 1 : 0, data);
  if (t == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::tuple>(t);
}

void set_current_stream_reader(py::handle capsule) {
  current_stream_reader = reinterpret_cast<EpcommCurrentStream>(capsule_function(capsule, EPCOMM_CURRENT_STREAM_NAME));
}

bool torch_current_stream(int device, cudaStream_t* stream) {
  void* s = nullptr;
  if (current_stream_reader == nullptr || current_stream_reader(device, &s) != 1) return false;
  *stream = static_cast<cudaStream_t>(s);
  return true;
}

EpcommTensorSpec tensor_spec(DType dtype, std::initializer_list<int64_t> shape,
                             std::initializer_list<int64_t> strides) {
  EpcommTensorSpec s{};
  s.dtype = static_cast<int>(dtype);
  s.ndim = static_cast<int>(shape.size());
  s.strided = strides.size() != 0 ? 1 : 0;
  int i = 0;
  for (int64_t v : shape) s.shape[i++] = v;
  i = 0;
  for (int64_t v : strides) s.strides[i++] = v;
  return s;
}

TensorView spec_view(void* data, const EpcommTensorSpec& s, int device) {
  TensorView v;
  v.data = data;
  v.dtype = static_cast<DType>(s.dtype);
  v.ndim = s.ndim;
  int64_t acc = 1;
  for (int i = s.ndim - 1; i >= 0; --i) {
    v.shape[i] = s.shape[i];
    v.strides[i] = s.strided ? s.strides[i] : acc;
    acc *= s.shape[i] > 0 ? s.shape[i] : 1;
  }
  v.device = device;
  return v;
}

DType dtype_from_name(const std::string& full, const char* arg) {
  std::string name = full;
  if (name.rfind("torch.", 0) == 0) name = name.substr(6);
  static const std::pair<const char*, DType> table[] = {{"bfloat16", DType::kBF16}, {"float8_e4m3fn", DType::kFP8E4M3},
                                                        {"float32", DType::kF32},   {"float", DType::kF32},
                                                        {"int32", DType::kI32},     {"int", DType::kI32},
                                                        {"int64", DType::kI64},     {"long", DType::kI64},
                                                        {"bool", DType::kBool}};
  for (const auto& [n, d] : table)
    if (name == n) return d;
  throw ArgumentError(std::string(arg) + ": dtype " + full +
                      " is not one epcomm moves (bfloat16, float8_e4m3fn, float32, int32, int64, bool)");
}

DType dtype_from_object(py::handle dtype, const char* arg) {
  if (py::isinstance<py::str>(dtype)) return dtype_from_name(dtype.cast<std::string>(), arg);
  // torch.dtype objects are singletons: remember each one's answer so the hot path skips str().
  static std::unordered_map<PyObject*, DType> cache;
  const auto it = cache.find(dtype.ptr());
  if (it != cache.end()) return it->second;
  const DType d = dtype_from_name(py::str(dtype).cast<std::string>(), arg);
  cache.emplace(dtype.inc_ref().ptr(), d);  // the reference keeps the key alive
  return d;
}

TensorView to_view(py::handle obj, const char* arg) {
  if (obj.is_none()) throw ArgumentError(std::string(arg) + ": a tensor is required, got None");
  if (py::isinstance<py::tuple>(obj)) return from_tuple(obj, arg);
  TensorView v;
  if (read_with_reader(obj, v)) return v;
  const TensorAttrs& names = tensor_attrs();
  PyObject* data_ptr = PyObject_GetAttr(obj.ptr(), names.data_ptr.ptr());
  if (data_ptr == nullptr) PyErr_Clear();  // as py::getattr(obj, name, default) does
  if (data_ptr == nullptr || data_ptr == Py_None) {
    Py_XDECREF(data_ptr);
    throw ArgumentError(std::string(arg) + ": expected a tensor, got " + type_name(obj));
  }
  const py::object data_ptr_method = py::reinterpret_steal<py::object>(data_ptr);
  v.data = reinterpret_cast<void*>(data_ptr_method().cast<uintptr_t>());
  v.dtype = dtype_from_object(attr(obj, names.dtype), arg);
  v.ndim = copy_dims(attr(obj, names.shape), v.shape, arg);
  const int nstrides = copy_dims(call_method(obj, names.stride), v.strides, arg);
  if (nstrides != v.ndim) throw ArgumentError(std::string(arg) + ": stride() and shape disagree in length");
  v.device = call_method(obj, names.get_device).cast<int>();
  return v;
}

std::optional<TensorView> to_optional_view(py::handle obj, const char* arg) {
  if (obj.is_none()) return std::nullopt;
  return to_view(obj, arg);
}

cudaStream_t to_stream(py::handle obj, const char* arg) {
  if (obj.is_none()) return nullptr;
  if (!py::isinstance<py::int_>(obj))
    throw ArgumentError(std::string(arg) + ": a stream is passed as an integer (cudaStream_t), got " + type_name(obj));
  return reinterpret_cast<cudaStream_t>(obj.cast<uintptr_t>());
}

cudaEvent_t to_event(py::handle obj, const char* arg) {
  if (obj.is_none()) return nullptr;
  if (py::isinstance<PyEvent>(obj)) return obj.cast<const PyEvent&>().get();
  if (py::isinstance<py::int_>(obj)) return reinterpret_cast<cudaEvent_t>(obj.cast<uintptr_t>());
  throw ArgumentError(std::string(arg) + ": expected an epcomm event or a cudaEvent_t integer, got " + type_name(obj));
}

PyEvent::PyEvent(Event&& event, int device) : event_(std::make_shared<Event>(std::move(event))), device_(device) {}

PyEvent PyEvent::record(cudaStream_t stream, int device) {
  int previous = 0;
  cudaError_t e = cudaGetDevice(&previous);
  if (e != cudaSuccess) cuda_failure(e, "cudaGetDevice");
  if (device < 0) device = previous;
  // The event must belong to the stream's device; put the caller's device back afterwards.
  if (device != previous && (e = cudaSetDevice(device)) != cudaSuccess) cuda_failure(e, "cudaSetDevice");
  cudaEvent_t raw = nullptr;
  e = cudaEventCreateWithFlags(&raw, cudaEventDisableTiming);
  if (e == cudaSuccess) {
    e = cudaEventRecord(raw, stream);
    if (e != cudaSuccess) cudaEventDestroy(raw);
  }
  if (device != previous) cudaSetDevice(previous);
  if (e != cudaSuccess) cuda_failure(e, "recording an event (cudaEventCreate/cudaEventRecord)");
  return PyEvent(Event(raw), device);
}

void PyEvent::wait(cudaStream_t stream) const { event_->wait_on(stream); }
void PyEvent::synchronize() const { event_->synchronize(); }
bool PyEvent::query() const {
  const cudaError_t e = cudaEventQuery(event_->get());
  if (e == cudaSuccess) return true;
  if (e == cudaErrorNotReady) return false;
  cuda_failure(e, "cudaEventQuery");
}

py::object wrap_event(Event&& event, int device) {
  if (!event.valid()) return py::none();
  return py::cast(PyEvent(std::move(event), device));
}

}  // namespace epcomm::python
