// The normal-mode handle and its rules. A handle is only meaningful together with the handles of
// the other ranks from the same dispatch: the senders' is_token_in_rank fix the receivers' rows, the
// prefix matrix and num_recv. Combine and cached dispatch trust a handle only after these checks.
#include "reference/reference_internal.hpp"

namespace epcomm::ref::detail {

namespace {

std::vector<int32_t> implied_prefix_matrix(const std::vector<const NormalHandle*>& handles) {
  const int num_ranks = static_cast<int>(handles.size());
  std::vector<int32_t> prefix(static_cast<size_t>(num_ranks) * num_ranks, 0);
  for (int i = 0; i < num_ranks; ++i) {
    const NormalHandle& h = *handles[i];
    for (int j = 0; j < num_ranks; ++j) {
      int32_t sent = 0;
      for (int t = 0; t < h.num_tokens; ++t) sent += h.is_token_in_rank[static_cast<size_t>(t) * num_ranks + j];
      prefix[i * num_ranks + j] = (i > 0 ? prefix[(i - 1) * num_ranks + j] : 0) + sent;
    }
  }
  return prefix;
}

void check_receiver_handle(const std::vector<const NormalHandle*>& handles, const std::vector<int32_t>& prefix, int j) {
  const int num_ranks = static_cast<int>(handles.size());
  const NormalHandle& h = *handles[j];
  const std::string who = rank_prefix(j);
  for (int k = 0; k < num_ranks * num_ranks; ++k)
    if (h.rank_prefix_matrix[k] != prefix[k])
      fail(who, cat("handle.rank_prefix_matrix[", k / num_ranks, "][", k % num_ranks, "] = ", h.rank_prefix_matrix[k],
                    " but the senders' handle.is_token_in_rank imply ", prefix[k],
                    "; pass the handles of one dispatch, one per rank"));
  const int expected_recv = prefix[(num_ranks - 1) * num_ranks + j];
  if (h.num_recv != expected_recv)
    fail(who, cat("handle.num_recv = ", h.num_recv, " but the senders' handles route ", expected_recv,
                  " tokens to this rank"));
  int row = 0;
  for (int i = 0; i < num_ranks; ++i) {
    const NormalHandle& src = *handles[i];
    for (int t = 0; t < src.num_tokens; ++t) {
      if (!src.is_token_in_rank[static_cast<size_t>(t) * num_ranks + j]) continue;
      if (h.recv_src_rank[row] != i || h.recv_src_idx[row] != t)
        fail(who, cat("handle row ", row, " comes from (rank ", h.recv_src_rank[row], ", token ", h.recv_src_idx[row],
                      ") but the senders' handles put (rank ", i, ", token ", t, ") there"));
      ++row;
    }
  }
}

}  // namespace

void check_handle(const std::string& who, const NormalHandle& handle, int num_ranks) {
  if (handle.num_tokens < 0) fail(who, cat("handle.num_tokens = ", handle.num_tokens, " must be >= 0"));
  if (handle.num_recv < 0) fail(who, cat("handle.num_recv = ", handle.num_recv, " must be >= 0"));
  check_size(who, "handle.rank_prefix_matrix", handle.rank_prefix_matrix.size(), int64_t{num_ranks} * num_ranks,
             cat("num_ranks * num_ranks = ", num_ranks, " * ", num_ranks));
  check_size(who, "handle.is_token_in_rank", handle.is_token_in_rank.size(), int64_t{handle.num_tokens} * num_ranks,
             cat("handle.num_tokens * num_ranks = ", handle.num_tokens, " * ", num_ranks));
  check_zero_one(who, "handle.is_token_in_rank", handle.is_token_in_rank);
  check_size(who, "handle.recv_src_idx", handle.recv_src_idx.size(), handle.num_recv, "handle.num_recv");
  check_size(who, "handle.recv_src_rank", handle.recv_src_rank.size(), handle.num_recv, "handle.num_recv");
}

void check_handles_consistent(const std::vector<const NormalHandle*>& handles, int receiver) {
  // What the senders' routing implies, then compare every receiver's view with it (receivers in
  // ascending order, so the first failing one is named).
  const std::vector<int32_t> prefix = implied_prefix_matrix(handles);
  if (receiver >= 0) return check_receiver_handle(handles, prefix, receiver);
  for (int j = 0; j < static_cast<int>(handles.size()); ++j) check_receiver_handle(handles, prefix, j);
}

}  // namespace epcomm::ref::detail
