// Argument rules shared by every mode (docs/contract.md §6): each message names the argument, the value
// seen and the rule, so a caller can fix the call without reading this code.
#include "reference/reference_internal.hpp"

namespace epcomm::ref::detail {

std::string rank_prefix(int rank) { return cat("rank ", rank, ": "); }

void fail(const std::string& who, const std::string& message) { throw_argument_error(who + message); }

void check_size(const std::string& who, const char* name, size_t actual, int64_t expected, const std::string& formula) {
  if (static_cast<int64_t>(actual) != expected)
    fail(who, cat(name, " has ", actual, " elements; expected ", formula, " = ", expected));
}

void check_num_ranks(int num_ranks, int ranks_per_node) {
  if (num_ranks < 1) fail("", cat("num_ranks = ", num_ranks, " must be >= 1"));
  if (ranks_per_node < 1 || num_ranks % ranks_per_node != 0)
    fail("", cat("ranks_per_node = ", ranks_per_node, " must be >= 1 and divide num_ranks = ", num_ranks));
}

void check_num_experts(const std::string& who, int num_experts, int num_ranks, bool required) {
  if (num_experts < 0 || (required && num_experts == 0))
    fail(who, cat("num_experts = ", num_experts, " must be ", required ? "> 0" : ">= 0"));
  if (num_experts % num_ranks != 0)
    fail(who, cat("num_experts = ", num_experts, " is not divisible by num_ranks = ", num_ranks));
}

void check_num_topk(const std::string& who, int num_topk, int min_topk) {
  if (num_topk < min_topk || num_topk > kMaxTopk)
    fail(who, cat("num_topk = ", num_topk, " is out of range [", min_topk, ", ", kMaxTopk, "]"));
}

void check_topk_idx(const std::string& who, const char* name, const std::vector<int64_t>& topk_idx, int num_tokens,
                    int num_topk, int num_experts) {
  check_size(who, name, topk_idx.size(), int64_t{num_tokens} * num_topk,
             cat("num_tokens * num_topk = ", num_tokens, " * ", num_topk));
  for (size_t i = 0; i < topk_idx.size(); ++i) {
    const int64_t e = topk_idx[i];
    if (e < -1 || e >= num_experts)
      fail(who,
           cat(name, "[", i / num_topk, "][", i % num_topk, "] = ", e, " is out of range [-1, ", num_experts, ")"));
  }
}

void check_zero_one(const std::string& who, const char* name, const std::vector<uint8_t>& values) {
  for (size_t i = 0; i < values.size(); ++i)
    if (values[i] > 1) fail(who, cat(name, " element ", i, " = ", int{values[i]}, " is not 0 or 1"));
}

}  // namespace epcomm::ref::detail
