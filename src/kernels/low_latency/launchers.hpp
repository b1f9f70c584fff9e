// Host-side entry points of the low-latency kernels (kernels/low_latency/*.cu) and the shared
// memory their launches need.
#pragma once

#include <cstdint>

#include "kernels/low_latency/kernel_params.hpp"
#include "kernels/low_latency/region_layout.hpp"

namespace epcomm {

// Host-side launchers (kernels/low_latency/*.cu). Grids of at most one block per SM: without a
// hook a block waits for rows its sibling blocks send to this rank, so all of them must be resident
// together (plain launches: several ranks' kernels share one GPU in the tests, each with a
// share of the SMs).
int low_latency_dispatch_shared_bytes(const LowLatencyLayout& layout, int num_blocks, int staging_buffers,
                                      bool per_rank = false);
// Shared memory of the per-rank path's receive half (0 for the per-expert path, whose receive uses none).
int low_latency_dispatch_recv_shared_bytes(const LowLatencyLayout& layout, bool per_rank);
// Dynamic shared memory of one dispatch launch with these phases (kLowLatencySend | kLowLatencyRecv).
int low_latency_dispatch_launch_shared_bytes(const LowLatencyLayout& layout, int num_blocks, int staging_buffers,
                                             bool per_rank, int phases);
void launch_low_latency_dispatch(const LowLatencyDispatchParams& p, int num_blocks, int smem_bytes, void* stream);
// The per-rank path's kernel (dispatch_per_rank.cu); launch_low_latency_dispatch takes it where p.per_rank.
void launch_low_latency_dispatch_per_rank(const LowLatencyDispatchParams& p, int num_blocks, int smem_bytes,
                                          void* stream);
void launch_low_latency_combine(const LowLatencyCombineParams& p, int num_blocks, void* stream);
// The per-rank combine's kernels (combine_per_rank.cu); launch_low_latency_combine takes them where
// p.partials != kNone.
void launch_low_latency_combine_per_rank(const LowLatencyCombineParams& p, int num_blocks, void* stream);
// Network path: see LowLatencyNetArgs.
struct EmulatedNetParams;
void launch_low_latency_dispatch_net(const LowLatencyDispatchParams& p, const LowLatencyNetArgs& a,
                                     const EmulatedNetParams& net, int num_blocks, int smem_bytes, void* stream);
void launch_low_latency_combine_net(const LowLatencyCombineParams& p, const LowLatencyNetArgs& a,
                                    const EmulatedNetParams& net, int num_blocks, void* stream);
// The same kernels over NCCL GIN (ll_net_gin.cuh), for ranks of real nodes: `g` reaches every rank
// (p.common.peer_base then holds only this node's ranks, the others nullptr).
struct GinNetParams;
void launch_low_latency_dispatch_gin(const LowLatencyDispatchParams& p, const LowLatencyNetArgs& a,
                                     const GinNetParams& g, int num_blocks, int smem_bytes, void* stream);
void launch_low_latency_combine_gin(const LowLatencyCombineParams& p, const LowLatencyNetArgs& a, const GinNetParams& g,
                                    int num_blocks, void* stream);
// Static shared memory the network path's kernels add to the dynamic amount (NetCombineSmem: two
// int32 per rank for kMaxLowLatencyRanks ranks, and flags; the .cu files check it).
constexpr int kLowLatencyNetStaticSmem = 8448;
// clean_low_latency_buffer over load/store: both barriers and the zeroing, one kernel of
// `num_blocks` blocks (LowLatencyCleanParams says how the clean goes).
void launch_low_latency_clean(const LowLatencyCleanParams& p, int num_blocks, void* stream);
// The same across real nodes: GIN signals to the ranks of other nodes (clean_gin.cu).
void launch_low_latency_clean_barrier_gin(const LowLatencyCleanParams& p, const GinNetParams& g, void* stream);

// Shrink mode's mask API (kernels/low_latency/mask.cu): sets mask[rank] = value, or every entry
// when rank < 0, on `stream`.
void launch_low_latency_set_mask(int32_t* mask, int num_ranks, int rank, int value, void* stream);

}  // namespace epcomm
