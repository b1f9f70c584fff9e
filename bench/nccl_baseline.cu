// The baseline a user without an EP library would write, on NCCL: route each token once per
// destination rank, exchange counts (grouped ncclSend/ncclRecv), sync with the host, permute rows
// into per-destination runs, all-to-all with grouped ncclSend/ncclRecv; combine sends the rows back
// and adds them in float32. Same problem and byte counting as epcomm's rows.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <nccl.h>

#include <mutex>
#include <random>
#include <stdexcept>

#include "bench.hpp"
#include "bench_util.hpp"

namespace epcomm::bench {
namespace {

void nccl_check(ncclResult_t r, const char* what) {
  if (r != ncclSuccess) throw std::runtime_error(std::string(what) + ": " + ncclGetErrorString(r));
}

// Destination mask of each token, and tokens per destination.
__global__ void route_kernel(const int64_t* topk, int T, int K, int experts_per_rank, uint32_t* mask, int* counts) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= T) return;
  uint32_t m = 0;
  for (int k = 0; k < K; ++k) {
    const int64_t e = topk[static_cast<int64_t>(t) * K + k];
    if (e >= 0) m |= 1u << (e / experts_per_rank);
  }
  mask[t] = m;
  for (uint32_t b = m; b; b &= b - 1) atomicAdd(&counts[__ffs(b) - 1], 1);
}

// One warp per destination: stable list of its tokens (ascending), at offsets[d].
__global__ void list_kernel(const uint32_t* mask, int T, const int* offsets, int* list) {
  const int d = blockIdx.x;
  const int lane = threadIdx.x;
  int base = offsets[d];
  for (int t0 = 0; t0 < T; t0 += 32) {
    const int t = t0 + lane;
    const bool hit = t < T && ((mask[t] >> d) & 1u);
    const uint32_t b = __ballot_sync(0xffffffffu, hit);
    if (hit) list[base + __popc(b & ((1u << lane) - 1u))] = t;
    base += __popc(b);
  }
}

__global__ void gather_kernel(const int4* x, int vecs, const int* list, int rows, int4* out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < static_cast<int64_t>(rows) * vecs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / vecs, v = i % vecs;
    out[i] = x[static_cast<int64_t>(list[r]) * vecs + v];
  }
}

__global__ void scatter_add_kernel(const __nv_bfloat16* back, int H, const int* list, int rows, float* acc) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < static_cast<int64_t>(rows) * H;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / H, h = i % H;
    atomicAdd(&acc[static_cast<int64_t>(list[r]) * H + h], __bfloat162float(back[i]));
  }
}

__global__ void to_bf16_kernel(const float* acc, int64_t n, __nv_bfloat16* out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16_rn(acc[i]);
}

}  // namespace

void run_nccl_baseline(const Options& o, Report& report) {
  const int R = gpu_ranks(o.ranks);
  const int T = o.tokens >= 0 ? o.tokens : 4096;
  const int H = o.hidden > 0 ? o.hidden : 7168;
  const int K = o.topk;
  const int E = o.experts > 0 ? o.experts : 256;
  ncclUniqueId id;
  nccl_check(ncclGetUniqueId(&id), "ncclGetUniqueId");
  std::mutex mu;
  const uint64_t seed = std::random_device{}();
  run_threads(R, [&](int r) {
    cuda_check(cudaSetDevice(r), "cudaSetDevice");
    ncclComm_t comm;
    nccl_check(ncclCommInitRank(&comm, R, id, r), "ncclCommInitRank");
    cudaStream_t s;
    cuda_check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "stream");
    std::mt19937_64 rng(seed + r);
    const auto x_host = random_bf16(rng, static_cast<size_t>(T) * H);
    DevMem x(x_host), topk(uniform_topk(rng, T, K, E));
    DevMem mask(sizeof(uint32_t) * std::max(T, 1)), counts(sizeof(int) * 2 * R), offsets(sizeof(int) * R);
    DevMem list(sizeof(int) * std::max(T * R, 1)), send(static_cast<size_t>(T) * R * H * 2);
    DevMem recv(static_cast<size_t>(T) * R * H * 2), back(static_cast<size_t>(T) * R * H * 2);
    DevMem acc(sizeof(float) * T * H), out(static_cast<size_t>(T) * H * 2);
    int* send_counts = static_cast<int*>(counts.get());
    int* recv_counts = send_counts + R;
    std::vector<int> sc(R), rc(R), so(R), ro(R);
    const size_t row = static_cast<size_t>(H) * 2;
    auto all_to_all = [&](const char* from, const std::vector<int>& fc, const std::vector<int>& fo, char* to,
                          const std::vector<int>& tc, const std::vector<int>& to_off) {
      nccl_check(ncclGroupStart(), "group");
      for (int p = 0; p < R; ++p) {
        nccl_check(ncclSend(from + fo[p] * row, fc[p] * row, ncclUint8, p, comm, s), "send");
        nccl_check(ncclRecv(to + to_off[p] * row, tc[p] * row, ncclUint8, p, comm, s), "recv");
      }
      nccl_check(ncclGroupEnd(), "group");
    };
    auto dispatch = [&] {
      cuda_check(cudaMemsetAsync(send_counts, 0, sizeof(int) * R, s), "memset");
      route_kernel<<<(T + 255) / 256, 256, 0, s>>>(static_cast<int64_t*>(topk.get()), T, K, E / R,
                                                   static_cast<uint32_t*>(mask.get()), send_counts);
      nccl_check(ncclGroupStart(), "group");
      for (int p = 0; p < R; ++p) {
        nccl_check(ncclSend(send_counts + p, 1, ncclInt32, p, comm, s), "send");
        nccl_check(ncclRecv(recv_counts + p, 1, ncclInt32, p, comm, s), "recv");
      }
      nccl_check(ncclGroupEnd(), "group");
      std::vector<int> both(2 * R);
      cuda_check(cudaMemcpyAsync(both.data(), counts.get(), sizeof(int) * 2 * R, cudaMemcpyDeviceToHost, s), "d2h");
      cuda_check(cudaStreamSynchronize(s), "count sync");
      for (int p = 0; p < R; ++p) {
        sc[p] = both[p];
        rc[p] = both[R + p];
        so[p] = p ? so[p - 1] + sc[p - 1] : 0;
        ro[p] = p ? ro[p - 1] + rc[p - 1] : 0;
      }
      cuda_check(cudaMemcpyAsync(offsets.get(), so.data(), sizeof(int) * R, cudaMemcpyHostToDevice, s), "h2d");
      list_kernel<<<R, 32, 0, s>>>(static_cast<uint32_t*>(mask.get()), T, static_cast<int*>(offsets.get()),
                                   static_cast<int*>(list.get()));
      const int rows = so[R - 1] + sc[R - 1];
      gather_kernel<<<264, 512, 0, s>>>(static_cast<int4*>(x.get()), H / 8, static_cast<int*>(list.get()), rows,
                                        static_cast<int4*>(send.get()));
      all_to_all(static_cast<char*>(send.get()), sc, so, static_cast<char*>(recv.get()), rc, ro);
    };
    auto combine = [&] {
      all_to_all(static_cast<char*>(recv.get()), rc, ro, static_cast<char*>(back.get()), sc, so);
      cuda_check(cudaMemsetAsync(acc.get(), 0, sizeof(float) * T * H, s), "memset");
      const int rows = so[R - 1] + sc[R - 1];
      scatter_add_kernel<<<264, 512, 0, s>>>(static_cast<__nv_bfloat16*>(back.get()), H, static_cast<int*>(list.get()),
                                             rows, static_cast<float*>(acc.get()));
      to_bf16_kernel<<<264, 512, 0, s>>>(static_cast<float*>(acc.get()), static_cast<int64_t>(T) * H,
                                         static_cast<__nv_bfloat16*>(out.get()));
    };
    dispatch();
    combine();
    cuda_check(cudaStreamSynchronize(s), "baseline");
    const int recv_rows = ro[R - 1] + rc[R - 1];
    const double d_us = time_us(s, o.warmup, o.iters, dispatch);
    const double c_us = time_us(s, o.warmup, o.iters, combine);
    {
      std::lock_guard<std::mutex> lock(mu);
      report.rows.push_back({"nccl-a2a", "dispatch-bf16", r, 0, d_us, recv_rows * 2.0 * H / d_us / 1e3,
                             "count exchange + host sync + permute + all-to-all"});
      report.rows.push_back({"nccl-a2a", "combine", r, 0, c_us, recv_rows * 2.0 * H / c_us / 1e3,
                             "all-to-all back + float32 scatter-add"});
    }
    cuda_check(cudaStreamSynchronize(s), "final");
    cudaStreamDestroy(s);
    ncclCommDestroy(comm);
  });
}

}  // namespace epcomm::bench
