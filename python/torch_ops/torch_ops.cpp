// epcomm._torch_ops: the Python layer's output tensors made in C++ (at::empty), several per call.
//
// Why: from Python every torch.empty goes through the argument parser, the dispatcher and a fresh
// Python object, ~6 us each on the GPU hosts (BENCHMARKS run 51), and a low-latency dispatch returns
// five fresh tensors: over half of its host time. From C++ the same allocations cost what the
// caching allocator does (~3 us each, run 80), and `shared` makes several in one allocator call.
// epcomm._epcomm builds without PyTorch; this optional module is built only where PyTorch's headers
// and libraries are found at configure time (python/CMakeLists.txt), checked against the PyTorch
// imported at run time (epcomm/_alloc.py), and epcomm works the same without it.
//
// empty(device, specs, shared=False): `device` is a CUDA device index (-1: the CPU, for the tests
// of the Python layer over its host stand-in); `specs` a tuple whose items are None (-> None) or
// (dtype, shape) / (dtype, shape, strides), dtype a torch.dtype, shape and strides tuples of ints.
// Returns a tuple of tensors (or None) in the same order, on the current stream of `device` as
// torch.empty would be (the caching allocator reads it). With `shared`, one allocation holds them
// all (each at a 256-byte aligned offset): one allocator call instead of one each, for outputs that
// live and die together. first_rows(tensors, rows): below. tensor_reader: a capsule through which
// epcomm._epcomm reads a tensor's pointer, dtype, shape, strides and device in C++
// (python/src/tensor_reader.h). tensor_allocator: a capsule through which it makes the eager
// low-latency calls' outputs (the same tensors empty() makes). current_stream (only where PyTorch
// has CUDA): a capsule through which it reads PyTorch's current stream of a device.
//
// Plain CPython API over PyTorch's own headers: no pybind11 here, so nothing mixes Debian's pybind11
// with the copy PyTorch ships.
#include <Python.h>

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <c10/core/ScalarType.h>
#include <c10/core/TensorImpl.h>
#include <c10/core/TensorOptions.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <string>
#include <utility>
#include <vector>

#ifdef EPCOMM_TORCH_CUDA
// PyTorch built with CUDA: its CUDA tensor factory without the dispatcher, and the current stream.
#include <ATen/cuda/EmptyTensor.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "tensor_reader.h"

#ifdef EPCOMM_TORCH_CUDA
#define EPCOMM_TORCH_CUDA_ON 1
#else
#define EPCOMM_TORCH_CUDA_ON 0
#endif

namespace {

constexpr int kMaxDims = 8;

// A tuple of ints -> `out` (at most kMaxDims); false with a Python error set otherwise.
bool read_dims(PyObject* seq, const char* what, Py_ssize_t item, int64_t* out, int* n) {
  if (!PyTuple_Check(seq)) {
    PyErr_Format(PyExc_TypeError, "epcomm._torch_ops.empty: specs[%zd] %s must be a tuple of ints", item, what);
    return false;
  }
  const Py_ssize_t size = PyTuple_GET_SIZE(seq);
  if (size > kMaxDims) {
    PyErr_Format(PyExc_ValueError, "epcomm._torch_ops.empty: specs[%zd] %s has %zd dimensions (at most %d)", item, what,
                 size, kMaxDims);
    return false;
  }
  for (Py_ssize_t i = 0; i < size; ++i) {
    const long long v = PyLong_AsLongLong(PyTuple_GET_ITEM(seq, i));
    if (v == -1 && PyErr_Occurred()) return false;
    if (v < 0) {
      PyErr_Format(PyExc_ValueError, "epcomm._torch_ops.empty: specs[%zd] %s[%zd] = %lld is negative", item, what, i,
                   v);
      return false;
    }
    out[i] = v;
  }
  *n = static_cast<int>(size);
  return true;
}

// One spec, read: dtype, shape and strides (row-major when not given).
struct Spec {
  bool none = true;
  c10::ScalarType dtype = c10::ScalarType::Byte;
  int ndim = 0;
  bool strided = false;
  int64_t shape[kMaxDims] = {}, strides[kMaxDims] = {};

  // Strides of a dense row-major tensor of `shape` (as at::empty's: a size 0 counts as 1).
  void set_row_major() {
    int64_t acc = 1;
    for (int i = ndim - 1; i >= 0; --i) {
      strides[i] = acc;
      acc *= shape[i] > 0 ? shape[i] : 1;
    }
  }

  // Bytes of storage the tensor spans (0 for an empty one).
  int64_t nbytes() const {
    int64_t last = 0;  // the largest element offset
    for (int i = 0; i < ndim; ++i) {
      if (shape[i] == 0) return 0;
      last += (shape[i] - 1) * strides[i];
    }
    return (last + 1) * static_cast<int64_t>(c10::elementSize(dtype));
  }
};

// false with a Python error set.
bool read_spec(PyObject* obj, Py_ssize_t item, Spec* spec) {
  if (obj == Py_None) return true;
  const Py_ssize_t size = PyTuple_Check(obj) ? PyTuple_GET_SIZE(obj) : 0;
  if (size != 2 && size != 3) {
    PyErr_Format(PyExc_TypeError,
                 "epcomm._torch_ops.empty: specs[%zd] must be None or (dtype, shape) or (dtype, shape, strides)", item);
    return false;
  }
  PyObject* dtype = PyTuple_GET_ITEM(obj, 0);
  if (!THPDtype_Check(dtype)) {
    PyErr_Format(PyExc_TypeError, "epcomm._torch_ops.empty: specs[%zd][0] must be a torch.dtype", item);
    return false;
  }
  spec->none = false;
  spec->dtype = reinterpret_cast<THPDtype*>(dtype)->scalar_type;
  if (!read_dims(PyTuple_GET_ITEM(obj, 1), "shape", item, spec->shape, &spec->ndim)) return false;
  spec->strided = size == 3;
  if (spec->strided) {
    int nstrides = 0;
    if (!read_dims(PyTuple_GET_ITEM(obj, 2), "strides", item, spec->strides, &nstrides)) return false;
    if (nstrides != spec->ndim) {
      PyErr_Format(PyExc_ValueError, "epcomm._torch_ops.empty: specs[%zd] has %d dimensions and %d strides", item,
                   spec->ndim, nstrides);
      return false;
    }
  } else {
    spec->set_row_major();
  }
  return true;
}

// CUDA tensors straight from PyTorch's CUDA factory (at::detail::empty_cuda: what at::empty's CUDA
// kernel calls, with the same allocator, c10::cuda::CUDACachingAllocator::get(), so a pluggable
// allocator, a memory pool and a graph capture's private pool see these allocations as any other)
// instead of through the dispatcher: less host time per allocation. Not under
// torch.use_deterministic_algorithms, where at::empty may fill fresh memory (then at::empty).
// _set_direct_alloc(False) turns it off (the benchmarks compare both in one process).
bool direct_alloc = true;

#ifdef EPCOMM_TORCH_CUDA
bool use_direct(const c10::Device& device) {
  return direct_alloc && device.is_cuda() && !at::globalContext().deterministicAlgorithms();
}
#endif

// A tensor of its own storage (at::empty / at::empty_strided).
at::Tensor make_own(const Spec& s, const c10::Device& device) {
  const auto options = c10::TensorOptions().dtype(s.dtype).device(device);
  const c10::IntArrayRef shape(s.shape, s.ndim);
#ifdef EPCOMM_TORCH_CUDA
  if (use_direct(device))
    return s.strided ? at::Tensor(at::detail::empty_strided_cuda(shape, c10::IntArrayRef(s.strides, s.ndim), options))
                     : at::Tensor(at::detail::empty_cuda(shape, options));
#endif
  return s.strided ? at::empty_strided(shape, c10::IntArrayRef(s.strides, s.ndim), options) : at::empty(shape, options);
}

// A byte tensor of `nbytes` (a shared block).
at::Tensor make_block(int64_t nbytes, const c10::Device& device) {
  const auto options = c10::TensorOptions().dtype(c10::ScalarType::Byte).device(device);
#ifdef EPCOMM_TORCH_CUDA
  if (use_direct(device)) return at::Tensor(at::detail::empty_cuda({nbytes}, options));
#endif
  return at::empty({nbytes}, options);
}

constexpr int64_t kSharedAlign = 256;  // each tensor's start in a shared block (as the allocator's)

// Tensors for `read` on `device_index` (-1: the CPU) as a new tuple (None where a spec is none),
// each one's data pointer in data[i] when `data` is given; nullptr with a Python error set.
PyObject* make_tensors(int device_index, const std::vector<Spec>& read, bool shared, void** data) {
  const Py_ssize_t n = static_cast<Py_ssize_t>(read.size());
  PyObject* result = PyTuple_New(n);
  if (result == nullptr) return nullptr;
  try {
    const c10::Device device = device_index < 0 ? c10::Device(c10::kCPU)
                                                : c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(device_index));
    // shared: one allocation for all of them, each tensor at an aligned offset of it (one
    // allocator call instead of n; the block lives while any of them does), the block ending where
    // the last one does. One tensor alone is made as without `shared` (its own dtype's storage).
    if (shared && std::count_if(read.begin(), read.end(), [](const Spec& s) { return !s.none; }) < 2) shared = false;
    at::Tensor block;
    std::vector<int64_t> offsets(static_cast<size_t>(n), 0);
    if (shared) {
      int64_t total = 0, end = 0;
      for (Py_ssize_t i = 0; i < n; ++i) {
        if (read[i].none) continue;
        offsets[i] = total;
        end = total + read[i].nbytes();
        total += (read[i].nbytes() + kSharedAlign - 1) / kSharedAlign * kSharedAlign;
      }
      block = make_block(end, device);
    }
    for (Py_ssize_t i = 0; i < n; ++i) {
      const Spec& s = read[i];
      PyObject* t = nullptr;
      if (data != nullptr) data[i] = nullptr;
      if (s.none) {
        Py_INCREF(Py_None);
        t = Py_None;
      } else {
        at::Tensor v;
        if (!shared) {
          v = make_own(s, device);
        } else {
          // What at::empty makes, over the shared storage: a TensorImpl with the block's dispatch
          // keys and this dtype, its sizes, strides and offset (in elements; offsets are aligned).
          v = at::detail::make_tensor<c10::TensorImpl>(c10::Storage(block.storage()), block.key_set(),
                                                       c10::scalarTypeToTypeMeta(s.dtype));
          v.unsafeGetTensorImpl()->set_sizes_and_strides(c10::IntArrayRef(s.shape, s.ndim),
                                                         c10::IntArrayRef(s.strides, s.ndim),
                                                         offsets[i] / static_cast<int64_t>(c10::elementSize(s.dtype)));
        }
        if (data != nullptr) data[i] = v.data_ptr();
        t = THPVariable_Wrap(std::move(v));
      }
      if (t == nullptr) {
        Py_DECREF(result);
        return nullptr;
      }
      PyTuple_SET_ITEM(result, i, t);  // steals t
    }
  } catch (const std::exception& e) {  // c10::Error: out of memory, a bad device
    Py_DECREF(result);
    PyErr_SetString(PyExc_RuntimeError, (std::string("epcomm._torch_ops.empty: ") + e.what()).c_str());
    return nullptr;
  }
  return result;
}

PyObject* empty(PyObject* /*module*/, PyObject* args) {
  int device_index = -1, shared = 0;
  PyObject* specs = nullptr;
  if (!PyArg_ParseTuple(args, "iO!|p:empty", &device_index, &PyTuple_Type, &specs, &shared)) return nullptr;
  const Py_ssize_t n = PyTuple_GET_SIZE(specs);
  std::vector<Spec> read(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i)
    if (!read_spec(PyTuple_GET_ITEM(specs, i), i, &read[i])) return nullptr;
  return make_tensors(device_index, read, shared != 0, nullptr);
}

// empty_grouped(device, groups): `groups` a tuple of spec tuples (as empty's); each group made as
// empty(device, group, shared=True), all of them in one flat tuple, in one call from Python.
PyObject* empty_grouped(PyObject* /*module*/, PyObject* args) {
  int device_index = -1;
  PyObject* groups = nullptr;
  if (!PyArg_ParseTuple(args, "iO!:empty_grouped", &device_index, &PyTuple_Type, &groups)) return nullptr;
  const Py_ssize_t num_groups = PyTuple_GET_SIZE(groups);
  std::vector<PyObject*> made;  // new references
  const auto drop = [&] {
    for (PyObject* t : made) Py_DECREF(t);
  };
  Py_ssize_t total = 0;
  for (Py_ssize_t g = 0; g < num_groups; ++g) {
    PyObject* specs = PyTuple_GET_ITEM(groups, g);
    if (!PyTuple_Check(specs)) {
      PyErr_Format(PyExc_TypeError, "epcomm._torch_ops.empty_grouped: groups[%zd] must be a tuple of specs", g);
      drop();
      return nullptr;
    }
    const Py_ssize_t n = PyTuple_GET_SIZE(specs);
    std::vector<Spec> read(static_cast<size_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i)
      if (!read_spec(PyTuple_GET_ITEM(specs, i), total + i, &read[i])) {
        drop();
        return nullptr;
      }
    PyObject* t = make_tensors(device_index, read, true, nullptr);
    if (t == nullptr) {
      drop();
      return nullptr;
    }
    made.push_back(t);
    total += n;
  }
  PyObject* result = PyTuple_New(total);
  if (result == nullptr) {
    drop();
    return nullptr;
  }
  Py_ssize_t k = 0;
  for (PyObject* t : made)
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(t); ++i) {
      PyObject* item = PyTuple_GET_ITEM(t, i);
      Py_INCREF(item);
      PyTuple_SET_ITEM(result, k++, item);
    }
  drop();
  return result;
}

// first_rows(tensors, rows): each tensor (None stays None) whose first dimension is not `rows`
// resized in place to `rows` of them (a reserved receive tensor cut to what arrived; the storage keeps
// its size). Returns a tuple of the same objects.
PyObject* first_rows(PyObject* /*module*/, PyObject* args) {
  PyObject* tensors = nullptr;
  long long rows = 0;
  if (!PyArg_ParseTuple(args, "O!L:first_rows", &PyTuple_Type, &tensors, &rows)) return nullptr;
  if (rows < 0) {
    PyErr_Format(PyExc_ValueError, "epcomm._torch_ops.first_rows: rows = %lld is negative", rows);
    return nullptr;
  }
  const Py_ssize_t n = PyTuple_GET_SIZE(tensors);
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* item = PyTuple_GET_ITEM(tensors, i);
      if (item == Py_None) continue;
      if (!THPVariable_Check(item)) {
        PyErr_Format(PyExc_TypeError, "epcomm._torch_ops.first_rows: tensors[%zd] is not a tensor", i);
        return nullptr;
      }
      const at::Tensor& t = THPVariable_Unpack(item);
      if (t.dim() == 0 || t.size(0) == rows) continue;
      std::vector<int64_t> sizes(t.sizes().begin(), t.sizes().end());
      sizes[0] = rows;
      t.resize_(sizes);
    }
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, (std::string("epcomm._torch_ops.first_rows: ") + e.what()).c_str());
    return nullptr;
  }
  Py_INCREF(tensors);
  return tensors;
}

// EpcommTensorDtype of each ScalarType (-1: not one epcomm moves), filled at import by name so that
// the same source builds against PyTorch with and without the float8 types.
constexpr int kScalarTypes = 64;
int dtype_code[kScalarTypes];
// The ScalarType of each EpcommTensorDtype (filled with dtype_code; Byte where this PyTorch lacks it).
c10::ScalarType code_type[kEpcommBool + 1] = {};
bool code_known[kEpcommBool + 1] = {};

void fill_dtype_codes() {
  static const std::pair<const char*, int> names[] = {{"BFloat16", kEpcommBF16}, {"Float8_e4m3fn", kEpcommFP8E4M3},
                                                      {"Float", kEpcommF32},     {"Int", kEpcommI32},
                                                      {"Long", kEpcommI64},      {"Bool", kEpcommBool}};
  const int n = static_cast<int>(c10::ScalarType::NumOptions);
  for (int i = 0; i < kScalarTypes; ++i) {
    dtype_code[i] = -1;
    if (i >= n) continue;
    const std::string name = c10::toString(static_cast<c10::ScalarType>(i));
    for (const auto& [type_name, code] : names)
      if (name == type_name) {
        dtype_code[i] = code;
        code_type[code] = static_cast<c10::ScalarType>(i);
        code_known[code] = true;
      }
  }
}

// EpcommReadTensor: the facts of a plain tensor (or Parameter) on the CPU or a CUDA device, strided,
// of a dtype epcomm moves; 0 (no Python error) for anything else, which the binding's Python path
// then judges as it always did.
int read_tensor(PyObject* obj, EpcommTensorFacts* out) {
  if (!THPVariable_CheckExact(obj)) return 0;
  try {
    const at::Tensor& t = THPVariable_Unpack(obj);
    if (!t.defined() || t.layout() != c10::kStrided) return 0;
    const c10::Device device = t.device();
    if (!device.is_cpu() && !device.is_cuda()) return 0;
    const int type = static_cast<int>(t.scalar_type());
    if (type < 0 || type >= kScalarTypes || dtype_code[type] < 0) return 0;
    const int64_t ndim = t.dim();
    if (ndim > EPCOMM_TENSOR_MAX_DIMS) return 0;
    out->data = t.data_ptr();
    out->dtype = dtype_code[type];
    out->ndim = static_cast<int>(ndim);
    out->device = device.is_cuda() ? device.index() : -1;
    const c10::IntArrayRef sizes = t.sizes(), strides = t.strides();
    for (int64_t i = 0; i < ndim; ++i) {
      out->shape[i] = sizes[i];
      out->strides[i] = strides[i];
    }
    return 1;
  } catch (const std::exception&) {  // e.g. a tensor without storage: the Python path raises it
    return 0;
  }
}

// EpcommAllocTensors (tensor_reader.h): the eager low-latency calls' outputs, made from the binding.
PyObject* alloc_tensors(int device, int n, const EpcommTensorSpec* specs, int shared, void** data) {
  std::vector<Spec> read(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    const EpcommTensorSpec& in = specs[i];
    if (in.dtype < 0 || in.dtype > kEpcommBool || in.ndim < 0 || in.ndim > EPCOMM_TENSOR_MAX_DIMS) {
      PyErr_Format(PyExc_ValueError, "epcomm._torch_ops.tensor_allocator: spec %d has dtype %d and %d dimensions", i,
                   in.dtype, in.ndim);
      return nullptr;
    }
    if (!code_known[in.dtype]) {  // float8_e4m3fn before PyTorch 2.1
      PyErr_Format(PyExc_RuntimeError,
                   "epcomm._torch_ops.tensor_allocator: PyTorch %s has no dtype for epcomm's dtype %d",
                   EPCOMM_TORCH_VERSION, in.dtype);
      return nullptr;
    }
    Spec& s = read[static_cast<size_t>(i)];
    s.none = false;
    s.dtype = code_type[in.dtype];
    s.ndim = in.ndim;
    s.strided = in.strided != 0;
    for (int d = 0; d < s.ndim; ++d) {
      if (in.shape[d] < 0) {
        PyErr_Format(PyExc_ValueError, "epcomm._torch_ops.tensor_allocator: spec %d has a negative size", i);
        return nullptr;
      }
      s.shape[d] = in.shape[d];
      s.strides[d] = in.strides[d];
    }
    if (!s.strided) s.set_row_major();
  }
  return make_tensors(device, read, shared != 0, data);
}

// EpcommCurrentStream (tensor_reader.h): PyTorch's current stream of a CUDA device.
int current_stream(int device, void** stream) {
#ifdef EPCOMM_TORCH_CUDA
  try {
    *stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
    return 1;
  } catch (const std::exception&) {  // a bad device index: the caller asks Python instead
    return 0;
  }
#else
  (void)device;
  (void)stream;
  return 0;
#endif
}

PyObject* set_direct_alloc(PyObject* /*module*/, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  const bool before = direct_alloc;
  direct_alloc = on != 0;
  return PyBool_FromLong(before);
}

PyMethodDef methods[] =
    {{"empty", empty, METH_VARARGS,
      "empty(device, specs, shared=False) -> tuple: fresh tensors made in C++ (at::empty / at::empty_strided). "
      "device: a CUDA index, -1 for the CPU; specs: items None or (dtype, shape) or (dtype, shape, strides); "
      "shared: all of them in one allocation (tensors of their own over one storage)."},
     {"empty_grouped", empty_grouped, METH_VARARGS,
      "empty_grouped(device, groups) -> tuple: empty(device, group, shared=True) for each group (a tuple of specs), "
      "all the tensors in one flat tuple."},
     {"first_rows", first_rows, METH_VARARGS,
      "first_rows(tensors, rows) -> tensors: each tensor whose first dimension is not rows resized in place to rows "
      "(None stays None)."},
     {"_set_direct_alloc", set_direct_alloc, METH_O,
      "_set_direct_alloc(on) -> bool (the setting before): CUDA tensors from PyTorch's CUDA factory directly (True, "
      "the default where built with CUDA) or through at::empty (for benchmarks)."},
     {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT,
                      "_torch_ops",
                      "epcomm's output tensors made in C++ through PyTorch (optional; built where PyTorch is found).",
                      -1,
                      methods,
                      nullptr,
                      nullptr,
                      nullptr,
                      nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__torch_ops() {
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  // The PyTorch this was compiled against: epcomm/_alloc.py uses the module only when the imported
  // torch.__version__ is the same (another build's ABI could crash instead of raising).
  if (PyModule_AddStringConstant(m, "torch_version", EPCOMM_TORCH_VERSION) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  fill_dtype_codes();
  PyObject* reader = PyCapsule_New(reinterpret_cast<void*>(&read_tensor), EPCOMM_TENSOR_READER_NAME, nullptr);
  if (reader == nullptr || PyModule_AddObject(m, "tensor_reader", reader) < 0) {  // steals reader on success
    Py_XDECREF(reader);
    Py_DECREF(m);
    return nullptr;
  }
  PyObject* allocator = PyCapsule_New(reinterpret_cast<void*>(&alloc_tensors), EPCOMM_TENSOR_ALLOCATOR_NAME, nullptr);
  if (allocator == nullptr || PyModule_AddObject(m, "tensor_allocator", allocator) < 0) {
    Py_XDECREF(allocator);
    Py_DECREF(m);
    return nullptr;
  }
  // The current stream only where PyTorch has CUDA (elsewhere the binding asks Python).
  const int cuda = EPCOMM_TORCH_CUDA_ON;
  if (PyModule_AddIntConstant(m, "direct_alloc_built", cuda) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  if (cuda) {
    PyObject* stream = PyCapsule_New(reinterpret_cast<void*>(&current_stream), EPCOMM_CURRENT_STREAM_NAME, nullptr);
    if (stream == nullptr || PyModule_AddObject(m, "current_stream", stream) < 0) {
      Py_XDECREF(stream);
      Py_DECREF(m);
      return nullptr;
    }
  }
  return m;
}
