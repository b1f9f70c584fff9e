#include "epcomm/types.hpp"

#include <string>

#include "epcomm/error.hpp"

namespace epcomm {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::kBF16:
      return "bfloat16";
    case DType::kFP8E4M3:
      return "float8_e4m3fn";
    case DType::kF32:
      return "float32";
    case DType::kI32:
      return "int32";
    case DType::kI64:
      return "int64";
    case DType::kBool:
      return "bool";
  }
  return "?";
}

TensorView TensorView::contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape, int device) {
  TensorView v;
  v.data = data;
  v.dtype = dtype;
  v.device = device;
  v.ndim = static_cast<int>(shape.size());
  if (v.ndim > kMaxDims) throw_argument_error("tensor views have at most 4 dimensions");
  int d = 0;
  for (int64_t s : shape) v.shape[d++] = s;
  int64_t stride = 1;
  for (int i = v.ndim - 1; i >= 0; --i) {
    v.strides[i] = stride;
    stride *= v.shape[i];
  }
  return v;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

bool TensorView::is_contiguous() const {
  int64_t expected = 1;
  for (int i = ndim - 1; i >= 0; --i) {
    if (shape[i] != 1 && strides[i] != expected) return false;
    expected *= shape[i];
  }
  return true;
}

std::string TensorView::describe() const {
  // Plain string building, no iostreams: this text goes into exceptions raised inside the Python
  // process, where the error paths that built messages with an ostringstream segfaulted (GPU runs
  // 9-12) while those built with std::to_string worked.
  std::string s = "[";
  for (int i = 0; i < ndim; ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  s += "] ";
  s += dtype_name(dtype);
  s += device < 0 ? std::string(" on cpu") : " on cuda:" + std::to_string(device);
  return s;
}

void throw_argument_error(const std::string& message) { throw ArgumentError(message); }

}  // namespace epcomm
