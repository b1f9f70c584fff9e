// Low-latency combine (see params.hpp for the scheme). One kernel, two halves:
//
// send:    a warp per (local expert, source) unit (several when there are warps to spare) pushes
//          each of the unit's packed rows of y to the origin's slot [t][k] (t, k from the dispatch
//          header this rank still holds) and releases the row's flag; the last block past this
//          half tells every origin `done`.
// receive: a warp per (token, 256-channel slice) waits for the flags of the token's valid k, then
//          sums w * y in k order with separate multiply and add (no FMA: bit for bit the
//          reference), rounds once to BF16. Block 0 finally waits for every rank's `done`.
#include <cuda_runtime.h>

#include "core/check.hpp"
#include "kernels/low_latency/ll_device.cuh"
#include "kernels/low_latency/shrink.cuh"

namespace epcomm {
namespace {

using namespace epcomm::dev;

constexpr int kSliceChannels = 256;  // 8 per lane

__device__ void combine_send(const LowLatencyCombineParams& p, uint32_t seq) {
  const CommonParams& c = p.common;
  const LowLatencyLayout& L = p.layout;
  const int R = c.num_ranks, EL = L.local_experts, E = EL * R, H = L.hidden;
  const int64_t RT = static_cast<int64_t>(R) * L.max_tokens;
  const int lane = lane_id();
  const int total_warps = static_cast<int>(gridDim.x) * kLowLatencyWarps;
  const int gw = static_cast<int>(blockIdx.x) * kLowLatencyWarps + warp_id();
  const int Q = total_warps >= E ? total_warps / E : 1;
  const char* mine = c.peer_base[c.rank] + p.region;

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
    char* origin = c.peer_base[src] + p.region;
    for (int j = q; j < count; j += Q) {
      const uint64_t h = __ldcg(reinterpret_cast<const unsigned long long*>(mine + L.header(p.buffer, le, src, j)));
      const uint32_t v = tag_payload(h);
      const int t = static_cast<int>(v & 0xffffu), k = static_cast<int>(v >> 16);
      if (t >= L.max_tokens || k >= L.kslots) continue;
      const int4* row = reinterpret_cast<const int4*>(p.y + (static_cast<int64_t>(le) * RT + begin + j) * H);
      warp_copy<8>(reinterpret_cast<int4*>(origin + L.combine_row(p.buffer, t, k)), row, H / 8, LoadNc{});
      __syncwarp();
      if (lane == 0)
        st_release_sys(reinterpret_cast<uint64_t*>(origin + L.combine_flag(p.buffer, t, k)), tag(seq, 1));
    }
  }
}

// The last block past the send half publishes the call's number and tells every origin that this
// rank neither writes to it nor reads its own buffer for this combine any more.
__device__ void finish_combine_send(const LowLatencyCombineParams& p, uint32_t seq) {
  const CommonParams& c = p.common;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();
    if (atomicAdd(&p.state->combine_blocks_done, 1u) == gridDim.x - 1) {
      __threadfence_system();
      p.state->combine_blocks_done = 0;
      p.state->buffer_combine_seq[p.buffer] = seq;
      for (int r = 0; r < c.num_ranks; ++r)
        if (!peer_masked(p.mask, r))
          st_release_sys(reinterpret_cast<uint64_t*>(c.peer_base[r] + p.region + p.layout.done(p.buffer, c.rank)),
                         tag(seq, 1));
      __threadfence();
      atomicExch(&p.state->combine_seq, seq);
    }
  }
}

__device__ void combine_recv(const LowLatencyCombineParams& p, uint32_t seq) {
  const CommonParams& c = p.common;
  const LowLatencyLayout& L = p.layout;
  const int EL = L.local_experts, E = L.num_experts, H = L.hidden, K = p.num_topk, T = p.num_tokens;
  const int lane = lane_id();
  const int total_warps = static_cast<int>(gridDim.x) * kLowLatencyWarps;
  const int gw = static_cast<int>(blockIdx.x) * kLowLatencyWarps + warp_id();
  const int slices = (H + kSliceChannels - 1) / kSliceChannels;
  const char* mine = c.peer_base[c.rank] + p.region;

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
    if (e >= 0) {
      uint64_t v;
      const PeerWait got =
          wait_tag_or_mask(c.wait, p.mask, reinterpret_cast<const uint64_t*>(mine + L.combine_flag(p.buffer, t, lane)),
                           tag(seq, 1), WaitPhase::kLowLatencyCombineRow, owner, v, cycles);
      ok = got != PeerWait::kAborted;
      if (got == PeerWait::kMasked) e = -1;  // shrink mode: a masked rank's experts contribute nothing
    }
    if (!__all_sync(0xffffffffu, ok)) return;
    if (p.wait_cost_stats && cycles > 0)
      atomicAdd(reinterpret_cast<unsigned long long*>(p.wait_cost_stats + owner), static_cast<unsigned long long>(cycles));
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
      if (active && ((valid >> k) & 1u)) {
        const uint32_t words[4] = {static_cast<uint32_t>(v[k].x), static_cast<uint32_t>(v[k].y),
                                   static_cast<uint32_t>(v[k].z), static_cast<uint32_t>(v[k].w)};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          acc[2 * i] = __fadd_rn(acc[2 * i], __fmul_rn(wk, bf16_bits_to_float(words[i] & 0xffffu)));
          acc[2 * i + 1] = __fadd_rn(acc[2 * i + 1], __fmul_rn(wk, bf16_bits_to_float(words[i] >> 16)));
        }
      }
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

  // Leave only when every expert rank is past its send half: then no rank still reads its own
  // buffer for this combine, so this rank's next dispatch may write into it.
  if (blockIdx.x == 0 && warp_id() == 0 && lane < c.num_ranks && !aborted(c.wait)) {
    uint64_t v;
    long long cycles = 0;
    wait_tag_or_mask(c.wait, p.mask, reinterpret_cast<const uint64_t*>(mine + L.done(p.buffer, lane)), tag(seq, 1),
                     WaitPhase::kLowLatencyCombineDone, lane, v, cycles);
  }
}

__global__ void __launch_bounds__(kLowLatencyThreads, 1)
    low_latency_combine_kernel(const __grid_constant__ LowLatencyCombineParams p) {
  const bool send = (p.phases & kLowLatencySend) != 0;
  const bool recv = (p.phases & kLowLatencyRecv) != 0;
  const uint32_t seq = send ? ld_volatile(&p.state->combine_seq) + 1u : ld_volatile(&p.state->buffer_combine_seq[p.buffer]);
  if (send) {
    combine_send(p, seq);
    finish_combine_send(p, seq);
  }
  if (recv) combine_recv(p, seq);
}

}  // namespace

void launch_low_latency_combine(const LowLatencyCombineParams& p, int num_blocks, void* stream) {
  low_latency_combine_kernel<<<num_blocks, kLowLatencyThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  EPCOMM_LAUNCH_CHECK("low_latency_combine_kernel");
}

}  // namespace epcomm
