// epcomm-wire-probe: what the NVLink wires give each way of moving bytes that the normal-mode
// kernels could use, on every visible GPU at once (all-to-all, one process, peer access):
//
//   store      SIMT: 16-byte local loads, 16-byte stores to the peer (4 in flight per thread)
//   load       SIMT: 16-byte loads from the peer, local stores (a pull)
//   tma-push   bulk copies: local -> shared memory -> peer (what combine's pushers do)
//   tma-pull   bulk copies: peer -> shared memory -> local (what dispatch's pullers do)
//   ce-push    copy engines, no SMs: a cudaMemcpyPeerAsync per peer on its own stream, issued by
//              the sender (--ce-piece MiB splits each pair's bytes into several copies)
//   ce-pull    the same, issued by the receiver (peer -> local)
//
//   epcomm-wire-probe [--mib-per-pair 64] [--sms 16,24,32] [--modes store,load,tma-push,tma-pull]
//                     [--warps 4] [--bufs 3] [--piece 16384] [--iters 10] [--ce-piece 0]
//
// The copy-engine modes ignore --sms (they use none) and print 0 SMs.
//
// Prints, per mode and SM count, the bytes leaving each GPU per second (slowest GPU) and the
// logical figure (x R / (R - 1), docs/contract.md §7 counting).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "cli.hpp"
#include "kernels/common/ptx.cuh"

namespace {

using namespace epcomm::dev;

#define PROBE_CHECK(call)                                                                        \
  do {                                                                                           \
    const cudaError_t e_ = (call);                                                               \
    if (e_ != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "epcomm-wire-probe: %s failed: %s\n", #call, cudaGetErrorString(e_)); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)

constexpr int kMaxRanks = 8;
enum class Mode { kStore, kLoad, kTmaPush, kTmaPull, kCePush, kCePull };

struct Args {
  int rank, num_ranks;
  size_t bytes;                   // per peer, a multiple of 16
  uint8_t* send;                  // this GPU: [R][bytes], row r goes to rank r
  uint8_t* recv;                  // this GPU: [R][bytes], row r came from rank r
  uint8_t* peer_send[kMaxRanks];  // every GPU's send buffer (peer pointers)
  uint8_t* peer_recv[kMaxRanks];
  int bufs, piece;
};

// Blocks are dealt to peers round-robin; the blocks of one peer split its bytes.
__device__ __forceinline__ void my_share(const Args& a, int& peer, size_t& begin, size_t& end) {
  const int others = a.num_ranks - 1;
  const int q = blockIdx.x % others;
  peer = (a.rank + 1 + q) % a.num_ranks;
  const int per_peer = gridDim.x / others + (q < static_cast<int>(gridDim.x % others) ? 1 : 0);
  const int i = blockIdx.x / others;
  const size_t step = (a.bytes / 16 + per_peer - 1) / per_peer * 16;
  begin = min(a.bytes, step * i);
  end = min(a.bytes, begin + step);
}

template <bool kPush>
__global__ void __launch_bounds__(512) simt_kernel(const Args a) {
  int peer;
  size_t begin, end;
  my_share(a, peer, begin, end);
  const int4* src =
      reinterpret_cast<const int4*>(kPush ? a.send + peer * a.bytes : a.peer_send[peer] + a.rank * a.bytes);
  int4* dst = reinterpret_cast<int4*>(kPush ? a.peer_recv[peer] + a.rank * a.bytes : a.recv + peer * a.bytes);
  const size_t v0 = begin / 16, v1 = end / 16;
  constexpr int kUnroll = 4;
  for (size_t v = v0 + threadIdx.x; v < v1; v += blockDim.x * kUnroll) {
    int4 r[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (v + u * blockDim.x < v1) r[u] = __ldcg(src + v + u * blockDim.x);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (v + u * blockDim.x < v1) __stcg(dst + v + u * blockDim.x, r[u]);
  }
}

// Lane 0 of each warp runs a bulk-copy pipeline over its part of the block's share.
template <bool kPush>
__global__ void __launch_bounds__(256) tma_kernel(const Args a) {
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ uint64_t bars[8][8];
  int peer;
  size_t begin, end;
  my_share(a, peer, begin, end);
  const int warp = warp_id(), warps = blockDim.x / 32;
  if (lane_id() != 0) return;
  for (int b = 0; b < a.bufs; ++b) mbar_init(&bars[warp][b], 1);
  fence_mbar_init();
  const uint8_t* src = kPush ? a.send + peer * a.bytes : a.peer_send[peer] + a.rank * a.bytes;
  uint8_t* dst = kPush ? a.peer_recv[peer] + a.rank * a.bytes : a.recv + peer * a.bytes;
  uint8_t* bufs = smem + static_cast<size_t>(warp) * a.bufs * a.piece;
  const size_t piece = a.piece;
  // Pieces begin + (warp + k * warps) * piece.
  const size_t first = begin + warp * piece, stride = warps * piece;
  int n = 0;
  for (size_t off = first; off < end; off += stride) ++n;
  auto len = [&](int k) { return static_cast<uint32_t>(min(piece, end - (first + k * stride))); };
  uint32_t phases = 0;
  for (int k = 0; k < n && k < a.bufs; ++k) {
    mbar_arrive_expect_tx(&bars[warp][k], len(k));
    tma_load(bufs + k * piece, src + first + k * stride, len(k), &bars[warp][k]);
  }
  for (int k = 0; k < n; ++k) {
    const int b = k % a.bufs;
    while (!mbar_try_wait(&bars[warp][b], (phases >> b) & 1u)) {
    }
    phases ^= 1u << b;
    tma_store(dst + first + k * stride, bufs + b * piece, len(k));
    bulk_commit();
    const int prev = k - 1, next = prev + a.bufs;
    if (prev >= 0 && next < n) {
      const int pb = prev % a.bufs;
      bulk_wait_read<1>();
      mbar_arrive_expect_tx(&bars[warp][pb], len(next));
      tma_load(bufs + pb * piece, src + first + next * stride, len(next), &bars[warp][pb]);
    }
  }
  bulk_wait_all();
}

}  // namespace

int main(int argc, char** argv) {
  size_t mib = 64;
  std::vector<int> sms = {16, 24, 32};
  std::string modes = "store,load,tma-push,tma-pull";
  int warps = 4, bufs = 3, piece = 16384, iters = 10;
  size_t ce_piece_mib = 0;  // 0: one copy per pair
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--mib-per-pair") mib = std::strtoull(v.c_str(), nullptr, 10);
    else if (k == "--sms") sms = epcomm::bench::parse_list(v);
    else if (k == "--modes") modes = v;
    else if (k == "--warps") warps = std::atoi(v.c_str());
    else if (k == "--bufs") bufs = std::atoi(v.c_str());
    else if (k == "--piece") piece = std::atoi(v.c_str());
    else if (k == "--iters") iters = std::atoi(v.c_str());
    else if (k == "--ce-piece") ce_piece_mib = std::strtoull(v.c_str(), nullptr, 10);
    else {
      std::fprintf(stderr, "epcomm-wire-probe: unknown option %s\n", k.c_str());
      return 2;
    }
  }
  int R = 0;
  PROBE_CHECK(cudaGetDeviceCount(&R));
  R = std::min(R, kMaxRanks);
  if (R < 2) {
    std::printf("epcomm-wire-probe: needs 2 or more GPUs, found %d\n", R);
    return 0;
  }
  if (warps > 8 || bufs > 8 || bufs < 2 || piece % 16 != 0) {
    std::fprintf(stderr, "epcomm-wire-probe: --warps <= 8, 2 <= --bufs <= 8, --piece a multiple of 16\n");
    return 2;
  }
  const size_t bytes = mib << 20;
  std::vector<Args> args(R);
  std::vector<cudaStream_t> streams(R);
  std::vector<cudaEvent_t> start(R), stop(R);
  std::vector<std::vector<cudaStream_t>> pair_streams(R, std::vector<cudaStream_t>(R));
  std::vector<std::vector<cudaEvent_t>> pair_done(R, std::vector<cudaEvent_t>(R));
  for (int r = 0; r < R; ++r) {
    PROBE_CHECK(cudaSetDevice(r));
    for (int p = 0; p < R; ++p)
      if (p != r) {
        const cudaError_t e = cudaDeviceEnablePeerAccess(p, 0);
        if (e != cudaSuccess && e != cudaErrorPeerAccessAlreadyEnabled) PROBE_CHECK(e);
        (void)cudaGetLastError();
      }
    args[r].rank = r;
    args[r].num_ranks = R;
    args[r].bytes = bytes;
    args[r].bufs = bufs;
    args[r].piece = piece;
    PROBE_CHECK(cudaMalloc(&args[r].send, R * bytes));
    PROBE_CHECK(cudaMalloc(&args[r].recv, R * bytes));
    PROBE_CHECK(cudaMemset(args[r].send, r + 1, R * bytes));
    PROBE_CHECK(cudaStreamCreateWithFlags(&streams[r], cudaStreamNonBlocking));
    PROBE_CHECK(cudaEventCreate(&start[r]));
    PROBE_CHECK(cudaEventCreate(&stop[r]));
    for (int p = 0; p < R; ++p) {
      PROBE_CHECK(cudaStreamCreateWithFlags(&pair_streams[r][p], cudaStreamNonBlocking));
      PROBE_CHECK(cudaEventCreateWithFlags(&pair_done[r][p], cudaEventDisableTiming));
    }
    const int smem = warps * bufs * piece;
    PROBE_CHECK(cudaFuncSetAttribute(tma_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    PROBE_CHECK(cudaFuncSetAttribute(tma_kernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  }
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < R; ++p) {
      args[r].peer_send[p] = args[p].send;
      args[r].peer_recv[p] = args[p].recv;
    }
  cudaDeviceProp prop{};
  PROBE_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("epcomm-wire-probe: %d x %s, %zu MiB per pair, TMA %d warps x %d bufs x %d bytes\n", R, prop.name, mib,
              warps, bufs, piece);
  std::printf("%-9s %4s %12s %14s %14s\n", "mode", "SMs", "time (us)", "GB/s out", "GB/s logical");

  std::stringstream ms(modes);
  for (std::string name; std::getline(ms, name, ',');) {
    Mode mode;
    if (name == "store") mode = Mode::kStore;
    else if (name == "load") mode = Mode::kLoad;
    else if (name == "tma-push") mode = Mode::kTmaPush;
    else if (name == "tma-pull") mode = Mode::kTmaPull;
    else if (name == "ce-push") mode = Mode::kCePush;
    else if (name == "ce-pull") mode = Mode::kCePull;
    else {
      std::fprintf(stderr, "epcomm-wire-probe: unknown mode %s\n", name.c_str());
      return 2;
    }
    const bool ce = mode == Mode::kCePush || mode == Mode::kCePull;
    const std::vector<int> shapes = ce ? std::vector<int>{0} : sms;
    const size_t ce_piece = ce_piece_mib > 0 ? std::min(bytes, ce_piece_mib << 20) : bytes;
    for (int blocks : shapes) {
      std::vector<float> worst;
      for (int it = -2; it < iters; ++it) {
        for (int r = 0; r < R; ++r) {
          PROBE_CHECK(cudaSetDevice(r));
          PROBE_CHECK(cudaEventRecord(start[r], streams[r]));
          switch (mode) {
            case Mode::kStore:
              simt_kernel<true><<<blocks, 512, 0, streams[r]>>>(args[r]);
              break;
            case Mode::kLoad:
              simt_kernel<false><<<blocks, 512, 0, streams[r]>>>(args[r]);
              break;
            case Mode::kTmaPush:
              tma_kernel<true><<<blocks, 32 * warps, warps * bufs * piece, streams[r]>>>(args[r]);
              break;
            case Mode::kTmaPull:
              tma_kernel<false><<<blocks, 32 * warps, warps * bufs * piece, streams[r]>>>(args[r]);
              break;
            case Mode::kCePush:
            case Mode::kCePull:
              // A stream per peer, forked from and joined back into the rank's stream; the pair
              // (r, p) moves r's block for p into p's slot for r, as the SM modes do.
              for (int p = 0; p < R; ++p) {
                if (p == r) continue;
                cudaStream_t s = pair_streams[r][p];
                PROBE_CHECK(cudaStreamWaitEvent(s, start[r], 0));
                for (size_t off = 0; off < bytes; off += ce_piece) {
                  const size_t n = std::min(ce_piece, bytes - off);
                  if (mode == Mode::kCePush)
                    PROBE_CHECK(cudaMemcpyPeerAsync(args[p].recv + r * bytes + off, p, args[r].send + p * bytes + off,
                                                    r, n, s));
                  else
                    PROBE_CHECK(cudaMemcpyPeerAsync(args[r].recv + p * bytes + off, r, args[p].send + r * bytes + off,
                                                    p, n, s));
                }
                PROBE_CHECK(cudaEventRecord(pair_done[r][p], s));
                PROBE_CHECK(cudaStreamWaitEvent(streams[r], pair_done[r][p], 0));
              }
              break;
          }
          PROBE_CHECK(cudaGetLastError());
          PROBE_CHECK(cudaEventRecord(stop[r], streams[r]));
        }
        float t = 0;
        for (int r = 0; r < R; ++r) {
          PROBE_CHECK(cudaSetDevice(r));
          PROBE_CHECK(cudaEventSynchronize(stop[r]));
          float ms_r = 0;
          PROBE_CHECK(cudaEventElapsedTime(&ms_r, start[r], stop[r]));
          t = std::max(t, ms_r);
        }
        if (it >= 0) worst.push_back(t);
      }
      std::sort(worst.begin(), worst.end());
      const double us = worst[worst.size() / 2] * 1e3;
      const double out = static_cast<double>(bytes) * (R - 1) / us / 1e3;
      std::printf("%-9s %4d %12.1f %14.1f %14.1f\n", name.c_str(), blocks, us, out, out * R / (R - 1));
    }
  }
  // A check that the bytes arrived: the last mode's copy of rank 0's row for rank 1.
  uint8_t probe = 0;
  PROBE_CHECK(cudaSetDevice(1));
  PROBE_CHECK(cudaMemcpy(&probe, args[1].recv + 0 * bytes + bytes - 1, 1, cudaMemcpyDeviceToHost));
  std::printf("check: rank 1 got byte %d from rank 0 (want 1): %s\n", probe, probe == 1 ? "ok" : "WRONG");
  return probe == 1 ? 0 : 1;
}
