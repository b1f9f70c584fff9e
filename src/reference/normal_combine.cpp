// Normal-mode combine, docs/contract.md §3.2: the reverse of dispatch. Every copy of a token comes back to
// its original rank and the copies are summed (no weights: the expert side applied them).
// The float32 sum runs over receiving ranks in ascending order, then bias0, then bias1, and is
// rounded to BF16 once, so GPU kernels can match it bit for bit.
#include "reference/reference_internal.hpp"

namespace epcomm::ref::detail {

void check_combine_source(const CombineSource& s, int num_ranks) {
  const std::string who = rank_prefix(s.rank);
  const CombineInput& in = *s.input;
  const NormalHandle& h = *s.handle;
  if (s.hidden <= 0 || (s.hidden * 2) % kNormalRowAlign != 0)
    fail(who,
         cat("hidden = ", s.hidden, " must be > 0 with a bfloat16 row of a multiple of ", kNormalRowAlign, " bytes"));
  check_num_topk(who, s.num_topk, 0);
  check_handle(who, h, num_ranks);
  // x may carry padding rows past num_recv (a num_worst_tokens dispatch); they are ignored.
  if (in.x.size() % s.hidden != 0 || static_cast<int64_t>(in.x.size() / s.hidden) < h.num_recv)
    fail(who, cat("x has ", in.x.size(), " elements; expected rows * hidden with hidden = ", s.hidden,
                  " and rows >= handle.num_recv = ", h.num_recv));
  const int64_t rows = static_cast<int64_t>(in.x.size() / s.hidden);
  // num_topk decides whether weights are combined, not the emptiness of topk_weights, which a rank
  // that received no rows could not express.
  if (s.num_topk == 0 && !in.topk_weights.empty())
    fail(who, cat("topk_weights has ", in.topk_weights.size(), " elements but num_topk = 0"));
  if (s.num_topk > 0 && static_cast<int64_t>(in.topk_weights.size()) != rows * s.num_topk)
    fail(who, cat("topk_weights has ", in.topk_weights.size(), " elements; expected rows of x * num_topk = ", rows,
                  " * ", s.num_topk, " = ", rows * s.num_topk, " (pass num_topk = 0 to combine no weights)"));
  const int64_t out_size = int64_t{h.num_tokens} * s.hidden;
  const std::string formula = cat("handle.num_tokens * hidden = ", h.num_tokens, " * ", s.hidden);
  if (!in.bias0.empty()) check_size(who, "bias0", in.bias0.size(), out_size, formula);
  if (!in.bias1.empty()) check_size(who, "bias1", in.bias1.size(), out_size, formula);
}

void check_combine_sources(const std::vector<const CombineSource*>& sources, int receiver) {
  const CombineSource& first = *sources[0];
  std::vector<const NormalHandle*> handles;
  for (const CombineSource* s : sources) {
    const std::string who = rank_prefix(s->rank);
    check_same(who, "hidden", s->hidden, first.hidden);
    check_same(who, "num_topk", s->num_topk, first.num_topk);
    handles.push_back(s->handle);
  }
  check_handles_consistent(handles, receiver);
}

CombineOutput combine_for_source(int rank, const std::vector<const CombineSource*>& sources) {
  const int num_ranks = static_cast<int>(sources.size());
  const CombineSource& mine = *sources[rank];
  const int hidden = mine.hidden;
  const int K = mine.num_topk;
  const int T = mine.handle->num_tokens;
  const bool with_weights = K > 0;

  std::vector<float> acc(static_cast<size_t>(T) * hidden, 0.0f);
  std::vector<float> weights(with_weights ? static_cast<size_t>(T) * K : 0, 0.0f);
  for (int j = 0; j < num_ranks; ++j) {
    const NormalHandle& hj = *sources[j]->handle;
    const CombineInput& in = *sources[j]->input;
    const int begin = rank > 0 ? hj.rank_prefix_matrix[(rank - 1) * num_ranks + j] : 0;
    const int end = hj.rank_prefix_matrix[rank * num_ranks + j];
    for (int row = begin; row < end; ++row) {
      const size_t t = static_cast<size_t>(hj.recv_src_idx[row]);
      for (int c = 0; c < hidden; ++c)
        acc[t * hidden + c] += bf16_to_float(in.x[static_cast<size_t>(row) * hidden + c]);
      for (int k = 0; with_weights && k < K; ++k)
        weights[t * K + k] += in.topk_weights[static_cast<size_t>(row) * K + k];
    }
  }
  CombineOutput out;
  out.combined_x.resize(acc.size());
  for (size_t i = 0; i < acc.size(); ++i) {
    float v = acc[i];
    if (!mine.input->bias0.empty()) v += bf16_to_float(mine.input->bias0[i]);
    if (!mine.input->bias1.empty()) v += bf16_to_float(mine.input->bias1[i]);
    out.combined_x[i] = float_to_bf16(v);
  }
  out.combined_topk_weights = std::move(weights);
  return out;
}

}  // namespace epcomm::ref::detail
