// Low-latency combine, per-expert path (the combine of a per-expert dispatch, of a per-rank dispatch
// at EPCOMM_LL_PER_RANK=1, and the network path): the send and receive halves, templates over the
// network (LLNoNet: every peer by LSA, combine.cu; LLNet: ranks of other nodes through the
// transport, combine_net.cu). See params.hpp for the scheme.
//
// send:    a warp per (local expert, source) unit (several when there are warps to spare) pushes
//          each of the unit's packed rows of y to the origin's slot [t][k] (t, k from the dispatch
//          header this rank still holds) and releases the row's flag; the last block past this
//          half tells every origin `done`.
// receive: a warp per (token, 256-channel slice) waits for the flags of the token's valid k, then
//          sums w * y in k order with separate multiply and add (no FMA: bit for bit the
//          reference), rounds once to BF16. Block 0 finally waits for every rank's `done`.
#pragma once

#include <cstdint>

#include "kernels/low_latency/combine_common.cuh"
#include "kernels/low_latency/ll_net.cuh"

namespace epcomm::dev {

// Network path's shared memory (static, inside kLowLatencyNetStaticSmem).
struct NetCombineSmem {
  int32_t rows[kMaxLowLatencyRanks];  // send: rows this block put to each origin; receive: rows each rank owes
  int32_t dead[kMaxLowLatencyRanks];  // receive: that rank was masked (its rows contribute nothing)
  int32_t stop;                       // receive: a wait was aborted
  int32_t last;
};

template <class NetT>
__device__ void combine_send(const LowLatencyCombineParams& p, uint32_t seq, const NetT& net, NetCombineSmem* ns) {
  const CommonParams& c = p.common;
  const LowLatencyLayout& L = p.layout;
  const int R = c.num_ranks, EL = L.local_experts, E = EL * R, H = L.hidden;
  const int64_t RT = static_cast<int64_t>(R) * L.max_tokens;
  const int lane = lane_id();
  const int total_warps = static_cast<int>(gridDim.x) * kLowLatencyWarps;
  const int gw = static_cast<int>(blockIdx.x) * kLowLatencyWarps + warp_id();
  const int Q = total_warps >= E ? total_warps / E : 1;
  const char* mine = lsa_peer(c, c.rank) + p.region;
  if constexpr (NetT::kEnabled) {
    for (int i = static_cast<int>(threadIdx.x); i < c.num_ranks; i += static_cast<int>(blockDim.x)) ns->rows[i] = 0;
    __syncthreads();
  }

  for (int item = gw; item < E * Q; item += total_warps) {
    const int u = item % E, q = item / E;
    const int le = u / R, src = u % R;
    if (peer_masked(p.mask, src)) continue;  // shrink mode: nothing goes to a masked rank
    const int64_t range = p.layout_range[static_cast<int64_t>(le) * R + src];
    const int64_t begin = range >> 32;
    int count = static_cast<int>(range & 0xffffffff);
    // A handle that does not fit the layout (not this buffer's dispatch) must not write out of
    // bounds on a peer; its rows are dropped and the origin times out naming this rank.
    if (begin < 0 || begin + count > RT || count > L.max_tokens) count = 0;
    // Only a rank of this node is in the peer table (past kMaxLsaRanks it lists this node alone).
    bool via_net = false;
    if constexpr (NetT::kEnabled) via_net = net.remote(src);
    char* const origin = via_net ? nullptr : lsa_peer(c, src) + p.region;
    for (int j = q; j < count; j += Q) {
      const uint64_t h = __ldcg(reinterpret_cast<const unsigned long long*>(mine + L.header(p.buffer, le, src, j)));
      const uint32_t v = tag_payload(h);
      const int t = static_cast<int>(v & 0xffffu), k = static_cast<int>(v >> 16);
      if (t >= L.max_tokens || k >= L.kslots) continue;
      const int4* row = reinterpret_cast<const int4*>(p.y + (static_cast<int64_t>(le) * RT + begin + j) * H);
      if constexpr (NetT::kEnabled) {
        if (via_net) {
          // Put source: the row's zero-copy place in this rank's window (staged there unless y is
          // that area; the dispatch's messages there were consumed by its receive).
          const size_t zc = L.message(p.buffer, 0, 0, 0) + (static_cast<size_t>(le) * RT + begin + j) * L.msg_bytes;
          if (!net.a.y_in_window) {
            warp_copy<8>(reinterpret_cast<int4*>(net.mine + zc), row, H / 8, LoadNc{});
            __syncwarp();
          }
          net.net.put_warp(src, L.combine_row(p.buffer, t, k), zc, L.msg_bytes);
          if (lane == 0) atomicAdd(&ns->rows[src], 1);
          continue;
        }
      }
      warp_copy<8>(reinterpret_cast<int4*>(origin + L.combine_row(p.buffer, t, k)), row, H / 8, LoadNc{});
      __syncwarp();
      if (lane == 0) st_release_sys(reinterpret_cast<uint64_t*>(origin + L.combine_flag(p.buffer, t, k)), tag(seq, 1));
    }
  }
  if constexpr (NetT::kEnabled) {
    // Each block signals the origins it put to (a signal orders this block's puts before it).
    net.net.fence_puts();
    __syncthreads();
    for (int r = static_cast<int>(threadIdx.x); r < R; r += static_cast<int>(blockDim.x))
      if (ns->rows[r] > 0)
        net.net.signal(r, net.L().signal_id(p.buffer, kLLNetCombineData, c.rank), static_cast<uint64_t>(ns->rows[r]));
    net.net.flush(c.wait);
  }
}

// kFirstWarp = 1: run by warps 1.. only (a split launch, see low_latency_combine_kernel, combine.cu), whose
// warp 0 waits for every rank's `done` instead.
template <class NetT, int kFirstWarp = 0>
__device__ void combine_recv(const LowLatencyCombineParams& p, uint32_t seq, const NetT& net, NetCombineSmem* ns) {
  static_assert(kFirstWarp == 0 || !NetT::kEnabled, "the network path's receive uses the whole block");
  const CommonParams& c = p.common;
  const LowLatencyLayout& L = p.layout;
  const int EL = L.local_experts, E = L.num_experts, H = L.hidden, K = p.num_topk, T = p.num_tokens;
  const int lane = lane_id();
  constexpr int kWarps = kLowLatencyWarps - kFirstWarp;
  const int total_warps = static_cast<int>(gridDim.x) * kWarps;
  const int gw = static_cast<int>(blockIdx.x) * kWarps + warp_id() - kFirstWarp;
  const int slices = (H + kSliceChannels - 1) / kSliceChannels;
  const char* mine = lsa_peer(c, c.rank) + p.region;
  if constexpr (NetT::kEnabled) {
    // The rows each rank of another node owes this rank (one per valid (t, k) on its experts),
    // then one wait per such rank for all of them.
    const int tid = static_cast<int>(threadIdx.x), nthreads = static_cast<int>(blockDim.x);
    for (int i = tid; i < c.num_ranks; i += nthreads) ns->rows[i] = ns->dead[i] = 0;
    if (tid == 0) ns->stop = 0;
    __syncthreads();
    for (int64_t i = tid; i < static_cast<int64_t>(T) * K; i += nthreads) {
      const int64_t id = p.topk_idx[i];
      if (id >= 0 && id < E && net.remote(static_cast<int>(id) / EL))
        atomicAdd(&ns->rows[static_cast<int>(id) / EL], 1);
    }
    __syncthreads();
    for (int r = tid; r < c.num_ranks; r += nthreads) {
      if (ns->rows[r] == 0) continue;
      long long cycles = 0;
      const PeerWait got =
          net.wait(c.wait, p.mask, p.buffer, kLLNetCombineData, r,
                   net.shadow_value(p.buffer, kLLNetCombineData, r) + static_cast<uint64_t>(ns->rows[r]),
                   WaitPhase::kLowLatencyCombineRow, cycles);
      if (got == PeerWait::kAborted) ns->stop = 1;
      if (got == PeerWait::kMasked) ns->dead[r] = 1;
      if (p.wait_cost_stats && blockIdx.x == 0 && cycles > 0)
        atomicAdd(reinterpret_cast<unsigned long long*>(p.wait_cost_stats + r),
                  static_cast<unsigned long long>(cycles));
    }
    __syncthreads();
    if (ns->stop) return;
  }

  for (int item = gw; item < T * slices; item += total_warps) {
    const int t = item / slices, s = item % slices;
    int e = -1;
    float w = 0.0f;
    if (lane < K) {
      const int64_t id = p.topk_idx[static_cast<int64_t>(t) * K + lane];
      if (id >= 0 && id < E) {
        e = static_cast<int>(id);
        w = p.topk_weights[static_cast<int64_t>(t) * K + lane];
      }
    }
    bool ok = true;
    long long cycles = 0;
    const int owner = e >= 0 ? e / EL : 0;
    bool via_net = false;
    if constexpr (NetT::kEnabled) {
      via_net = e >= 0 && net.remote(owner);
      if (via_net && ns->dead[owner]) e = -1;  // shrink mode: a masked rank's experts contribute nothing
    }
    if (e >= 0 && !via_net) {
      uint64_t v;
      const PeerWait got =
          wait_tag_or_mask(c.wait, p.mask, reinterpret_cast<const uint64_t*>(mine + L.combine_flag(p.buffer, t, lane)),
                           tag(seq, 1), WaitPhase::kLowLatencyCombineRow, owner, v, cycles);
      ok = got != PeerWait::kAborted;
      if (got == PeerWait::kMasked) e = -1;  // shrink mode: a masked rank's experts contribute nothing
    }
    if (!__all_sync(0xffffffffu, ok)) return;
    if (p.wait_cost_stats && cycles > 0)
      atomicAdd(reinterpret_cast<unsigned long long*>(p.wait_cost_stats + owner),
                static_cast<unsigned long long>(cycles));
    const uint32_t valid = __ballot_sync(0xffffffffu, e >= 0);
    const int c0 = s * kSliceChannels + lane * 8;
    const bool active = c0 < H;
    int4 v[kMaxTopk];
#pragma unroll
    for (int k = 0; k < kMaxTopk; ++k)
      if (active && ((valid >> k) & 1u))
        v[k] = __ldcg(reinterpret_cast<const int4*>(mine + L.combine_row(p.buffer, t, k)) + c0 / 8);
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
#pragma unroll
    for (int k = 0; k < kMaxTopk; ++k) {
      const float wk = __shfl_sync(0xffffffffu, w, k);
      if (active && ((valid >> k) & 1u)) add_weighted_bf16x8(acc, wk, v[k]);
    }
    if (active) {
      uint32_t packed[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(acc[2 * i]));
        const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16_rn(acc[2 * i + 1]));
        packed[i] = lo | (hi << 16);
      }
      *reinterpret_cast<int4*>(p.out + static_cast<int64_t>(t) * H + c0) =
          make_int4(static_cast<int>(packed[0]), static_cast<int>(packed[1]), static_cast<int>(packed[2]),
                    static_cast<int>(packed[3]));
    }
  }

  if constexpr (kFirstWarp == 0) wait_all_done(p, seq, net);
}

// Network path: the last block past the receive half advances the shadows by what each rank of
// another node was to send this call (its rows for this rank's tokens, one `done`).
template <class NetT>
__device__ void finish_combine_recv_net(const LowLatencyCombineParams& p, const NetT& net, NetCombineSmem* ns) {
  if (!ll_net_last_block(&p.state->net_blocks_done[2], &ns->last)) return;
  for (int r = static_cast<int>(threadIdx.x); r < p.common.num_ranks; r += static_cast<int>(blockDim.x)) {
    if (!net.remote(r)) continue;
    *net.shadow(p.buffer, kLLNetCombineData, r) =
        net.shadow_value(p.buffer, kLLNetCombineData, r) + static_cast<uint64_t>(ns->rows[r]);
    *net.shadow(p.buffer, kLLNetCombineDone, r) = net.shadow_value(p.buffer, kLLNetCombineDone, r) + 1;
  }
}

}  // namespace epcomm::dev
