// Normal-mode dispatch across nodes (docs/contract.md §3.2), hierarchical. Bodies are templates over the
// network transport (EmulatedNet for virtual nodes, GinNet for real ones); dispatch.cu launches them.
//
// Design note.
//   Rank (n, l) is local rank l of node n. A token crosses the network once per destination node:
//   source (n, l) sends it to its *forwarder* (m, l) in each other node m that needs it, then every
//   destination (m, d) of node m pulls it over NVLink from the forwarder. Tokens whose node is the
//   source's own are pulled straight from the source (it is its own forwarder).
//   - notify (notify.cu) exchanges counts and per-chunk masks through the transport and builds the
//     same handle as the intranode path: rank_prefix_matrix and chunk_offset (first receive row of
//     every (source, chunk)), so row order, handle and cached dispatch are exactly the contract's.
//   - send kernel: each rank stages every token that goes anywhere into its own region at
//     rows[own node][t] (row, scales, topk; t inside the round's window) and its per-node masks; then puts rows[own][t]
//     to forwarder (m, l) at the same offset for each other node m the token goes to (one put per token and node), and,
//     from the last block, the mask array of node m. Each block signals each forwarder once after its puts (the last
//     block twice), so a forwarder expects B + 1 per call.
//   - receive kernel: the forwarder waits for those signals and raises a node flag per source node
//     (LSA); every rank then, for each (source, chunk) it receives rows from, reads the chunk's
//     masks at the forwarder, picks its bit and copies each row to its final position
//     chunk_offset[source][chunk] + k. A forwarder's rows are free again once all its node peers
//     finished reading (a node barrier at the end of the receive kernel), and it then signals "free"
//     to its remote sources, which wait for it before their next puts.
//   Rounds: the rows hold a window of tokens per source node (params.hpp, inter_window); a call
//   whose tokens do not fit launches both kernels once per window [window_begin, window_end), with
//   the same flow control between rounds as between calls. The memory is what num_rdma_bytes gives,
//   whatever the nodes and tokens; Buffer::internode_size_hint is the size of one round.
#pragma once

#include "kernels/common/sequence.cuh"
#include "kernels/internode/common.cuh"
#include "kernels/normal/receive_plan.cuh"

namespace epcomm::dev {

template <class Net>
__device__ void inter_dispatch_send(const InterDispatchParams& p, const Net& net) {
  const InterCommon& ic = p.ic;
  const InterLayout& L = ic.layout;
  const InterDispatchGeometry& g = p.geo;
  const WaitContext& w = ic.common.wait;
  const Who me = who(ic);
  char* const mine = ic.net.window[me.rank];
  const int lane = lane_id(), warp = warp_id(), B = gridDim.x;
  const int T = p.num_tokens;
  const int num_chunks = (T + p.chunk - 1) / p.chunk;
  // This round's chunks (the window); rows sit at their index inside it.
  const int wb = p.window_begin, c_begin = wb / p.chunk;
  const int c_end = min(num_chunks, p.window_end / p.chunk);

  // 1. Every remote forwarder must have released what this rank put there last time.
  int ok = 1;
  if (threadIdx.x < me.N && threadIdx.x != me.node) {
    const int f = threadIdx.x * me.P + me.local;
    const uint64_t least = *at<uint64_t>(mine, L.shadow(kSigDispatchFree, f));
    ok = net.wait_signal(w, L.signal_id(kSigDispatchFree, f), least, WaitPhase::kDispatchSlotFree, f);
  }
  ok = __syncthreads_and(ok);

  // 2. Stage this block's chunks; put each token's row once to every other node it goes to.
  uint64_t rows_sent = 0;
  for (int c = c_begin + blockIdx.x; ok && c < c_end; c += B) {
    for (int t = c * p.chunk + warp; t < (c + 1) * p.chunk; t += kInterWarps) {
      const bool valid = t < T;
      const RankMask full = token_ranks(p.is_token_in_rank, t, me.R, valid);
      if (lane < me.N) {
        const uint32_t bits = node_bits(full, lane, me.P);
        *at<uint32_t>(mine, lane == me.node ? g.mask(L, me.node, t) : g.send_mask(L, lane, t)) = bits;
      }
      if (full == 0) continue;
      char* row = mine + g.row(L, me.node, t - wb);
      warp_copy(row, p.x + static_cast<size_t>(t) * p.row_bytes, p.row_bytes);
      const int G = p.num_scales, K = p.num_topk;
      auto* meta = reinterpret_cast<uint32_t*>(row + p.row_bytes);
      for (int f = lane; f < G + 2 * K; f += 32) {
        uint32_t v;
        if (f < G) v = p.x_scales[t * p.scale_stride_token + f * p.scale_stride_group];
        else if (f < G + K)
          v = static_cast<uint32_t>(static_cast<int32_t>(p.topk_idx[static_cast<int64_t>(t) * K + (f - G)]));
        else v = p.topk_weights ? __float_as_uint(p.topk_weights[static_cast<int64_t>(t) * K + (f - G - K)]) : 0u;
        meta[f] = v;
      }
      __syncwarp();
      for (int m = 0; m < me.N; ++m) {
        if (m == me.node || node_bits(full, m, me.P) == 0) continue;
        net.put_warp(m * me.P + me.local, g.row(L, me.node, t - wb), g.row(L, me.node, t - wb), g.drow);
        ++rows_sent;
      }
    }
  }
  if (lane == 0) add_stat(ic, kStatRowsSent, rows_sent);
  net.fence_puts();
  __syncthreads();
  if (ok && threadIdx.x < me.N && threadIdx.x != me.node)
    net.signal(threadIdx.x * me.P + me.local, L.signal_id(kSigDispatchData, me.rank), 1);

  // 3. The last block sends the mask arrays (all blocks wrote theirs) and counts the call.
  if (grid_phase_last(at<uint32_t>(mine, L.counters) + kCountSendDone)) {
    const size_t bytes = align_up(static_cast<size_t>(max(c_end - c_begin, 0)) * p.chunk * 4, 16);
    for (int m = warp; ok && m < me.N; m += kInterWarps) {
      if (m == me.node) continue;
      const int f = m * me.P + me.local;
      if (bytes > 0) net.put_warp(f, g.mask(L, me.node, wb), g.send_mask(L, m, wb), bytes);
      net.fence_puts();
      __syncwarp();
      if (lane == 0) net.signal(f, L.signal_id(kSigDispatchData, me.rank), 1);
    }
    if (threadIdx.x < me.N && threadIdx.x != me.node)
      *at<uint64_t>(mine, L.shadow(kSigDispatchFree, threadIdx.x * me.P + me.local)) += 1;
  }
  net.flush(w);
}

template <class Net>
__device__ void inter_dispatch_recv(const InterDispatchParams& p, const Net& net, uint32_t seq) {
  const InterCommon& ic = p.ic;
  const InterLayout& L = ic.layout;
  const InterDispatchGeometry& g = p.geo;
  const WaitContext& w = ic.common.wait;
  const Who me = who(ic);
  char* const mine = ic.net.window[me.rank];
  const int lane = lane_id(), warp = warp_id(), B = gridDim.x;

  // Forwarder: once a source node's rows are here, tell the node (one flag per source node).
  if (blockIdx.x == 0 && warp == 0 && lane < me.N) {
    bool ok = true;
    if (lane != me.node) {
      const int src = lane * me.P + me.local;
      uint64_t* shadow = at<uint64_t>(mine, L.shadow(kSigDispatchData, src));
      const uint64_t least = *shadow + B + 1;
      ok = net.wait_signal(w, L.signal_id(kSigDispatchData, src), least, WaitPhase::kDispatchReady, src);
      if (ok) *shadow = least;
    }
    if (ok) st_release_sys(at<uint64_t>(mine, L.flag(kFlagForwardReady, lane)), tag(seq, 1));
  }
  __syncwarp();

  // Receivers: a warp per (source, chunk).
  const int K = p.num_topk, G = p.num_scales;
  const int expert_begin = me.rank * p.experts_per_rank;
  RankMask ready = 0;  // sources whose forwarder flag this warp has seen
  uint64_t nvl_bytes = 0;
  uint32_t rows_done = 0;  // rows of the (source, chunk) items this warp copied
  bool ok = true;
  const int wb = p.window_begin, c_begin = wb / p.chunk;
  const int wchunks = (p.window_end - wb) / p.chunk;  // this round's chunks of every source
  const int items = me.R * wchunks;
  for (int item = blockIdx.x * kInterWarps + warp; ok && item < items; item += B * kInterWarps) {
    const int i = item / wchunks, c = c_begin + item % wchunks;
    if (c >= p.max_chunks) continue;
    const int32_t* offsets = p.chunk_offset + static_cast<int64_t>(i) * p.chunk_offset_stride;
    const int row_begin = offsets[c];
    const int rows = offsets[c + 1] - row_begin;
    if (rows <= 0) continue;
    const int n = i / me.P;
    const int fwd = me.node * me.P + i % me.P;
    const char* F = ic.net.window[fwd];
    if (!(static_cast<uint32_t>(ready >> i) & 1u)) {
      ok =
          warp_wait_flag(w, at<uint64_t>(F, L.flag(kFlagForwardReady, n)), tag(seq, 1), WaitPhase::kDispatchReady, fwd);
      if (!ok) break;
      __syncwarp();  // every lane's loads below come after lane 0's acquire
      ready |= static_cast<RankMask>(1) << i;
    }
    const int t0 = c * p.chunk;
    const uint32_t mk = lane < p.chunk ? __ldcg(at<uint32_t>(F, g.mask(L, n, t0 + lane))) : 0u;
    uint32_t sel = __ballot_sync(0xffffffffu, (mk >> me.local) & 1u);
    if (__popc(sel) != rows) {
      if (lane == 0) report_mismatch(w, WaitPhase::kDispatchReady, fwd, rows, __popc(sel));
      ok = false;
      break;
    }
    for (int k = 0; k < rows; ++k) {
      const int pos = __ffs(sel) - 1;
      sel &= sel - 1;
      const int t = t0 + pos;
      const int64_t row = row_begin + k;
      if (row >= p.num_rows) continue;  // num_worst_tokens too small: reported by the host, never overrun
      const char* src = F + g.row(L, n, t - wb);
      warp_copy(p.recv_x + row * p.row_bytes, src, p.row_bytes);
      const auto* meta = reinterpret_cast<const uint32_t*>(src + p.row_bytes);
      for (int f = lane; f < G; f += 32) p.recv_scales[row * G + f] = __ldcg(meta + f);
      if (lane < K) {
        const int32_t e = static_cast<int32_t>(__ldcg(meta + G + lane));
        const float wt = __uint_as_float(__ldcg(meta + G + K + lane));
        const bool local = e >= expert_begin && e < expert_begin + p.experts_per_rank;
        p.recv_topk_idx[row * K + lane] = local ? e - expert_begin : -1;
        if (p.recv_topk_weights) p.recv_topk_weights[row * K + lane] = local ? wt : 0.f;
      }
      if (!p.cached && lane == 0) p.recv_src_idx[row] = t;
    }
    if (fwd != me.rank) nvl_bytes += static_cast<uint64_t>(rows) * p.row_bytes;
    rows_done += rows;
  }
  if (lane == 0) add_stat(ic, kStatNvlBytes, nvl_bytes);
  if (lane == 0 && rows_done) atomicAdd(at<uint32_t>(mine, L.counters) + kCountRowsReceived, rows_done);

  // num_worst_tokens: rows past the real count get topk -1 and weight 0.
  if (p.last_round && p.num_worst_tokens > 0 && K > 0)
    pad_worst_topk(w, me.rank, p.chunk_offset, p.chunk_offset_stride, me.R, p.num_worst_tokens, K, p.recv_topk_idx,
                   p.recv_topk_weights);

  // Node barrier: once every node peer has read this rank's rows, the remote sources may send again.
  if (grid_phase_last(at<uint32_t>(mine, L.counters) + kCountRecvDone)) {
    // Every row of the plan must have been copied (over all rounds): a skipped item is an error, never silent.
    if (p.last_round && threadIdx.x == 0) {
      const uint32_t got = atomicExch(at<uint32_t>(mine, L.counters) + kCountRowsReceived, 0u);
      const int32_t end =
          p.chunk_offset[static_cast<int64_t>(me.R - 1) * p.chunk_offset_stride + p.chunk_offset_stride - 2];
      if (!aborted(w) && got != static_cast<uint32_t>(end))
        report_mismatch(w, WaitPhase::kDispatchReady, me.rank, static_cast<uint64_t>(end), got);
    }
    if (threadIdx.x < me.P) {
      char* peer = ic.net.window[me.node * me.P + threadIdx.x];
      st_release_sys(at<uint64_t>(peer, L.flag(kFlagDispatchRead, me.local)), tag(seq, 1));
    }
    __syncthreads();
    int done = 1;
    if (threadIdx.x < me.P && !aborted(w))
      done = wait_flag_geq(w, at<uint64_t>(mine, L.flag(kFlagDispatchRead, threadIdx.x)), tag(seq, 1),
                           WaitPhase::kDispatchSlotFree, me.node * me.P + threadIdx.x);
    done = __syncthreads_and(done);
    if (done && threadIdx.x < me.N && threadIdx.x != me.node)
      net.signal(threadIdx.x * me.P + me.local, L.signal_id(kSigDispatchFree, me.rank), 1);
  }
}

}  // namespace epcomm::dev
