// Python objects -> epcomm's plain C++ types, without PyTorch: tensors arrive as duck-typed objects
// (anything with data_ptr(), dtype, shape, stride(), get_device(), which torch.Tensor has) or as
// raw tuples (data_ptr, dtype name, shape, strides, device); streams and events as integers. Where
// epcomm._torch_ops is in use, torch.Tensor objects are read in C++ through its reader instead.
#pragma once

#include <pybind11/pybind11.h>

#include <initializer_list>
#include <optional>
#include <string>
#include <vector>

#include "epcomm/buffer.hpp"
#include "epcomm/types.hpp"
#include "tensor_reader.h"

namespace epcomm::python {

namespace py = pybind11;

// "bfloat16", "torch.bfloat16", "float8_e4m3fn", "float32"/"float", "int32"/"int", "int64"/"long",
// "bool". Anything else raises ArgumentError naming `arg`.
DType dtype_from_name(const std::string& name, const char* arg);
// A torch.dtype (or any object whose str() is one of the names above), or a name.
DType dtype_from_object(py::handle dtype, const char* arg);

// A tensor-like object or a raw tuple; None raises ArgumentError naming `arg`.
TensorView to_view(py::handle obj, const char* arg);
// The C++ reader of torch.Tensor objects epcomm._torch_ops hands over (a capsule: tensor_reader.h);
// to_view tries it first and falls back to the Python calls where it declines. None clears it.
void set_tensor_reader(py::handle capsule);
bool tensor_reader_set();
// `obj`'s facts through the reader; false where there is none or it declines (no error set).
bool try_read_view(py::handle obj, TensorView& v);
// The capsule of _torch_ops.tensor_allocator (None: no allocator), and fresh tensors through it:
// a tuple of specs.size() tensors on `device` (-1: the CPU), data[i] their data pointers
// (tensor_reader.h, EpcommAllocTensors; the Python error it sets is raised).
void set_tensor_allocator(py::handle capsule);
bool tensor_allocator_set();
py::tuple allocate_tensors(int device, const std::vector<EpcommTensorSpec>& specs, bool shared, void** data);
// The capsule of _torch_ops.current_stream (None: none), and PyTorch's current stream of CUDA device
// `device` through it: false where there is none or it declines (no Python error set).
void set_current_stream_reader(py::handle capsule);
bool torch_current_stream(int device, cudaStream_t* stream);
// A tensor spec (tensor_reader.h): `dtype`, `shape` and, when given, `strides` (else row-major).
EpcommTensorSpec tensor_spec(DType dtype, std::initializer_list<int64_t> shape,
                             std::initializer_list<int64_t> strides = {});
// The view of a tensor made from `s` (by the allocator, or by the Python layer) at `data`.
TensorView spec_view(void* data, const EpcommTensorSpec& s, int device);
// None -> nullopt.
std::optional<TensorView> to_optional_view(py::handle obj, const char* arg);

// cudaStream_t / cudaEvent_t from Python integers (0 = the legacy default stream / no event). An
// event may also be an epcomm._epcomm.Event.
cudaStream_t to_stream(py::handle obj, const char* arg);
cudaEvent_t to_event(py::handle obj, const char* arg);

// An owned CUDA event handed to Python: what async calls return and what Buffer.capture() records.
class PyEvent {
 public:
  PyEvent(Event&& event, int device);
  // Creates an event on `device` and records it on `stream`.
  static PyEvent record(cudaStream_t stream, int device);
  void wait(cudaStream_t stream) const;
  void synchronize() const;
  bool query() const;
  cudaEvent_t get() const { return event_->get(); }
  int device() const { return device_; }

 private:
  std::shared_ptr<Event> event_;
  int device_;
};

// None for an empty (non-async) event, else a PyEvent.
py::object wrap_event(Event&& event, int device);

}  // namespace epcomm::python
