// See normal_rank.hpp.
#include "normal_rank.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

namespace epcomm::test {

NormalRank::NormalRank(const NormalProblem& c, const NormalReference& reference, int r, int stride, int dev)
    : c(c),
      reference(reference),
      r(r),
      ri(reference.in[r]),
      want(reference.dispatch[r]),
      T(ri.num_tokens),
      rows(want.num_rows),
      stride(stride),
      dev(dev),
      nrecv(static_cast<size_t>(want.handle.num_recv)) {
  const int H = c.hidden, K = c.num_topk;
  x = DeviceTensor(c.dtype, {T, H}, dev);
  x2 = DeviceTensor(c.dtype, {T, H}, dev);
  x.upload(ri.x);
  x2.upload(ri.x2);
  sc = scale_tensor(c, T, dev);
  sc2 = scale_tensor(c, T, dev);
  if (c.dtype == DType::kFP8E4M3) {
    sc.upload(scale_layout(c, ri.scales, T));
    sc2.upload(scale_layout(c, ri.scales2, T));
  }
  topk = DeviceTensor(DType::kI64, {T, K}, dev);
  weights = DeviceTensor(DType::kF32, {T, K}, dev);
  topk.upload(ri.topk);
  weights.upload(ri.weights);
  allocate_outputs();
}

void NormalRank::allocate_outputs() {
  const int R = c.num_ranks, H = c.hidden, K = c.num_topk, E = c.num_experts, G = c.scale_words();
  per_rank = DeviceTensor(DType::kI32, {R}, dev);
  if (c.ranks_per_node > 0) per_node = DeviceTensor(DType::kI32, {R / c.ranks_per_node}, dev);
  per_expert = DeviceTensor(DType::kI32, {E}, dev);
  in_rank = DeviceTensor(DType::kBool, {T, R}, dev);
  prefix = DeviceTensor(DType::kI32, {R, R}, dev);
  chunk_off = DeviceTensor(DType::kI32, {R, stride}, dev);
  per_expert_recv = DeviceTensor(DType::kI32, {E / R}, dev);
  rx = DeviceTensor(c.dtype, {rows, H}, dev);
  rsc = DeviceTensor(c.scale_dtype, {rows, G}, dev);
  ridx = DeviceTensor(DType::kI64, {rows, K}, dev);
  rw = DeviceTensor(DType::kF32, {rows, K}, dev);
  src = DeviceTensor(DType::kI32, {rows}, dev);
  y = DeviceTensor(DType::kBF16, {rows, H}, dev);
  cw = DeviceTensor(DType::kF32, {rows, K}, dev);
  b0 = DeviceTensor(DType::kBF16, {T, H}, dev);
  b1 = DeviceTensor(DType::kBF16, {T, H}, dev);
  out = DeviceTensor(DType::kBF16, {T, H}, dev);
  out_w = DeviceTensor(DType::kF32, {T, K}, dev);
  cx = DeviceTensor(c.dtype, {rows, H}, dev);
  csc = DeviceTensor(c.scale_dtype, {rows, G}, dev);
}

void NormalRank::poison_outputs() const {
  for (const DeviceTensor* t : {&per_rank, &per_expert, &in_rank, &prefix, &chunk_off, &per_expert_recv, &rx, &rsc,
                                &ridx, &rw, &src, &out, &out_w, &cx, &csc})
    t->fill_bytes(0xA5);
  if (c.ranks_per_node > 0) per_node.fill_bytes(0xA5);
}

void NormalRank::upload_combine_inputs() const {
  y.upload(reference.combine_in[r].x);
  if (c.with_topk) cw.upload(reference.combine_in[r].topk_weights);
  if (c.with_bias) {
    b0.upload(reference.combine_in[r].bias0);
    b1.upload(reference.combine_in[r].bias1);
  }
}

LayoutOutputs NormalRank::layout_outputs() const {
  std::optional<TensorView> nodes;
  if (c.ranks_per_node > 0) nodes = per_node.view();
  return {per_rank.view(), nodes, per_expert.view(), in_rank.view()};
}

DispatchInputs NormalRank::dispatch_inputs(const Config& cfg) const {
  DispatchInputs di;
  di.x = x.view();
  if (c.dtype == DType::kFP8E4M3) di.x_scales = scale_view(c, sc, T);
  if (c.with_topk) {
    di.topk_idx = topk.view();
    di.topk_weights = weights.view();
  }
  di.num_tokens_per_rank = per_rank.view();
  di.is_token_in_rank = in_rank.view();
  di.num_tokens_per_expert = per_expert.view();
  di.expert_alignment = c.expert_alignment;
  di.num_worst_tokens = reference.num_worst_tokens;
  di.config = cfg;
  return di;
}

DispatchHandle NormalRank::handle() const {
  DispatchHandle h;
  h.rank_prefix_matrix = prefix.view();
  h.chunk_offset = chunk_off.view();
  return h;
}

DispatchOutputs NormalRank::dispatch_outputs() const {
  DispatchOutputs dout;
  dout.recv_x = rx.view();
  if (c.dtype == DType::kFP8E4M3) dout.recv_x_scales = rsc.view();
  if (c.with_topk) {
    dout.recv_topk_idx = ridx.view();
    dout.recv_topk_weights = rw.view();
  }
  return dout;
}

CombineInputs NormalRank::combine_inputs(const Config& ccfg) const {
  CombineInputs ci;
  ci.x = y.view();
  if (c.with_topk) ci.topk_weights = cw.view();
  if (c.with_bias) {
    ci.bias0 = b0.view();
    ci.bias1 = b1.view();
  }
  ci.config = ccfg;
  return ci;
}

CombineOutputs NormalRank::combine_outputs() const {
  CombineOutputs co;
  co.combined_x = out.view();
  if (c.with_topk) co.combined_topk_weights = out_w.view();
  return co;
}

std::optional<TensorView> NormalRank::cached_scales() const {
  std::optional<TensorView> sc2v;
  if (c.dtype == DType::kFP8E4M3) sc2v = scale_view(c, sc2, T);
  return sc2v;
}

DispatchOutputs NormalRank::cached_outputs() const {
  DispatchOutputs cout_;
  cout_.recv_x = cx.view();
  if (c.dtype == DType::kFP8E4M3) cout_.recv_x_scales = csc.view();
  return cout_;
}

void NormalRank::run_layout(Buffer& buf, cudaStream_t stream, const StreamOrder& order) const {
  buf.get_dispatch_layout(topk.view(), c.num_experts, layout_outputs(), order);
  cuda_ok(cudaStreamSynchronize(stream), "sync layout");
  expect_layout();
}

std::optional<DispatchPlan> NormalRank::prepare_dispatch(Buffer& buf, const DispatchInputs& di, DispatchHandle& h,
                                                         const StreamOrder& order) const {
  const DispatchPlan plan = buf.dispatch_prepare(di, h, per_expert_recv.view(), order);
  EXPECT_EQ(plan.num_rows, want.num_rows);
  if (plan.num_rows != want.num_rows) return std::nullopt;
  expect_plan(plan);
  h.recv_src_idx = src.view();
  return plan;
}

void NormalRank::expect_layout() const {
  const ref::Layout& lay = ri.layout;
  EXPECT_TRUE(same_values(per_rank.download<int32_t>(), lay.num_tokens_per_rank, "num_tokens_per_rank"));
  if (c.ranks_per_node > 0)
    EXPECT_TRUE(same_values(per_node.download<int32_t>(), lay.num_tokens_per_node, "num_tokens_per_node"));
  EXPECT_TRUE(same_values(per_expert.download<int32_t>(), lay.num_tokens_per_expert, "num_tokens_per_expert"));
  EXPECT_TRUE(same_values(in_rank.download<uint8_t>(), lay.is_token_in_rank, "is_token_in_rank"));
}

void NormalRank::expect_plan(const DispatchPlan& plan) const {
  if (!c.worst && c.with_topk)
    EXPECT_TRUE(same_values(std::vector<int32_t>(plan.num_recv_tokens_per_expert.begin(),
                                                 plan.num_recv_tokens_per_expert.end()),
                            want.num_recv_tokens_per_expert, "num_recv_tokens_per_expert (host)"));
}

void NormalRank::expect_dispatch() const {
  const int H = c.hidden, G = c.scale_words();
  const int elt = c.dtype == DType::kBF16 ? 2 : 1;
  EXPECT_TRUE(same_values(prefix.download<int32_t>(), want.handle.rank_prefix_matrix, "rank_prefix_matrix"));
  if (c.with_topk)
    EXPECT_TRUE(same_values(per_expert_recv.download<int32_t>(), want.num_recv_tokens_per_expert,
                            "num_recv_tokens_per_expert (device)"));
  EXPECT_TRUE(same_values(rx.download<uint8_t>(), want.recv_x, "recv_x", nrecv * H * elt));
  EXPECT_TRUE(same_values(src.download<int32_t>(), want.handle.recv_src_idx, "recv_src_idx", nrecv));
  if (c.dtype == DType::kFP8E4M3) EXPECT_TRUE(same_scale_words(rsc, want.recv_scales, "recv_x_scales", nrecv * G));
  if (c.with_topk) {
    EXPECT_TRUE(same_values(ridx.download<int64_t>(), want.recv_topk_idx, "recv_topk_idx"));
    EXPECT_TRUE(same_values(rw.download<float>(), want.recv_topk_weights, "recv_topk_weights"));
  }
}

void NormalRank::expect_combine(bool bit_exact) const {
  const ref::CombineOutput& w = reference.combine[r];
  EXPECT_TRUE(close_bf16(out.download<uint16_t>(), w.combined_x, "combined_x", 1e-2));
  if (bit_exact) EXPECT_TRUE(same_values(out.download<uint16_t>(), w.combined_x, "combined_x (bit-exact)"));
  if (c.with_topk) EXPECT_TRUE(same_values(out_w.download<float>(), w.combined_topk_weights, "combined_topk_weights"));
}

void NormalRank::expect_combine_bf16_partials() const {
  const ref::CombineOutput& w = reference.combine[r];
  // The bound's scale: the reference combine of every contribution's absolute value (BF16: the sign
  // bit cleared), itself rounded once (the 1 + 2^-7 below covers that).
  std::vector<ref::CombineInput> abs_in = reference.combine_in;
  for (ref::CombineInput& in : abs_in)
    for (std::vector<uint16_t>* v : {&in.x, &in.bias0, &in.bias1})
      for (uint16_t& e : *v) e &= 0x7fff;
  std::vector<ref::NormalHandle> handles;
  for (const auto& d : reference.dispatch) handles.push_back(d.handle);
  const int K = c.with_topk ? c.num_topk : 0;
  const std::vector<uint16_t> absref = ref::normal_combine(abs_in, handles, c.hidden, K)[r].combined_x;
  const std::vector<uint16_t> got = out.download<uint16_t>();
  ASSERT_EQ(got.size(), w.combined_x.size());
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = ref::bf16_to_float(got[i]), want = ref::bf16_to_float(w.combined_x[i]);
    const double tol = 3.0 * std::ldexp(ref::bf16_to_float(absref[i]) * (1.0 + std::ldexp(1.0, -7)), -8) + 1e-30;
    if (!(std::fabs(g - want) <= tol)) {
      ADD_FAILURE() << "combined_x (BF16 partials): element " << i << " got " << g << " want " << want << ", bound "
                    << tol;
      return;
    }
  }
  if (c.with_topk) EXPECT_TRUE(same_values(out_w.download<float>(), w.combined_topk_weights, "combined_topk_weights"));
}

void NormalRank::expect_cached() const {
  const int H = c.hidden, G = c.scale_words();
  const int elt = c.dtype == DType::kBF16 ? 2 : 1;
  EXPECT_TRUE(same_values(cx.download<uint8_t>(), reference.cached[r].recv_x, "cached recv_x", nrecv * H * elt));
  if (c.dtype == DType::kFP8E4M3)
    EXPECT_TRUE(same_scale_words(csc, reference.cached[r].recv_scales, "cached recv_x_scales", nrecv * G));
}

void NormalRank::replay_graph(Buffer& buf, cudaStream_t stream, const StreamOrder& order, const DispatchInputs& di,
                              const DispatchOutputs& dout, const CombineInputs& ci, const CombineOutputs& co,
                              bool bit_exact) const {
  const int elt = c.dtype == DType::kBF16 ? 2 : 1;
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  cuda_ok(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "begin capture");
  buf.get_dispatch_layout(topk.view(), c.num_experts, layout_outputs(), order);
  DispatchHandle gh = handle();
  const DispatchPlan gp = buf.dispatch_prepare(di, gh, per_expert_recv.view(), order);
  gh.recv_src_idx = src.view();
  buf.dispatch_run(di, gp, gh, dout, order);
  buf.combine(ci, gh, co, order);
  cuda_ok(cudaStreamEndCapture(stream, &graph), "end capture");
  cuda_ok(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
  for (int replay = 0; replay < 3; ++replay) {
    // Same routing, new data: outputs must follow.
    x.upload(replay % 2 ? ri.x : ri.x2);
    cuda_ok(cudaGraphLaunch(exec, stream), "graph launch");
    cuda_ok(cudaStreamSynchronize(stream), "graph sync");
    const auto& want_x = replay % 2 ? want.recv_x : reference.cached[r].recv_x;
    EXPECT_TRUE(same_values(rx.download<uint8_t>(), want_x, "graph recv_x", nrecv * c.hidden * elt));
    if (bit_exact)
      EXPECT_TRUE(same_values(out.download<uint16_t>(), reference.combine[r].combined_x, "graph combined_x"));
    else EXPECT_TRUE(close_bf16(out.download<uint16_t>(), reference.combine[r].combined_x, "graph combined_x", 1e-2));
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
}

}  // namespace epcomm::test
