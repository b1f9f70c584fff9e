// epcomm._torch_ops: the Python layer's output tensors made in C++ (at::empty), several per call.
//
// Why: from Python every torch.empty goes through the argument parser, the dispatcher and a fresh
// Python object, ~6 us each on the GPU hosts (BENCHMARKS run 51), and a low-latency dispatch returns
// five fresh tensors: over half of its host time. In C++ the same allocations cost ~1-2 us each.
// epcomm._epcomm builds without PyTorch; this optional module is built only where PyTorch's headers
// and libraries are found at configure time (python/CMakeLists.txt), checked against the PyTorch
// imported at run time (epcomm/_alloc.py), and epcomm works the same without it.
//
// empty(device, specs): `device` is a CUDA device index (-1: the CPU, for the tests of
// the Python layer over its host stand-in); `specs` a tuple whose items are None (-> None) or
// (dtype, shape) / (dtype, shape, strides), dtype a torch.dtype, shape and strides tuples of ints.
// Returns a tuple of tensors (or None) in the same order, on the current stream of `device` as
// torch.empty would be (the caching allocator reads it). first_rows(tensors, rows): below.
//
// Plain CPython API over PyTorch's own headers: no pybind11 here, so nothing mixes Debian's pybind11
// with the copy PyTorch ships.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <c10/core/TensorOptions.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <exception>
#include <string>
#include <vector>

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

// One spec -> a new reference to a tensor (or None); nullptr with a Python error set.
PyObject* make_one(PyObject* spec, Py_ssize_t item, const c10::Device& device) {
  if (spec == Py_None) Py_RETURN_NONE;
  const Py_ssize_t size = PyTuple_Check(spec) ? PyTuple_GET_SIZE(spec) : 0;
  if (size != 2 && size != 3) {
    PyErr_Format(PyExc_TypeError,
                 "epcomm._torch_ops.empty: specs[%zd] must be None or (dtype, shape) or (dtype, shape, strides)", item);
    return nullptr;
  }
  PyObject* dtype = PyTuple_GET_ITEM(spec, 0);
  if (!THPDtype_Check(dtype)) {
    PyErr_Format(PyExc_TypeError, "epcomm._torch_ops.empty: specs[%zd][0] must be a torch.dtype", item);
    return nullptr;
  }
  int64_t shape[kMaxDims], strides[kMaxDims];
  int ndim = 0, nstrides = 0;
  if (!read_dims(PyTuple_GET_ITEM(spec, 1), "shape", item, shape, &ndim)) return nullptr;
  if (size == 3 && !read_dims(PyTuple_GET_ITEM(spec, 2), "strides", item, strides, &nstrides)) return nullptr;
  if (size == 3 && nstrides != ndim) {
    PyErr_Format(PyExc_ValueError, "epcomm._torch_ops.empty: specs[%zd] has %d dimensions and %d strides", item, ndim,
                 nstrides);
    return nullptr;
  }
  const auto options = c10::TensorOptions().dtype(reinterpret_cast<THPDtype*>(dtype)->scalar_type).device(device);
  at::Tensor t = size == 3 ? at::empty_strided(c10::IntArrayRef(shape, ndim), c10::IntArrayRef(strides, ndim), options)
                           : at::empty(c10::IntArrayRef(shape, ndim), options);
  return THPVariable_Wrap(std::move(t));
}

PyObject* empty(PyObject* /*module*/, PyObject* args) {
  int device_index = -1;
  PyObject* specs = nullptr;
  if (!PyArg_ParseTuple(args, "iO!:empty", &device_index, &PyTuple_Type, &specs)) return nullptr;
  const Py_ssize_t n = PyTuple_GET_SIZE(specs);
  PyObject* result = PyTuple_New(n);
  if (result == nullptr) return nullptr;
  try {
    const c10::Device device = device_index < 0 ? c10::Device(c10::kCPU)
                                                : c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(device_index));
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* t = make_one(PyTuple_GET_ITEM(specs, i), i, device);
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

PyMethodDef methods[] =
    {{"empty", empty, METH_VARARGS,
      "empty(device, specs) -> tuple: fresh tensors made in C++ (at::empty / at::empty_strided). device: a CUDA "
      "index, -1 for the CPU; specs: items None or (dtype, shape) or (dtype, shape, strides)."},
     {"first_rows", first_rows, METH_VARARGS,
      "first_rows(tensors, rows) -> tensors: each tensor whose first dimension is not rows resized in place to rows "
      "(None stays None)."},
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
  return m;
}
