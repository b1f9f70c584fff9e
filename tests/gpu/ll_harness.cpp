// See ll_harness.hpp.
#include "ll_harness.hpp"

#include "kernels/low_latency/params.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <tuple>

namespace epcomm::test {
namespace {

// One received row as comparable bytes: data, then its scales.
struct Row {
  int32_t src;
  std::vector<uint8_t> bytes;
  bool operator<(const Row& o) const { return std::tie(src, bytes) < std::tie(o.src, o.bytes); }
  bool operator==(const Row& o) const { return src == o.src && bytes == o.bytes; }
};

Row make_row(const LLCase& c, int64_t slot, int32_t src, const std::vector<uint8_t>& x,
             const std::vector<float>& scales, const std::vector<int32_t>& packed) {
  const int H = c.hidden, G = H / 128, W = (G + 3) / 4;
  const size_t row_bytes = static_cast<size_t>(H) * (c.use_fp8 ? 1 : 2);
  Row r{src, std::vector<uint8_t>(x.begin() + slot * row_bytes, x.begin() + (slot + 1) * row_bytes)};
  if (c.use_fp8 && !c.use_ue8m0) {
    const auto* p = reinterpret_cast<const uint8_t*>(scales.data() + slot * G);
    r.bytes.insert(r.bytes.end(), p, p + 4 * G);
  }
  if (c.use_fp8 && c.use_ue8m0) {
    const auto* p = reinterpret_cast<const uint8_t*>(packed.data() + slot * W);
    r.bytes.insert(r.bytes.end(), p, p + 4 * W);
  }
  return r;
}

}  // namespace

std::string describe(const LLCase& c) {
  std::string s = "R=" + std::to_string(c.num_ranks) + " hidden=" + std::to_string(c.hidden) +
                  " K=" + std::to_string(c.num_topk) + " E=" + std::to_string(c.num_experts) +
                  " Tmax=" + std::to_string(c.max_tokens) + (c.use_fp8 ? " fp8" : " bf16");
  if (c.round_scale) s += " round_scale";
  if (c.use_ue8m0) s += " ue8m0";
  if (c.hook) s += " hook";
  if (c.two_batches) s += " two-batches";
  if (c.zero_copy) s += " zero-copy";
  if (c.graph_replays) s += " graph x" + std::to_string(c.graph_replays);
  if (c.clean_in_graph) s += " clean-in-graph";
  if (c.out_of_range) s += " out-of-range-ids";
  if (c.duplicates) s += " duplicate-experts";
  if (c.ranks_per_node > 0) s += " P=" + std::to_string(c.ranks_per_node);
  if (c.low_latency_net >= 0) s += " ll_net=" + std::to_string(c.low_latency_net);
  if (c.order_mode == 1) s += " async_finish";
  if (c.order_mode == 2) s += " previous_event";
  return s;
}

// A small case for the error-path tests.
LLCase small_case(int R, int Tmax, int H, int E, int K) {
  LLCase c;
  c.num_ranks = R;
  c.hidden = H;
  c.num_experts = E;
  c.num_topk = K;
  c.max_tokens = Tmax;
  return c;
}

RoundInput make_input(const LLCase& c, uint64_t seed, int round, int rank, int num_tokens) {
  std::mt19937_64 rng(seed * 1000003ull + round * 7919ull + rank);
  RoundInput in;
  in.num_tokens = num_tokens;
  in.x = random_bf16(rng, static_cast<size_t>(num_tokens) * c.hidden);
  in.ref_topk = random_topk(rng, num_tokens, RoutingSpec{c.num_experts, c.num_topk, false, c.drop_rate});
  if (c.duplicates)
    for (int t = 0; t < num_tokens; t += 4) {
      int64_t* row = in.ref_topk.data() + static_cast<size_t>(t) * c.num_topk;
      if (row[0] >= 0) row[c.num_topk - 1] = row[0];
    }
  in.topk = in.ref_topk;
  if (c.out_of_range)
    for (size_t i = 0; i < in.topk.size(); ++i)
      if (in.topk[i] < 0 && i % 3 == 0)
        in.topk[i] = (i % 2) ? c.num_experts + static_cast<int64_t>(i % 5) : -2 - static_cast<int64_t>(i % 7);
  in.weights = random_weights(rng, in.topk.size());
  const int64_t slots = static_cast<int64_t>(c.num_ranks) * c.max_tokens;
  in.y = testing::fast_bf16(seed * 31 + round * 1009 + rank,
                            static_cast<size_t>(c.num_experts / c.num_ranks) * slots * c.hidden);
  return in;
}

Batch make_batch(const LLCase& c, int R, int T, int dev, int sms, const DeviceTensor* cum, const DeviceTensor* dwait,
                 const DeviceTensor* cwait) {
  const int EL = c.num_experts / R, H = c.hidden, K = c.num_topk, G = H / 128, W = (G + 3) / 4;
  const int64_t RT = static_cast<int64_t>(R) * c.max_tokens;
  Batch b;
  b.x = DeviceTensor(DType::kBF16, {T, H}, dev);
  b.topk = DeviceTensor(DType::kI64, {T, K}, dev);
  b.weights = DeviceTensor(DType::kF32, {T, K}, dev);
  b.y = DeviceTensor(DType::kBF16, {EL, RT, H}, dev);
  b.recv_x = DeviceTensor(c.use_fp8 ? DType::kFP8E4M3 : DType::kBF16, {EL, RT, H}, dev);
  b.scales = c.use_ue8m0 ? DeviceTensor(DType::kI32, {EL, W, RT}, dev) : DeviceTensor(DType::kF32, {EL, G, RT}, dev);
  b.count = DeviceTensor(DType::kI32, {EL}, dev);
  b.src_info = DeviceTensor(DType::kI32, {EL, RT}, dev);
  b.range = DeviceTensor(DType::kI64, {EL, R}, dev);
  b.out = DeviceTensor(DType::kBF16, {T, H}, dev);
  b.din.x = b.x.view();
  b.din.topk_idx = b.topk.view();
  b.din.num_max_dispatch_tokens_per_rank = c.max_tokens;
  b.din.num_experts = c.num_experts;
  b.din.use_fp8 = c.use_fp8;
  b.din.round_scale = c.round_scale;
  b.din.use_ue8m0 = c.use_ue8m0;
  b.din.num_sms = sms;
  if (cum) b.din.cumulative_local_expert_recv_stats = cum->view();
  if (dwait) b.din.dispatch_wait_recv_cost_stats = dwait->view();
  b.dout.recv_x = b.recv_x.view();
  if (c.use_fp8) {
    const int cols = c.use_ue8m0 ? W : G;
    TensorView s = b.scales.view();
    s.shape = {EL, RT, cols, 0};
    s.strides = {cols * RT, 1, RT, 0};
    b.dout.recv_x_scales = s;
  }
  b.dout.recv_count = b.count.view();
  b.dout.src_info = b.src_info.view();
  b.dout.layout_range = b.range.view();
  b.cin.x = b.y.view();
  b.cin.topk_idx = b.topk.view();
  b.cin.topk_weights = b.weights.view();
  b.cin.zero_copy = c.zero_copy;
  b.cin.num_sms = sms;
  if (cwait) b.cin.combine_wait_recv_cost_stats = cwait->view();
  return b;
}

Batch make_batch(const LLCase& c, int T, int dev) {
  return make_batch(c, c.num_ranks, T, dev, test_num_sms(c.num_ranks, 132), nullptr, nullptr, nullptr);
}

void upload_dispatch_inputs(Batch& b, const RoundInput& in) {
  b.x.upload(in.x);
  b.topk.upload(in.topk);
  b.weights.upload(in.weights);
}

void upload_y(const LLCase& c, Buffer& buf, Batch& b, const RoundInput& in) {
  if (!c.zero_copy) {
    b.y.upload(in.y);
    return;
  }
  const TensorView zc = buf.get_next_low_latency_combine_buffer(b.handle);
  ASSERT_EQ(zc.nbytes(), in.y.size() * 2);
  // On the thread's stream, never the legacy default stream: a co-resident rank's kernel may be
  // waiting for this rank (README "Limits").
  cuda_ok(cudaMemcpyAsync(zc.data, in.y.data(), zc.nbytes(), cudaMemcpyHostToDevice, cudaStreamPerThread),
          "zero-copy upload");
  cuda_ok(cudaStreamSynchronize(cudaStreamPerThread), "sync after zero-copy upload");
}

RoundOutput download_dispatch(const LLCase& c, int R, const Batch& b) {
  const int EL = c.num_experts / R, G = c.hidden / 128, W = (G + 3) / 4;
  const int64_t RT = static_cast<int64_t>(R) * c.max_tokens;
  RoundOutput o;
  o.recv_count = b.count.download<int32_t>();
  o.src_info = b.src_info.download<int32_t>();
  o.layout_range = b.range.download<int64_t>();
  o.recv_x = b.recv_x.download<uint8_t>();
  if (c.use_fp8 && !c.use_ue8m0) {
    const auto raw = b.scales.download<float>();  // [EL][G][RT]
    o.scales.resize(raw.size());
    for (int e = 0; e < EL; ++e)
      for (int g = 0; g < G; ++g)
        for (int64_t s = 0; s < RT; ++s)
          o.scales[(e * RT + s) * G + g] = raw[(static_cast<int64_t>(e) * G + g) * RT + s];
  }
  if (c.use_fp8 && c.use_ue8m0) {
    const auto raw = b.scales.download<int32_t>();  // [EL][W][RT]
    o.packed.resize(raw.size());
    for (int e = 0; e < EL; ++e)
      for (int w = 0; w < W; ++w)
        for (int64_t s = 0; s < RT; ++s)
          o.packed[(e * RT + s) * W + w] = raw[(static_cast<int64_t>(e) * W + w) * RT + s];
  }
  return o;
}

float bf16_value(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// EPCOMM_LL_PER_RANK=2, 3, 4 (the default) send partial sums per (token, rank) where the layout allows
// (kernels/low_latency/combine.cu): the library decides alike (its shared-memory limits hold for
// every case here) from the case's BufferOptions::low_latency_per_rank, or the environment's at -1.
LowLatencyPartials partials_in_use(const LLCase& c) {
  const LowLatencyLayout l = LowLatencyLayout::make(c.max_tokens, c.hidden, c.num_ranks, c.num_experts);
  const int level = low_latency_per_rank_choice(c.low_latency_per_rank, low_latency_per_rank_level());
  return low_latency_per_rank_wanted(l, c.use_fp8, level) ? low_latency_partials(l, level) : LowLatencyPartials::kNone;
}

// The per-rank combine's bounds (`absref` = sum_k |w_k y_k| as the reference computes it from |w|
// and |y|), plus the final rounding of both results (<= one BF16 unit of |want|, 2^-7 |want|):
// BF16 partials: one BF16 rounding per partial (|error| <= 2^-9 absref, tested with 2^-8);
// fine partials: one rounding at 16 significant bits per partial and float32 reordering
// (|error| <= (2^-16 + 30 * 2^-24) absref, tested with 2^-14); float32 partials: the reordering
// only (|error| <= 30 * 2^-24 absref, tested with 2^-18).
std::string close_combine(const std::vector<uint16_t>& got, const std::vector<uint16_t>& want,
                          const std::vector<uint16_t>& absref, LowLatencyPartials kind) {
  if (got.size() != want.size())
    return "combined x: size " + std::to_string(got.size()) + ", want " + std::to_string(want.size());
  const float rel = low_latency_partials_tolerance(kind);
  for (size_t i = 0; i < got.size(); ++i) {
    const float g = bf16_value(got[i]), w = bf16_value(want[i]), a = bf16_value(absref[i]);
    const float tol = a * rel + std::fabs(w) * (1.0f / 128.0f);
    if (!(std::fabs(g - w) <= tol))
      return std::string("combined x (per-rank ") + low_latency_partials_name(kind) +
             " partials, tolerance) differs at element " + std::to_string(i) + ": got " + std::to_string(g) +
             ", want " + std::to_string(w) + ", tolerance " + std::to_string(tol);
  }
  return "";
}

std::string check_round(const LLCase& c, const std::vector<RoundInput>& in, const std::vector<RoundOutput>& got,
                        const std::vector<uint8_t>& masked, bool masked_from_dispatch) {
  const int R = c.num_ranks, EL = c.num_experts / R;
  const int64_t RT = static_cast<int64_t>(R) * c.max_tokens;
  ref::LowLatencyOptions opt;
  opt.hidden = c.hidden;
  opt.num_topk = c.num_topk;
  opt.num_experts = c.num_experts;
  opt.num_max_dispatch_tokens_per_rank = c.max_tokens;
  opt.use_fp8 = c.use_fp8;
  opt.round_scale = c.round_scale;
  opt.use_ue8m0 = c.use_ue8m0;
  opt.masked_ranks = masked_from_dispatch ? masked : std::vector<uint8_t>{};
  std::vector<ref::LowLatencyDispatchInput> din(R);
  for (int r = 0; r < R; ++r) din[r] = {in[r].num_tokens, in[r].x, in[r].ref_topk};
  const auto want = ref::low_latency_dispatch(din, opt);

  auto live = [&](int r) { return masked.empty() || masked[r] == 0; };
  for (int j = 0; j < R; ++j) {
    if (!live(j)) continue;  // a masked rank took no part (shrink mode)
    const std::string rank = "rank " + std::to_string(j) + ": ";
    const RoundOutput& g = got[j];
    const auto& w = want[j];
    if (auto r = same_values(g.recv_count, w.recv_count, "recv_count"); !r) return rank + r.message();
    for (int e = 0; e < EL; ++e) {
      int64_t next_begin = 0;
      for (int s = 0; s < R; ++s) {
        const int64_t gr = g.layout_range[e * R + s], wr = w.layout_range[e * R + s];
        const int64_t gb = gr >> 32, gn = gr & 0xffffffff, wb = wr >> 32, wn = wr & 0xffffffff;
        const std::string where = "local expert " + std::to_string(e) + " from rank " + std::to_string(s);
        if (gn != wn)
          return rank + "layout_range count of " + where + " is " + std::to_string(gn) + ", want " + std::to_string(wn);
        if (gb != next_begin)
          return rank + "layout_range begin of " + where + " is " + std::to_string(gb) + ", want " +
                 std::to_string(next_begin) + " (sources are packed in rank order)";
        next_begin += gn;
        std::vector<Row> a, b;
        for (int64_t i = 0; i < gn; ++i) {
          a.push_back(make_row(c, e * RT + gb + i, g.src_info[e * RT + gb + i], g.recv_x, g.scales, g.packed));
          b.push_back(
              make_row(c, e * RT + wb + i, w.src_info[e * RT + wb + i], w.recv_x, w.recv_scales, w.recv_scales_ue8m0));
        }
        std::sort(a.begin(), a.end());
        std::sort(b.begin(), b.end());
        for (size_t i = 0; i < a.size(); ++i)
          if (!(a[i] == b[i]))
            return rank + "rows of " + where + " differ as a set: sorted row " + std::to_string(i) +
                   " has source token " + std::to_string(a[i].src) + " (want " + std::to_string(b[i].src) + ")" +
                   (a[i].src == b[i].src ? ", same token, different data or scales" : "");
      }
    }
  }

  // Combine, through the GPU's own handles.
  std::vector<ref::LowLatencyDispatchOutput> handles(R);
  std::vector<ref::LowLatencyCombineInput> cin(R);
  for (int r = 0; r < R; ++r) {
    handles[r].src_info = got[r].src_info;
    handles[r].layout_range = got[r].layout_range;
    cin[r] = {in[r].num_tokens, in[r].y, in[r].ref_topk, in[r].weights};
  }
  opt.masked_ranks = masked;
  const auto want_out = ref::low_latency_combine(cin, handles, opt);
  if (const LowLatencyPartials kind = partials_in_use(c); kind != LowLatencyPartials::kNone) {
    std::vector<ref::LowLatencyCombineInput> abs_in = cin;
    for (auto& a : abs_in) {
      for (auto& v : a.y) v &= 0x7fff;
      for (auto& w : a.topk_weights) w = std::fabs(w);
    }
    const auto abs_out = ref::low_latency_combine(abs_in, handles, opt);
    for (int j = 0; j < R; ++j) {
      if (!live(j)) continue;
      if (auto r = close_combine(got[j].out, want_out[j], abs_out[j], kind); !r.empty())
        return "rank " + std::to_string(j) + ": " + r;
    }
    return "";
  }
  for (int j = 0; j < R; ++j) {
    if (!live(j)) continue;
    if (auto r = same_values(got[j].out, want_out[j], "combined x (bit-exact)"); !r)
      return "rank " + std::to_string(j) + ": " + r.message();
  }
  return "";
}

void compare_round(const LLCase& c, int round, const std::vector<RoundInput>& in, const std::vector<RoundOutput>& got,
                   const std::vector<uint8_t>& masked, bool masked_from_dispatch) {
  const std::string mismatch = check_round(c, in, got, masked, masked_from_dispatch);
  if (!mismatch.empty()) ADD_FAILURE() << "round " << round << ", " << mismatch;
}

}  // namespace epcomm::test
