// Low-latency dispatch, per-rank path (p.per_rank, EPCOMM_LL_PER_RANK >= 1): the send half, used
// by dispatch_per_rank.cu (which describes the path). A source stores each token once per
// destination rank into a staging slot there, with the entries the receiver fans it out by.
#pragma once

#include <cstdint>

#include "kernels/low_latency/dispatch_common.cuh"
#include "kernels/low_latency/dispatch_smem.cuh"

namespace epcomm::dev {

// Per-rank path: stores the heads of one token's staged copies and releases their flags (a thread
// per destination), after a barrier that follows every warp's stores of that token.
__device__ __forceinline__ void release_staged(const LowLatencyDispatchParams& p, uint32_t seq, const RankMeta& m) {
  const LowLatencyLayout& L = p.layout;
  for (int di = static_cast<int>(threadIdx.x); di < m.ndest; di += static_cast<int>(blockDim.x)) {
    const int d = m.dest[di];
    if (peer_masked(p.mask, d)) continue;
    char* region = peer_region(p, d);
    // t (16 bits) | entries (5) | the rank's place among the token's destinations (5), for the combine
    *reinterpret_cast<uint32_t*>(region + L.staged(p.buffer, p.common.rank, m.dslot[di], p.use_fp8) +
                                 L.staged_head_offset(p.use_fp8)) =
        static_cast<uint32_t>(m.token) | (static_cast<uint32_t>(m.nent[di]) << 16) | (static_cast<uint32_t>(di) << 21);
    st_release_sys(reinterpret_cast<uint32_t*>(region + L.staged_flag(p.buffer, p.common.rank, m.dslot[di])), seq);
  }
}

// Warp 0 hands out one token's slots, a lane per k (lane 0 walking the K ids took ~3 us a token, run
// 39's probe; run 44). The values are those of that walk: destinations in order of first occurrence,
// each with the next staging slot there; per-expert slots in k order (a dropped entry, past Tmax,
// still counts); entries per destination in k order. `mine`: lane k's id (-1 past K).
__device__ __forceinline__ void assign_slots_by_lane(const LowLatencyDispatchParams& p, int64_t mine, int t,
                                                     int32_t* hist, int32_t* rank_hist, RankMeta& m) {
  const LowLatencyLayout& L = p.layout;
  const int E = L.num_experts, EL = L.local_experts, lane = lane_id();
  const bool valid = mine >= 0 && mine < E;  // lanes past K hold -1
  const int e = valid ? static_cast<int>(mine) : -1;
  const int d = valid ? e / EL : -1 - lane;  // invalid lanes: keys of their own
  const uint32_t same_d = __match_any_sync(0xffffffffu, d);
  const uint32_t same_e = __match_any_sync(0xffffffffu, valid ? e : -1 - lane);
  const uint32_t leaders = __ballot_sync(0xffffffffu, valid && (same_d & ((1u << lane) - 1u)) == 0);
  const LaneSlot ls = lane_slot(lane, same_d, same_e, leaders);
  const int s = valid ? hist[e] + ls.earlier_same : 0;
  const bool kept = valid && s < L.max_tokens;
  const uint32_t kept_lanes = __ballot_sync(0xffffffffu, kept);
  __syncwarp();  // every lane has read hist before any lane advances it
  if (valid && ls.last_of_expert) hist[e] += popc32(same_e);
  if ((leaders >> lane) & 1u) {
    m.dest[ls.place] = d;
    m.dslot[ls.place] = rank_hist[d]++;
    m.nent[ls.place] = popc32(kept_lanes & same_d);
  }
  if (valid && !kept)  // no room: dropped and reported, never written past the slots
    report(p.common.wait, DeviceError::kBadArgument, WaitPhase::kNone, e, static_cast<uint64_t>(L.max_tokens), 0);
  if (kept)
    m.entries[ls.place][lane_entry_position(lane, same_d, kept_lanes)] =
        static_cast<uint32_t>(e % EL) | (static_cast<uint32_t>(s) << 16) | (static_cast<uint32_t>(lane) << 28);
  if (lane == 0) {
    m.ndest = popc32(leaders);
    m.token = t;
  }
}

// kSplit (a launch with both halves): the final release is warp 0's alone. The other warps count
// themselves in at named barrier 1 after their last stores and go on to the receive half at once
// (dispatch_recv_per_rank without warp 0), while warp 0 waits for them, releases the last token's
// flags (a fence that lasts until its stores reached the peers) and publishes.
template <bool kProbe = false, bool kSplit = false>
__device__ void dispatch_send_per_rank(const LowLatencyDispatchParams& p, uint32_t seq, const SendSmem& sm,
                                       int32_t* rank_hist, RankMeta* meta, uint32_t* tok_dests) {
  const CommonParams& c = p.common;
  const LowLatencyLayout& L = p.layout;
  const int E = L.num_experts, EL = L.local_experts, K = p.num_topk, T = p.num_tokens, R = c.num_ranks;
  const int grid = static_cast<int>(gridDim.x), b = static_cast<int>(blockIdx.x);
  const int tid = static_cast<int>(threadIdx.x), nthreads = static_cast<int>(blockDim.x);
  const int warp = warp_id(), lane = lane_id();
  const int t_begin = static_cast<int>(static_cast<int64_t>(b) * T / grid);
  const int t_end = static_cast<int>(static_cast<int64_t>(b + 1) * T / grid);
  const int owned_n = (E + grid - 1) / grid;
  int32_t* rank_total = rank_hist + R;

  // The histogram's ids are read a few per thread at a time (coalesced); the first few are loaded
  // before anything else, so their latency overlaps the zeroing, the first cast and the barrier.
  constexpr int kIdsInFlight = 4;
  const int TK = T * K;
  int64_t ids[kIdsInFlight];
  const auto load_ids = [&](int base) {
#pragma unroll
    for (int u = 0; u < kIdsInFlight; ++u) {
      const int i = base + u * nthreads + tid;
      ids[u] = i < TK ? p.topk_idx[i] : -1;
    }
  };
  load_ids(0);
  // Warp 0 hands out the slots of each token after the histogram; the first token's ids are read now.
  const int64_t first_ids =
      warp == 0 && t_begin < t_end && lane < K ? p.topk_idx[static_cast<int64_t>(t_begin) * K + lane] : -1;
  for (int i = tid; i < E + owned_n; i += nthreads) sm.hist[i] = 0;  // owned follows hist
  for (int i = tid; i < 2 * R; i += nthreads) rank_hist[i] = 0;      // rank_total follows rank_hist
  for (int i = tid; i < T; i += nthreads) tok_dests[i] = 0u;
  // The first token's cast needs no histogram: its loads overlap the histogram's.
  if (t_begin < t_end) stage_token(p, t_begin, sm.staging);
  probe_stamp<kProbe>(p, kProbeSendCast);
  __syncthreads();
  probe_stamp<kProbe>(p, kProbeSendBarrier1);
  // Pass 1, the (token, k) pairs spread over every thread: rows per expert before this block's
  // tokens, the totals of the experts whose count flag this block owns, and each token's
  // destination ranks as a mask.
  static_assert(kMaxNvlRanks <= 32, "destination ranks as a 32-bit mask");
  for (int base = 0; base < TK; base += kIdsInFlight * nthreads) {
    if (base > 0) load_ids(base);
#pragma unroll
    for (int u = 0; u < kIdsInFlight; ++u) {
      const int64_t e = ids[u];
      if (e < 0 || e >= E) continue;  // out of range counts as -1 (no host check without a sync)
      const int ei = static_cast<int>(e), t = (base + u * nthreads + tid) / K;
      if (t < t_begin) atomicAdd(&sm.hist[ei], 1);
      if (ei % grid == b) atomicAdd(&sm.owned[ei / grid], 1);
      atomicOr(&tok_dests[t], 1u << (ei / EL));
    }
  }
  __syncthreads();
  probe_stamp<kProbe>(p, kProbeSendPass1);
  // Pass 2, a thread per token: tokens per destination rank (a token counts once for each rank
  // holding any of its experts), before this block's tokens and in all, summed per warp with
  // ballots (one shared atomic per warp and rank).
  for (int t0 = warp * 32; t0 < T; t0 += nthreads) {
    const int t = t0 + lane;
    const uint32_t dests = t < T ? tok_dests[t] : 0u;
    const uint32_t before = __ballot_sync(0xffffffffu, t < t_begin);
    for (int d = 0; d < R; ++d) {
      const uint32_t to_d = __ballot_sync(0xffffffffu, (dests >> d) & 1u);
      if (lane == 0 && to_d != 0) {
        atomicAdd(&rank_total[d], __popc(to_d));
        if (to_d & before) atomicAdd(&rank_hist[d], __popc(to_d & before));
      }
    }
  }
  __syncthreads();
  probe_mark<kProbe>(p, kProbeHistogram);

  // Counts first, each with the number of tokens this rank stages at the expert's owner; by warps
  // 1.. (warp 0 goes on to the first token's slots).
  for (int i = tid - 32; i < owned_n; i += nthreads - 32) {
    if (i < 0) break;
    const int e = b + i * grid;
    if (e >= E) break;
    const int d = e / EL;
    if (peer_masked(p.mask, d)) continue;  // shrink mode: nothing goes to a masked rank
    uint64_t* flag = reinterpret_cast<uint64_t*>(peer_region(p, d) + L.count(p.buffer, e % EL, c.rank));
    const uint32_t count = static_cast<uint32_t>(min(sm.owned[i], L.max_tokens)) + 1u;
    st_relaxed_sys(flag, tag(seq, count | (static_cast<uint32_t>(rank_total[d]) << 16)));  // guards no data
  }
  probe_mark<kProbe>(p, kProbeCounts, 32);

  const int payload16 = L.staged_payload16(p.use_fp8), entry16 = L.staged_entry16();
  int pending = -1;  // the meta set whose flags wait for the next barrier
  for (int t = t_begin, it = 0; t < t_end; ++t, ++it) {
    const int sb = p.staging_buffers == 2 ? (it & 1) : 0;
    uint8_t* msg = sm.staging + static_cast<size_t>(sb) * L.msg_bytes;
    RankMeta& m = meta[it % 3];
    if (warp == 0) {
      // The token's K ids in one load (a lane each); every lane hands out its own slot.
      const int64_t mine = it == 0 ? first_ids : lane < K ? p.topk_idx[static_cast<int64_t>(t) * K + lane] : -1;
      assign_slots_by_lane(p, mine, t, sm.hist, rank_hist, m);
    }
    if (it > 0) stage_token(p, t, msg);  // the first token was staged before the histogram
    __syncthreads();
    if (it == 0) probe_stamp<kProbe>(p, kProbeSendSlots);
    if (pending >= 0) release_staged(p, seq, meta[pending]);
    const int nd = m.ndest;
    if (nd > 0) {
      // The destinations share the warps: P warps each copy a part of the row.
      const int P = max(1, kLowLatencyWarps / nd);
      const int di = warp / P, part = warp % P;
      if (di < nd && !peer_masked(p.mask, m.dest[di])) {
        int4* dst =
            reinterpret_cast<int4*>(peer_region(p, m.dest[di]) + L.staged(p.buffer, c.rank, m.dslot[di], p.use_fp8));
        const int v0 = part * payload16 / P, v1 = (part + 1) * payload16 / P;
        warp_copy<4>(dst + v0, reinterpret_cast<const int4*>(msg) + v0, v1 - v0, LoadShared{});
        if (part == 0 && lane < entry16) dst[payload16 + lane] = reinterpret_cast<const int4*>(m.entries[di])[lane];
      }
    }
    pending = it % 3;
    if (p.staging_buffers != 2) {
      __syncthreads();
      release_staged(p, seq, meta[pending]);
      pending = -1;
    }
  }
  probe_mark<kProbe>(p, kProbeTokens);
  if constexpr (kSplit) {
    if (warp != 0) {
      if (pending >= 0) bar_arrive(1, nthreads);
      return;
    }
    if (pending >= 0) {
      bar_sync(1, nthreads);
      release_staged(p, seq, meta[pending]);
    }
  } else if (pending >= 0) {
    __syncthreads();
    release_staged(p, seq, meta[pending]);
  }
}

}  // namespace epcomm::dev
