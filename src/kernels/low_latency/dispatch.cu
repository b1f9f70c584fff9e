// Low-latency dispatch (see params.hpp for the scheme). One kernel, two halves:
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
//
// Without a hook both halves run in one launch; with a hook, two launches.
//
// Per-rank path (p.per_rank, EPCOMM_LL_PER_RANK >= 1): a token's experts fall on few ranks, so the
// sender stores it once per destination rank instead of once per expert:
// send:    as above, plus a histogram of the destination ranks of the tokens (a token counts once
//          per rank); each count flag also carries how many tokens this source sends to the rank
//          (payload (count + 1) | tokens << 16). A staged token is its payload, then one entry per
//          (k) that selects an expert of that rank (local expert, its slot in [le][source] exactly
//          as the per-expert path computes it, k), then its head (t | entries << 16 | d << 21).
//          The token's destinations share the block's warps (16 / destinations each, parts of the
//          row); one thread per destination stores the head and releases the token's flag (seq,
//          u32, outside the slot: LowLatencyLayout::staged_flag says why) after the next barrier.
// receive: every block reads all count flags (a thread each) and computes every (expert, source)
//          begin in shared memory; then warps take (staged token, part of the row) items: wait for
//          the flag, copy the part once from the staging slot into every row its entries name
//          (recv_x [le][begin + slot]: the same rows as the per-expert path), and part 0 writes
//          the scales, src_info and the per-(expert, source, slot) header the combine reads.
#include <cuda_runtime.h>

#include <mutex>

#include "core/call_check.hpp"
#include "kernels/common/launch.hpp"
#include "kernels/low_latency/ll_device.cuh"
#include "kernels/low_latency/ll_net.cuh"
#include "kernels/low_latency/shrink.cuh"
#include "kernels/low_latency/ll_net_gin.cuh"

namespace epcomm {
namespace {

using namespace epcomm::dev;

// Shared memory of the send half: [hist: E][owned: ceil(E / grid)][slots: 2 x 16][experts: 2 x 16]
// then the staging areas (16-byte aligned), one message each.
struct SendSmem {
  int32_t* hist;     // rows of each expert before the current token (then a running slot counter)
  int32_t* owned;    // rows of expert blockIdx.x + i * gridDim.x, for its count flag
  int32_t* slots;    // [2][kMaxTopk]: slot of (token, k), -1 when k selects nothing
  int32_t* experts;  // [2][kMaxTopk]: expert of (token, k), -1 when none
  uint8_t* staging;  // [staging_buffers][msg_bytes]
};

__host__ __device__ inline size_t send_smem_ints(int num_experts, int num_blocks) {
  return static_cast<size_t>(num_experts) + (num_experts + num_blocks - 1) / num_blocks + 4 * kMaxTopk;
}

__device__ __forceinline__ char* peer_region(const LowLatencyDispatchParams& p, int rank) {
  return p.common.peer_base[rank] + p.region;
}

// Token t of x into a staging area of shared memory: cast to FP8 (scales after the row) or as BF16.
__device__ __forceinline__ void stage_token(const LowLatencyDispatchParams& p, int t, uint8_t* msg) {
  const uint16_t* row = p.x + static_cast<size_t>(t) * p.layout.hidden;
  if (p.use_fp8) stage_fp8(row, p.layout.hidden, p.round_scale, msg);
  else stage_bf16(row, p.layout.hidden, msg);
}

// Per-rank path: one token's destinations, in shared memory. Three sets rotate: set it % 3 is
// written by thread 0 before token it's barrier, read by the copies after it and by the flag
// releases after token it + 1's barrier, so it is rewritten only after token it + 2's barrier.
struct RankMeta {
  uint32_t entries[kMaxTopk][kMaxTopk];  // per destination: le | slot << 16 | k << 28 (16-byte rows)
  int32_t dest[kMaxTopk];                // destination rank
  int32_t dslot[kMaxTopk];               // staging slot there (tokens before this one to that rank)
  int32_t nent[kMaxTopk];                // entries
  int32_t ndest;
  int32_t token;
  int32_t pad[2];
};
static_assert(sizeof(RankMeta) % 16 == 0, "RankMeta rows are copied as 16-byte vectors");

// Per-rank send's extra shared memory after the per-expert path's ints: [rank_hist: R][rank_total: R]
// (16-byte aligned), then three RankMeta sets, then each token's destination-rank mask
// [max_tokens] (16-byte aligned), then the staging areas.
__host__ __device__ inline size_t rank_meta_offset(int num_experts, int num_blocks, int num_ranks) {
  return align_up(sizeof(int32_t) * (send_smem_ints(num_experts, num_blocks) + 2 * static_cast<size_t>(num_ranks)), 16);
}
__host__ __device__ inline size_t per_rank_staging_offset(const LowLatencyLayout& L, int num_blocks) {
  return rank_meta_offset(L.num_experts, num_blocks, L.num_ranks) + 3 * sizeof(RankMeta) +
         align_up(sizeof(uint32_t) * static_cast<size_t>(L.max_tokens), 16);
}
// A launch with both halves puts the receive half's ints past the send half's shared memory.
__host__ __device__ inline size_t per_rank_recv_offset(const LowLatencyLayout& L, int num_blocks, int staging_buffers) {
  return align_up(per_rank_staging_offset(L, num_blocks) + static_cast<size_t>(staging_buffers) * L.msg_bytes, 16);
}

// The send half's arrays at the start of the dynamic shared memory (SendSmem's layout), and the
// per-expert path's staging after them (the per-rank path puts its RankMeta sets in between and
// moves staging past them).
__device__ __forceinline__ SendSmem carve_send_smem(const LowLatencyLayout& L, uint8_t* smem) {
  const int grid = static_cast<int>(gridDim.x);
  int32_t* ints = reinterpret_cast<int32_t*>(smem);
  SendSmem sm;
  sm.hist = ints;
  sm.owned = ints + L.num_experts;
  sm.slots = sm.owned + (L.num_experts + grid - 1) / grid;
  sm.experts = sm.slots + 2 * kMaxTopk;
  sm.staging = smem + align_up(sizeof(int32_t) * send_smem_ints(L.num_experts, grid), 16);
  return sm;
}

// Per-rank receive's shared memory: [cnt: E][begin: E][rtot: R][ipre: R + 1][abort: 1][dead: R].
__host__ __device__ inline size_t recv_smem_ints(int num_experts, int num_ranks) {
  return 2 * static_cast<size_t>(num_experts) + 3 * static_cast<size_t>(num_ranks) + 2;
}

// Network path's shared memory of the send half (static, inside kLowLatencyNetStaticSmem).
struct NetSendSmem {
  int32_t sent[kMaxInterRanks];  // messages this block put to each rank
  int32_t any_remote[2];         // per staging area: the token has a k on a rank of another node
  int32_t last;
};

// A global-timer stamp in `slot` by thread 0 (the per-rank send's sub-phases).
template <bool kProbe>
__device__ __forceinline__ void probe_stamp(const LowLatencyDispatchParams& p, int slot) {
  if constexpr (kProbe) {
    if (threadIdx.x == 0) p.probe[blockIdx.x * kLowLatencyProbeSlots + slot] = global_timer_ns();
  }
}

// EPCOMM_LL_PROBE: thread 0 of each block stamps a phase mark (global timer and SM clock).
// A kernel instance of its own (kProbe), so the kernels without it keep their registers.
template <bool kProbe>
__device__ __forceinline__ void probe_mark(const LowLatencyDispatchParams& p, int mark, int thread = 0) {
  if constexpr (kProbe) {
    if (static_cast<int>(threadIdx.x) == thread) {
      p.probe[blockIdx.x * kLowLatencyProbeSlots + mark] = global_timer_ns();
      p.probe[blockIdx.x * kLowLatencyProbeSlots + 8 + mark] = static_cast<unsigned long long>(clock64());
    }
  }
}

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
    for (int i = tid; i < kMaxInterRanks; i += nthreads) ns->sent[i] = 0;
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
      if constexpr (NetT::kEnabled) if (lane == 0) ns->any_remote[sb] = 0;
      // In k order, so a token that names an expert twice gets increasing slots: rows stay in
      // (token, k) order inside each source, as the reference lays them out.
      for (int k = 0; k < K; ++k) {
        const int64_t e = __shfl_sync(0xffffffffu, mine, k);
        if (lane != 0) continue;
        const bool ok = e >= 0 && e < E;
        int s = ok ? sm.hist[e]++ : -1;
        if (s >= L.max_tokens) {  // no room: dropped and reported, never written past the slots
          report(c.wait, DeviceError::kBadArgument, WaitPhase::kNone, static_cast<int>(e), static_cast<uint64_t>(L.max_tokens), 0);
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
  const int64_t first_ids = warp == 0 && t_begin < t_end && lane < K ? p.topk_idx[static_cast<int64_t>(t_begin) * K + lane] : -1;
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
        int4* dst = reinterpret_cast<int4*>(peer_region(p, m.dest[di]) +
                                            L.staged(p.buffer, c.rank, m.dslot[di], p.use_fp8));
        const int v0 = part * payload16 / P, v1 = (part + 1) * payload16 / P;
        warp_copy<4>(dst + v0, reinterpret_cast<const int4*>(msg) + v0, v1 - v0, LoadShared{});
        if (part == 0 && lane < entry16)
          dst[payload16 + lane] = reinterpret_cast<const int4*>(m.entries[di])[lane];
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

// The last block past the send half publishes the call's number (the receive of a hook reads it).
// kBarrier: the block's threads meet first; without it the caller has made thread 0 come after
// every thread's send (kSplit's warp 0).
template <bool kBarrier = true>
__device__ void publish_dispatch(const LowLatencyDispatchParams& p, uint32_t seq) {
  if constexpr (kBarrier) __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(&p.state->dispatch_blocks_done, 1u) == gridDim.x - 1) {
      p.state->dispatch_blocks_done = 0;
      p.state->buffer_dispatch_seq[p.buffer] = seq;
      __threadfence();
      atomicExch(&p.state->dispatch_seq, seq);
    }
  }
}

// Shrink mode: every block of this rank settles (le, src)'s count once per call (shrink.cuh), so
// a source masked part-way gives all blocks the same answer. Without a mask, the count as seen.
__device__ __forceinline__ uint32_t settled_count(const LowLatencyDispatchParams& p, int le, int src, uint32_t seq,
                                                  uint32_t payload) {
  if (p.mask == nullptr) return payload;
  const LowLatencyLayout& L = p.layout;
  return settle_count(p.count_decisions + static_cast<size_t>(p.buffer) * L.num_experts +
                          static_cast<size_t>(le) * L.num_ranks + src,
                      seq, tag(seq, payload));
}

// The count of (local expert le, source src): its flag's payload (count + 1), or 0 when shrink mode
// masked the source (then settled once per call, see shrink.cuh). False: the call was aborted.
__device__ __forceinline__ bool receive_count(const LowLatencyDispatchParams& p, const char* mine, int le, int src,
                                              uint32_t seq, uint32_t& payload, long long& cycles) {
  const LowLatencyLayout& L = p.layout;
  const uint64_t* flag = reinterpret_cast<const uint64_t*>(mine + L.count(p.buffer, le, src));
  uint64_t v = 0;
  // Counts are stored relaxed (they guard no data): read them relaxed too.
  const PeerWait w =
      wait_payload_or_mask(p.common.wait, p.mask, flag, tag(seq, 1), WaitPhase::kLowLatencyDispatchCount, src, v, cycles);
  if (w == PeerWait::kAborted) return false;
  payload = w == PeerWait::kArrived ? static_cast<uint32_t>(v) : 0u;
  payload = settled_count(p, le, src, seq, payload);
  return true;
}

// Network path: the count of (le, src) for a source of another node, from its meta entry once its
// kLLNetMeta signal passed the shadow (same payload and shrink settling as receive_count).
template <class NetT>
__device__ __forceinline__ bool receive_count_net(const LowLatencyDispatchParams& p, const NetT& net, int le, int src,
                                                  uint32_t seq, uint32_t& payload, long long& cycles) {
  const LowLatencyLayout& L = p.layout;
  const uint64_t target = net.shadow_value(p.buffer, kLLNetMeta, src) + 1;
  const PeerWait w = net.wait(p.common.wait, p.mask, p.buffer, kLLNetMeta, src, target,
                              WaitPhase::kLowLatencyDispatchCount, cycles);
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
  const char* mine = p.common.peer_base[c.rank] + p.region;

  for (int item = gw; item < E * Q; item += total_warps) {
    const int u = item % E, q = item / E;
    const int le = u / R, src = u % R;
    long long count_cycles = 0, message_cycles = 0;
    uint32_t payload = 0;
    bool ok = true;
    if (lane <= src) {
      bool via_net = false;
      if constexpr (NetT::kEnabled) via_net = net.remote(lane);
      if (via_net) {
        if constexpr (NetT::kEnabled) ok = receive_count_net(p, net, le, lane, seq, payload, count_cycles);
      } else {
        ok = receive_count(p, mine, le, lane, seq, payload, count_cycles);
      }
    }
    if (!__all_sync(0xffffffffu, ok)) return;
    const int cnt = payload > 0 ? static_cast<int>(payload - 1u) : 0;
    int incl = cnt;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int n = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += n;
    }
    const int count = __shfl_sync(0xffffffffu, cnt, src);
    const int begin = __shfl_sync(0xffffffffu, incl, src) - count;
    count_cycles = __shfl_sync(0xffffffffu, count_cycles, src);
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
        // passed the shadow by the sum of its counts. (Lane src acquired the meta signal; the warp
        // barrier orders the other lanes' reads of the counts after it.)
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
          if (q == 0 && lane == 0) p.layout_range[static_cast<int64_t>(le) * R + src] = static_cast<int64_t>(begin) << 32;
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
          if (lane == 0)
            *reinterpret_cast<uint64_t*>(net.mine + L.header(p.buffer, le, src, j)) = tag(seq, hv + 1u);
        }
      } else if (lane == 0) {
        got = static_cast<int>(wait_tag_or_mask(c.wait, p.mask,
                                                reinterpret_cast<const uint64_t*>(mine + L.header(p.buffer, le, src, j)),
                                                tag(seq, 1), WaitPhase::kLowLatencyDispatchMessage, src, h,
                                                message_cycles));
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

// Per-rank path, receive half (see the top of this file). `ints`: recv_smem_ints of shared memory.
// kSplit: run by warps 1.. only (warp 0 is still releasing the send half's last flags, see
// dispatch_send_per_rank), which meet at named barrier 2; else by the whole block.
template <bool kSplit = false, bool kProbe = false>
__device__ void dispatch_recv_per_rank(const LowLatencyDispatchParams& p, uint32_t seq, int32_t* ints) {
  const CommonParams& c = p.common;
  const LowLatencyLayout& L = p.layout;
  const int R = c.num_ranks, EL = L.local_experts, E = EL * R, H = L.hidden;
  const int64_t RT = static_cast<int64_t>(R) * L.max_tokens;
  const int G = H / kLowLatencyScaleGroup, W = (G + 3) / 4;
  constexpr int kFirstWarp = kSplit ? 1 : 0, kWarps = kLowLatencyWarps - kFirstWarp;
  const int tid = static_cast<int>(threadIdx.x) - 32 * kFirstWarp, nthreads = 32 * kWarps;
  const auto barrier = [nthreads] {
    if constexpr (kSplit) bar_sync(2, nthreads);
    else __syncthreads();
  };
  const int lane = lane_id();
  const bool first = blockIdx.x == 0;
  char* mine = c.peer_base[c.rank] + p.region;
  int32_t* cnt = ints;          // [le][src] rows
  int32_t* begin = cnt + E;     // [le][src] first packed row
  int32_t* rtot = begin + E;    // [src] staged tokens
  int32_t* ipre = rtot + R;     // [src + 1] prefix of rtot: the items
  int32_t* stop = ipre + R + 1; // a count wait was aborted
  int32_t* dead = stop + 1;     // [src] shrink mode: some count of src settled as masked

  for (int i = tid; i < R + 1; i += nthreads) stop[i] = 0;  // dead follows stop
  barrier();
  for (int i = tid; i < E; i += nthreads) {
    const int le = i / R, src = i % R;
    uint32_t payload = 0;
    long long cycles = 0;
    if (!receive_count(p, mine, le, src, seq, payload, cycles)) {
      stop[0] = 1;
      continue;
    }
    cnt[i] = payload > 0 ? static_cast<int>((payload & 0xffffu) - 1u) : 0;
    if (payload == 0) dead[src] = 1;
    if (le == 0) rtot[src] = min(static_cast<int>(payload >> 16), L.max_tokens);
    if (first && p.wait_cost_stats && cycles > 0)
      atomicAdd(reinterpret_cast<unsigned long long*>(p.wait_cost_stats + src), static_cast<unsigned long long>(cycles));
  }
  barrier();
  if (stop[0]) return;
  // A source that is masked in any count is masked in all: its rows are not valid anywhere.
  for (int le = tid; le < EL; le += nthreads) {
    int run = 0;
    for (int src = 0; src < R; ++src) {
      const int i = le * R + src;
      if (dead[src]) cnt[i] = 0;
      begin[i] = run;
      run += cnt[i];
      if (first) p.layout_range[i] = (static_cast<int64_t>(begin[i]) << 32) | cnt[i];
    }
    if (first) {
      p.recv_count[le] = run;
      if (p.cumulative_recv_stats) p.cumulative_recv_stats[le] += run;
    }
  }
  if (tid == 0) {
    int run = 0;
    for (int src = 0; src < R; ++src) {
      ipre[src] = run;
      run += dead[src] ? 0 : rtot[src];
      if (first && p.per_rank_combine)
        *reinterpret_cast<uint32_t*>(mine + L.pr_count(p.buffer, src)) = static_cast<uint32_t>(dead[src] ? 0 : rtot[src]);
    }
    ipre[R] = run;
  }
  barrier();
  probe_mark<kProbe>(p, kProbeRecvCounts, 32 * kFirstWarp);

  const int N = ipre[R];
  const int total_warps = static_cast<int>(gridDim.x) * kWarps;
  // Items go round the blocks first (item w to block w % grid), so fewer items than warps still
  // spread over every SM (BENCHMARKS runs 47-48).
  const int gw = (warp_id() - kFirstWarp) * static_cast<int>(gridDim.x) + static_cast<int>(blockIdx.x);
  const int data16 = p.use_fp8 ? H / 16 : H / 8;  // 16-byte vectors of one recv_x row
  const int P = max(1, min(min(total_warps / max(N, 1), 8), data16 / 32));  // parts per staged token
  const size_t head_off = L.staged_head_offset(p.use_fp8);
  const int payload16 = L.staged_payload16(p.use_fp8);
  constexpr int U = 4;

  for (int w = gw; w < N * P; w += total_warps) {
    const int item = w / P, part = w % P;
    int src = 0;
    while (item >= ipre[src + 1]) ++src;
    const int j = item - ipre[src];
    const uint8_t* msg = reinterpret_cast<const uint8_t*>(mine + L.staged(p.buffer, src, j, p.use_fp8));
    long long cycles = 0;
    int got = static_cast<int>(PeerWait::kArrived);
    [[maybe_unused]] uint64_t probe_t0 = 0, probe_t1 = 0;
    if constexpr (kProbe) probe_t0 = global_timer_ns();
    if (lane == 0)
      got = static_cast<int>(wait_seq_or_mask(c.wait, p.mask,
                                              reinterpret_cast<const uint32_t*>(mine + L.staged_flag(p.buffer, src, j)),
                                              seq, WaitPhase::kLowLatencyDispatchMessage, src, cycles));
    if constexpr (kProbe) probe_t1 = global_timer_ns();
    got = __shfl_sync(0xffffffffu, got, 0);
    if (got == static_cast<int>(PeerWait::kAborted)) return;
    if (got == static_cast<int>(PeerWait::kMasked)) {
      // Shrink mode: the source was masked in the middle of its tokens; its rows are not valid.
      for (int le = lane; le < EL; le += 32)
        p.layout_range[static_cast<int64_t>(le) * R + src] = static_cast<int64_t>(begin[le * R + src]) << 32;
      continue;
    }
    if (p.wait_cost_stats && lane == 0 && cycles > 0)
      atomicAdd(reinterpret_cast<unsigned long long*>(p.wait_cost_stats + src), static_cast<unsigned long long>(cycles));
    // Every read of this part at once (none depends on another): the first vectors of the part,
    // the head, the entries (all kslots; those past the head's count are ignored) and, for an FP8
    // token, the first 32 of the part's scales.
    const int v0 = part * data16 / P, v1 = (part + 1) * data16 / P;
    const int4* from = reinterpret_cast<const int4*>(msg);
    int4* to = reinterpret_cast<int4*>(p.recv_x);
    int4 vec[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = v0 + lane + u * 32;
      if (i < v1) vec[u] = __ldcg(from + i);
    }
    const uint32_t v = __ldcg(reinterpret_cast<const unsigned int*>(msg + head_off));
    const uint32_t ent =
        lane < L.kslots ? __ldcg(reinterpret_cast<const unsigned int*>(msg + static_cast<size_t>(payload16) * 16) + lane) : 0u;
    // The scales are split over the parts as the data is (each part a share of the groups, or of
    // the packed words): one part writing all of them for n rows was the receive's slowest item.
    const float* scales = reinterpret_cast<const float*>(msg + H);
    const bool plain_scales = p.use_fp8 && !p.use_ue8m0;
    const int s0 = part * (plain_scales ? G : W) / P, s1 = (part + 1) * (plain_scales ? G : W) / P;
    const float sc0 = plain_scales && s0 + lane < s1 ? __ldcg(scales + s0 + lane) : 0.0f;
    const int t = static_cast<int>(v & 0xffffu);
    const int n = min(static_cast<int>((v >> 16) & 0x1fu), L.kslots);
    // Lane e < n holds entry e's row in recv_x: its local expert (-1: not valid, e.g. a count
    // settled as masked) and its place in the expert's R * Tmax rows.
    int rle = -1, rpos = 0;
    if (lane < n) {
      const int le = static_cast<int>(ent & 0xffffu), slot = static_cast<int>((ent >> 16) & 0xfffu);
      if (le < EL && slot < cnt[le * R + src]) {
        rle = le;
        rpos = begin[le * R + src] + slot;
      }
    }
    const int64_t row = rle >= 0 ? static_cast<int64_t>(rle) * RT + rpos : -1;
    [[maybe_unused]] uint64_t probe_t2 = 0, probe_t3 = 0;
    if constexpr (kProbe) {
      asm volatile("" ::"l"(row));
      probe_t2 = global_timer_ns();
    }
    // This part of the row: read once, stored to every row.
    for (int base = v0; base < v1; base += 32 * U) {
      if (base != v0) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int i = base + lane + u * 32;
          if (i < v1) vec[u] = __ldcg(from + i);
        }
      }
      for (int e = 0; e < n; ++e) {
        const int64_t r = __shfl_sync(0xffffffffu, row, e);
        if (r < 0) continue;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int i = base + lane + u * 32;
          if (i < v1) to[r * data16 + i] = vec[u];
        }
      }
    }
    if constexpr (kProbe) {
      asm volatile("" ::: "memory");
      probe_t3 = global_timer_ns();
    }
    if (p.use_fp8) {
      // Scales transposed ([le][group][RT]): each of this part's groups read once, stored for every row.
      for (int g0 = s0; g0 < s1; g0 += 32) {
        const int g = g0 + lane;
        if (plain_scales) {
          const float val = g0 == s0 ? sc0 : (g < s1 ? __ldcg(scales + g) : 0.0f);
          for (int e = 0; e < n; ++e) {
            const int le = __shfl_sync(0xffffffffu, rle, e), pos = __shfl_sync(0xffffffffu, rpos, e);
            if (le >= 0 && g < s1) p.recv_scales[(static_cast<int64_t>(le) * G + g) * RT + pos] = val;
          }
        } else {  // UE8M0: g is a word of four groups' exponents
          uint32_t word = 0;
#pragma unroll
          for (int i = 0; i < 4; ++i)
            if (g < s1 && 4 * g + i < G) word |= ((__float_as_uint(__ldcg(scales + 4 * g + i)) >> 23) & 0xffu) << (8 * i);
          for (int e = 0; e < n; ++e) {
            const int le = __shfl_sync(0xffffffffu, rle, e), pos = __shfl_sync(0xffffffffu, rpos, e);
            if (le >= 0 && g < s1) p.recv_scales_packed[(static_cast<int64_t>(le) * W + g) * RT + pos] = static_cast<int32_t>(word);
          }
        }
      }
    }
    if constexpr (kProbe) {
      if (lane == 0) {
        unsigned long long* prow = p.probe + blockIdx.x * kLowLatencyProbeSlots;
        const uint64_t now = global_timer_ns();
        atomicMax(prow + kProbeItemWait, static_cast<unsigned long long>(probe_t1 - probe_t0));
        atomicMax(prow + kProbeItemWork, static_cast<unsigned long long>(now - probe_t1));
        atomicAdd(prow + kProbeItems, 1ull);
        if (now - probe_t1 > 2000) {  // a slow item: where its time went
          prow[kProbeSlowItem] = static_cast<unsigned long long>(item) | static_cast<unsigned long long>(part) << 16 |
                                 static_cast<unsigned long long>(n) << 24;
          prow[kProbeSlowItem + 1] = probe_t2 - probe_t1;  // head and entries loaded, rows known
          prow[kProbeSlowItem + 2] = probe_t3 - probe_t2;  // data stores issued
          prow[kProbeSlowItem + 3] = now - probe_t3;       // scales
        }
      }
    }
    if (part != 0) continue;
    if (row >= 0) p.src_info[row] = t;
    if (p.per_rank_combine) {
      // The per-rank combine's plan: this staged token as it came (the combine checks the slots
      // against the handle's layout_range).
      if (lane < n) reinterpret_cast<uint32_t*>(mine + L.pr_entries(p.buffer, src, j))[lane] = ent;
      if (lane == 0) *reinterpret_cast<uint32_t*>(mine + L.pr_head(p.buffer, src, j)) = v;
    } else if (row >= 0) {
      // The header the per-expert combine reads (the per-expert path's senders write it there):
      // its low half only, the payload that combine reads. The high halves of the row le = 0 are
      // the staged tokens' flags (LowLatencyLayout::staged_flag), which peers are releasing.
      const int le = static_cast<int>(ent & 0xffffu), slot = static_cast<int>((ent >> 16) & 0xfffu);
      const uint32_t k = ent >> 28;
      *reinterpret_cast<uint32_t*>(mine + L.header(p.buffer, le, src, slot)) = (static_cast<uint32_t>(t) | (k << 16)) + 1u;
    }
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
    for (int le = 0; le < L.local_experts; ++le) total += min(static_cast<int>(net.count_in(p.buffer, src, le)), L.max_tokens);
    *net.shadow(p.buffer, kLLNetData, src) = net.shadow_value(p.buffer, kLLNetData, src) + total;
  }
}

// kPerRank == p.per_rank: the two paths are separate kernels (each its own registers).
template <bool kPerRank, bool kProbe>
__global__ void __launch_bounds__(kLowLatencyThreads, 1)
    low_latency_dispatch_kernel(const __grid_constant__ LowLatencyDispatchParams p) {
  extern __shared__ __align__(16) uint8_t smem[];
  const bool send = (p.phases & kLowLatencySend) != 0;
  const bool recv = (p.phases & kLowLatencyRecv) != 0;
  // Every block reads the number before any block can publish it (publishing waits for all).
  probe_mark<kProbe>(p, send ? kProbeEntry : kProbeRecvEntry);
  if constexpr (kProbe && kPerRank) {  // a split launch's warps raise "recv done" with atomicMax
    unsigned long long* row = p.probe + blockIdx.x * kLowLatencyProbeSlots;
    if (send && recv && threadIdx.x == 0) row[kProbeRecvDone] = row[8 + kProbeRecvDone] = 0;
    if (threadIdx.x == 0)
      for (int i = kProbeItemWait; i < kLowLatencyProbeSlots; ++i) row[i] = 0;
  }
  const uint32_t seq = send ? ld_volatile(&p.state->dispatch_seq) + 1u : ld_volatile(&p.state->buffer_dispatch_seq[p.buffer]);
  if (send && !call_number_left(p.common.wait, seq)) return;  // a receive half's number was checked by its send
  if (send) {
    const LowLatencyLayout& L = p.layout;
    SendSmem sm = carve_send_smem(L, smem);
    if constexpr (kPerRank) {
      const int grid = static_cast<int>(gridDim.x);
      const size_t meta_off = rank_meta_offset(L.num_experts, grid, p.common.num_ranks);
      sm.staging = smem + per_rank_staging_offset(L, grid);
      int32_t* rank_hist = sm.experts + 2 * kMaxTopk;
      auto* meta = reinterpret_cast<RankMeta*>(smem + meta_off);
      auto* tok_dests = reinterpret_cast<uint32_t*>(smem + meta_off + 3 * sizeof(RankMeta));
      if (recv) {
        // One launch: warp 0 finishes the send half while the others receive (their shared memory
        // follows the send half's, which warp 0 still reads).
        dispatch_send_per_rank<kProbe, true>(p, seq, sm, rank_hist, meta, tok_dests);
        if (warp_id() == 0) {
          publish_dispatch<false>(p, seq);
          probe_mark<kProbe>(p, kProbePublished);
          return;
        }
        probe_mark<kProbe>(p, kProbeRecvEntry, 32);
        dispatch_recv_per_rank<true, kProbe>(
            p, seq, reinterpret_cast<int32_t*>(smem + per_rank_recv_offset(L, grid, p.staging_buffers)));
        if constexpr (kProbe) {  // the last warp of the block to finish (no barrier: a warp may have aborted)
          if (lane_id() == 0) {
            atomicMax(p.probe + blockIdx.x * kLowLatencyProbeSlots + kProbeRecvDone, global_timer_ns());
            atomicMax(p.probe + blockIdx.x * kLowLatencyProbeSlots + 8 + kProbeRecvDone,
                      static_cast<unsigned long long>(clock64()));
          }
        }
        return;
      }
      dispatch_send_per_rank<kProbe>(p, seq, sm, rank_hist, meta, tok_dests);
    } else {
      dispatch_send<LLNoNet, kProbe>(p, seq, sm, LLNoNet{}, nullptr);
    }
    publish_dispatch(p, seq);  // starts with a barrier: the receive half may reuse the shared memory
    probe_mark<kProbe>(p, kProbePublished);
  }
  if (recv) {
    if (send) probe_mark<kProbe>(p, kProbeRecvEntry);
    if constexpr (kPerRank) dispatch_recv_per_rank<false, kProbe>(p, seq, reinterpret_cast<int32_t*>(smem));
    else dispatch_recv(p, seq, LLNoNet{});
    if constexpr (kProbe) {
      __syncthreads();
      probe_mark<kProbe>(p, kProbeRecvDone);
    }
  }
}

// Network path (ll_net.cuh): the per-expert kernel with sends to ranks of other nodes through the
// transport. NetParams: EmulatedNetParams (virtual nodes) or GinNetParams (real nodes).
template <class NetParams>
__global__ void __launch_bounds__(kLowLatencyThreads, 1)
    low_latency_dispatch_net_kernel(const __grid_constant__ LowLatencyDispatchParams p,
                                    const __grid_constant__ LowLatencyNetArgs a, const __grid_constant__ NetParams np) {
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ NetSendSmem ns;
  const auto net = make_ll_net(p, a, np);
  const bool send = (p.phases & kLowLatencySend) != 0;
  const bool recv = (p.phases & kLowLatencyRecv) != 0;
  const uint32_t seq = send ? ld_volatile(&p.state->dispatch_seq) + 1u : ld_volatile(&p.state->buffer_dispatch_seq[p.buffer]);
  if (send && !call_number_left(p.common.wait, seq)) return;  // a receive half's number was checked by its send
  if (send) {
    const SendSmem sm = carve_send_smem(p.layout, smem);
    dispatch_send(p, seq, sm, net, &ns);
    publish_dispatch(p, seq);
  }
  if (recv) {
    dispatch_recv(p, seq, net);
    finish_dispatch_recv_net(p, net, &ns);
  }
}
static_assert(sizeof(NetSendSmem) <= kLowLatencyNetStaticSmem, "kLowLatencyNetStaticSmem");

template <class NetParams>
void launch_dispatch_net_kernel(const LowLatencyDispatchParams& p, const LowLatencyNetArgs& a, const NetParams& np,
                                int num_blocks, int smem_bytes, void* stream) {
  constexpr int kMaxDevices = 64;
  static std::once_flag configured[kMaxDevices];
  int device = 0;
  EPCOMM_CUDA_CHECK(cudaGetDevice(&device));
  auto configure = [] {
    int dev = 0, max_smem = 0;
    EPCOMM_CUDA_CHECK(cudaGetDevice(&dev));
    EPCOMM_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    EPCOMM_CUDA_CHECK(cudaFuncSetAttribute(low_latency_dispatch_net_kernel<NetParams>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           max_smem - kLowLatencyNetStaticSmem));
  };
  if (device >= 0 && device < kMaxDevices) std::call_once(configured[device], configure);
  else configure();
  low_latency_dispatch_net_kernel<NetParams>
      <<<num_blocks, kLowLatencyThreads, smem_bytes, static_cast<cudaStream_t>(stream)>>>(p, a, np);
  EPCOMM_LAUNCH_CHECK("low_latency_dispatch_net_kernel");
}

const KernelRegistration kKernels{reinterpret_cast<const void*>(low_latency_dispatch_kernel<false, false>),
                                  reinterpret_cast<const void*>(low_latency_dispatch_kernel<true, false>),
                                  reinterpret_cast<const void*>(low_latency_dispatch_kernel<false, true>),
                                  reinterpret_cast<const void*>(low_latency_dispatch_kernel<true, true>),
                                  reinterpret_cast<const void*>(low_latency_dispatch_net_kernel<EmulatedNetParams>)};
const KernelRegistration kGinKernels({reinterpret_cast<const void*>(low_latency_dispatch_net_kernel<GinNetParams>)},
                                     KernelSet::kGin);

}  // namespace

int low_latency_dispatch_shared_bytes(const LowLatencyLayout& layout, int num_blocks, int staging_buffers,
                                      bool per_rank) {
  if (per_rank)
    return static_cast<int>(per_rank_staging_offset(layout, num_blocks) + static_cast<size_t>(staging_buffers) * layout.msg_bytes);
  return static_cast<int>(align_up(sizeof(int32_t) * send_smem_ints(layout.num_experts, num_blocks), 16) +
                          static_cast<size_t>(staging_buffers) * layout.msg_bytes);
}

int low_latency_dispatch_recv_shared_bytes(const LowLatencyLayout& layout, bool per_rank) {
  return per_rank ? static_cast<int>(sizeof(int32_t) * recv_smem_ints(layout.num_experts, layout.num_ranks)) : 0;
}

int low_latency_dispatch_launch_shared_bytes(const LowLatencyLayout& layout, int num_blocks, int staging_buffers,
                                             bool per_rank, int phases) {
  const bool send = (phases & kLowLatencySend) != 0, recv = (phases & kLowLatencyRecv) != 0;
  const int recv_bytes = recv ? low_latency_dispatch_recv_shared_bytes(layout, per_rank) : 0;
  if (!send) return recv_bytes;
  if (per_rank && recv)  // the receive half's ints follow the send half's (low_latency_dispatch_kernel)
    return static_cast<int>(per_rank_recv_offset(layout, num_blocks, staging_buffers)) + recv_bytes;
  return std::max(low_latency_dispatch_shared_bytes(layout, num_blocks, staging_buffers, per_rank), recv_bytes);
}

void launch_low_latency_dispatch(const LowLatencyDispatchParams& p, int num_blocks, int smem_bytes, void* stream) {
  // The limit goes to the device's maximum once per device, never down: ranks driven by threads of
  // one process launch this kernel concurrently with different shared-memory sizes (the receive
  // half uses none), and the launch path stays free of attribute calls.
  constexpr int kMaxDevices = 64;
  static std::once_flag configured[kMaxDevices];
  int device = 0;
  EPCOMM_CUDA_CHECK(cudaGetDevice(&device));
  auto configure = [] {
    int dev = 0, max_smem = 0;
    EPCOMM_CUDA_CHECK(cudaGetDevice(&dev));
    EPCOMM_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    for (const void* kernel : {reinterpret_cast<const void*>(low_latency_dispatch_kernel<false, false>),
                               reinterpret_cast<const void*>(low_latency_dispatch_kernel<true, false>),
                               reinterpret_cast<const void*>(low_latency_dispatch_kernel<false, true>),
                               reinterpret_cast<const void*>(low_latency_dispatch_kernel<true, true>)})
      EPCOMM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem));
  };
  if (device >= 0 && device < kMaxDevices) std::call_once(configured[device], configure);
  else configure();
  const auto s = static_cast<cudaStream_t>(stream);
  if (p.probe != nullptr) {
    if (p.per_rank) low_latency_dispatch_kernel<true, true><<<num_blocks, kLowLatencyThreads, smem_bytes, s>>>(p);
    else low_latency_dispatch_kernel<false, true><<<num_blocks, kLowLatencyThreads, smem_bytes, s>>>(p);
  } else if (p.per_rank) {
    low_latency_dispatch_kernel<true, false><<<num_blocks, kLowLatencyThreads, smem_bytes, s>>>(p);
  } else {
    low_latency_dispatch_kernel<false, false><<<num_blocks, kLowLatencyThreads, smem_bytes, s>>>(p);
  }
  EPCOMM_LAUNCH_CHECK("low_latency_dispatch_kernel");
}

void launch_low_latency_dispatch_net(const LowLatencyDispatchParams& p, const LowLatencyNetArgs& a,
                                     const EmulatedNetParams& net, int num_blocks, int smem_bytes, void* stream) {
  launch_dispatch_net_kernel(p, a, net, num_blocks, smem_bytes, stream);
}

// The same over NCCL GIN (Buffer launches it when its group spans real nodes).
void launch_low_latency_dispatch_gin(const LowLatencyDispatchParams& p, const LowLatencyNetArgs& a,
                                     const GinNetParams& g, int num_blocks, int smem_bytes, void* stream) {
  launch_dispatch_net_kernel(p, a, g, num_blocks, smem_bytes, stream);
}

}  // namespace epcomm
