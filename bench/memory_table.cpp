// epcomm-memory-table: the memory one rank needs, epcomm against DeepEP's size hints, as markdown
// (issue 21, "Done when": region bytes against ranks and nodes). No GPU needed: epcomm's figures
// come from its public static size functions (Buffer::low_latency_size_hint,
// low_latency_net_size_hint, internode_size_hint, Config::get_*_buffer_size_hint); DeepEP's from
// its published formulas, restated below in our own words (DeepEP 1.x legacy `Config` and
// `LowLatencyLayout`, csrc/legacy/config.hpp; the per-rank-count configs of deep_ep/buffers/legacy.py).
//
//   build/bench/epcomm-memory-table                 # both tables (docs/design-scale.md)
//   build/bench/epcomm-memory-table --tokens 256    # LL Tmax (default 128) and normal T (4096)
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "epcomm/buffer.hpp"
#include "epcomm/config.hpp"
#include "kernels/common/control.hpp"

namespace {

size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

// ---- DeepEP 1.x, restated ----
constexpr int kDeepEpNvlPeers = 8;       // NUM_MAX_NVL_PEERS: ranks of one node
constexpr int kDeepEpMaxTopk = 128;      // the hints assume up to 128 top-k entries...
constexpr int kDeepEpMaxScales = 128;    // ...and 128 scales per token
constexpr size_t kDeepEpTopkIdx = 8;     // topk_idx_t: int64 by default (EP_NUM_TOPK_IDX_BITS = 64)
constexpr size_t kDeepEpSourceMeta = 8;  // SourceMeta: source node, bits of the node's ranks
constexpr int kDeepEpNumSms = 20;        // Buffer.num_sms default

// Low-latency: two buffers, each a send area, a receive area and a signal area. A dispatch message
// is a 16-byte header and the wider of the BF16 row and the FP8 row + float32 scales; a combine
// message the BF16 row and a BF16 pair per 128 channels. Send holds one rank's Tmax dispatch
// messages or its E * Tmax combine messages; receive E * Tmax of either. Rounded up past 128.
size_t deepep_low_latency_hint(int tmax, int hidden, int num_experts) {
  const size_t T = tmax, H = hidden, E = num_experts, scales = H / 128;
  const size_t dispatch_msg = 16 + std::max(2 * H, H + 4 * scales);
  const size_t combine_msg = 4 * scales + 2 * H;
  const size_t send = std::max(T * dispatch_msg, E * T * combine_msg);
  const size_t recv = std::max(E * T * dispatch_msg, E * T * combine_msg);
  const size_t signal = align_up(E * 4, 128);
  return (2 * (send + recv + signal) / 128 + 1) * 128;
}

// The per-rank-count configs DeepEP ships (num_max_nvl_chunked_send/recv_tokens,
// num_max_rdma_chunked_send/recv_tokens), dispatch and combine; a user sizes with the larger hint.
struct DeepEpConfig {
  int nvl_send, nvl_recv, rdma_send, rdma_recv;
  int rdma_recv_aligned() const { return static_cast<int>(align_up(rdma_recv, rdma_send)); }  // as its constructor
};
bool deepep_configs(int num_ranks, DeepEpConfig& dispatch, DeepEpConfig& combine) {
  struct Row {
    int ranks;
    DeepEpConfig d, c;
  };
  static const Row rows[] = {
      {16, {36, 288, 20, 128}, {4, 288, 12, 128}}, {24, {32, 288, 8, 128}, {1, 288, 8, 128}},
      {32, {32, 288, 8, 128}, {1, 288, 8, 128}},   {48, {32, 288, 8, 128}, {1, 288, 8, 128}},
      {64, {32, 288, 8, 128}, {1, 288, 8, 128}},   {96, {20, 480, 12, 128}, {1, 480, 8, 128}},
      {128, {20, 560, 12, 128}, {1, 560, 8, 128}}, {144, {32, 720, 12, 128}, {2, 720, 8, 128}},
      {160, {28, 720, 12, 128}, {2, 720, 8, 128}},
  };
  for (const Row& r : rows)
    if (r.ranks == num_ranks) return dispatch = r.d, combine = r.c, true;
  return false;  // DeepEP asserts: "Unsupported number of EP ranks"
}

// Normal mode, network buffer (0 inside one node): per channel (num_sms / 2) and per remote node,
// a ring of rdma_recv tokens, each counted twice (send and receive side): the row, the source
// meta, 128 top-k ids and weights, 128 scales and a 16-byte tail; plus a few counters per channel
// and node. Does not depend on the tokens per rank.
size_t deepep_rdma_hint(const DeepEpConfig& c, size_t hidden_bytes, int num_ranks) {
  if (num_ranks <= kDeepEpNvlPeers) return 0;
  const size_t channels = kDeepEpNumSms / 2, nodes = num_ranks / kDeepEpNvlPeers, ring = c.rdma_recv_aligned();
  const size_t per_token =
      hidden_bytes + kDeepEpSourceMeta + kDeepEpMaxTopk * (kDeepEpTopkIdx + 4) + kDeepEpMaxScales * 4 + 16;
  const size_t bytes = channels * nodes * (kDeepEpNvlPeers * 2 + 2) * 2 * 4 + channels * nodes * ring * per_token * 2;
  return align_up(bytes, 128);
}

// Normal mode, NVLink buffer: per channel and node peer a ring of nvl_recv tokens (row, source
// meta, 128 top-k ids and weights, 128 scales) and counters.
size_t deepep_nvl_hint(const DeepEpConfig& c, size_t hidden_bytes, int num_ranks) {
  const size_t channels = kDeepEpNumSms / 2;
  const size_t nodes = std::max(num_ranks / kDeepEpNvlPeers, 1), peers = std::min(num_ranks, kDeepEpNvlPeers);
  const size_t per_token =
      hidden_bytes + kDeepEpSourceMeta + kDeepEpMaxTopk * (kDeepEpTopkIdx + 4) + kDeepEpMaxScales * 4;
  const size_t bytes = channels * peers * (2 * nodes + 3) * 4 + channels * peers * c.nvl_recv * per_token;
  return align_up(bytes, 128);
}

// ---- the proposed ring of chunks (docs/design-scale.md "Internode ring of chunks") ----
// Per channel (num_sms / 2) and remote node, a receive ring and a send staging ring of `depth`
// tokens, the depth shared out of a fixed per-channel budget of kRingBudget tokens but never below
// two chunks of kRingChunk tokens per remote node. A slot holds the wider of a dispatch row (row,
// 8-byte source meta, K ids, K weights, scales) and a combine partial (float32 row, K weights).
constexpr int kRingChunk = 8, kRingBudget = 512;
size_t proposed_ring_bytes(int num_sms, int nodes, int hidden, int topk) {
  if (nodes <= 1) return 0;
  const size_t channels = num_sms / 2, remote = nodes - 1;
  const size_t drow = align_up(static_cast<size_t>(hidden) * 2 + 8 + 8 * topk + 4 * (hidden / 128), 16);
  const size_t prow = align_up(static_cast<size_t>(hidden) * 4 + 4 * topk, 16);
  const size_t depth = std::max<size_t>(kRingBudget / remote / kRingChunk * kRingChunk, 2 * kRingChunk);
  const size_t control = channels * remote * 4 * 16;  // head / tail words per ring and direction
  return align_up(2 * channels * remote * depth * std::max(drow, prow) + control, 4096);
}

// ---- printing ----
std::string mib(size_t bytes) {
  char s[32];
  std::snprintf(s, sizeof(s), "%.1f", static_cast<double>(bytes) / (1 << 20));
  return s;
}
std::string ratio(size_t a, size_t b) {
  if (b == 0) return "-";
  char s[32];
  std::snprintf(s, sizeof(s), "%.2f", static_cast<double>(a) / static_cast<double>(b));
  return s;
}

// Buffer's symmetric allocation holds num_rdma_bytes once, whatever the mode (normal mode's data
// halves share the LL region; only normal mode's control part, a few MiB, comes on top where
// normal mode's kernels hold the group, src/core/buffer.cpp). Control parts not counted.
size_t epcomm_allocated(size_t num_rdma_bytes) { return align_up(num_rdma_bytes, 4096); }

void low_latency_table(int tmax, int hidden) {
  std::printf("### Low-latency mode: Tmax = %d, hidden = %d, 8 ranks per node (MiB per rank)\n\n", tmax, hidden);
  std::printf(
      "| ranks | nodes | experts | epcomm region (LSA) | epcomm region (network path) | epcomm allocated "
      "(low_latency_mode, network path) | DeepEP hint | network path / DeepEP | allocated / DeepEP |\n");
  std::printf("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
  for (int R : {16, 32, 64, 72, 128, 144, 256, 288, 320}) {
    std::vector<int> experts;
    for (int E : {256, 288})
      if (E % R == 0) experts.push_back(E);
    if (experts.empty()) experts.push_back((256 + R - 1) / R * R);  // the next multiple of R
    for (int E : experts) {
      const size_t lsa = epcomm::Buffer::low_latency_size_hint(tmax, hidden, R, E);
      const size_t net = epcomm::Buffer::low_latency_net_size_hint(tmax, hidden, R, E);
      const size_t alloc = epcomm_allocated(net);
      const size_t deepep = deepep_low_latency_hint(tmax, hidden, E);
      std::printf("| %d | %d | %d | %s | %s | %s | %s | %s | %s |\n", R, std::max(R / 8, 1), E, mib(lsa).c_str(),
                  mib(net).c_str(), mib(alloc).c_str(), mib(deepep).c_str(), ratio(net, deepep).c_str(),
                  ratio(alloc, deepep).c_str());
    }
  }
  std::printf("\n");
}

void normal_table(int tokens, int hidden) {
  const int P = 8, topk = 8, E = 256;
  const size_t hidden_bytes = static_cast<size_t>(hidden) * 2;
  std::printf(
      "### Normal mode: %d tokens per rank, hidden = %d (BF16), top-%d, %d experts, %d ranks per node (MiB per "
      "rank)\n\n",
      tokens, hidden, topk, E, P);
  std::printf(
      "| ranks | nodes | epcomm internode_size_hint | epcomm allocated | epcomm Config rdma hint (compat) | "
      "DeepEP rdma hint | epcomm / DeepEP rdma | epcomm rounds at DeepEP's rdma hint (dispatch / combine) | "
      "same, combine rows in DeepEP's nvl hint (internode_combine_nvl) | "
      "epcomm rounds at 1 GiB | proposed ring | epcomm Config nvl hint (one node's rings) | DeepEP nvl hint | "
      "epcomm rounds at its two Config hints |\n");
  std::printf("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
  for (int R : {16, 32, 64, 96, 128, 256, 320}) {
    const int N = R / P;
    const size_t inter = epcomm::Buffer::internode_size_hint(tokens, hidden, R, P, topk, E / R);
    const size_t alloc = epcomm_allocated(inter);
    const epcomm::Config ed = epcomm::Config::dispatch_default(R), ec = epcomm::Config::combine_default(R);
    const size_t compat =
        std::max(ed.get_rdma_buffer_size_hint(hidden_bytes, R, P), ec.get_rdma_buffer_size_hint(hidden_bytes, R, P));
    const size_t enl =
        std::max(ed.get_nvl_buffer_size_hint(hidden_bytes, R, P), ec.get_nvl_buffer_size_hint(hidden_bytes, R, P));
    DeepEpConfig dd{}, dc{};
    const bool deepep = deepep_configs(R, dd, dc);  // no config past 160 ranks
    const size_t drdma =
        deepep ? std::max(deepep_rdma_hint(dd, hidden_bytes, R), deepep_rdma_hint(dc, hidden_bytes, R)) : 0;
    const size_t dnvl =
        deepep ? std::max(deepep_nvl_hint(dd, hidden_bytes, R), deepep_nvl_hint(dc, hidden_bytes, R)) : 0;
    const size_t ring = proposed_ring_bytes(ed.num_sms, N, hidden, topk);
    // A region smaller than the hint runs in rounds of a window of tokens (Buffer::internode_windows).
    // nvl: BufferOptions::internode_combine_nvl with this num_nvl_bytes (0: off).
    const auto rounds = [&](size_t bytes, size_t nvl = 0) -> std::string {
      if (bytes == 0) return "-";
      const epcomm::Buffer::InternodeWindows w =
          epcomm::Buffer::internode_windows(bytes, tokens, hidden, R, P, topk, E / R, ed.chunk_tokens(), nvl);
      if (w.dispatch == 0 || w.combine == 0) return "too small";
      const auto n = [&](int window) { return std::to_string((tokens + window - 1) / window); };
      return n(w.dispatch) + " / " + n(w.combine);
    };
    std::printf("| %d | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", R, N, mib(inter).c_str(),
                mib(alloc).c_str(), mib(compat).c_str(), deepep ? mib(drdma).c_str() : "(none)",
                ratio(inter, drdma).c_str(), rounds(deepep ? drdma : 0).c_str(),
                rounds(deepep ? drdma : 0, dnvl).c_str(), rounds(size_t{1} << 30).c_str(), mib(ring).c_str(),
                mib(enl).c_str(), deepep ? mib(dnvl).c_str() : "(none)",
                R <= epcomm::kMaxInterRanks && N <= epcomm::kMaxInterNodes ? rounds(compat, enl).c_str()
                                                                           : "(normal mode: at most 128 ranks)");
  }
  std::printf("\n");
}

}  // namespace

int main(int argc, char** argv) {
  int ll_tokens = 128, normal_tokens = 4096, hidden = 7168;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--tokens")) ll_tokens = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--normal-tokens")) normal_tokens = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--hidden")) hidden = std::atoi(argv[i + 1]);
    else return std::fprintf(stderr, "usage: %s [--tokens Tmax] [--normal-tokens T] [--hidden H]\n", argv[0]), 2;
  }
  // epcomm's Config defaults read EPCOMM_NUM_SMS (24 unless set).
  low_latency_table(ll_tokens, hidden);
  normal_table(normal_tokens, hidden);
  return 0;
}
