// See stress_steps.hpp.
#include "stress_steps.hpp"

#include <cstdlib>
#include <cstring>
#include <random>

#include "normal_problem.hpp"

namespace epcomm::test::stress {
namespace {

std::vector<int64_t> step_topk(std::mt19937_64& rng, const Step& s, int T, int E, int R) {
  if (s.routing == 2) return random_topk(rng, T, RoutingSpec{E, s.num_topk, true, 0.0});
  // Hot rank: only the experts of ranks 0 and 1 (at least K of them).
  const int experts = s.routing == 1 ? std::max(s.num_topk, std::min(E, 2 * E / R)) : E;
  return random_topk(rng, T, RoutingSpec{experts, s.num_topk, false, 0.1});
}

struct NormalRankInput {
  ref::NormalInput in, cached;  // dispatch, cached dispatch (new x)
  std::vector<uint16_t> bias0;  // combine bias
};

NormalRankInput normal_input(const Problem& p, const Step& s, int step, int rank) {
  std::mt19937_64 rng(p.seed * 1000003ull + static_cast<uint64_t>(step) * 7919ull + static_cast<uint64_t>(rank));
  const int T = s.tokens[rank], H = s.hidden, G = (H + 127) / 128, E = p.normal_experts();
  NormalRankInput r;
  auto make_x = [&](ref::NormalInput& in) {
    in.num_tokens = T;
    const size_t n = static_cast<size_t>(T) * H;
    if (s.fp8) {
      in.x = random_fp8(rng, n);
      in.scales = random_scales(rng, static_cast<size_t>(T) * G);
    } else {
      const auto v = random_bf16(rng, n);
      in.x.resize(n * 2);
      std::memcpy(in.x.data(), v.data(), n * 2);
    }
  };
  make_x(r.in);
  r.in.topk_idx = step_topk(rng, s, T, E, p.num_ranks);
  r.in.topk_weights = random_weights(rng, r.in.topk_idx.size());
  make_x(r.cached);
  r.bias0 = random_bf16(rng, static_cast<size_t>(T) * H);
  return r;
}

// Combine input rows: [rows, H], any values (rows past the received ones are ignored).
std::vector<uint16_t> combine_rows(const Problem& p, int step, int rank, int rows, int hidden) {
  return testing::fast_bf16(p.seed * 31 + static_cast<uint64_t>(step) * 1009 + static_cast<uint64_t>(rank),
                            static_cast<size_t>(rows) * hidden);
}

template <typename T>
void upload_prefix(const DeviceTensor& t, const std::vector<T>& host) {
  if (host.empty()) return;
  cuda_ok(cudaMemcpyAsync(t.view().data, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice,
                          cudaStreamPerThread),
          "upload");
  cuda_ok(cudaStreamSynchronize(cudaStreamPerThread), "sync after upload");
}

template <typename T>
std::vector<T> download_prefix(const TensorView& v, size_t count) {
  std::vector<T> host(count);
  if (count)
    cuda_ok(cudaMemcpyAsync(host.data(), v.data, count * sizeof(T), cudaMemcpyDeviceToHost, cudaStreamPerThread),
            "download");
  cuda_ok(cudaStreamSynchronize(cudaStreamPerThread), "sync after download");
  return host;
}

TensorView shaped(const DeviceTensor& t, DType dtype, std::initializer_list<int64_t> shape) {
  return TensorView::contiguous(t.view().data, dtype, shape, t.view().device);
}

// Scales [T, G] stored column-major (the common layout; any strides are allowed).
TensorView column_major_scales(const DeviceTensor& t, int T, int G) {
  TensorView v = t.view();
  v.ndim = 2;
  v.shape = {T, G, 0, 0};
  v.strides = {1, std::max(T, 1), 0, 0};
  return v;
}

// The first difference of one normal step from the reference, "" if none.
template <typename T>
std::string first_diff(const std::vector<T>& got, const std::vector<T>& want, size_t count, const char* what) {
  if (got.size() < count || want.size() < count) return std::string(what) + ": fewer elements than compared";
  if (auto r = same_values(got, want, what, count); !r) return r.message();
  return "";
}

}  // namespace

int env_int(const char* name, int fallback) {
  const char* s = std::getenv(name);
  return s && *s ? std::atoi(s) : fallback;
}

Step make_step(const Problem& p, int index) {
  std::mt19937_64 rng(p.seed * 0x9e3779b97f4a7c15ull + static_cast<uint64_t>(index));
  auto pick = [&](int n) { return static_cast<int>(rng() % static_cast<uint64_t>(n)); };
  Step s;
  s.low_latency = pick(2) == 0;
  s.fp8 = pick(2) == 0;
  s.routing = pick(10) < 6 ? 0 : (pick(2) == 0 ? 1 : 2);
  s.worst = !s.low_latency && pick(3) == 0;
  s.cached = !s.low_latency && pick(2) == 0;
  s.hook = s.low_latency && pick(3) == 0;
  s.hidden = s.low_latency ? kLLHidden : kNormalHiddens[pick(3)];
  s.num_topk = 1 + pick(8);
  const int tmax = s.low_latency ? kLLTmax : kNormalTmax;
  for (int r = 0; r < p.num_ranks; ++r) {
    const int u = pick(20);
    s.tokens.push_back(u < 2 ? 0 : (u < 5 ? tmax : 1 + pick(tmax)));
  }
  return s;
}

NormalRankResult run_normal(const Problem& p, const Step& s, int step, int rank, Buffer& buf, NormalDevice& d,
                            cudaStream_t stream, int sms) {
  const int R = p.num_ranks, E = p.normal_experts(), T = s.tokens[rank], H = s.hidden, K = s.num_topk;
  const int G = (H + 127) / 128;
  const DType dtype = s.fp8 ? DType::kFP8E4M3 : DType::kBF16;
  const int elt = s.fp8 ? 1 : 2;
  const NormalRankInput in = normal_input(p, s, step, rank);
  const StreamOrder order{stream, nullptr, false};
  upload_prefix(d.x, in.in.x);
  upload_prefix(d.cached_x, in.cached.x);
  if (s.fp8) {
    upload_prefix(d.scales, column_major(in.in.scales, T, G));
    upload_prefix(d.cached_scales, column_major(in.cached.scales, T, G));
  }
  upload_prefix(d.topk, in.in.topk_idx);
  upload_prefix(d.weights, in.in.topk_weights);
  upload_prefix(d.bias0, in.bias0);

  const TensorView topk = shaped(d.topk, DType::kI64, {T, K});
  const TensorView in_rank = shaped(d.in_rank, DType::kBool, {T, R});
  buf.get_dispatch_layout(topk, E, {d.per_rank.view(), std::nullopt, d.per_expert.view(), in_rank}, order);

  Config cfg = Config::dispatch_default(R);
  cfg.num_sms = sms;
  DispatchInputs di;
  di.x = shaped(d.x, dtype, {T, H});
  if (s.fp8) di.x_scales = column_major_scales(d.scales, T, G);
  di.topk_idx = topk;
  di.topk_weights = shaped(d.weights, DType::kF32, {T, K});
  di.num_tokens_per_rank = d.per_rank.view();
  di.is_token_in_rank = in_rank;
  di.num_tokens_per_expert = d.per_expert.view();
  di.num_worst_tokens = s.worst ? R * kNormalTmax : 0;
  di.config = cfg;
  const int stride = buf.chunk_offset_stride(cfg);
  if (d.chunk_off.view().nbytes() < static_cast<size_t>(R) * stride * 4)
    d.chunk_off = DeviceTensor(DType::kI32, {R * stride}, buf.device());
  DispatchHandle h;
  h.rank_prefix_matrix = shaped(d.prefix, DType::kI32, {R, R});
  h.chunk_offset = shaped(d.chunk_off, DType::kI32, {R, stride});
  const DispatchPlan plan = buf.dispatch_prepare(di, h, d.recv_per_expert.view(), order);
  const int rows = plan.num_rows;
  h.recv_src_idx = shaped(d.src, DType::kI32, {rows});
  DispatchOutputs dout;
  dout.recv_x = shaped(d.recv_x, dtype, {rows, H});
  if (s.fp8) dout.recv_x_scales = shaped(d.recv_scales, DType::kF32, {rows, G});
  dout.recv_topk_idx = shaped(d.recv_idx, DType::kI64, {rows, K});
  dout.recv_topk_weights = shaped(d.recv_weights, DType::kF32, {rows, K});
  buf.dispatch_run(di, plan, h, dout, order);

  // Combine: random rows, the received weights, one bias.
  upload_prefix(d.y, combine_rows(p, step, rank, rows, H));
  Config ccfg = Config::combine_default(R);
  ccfg.num_sms = sms;
  CombineInputs ci;
  ci.x = shaped(d.y, DType::kBF16, {rows, H});
  ci.topk_weights = dout.recv_topk_weights;
  ci.bias0 = shaped(d.bias0, DType::kBF16, {T, H});
  ci.config = ccfg;
  CombineOutputs co;
  co.combined_x = shaped(d.out, DType::kBF16, {T, H});
  co.combined_topk_weights = shaped(d.out_weights, DType::kF32, {T, K});
  buf.combine(ci, h, co, order);

  NormalRankResult res;
  if (s.cached) {
    DispatchOutputs cout_;
    cout_.recv_x = shaped(d.cached_recv, dtype, {rows, H});
    if (s.fp8) cout_.recv_x_scales = shaped(d.cached_recv_scales, DType::kF32, {rows, G});
    std::optional<TensorView> sc;
    if (s.fp8) sc = column_major_scales(d.cached_scales, T, G);
    buf.cached_dispatch(shaped(d.cached_x, dtype, {T, H}), sc, h, cout_, cfg, order);
  }
  cuda_ok(cudaStreamSynchronize(stream), "sync after the normal step");
  buf.check_device_errors();

  res.num_rows = rows;
  res.per_rank = download_prefix<int32_t>(d.per_rank.view(), R);
  res.per_expert = download_prefix<int32_t>(d.per_expert.view(), E);
  res.in_rank = download_prefix<uint8_t>(d.in_rank.view(), static_cast<size_t>(T) * R);
  res.prefix = download_prefix<int32_t>(d.prefix.view(), static_cast<size_t>(R) * R);
  res.recv_per_expert = download_prefix<int32_t>(d.recv_per_expert.view(), E / R);
  res.src_idx = download_prefix<int32_t>(d.src.view(), rows);
  res.recv_x = download_prefix<uint8_t>(d.recv_x.view(), static_cast<size_t>(rows) * H * elt);
  if (s.fp8) res.recv_scales = download_prefix<float>(d.recv_scales.view(), static_cast<size_t>(rows) * G);
  res.recv_idx = download_prefix<int64_t>(d.recv_idx.view(), static_cast<size_t>(rows) * K);
  res.recv_weights = download_prefix<float>(d.recv_weights.view(), static_cast<size_t>(rows) * K);
  res.combined_x = download_prefix<uint16_t>(d.out.view(), static_cast<size_t>(T) * H);
  res.combined_weights = download_prefix<float>(d.out_weights.view(), static_cast<size_t>(T) * K);
  if (s.cached) {
    res.cached_x = download_prefix<uint8_t>(d.cached_recv.view(), static_cast<size_t>(rows) * H * elt);
    if (s.fp8) res.cached_scales = download_prefix<float>(d.cached_recv_scales.view(), static_cast<size_t>(rows) * G);
  }
  return res;
}

std::string check_normal(const Problem& p, const Step& s, int step, const std::vector<NormalRankResult>& got) {
  const int R = p.num_ranks, E = p.normal_experts(), H = s.hidden, K = s.num_topk, G = (H + 127) / 128;
  const size_t elt = s.fp8 ? 1 : 2;
  std::vector<NormalRankInput> in;
  for (int r = 0; r < R; ++r) in.push_back(normal_input(p, s, step, r));
  ref::NormalOptions opt;
  opt.dtype = s.fp8 ? DType::kFP8E4M3 : DType::kBF16;
  opt.hidden = H;
  opt.num_topk = K;
  opt.num_experts = E;
  opt.num_worst_tokens = s.worst ? R * kNormalTmax : 0;
  std::vector<ref::NormalInput> din;
  for (auto& i : in) din.push_back(i.in);
  const auto want = ref::normal_dispatch(din, opt);
  std::vector<ref::NormalHandle> handles;
  std::vector<ref::CombineInput> cin(R);
  for (int r = 0; r < R; ++r) {
    handles.push_back(want[r].handle);
    cin[r].x = combine_rows(p, step, r, want[r].num_rows, H);
    cin[r].topk_weights = want[r].recv_topk_weights;
    cin[r].bias0 = in[r].bias0;
  }
  const auto want_comb = ref::normal_combine(cin, handles, H, K);
  std::vector<ref::NormalDispatchOutput> want_cached;
  if (s.cached) {
    std::vector<ref::NormalInput> cached;
    for (auto& i : in) cached.push_back(i.cached);
    ref::NormalOptions copt = opt;
    copt.num_topk = 0;
    want_cached = ref::normal_cached_dispatch(cached, handles, copt);
  }
  for (int r = 0; r < R; ++r) {
    const NormalRankResult& g = got[r];
    const auto& w = want[r];
    const int T = s.tokens[r];
    const size_t nrecv = static_cast<size_t>(w.handle.num_recv);
    const ref::Layout lay = ref::get_dispatch_layout(in[r].in.topk_idx, T, K, E, R, R);
    std::string m;
    if (g.num_rows != w.num_rows) m = "num_rows " + std::to_string(g.num_rows) + ", want " + std::to_string(w.num_rows);
    if (m.empty()) m = first_diff(g.per_rank, lay.num_tokens_per_rank, R, "num_tokens_per_rank");
    if (m.empty()) m = first_diff(g.per_expert, lay.num_tokens_per_expert, E, "num_tokens_per_expert");
    if (m.empty()) m = first_diff(g.in_rank, lay.is_token_in_rank, lay.is_token_in_rank.size(), "is_token_in_rank");
    if (m.empty())
      m = first_diff(g.prefix, w.handle.rank_prefix_matrix, static_cast<size_t>(R) * R, "rank_prefix_matrix");
    if (m.empty())
      m = first_diff(g.recv_per_expert, w.num_recv_tokens_per_expert, E / R, "num_recv_tokens_per_expert (device)");
    if (m.empty()) m = first_diff(g.src_idx, w.handle.recv_src_idx, nrecv, "recv_src_idx");
    if (m.empty()) m = first_diff(g.recv_x, w.recv_x, nrecv * H * elt, "recv_x");
    if (m.empty() && s.fp8) m = first_diff(g.recv_scales, w.recv_scales, nrecv * G, "recv_x_scales");
    if (m.empty()) m = first_diff(g.recv_idx, w.recv_topk_idx, w.recv_topk_idx.size(), "recv_topk_idx");
    if (m.empty()) m = first_diff(g.recv_weights, w.recv_topk_weights, w.recv_topk_weights.size(), "recv_topk_weights");
    if (m.empty())
      m = first_diff(g.combined_x, want_comb[r].combined_x, want_comb[r].combined_x.size(), "combined_x (bit-exact)");
    if (m.empty())
      m = first_diff(g.combined_weights, want_comb[r].combined_topk_weights, want_comb[r].combined_topk_weights.size(),
                     "combined_topk_weights");
    if (m.empty() && s.cached) m = first_diff(g.cached_x, want_cached[r].recv_x, nrecv * H * elt, "cached recv_x");
    if (m.empty() && s.cached && s.fp8)
      m = first_diff(g.cached_scales, want_cached[r].recv_scales, nrecv * G, "cached recv_x_scales");
    if (!m.empty()) return "rank " + std::to_string(r) + ": " + m;
  }
  return "";
}

LLCase ll_case(const Problem& p, const Step& s) {
  LLCase c;
  c.num_ranks = p.num_ranks;
  c.hidden = kLLHidden;
  c.num_topk = s.num_topk;
  c.num_experts = p.ll_experts();
  c.max_tokens = kLLTmax;
  c.use_fp8 = s.fp8;
  return c;
}

RoundInput ll_input(const Problem& p, const Step& s, int step, int rank) {
  const LLCase c = ll_case(p, s);
  RoundInput in = make_input(c, p.seed, step, rank, s.tokens[rank]);
  if (s.routing != 0) {  // make_input's routing is uniform; skewed steps redraw it
    std::mt19937_64 rng(p.seed * 77 + static_cast<uint64_t>(step) * 13 + static_cast<uint64_t>(rank));
    in.ref_topk = step_topk(rng, s, s.tokens[rank], c.num_experts, p.num_ranks);
    in.topk = in.ref_topk;
    in.weights = random_weights(rng, in.topk.size());
  }
  return in;
}

RoundOutput run_low_latency(const Problem& p, const Step& s, int step, int rank, Buffer& buf, LLDevice& d,
                            cudaStream_t stream) {
  const LLCase c = ll_case(p, s);
  const int T = s.tokens[rank], K = s.num_topk;
  Batch& b = d.batch[s.fp8 ? 1 : 0];
  const RoundInput in = ll_input(p, s, step, rank);
  upload_prefix(b.x, in.x);
  upload_prefix(b.topk, in.topk);
  upload_prefix(b.weights, in.weights);
  b.y.upload(in.y);
  LowLatencyDispatchInputs din = b.din;
  din.x = shaped(b.x, DType::kBF16, {T, c.hidden});
  din.topk_idx = shaped(b.topk, DType::kI64, {T, K});
  LowLatencyCombineInputs cin = b.cin;
  cin.topk_idx = din.topk_idx;
  cin.topk_weights = shaped(b.weights, DType::kF32, {T, K});
  const TensorView out = shaped(b.out, DType::kBF16, {T, c.hidden});
  const StreamOrder order{stream, nullptr, false};
  buf.low_latency_dispatch(din, b.dout, b.handle, s.hook, order);
  if (s.hook) buf.low_latency_dispatch_recv(din, b.dout, b.handle, order);
  buf.low_latency_combine(cin, b.handle, out, s.hook, order);
  if (s.hook) buf.low_latency_combine_recv(cin, b.handle, out, order);
  cuda_ok(cudaStreamSynchronize(stream), "sync after the low-latency step");
  buf.check_device_errors();
  RoundOutput o = download_dispatch(c, p.num_ranks, b);
  o.out = download_prefix<uint16_t>(out, static_cast<size_t>(T) * c.hidden);
  return o;
}

}  // namespace epcomm::test::stress
