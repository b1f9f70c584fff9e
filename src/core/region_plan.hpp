// Where a Buffer's parts lie in its symmetric region (Buffer::Impl's constructor; the memory
// section of docs/design-internode.md). A pure function of the options and the group's shape, so
// the CPU tests check the sizes a GPU run would allocate.
#pragma once

#include <cstddef>

#include "kernels/common/control.hpp"
#include "kernels/internode/params.hpp"
#include "kernels/low_latency/kernel_params.hpp"

namespace epcomm {

struct RegionPlan {
  ControlLayout ctl;                       // the control part (offset 0)
  size_t data_offset = 0, data_bytes = 0;  // normal mode's rings in one node: num_nvl_bytes
  size_t ll_offset = 0, ll_bytes = 0;      // the low-latency region: num_rdma_bytes
  // Normal mode across nodes (bytes 0: none): its control part (signals, shadows, flags, count
  // entries: the state kept across calls) right before the LL region, then its two data halves on
  // the LL region, so num_rdma_bytes is held once whatever the mode (as DeepEP's). A normal-mode
  // call and a low-latency call overwrite each other's data, never their state: a low-latency call
  // after normal-mode ones takes clean_low_latency_buffer first (require_low_latency_data).
  size_t inter_offset = 0, inter_bytes = 0;
  size_t total = 0;  // the allocation
};

// `internode`: more than one node and normal mode's kernels hold the group
// (Buffer::Impl::normal_mode_fits). max_tokens, max_local_experts: the buffer's limits.
inline RegionPlan plan_regions(size_t num_nvl_bytes, size_t num_rdma_bytes, int num_ranks, int ranks_per_node,
                               int max_tokens, int max_local_experts, bool internode) {
  RegionPlan p;
  const int max_chunks = (max_tokens + 7) / 8;  // the smallest chunk is 8 tokens
  // The control part's LL area holds clean_low_latency_buffer's barrier flags (one per rank).
  p.ctl = ControlLayout::make(ranks_per_node, max_chunks, max_local_experts, low_latency_clean_flag_bytes(num_ranks));
  p.data_offset = p.ctl.total;
  p.data_bytes = align_up(num_nvl_bytes, 4096);
  p.ll_offset = p.data_offset + p.data_bytes;
  p.ll_bytes = align_up(num_rdma_bytes, 4096);
  if (internode) {
    const size_t control =
        InterLayout::make(num_ranks, ranks_per_node, max_tokens, max_chunks, max_local_experts, 0).control_bytes;
    p.inter_offset = p.ll_offset;
    p.ll_offset += control;
    p.inter_bytes = control + p.ll_bytes;
  }
  p.total = p.ll_offset + p.ll_bytes;
  return p;
}

}  // namespace epcomm
