// The GPU half of epcomm-gin-probe: one block per rank exchanges patterns with every other rank
// through NCCL's GIN (an inline putValue, puts with a signal ADD, signal-only INC, size-0 puts with
// ADD; in that order, so the data signal also covers the value), waits for the
// exact signal values with a bound, checks every byte, and acknowledges each round before the
// next may overwrite it. What the rounds prove is written beside ProbeParams.
#pragma once

#include <nccl.h>
#include <nccl_device.h>

#include <cstddef>
#include <cstdint>

namespace epcomm::gin_probe {

constexpr int kThreads = 512;
constexpr int kMaxRounds = 16;

// Signals (per GIN context, ids relative to the devcomm's base; 4 per rank):
//   D[src] = src * 4 + 0  data puts, ADD (round + 1): after round k it holds (k+1)(k+2)/2
//   S[src] = src * 4 + 1  signal-only, INC: k + 1
//   Z[src] = src * 4 + 2  size-0 puts, ADD 2: 2 (k + 1)
//   A[src] = src * 4 + 3  src has checked round k: k + 1 (then the slot may be reused)
// A wait succeeds at >= and then requires ==, so a signal applied twice is caught.
enum SignalKind : int { kData = 0, kInc = 1, kZero = 2, kAck = 3, kKinds = 4 };

struct ProbeParams {
  int context;  // the GIN context this launch uses (each has its own signals)
  int rounds;
  size_t slot;                     // bytes per peer slot; the window holds 2 x nRanks slots
  size_t round_bytes[kMaxRounds];  // bytes put to each peer in round k (0 allowed)
  unsigned long long wait_ns;      // bound on each signal wait
  int put_value;                   // also an inline putValue per peer and round (Options::put_value)
};

enum ProbeStatus : int { kOk = 0, kTimeout = 1, kBadSignal = 2, kBadData = 3, kBadValue = 4 };

struct ProbeResult {
  int status;
  int round, peer, kind;              // where the first failure was seen
  unsigned long long seen, expected;  // signal values at that failure
  unsigned long long mismatches;      // bytes that differ, all rounds
  unsigned long long first_bad_offset;
  int first_bad_got, first_bad_want;
  int rounds_done;
};

// The byte at `offset` of what rank `src` puts to rank `dst` in `round` of `context`.
__host__ __device__ inline uint8_t pattern(int context, int round, int src, int dst, size_t offset) {
  uint64_t x = (uint64_t(context) << 56) ^ (uint64_t(round) << 48) ^ (uint64_t(src) << 36) ^ (uint64_t(dst) << 24) ^
               (offset * 0x9e3779b97f4a7c15ull);
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return uint8_t(x ^ (x >> 31));
}

// The 8-byte value rank `src` puts to rank `dst` with putValue (NCCL's inline path: the proxy
// sources it from a host buffer registered as NCCL_PTR_HOST).
__host__ __device__ inline uint64_t inline_value(int context, int round, int src, int dst) {
  uint64_t v = 0;
  for (int b = 0; b < 8; ++b) v |= uint64_t(pattern(context, round, src, dst, (size_t(1) << 40) + b)) << (8 * b);
  return v;
}

// The window: nRanks send slots, nRanks receive slots, then one 8-byte inline value per source.
__host__ __device__ inline size_t send_offset(const ProbeParams& p, int dst) { return size_t(dst) * p.slot; }
__host__ __device__ inline size_t recv_offset(const ProbeParams& p, int nranks, int src) {
  return size_t(nranks + src) * p.slot;
}
__host__ __device__ inline size_t value_offset(const ProbeParams& p, int nranks, int src) {
  return 2 * size_t(nranks) * p.slot + 8 * size_t(src);
}
__host__ __device__ inline size_t window_bytes(const ProbeParams& p, int nranks) {
  return (value_offset(p, nranks, nranks) + 4095) / 4096 * 4096;
}

__global__ void probe_kernel(ncclDevComm comm, ncclWindow_t window, ProbeParams params, ProbeResult* result);

}  // namespace epcomm::gin_probe
