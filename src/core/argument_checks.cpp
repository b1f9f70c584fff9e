#include "core/argument_checks.hpp"

#include <cstdint>
#include <string>

#include "epcomm/error.hpp"

namespace epcomm::checks {

namespace {
[[noreturn]] void fail(const char* name, const TensorView& t, const std::string& rule) {
  throw ArgumentError(std::string(name) + ": " + rule + " (got " + t.describe() + ")");
}
}  // namespace

void dtype_in(const char* name, const TensorView& t, std::initializer_list<DType> allowed) {
  for (DType d : allowed)
    if (t.dtype == d) return;
  std::string s = "dtype must be ";  // no iostreams in error paths (see TensorView::describe)
  int i = 0;
  for (DType d : allowed) {
    if (i++) s += " or ";
    s += dtype_name(d);
  }
  fail(name, t, s);
}

void ndim(const char* name, const TensorView& t, int expected) {
  if (t.ndim != expected) fail(name, t, "must have " + std::to_string(expected) + " dimensions");
}

void dim(const char* name, const TensorView& t, int d, int64_t expected, const char* meaning) {
  if (t.ndim <= d || t.shape[d] != expected)
    fail(name, t,
         "size of dimension " + std::to_string(d) + " must be " + std::to_string(expected) + " (" + meaning + ")");
}

void contiguous(const char* name, const TensorView& t) {
  if (!t.is_contiguous()) fail(name, t, "must be contiguous");
}

void on_device(const char* name, const TensorView& t, int device) {
  if (t.device != device) fail(name, t, "must be on cuda:" + std::to_string(device));
}

void aligned(const char* name, const TensorView& t, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(t.data) % bytes != 0)
    fail(name, t, "data pointer must be " + std::to_string(bytes) + "-byte aligned");
}

void positive(const char* name, int64_t value) {
  if (value <= 0) throw ArgumentError(std::string(name) + " = " + std::to_string(value) + " must be positive");
}

void in_range(const char* name, int64_t value, int64_t lo, int64_t hi) {
  if (value < lo || value > hi)
    throw ArgumentError(std::string(name) + " = " + std::to_string(value) + " must be in [" + std::to_string(lo) +
                        ", " + std::to_string(hi) + "]");
}

void divisible(const char* name, int64_t value, const char* by_name, int64_t by) {
  if (by <= 0 || value % by != 0)
    throw ArgumentError(std::string(name) + " = " + std::to_string(value) + " must be divisible by " + by_name + " = " +
                        std::to_string(by));
}

void topk_ids_host(const char* name, const TensorView& t, int64_t num_experts) {
  const auto* ids = t.ptr<const int64_t>();
  const int64_t rows = t.shape[0], cols = t.ndim > 1 ? t.shape[1] : 1;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < cols; ++k) {
      const int64_t v = ids[r * t.strides[0] + k * (t.ndim > 1 ? t.strides[1] : 0)];
      if (v < -1 || v >= num_experts)
        throw ArgumentError(std::string(name) + "[" + std::to_string(r) + "][" + std::to_string(k) +
                            "] = " + std::to_string(v) + " is out of range [-1, " + std::to_string(num_experts) + ")");
    }
}

void device_tensor(const char* name, const TensorView& t, int device, std::initializer_list<DType> allowed,
                   int expected_ndim, bool need_contiguous) {
  if (t.data == nullptr && t.numel() != 0) fail(name, t, "must not be a null pointer");
  on_device(name, t, device);
  dtype_in(name, t, allowed);
  ndim(name, t, expected_ndim);
  if (need_contiguous) contiguous(name, t);
}

}  // namespace epcomm::checks
