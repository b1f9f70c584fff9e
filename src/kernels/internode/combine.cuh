// Normal-mode combine across nodes, hierarchical, mirroring dispatch: reduce inside the node first,
// then one message per (token, node) over the network. One kernel, three grid phases:
//   1. push: every expert rank copies each received row (and its topk weights) over NVLink into
//      the input of the row's forwarder (same node, local index of the row's origin) at
//      in[origin node][own local index][token], tagged with the call's sequence number (in the
//      part num_nvl_bytes gives where it holds them, else in the combine half: InterCombineGeometry);
//   2. node reduce: once all node peers pushed (node flags), the forwarder sums, for every token
//      of its origins (n, l), the rows its node peers sent, in float32 and ascending local rank,
//      and puts the partial sum to the origin (or writes it locally when it is the origin): float32,
//      or rounded to BF16 with BufferOptions::internode_bf16_partials (half the network bytes, one
//      more rounding, as DeepEP's);
//   3. final: the origin adds the partials of the nodes the token went to (ascending node), then
//      bias0, bias1, and rounds once to BF16. combined_topk_weights the same way (exact: a weight is
//      non-zero on one rank only).
// A call whose tokens do not fit the combine half's window runs the kernel once per window of
// every origin's tokens (params.hpp, inter_window), each a call of its own for the flow control.
// The summation order is (per node, ascending rank) then ascending node: not the intranode
// (ascending rank) order, so results match the float32 reference within rounding, not bit for bit.
#pragma once

#include "kernels/common/sequence.cuh"
#include "kernels/internode/common.cuh"

namespace epcomm::dev {

// The tag a pushed row carries (the call's number, and its complement): the node reduce takes a row
// whose tag is this call's. 64 bits, so that what a low-latency call left in memory the internode
// region shares (a low_latency_mode buffer, core/buffer.cpp) cannot pass for one.
__device__ __forceinline__ uint64_t row_tag(uint32_t seq) { return (static_cast<uint64_t>(seq) << 32) | ~seq; }

template <class Net>
__device__ void inter_combine(const InterCombineParams& p, const Net& net, uint32_t seq) {
  const InterCommon& ic = p.ic;
  const InterLayout& L = ic.layout;
  const InterCombineGeometry& g = p.geo;
  const WaitContext& w = ic.common.wait;
  const Who me = who(ic);
  char* const mine = ic.net.window[me.rank];
  // The pushed rows' base of node peer r (InterCombineGeometry::in_nvl: num_nvl_bytes's part).
  auto in_base = [&](int r) { return g.in_nvl ? lsa_peer(ic.common, r) : ic.net.window[r]; };
  char* const in_mine = in_base(me.rank);
  const int lane = lane_id(), warp = warp_id(), B = gridDim.x;
  const int gw = blockIdx.x * kInterWarps + warp, num_gw = B * kInterWarps;
  const int K = p.num_topk, H = p.hidden;
  const size_t row_bytes = static_cast<size_t>(H) * 2;
  uint32_t* counters = at<uint32_t>(mine, L.counters);
  // This round's tokens of every origin (the window); the arrays hold them at t - wb.
  const int wb = p.window_begin, wlen = p.window_end - p.window_begin;

  // 1. Push received rows to their forwarders.
  const int num_recv = min(p.rank_prefix_matrix[(me.R - 1) * me.R + me.rank], p.num_rows);
  uint64_t nvl_bytes = 0;
  for (int r = gw; r < num_recv; r += num_gw) {
    const int t = p.recv_src_idx[r];
    if (t >= 0 && t < L.max_tokens && (t < wb || t >= wb + wlen)) continue;  // another round's token
    int i = 0;
    for (int base = 0; base < me.R; base += 32) {
      const int s = base + lane;
      const uint32_t below = __ballot_sync(0xffffffffu, s < me.R && p.rank_prefix_matrix[s * me.R + me.rank] <= r);
      i += __popc(below);
    }
    if (t < 0 || t >= L.max_tokens) {  // a handle from a failed dispatch: report, never write out of bounds
      if (lane == 0)
        report(w, DeviceError::kBadArgument, WaitPhase::kNone, i, static_cast<uint64_t>(L.max_tokens),
               static_cast<uint64_t>(t));
      continue;
    }
    const int fwd = me.node * me.P + i % me.P;
    char* dst = in_base(fwd) + g.in_row(L, i / me.P, me.local, t - wb);
    warp_copy(dst + 16, p.x + static_cast<size_t>(r) * H, row_bytes);
    if (lane < K)
      at<float>(dst, 16 + row_bytes)[lane] = p.topk_weights ? p.topk_weights[static_cast<int64_t>(r) * K + lane] : 0.f;
    if (lane == 0) *at<uint64_t>(dst, 0) = row_tag(seq);
    if (fwd != me.rank) nvl_bytes += row_bytes;
  }
  if (lane == 0) add_stat(ic, kStatNvlBytes, nvl_bytes);
  __threadfence_system();
  if (grid_phase_last(counters + kCountPushDone) && threadIdx.x < me.P)
    st_release_sys(at<uint64_t>(ic.net.window[me.node * me.P + threadIdx.x], L.flag(kFlagCombinePushed, me.local)),
                   tag(seq, 1));

  // 2. Node reduce for origins (n, my local index).
  int ok = 1;
  if (threadIdx.x < me.P)
    ok = wait_flag_geq(w, at<uint64_t>(mine, L.flag(kFlagCombinePushed, threadIdx.x)), tag(seq, 1),
                       WaitPhase::kCombineReady, me.node * me.P + threadIdx.x);
  if (threadIdx.x >= 32 && threadIdx.x - 32 < me.N && threadIdx.x - 32 != me.node) {
    const int origin = (threadIdx.x - 32) * me.P + me.local;
    const uint64_t least = *at<uint64_t>(mine, L.shadow(kSigCombineFree, origin));
    ok = net.wait_signal(w, L.signal_id(kSigCombineFree, origin), least, WaitPhase::kCombineSlotFree, origin);
  }
  ok = __syncthreads_and(ok);
  const int vecs = H / 8;
  uint64_t rows_sent = 0;
  for (int item = gw; ok && item < me.N * wlen; item += num_gw) {
    const int n = item / wlen, t = item % wlen;  // t inside the window
    const bool here = lane < me.P && __ldcg(at<uint64_t>(in_mine, g.in_row(L, n, lane, t))) == row_tag(seq);
    const uint32_t present = __ballot_sync(0xffffffffu, here);
    if (present == 0) continue;
    char* dst = mine + (n == me.node ? g.net_row(L, n, t) : g.out_row(L, n, t));
    for (int v = lane; v < vecs; v += 32) {
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      for (uint32_t m = present; m; m &= m - 1) {
        const int d = __ffs(m) - 1;
        add_bf16x8(acc, __ldcg(at<int4>(in_mine, g.in_row(L, n, d, t) + 16) + v));
      }
      if (g.bf16_partials) {
        at<int4>(dst, 0)[v] = to_bf16x8(acc);
      } else {
        float4* o = at<float4>(dst, 0) + 2 * v;
        o[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
        o[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
      }
    }
    if (lane < K) {
      float s = 0.f;
      for (uint32_t m = present; m; m &= m - 1)
        s = __fadd_rn(s, __ldcg(at<float>(in_mine, g.in_row(L, n, __ffs(m) - 1, t) + 16 + row_bytes) + lane));
      at<float>(dst, g.partial_weights(H))[lane] = s;
    }
    __syncwarp();
    if (n != me.node) {
      net.put_warp(n * me.P + me.local, g.net_row(L, me.node, t), g.out_row(L, n, t), g.prow);
      ++rows_sent;
    }
  }
  if (lane == 0) add_stat(ic, kStatRowsSent, rows_sent);
  net.fence_puts();
  __syncthreads();
  if (ok && threadIdx.x < me.N && threadIdx.x != me.node)
    net.signal(threadIdx.x * me.P + me.local, L.signal_id(kSigCombineData, me.rank), 1);
  if (grid_phase_last(counters + kCountReduceDone)) {
    // This rank's own partials are written, and it has read all its input: peers may push again.
    if (threadIdx.x == 0) st_release_sys(at<uint64_t>(mine, L.flag(kFlagOwnPartial, 0)), tag(seq, 1));
    if (threadIdx.x < me.P)
      st_release_sys(at<uint64_t>(ic.net.window[me.node * me.P + threadIdx.x], L.flag(kFlagCombineRead, me.local)),
                     tag(seq, 1));
  }

  // 3. Final sums at the origin.
  ok = 1;
  if (threadIdx.x < me.N) {
    if (threadIdx.x == me.node) {
      ok = wait_flag_geq(w, at<uint64_t>(mine, L.flag(kFlagOwnPartial, 0)), tag(seq, 1), WaitPhase::kCombineReady,
                         me.rank);
    } else {
      const int fwd = threadIdx.x * me.P + me.local;
      const uint64_t least = *at<uint64_t>(mine, L.shadow(kSigCombineData, fwd)) + B;
      ok = net.wait_signal(w, L.signal_id(kSigCombineData, fwd), least, WaitPhase::kCombineReady, fwd);
    }
  }
  ok = __syncthreads_and(ok);
  const int t_end = min(p.num_tokens, wb + wlen);
  for (int t = wb + gw; ok && t < t_end; t += num_gw) {
    const RankMask full = token_ranks(p.is_token_in_rank, t, me.R, true);
    uint64_t nodes = 0;
    for (int m = 0; m < me.N; ++m)
      if (node_bits(full, m, me.P)) nodes |= 1ull << m;
    const int4* b0 = p.bias0 ? reinterpret_cast<const int4*>(p.bias0 + static_cast<int64_t>(t) * H) : nullptr;
    const int4* b1 = p.bias1 ? reinterpret_cast<const int4*>(p.bias1 + static_cast<int64_t>(t) * H) : nullptr;
    int4* out = reinterpret_cast<int4*>(p.out + static_cast<int64_t>(t) * H);
    for (int v = lane; v < vecs; v += 32) {
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      for (uint64_t m = nodes; m; m &= m - 1) {
        if (g.bf16_partials) add_bf16x8(acc, __ldcg(at<int4>(mine, g.net_row(L, __ffsll(m) - 1, t - wb)) + v));
        else add_f32x8(acc, at<float4>(mine, g.net_row(L, __ffsll(m) - 1, t - wb)) + 2 * v);
      }
      if (b0) add_bf16x8(acc, b0[v]);
      if (b1) add_bf16x8(acc, b1[v]);
      out[v] = to_bf16x8(acc);
    }
    if (lane < K && p.out_topk_weights) {
      float s = 0.f;
      for (uint64_t m = nodes; m; m &= m - 1)
        s = __fadd_rn(s, __ldcg(at<float>(mine, g.net_row(L, __ffsll(m) - 1, t - wb) + g.partial_weights(H)) + lane));
      p.out_topk_weights[static_cast<int64_t>(t) * K + lane] = s;
    }
  }

  // End: wait until every node peer has read the input this rank pushed into (the next combine
  // pushes again), free this rank's partial slots for the remote forwarders, count the call.
  if (grid_phase_last(counters + kCountFinalDone)) {
    int done = 1;
    if (threadIdx.x < me.P && !aborted(w))
      done = wait_flag_geq(w, at<uint64_t>(mine, L.flag(kFlagCombineRead, threadIdx.x)), tag(seq, 1),
                           WaitPhase::kCombineSlotFree, me.node * me.P + threadIdx.x);
    done = __syncthreads_and(done);
    if (threadIdx.x < me.N && threadIdx.x != me.node) {
      const int peer = threadIdx.x * me.P + me.local;
      if (done) net.signal(peer, L.signal_id(kSigCombineFree, me.rank), 1);
      *at<uint64_t>(mine, L.shadow(kSigCombineData, peer)) += B;
      *at<uint64_t>(mine, L.shadow(kSigCombineFree, peer)) += 1;
    }
  }
  net.flush(w);
}

}  // namespace epcomm::dev
