// Low-latency combine, per-rank path (p.partials != kNone: EPCOMM_LL_PER_RANK=2, 3 or 4 (the
// default) where it fits, after a per-rank dispatch; see params.hpp for the scheme):
// the expert rank sends one row per (token, origin rank) instead of one per (token, expert).
// send:    block 0 pushes this rank's topk_weights to every rank (one flag each); then a
//          warp per (staged token of the dispatch's plan, part of the row) sums w[t][k] * y over the
//          token's rows on this rank (float32, k order, no FMA; it waits for that origin's weights
//          first) and stores the part into the origin's combine row for (t, d) (d: this rank's
//          place among the token's destination ranks), with a flag per part.
// receive: a warp per (token, slice) finds the token's destination ranks (first occurrence in k
//          order, as the dispatch numbered them), waits for every part flag of each, and sums the
//          partials in that order in float32, rounded once to BF16.
// Partials (LowLatencyPartials):
// - kBf16 (=2): the partial rounded to BF16. |error| <= 2^-9 * sum_k |w_k y_k| + the final rounding;
//   about 2.4x fewer bytes than per-expert rows at the standard shape.
// - kFine (=3): a token with ONE expert on the rank gets that BF16 row of y unchanged and the origin
//   multiplies it by its weight (exactly the per-expert path's operations); with several, the float32
//   partial rounded to nearest at 16 significant bits, sent as its high 16 bits (one plane) and the
//   next 8 (another). Per partial |error| <= 2^-16 |partial|, 2^8 below the output's own BF16
//   rounding: the result differs from the per-expert sum by at most one BF16 unit, rarely; about 1.6x
//   fewer bytes than per-expert rows at the standard shape. Where every token has at most one expert
//   per rank the result is bit-identical to the per-expert path.
// - kF32 (=4): as kFine with the float32 partial as it is (4 bytes per element, in two planes of
//   four channels per 8-channel group, so a warp's stores stay contiguous): only float32
//   reordering (a rank's rows summed first, then the ranks in first-occurrence order); about 1.3x
//   fewer bytes than per-expert rows at the standard shape (a token with two experts on a rank sends
//   as many bytes as their two rows).
#include <cuda_runtime.h>

#include "core/call_check.hpp"
#include "kernels/common/launch.hpp"
#include "kernels/low_latency/combine_common.cuh"

namespace epcomm {
namespace {

using namespace epcomm::dev;

// A partial's eight channels of group g (channels 8g..8g+7) in its row, written by the expert
// rank and added by the origin; one place for each kind's row layout (region_layout.hpp, pr_wide_row):
// kBf16: [BF16: 2H bytes]; kFine: [high 16 bits of each float, rounded by fine_round_bits: 2H]
// [next 8 bits: H]; kF32: [channels 8g..8g+3 of every group: 2H][8g+4..8g+7: 2H]. Each warp store
// covers contiguous bytes (interleaving a lane's two float4 would write half of every sector).
template <LowLatencyPartials kP>
__device__ __forceinline__ void store_partial_x8(char* row, int hidden, int g, const float (&acc)[8]) {
  char* plane2 = row + 2 * static_cast<size_t>(hidden);
  if constexpr (kP == LowLatencyPartials::kFine) {
    uint32_t h[4] = {0, 0, 0, 0}, l[2] = {0, 0};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint32_t bits = fine_round_bits(__float_as_uint(acc[i]));
      h[i / 2] |= (bits >> 16) << (16 * (i % 2));
      l[i / 4] |= ((bits >> 8) & 0xffu) << (8 * (i % 4));
    }
    reinterpret_cast<int4*>(row)[g] =
        make_int4(static_cast<int>(h[0]), static_cast<int>(h[1]), static_cast<int>(h[2]), static_cast<int>(h[3]));
    reinterpret_cast<uint2*>(plane2)[g] = make_uint2(l[0], l[1]);
  } else if constexpr (kP == LowLatencyPartials::kF32) {
    reinterpret_cast<float4*>(row)[g] = make_float4(acc[0], acc[1], acc[2], acc[3]);
    reinterpret_cast<float4*>(plane2)[g] = make_float4(acc[4], acc[5], acc[6], acc[7]);
  } else {
    reinterpret_cast<int4*>(row)[g] = to_bf16x8(acc);
  }
}

template <LowLatencyPartials kP>
__device__ __forceinline__ void add_partial_x8(float (&acc)[8], const char* row, int hidden, int g) {
  const char* plane2 = row + 2 * static_cast<size_t>(hidden);
  if constexpr (kP == LowLatencyPartials::kFine) {
    const int4 hi = __ldcg(reinterpret_cast<const int4*>(row) + g);
    const uint2 lo = __ldcg(reinterpret_cast<const uint2*>(plane2) + g);
    const uint32_t h[4] = {static_cast<uint32_t>(hi.x), static_cast<uint32_t>(hi.y), static_cast<uint32_t>(hi.z),
                           static_cast<uint32_t>(hi.w)};
    const uint32_t l[2] = {lo.x, lo.y};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint32_t bits =
          (((h[i / 2] >> (16 * (i % 2))) & 0xffffu) << 16) | (((l[i / 4] >> (8 * (i % 4))) & 0xffu) << 8);
      acc[i] = __fadd_rn(acc[i], __uint_as_float(bits));
    }
  } else if constexpr (kP == LowLatencyPartials::kF32) {
    const float4 a = __ldcg(reinterpret_cast<const float4*>(row) + g);
    const float4 b = __ldcg(reinterpret_cast<const float4*>(plane2) + g);
    const float f[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = __fadd_rn(acc[i], f[i]);
  } else {
    add_bf16x8(acc, __ldcg(reinterpret_cast<const int4*>(row) + g));
  }
}

// Send half (see the top of this file).
template <LowLatencyPartials kP>
__device__ void combine_send_per_rank(const LowLatencyCombineParams& p, uint32_t seq) {
  constexpr bool kWide = partial_bytes(kP) > 2;  // fine or float32: single-expert rows as they are
  const CommonParams& c = p.common;
  const LowLatencyLayout& L = p.layout;
  const int R = c.num_ranks, EL = L.local_experts, H = L.hidden, K = p.num_topk, T = p.num_tokens;
  const int KS = L.kslots, D = L.pr_dests(), P = L.pr_parts();
  const int64_t RT = static_cast<int64_t>(R) * L.max_tokens;
  const int lane = lane_id();
  const int total_warps = static_cast<int>(gridDim.x) * kLowLatencyWarps;
  // Items fill block by block: at R = 4 that keeps the NVLink stores on fewer SMs (about 58 of 132
  // at the standard shape), which the fabric takes faster than the same stores from every SM
  // (BENCHMARKS run 48: round the blocks first was 2 us slower there, though faster at R = 1, 2).
  const int gw = static_cast<int>(blockIdx.x) * kLowLatencyWarps + warp_id();
  char* mine = lsa_peer(c, c.rank) + p.region;

  // This rank's weights go to the ranks that hold their experts, a thread of the grid per (t, k):
  // one 8-byte store each, tagged with the call's number, so it is its own flag.
  for (int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x); i < T * K;
       i += static_cast<int>(gridDim.x * blockDim.x)) {
    const int64_t e = p.topk_idx[i];
    if (e < 0 || e >= static_cast<int64_t>(EL) * R) continue;
    const int d = static_cast<int>(e) / EL;
    if (peer_masked(p.mask, d)) continue;
    const size_t at = static_cast<size_t>(i / K) * KS + i % K;
    st_relaxed_sys(reinterpret_cast<uint64_t*>(lsa_peer(c, d) + p.region + L.pr_weights(p.buffer, c.rank)) + at,
                   tag(seq, __float_as_uint(__ldg(p.topk_weights + i))));
  }

  // The plan's staged tokens, source by source (masked sources have none).
  int cnt = 0;
  if (lane < R && !peer_masked(p.mask, lane))
    cnt = min(static_cast<int>(*reinterpret_cast<const volatile uint32_t*>(mine + L.pr_count(p.buffer, lane))),
              L.max_tokens);
  const int incl = warp_inclusive_sum(cnt);
  const int N = __shfl_sync(0xffffffffu, incl, 31);
  const int V = H / 8;  // 16-byte vectors of a row
  constexpr int U = 4;  // loads in flight per lane and entry

  for (int w = gw; w < N * P; w += total_warps) {
    const int item = w / P, part = w % P;
    const int src = __popc(__ballot_sync(0xffffffffu, incl <= item));  // first source whose prefix passes item
    const int j = item - (__shfl_sync(0xffffffffu, incl, src) - __shfl_sync(0xffffffffu, cnt, src));
    const uint32_t head = __ldcg(reinterpret_cast<const unsigned int*>(mine + L.pr_head(p.buffer, src, j)));
    const int t = static_cast<int>(head & 0xffffu);
    const int n = min(static_cast<int>((head >> 16) & 0x1fu), KS);
    const int d = static_cast<int>((head >> 21) & 0x1fu);
    if (t >= L.max_tokens || d >= D) continue;  // not a plan of this layout: dropped, the origin times out
    // Fine and float32 partials: a token with one expert here gets its row as it is (the origin
    // weighs it), so it needs no weights and goes at once.
    const bool single = kWide && n == 1;
    if (peer_masked(p.mask, src)) continue;  // shrink mode: nothing goes to a masked rank
    // Lane e < n: entry e's row of y and its weight (row -1: not in the handle's range). The
    // weights are waited for only where they are used (not for a single row of wide partials).
    int64_t row = -1;
    float wt = 0.0f;
    int got = static_cast<int>(PeerWait::kArrived);
    if (lane < n) {
      const uint32_t ent = __ldcg(reinterpret_cast<const unsigned int*>(mine + L.pr_entries(p.buffer, src, j)) + lane);
      const int le = static_cast<int>(ent & 0xffffu), slot = static_cast<int>((ent >> 16) & 0xfffu);
      const int k = static_cast<int>(ent >> 28);
      if (le < EL) {
        const int64_t range = p.layout_range[static_cast<int64_t>(le) * R + src];
        const int64_t begin = range >> 32, count = range & 0xffffffff;
        if (slot < count && begin + count <= RT) {
          row = static_cast<int64_t>(le) * RT + begin + slot;
          if (!single) {
            uint64_t v = 0;
            long long cycles = 0;
            const auto* w64 = reinterpret_cast<const uint64_t*>(mine + L.pr_weights(p.buffer, src));
            got = static_cast<int>(wait_tag_or_mask(c.wait, p.mask, w64 + static_cast<size_t>(t) * KS + k, tag(seq, 0),
                                                    WaitPhase::kLowLatencyCombineWeights, src, v, cycles));
            wt = __uint_as_float(static_cast<uint32_t>(v));
            if (p.wait_cost_stats && cycles > 0)
              atomicAdd(reinterpret_cast<unsigned long long*>(p.wait_cost_stats + src),
                        static_cast<unsigned long long>(cycles));
          }
        }
      }
    }
    // Aborted (reported): stop sending, but leave normally (a split launch's barrier follows).
    if (__any_sync(0xffffffffu, got == static_cast<int>(PeerWait::kAborted))) break;
    if (__any_sync(0xffffffffu, got == static_cast<int>(PeerWait::kMasked))) continue;  // shrink mode, as above
    char* origin = lsa_peer(c, src) + p.region;
    char* dst_row = origin + (kWide ? L.pr_wide_row(p.buffer, t, d, partial_bytes(kP)) : L.combine_row(p.buffer, t, d));
    int4* dst = reinterpret_cast<int4*>(dst_row);
    const int4* y = reinterpret_cast<const int4*>(p.y);
    const int v0 = part * V / P, v1 = (part + 1) * V / P;
    if (single) {
      // The row itself (zeros when its slot is not in the handle's range: it contributes nothing).
      const int64_t r = __shfl_sync(0xffffffffu, row, 0);
      if (r >= 0) {
        warp_copy<U>(dst + v0, y + r * V + v0, v1 - v0, LoadNc{});
      } else {
        for (int i = v0 + lane; i < v1; i += 32) dst[i] = make_int4(0, 0, 0, 0);
      }
    } else {
      for (int base = v0; base < v1; base += 32 * U) {
        float acc[U][8];
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[u][i] = 0.0f;
        for (int e = 0; e < n; ++e) {
          const int64_t r = __shfl_sync(0xffffffffu, row, e);
          const float we = __shfl_sync(0xffffffffu, wt, e);
          if (r < 0) continue;
          int4 vec[U];
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const int i = base + lane + u * 32;
            if (i < v1) vec[u] = __ldg(y + r * V + i);
          }
#pragma unroll
          for (int u = 0; u < U; ++u) add_weighted_bf16x8(acc[u], we, vec[u]);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int i = base + lane + u * 32;
          if (i < v1) store_partial_x8<kP>(dst_row, H, i, acc[u]);
        }
      }
    }
    __syncwarp();
    if (lane == 0)
      st_release_sys(reinterpret_cast<uint64_t*>(origin + L.combine_flag(p.buffer, t, d * P + part)), tag(seq, 1));
  }
}

// Receive half: out[t] = the sum of the token's per-rank partials.
template <LowLatencyPartials kP, int kFirstWarp = 0>
__device__ void combine_recv_per_rank(const LowLatencyCombineParams& p, uint32_t seq) {
  constexpr bool kWide = partial_bytes(kP) > 2;  // fine or float32: single-expert rows as they are
  constexpr int kWarps = kLowLatencyWarps - kFirstWarp;
  const CommonParams& c = p.common;
  const LowLatencyLayout& L = p.layout;
  const int EL = L.local_experts, E = L.num_experts, H = L.hidden, K = p.num_topk, T = p.num_tokens;
  const int P = L.pr_parts();
  const int lane = lane_id();
  const int total_warps = static_cast<int>(gridDim.x) * kWarps;
  // Items go round the blocks first (item w to block w % grid): with fewer items than warps (small
  // T) every SM takes a share (BENCHMARKS run 47).
  const int gw = (warp_id() - kFirstWarp) * static_cast<int>(gridDim.x) + static_cast<int>(blockIdx.x);
  const int slices = (H + kSliceChannels - 1) / kSliceChannels;
  const char* mine = lsa_peer(c, c.rank) + p.region;

  for (int item = gw; item < T * slices; item += total_warps) {
    const int t = item / slices, s = item % slices;
    int e = -1;
    float w = 0.0f;  // wide partials: the weight of a rank's single expert is applied here
    if (lane < K) {
      const int64_t id = p.topk_idx[static_cast<int64_t>(t) * K + lane];
      if (id >= 0 && id < E) {
        e = static_cast<int>(id);
        if constexpr (kWide) w = p.topk_weights[static_cast<int64_t>(t) * K + lane];
      }
    }
    // The destination ranks in order of first occurrence (the dispatch's numbering).
    const int dest = e >= 0 ? e / EL : -1 - lane;  // distinct for lanes without an expert
    const uint32_t same = __match_any_sync(0xffffffffu, dest);
    const uint32_t leaders = __ballot_sync(0xffffffffu, e >= 0 && __ffs(same) - 1 == lane);
    const int nd = __popc(leaders);
    // Lane l < nd * P waits for part l % P of destination l / P.
    int owner = 0;
    bool ok = true, arrived = false;
    long long cycles = 0;
    if (lane < nd * P) {
      uint32_t x = leaders;
      for (int i = 0; i < lane / P; ++i) x &= x - 1;
      owner = __ffs(x) - 1;  // the leader lane; its rank below
    }
    owner = __shfl_sync(0xffffffffu, dest, owner);
    if (lane < nd * P) {
      uint64_t v;
      const PeerWait got =
          wait_tag_or_mask(c.wait, p.mask, reinterpret_cast<const uint64_t*>(mine + L.combine_flag(p.buffer, t, lane)),
                           tag(seq, 1), WaitPhase::kLowLatencyCombineRow, owner, v, cycles);
      ok = got != PeerWait::kAborted;
      arrived = got == PeerWait::kArrived;  // shrink mode: a masked rank's partial contributes nothing
    }
    if (!__all_sync(0xffffffffu, ok)) return;
    if (p.wait_cost_stats && cycles > 0)
      atomicAdd(reinterpret_cast<unsigned long long*>(p.wait_cost_stats + owner),
                static_cast<unsigned long long>(cycles));
    const uint32_t arrived_mask = __ballot_sync(0xffffffffu, arrived);
    const uint32_t part_mask = (1u << P) - 1u;
    const int c0 = s * kSliceChannels + lane * 8;
    const bool active = c0 < H;
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
    uint32_t rest = leaders;  // wide partials: destination d's leader lane is the lowest bit left
    for (int d = 0; d < nd; ++d) {
      if constexpr (kWide) {
        const int lead = __ffs(rest) - 1;
        rest &= rest - 1;
        const bool single = __popc(__shfl_sync(0xffffffffu, same, lead)) == 1;
        const float wd = __shfl_sync(0xffffffffu, w, lead);
        if (((arrived_mask >> (d * P)) & part_mask) != part_mask || !active) continue;  // every part, or none of it
        const char* row = mine + L.pr_wide_row(p.buffer, t, d, partial_bytes(kP));
        if (single) add_weighted_bf16x8(acc, wd, __ldcg(reinterpret_cast<const int4*>(row) + c0 / 8));
        else add_partial_x8<kP>(acc, row, H, c0 / 8);
      } else {
        if (((arrived_mask >> (d * P)) & part_mask) != part_mask) continue;  // every part, or none of it
        if (active) add_partial_x8<kP>(acc, mine + L.combine_row(p.buffer, t, d), H, c0 / 8);
      }
    }
    if (active) *reinterpret_cast<int4*>(p.out + static_cast<int64_t>(t) * H + c0) = to_bf16x8(acc);
  }
  if constexpr (kFirstWarp == 0) wait_all_done(p, seq, LLNoNet{});
}

// The per-rank combine's kernel, one instance per kind of partial (combine.cu has the per-expert one).
template <LowLatencyPartials kP>
__global__ void __launch_bounds__(kLowLatencyThreads, 1)
    low_latency_combine_per_rank_kernel(const __grid_constant__ LowLatencyCombineParams p) {
  const bool send = (p.phases & kLowLatencySend) != 0;
  const bool recv = (p.phases & kLowLatencyRecv) != 0;
  const uint32_t seq =
      send ? ld_volatile(&p.state->combine_seq) + 1u : ld_volatile(&p.state->buffer_combine_seq[p.buffer]);
  if (send && !call_number_left(p.common.wait, seq)) return;  // a receive half's number was checked by its send
  if (send) {
    combine_send_per_rank<kP>(p, seq);
    if (recv) {
      // One launch: warps 1.. count themselves in and receive at once; warp 0 waits for them, tells
      // the origins this rank is done (finish_combine_send) and waits for every rank's `done`.
      if (warp_id() != 0) {
        bar_arrive(1, kLowLatencyThreads);
        combine_recv_per_rank<kP, 1>(p, seq);
      } else {
        bar_sync(1, kLowLatencyThreads);
        finish_combine_send<LLNoNet, false>(p, seq, LLNoNet{});
        wait_all_done(p, seq, LLNoNet{});
      }
      return;
    }
    finish_combine_send(p, seq, LLNoNet{});
  }
  if (recv) combine_recv_per_rank<kP>(p, seq);
}

const KernelRegistration
    kKernels{reinterpret_cast<const void*>(low_latency_combine_per_rank_kernel<LowLatencyPartials::kBf16>),
             reinterpret_cast<const void*>(low_latency_combine_per_rank_kernel<LowLatencyPartials::kFine>),
             reinterpret_cast<const void*>(low_latency_combine_per_rank_kernel<LowLatencyPartials::kF32>)};

}  // namespace

void launch_low_latency_combine_per_rank(const LowLatencyCombineParams& p, int num_blocks, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  switch (p.partials) {
    case LowLatencyPartials::kBf16:
      low_latency_combine_per_rank_kernel<LowLatencyPartials::kBf16><<<num_blocks, kLowLatencyThreads, 0, s>>>(p);
      break;
    case LowLatencyPartials::kFine:
      low_latency_combine_per_rank_kernel<LowLatencyPartials::kFine><<<num_blocks, kLowLatencyThreads, 0, s>>>(p);
      break;
    default:
      low_latency_combine_per_rank_kernel<LowLatencyPartials::kF32><<<num_blocks, kLowLatencyThreads, 0, s>>>(p);
  }
  EPCOMM_LAUNCH_CHECK("low_latency_combine_per_rank_kernel");
}

}  // namespace epcomm
