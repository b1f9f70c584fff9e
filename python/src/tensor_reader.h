// What epcomm._torch_ops hands epcomm._epcomm so that the binding reads a torch.Tensor's facts in
// C++ (the TensorImpl) instead of through five Python calls per tensor (data_ptr(), dtype, shape,
// stride(), get_device(): ~1 us a tensor, several tensors a call), and makes a call's output
// tensors itself (the eager low-latency calls, python/src/low_latency.cpp). Plain C types only:
// _epcomm is built without PyTorch, _torch_ops with it, and this is all they share.
//
// _torch_ops.tensor_reader is a PyCapsule named EPCOMM_TENSOR_READER_NAME holding an
// EpcommReadTensor; epcomm/_alloc.py passes it to _epcomm._set_tensor_reader when it uses
// _torch_ops (the PyTorch imported is the one it was built for). The reader returns 1 with `out`
// filled for a plain torch.Tensor of a dtype epcomm moves and at most EPCOMM_TENSOR_MAX_DIMS
// dimensions, else 0 without a Python error set: the binding then takes its Python path, which
// accepts or rejects the object as it always did (subclasses, other dtypes, raw tuples).
#pragma once

#include <Python.h>
#include <stdint.h>

#define EPCOMM_TENSOR_READER_NAME "epcomm._torch_ops.tensor_reader.v1"
#define EPCOMM_TENSOR_MAX_DIMS 8

// The dtypes, in epcomm::DType's order (include/epcomm/types.hpp).
enum EpcommTensorDtype {
  kEpcommBF16 = 0,
  kEpcommFP8E4M3 = 1,
  kEpcommF32 = 2,
  kEpcommI32 = 3,
  kEpcommI64 = 4,
  kEpcommBool = 5,
};

struct EpcommTensorFacts {
  void* data;  // data_ptr(): the first element (storage offset included)
  int dtype;   // EpcommTensorDtype
  int ndim;
  int device;  // get_device(): the CUDA index, -1 on the CPU
  int64_t shape[EPCOMM_TENSOR_MAX_DIMS];
  int64_t strides[EPCOMM_TENSOR_MAX_DIMS];  // in elements
};

typedef int (*EpcommReadTensor)(PyObject* obj, struct EpcommTensorFacts* out);

// _torch_ops.tensor_allocator: a PyCapsule named EPCOMM_TENSOR_ALLOCATOR_NAME holding an
// EpcommAllocTensors, handed over with the reader. It makes n fresh tensors on `device` (a CUDA
// index, -1 for the CPU) as at::empty / at::empty_strided would (the caching allocator, on the
// device's current stream), all in one allocation when `shared` (each at a 256-byte aligned offset),
// returns a new tuple of them and writes each one's data pointer to data[i]; NULL with a Python
// error set on failure (out of memory: a RuntimeError).
#define EPCOMM_TENSOR_ALLOCATOR_NAME "epcomm._torch_ops.tensor_allocator.v1"

struct EpcommTensorSpec {
  int dtype;    // EpcommTensorDtype
  int ndim;     // at most EPCOMM_TENSOR_MAX_DIMS
  int strided;  // 0: row-major (strides ignored)
  int64_t shape[EPCOMM_TENSOR_MAX_DIMS];
  int64_t strides[EPCOMM_TENSOR_MAX_DIMS];  // in elements
};

typedef PyObject* (*EpcommAllocTensors)(int device, int n, const struct EpcommTensorSpec* specs, int shared,
                                        void** data);

// _torch_ops.current_stream (only where PyTorch was built with CUDA): a PyCapsule named
// EPCOMM_CURRENT_STREAM_NAME holding an EpcommCurrentStream. It writes PyTorch's current stream of
// CUDA device `device` (a cudaStream_t) to *stream and returns 1, or returns 0 (no Python error set)
// where it cannot: the binding then asks Python (torch._C._cuda_getCurrentRawStream).
#define EPCOMM_CURRENT_STREAM_NAME "epcomm._torch_ops.current_stream.v1"

typedef int (*EpcommCurrentStream)(int device, void** stream);
