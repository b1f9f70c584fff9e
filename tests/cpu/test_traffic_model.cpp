// The counting behind epcomm-traffic-model (bench/traffic_count.hpp): two problems small enough to
// count by hand, then small random problems (skewed routing, dropped slots) whose per-rank bytes,
// puts and rows are rebuilt here from the CPU reference's dispatch outputs (which rows each rank
// received from each source) and the kernels' message formats, without the counter's loops.
#include <gtest/gtest.h>

#include "bench/traffic_count.hpp"
#include "epcomm/reference.hpp"

namespace epcomm::traffic {
namespace {

// R = 4 in 2 nodes of 2, E = 8 (2 per rank), one token on rank 0 to experts 0 (itself), 2 (rank 1,
// same node), 4 and 5 (rank 2, other node); every other slot dropped.
TEST(TrafficModel, LowLatencyCountedByHand) {
  const Shape s{4, 2, 1, 128, 4, 8};
  TopK topk(4, std::vector<int64_t>(4, -1));
  topk[0] = {0, 2, 4, 5};
  const LowLatencyTraffic fp8 = count_low_latency(s, topk, true, 1);
  const uint64_t payload = 128 + 16, entry = 16 + 4 * 2 * 4;  // FP8 row + one scale (16); counts + headers
  ASSERT_EQ(fp8.payload, payload);
  const Count& d = fp8.dispatch;
  EXPECT_EQ(d[0].net_tx, 2 * payload + 2 * entry);  // two messages to rank 2; meta entries to ranks 2, 3
  EXPECT_EQ(d[0].puts, 4u);
  EXPECT_EQ(d[0].signals, 3u);                  // one data signal (rank 2), two meta signals
  EXPECT_EQ(d[0].nvl_tx, payload + 8 + 2 * 8);  // message + header to rank 1, its two count tags
  EXPECT_EQ(d[2].net_rx, 2 * payload + 2 * entry);
  EXPECT_EQ(d[3].net_rx, 2 * entry);
  EXPECT_EQ(d[1].nvl_rx, payload + 8 + 2 * 8);
  EXPECT_EQ(d[2].rows, 2u);
  EXPECT_EQ(d[0].rows, 1u);
  const Count& c = fp8.combine;
  EXPECT_EQ(c[2].net_tx, 2u * 256);  // two BF16 rows back to rank 0
  EXPECT_EQ(c[2].puts, 2u);
  EXPECT_EQ(c[2].signals, 3u);           // one block signals rank 0; `done` to ranks 0 and 1
  EXPECT_EQ(c[1].nvl_tx, 256u + 8 + 8);  // row + flag to rank 0, `done` tag to rank 0
  EXPECT_EQ(c[0].rows, 4u);
  EXPECT_EQ(c[0].net_rx, 2u * 256);
  EXPECT_EQ(count_low_latency(s, topk, false, 1).payload, 256u);
}

// Every rank's bytes each way, puts and rows of dispatch and combine, as the brute-force count has them.
void expect_counts_match(const Count& want_dispatch, const Count& want_combine, const Count& dispatch,
                         const Count& combine) {
  for (size_t r = 0; r < want_dispatch.size(); ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    for (const auto& [want, got] :
         {std::pair{&want_dispatch[r], &dispatch[r]}, std::pair{&want_combine[r], &combine[r]}}) {
      EXPECT_EQ(got->net_tx, want->net_tx);
      EXPECT_EQ(got->net_rx, want->net_rx);
      EXPECT_EQ(got->nvl_tx, want->nvl_tx);
      EXPECT_EQ(got->nvl_rx, want->nvl_rx);
      EXPECT_EQ(got->puts, want->puts);
      EXPECT_EQ(got->rows, want->rows);
    }
  }
}

// R = 4 in 2 nodes of 2, one expert per rank, one token on rank 0 to ranks 1, 2, 3: one network
// row to the forwarder rank 2, which rank 3 pulls; rank 1 pulls from rank 0.
TEST(TrafficModel, NormalCountedByHand) {
  const Shape s{4, 2, 1, 128, 3, 4};
  TopK topk(4, std::vector<int64_t>(3, -1));
  topk[0] = {1, 2, 3};
  const NormalTraffic t = count_normal(s, topk, true, 1, 8, 4);
  const uint64_t drow = 160, pull = 128 + 4 * (1 + 6), masks = 32, prow = 528, push = 256 + 12 + 4;
  ASSERT_EQ(t.drow, drow);
  ASSERT_EQ(t.pull, pull);
  ASSERT_EQ(t.prow, prow);
  const Count& d = t.dispatch;
  EXPECT_EQ(d[0].net_tx, drow + masks);
  EXPECT_EQ(d[0].puts, 2u);
  EXPECT_EQ(d[0].signals, 3u);  // one block, one after the masks; "free" to rank 2 (rank 0 forwards for it)
  EXPECT_EQ(d[2].net_rx, drow + masks);
  EXPECT_EQ(d[1].net_tx, masks);  // masks go to every remote forwarder, rows or not
  EXPECT_EQ(d[0].nvl_tx, pull + 4 * 8);
  EXPECT_EQ(d[2].nvl_tx, pull + 4 * 8);
  EXPECT_EQ(d[3].nvl_rx, pull + 4 * 8);
  EXPECT_EQ(d[2].nvl_rx, 0u);
  EXPECT_EQ(d[1].rows + d[2].rows + d[3].rows + d[0].rows, 3u);
  const Count& c = t.combine;
  EXPECT_EQ(c[1].nvl_tx, push);  // to forwarder rank 0 (the origin itself)
  EXPECT_EQ(c[3].nvl_tx, push);  // to forwarder rank 2
  EXPECT_EQ(c[2].nvl_tx, 0u);
  EXPECT_EQ(c[2].net_tx, prow);
  EXPECT_EQ(c[0].net_rx, prow);
  EXPECT_EQ(c[2].signals, 2u);  // one block's data signal to origin 0, "free" to its own forwarder, rank 0
  const Count& n = t.notify;
  EXPECT_EQ(n[0].puts, 4u);
  EXPECT_EQ(n[0].signals, 4u);
}

std::vector<uint16_t> zeros(size_t n) { return std::vector<uint16_t>(n, 0); }

// LL: per (receiver j, local expert le, source i) the rows the reference delivered; everything the
// network path moves follows from them and the message formats.
TEST(TrafficModel, LowLatencyMatchesReferenceRows) {
  for (bool fp8 : {true, false})
    for (Routing routing : {Routing::kUniform, Routing::kSkewed}) {
      SCOPED_TRACE(std::string(name_of(routing)) + (fp8 ? " fp8" : " bf16"));
      const Shape s{16, 4, 6, 256, 4, 32};
      const int R = s.ranks, P = s.ranks_per_node, EL = s.per_rank(), H = s.hidden;
      const TopK topk = route(s, routing, 11);
      ref::LowLatencyOptions o;
      o.hidden = H, o.num_topk = s.topk, o.num_experts = s.experts, o.num_max_dispatch_tokens_per_rank = s.tokens;
      o.use_fp8 = fp8;
      std::vector<ref::LowLatencyDispatchInput> in(R);
      for (int r = 0; r < R; ++r) in[r] = {s.tokens, zeros(static_cast<size_t>(s.tokens) * H), topk[r]};
      const auto out = ref::low_latency_dispatch(in, o);
      const uint64_t payload = fp8 ? H + 16 * ((4 * (H / 128) + 15) / 16) : 2 * H, row = 2 * H;
      const uint64_t entry = 16 * ((4 * EL + 15) / 16) + 4ull * EL * ((s.tokens + 3) / 4 * 4);
      Count d(R), c(R);
      for (int j = 0; j < R; ++j)
        for (int i = 0; i < R; ++i) {
          uint64_t n = 0;
          for (int le = 0; le < EL; ++le) n += out[j].layout_range[static_cast<size_t>(le) * R + i] & 0xffffffff;
          d[j].rows += n, c[i].rows += n;
          if (i / P != j / P) {
            d[i].net_tx += n * payload + entry, d[j].net_rx += n * payload + entry, d[i].puts += n + 1;
            c[j].net_tx += n * row, c[i].net_rx += n * row, c[j].puts += n;
          } else if (i != j) {
            d[i].nvl_tx += n * (payload + 8) + 8 * EL, d[j].nvl_rx += n * (payload + 8) + 8 * EL;
            c[j].nvl_tx += n * (row + 8) + 8, c[i].nvl_rx += n * (row + 8) + 8;
          }
        }
      const LowLatencyTraffic t = count_low_latency(s, topk, fp8, 132);
      expect_counts_match(d, c, t.dispatch, t.combine);
    }
}

// Normal mode: the (source, token) rows each receiver got; the network rows, NVLink pulls and
// pushes, and the combine's partials follow from which nodes a token reached.
TEST(TrafficModel, NormalMatchesReferenceRows) {
  for (bool fp8 : {true, false})
    for (Routing routing : {Routing::kUniform, Routing::kSkewed, Routing::kGrouped}) {
      SCOPED_TRACE(std::string(name_of(routing)) + (fp8 ? " fp8" : " bf16"));
      const Shape s{16, 2, 40, 256, 4, 32};  // 8 nodes: top-4 nodes leaves half of them out
      const int R = s.ranks, P = s.ranks_per_node, N = s.nodes(), T = s.tokens, K = s.topk, H = s.hidden;
      const int chunk = 8, G = fp8 ? H / 128 : 0;
      const TopK topk = route(s, routing, 5);
      ref::NormalOptions o;
      o.dtype = fp8 ? DType::kFP8E4M3 : DType::kBF16, o.hidden = H, o.num_topk = K, o.num_experts = s.experts;
      std::vector<ref::NormalInput> in(R);
      for (int r = 0; r < R; ++r) {
        in[r].num_tokens = T;
        in[r].x.assign(static_cast<size_t>(T) * H * (fp8 ? 1 : 2), 0);
        in[r].scales.assign(static_cast<size_t>(T) * G, 1.0f);
        in[r].topk_idx = topk[r];
        in[r].topk_weights.assign(topk[r].size(), 0.5f);
      }
      const auto out = ref::normal_dispatch(in, o);
      const uint64_t drow = ((fp8 ? H : 2 * H) + 4 * (G + 2 * K) + 15) / 16 * 16;
      const uint64_t pull = (fp8 ? H : 2 * H) + 4 * (G + 2 * K), push = 2 * H + 4 * K + 4;
      const uint64_t prow = (4 * H + 4 * K + 15) / 16 * 16, masks = (4 * T + 15) / 16 * 16;
      Count d(R), c(R);
      std::vector<std::vector<uint64_t>> reached(R, std::vector<uint64_t>(T, 0));  // [source][token]: node bits
      for (int j = 0; j < R; ++j) {
        const ref::NormalHandle& h = out[j].handle;
        d[j].rows = static_cast<uint64_t>(h.num_recv);
        std::vector<uint8_t> item(static_cast<size_t>(R) * T, 0);  // (source, chunk) read by j
        for (int row = 0; row < h.num_recv; ++row) {
          const int i = h.recv_src_rank[row], t = h.recv_src_idx[row], fwd = (j / P) * P + i % P;
          reached[i][t] |= 1ull << (j / P);
          ++c[i].rows;
          if (fwd == j) continue;
          const bool first = !item[static_cast<size_t>(i) * T + t / chunk];
          item[static_cast<size_t>(i) * T + t / chunk] = 1;
          d[fwd].nvl_tx += pull + (first ? 4 * chunk : 0), d[j].nvl_rx += pull + (first ? 4 * chunk : 0);
          c[j].nvl_tx += push, c[fwd].nvl_rx += push;
        }
      }
      for (int i = 0; i < R; ++i) {
        for (int m = 0; m < N; ++m)
          if (m != i / P) {
            const int f = m * P + i % P;
            d[i].net_tx += masks, d[f].net_rx += masks, ++d[i].puts;
          }
        for (int t = 0; t < T; ++t)
          for (int m = 0; m < N; ++m) {
            if (m == i / P || !((reached[i][t] >> m) & 1)) continue;
            const int f = m * P + i % P;
            d[i].net_tx += drow, d[f].net_rx += drow, ++d[i].puts;
            c[f].net_tx += prow, c[i].net_rx += prow, ++c[f].puts;
          }
      }
      const NormalTraffic t = count_normal(s, topk, fp8, 24, chunk, 1024);
      expect_counts_match(d, c, t.dispatch, t.combine);
    }
}

}  // namespace
}  // namespace epcomm::traffic
