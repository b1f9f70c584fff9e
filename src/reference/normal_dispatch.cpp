// Normal-mode dispatch, docs/contract.md §3.2: each token goes once to every rank that owns one of its
// experts. Rows on a receiver are ordered by source rank, then by source token index; that order is
// what makes the prefix matrix, the handle and combine line up.
#include <algorithm>
#include <cstring>

#include "reference/reference_internal.hpp"

namespace epcomm::ref {
namespace detail {
namespace {

size_t row_bytes(const NormalOptions& o) { return static_cast<size_t>(o.hidden) * dtype_size(o.dtype); }

void check_options(const std::string& who, const NormalOptions& o, int num_ranks) {
  if (o.dtype != DType::kBF16 && o.dtype != DType::kFP8E4M3)
    fail(who, cat("options.dtype = ", dtype_name(o.dtype), " must be bfloat16 or float8_e4m3fn"));
  if (o.hidden <= 0) fail(who, cat("hidden = ", o.hidden, " must be > 0"));
  if (row_bytes(o) % kNormalRowAlign != 0)
    fail(who, cat("hidden = ", o.hidden, ": a row of ", row_bytes(o), " bytes (", dtype_name(o.dtype),
                  ") is not a multiple of ", kNormalRowAlign, " bytes"));
  check_num_experts(who, o.num_experts, num_ranks, /*required=*/false);
  check_num_topk(who, o.num_topk, 0);
  if (o.expert_alignment < 1) fail(who, cat("expert_alignment = ", o.expert_alignment, " must be >= 1"));
  if (o.num_worst_tokens < 0) fail(who, cat("num_worst_tokens = ", o.num_worst_tokens, " must be >= 0"));
  if (o.num_scales < 0 || o.num_scales > kMaxNormalScaleWords)
    fail(who,
         cat("num_scales = ", o.num_scales, " must be in [0, ", kMaxNormalScaleWords, "] (0: ceil(hidden / 128))"));
}

void check_x(const std::string& who, const NormalInput& in, const NormalOptions& o) {
  if (in.num_tokens < 0) fail(who, cat("num_tokens = ", in.num_tokens, " must be >= 0"));
  check_size(who, "x (bytes)", in.x.size(), static_cast<int64_t>(in.num_tokens) * row_bytes(o),
             cat("num_tokens * hidden * ", dtype_size(o.dtype), " = ", in.num_tokens, " * ", o.hidden, " * ",
                 dtype_size(o.dtype)));
  if (o.dtype == DType::kFP8E4M3) {
    check_size(who, "scales", in.scales.size(), int64_t{in.num_tokens} * o.scale_words(),
               cat("num_tokens * scale words per token (options.num_scales; 0: ceil(hidden / 128)) = ", in.num_tokens,
                   " * ", o.scale_words()));
  } else if (!in.scales.empty()) {
    fail(who, cat("scales has ", in.scales.size(), " elements but dtype is bfloat16 (scales are for FP8 only)"));
  }
}

void check_is_token_in_rank_shape(const std::string& who, const NormalInput& in, int num_ranks) {
  check_size(who, "is_token_in_rank", in.is_token_in_rank.size(), int64_t{in.num_tokens} * num_ranks,
             cat("num_tokens * num_ranks = ", in.num_tokens, " * ", num_ranks));
  check_zero_one(who, "is_token_in_rank", in.is_token_in_rank);
}

}  // namespace

DispatchSource make_dispatch_source(int rank, int num_ranks, const NormalInput& in, const NormalOptions& o) {
  const std::string who = rank_prefix(rank);
  check_options(who, o, num_ranks);
  check_x(who, in, o);
  DispatchSource src;
  src.rank = rank;
  src.input = &in;
  src.options = &o;
  if (o.num_topk > 0) {
    if (o.num_experts == 0) fail(who, cat("num_experts = 0 must be > 0 when num_topk = ", o.num_topk));
    if (in.topk_idx.empty() && in.num_tokens > 0)
      fail(who, cat("topk_idx is empty but num_topk = ", o.num_topk,
                    " (set num_topk = 0 and pass is_token_in_rank to dispatch without topk)"));
    check_topk_idx(who, "topk_idx", in.topk_idx, in.num_tokens, o.num_topk, o.num_experts);
    // Required with topk_idx (as in DeepEP): an optional one could not tell "no weights" from
    // "no rows" on ranks without tokens.
    check_size(who, "topk_weights", in.topk_weights.size(), int64_t{in.num_tokens} * o.num_topk,
               cat("num_tokens * num_topk = ", in.num_tokens, " * ", o.num_topk));
    Layout layout = compute_layout(in.topk_idx.data(), in.num_tokens, o.num_topk, o.num_experts, num_ranks, num_ranks);
    if (!in.is_token_in_rank.empty()) {
      check_is_token_in_rank_shape(who, in, num_ranks);
      for (size_t k = 0; k < in.is_token_in_rank.size(); ++k)
        if (in.is_token_in_rank[k] != layout.is_token_in_rank[k])
          fail(who, cat("is_token_in_rank[", k / num_ranks, "][", k % num_ranks, "] = ", int{in.is_token_in_rank[k]},
                        " but topk_idx implies ", int{layout.is_token_in_rank[k]},
                        " (leave it empty to derive it from topk_idx)"));
    }
    src.is_token_in_rank = std::move(layout.is_token_in_rank);
    src.num_tokens_per_expert = std::move(layout.num_tokens_per_expert);
  } else {
    if (!in.topk_idx.empty()) fail(who, cat("topk_idx has ", in.topk_idx.size(), " elements but num_topk = 0"));
    if (!in.topk_weights.empty())
      fail(who, cat("topk_weights has ", in.topk_weights.size(), " elements but there is no topk_idx (num_topk = 0)"));
    check_is_token_in_rank_shape(who, in, num_ranks);
    src.is_token_in_rank = in.is_token_in_rank;
  }
  return src;
}

DispatchSource make_cached_dispatch_source(int rank, int num_ranks, const NormalInput& in, const NormalHandle& handle,
                                           const NormalOptions& o) {
  const std::string who = rank_prefix(rank);
  check_options(who, o, num_ranks);
  check_x(who, in, o);
  if (!in.topk_idx.empty() || !in.topk_weights.empty())
    fail(who, "topk_idx/topk_weights must be empty: a cached dispatch takes its routing from the handle");
  check_handle(who, handle, num_ranks);
  if (handle.num_tokens != in.num_tokens)
    fail(who, cat("num_tokens = ", in.num_tokens, " differs from handle.num_tokens = ", handle.num_tokens));
  if (!in.is_token_in_rank.empty() && in.is_token_in_rank != handle.is_token_in_rank)
    fail(who, "is_token_in_rank differs from handle.is_token_in_rank (leave it empty in a cached dispatch)");
  DispatchSource src;
  src.rank = rank;
  src.input = &in;
  src.options = &o;
  src.handle = &handle;
  src.is_token_in_rank = handle.is_token_in_rank;
  return src;
}

void check_dispatch_sources(const std::vector<const DispatchSource*>& sources, int receiver) {
  const DispatchSource& first = *sources[0];
  const NormalOptions& o0 = *first.options;
  for (const DispatchSource* s : sources) {
    const std::string who = rank_prefix(s->rank);
    const NormalOptions& o = *s->options;
    check_same(who, "options.dtype", std::string(dtype_name(o.dtype)), std::string(dtype_name(o0.dtype)));
    check_same(who, "hidden", o.hidden, o0.hidden);
    check_same(who, "num_worst_tokens", o.num_worst_tokens, o0.num_worst_tokens);
    if (first.handle) continue;  // a cached dispatch ignores the topk-related options
    check_same(who, "num_topk", o.num_topk, o0.num_topk);
    check_same(who, "num_experts", o.num_experts, o0.num_experts);
    check_same(who, "expert_alignment", o.expert_alignment, o0.expert_alignment);
  }
  if (first.handle) {
    std::vector<const NormalHandle*> handles;
    for (const DispatchSource* s : sources) handles.push_back(s->handle);
    check_handles_consistent(handles, receiver);
  }
}

NormalDispatchOutput receive_dispatch(int rank, const std::vector<const DispatchSource*>& sources) {
  const int num_ranks = static_cast<int>(sources.size());
  const NormalOptions& o = *sources[rank]->options;
  const bool cached = sources[0]->handle != nullptr;
  const bool with_topk = !cached && o.num_topk > 0;
  const int K = o.num_topk;
  const int experts_per_rank = o.num_experts / num_ranks;
  const int64_t first_expert = int64_t{rank} * experts_per_rank;
  const size_t rb = row_bytes(o);
  const int sc = o.dtype == DType::kFP8E4M3 ? o.scale_words() : 0;

  NormalDispatchOutput out;
  NormalHandle& h = out.handle;
  h.rank_prefix_matrix.assign(static_cast<size_t>(num_ranks) * num_ranks, 0);
  for (int i = 0; i < num_ranks; ++i) {
    const DispatchSource& s = *sources[i];
    for (int j = 0; j < num_ranks; ++j) {
      int32_t sent = 0;
      for (int t = 0; t < s.input->num_tokens; ++t) sent += s.is_token_in_rank[static_cast<size_t>(t) * num_ranks + j];
      h.rank_prefix_matrix[i * num_ranks + j] = (i > 0 ? h.rank_prefix_matrix[(i - 1) * num_ranks + j] : 0) + sent;
    }
  }
  h.num_recv = h.rank_prefix_matrix[(num_ranks - 1) * num_ranks + rank];
  h.num_tokens = sources[rank]->input->num_tokens;
  h.is_token_in_rank = sources[rank]->is_token_in_rank;
  if (o.num_worst_tokens > 0 && h.num_recv > o.num_worst_tokens)
    fail(rank_prefix(rank), cat("num_worst_tokens = ", o.num_worst_tokens, " is less than the ", h.num_recv,
                                " tokens this rank receives"));

  const int rows = o.num_worst_tokens > 0 ? o.num_worst_tokens : h.num_recv;
  out.num_rows = rows;
  out.recv_x.assign(rows * rb, 0);
  out.recv_scales.assign(static_cast<size_t>(rows) * sc, 0.0f);
  if (with_topk) out.recv_topk_idx.assign(static_cast<size_t>(rows) * K, -1);
  if (with_topk) out.recv_topk_weights.assign(static_cast<size_t>(rows) * K, 0.0f);
  h.recv_src_idx.reserve(h.num_recv);
  h.recv_src_rank.reserve(h.num_recv);

  size_t row = 0;
  for (int i = 0; i < num_ranks; ++i) {
    const DispatchSource& s = *sources[i];
    const NormalInput& in = *s.input;
    for (int t = 0; t < in.num_tokens; ++t) {
      if (!s.is_token_in_rank[static_cast<size_t>(t) * num_ranks + rank]) continue;
      h.recv_src_idx.push_back(t);
      h.recv_src_rank.push_back(i);
      std::copy_n(in.x.begin() + t * rb, rb, out.recv_x.begin() + row * rb);
      // Words, bit for bit (an int32 word may read as a NaN float; memcpy keeps its payload).
      if (sc > 0)
        std::memcpy(out.recv_scales.data() + row * sc, in.scales.data() + static_cast<size_t>(t) * sc,
                    sc * sizeof(float));
      for (int k = 0; with_topk && k < K; ++k) {
        const int64_t e = in.topk_idx[static_cast<size_t>(t) * K + k];
        if (e < first_expert || e >= first_expert + experts_per_rank) continue;
        out.recv_topk_idx[row * K + k] = e - first_expert;
        out.recv_topk_weights[row * K + k] = in.topk_weights[static_cast<size_t>(t) * K + k];
      }
      ++row;
    }
  }

  if (with_topk) {
    // Per expert, the total over sources is rounded up (what a grouped GEMM pads each expert to).
    out.num_recv_tokens_per_expert.assign(experts_per_rank, 0);
    for (int e = 0; e < experts_per_rank; ++e) {
      int64_t total = 0;
      for (const DispatchSource* s : sources) total += s->num_tokens_per_expert[first_expert + e];
      const int64_t a = o.expert_alignment;
      out.num_recv_tokens_per_expert[e] = static_cast<int32_t>((total + a - 1) / a * a);
    }
  }
  return out;
}

}  // namespace detail

std::vector<float> scale_words_from(const std::vector<int32_t>& words) {
  std::vector<float> out(words.size());
  if (!words.empty()) std::memcpy(out.data(), words.data(), words.size() * sizeof(int32_t));
  return out;
}

std::vector<int32_t> scale_words_as_int(const std::vector<float>& words) {
  std::vector<int32_t> out(words.size());
  if (!words.empty()) std::memcpy(out.data(), words.data(), words.size() * sizeof(float));
  return out;
}

}  // namespace epcomm::ref
