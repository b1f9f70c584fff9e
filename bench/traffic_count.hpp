// The bytes and network messages one dispatch or combine moves per rank across nodes, counted as
// epcomm's kernels move them (issue 21, "figures that predict a cluster"). Plain C++, no GPU: the
// routing is real (every token routed with a fixed seed), the byte sizes come from the kernels'
// own layout headers, and the rules below restate what each kernel sends:
//
// Low-latency mode across real nodes (the network path, kernels/low_latency/ll_net.cuh and the
// per-expert kernels dispatch_per_expert.cuh / combine_per_expert.cuh; the per-rank paths are not
// used with it):
//   dispatch  every (token, k) whose expert lives on rank d: d of another node gets one put of the
//             message payload (FP8 row + float32 scales padded to 16 bytes, or the BF16 row); d of
//             this node gets the payload and an 8-byte header by NVLink stores; d = this rank is a
//             local copy. Counts: an 8-byte tag per expert of each other rank of this node (NVLink);
//             for each rank of another node one put of its meta entry (counts + (t, k) headers,
//             LowLatencyNetLayout::entry_bytes) and one signal. Each block also signals every remote
//             rank it put to (tokens are dealt to blocks in contiguous ranges).
//   combine   every received (token, k) row goes back to its origin: a put of the BF16 row (2 *
//             hidden) to an origin of another node, NVLink stores of the row and an 8-byte flag to
//             one of this node. Each block signals every remote origin it put to (warp w of the grid
//             takes item w of (expert, source, part)); the last block signals `done` to every
//             remote rank (an 8-byte NVLink store to the ranks of this node).
//
// Normal mode across nodes (kernels/internode/notify.cuh, dispatch.cuh, combine.cuh):
//   notify    one put of the meta entry (header, counts [R], expert counts [max_local_experts],
//             chunk masks) and one signal to every rank, this one included (all through GIN).
//   dispatch  source (n, l) puts each token once to its forwarder (m, l) of every other node m the
//             token goes to (a row of InterDispatchGeometry::drow: row, scales, top-k ids and
//             weights); each block signals every remote forwarder, the last block puts the chunk
//             masks (4 bytes per token slot) and signals once more; the forwarder signals "free" back.
//             Then every destination (m, d) pulls the row (row, scales, ids, weights) over NVLink
//             from the forwarder (m, l), or from the source itself for the source's own node, and
//             the chunk's 4-byte masks (one per token of the chunk) for each (source, chunk) it
//             receives from; nothing crosses a link where the forwarder is the destination.
//   combine   each expert rank pushes every received row (BF16 row, K float32 weights, 4-byte tag)
//             over NVLink to the forwarder of the row's origin (same node, origin's local index);
//             the forwarder sums its node's rows and puts one float32 partial
//             (InterCombineGeometry::prow) per (token, origin node) to the origin of another node;
//             each block signals every remote origin once, and the end signals "free" once.
// Signals carry no payload here (8 bytes at most); small node flags (a few per call) are left out.
#pragma once

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "kernels/internode/params.hpp"
#include "kernels/low_latency/net_layout.hpp"
#include "kernels/low_latency/region_layout.hpp"

namespace epcomm::traffic {

struct Shape {
  int ranks = 0, ranks_per_node = 8, tokens = 0, hidden = 7168, topk = 8, experts = 0;
  int nodes() const { return ranks / ranks_per_node; }
  int per_rank() const { return experts / ranks; }
};

// ---- routing ----

enum class Routing { kUniform, kSkewed, kGrouped };
inline const char* name_of(Routing r) {
  return r == Routing::kUniform ? "uniform" : r == Routing::kSkewed ? "skewed" : "top-4 nodes";
}

using TopK = std::vector<std::vector<int64_t>>;  // [rank][T * K], -1 = dropped slot

inline int64_t pick(std::mt19937_64& rng, int64_t n) { return std::uniform_int_distribution<int64_t>(0, n - 1)(rng); }

// One rank's [T, K] expert ids.
//  uniform: K distinct experts, uniformly (the top-k of i.i.d. scores: DeepEP's tests, SPEC.md §7);
//  skewed:  tests/cpu/scale_problems.hpp's skew restated: a third of the picks go to the experts of
//           rank 0, the last rank and every rank of one hot node, slot 0 is expert E - 1 one time in
//           five, a slot is dropped (-1) with probability 0.15 and all of a token's with 0.05;
//  grouped: DeepEP test_internode.py's group-limited gating: i.i.d. scores, the 4 nodes with the
//           highest maximum, then the top K experts of those nodes.
inline std::vector<int64_t> route_rank(std::mt19937_64& rng, const Shape& s, Routing routing, int hot_node) {
  const int T = s.tokens, K = s.topk, E = s.experts, R = s.ranks, P = s.ranks_per_node, per_rank = s.per_rank();
  std::vector<int64_t> idx(static_cast<size_t>(T) * K, -1);
  std::vector<int64_t> hot;
  if (routing == Routing::kSkewed) {
    for (int e = 0; e < per_rank; ++e) hot.push_back(e), hot.push_back(int64_t{R - 1} * per_rank + e);
    for (int d = 0; d < P; ++d)
      for (int e = 0; e < per_rank; ++e) hot.push_back(int64_t{hot_node * P + d} * per_rank + e);
  }
  std::vector<double> score(routing == Routing::kGrouped ? E : 0), best;
  std::vector<int> order;
  std::bernoulli_distribution drop(0.15), drop_all(0.05), pick_hot(0.33), pick_last(0.2);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  for (int t = 0; t < T; ++t) {
    int64_t* row = &idx[static_cast<size_t>(t) * K];
    if (routing == Routing::kGrouped) {
      const int N = s.nodes(), per_node = E / N, groups = std::min(4, N);
      for (double& x : score) x = unit(rng);
      best.assign(N, 0.0);
      for (int e = 0; e < E; ++e) best[e / per_node] = std::max(best[e / per_node], score[e]);
      order.resize(N);
      for (int n = 0; n < N; ++n) order[n] = n;
      std::partial_sort(order.begin(), order.begin() + groups, order.end(),
                        [&](int a, int b) { return best[a] > best[b]; });
      std::vector<int> chosen;
      for (int g = 0; g < groups; ++g)
        for (int e = order[g] * per_node; e < (order[g] + 1) * per_node; ++e) chosen.push_back(e);
      std::partial_sort(chosen.begin(), chosen.begin() + K, chosen.end(),
                        [&](int a, int b) { return score[a] > score[b]; });
      std::copy(chosen.begin(), chosen.begin() + K, row);
      continue;
    }
    if (routing == Routing::kSkewed && drop_all(rng)) continue;
    for (int k = 0; k < K; ++k) {
      if (routing == Routing::kSkewed && drop(rng)) continue;
      for (;;) {  // distinct inside the token
        int64_t e = pick(rng, E);
        if (routing == Routing::kSkewed)
          e = k == 0 && pick_last(rng) ? E - 1 : pick_hot(rng) ? hot[pick(rng, static_cast<int64_t>(hot.size()))] : e;
        if (std::find(row, row + k, e) == row + k) {
          row[k] = e;
          break;
        }
      }
    }
  }
  return idx;
}

inline TopK route(const Shape& s, Routing routing, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int hot_node = s.nodes() / 2;
  TopK topk(s.ranks);
  for (int r = 0; r < s.ranks; ++r) topk[r] = route_rank(rng, s, routing, hot_node);
  return topk;
}

// ---- counting ----

struct RankCount {
  uint64_t net_tx = 0, net_rx = 0;  // bytes put by / into this rank over the network
  uint64_t nvl_tx = 0, nvl_rx = 0;  // bytes leaving / entering this GPU over NVLink
  uint64_t puts = 0, signals = 0;   // network operations this rank issues
  uint64_t rows = 0;                // rows (normal) or messages (LL) this rank receives, its own included
};
using Count = std::vector<RankCount>;

inline void net(Count& c, int from, int to, uint64_t bytes) {
  c[from].net_tx += bytes, c[to].net_rx += bytes, ++c[from].puts;
}
inline void nvl(Count& c, int from, int to, uint64_t bytes) {
  if (from != to) c[from].nvl_tx += bytes, c[to].nvl_rx += bytes;
}

struct LowLatencyTraffic {
  Count dispatch, combine;
  uint64_t payload = 0;  // bytes of one dispatch message
};

// `blocks`: the LL kernels' grid (every SM by default: 132 on H100 and H200).
inline LowLatencyTraffic count_low_latency(const Shape& s, const TopK& topk, bool fp8, int blocks) {
  const int R = s.ranks, P = s.ranks_per_node, T = s.tokens, K = s.topk, EL = s.per_rank();
  const LowLatencyLayout L = LowLatencyLayout::make(T, s.hidden, R, s.experts);
  const LowLatencyNetLayout NL = LowLatencyNetLayout::make(L);
  const uint64_t payload = static_cast<uint64_t>(L.staged_payload16(fp8)) * 16, tag = 8;
  auto node = [P](int r) { return r / P; };
  LowLatencyTraffic out;
  out.payload = payload;
  Count& d = out.dispatch;
  Count& c = out.combine;
  d.assign(R, {});
  c.assign(R, {});
  // rows[j][le * R + i]: messages source i sends to local expert le of rank j (<= Tmax each).
  std::vector<std::vector<int>> rows(R, std::vector<int>(static_cast<size_t>(EL) * R, 0));
  for (int i = 0; i < R; ++i) {
    std::vector<uint8_t> put_to(R);
    for (int b = 0; b < blocks; ++b) {  // block b sends tokens [b T / grid, (b + 1) T / grid)
      std::fill(put_to.begin(), put_to.end(), 0);
      for (int t = static_cast<int>(int64_t{b} * T / blocks); t < static_cast<int>(int64_t{b + 1} * T / blocks); ++t)
        for (int k = 0; k < K; ++k) {
          const int64_t e = topk[i][static_cast<size_t>(t) * K + k];
          if (e < 0) continue;
          const int j = static_cast<int>(e / EL);
          int& n = rows[j][static_cast<size_t>(e % EL) * R + i];
          if (n >= T) continue;  // no slot left: dropped (only a token naming an expert twice)
          ++n;
          ++d[j].rows;
          if (node(j) != node(i)) net(d, i, j, payload), put_to[j] = 1;
          else nvl(d, i, j, payload + tag);
        }
      for (int j = 0; j < R; ++j) d[i].signals += put_to[j];
    }
    for (int j = 0; j < R; ++j) {
      if (node(j) != node(i)) net(d, i, j, NL.entry_bytes), ++d[i].signals;  // meta entry, kLLNetMeta
      else nvl(d, i, j, tag * EL);                                           // count tags
    }
  }
  // Combine: expert rank j returns each received row; warp w of the grid takes items w, w + warps..
  // of (le, src, part q), rows q, q + Q, .. of that (le, src).
  const int warps = blocks * (512 / 32), E = s.experts, Q = warps >= E ? warps / E : 1;
  for (int j = 0; j < R; ++j) {
    std::vector<std::vector<uint8_t>> signalled(blocks, std::vector<uint8_t>(R, 0));
    for (int64_t item = 0; item < int64_t{E} * Q; ++item) {
      const int u = static_cast<int>(item % E), q = static_cast<int>(item / E), le = u / R, src = u % R;
      const int n = rows[j][static_cast<size_t>(le) * R + src];
      const int mine = n > q ? (n - q + Q - 1) / Q : 0;  // rows q, q + Q, ... below n
      if (mine == 0) continue;
      c[src].rows += mine;
      if (node(src) == node(j)) {
        for (int r = 0; r < mine; ++r) nvl(c, j, src, L.msg_bytes + tag);
        continue;
      }
      for (int r = 0; r < mine; ++r) net(c, j, src, L.msg_bytes);
      const int block = static_cast<int>(item % warps) / (512 / 32);
      if (!signalled[block][src]) signalled[block][src] = 1, ++c[j].signals;
    }
    for (int r = 0; r < R; ++r) {
      if (node(r) != node(j)) ++c[j].signals;  // kLLNetCombineDone
      else nvl(c, j, r, tag);                  // done tag
    }
  }
  return out;
}

struct NormalTraffic {
  Count notify, dispatch, combine;
  uint64_t drow = 0, prow = 0, pull = 0;  // bytes of a network row, a combine partial, an NVLink pull
};

// `blocks`: Config::num_sms (24 by default); `chunk`: Config::chunk_tokens() (32);
// `max_local_experts`: BufferOptions::max_experts_per_rank (1024 by default; the meta entry's width);
// `bf16_partials`: BufferOptions::internode_bf16_partials (the combine's node partials as BF16).
inline NormalTraffic count_normal(const Shape& s, const TopK& topk, bool fp8, int blocks, int chunk,
                                  int max_local_experts, bool bf16_partials = false) {
  const int R = s.ranks, P = s.ranks_per_node, N = s.nodes(), T = s.tokens, K = s.topk, H = s.hidden;
  const int per_rank = s.per_rank(), G = fp8 ? (H + 127) / 128 : 0, chunks = (T + chunk - 1) / chunk;
  const InterLayout L = InterLayout::make(R, P, T, (T + 7) / 8, max_local_experts, 0);
  const InterDispatchGeometry dg = InterDispatchGeometry::make(L, fp8 ? H : 2 * H, G, K);
  const InterCombineGeometry cg = InterCombineGeometry::make(L, H, K, 4, bf16_partials);
  NormalTraffic out;
  out.drow = dg.drow;
  out.prow = cg.prow;
  out.pull = static_cast<uint64_t>(fp8 ? H : 2 * H) + 4ull * (G + 2 * K);  // row, scales, ids, weights
  const uint64_t meta = align_up(L.meta_entry.masks + 4ull * chunks, 16);
  const uint64_t masks = align_up(4ull * chunks * chunk, 16), mask_read = 4ull * chunk;
  const uint64_t push = 2ull * H + 4ull * K + 4;  // BF16 row, K weights, the tag
  Count &nt = out.notify, &d = out.dispatch, &c = out.combine;
  nt.assign(R, {});
  d.assign(R, {});
  c.assign(R, {});
  std::vector<uint8_t> dest(R);
  for (int i = 0; i < R; ++i) {
    const int n = i / P, l = i % P;
    for (int j = 0; j < R; ++j) net(nt, i, j, meta), ++nt[i].signals;
    std::vector<uint8_t> item(R);  // (source i, this chunk) already read by receiver j
    for (int t = 0; t < T; ++t) {
      if (t % chunk == 0) std::fill(item.begin(), item.end(), 0);
      std::fill(dest.begin(), dest.end(), 0);
      for (int k = 0; k < K; ++k) {
        const int64_t e = topk[i][static_cast<size_t>(t) * K + k];
        if (e >= 0) dest[e / per_rank] = 1;
      }
      for (int m = 0; m < N; ++m) {
        bool any = false;
        for (int x = 0; x < P; ++x) any |= dest[m * P + x] != 0;
        if (!any) continue;
        const int fwd = m == n ? i : m * P + l;
        if (m != n) net(d, i, fwd, dg.drow), net(c, fwd, i, cg.prow);
        for (int x = 0; x < P; ++x) {
          const int j = m * P + x;
          if (!dest[j]) continue;
          ++d[j].rows, ++c[i].rows;
          nvl(d, fwd, j, out.pull);
          if (!item[j]) nvl(d, fwd, j, mask_read), item[j] = 1;
          nvl(c, j, m == n ? i : fwd, push);  // expert j pushes to the forwarder of origin i in its node
        }
      }
    }
    for (int m = 0; m < N; ++m) {
      if (m == n) continue;
      const int f = m * P + l;  // i's forwarder in node m, and the forwarder for i's origins there
      net(d, i, f, masks);
      d[i].signals += blocks + 1;  // kSigDispatchData: one per block, one after the masks
      d[f].signals += 1;           // kSigDispatchFree back to source i
      c[f].signals += blocks;      // kSigCombineData: one per block of forwarder f to origin i
      c[i].signals += 1;           // kSigCombineFree: origin i frees f's slots
    }
  }
  return out;
}

// ---- DeepEP's own counts (its tests' formulas), on the same routing ----

// tests/legacy/test_low_latency.py: every valid selection of every token, FP8 message
// hidden + hidden / 128 * 4 + 16, combine BF16 hidden * 2 (self and node peers included).
inline std::vector<uint64_t> deepep_low_latency_bytes(const Shape& s, const TopK& topk, bool dispatch) {
  std::vector<uint64_t> b(s.ranks, 0);
  const uint64_t msg = dispatch ? s.hidden + s.hidden / 128 * 4 + 16 : 2ull * s.hidden;
  for (int i = 0; i < s.ranks; ++i)
    for (int64_t e : topk[i]) b[i] += e >= 0 ? msg : 0;
  return b;
}

// tests/legacy/test_internode.py: RDMA bytes = tokens x distinct destination nodes (its own node
// included) x hidden * 2, times (1 + 4 / 128) / 2 for FP8; the same for combine at BF16.
inline std::vector<uint64_t> deepep_normal_rdma_bytes(const Shape& s, const TopK& topk, bool fp8) {
  std::vector<uint64_t> b(s.ranks, 0);
  const int per_node = s.experts / s.nodes();
  const uint64_t row = fp8 ? s.hidden + s.hidden / 32 : 2ull * s.hidden;
  for (int i = 0; i < s.ranks; ++i)
    for (int t = 0; t < s.tokens; ++t) {
      uint64_t nodes = 0;
      for (int k = 0; k < s.topk; ++k) {
        const int64_t e = topk[i][static_cast<size_t>(t) * s.topk + k];
        if (e >= 0) nodes |= 1ull << (e / per_node);
      }
      b[i] += row * static_cast<uint64_t>(__builtin_popcountll(nodes));
    }
  return b;
}

}  // namespace epcomm::traffic
