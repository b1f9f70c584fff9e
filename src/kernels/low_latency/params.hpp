// Low-latency (LL) mode, docs/contract.md §3.3: the scheme, and its plain data shared by host
// (core/buffer_low_latency*.cpp) and device code (kernels/low_latency/*.cu), one concern a header:
//   region_layout.hpp  where things live in the LL region (LowLatencyLayout)
//   per_rank.hpp       the per-rank paths' level, selection and partial formats
//   lane_slot.hpp      the per-rank dispatch's slot arithmetic of one lane
//   net_layout.hpp     the network path's area (LowLatencyNetLayout)
//   state.hpp          call counters on the device, what the Buffer keeps on the host
//   probe.hpp          EPCOMM_LL_PROBE's phase marks
//   kernel_params.hpp  the kernels' arguments
//   launchers.hpp      the host-side launchers and their shared memory
//
// The algorithm in one paragraph. The LL region holds two buffers; each dispatch takes the next one
// (the handle records which) and its combine uses the same one. Dispatch: every block counts, from
// topk_idx, how many rows each expert gets from this rank, tells the experts it owns their count
// (one flag per (expert, source), `tag(seq, count + 1)`), then casts its own tokens (FP8 once per
// token, in shared memory) and stores one message per (token, k) into the owner's slot
// [local expert][source][slot], slot = rank of (token, k) among this rank's rows for that expert, so
// the order is deterministic (ascending token, then k). Each message carries its own flag (its
// header, `tag(seq, (t | k << 16) + 1)`), released after the message's stores, so receivers copy a
// message out as soon as it lands, while others are still in flight. Receivers learn the counts
// first, so each (expert, source) knows where its rows start in the packed output before any
// message arrives. Combine pushes each packed row back to its origin's slot [t][k] (t and k from
// the dispatch header the expert rank still holds), with a per-row flag; the origin sums a token as
// soon as its rows are there. When an expert rank has pushed everything it tells every origin
// (`done`), and an origin's combine ends only after all ranks said so: after that no rank reads its
// buffer any more, so the next dispatch into it is safe even when a CUDA graph reuses one buffer.
// Flags carry the call's sequence number (device counters, fresh at every graph replay) and are
// never reset.
//
// EPCOMM_LL_PER_RANK >= 1 switches to the per-rank variants (dispatch_per_rank.cu, combine_per_rank.cu): a token goes
// once to each destination rank (staged, then fanned out by the receiver into the same rows), and
// with 2, 3 or 4 (the default) the expert rank returns one pre-weighted partial per (token, rank).
// Same layout.
#pragma once

#include "kernels/low_latency/kernel_params.hpp"
#include "kernels/low_latency/lane_slot.hpp"
#include "kernels/low_latency/launchers.hpp"
#include "kernels/low_latency/net_layout.hpp"
#include "kernels/low_latency/per_rank.hpp"
#include "kernels/low_latency/probe.hpp"
#include "kernels/low_latency/region_layout.hpp"
#include "kernels/low_latency/state.hpp"
