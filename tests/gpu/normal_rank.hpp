// One rank's part of a normal-mode problem on the device, shared by the tests inside one node
// (test_normal.cpp) and across virtual nodes (internode_case.cpp): the rank's inputs uploaded, every
// output tensor allocated (poisoned) before the first call, the call arguments over them, and the
// comparison of each output with the CPU reference. Ranks that share a GPU are threads of one
// process: a rank must not allocate (or free) while a co-resident rank's kernel waits for it
// (README "Limits"), hence everything up front.
#pragma once

#include <cuda_runtime_api.h>

#include <optional>

#include "normal_problem.hpp"

namespace epcomm::test {

struct NormalRank {
  // stride: buf.chunk_offset_stride(dispatch config). The per-node counts exist with several nodes
  // (c.ranks_per_node > 0).
  NormalRank(const NormalProblem& c, const NormalReference& reference, int r, int stride, int dev);

  // (Re)allocates every output tensor, poisoned (the old ones freed: a device-wide wait).
  void allocate_outputs();
  // Poisons every output (not the combine inputs) so that the next calls must write it again.
  void poison_outputs() const;
  // The combine inputs of the reference (expert outputs, weights, biases) into y, cw, b0, b1.
  void upload_combine_inputs() const;

  // Call arguments over the tensors.
  LayoutOutputs layout_outputs() const;
  DispatchInputs dispatch_inputs(const Config& cfg) const;
  DispatchHandle handle() const;  // rank_prefix_matrix and chunk_offset; recv_src_idx after the plan
  DispatchOutputs dispatch_outputs() const;
  CombineInputs combine_inputs(const Config& ccfg) const;
  CombineOutputs combine_outputs() const;
  std::optional<TensorView> cached_scales() const;  // the second inputs' scales (FP8)
  DispatchOutputs cached_outputs() const;

  // get_dispatch_layout on `stream`, waited for, each count against the reference.
  void run_layout(Buffer& buf, cudaStream_t stream, const StreamOrder& order) const;
  // The count exchange (dispatch_prepare) into `h` (a handle()), its plan against the reference,
  // and h.recv_src_idx set for dispatch_run; nothing when the planned rows differ (a failure: the
  // outputs cannot be compared).
  std::optional<DispatchPlan> prepare_dispatch(Buffer& buf, const DispatchInputs& di, DispatchHandle& h,
                                               const StreamOrder& order) const;

  // Each output against the reference (gtest expectations).
  void expect_layout() const;
  void expect_plan(const DispatchPlan& plan) const;  // the host's per-expert counts
  void expect_dispatch() const;               // prefix matrix, per-expert counts, rows, source indices, scales, topk
  void expect_combine(bool bit_exact) const;  // within BF16 rounding; bit_exact: also bit for bit
  // Across nodes with BF16 partials: |got - want| <= 3 * 2^-8 * (the sum of the absolute values of
  // the token's contributions), the two roundings of a partial and of the result plus the
  // reference's own; weights bit for bit.
  void expect_combine_bf16_partials() const;
  void expect_cached() const;

  // layout + dispatch + combine captured once in a CUDA graph on `stream`, replayed three times
  // with new data (x and the second inputs in turn): the rows and the combine must follow
  // (combine bit for bit where bit_exact, else within BF16 rounding).
  void replay_graph(Buffer& buf, cudaStream_t stream, const StreamOrder& order, const DispatchInputs& di,
                    const DispatchOutputs& dout, const CombineInputs& ci, const CombineOutputs& co,
                    bool bit_exact) const;

  const NormalProblem& c;
  const NormalReference& reference;
  const int r;
  const RankInputs& ri;
  const ref::NormalDispatchOutput& want;  // this rank's dispatch in the reference
  const int T, rows, stride, dev;
  const size_t nrecv;  // rows received (the rest of `rows` is padding with num_worst_tokens)
  DeviceTensor x, x2, sc, sc2, topk, weights;
  DeviceTensor per_rank, per_node, per_expert, in_rank, prefix, chunk_off, per_expert_recv;
  DeviceTensor rx, rsc, ridx, rw, src, y, cw, b0, b1, out, out_w, cx, csc;
};

}  // namespace epcomm::test
