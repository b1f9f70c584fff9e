#include "normal_problem.hpp"

#include <algorithm>
#include <cstring>
#include <random>

namespace epcomm::test {

NormalReference make_normal_reference(const NormalProblem& c, uint64_t seed) {
  const int R = c.num_ranks, H = c.hidden, K = c.num_topk, E = c.num_experts;
  const int G = c.scale_words();
  NormalReference out;
  out.in.resize(R);
  std::vector<ref::NormalInput> ref_in(R), ref_in2(R);
  for (int r = 0; r < R; ++r) {
    std::mt19937_64 rng(seed * 1000003ull + r);
    RankInputs& ri = out.in[r];
    ri.num_tokens = c.tokens ? c.tokens(r)
                    : c.fixed_tokens >= 0
                        ? c.fixed_tokens
                        : (r == 0 ? c.max_tokens : std::uniform_int_distribution<int>(0, c.max_tokens)(rng));
    const size_t n = static_cast<size_t>(ri.num_tokens) * H;
    if (c.dtype == DType::kBF16) {
      auto a = random_bf16(rng, n), b = random_bf16(rng, n);
      ri.x.resize(n * 2);
      ri.x2.resize(n * 2);
      std::memcpy(ri.x.data(), a.data(), n * 2);
      std::memcpy(ri.x2.data(), b.data(), n * 2);
    } else {
      ri.x = random_fp8(rng, n);
      ri.x2 = random_fp8(rng, n);
      if (c.scale_dtype == DType::kI32) {
        // Any 32-bit words, NaN patterns included: they must travel bit for bit.
        const auto words = [&] {
          std::vector<int32_t> w(static_cast<size_t>(ri.num_tokens) * G);
          for (auto& v : w) v = static_cast<int32_t>(rng());
          return ref::scale_words_from(w);
        };
        ri.scales = words();
        ri.scales2 = words();
      } else {
        ri.scales = random_scales(rng, static_cast<size_t>(ri.num_tokens) * G);
        ri.scales2 = random_scales(rng, static_cast<size_t>(ri.num_tokens) * G);
      }
    }
    RoutingSpec spec{E, K, c.skewed, 0.1};
    ri.topk = c.routing ? c.routing(r, ri.num_tokens) : random_topk(rng, ri.num_tokens, spec);
    ri.weights = random_weights(rng, static_cast<size_t>(ri.num_tokens) * K);
    ri.layout = ref::get_dispatch_layout(ri.topk, ri.num_tokens, K, E, R, c.nodes_split());
    ref_in[r].num_tokens = ri.num_tokens;
    ref_in[r].x = ri.x;
    ref_in[r].scales = ri.scales;
    if (c.with_topk) {
      ref_in[r].topk_idx = ri.topk;
      ref_in[r].topk_weights = ri.weights;
    }
    ref_in[r].is_token_in_rank = ri.layout.is_token_in_rank;
    ref_in2[r] = ref_in[r];
    ref_in2[r].topk_idx.clear();
    ref_in2[r].topk_weights.clear();
    ref_in2[r].x = ri.x2;
    ref_in2[r].scales = ri.scales2;
  }
  ref::NormalOptions opt;
  opt.dtype = c.dtype;
  opt.hidden = H;
  opt.num_topk = c.with_topk ? K : 0;
  opt.num_experts = E;
  opt.expert_alignment = c.expert_alignment;
  opt.num_worst_tokens = c.worst ? R * c.max_tokens : 0;
  opt.num_scales = c.num_scales;
  out.num_worst_tokens = opt.num_worst_tokens;
  out.dispatch = ref::normal_dispatch(ref_in, opt);
  std::vector<ref::NormalHandle> handles;
  for (const auto& o : out.dispatch) handles.push_back(o.handle);
  out.combine_in.resize(R);
  for (int r = 0; r < R; ++r) {
    std::mt19937_64 rng(seed * 7919ull + r);
    out.combine_in[r].x = random_bf16(rng, static_cast<size_t>(out.dispatch[r].num_rows) * H);
    if (c.with_topk) out.combine_in[r].topk_weights = out.dispatch[r].recv_topk_weights;
    if (c.with_bias) {
      out.combine_in[r].bias0 = random_bf16(rng, static_cast<size_t>(out.in[r].num_tokens) * H);
      out.combine_in[r].bias1 = random_bf16(rng, static_cast<size_t>(out.in[r].num_tokens) * H);
    }
  }
  out.combine = ref::normal_combine(out.combine_in, handles, H, c.with_topk ? K : 0);
  ref::NormalOptions opt2 = opt;
  opt2.num_topk = 0;
  out.cached = ref::normal_cached_dispatch(ref_in2, handles, opt2);
  return out;
}

std::vector<float> column_major(const std::vector<float>& row_major, int rows, int cols) {
  std::vector<float> out(row_major.size());
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c)
      out[static_cast<size_t>(c) * rows + r] = row_major[static_cast<size_t>(r) * cols + c];
  return out;
}

namespace {
int padded_tokens(const NormalProblem& c, int tokens) {
  const int a = std::max(c.scale_token_align, 1);
  return (tokens + a - 1) / a * a;
}
}  // namespace

std::vector<float> scale_layout(const NormalProblem& c, const std::vector<float>& row_major, int tokens) {
  const int G = c.scale_words();
  if (c.scales_row_major) return row_major;
  const int stride = padded_tokens(c, tokens);
  std::vector<float> out(static_cast<size_t>(stride) * G, 0.0f);
  for (int t = 0; t < tokens; ++t)
    for (int g = 0; g < G; ++g)
      std::memcpy(&out[static_cast<size_t>(g) * stride + t], &row_major[static_cast<size_t>(t) * G + g], 4);
  return out;
}

DeviceTensor scale_tensor(const NormalProblem& c, int tokens, int device) {
  const int G = c.scale_words();
  if (c.scales_row_major) return DeviceTensor(c.scale_dtype, {tokens, G}, device);
  return DeviceTensor(c.scale_dtype, {G, padded_tokens(c, tokens)}, device);
}

TensorView scale_view(const NormalProblem& c, const DeviceTensor& t, int tokens) {
  TensorView v = t.view();
  if (c.scales_row_major) return v;
  v.ndim = 2;
  v.shape = {tokens, c.scale_words(), 0, 0};
  v.strides = {1, padded_tokens(c, tokens), 0, 0};
  return v;
}

::testing::AssertionResult same_scale_words(const DeviceTensor& got, const std::vector<float>& want,
                                            const std::string& what, size_t count) {
  return same_values(got.download<int32_t>(), ref::scale_words_as_int(want), what, count);
}

TensorView column_major_view(const DeviceTensor& t, int rows, int cols) {
  TensorView v = t.view();
  v.ndim = 2;
  v.shape = {rows, cols, 0, 0};
  v.strides = {1, rows, 0, 0};
  return v;
}

}  // namespace epcomm::test
