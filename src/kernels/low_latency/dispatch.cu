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
#include <cuda_runtime.h>

#include <mutex>

#include "core/check.hpp"
#include "kernels/low_latency/ll_device.cuh"
#include "kernels/low_latency/shrink.cuh"

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

__device__ void dispatch_send(const LowLatencyDispatchParams& p, uint32_t seq, const SendSmem& sm) {
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

  // Counts first: receivers then know where each source's rows start before any message lands.
  for (int i = tid; i < owned_n; i += nthreads) {
    const int e = b + i * grid;
    if (e >= E) break;
    if (peer_masked(p.mask, e / EL)) continue;  // shrink mode: nothing goes to a masked rank
    uint64_t* flag = reinterpret_cast<uint64_t*>(peer_region(p, e / EL) + L.count(p.buffer, e % EL, c.rank));
    // A source has Tmax slots per expert; only tokens that list an expert twice can exceed them.
    st_release_sys(flag, tag(seq, static_cast<uint32_t>(min(sm.owned[i], L.max_tokens)) + 1u));
  }

  const int G = H / kLowLatencyScaleGroup;
  const int payload16 = p.use_fp8 ? static_cast<int>((H + align_up(4 * G, 16)) / 16) : H / 8;
  for (int t = t_begin, it = 0; t < t_end; ++t, ++it) {
    const int sb = p.staging_buffers == 2 ? (it & 1) : 0;
    uint8_t* msg = sm.staging + static_cast<size_t>(sb) * L.msg_bytes;
    int32_t* slot = sm.slots + sb * kMaxTopk;
    int32_t* expert = sm.experts + sb * kMaxTopk;
    if (tid == 0) {
      // In k order, so a token that names an expert twice gets increasing slots: rows stay in
      // (token, k) order inside each source, as the reference lays them out.
      for (int k = 0; k < K; ++k) {
        const int64_t e = p.topk_idx[static_cast<int64_t>(t) * K + k];
        const bool ok = e >= 0 && e < E;
        int s = ok ? sm.hist[e]++ : -1;
        if (s >= L.max_tokens) {  // no room: dropped and reported, never written past the slots
          report(c.wait, 3, WaitPhase::kNone, static_cast<int>(e), static_cast<uint64_t>(L.max_tokens), 0);
          s = -1;
        }
        expert[k] = s >= 0 ? static_cast<int>(e) : -1;
        slot[k] = s;
      }
    }
    const uint16_t* row = p.x + static_cast<size_t>(t) * H;
    if (p.use_fp8) stage_fp8(row, H, p.round_scale, msg);
    else stage_bf16(row, H, msg);
    __syncthreads();
    for (int k = warp; k < K; k += kLowLatencyWarps) {
      const int e = expert[k];
      if (e < 0 || peer_masked(p.mask, e / EL)) continue;
      const int s = slot[k];
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
}

// The last block past the send half publishes the call's number (the receive of a hook reads it).
__device__ void publish_dispatch(const LowLatencyDispatchParams& p, uint32_t seq) {
  __syncthreads();
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

// The count of (local expert le, source src): its flag's payload (count + 1), or 0 when shrink mode
// masked the source (then settled once per call, see shrink.cuh). False: the call was aborted.
__device__ __forceinline__ bool receive_count(const LowLatencyDispatchParams& p, const char* mine, int le, int src,
                                              uint32_t seq, uint32_t& payload, long long& cycles) {
  const LowLatencyLayout& L = p.layout;
  const uint64_t* flag = reinterpret_cast<const uint64_t*>(mine + L.count(p.buffer, le, src));
  uint64_t v = 0;
  const PeerWait w =
      wait_tag_or_mask(p.common.wait, p.mask, flag, tag(seq, 1), WaitPhase::kLowLatencyDispatchCount, src, v, cycles);
  if (w == PeerWait::kAborted) return false;
  payload = w == PeerWait::kArrived ? static_cast<uint32_t>(v) : 0u;
  if (p.mask != nullptr)
    payload = settle_count(p.count_decisions + static_cast<size_t>(p.buffer) * L.num_experts +
                               static_cast<size_t>(le) * L.num_ranks + src,
                           seq, tag(seq, payload));
  return true;
}

__device__ void dispatch_recv(const LowLatencyDispatchParams& p, uint32_t seq) {
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
    if (lane <= src) ok = receive_count(p, mine, le, lane, seq, payload, count_cycles);
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
    for (int j = q; j < count; j += Q) {
      uint64_t h = 0;
      int got = static_cast<int>(PeerWait::kArrived);
      if (lane == 0)
        got = static_cast<int>(wait_tag_or_mask(c.wait, p.mask,
                                                reinterpret_cast<const uint64_t*>(mine + L.header(p.buffer, le, src, j)),
                                                tag(seq, 1), WaitPhase::kLowLatencyDispatchMessage, src, h,
                                                message_cycles));
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

__global__ void __launch_bounds__(kLowLatencyThreads, 1)
    low_latency_dispatch_kernel(const __grid_constant__ LowLatencyDispatchParams p) {
  extern __shared__ __align__(16) uint8_t smem[];
  const bool send = (p.phases & kLowLatencySend) != 0;
  const bool recv = (p.phases & kLowLatencyRecv) != 0;
  // Every block reads the number before any block can publish it (publishing waits for all).
  const uint32_t seq = send ? ld_volatile(&p.state->dispatch_seq) + 1u : ld_volatile(&p.state->buffer_dispatch_seq[p.buffer]);
  if (send) {
    const LowLatencyLayout& L = p.layout;
    int32_t* ints = reinterpret_cast<int32_t*>(smem);
    const int owned_n = (L.num_experts + static_cast<int>(gridDim.x) - 1) / static_cast<int>(gridDim.x);
    SendSmem sm;
    sm.hist = ints;
    sm.owned = ints + L.num_experts;
    sm.slots = sm.owned + owned_n;
    sm.experts = sm.slots + 2 * kMaxTopk;
    sm.staging = smem + align_up(sizeof(int32_t) * send_smem_ints(L.num_experts, static_cast<int>(gridDim.x)), 16);
    dispatch_send(p, seq, sm);
    publish_dispatch(p, seq);
  }
  if (recv) dispatch_recv(p, seq);
}

}  // namespace

int low_latency_dispatch_shared_bytes(const LowLatencyLayout& layout, int num_blocks, int staging_buffers) {
  return static_cast<int>(align_up(sizeof(int32_t) * send_smem_ints(layout.num_experts, num_blocks), 16) +
                          static_cast<size_t>(staging_buffers) * layout.msg_bytes);
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
    EPCOMM_CUDA_CHECK(
        cudaFuncSetAttribute(low_latency_dispatch_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem));
  };
  if (device >= 0 && device < kMaxDevices) std::call_once(configured[device], configure);
  else configure();
  low_latency_dispatch_kernel<<<num_blocks, kLowLatencyThreads, smem_bytes, static_cast<cudaStream_t>(stream)>>>(p);
  EPCOMM_LAUNCH_CHECK("low_latency_dispatch_kernel");
}

}  // namespace epcomm
