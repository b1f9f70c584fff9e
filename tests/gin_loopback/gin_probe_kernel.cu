// The probe kernel (gin_probe_kernel.cuh): one block of kThreads per rank.
#include "gin_probe_kernel.cuh"

namespace epcomm::gin_probe {
namespace {

__device__ unsigned long long now_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ uint64_t expected_value(int kind, int round) {
  const uint64_t k = uint64_t(round);
  switch (kind) {
    case kData:
      return (k + 1) * (k + 2) / 2;
    case kInc:
      return k + 1;
    case kZero:
      return 2 * (k + 1);
    default:
      return k + 1;
  }
}

// Records the first failure of the launch; later ones are dropped.
__device__ void record(ProbeResult* r, int status, int round, int peer, int kind, uint64_t seen, uint64_t want) {
  if (atomicCAS(&r->status, kOk, status) == kOk) {
    r->round = round;
    r->peer = peer;
    r->kind = kind;
    r->seen = seen;
    r->expected = want;
  }
}

// Threads 0..nRanks-1 each wait for one peer's signal `kind` to reach its value after `round`;
// bounded by wait_ns. Called by the whole block; returns false for every thread if any failed.
__device__ bool wait_signals(const ncclGin& gin, const ProbeParams& p, int kind, int round, bool exact,
                             ProbeResult* result, volatile int* failed) {
  const int me = gin.comm.rank, n = gin.comm.nRanks, peer = int(threadIdx.x);
  if (peer < n && peer != me) {
    const ncclGinSignal_t id = ncclGinSignal_t(peer * kKinds + kind);
    const uint64_t want = expected_value(kind, round);
    const unsigned long long start = now_ns();
    uint64_t seen = gin.readSignal(id);
    while (seen < want && !*failed) {
      if (now_ns() - start > p.wait_ns) {
        record(result, kTimeout, round, peer, kind, seen, want);
        *failed = 1;
        break;
      }
      seen = gin.readSignal(id);
    }
    if (!*failed && exact && seen != want) {
      record(result, kBadSignal, round, peer, kind, seen, want);
      *failed = 1;
    }
  }
  __syncthreads();
  return !*failed;
}

}  // namespace

__global__ void __launch_bounds__(kThreads)
    probe_kernel(ncclDevComm comm, ncclWindow_t window, ProbeParams p, ProbeResult* result) {
  __shared__ int failed;
  if (threadIdx.x == 0) failed = 0;
  __syncthreads();
  const ncclGin gin(comm, p.context);
  const ncclTeam world = ncclTeamWorld(comm);
  const int me = comm.rank, n = comm.nRanks;
  auto* local = static_cast<uint8_t*>(ncclGetLocalPointer(window, 0));

  for (int k = 0; k < p.rounds; ++k) {
    const size_t bytes = p.round_bytes[k];
    // Peers must have checked round k-1 before their slots for this rank are overwritten.
    if (k > 0 && !wait_signals(gin, p, kAck, k - 1, false, result, &failed)) return;
    for (int dst = 0; dst < n; ++dst) {
      if (dst == me) continue;
      for (size_t i = threadIdx.x; i < bytes; i += blockDim.x)
        local[send_offset(p, dst) + i] = pattern(p.context, k, me, dst, i);
    }
    // The proxy reads the source with a copy from the host side: every thread's stores must be
    // visible at system scope before thread 0 posts the puts.
    __threadfence_system();
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int dst = 0; dst < n; ++dst) {
        if (dst == me) continue;
        if (p.put_value) gin.putValue(world, dst, window, value_offset(p, n, me), inline_value(p.context, k, me, dst));
        gin.put(world, dst, window, recv_offset(p, n, me), window, send_offset(p, dst), bytes,
                ncclGin_SignalAdd{ncclGinSignal_t(me * kKinds + kData), uint64_t(k + 1)});
        gin.signal(world, dst, ncclGin_SignalInc{ncclGinSignal_t(me * kKinds + kInc)});
        gin.put(world, dst, window, recv_offset(p, n, me), window, send_offset(p, dst), 0,
                ncclGin_SignalAdd{ncclGinSignal_t(me * kKinds + kZero), 2});
      }
    }
    __syncthreads();
    // The data signal comes after the bytes; the other two after the data signal (same peer, same
    // context: in order).
    if (!wait_signals(gin, p, kData, k, true, result, &failed)) return;
    if (!wait_signals(gin, p, kInc, k, true, result, &failed)) return;
    if (!wait_signals(gin, p, kZero, k, true, result, &failed)) return;
    __threadfence_system();
    for (int src = 0; src < n; ++src) {
      if (src == me) continue;
      for (size_t i = threadIdx.x; i < bytes; i += blockDim.x) {
        // __ldcv: fetched again from memory, never an L1 line left by an earlier round.
        const uint8_t got = __ldcv(local + recv_offset(p, n, src) + i);
        const uint8_t want = pattern(p.context, k, src, me, i);
        if (got != want) {
          if (atomicAdd(&result->mismatches, 1ull) == 0) {
            result->first_bad_offset = i;
            result->first_bad_got = got;
            result->first_bad_want = want;
            record(result, kBadData, k, src, kData, 0, 0);
          }
        }
      }
    }
    if (p.put_value && threadIdx.x < n && int(threadIdx.x) != me) {
      const int src = int(threadIdx.x);
      const uint64_t got = __ldcv(reinterpret_cast<const unsigned long long*>(local + value_offset(p, n, src)));
      const uint64_t want = inline_value(p.context, k, src, me);
      if (got != want) {
        record(result, kBadValue, k, src, kData, got, want);
        failed = 1;
      }
    }
    __syncthreads();
    if (result->mismatches != 0 || failed) return;
    if (threadIdx.x == 0) {
      for (int dst = 0; dst < n; ++dst)
        if (dst != me) gin.signal(world, dst, ncclGin_SignalAdd{ncclGinSignal_t(me * kKinds + kAck), 1});
    }
    // Every put of this round consumed at the source (NCCL's flush waits for the proxy's
    // completions, which this plugin reports on the target's acknowledgement).
    gin.flush(ncclCoopCta{});
    if (threadIdx.x == 0) result->rounds_done = k + 1;
  }
  // Stay until every peer has checked the last round, so the next launch (another context) starts
  // with no put in flight to this rank.
  if (p.rounds > 0) wait_signals(gin, p, kAck, p.rounds - 1, true, result, &failed);
}

}  // namespace epcomm::gin_probe
