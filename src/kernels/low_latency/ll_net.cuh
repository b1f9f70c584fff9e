// Low-latency mode to ranks of other nodes through the network transport (EPCOMM_LL_NET=1 with
// more than one node; LowLatencyNetLayout in net_layout.hpp says where things live). The LL kernels are
// templates over a "net" argument: LLNoNet (the default path: every peer by LSA stores, the code
// the compiler sees is the one it saw before) or LLNet<Net> (Net = EmulatedNet over virtual nodes,
// or LLGinNet, ll_net_gin.cuh, across real nodes, where it is the default), which
// sends to ranks of the same node by LSA as before and to ranks of other nodes only by the
// transport's operations (GIN's rules, transport/net_emulated.cuh):
//
// dispatch send:  the owner block of expert e writes min(rows, Tmax) into this rank's staging entry
//                 for e's rank (meta_out [b][dest].counts[le]); tid 0 writes the header t | k << 16
//                 of (token, k) there too (.headers[le][slot]). A token with any remote k is copied
//                 from shared memory into this rank's window (tokens[b][t]) and a warp per such k
//                 puts it into the destination's message slot (the same slot as the LSA path's).
//                 Each block then signals every destination it put to: kLLNetData += messages.
//                 The last block (a grid counter) puts each remote destination's entry into its
//                 meta_in [b][this rank] and signals kLLNetMeta += 1.
// dispatch recv:  a source of another node: wait kLLNetMeta >= shadow + 1, the counts are in
//                 meta_in; then (a unit with rows) wait kLLNetData >= shadow + the sum of that
//                 source's counts, and copy as the LSA path does, headers from meta_in (and stored
//                 into the local per-expert header the combine reads). The last block to finish
//                 advances the shadows.
// combine send:   a row for an origin of another node is staged in this rank's window at its
//                 zero-copy place (skipped when y is the zero-copy area) and put into the origin's
//                 combine row [t][k]; each block signals kLLNetCombineData += rows per origin; the
//                 last block signals kLLNetCombineDone += 1 instead of the LSA `done` store.
// combine recv:   each block counts, from topk_idx, the rows every remote rank owes this rank and
//                 waits kLLNetCombineData >= shadow + that before summing; `done` of a remote rank
//                 is kLLNetCombineDone >= shadow + 1; the last block advances the shadows.
//
// Signals and shadows are per buffer, so the two buffers' calls (hooks in any order) never mix.
// Shrink mode: waits end early for masked peers (wait_geq_or_mask over the signal); shadows advance
// by what the peer was to send, so a peer masked for good is skipped; bringing a masked peer back
// needs clean_low_latency_buffer on every rank (it zeroes signals and shadows).
#pragma once

#include "kernels/low_latency/shrink.cuh"
#include "transport/net_emulated.cuh"

namespace epcomm::dev {

// The default path: no network, every peer by LSA.
struct LLNoNet {
  static constexpr bool kEnabled = false;
  __device__ __forceinline__ bool remote(int) const { return false; }
};

template <class Net>
struct LLNet {
  static constexpr bool kEnabled = true;
  Net net;
  const LowLatencyNetArgs& a;
  char* mine;  // this rank's LL region (local pointer)
  int rank;

  __device__ __forceinline__ const LowLatencyNetLayout& L() const { return a.layout; }
  __device__ __forceinline__ bool remote(int peer) const { return peer / a.ranks_per_node != rank / a.ranks_per_node; }
  __device__ __forceinline__ uint64_t* shadow(int b, int kind, int peer) const {
    return reinterpret_cast<uint64_t*>(mine + a.layout.shadow(b, kind, peer));
  }
  __device__ __forceinline__ uint64_t shadow_value(int b, int kind, int peer) const {
    return *reinterpret_cast<const volatile uint64_t*>(shadow(b, kind, peer));
  }
  __device__ __forceinline__ uint64_t signal_value(int b, int kind, int peer) const {
    return net.read_signal(a.layout.signal_id(b, kind, peer));
  }
  // Bounded wait for this rank's signal (b, kind, peer) >= target, ending early for a masked peer.
  __device__ __forceinline__ PeerWait wait(const WaitContext& ctx, int32_t* mask, int b, int kind, int peer,
                                           uint64_t target, WaitPhase phase, long long& cycles) const {
    uint64_t v = 0;
    const int id = a.layout.signal_id(b, kind, peer);
    const Net& n = net;
    return wait_geq_or_mask(
        ctx, mask, [&n, id] { return n.read_signal(id); }, target, phase, peer, v, cycles);
  }
  // meta_in [b][src]: count of local expert le, and the header of slot j.
  __device__ __forceinline__ uint32_t count_in(int b, int src, int le) const {
    return __ldcg(reinterpret_cast<const unsigned int*>(mine + a.layout.in_entry(b, src)) + le);
  }
  __device__ __forceinline__ uint32_t header_in(int b, int src, int le, int j) const {
    return __ldcg(
        reinterpret_cast<const unsigned int*>(mine + a.layout.in_entry(b, src) + a.layout.header_in_entry(le, j)));
  }
};

// Every thread of every block calls it after its part of a grid phase; true in the last block to
// arrive (which then sees every other block's writes). The counter is left at zero.
__device__ __forceinline__ bool ll_net_last_block(uint32_t* counter, int32_t* flag_smem) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned done = atomicAdd(counter, 1u);
    *flag_smem = done == gridDim.x - 1;
    if (*flag_smem) {
      *counter = 0;
      __threadfence();
    }
  }
  __syncthreads();
  return *flag_smem != 0;
}

}  // namespace epcomm::dev
