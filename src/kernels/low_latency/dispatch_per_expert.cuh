// Low-latency dispatch, per-expert path (EPCOMM_LL_PER_RANK=0, and the network path): the send and
// receive halves, templates over the network (LLNoNet: every peer by LSA, dispatch.cu; LLNet:
// ranks of other nodes through the transport, dispatch_net.cu). See params.hpp for the scheme.
//
// send:    every block histograms topk_idx (rows per expert before its own tokens; totals of the
//          experts whose count flag it owns), sends those count flags, then walks its own
//          contiguous run of tokens: stage the token (FP8 cast once, or the BF16 row) in shared
//          memory, and one warp per k stores the message into the owner's slot and releases its
//          header. No waits at all.
// receive: a warp per (local expert, source) unit (several when there are warps to spare) waits
//          for the counts of that expert from sources 0..src (the packed begin is their prefix),
//          writes layout_range / recv_count, then copies each message as its header arrives: data
//          to recv_x, scales transposed, the source token to src_info.
#pragma once

#include <cstdint>

#include "kernels/low_latency/dispatch_common.cuh"
#include "kernels/low_latency/dispatch_smem.cuh"
#include "kernels/low_latency/ll_net.cuh"

namespace epcomm::dev {

// Network path's shared memory of the send half (static, inside kLowLatencyNetStaticSmem).
struct NetSendSmem {
  int32_t sent[kMaxLowLatencyRanks];  // messages this block put to each rank
  int32_t any_remote[2];              // per staging area: the token has a k on a rank of another node
  int32_t last;
};

template <class NetT, bool kProbe = false>
__device__ void dispatch_send(const LowLatencyDispatchParams& p, uint32_t seq, const SendSmem& sm, const NetT& net,
                              NetSendSmem* ns) {
  const CommonParams& c = p.common;
  const LowLatencyLayout& L = p.layout;
  const int E = L.num_experts, EL = L.local_experts, K = p.num_topk, T = p.num_tokens, H = L.hidden;
  const int grid = static_cast<int>(gridDim.x), b = static_cast<int>(blockIdx.x);
  const int tid = static_cast<int>(threadIdx.x), nthreads = static_cast<int>(blockDim.x);
  const int warp = warp_id(), lane = lane_id();
  const int t_begin = static_cast<int>(static_cast<int64_t>(b) * T / grid);
  const int t_end = static_cast<int>(static_cast<int64_t>(b + 1) * T / grid);
  const int owned_n = (E + grid - 1) / grid;

  for (int i = tid; i < E + owned_n; i += nthreads) sm.hist[i] = 0;  // owned follows hist
  if constexpr (NetT::kEnabled)
    for (int i = tid; i < c.num_ranks; i += nthreads) ns->sent[i] = 0;
  __syncthreads();
  const int64_t entries = static_cast<int64_t>(T) * K;
  for (int64_t i = tid; i < entries; i += nthreads) {
    const int64_t e = p.topk_idx[i];
    if (e < 0 || e >= E) continue;  // out of range counts as -1 (no host check without a sync)
    const int t = static_cast<int>(i / K);
    if (t < t_begin) atomicAdd(&sm.hist[e], 1);
    if (static_cast<int>(e) % grid == b) atomicAdd(&sm.owned[static_cast<int>(e) / grid], 1);
  }
  __syncthreads();
  probe_mark<kProbe>(p, kProbeHistogram);

  // Counts first: receivers then know where each source's rows start before any message lands.
  for (int i = tid; i < owned_n; i += nthreads) {
    const int e = b + i * grid;
    if (e >= E) break;
    if (peer_masked(p.mask, e / EL)) continue;  // shrink mode: nothing goes to a masked rank
    if constexpr (NetT::kEnabled) {
      if (net.remote(e / EL)) {  // into this rank's staging entry for that rank (put by the last block)
        reinterpret_cast<uint32_t*>(net.mine + net.L().out_entry(p.buffer, e / EL))[e % EL] =
            static_cast<uint32_t>(min(sm.owned[i], L.max_tokens));
        continue;
      }
    }
    uint64_t* flag = reinterpret_cast<uint64_t*>(peer_region(p, e / EL) + L.count(p.buffer, e % EL, c.rank));
    // A source has Tmax slots per expert; only tokens that list an expert twice can exceed them.
    // Relaxed: the count guards no data (every message has its own released header), so no fence.
    st_relaxed_sys(flag, tag(seq, static_cast<uint32_t>(min(sm.owned[i], L.max_tokens)) + 1u));
  }

  probe_mark<kProbe>(p, kProbeCounts);
  const int G = H / kLowLatencyScaleGroup;
  const int payload16 = p.use_fp8 ? static_cast<int>((H + align_up(4 * G, 16)) / 16) : H / 8;
  for (int t = t_begin, it = 0; t < t_end; ++t, ++it) {
    const int sb = p.staging_buffers == 2 ? (it & 1) : 0;
    uint8_t* msg = sm.staging + static_cast<size_t>(sb) * L.msg_bytes;
    int32_t* slot = sm.slots + sb * kMaxTopk;
    int32_t* expert = sm.experts + sb * kMaxTopk;
    if (warp == 0) {
      // The token's K ids in one load (a lane each); lane 0 then hands out the slots.
      const int64_t mine = lane < K ? p.topk_idx[static_cast<int64_t>(t) * K + lane] : -1;
      if constexpr (NetT::kEnabled)
        if (lane == 0) ns->any_remote[sb] = 0;
      // In k order, so a token that names an expert twice gets increasing slots: rows stay in
      // (token, k) order inside each source, as the reference lays them out.
      for (int k = 0; k < K; ++k) {
        const int64_t e = __shfl_sync(0xffffffffu, mine, k);
        if (lane != 0) continue;
        const bool ok = e >= 0 && e < E;
        int s = ok ? sm.hist[e]++ : -1;
        if (s >= L.max_tokens) {  // no room: dropped and reported, never written past the slots
          report(c.wait, DeviceError::kBadArgument, WaitPhase::kNone, static_cast<int>(e),
                 static_cast<uint64_t>(L.max_tokens), 0);
          s = -1;
        }
        expert[k] = s >= 0 ? static_cast<int>(e) : -1;
        slot[k] = s;
        if constexpr (NetT::kEnabled) {
          if (s >= 0 && net.remote(static_cast<int>(e) / EL)) {
            const int d = static_cast<int>(e) / EL, le = static_cast<int>(e) % EL;
            *reinterpret_cast<uint32_t*>(net.mine + net.L().out_entry(p.buffer, d) + net.L().header_in_entry(le, s)) =
                static_cast<uint32_t>(t) | (static_cast<uint32_t>(k) << 16);
            ns->any_remote[sb] = 1;
          }
        }
      }
    }
    stage_token(p, t, msg);
    __syncthreads();
    if constexpr (NetT::kEnabled) {
      // A token with a k on another node: its message goes into this rank's window (put source).
      if (ns->any_remote[sb]) {
        int4* to = reinterpret_cast<int4*>(net.mine + net.L().token(p.buffer, t));
        for (int v = tid; v < payload16; v += nthreads) to[v] = reinterpret_cast<const int4*>(msg)[v];
        __syncthreads();
      }
    }
    for (int k = warp; k < K; k += kLowLatencyWarps) {
      const int e = expert[k];
      if (e < 0 || peer_masked(p.mask, e / EL)) continue;
      const int s = slot[k];
      if constexpr (NetT::kEnabled) {
        if (net.remote(e / EL)) {
          net.net.put_warp(e / EL, L.message(p.buffer, e % EL, c.rank, s), net.L().token(p.buffer, t),
                           static_cast<size_t>(payload16) * 16);
          if (lane == 0) atomicAdd(&ns->sent[e / EL], 1);
          continue;
        }
      }
      char* region = peer_region(p, e / EL);
      warp_copy<4>(reinterpret_cast<int4*>(region + L.message(p.buffer, e % EL, c.rank, s)),
                   reinterpret_cast<const int4*>(msg), payload16, LoadShared{});
      __syncwarp();
      if (lane == 0)
        st_release_sys(reinterpret_cast<uint64_t*>(region + L.header(p.buffer, e % EL, c.rank, s)),
                       tag(seq, (static_cast<uint32_t>(t) | (static_cast<uint32_t>(k) << 16)) + 1u));
    }
    // With one staging area the next token may not overwrite it before every warp sent it; with
    // two, the barrier after the next cast orders it.
    if (p.staging_buffers != 2) __syncthreads();
  }
  probe_mark<kProbe>(p, kProbeTokens);
  if constexpr (NetT::kEnabled) {
    // Each block signals the ranks it put to (a signal orders this block's puts before it).
    net.net.fence_puts();
    __syncthreads();
    for (int d = tid; d < c.num_ranks; d += nthreads)
      if (ns->sent[d] > 0)
        net.net.signal(d, net.L().signal_id(p.buffer, kLLNetData, c.rank), static_cast<uint64_t>(ns->sent[d]));
    // The last block puts every remote rank its counts and headers (all blocks wrote theirs).
    if (ll_net_last_block(&p.state->net_blocks_done[0], &ns->last)) {
      for (int d = warp; d < c.num_ranks; d += kLowLatencyWarps) {
        if (!net.remote(d) || peer_masked(p.mask, d)) continue;
        net.net.put_warp(d, net.L().in_entry(p.buffer, c.rank), net.L().out_entry(p.buffer, d), net.L().entry_bytes);
        net.net.fence_puts();
        __syncwarp();
        if (lane == 0) net.net.signal(d, net.L().signal_id(p.buffer, kLLNetMeta, c.rank), 1);
      }
    }
    net.net.flush(c.wait);
  }
}

// Network path: the count of (le, src) for a source of another node, from its meta entry once its
// kLLNetMeta signal passed the shadow (same payload and shrink settling as receive_count).
template <class NetT>
__device__ __forceinline__ bool receive_count_net(const LowLatencyDispatchParams& p, const NetT& net, int le, int src,
                                                  uint32_t seq, uint32_t& payload, long long& cycles) {
  const LowLatencyLayout& L = p.layout;
  const uint64_t target = net.shadow_value(p.buffer, kLLNetMeta, src) + 1;
  const PeerWait w =
      net.wait(p.common.wait, p.mask, p.buffer, kLLNetMeta, src, target, WaitPhase::kLowLatencyDispatchCount, cycles);
  if (w == PeerWait::kAborted) return false;
  payload = w == PeerWait::kArrived
                ? static_cast<uint32_t>(min(static_cast<int>(net.count_in(p.buffer, src, le)), L.max_tokens)) + 1u
                : 0u;
  payload = settled_count(p, le, src, seq, payload);
  return true;
}

template <class NetT>
__device__ void dispatch_recv(const LowLatencyDispatchParams& p, uint32_t seq, const NetT& net) {
  const CommonParams& c = p.common;
  const LowLatencyLayout& L = p.layout;
  const int R = c.num_ranks, EL = L.local_experts, E = EL * R, H = L.hidden;
  const int64_t RT = static_cast<int64_t>(R) * L.max_tokens;
  const int G = H / kLowLatencyScaleGroup, W = (G + 3) / 4;
  const int lane = lane_id();
  const int total_warps = static_cast<int>(gridDim.x) * kLowLatencyWarps;
  const int gw = static_cast<int>(blockIdx.x) * kLowLatencyWarps + warp_id();
  const int Q = total_warps >= E ? total_warps / E : 1;  // warps per unit
  const char* mine = lsa_peer(p.common, c.rank) + p.region;

  for (int item = gw; item < E * Q; item += total_warps) {
    const int u = item % E, q = item / E;
    const int le = u / R, src = u % R;
    long long message_cycles = 0;
    // The counts of sources 0..src, 32 at a time (lane = source - base): src's rows start after
    // those of every source before it. One pass where R <= 32.
    int before = 0, count = 0;
    long long count_cycles = 0;
    for (int base = 0; base <= src; base += 32) {
      const int s = base + lane;
      long long cycles = 0;
      uint32_t payload = 0;
      bool ok = true;
      if (s <= src) {
        bool via_net = false;
        if constexpr (NetT::kEnabled) via_net = net.remote(s);
        if (via_net) {
          if constexpr (NetT::kEnabled) ok = receive_count_net(p, net, le, s, seq, payload, cycles);
        } else {
          ok = receive_count(p, mine, le, s, seq, payload, cycles);
        }
      }
      if (!__all_sync(0xffffffffu, ok)) return;
      const int cnt = payload > 0 ? static_cast<int>(payload - 1u) : 0;
      const int incl = warp_inclusive_sum(cnt);
      if (src - base < 32) {  // the last pass: src is lane src - base
        count = __shfl_sync(0xffffffffu, cnt, src - base);
        before += __shfl_sync(0xffffffffu, incl, src - base) - count;
        count_cycles = __shfl_sync(0xffffffffu, cycles, src - base);
      } else {
        before += __shfl_sync(0xffffffffu, incl, 31);
      }
    }
    const int begin = before;
    if (q == 0 && lane == 0) {
      p.layout_range[static_cast<int64_t>(le) * R + src] = (static_cast<int64_t>(begin) << 32) | count;
      if (src == R - 1) {
        p.recv_count[le] = begin + count;
        if (p.cumulative_recv_stats) p.cumulative_recv_stats[le] += begin + count;
      }
    }
    bool via_net = false;
    if constexpr (NetT::kEnabled) {
      via_net = net.remote(src);
      if (via_net && count > 0) {
        // Every message of src to this rank (all local experts) is in once its kLLNetData signal
        // passed the shadow by the sum of its counts. (Lane src % 32 of the last pass above acquired
        // the meta signal; the warp barrier orders the other lanes' reads of the counts after it.)
        __syncwarp();
        int total = 0;
        for (int e2 = lane; e2 < EL; e2 += 32)
          total += min(static_cast<int>(net.count_in(p.buffer, src, e2)), L.max_tokens);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffffu, total, o);
        int got = static_cast<int>(PeerWait::kArrived);
        if (lane == 0)
          got = static_cast<int>(net.wait(c.wait, p.mask, p.buffer, kLLNetData, src,
                                          net.shadow_value(p.buffer, kLLNetData, src) + static_cast<uint64_t>(total),
                                          WaitPhase::kLowLatencyDispatchMessage, message_cycles));
        got = __shfl_sync(0xffffffffu, got, 0);
        __syncwarp();  // lane 0 acquired the data signal: the messages and headers are read after it
        if (got == static_cast<int>(PeerWait::kAborted)) return;
        if (got == static_cast<int>(PeerWait::kMasked)) {
          if (q == 0 && lane == 0)
            p.layout_range[static_cast<int64_t>(le) * R + src] = static_cast<int64_t>(begin) << 32;
          continue;
        }
      }
    }
    for (int j = q; j < count; j += Q) {
      uint64_t h = 0;
      int got = static_cast<int>(PeerWait::kArrived);
      if (via_net) {
        if constexpr (NetT::kEnabled) {
          // The header came in the meta entry; the combine reads it from the per-expert header.
          const uint32_t hv = net.header_in(p.buffer, src, le, j);
          h = static_cast<uint64_t>(hv) + 1u;
          if (lane == 0) *reinterpret_cast<uint64_t*>(net.mine + L.header(p.buffer, le, src, j)) = tag(seq, hv + 1u);
        }
      } else if (lane == 0) {
        got = static_cast<int>(
            wait_tag_or_mask(c.wait, p.mask, reinterpret_cast<const uint64_t*>(mine + L.header(p.buffer, le, src, j)),
                             tag(seq, 1), WaitPhase::kLowLatencyDispatchMessage, src, h, message_cycles));
      }
      got = __shfl_sync(0xffffffffu, got, 0);
      if (got == static_cast<int>(PeerWait::kAborted)) return;
      if (got == static_cast<int>(PeerWait::kMasked)) {
        // Shrink mode: the source was masked in the middle of its rows; they are not valid.
        if (lane == 0) p.layout_range[static_cast<int64_t>(le) * R + src] = static_cast<int64_t>(begin) << 32;
        break;
      }
      h = __shfl_sync(0xffffffffu, h, 0);
      const int t = static_cast<int>(tag_payload(h) & 0xffffu);
      const int64_t row = static_cast<int64_t>(le) * RT + begin + j;
      const uint8_t* msg = reinterpret_cast<const uint8_t*>(mine + L.message(p.buffer, le, src, j));
      if (p.use_fp8) {
        warp_copy<8>(reinterpret_cast<int4*>(p.recv_x + row * H), reinterpret_cast<const int4*>(msg), H / 16, LoadCg{});
        const float* scales = reinterpret_cast<const float*>(msg + H);
        const int64_t col = begin + j;
        if (!p.use_ue8m0) {
          for (int g = lane; g < G; g += 32)
            p.recv_scales[(static_cast<int64_t>(le) * G + g) * RT + col] = __ldcg(scales + g);
        } else {
          for (int w = lane; w < W; w += 32) {
            uint32_t word = 0;
#pragma unroll
            for (int i = 0; i < 4; ++i)
              if (4 * w + i < G) word |= ((__float_as_uint(__ldcg(scales + 4 * w + i)) >> 23) & 0xffu) << (8 * i);
            p.recv_scales_packed[(static_cast<int64_t>(le) * W + w) * RT + col] = static_cast<int32_t>(word);
          }
        }
      } else {
        warp_copy<8>(reinterpret_cast<int4*>(p.recv_x + row * 2 * H), reinterpret_cast<const int4*>(msg), H / 8,
                     LoadCg{});
      }
      if (lane == 0) p.src_info[row] = t;
    }
    if (p.wait_cost_stats && lane == 0 && (count_cycles + message_cycles) > 0)
      atomicAdd(reinterpret_cast<unsigned long long*>(p.wait_cost_stats + src),
                static_cast<unsigned long long>(count_cycles + message_cycles));
  }
}

// Network path: the last block past the receive half advances the shadows by what each source of
// another node sent this call (one meta signal; its counts' sum of data). A source whose meta never
// came (masked) advances only the meta shadow (ll_net.cuh: a masked peer needs a clean to return).
template <class NetT>
__device__ void finish_dispatch_recv_net(const LowLatencyDispatchParams& p, const NetT& net, NetSendSmem* ns) {
  if (!ll_net_last_block(&p.state->net_blocks_done[1], &ns->last)) return;
  const LowLatencyLayout& L = p.layout;
  for (int src = static_cast<int>(threadIdx.x); src < p.common.num_ranks; src += static_cast<int>(blockDim.x)) {
    if (!net.remote(src)) continue;
    const uint64_t meta = net.shadow_value(p.buffer, kLLNetMeta, src) + 1;
    *net.shadow(p.buffer, kLLNetMeta, src) = meta;
    if (net.signal_value(p.buffer, kLLNetMeta, src) < meta) continue;
    uint64_t total = 0;
    for (int le = 0; le < L.local_experts; ++le)
      total += min(static_cast<int>(net.count_in(p.buffer, src, le)), L.max_tokens);
    *net.shadow(p.buffer, kLLNetData, src) = net.shadow_value(p.buffer, kLLNetData, src) + total;
  }
}

}  // namespace epcomm::dev
