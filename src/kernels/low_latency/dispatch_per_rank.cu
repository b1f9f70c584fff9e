// Low-latency dispatch, per-rank path (p.per_rank: EPCOMM_LL_PER_RANK >= 1 where the layout and
// shared memory allow; see params.hpp for the scheme). A token's experts fall on few ranks, so the
// sender stores it once per destination rank instead of once per expert:
// send:    (dispatch_per_rank_send.cuh) as the per-expert path's, plus a histogram of the
//          destination ranks of the tokens (a token counts once per rank); each count flag also
//          carries how many tokens this source sends to the rank (payload (count + 1) | tokens << 16).
//          A staged token is its payload, then one entry per (k) that selects an expert of that rank
//          (local expert, its slot in [le][source] exactly as the per-expert path computes it, k),
//          then its head (t | entries << 16 | d << 21). The token's destinations share the block's
//          warps (16 / destinations each, parts of the row); one thread per destination stores the
//          head and releases the token's flag (seq, u32, outside the slot:
//          LowLatencyLayout::staged_flag says why) after the next barrier.
// receive: every block reads all count flags (a thread each) and computes every (expert, source)
//          begin in shared memory; then warps take (staged token, part of the row) items: wait for
//          the flag, copy the part once from the staging slot into every row its entries name
//          (recv_x [le][begin + slot]: the same rows as the per-expert path), and part 0 writes
//          the scales, src_info and the per-(expert, source, slot) header the combine reads.
#include <cuda_runtime.h>

#include "core/call_check.hpp"
#include "kernels/common/launch.hpp"
#include "kernels/low_latency/dispatch_common.cuh"
#include "kernels/low_latency/dispatch_per_rank_send.cuh"
#include "kernels/low_latency/dispatch_smem.cuh"

namespace epcomm {
namespace {

using namespace epcomm::dev;

// Receive half (see the top of this file). `ints`: recv_smem_ints of shared memory.
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
  char* mine = lsa_peer(c, c.rank) + p.region;
  int32_t* cnt = ints;           // [le][src] rows
  int32_t* begin = cnt + E;      // [le][src] first packed row
  int32_t* rtot = begin + E;     // [src] staged tokens
  int32_t* ipre = rtot + R;      // [src + 1] prefix of rtot: the items
  int32_t* stop = ipre + R + 1;  // a count wait was aborted
  int32_t* dead = stop + 1;      // [src] shrink mode: some count of src settled as masked

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
      atomicAdd(reinterpret_cast<unsigned long long*>(p.wait_cost_stats + src),
                static_cast<unsigned long long>(cycles));
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
        *reinterpret_cast<uint32_t*>(mine + L.pr_count(p.buffer, src)) =
            static_cast<uint32_t>(dead[src] ? 0 : rtot[src]);
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
  const int data16 = p.use_fp8 ? H / 16 : H / 8;                            // 16-byte vectors of one recv_x row
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
      atomicAdd(reinterpret_cast<unsigned long long*>(p.wait_cost_stats + src),
                static_cast<unsigned long long>(cycles));
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
        lane < L.kslots
            ? __ldcg(reinterpret_cast<const unsigned int*>(msg + static_cast<size_t>(payload16) * 16) + lane)
            : 0u;
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
            if (g < s1 && 4 * g + i < G)
              word |= ((__float_as_uint(__ldcg(scales + 4 * g + i)) >> 23) & 0xffu) << (8 * i);
          for (int e = 0; e < n; ++e) {
            const int le = __shfl_sync(0xffffffffu, rle, e), pos = __shfl_sync(0xffffffffu, rpos, e);
            if (le >= 0 && g < s1)
              p.recv_scales_packed[(static_cast<int64_t>(le) * W + g) * RT + pos] = static_cast<int32_t>(word);
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
      *reinterpret_cast<uint32_t*>(mine + L.header(p.buffer, le, src, slot)) =
          (static_cast<uint32_t>(t) | (k << 16)) + 1u;
    }
  }
}

// The per-rank path's kernel (a kernel of its own, with its own registers; dispatch.cu has the
// per-expert one). kProbe: EPCOMM_LL_PROBE's instance.
template <bool kProbe>
__global__ void __launch_bounds__(kLowLatencyThreads, 1)
    low_latency_dispatch_per_rank_kernel(const __grid_constant__ LowLatencyDispatchParams p) {
  extern __shared__ __align__(16) uint8_t smem[];
  const bool send = (p.phases & kLowLatencySend) != 0;
  const bool recv = (p.phases & kLowLatencyRecv) != 0;
  // Every block reads the number before any block can publish it (publishing waits for all).
  probe_mark<kProbe>(p, send ? kProbeEntry : kProbeRecvEntry);
  if constexpr (kProbe) {  // a split launch's warps raise "recv done" with atomicMax
    unsigned long long* row = p.probe + blockIdx.x * kLowLatencyProbeSlots;
    if (send && recv && threadIdx.x == 0) row[kProbeRecvDone] = row[8 + kProbeRecvDone] = 0;
    if (threadIdx.x == 0)
      for (int i = kProbeItemWait; i < kLowLatencyProbeSlots; ++i) row[i] = 0;
  }
  const uint32_t seq =
      send ? ld_volatile(&p.state->dispatch_seq) + 1u : ld_volatile(&p.state->buffer_dispatch_seq[p.buffer]);
  if (send && !call_number_left(p.common.wait, seq)) return;  // a receive half's number was checked by its send
  if (send) {
    const LowLatencyLayout& L = p.layout;
    SendSmem sm = carve_send_smem(L, smem);
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
      dispatch_recv_per_rank<true, kProbe>(p, seq,
                                           reinterpret_cast<int32_t*>(
                                               smem + per_rank_recv_offset(L, grid, p.staging_buffers)));
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
    publish_dispatch(p, seq);  // starts with a barrier: the receive half may reuse the shared memory
    probe_mark<kProbe>(p, kProbePublished);
  }
  if (recv) {
    if (send) probe_mark<kProbe>(p, kProbeRecvEntry);
    dispatch_recv_per_rank<false, kProbe>(p, seq, reinterpret_cast<int32_t*>(smem));
    if constexpr (kProbe) {
      __syncthreads();
      probe_mark<kProbe>(p, kProbeRecvDone);
    }
  }
}

const KernelRegistration kKernels{reinterpret_cast<const void*>(low_latency_dispatch_per_rank_kernel<false>),
                                  reinterpret_cast<const void*>(low_latency_dispatch_per_rank_kernel<true>)};

}  // namespace

void launch_low_latency_dispatch_per_rank(const LowLatencyDispatchParams& p, int num_blocks, int smem_bytes,
                                          void* stream) {
  static OncePerDevice configured;
  configured.run([] {
    allow_max_dynamic_smem({reinterpret_cast<const void*>(low_latency_dispatch_per_rank_kernel<false>),
                            reinterpret_cast<const void*>(low_latency_dispatch_per_rank_kernel<true>)});
  });
  const auto s = static_cast<cudaStream_t>(stream);
  if (p.probe != nullptr)
    low_latency_dispatch_per_rank_kernel<true><<<num_blocks, kLowLatencyThreads, smem_bytes, s>>>(p);
  else low_latency_dispatch_per_rank_kernel<false><<<num_blocks, kLowLatencyThreads, smem_bytes, s>>>(p);
  EPCOMM_LAUNCH_CHECK("low_latency_dispatch_per_rank_kernel");
}

}  // namespace epcomm
