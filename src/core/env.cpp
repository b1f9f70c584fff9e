#include "core/env.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "epcomm/error.hpp"

namespace epcomm {

const std::vector<EnvParam>& env_params() {
  static const std::vector<EnvParam> params = {
      // DeepEP's order (its kernels give up after about 100 s): a first call that waits for ranks
      // still loading kernels or compiling (frameworks warm up unevenly) must not fail.
      {"EPCOMM_TIMEOUT_MS", 100000,
       "timeout of every GPU wait (and of the host's wait for dispatch counts), in milliseconds"},
      // 0 keeps NCCL's own blocking ncclCommInitRank (no bound); the bounded path (non-blocking
      // init, then a blocking split) is opt-in until it has run on more machines (BENCHMARKS.md).
      {"EPCOMM_INIT_TIMEOUT_MS", 0,
       "bound on making the group's NCCL communicator (Group::create_nccl, the Python Buffer), in "
       "milliseconds; 0 = NCCL's blocking init, which waits for ever for a rank that never joins"},
      {"EPCOMM_RANKS_PER_NODE", 0,
       "ranks per node; 0 = the NVLink (LSA) domain NCCL reports. Smaller values split one machine into "
       "virtual nodes"},
      {"EPCOMM_NUM_SMS", 24, "SMs used by normal-mode kernels when the config does not say"},
      {"EPCOMM_MAX_TOKENS_PER_RANK", 65536, "largest T one rank may pass to normal-mode dispatch"},
      {"EPCOMM_MAX_EXPERTS_PER_RANK", 1024, "largest E/R the buffer supports"},
      // Kernel shapes, for tuning sweeps (0: the built-in rule).
      {"EPCOMM_DISPATCH_PULLER_WARPS", 0,
       "dispatch: puller warps per block (0: as many as shared memory holds with two rows each, up to 8)"},
      {"EPCOMM_DISPATCH_PULLER_STAGES", 0, "dispatch: rows in flight per puller warp (0: as many as fit, up to 6)"},
      {"EPCOMM_COMBINE_PUSHER_WARPS", 0, "combine: pusher warps per block (0: 4, at most one per rank)"},
      {"EPCOMM_COMBINE_PUSHER_STAGES", 0, "combine: 16 KiB buffers per pusher warp (0: 2)"},
      {"EPCOMM_COMBINE_REDUCER_WARPS", 0, "combine: reducer warps per block (0: 12)"},
      // Low-latency paths (BufferOptions::low_latency_per_rank overrides it per buffer): 1 is exact
      // (the k-order sum); 4, the default, only reorders float32 sums; 3 and 2 trade a rounding of
      // per-rank partial sums for fewer combine bytes (opt-in, like a compressed combine).
      {"EPCOMM_LL_PER_RANK", 4,
       "low-latency: 4 (the default) sends each token once per destination rank in dispatch and "
       "pre-reduces per rank in combine with float32 partials (float32 reordering only); 1 keeps the "
       "combine once per expert (bit for bit the k-order sum); 3 fine partials (24-bit floats, error "
       "<= 2^-16 of a partial), 2 BF16 partials (one extra rounding); 0 = once per expert throughout"},
      // Normal mode across nodes (BufferOptions::internode_bf16_partials overrides it per buffer).
      {"EPCOMM_INTER_BF16_PARTIALS", 0,
       "normal mode across nodes: 1 sends each node's partial sum of a token to its origin as BF16 "
       "(half the combine's network bytes, one more rounding, as DeepEP); 0 as float32"},
      // Normal mode across nodes (BufferOptions::internode_combine_nvl overrides it per buffer).
      {"EPCOMM_INTER_COMBINE_NVL", 1,
       "normal mode across nodes: 1 puts the rows node peers push to a token's forwarder in combine in "
       "num_nvl_bytes's part of the region where that holds more tokens per round (num_rdma_bytes then holds only "
       "the node partials: fewer rounds); 0 keeps them in num_rdma_bytes"},
      {"EPCOMM_LL_PROBE", 0,
       "low-latency diagnostics: 1 stamps per-block phase times in every LL dispatch kernel "
       "(Buffer::low_latency_probe_report)"},
      {"EPCOMM_LL_NET", 0,
       "low-latency with more than one node: 1 sends to ranks of other nodes only through the network "
       "transport (puts + signals), 0 by LSA stores to every rank"},
      // Across real nodes clean_low_latency_buffer waits on the host (with a drain of what a failed
      // call left) unless the caller's stream is capturing; 1 takes the stream-ordered barriers always.
      // For comparisons (BENCHMARKS run 82): the wait at every call costs a driver call per call.
      {"EPCOMM_LL_JOIN_EACH_CALL", 0,
       "low-latency calls on the caller's stream: 1 makes the comm stream wait for each one at once; 0 "
       "(the default) records an event per call and makes the comm stream wait only when something "
       "synchronizes it (reset, statistics, destroy, a call on the comm stream) or the stream changes"},
      {"EPCOMM_LL_CLEAN_ON_DEVICE", 0,
       "across real nodes: 1 makes clean_low_latency_buffer stream-ordered (GIN signal barriers, "
       "capturable) always; 0 only while the caller's stream is capturing a CUDA graph, host barriers "
       "otherwise"},
  };
  return params;
}

int64_t env_value(const char* name) {
  for (const EnvParam& p : env_params()) {
    if (std::strcmp(p.name, name) != 0) continue;
    const char* s = std::getenv(name);
    if (!s || !*s) return p.default_value;
    char* end = nullptr;
    long long v = std::strtoll(s, &end, 10);
    if (*end != '\0' || v < 0) throw ArgumentError(std::string(name) + "='" + s + "' is not a non-negative integer");
    return v;
  }
  throw Error(std::string("unknown epcomm environment parameter ") + name);
}

bool low_latency_net_requested() {
  static const bool on = env_value("EPCOMM_LL_NET") != 0;
  return on;
}

int low_latency_per_rank_level() {
  static const int level = static_cast<int>(std::min<int64_t>(env_value("EPCOMM_LL_PER_RANK"), 4));
  return level;
}

}  // namespace epcomm
