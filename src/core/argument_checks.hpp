// Reusable argument checks (docs/contract.md §6). Each throws ArgumentError naming the argument, the value
// seen and the rule.
#pragma once

#include <initializer_list>
#include <string>

#include "epcomm/types.hpp"

namespace epcomm::checks {

void dtype_in(const char* name, const TensorView& t, std::initializer_list<DType> allowed);
void ndim(const char* name, const TensorView& t, int expected);
void dim(const char* name, const TensorView& t, int d, int64_t expected, const char* meaning);
void contiguous(const char* name, const TensorView& t);
void on_device(const char* name, const TensorView& t, int device);
void aligned(const char* name, const TensorView& t, size_t bytes);
void positive(const char* name, int64_t value);
void in_range(const char* name, int64_t value, int64_t lo, int64_t hi);  // lo <= value <= hi
void divisible(const char* name, int64_t value, const char* by_name, int64_t by);
// Host-resident topk ids must lie in [-1, num_experts).
void topk_ids_host(const char* name, const TensorView& t, int64_t num_experts);

// Shorthand for the usual set: device, dtype, rank, contiguity.
void device_tensor(const char* name, const TensorView& t, int device, std::initializer_list<DType> allowed,
                   int expected_ndim, bool need_contiguous = true);

}  // namespace epcomm::checks
