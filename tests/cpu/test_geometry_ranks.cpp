// Every host-side geometry that depends on the number of ranks, at R = 1..8 (EP8, the deployment
// shape) and beyond: the low-latency buffer layout and its per-rank overlays, the internode region
// for the virtual-node splits of 8 ranks (2 x 4, 4 x 2, 8 x 1), and the normal-mode ring slots
// against the Config size hints. The kernels index these offsets without bounds checks, so a part
// that overlaps the next one or runs past the size hint would corrupt memory on the GPU. Host only.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>

#include "core/internode_tokens.hpp"
#include "core/region_plan.hpp"
#include "core/ring_geometry.hpp"
#include "cpu/test_reference_util.hpp"
#include "epcomm/buffer.hpp"
#include "epcomm/config.hpp"
#include "kernels/internode/params.hpp"
#include "kernels/low_latency/launchers.hpp"
#include "kernels/low_latency/params.hpp"
#include "transport/net_params.hpp"

namespace epcomm {
namespace {

const int kRanks[] = {1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 33, 64, 72, 128, 320};

// The internode layout a Buffer of num_rdma_bytes makes (core/region_plan.hpp): the control part
// comes on top of num_rdma_bytes, whose two halves are the data.
InterLayout buffer_layout(int R, int P, int max_tokens, int EL, size_t num_rdma_bytes) {
  return InterLayout::make(R, P, max_tokens, (max_tokens + 7) / 8, EL,
                           plan_regions(0, num_rdma_bytes, R, P, max_tokens, EL, true).inter_bytes);
}

// One LL buffer's parts in order, each inside its own range; the last entry of every array ends
// before the next part starts.
void expect_low_latency_layout(const LowLatencyLayout& l) {
  const int R = l.num_ranks, EL = l.local_experts, T = l.max_tokens, K = l.kslots;
  EXPECT_EQ(EL * R, l.num_experts);
  EXPECT_EQ(l.combine_rows, 0u);
  for (int b = 0; b < 2; ++b) {
    const size_t base = l.buffer(b);
    EXPECT_LE(l.combine_row(b, T - 1, K - 1) + l.msg_bytes, base + l.dispatch_data);
    EXPECT_LE(l.message(b, EL - 1, R - 1, T - 1) + l.msg_bytes, base + l.dispatch_header);
    EXPECT_LE(l.header(b, EL - 1, R - 1, T - 1) + 8, base + l.dispatch_count);
    EXPECT_LE(l.count(b, EL - 1, R - 1) + 8, base + l.combine_flags);
    EXPECT_LE(l.combine_flag(b, T - 1, K - 1) + 8, base + l.combine_done);
    EXPECT_LE(l.done(b, R - 1) + 8, base + l.buffer_bytes);
    // 16-byte stores of messages and rows; 8-byte flags.
    EXPECT_EQ(l.message(b, EL - 1, R - 1, T - 1) % 16, 0u);
    EXPECT_EQ(l.combine_row(b, T - 1, K - 1) % 16, 0u);
    EXPECT_EQ(l.header(b, 0, 0, 0) % 8, 0u);
    EXPECT_EQ(l.count(b, 0, 0) % 8, 0u);
    EXPECT_EQ(l.combine_flag(b, 0, 0) % 8, 0u);
    EXPECT_EQ(l.done(b, 0) % 8, 0u);
  }
  EXPECT_LE(l.buffer(1) + l.buffer_bytes, l.total_bytes);
  EXPECT_EQ(Buffer::low_latency_size_hint(T, l.hidden, R, l.num_experts), l.total_bytes);
}

TEST(GeometryRanks, LowLatencyLayoutPartsAreDisjointAtEveryR) {
  for (int R : kRanks)
    for (int per_rank : {1, 2, 9, 36})
      for (int tmax : {1, 7, 128})
        for (int hidden : {128, 7168}) {
          SCOPED_TRACE("R=" + std::to_string(R) + " E/R=" + std::to_string(per_rank) + " Tmax=" + std::to_string(tmax) +
                       " hidden=" + std::to_string(hidden));
          expect_low_latency_layout(LowLatencyLayout::make(tmax, hidden, R, R * per_rank));
        }
}

// Low-latency mode past 32 ranks (design-scale.md §3): the kernels' peer table lists every rank up
// to kMaxLsaRanks, else the rank's node; the per-rank path (32-bit destination masks) steps aside;
// the clean barrier's flags are one u64 per rank; the network path's per-rank counters fit their
// static shared memory at the largest group.
TEST(GeometryRanks, LowLatencyPastThirtyTwoRanks) {
  for (int R : {1, 8, 32, 64, 72}) {
    const LsaWindow w = lsa_window(R - 1, R, R);
    EXPECT_EQ(w.first, 0) << R;
    EXPECT_EQ(w.count, R) << R;
  }
  for (int R : {72, 16})  // virtual nodes of 8 within the table: still every rank
    EXPECT_EQ(lsa_window(R - 1, R, 8).count, R);
  for (int P : {1, 8, 72})
    for (int R : {P * 2 > kMaxLsaRanks ? P * 2 : 80, 128, 320, kMaxLowLatencyRanks}) {
      if (R % P) continue;
      for (int rank : {0, P - 1, P, R / 2, R - 1}) {
        const LsaWindow w = lsa_window(rank, R, P);
        SCOPED_TRACE("R=" + std::to_string(R) + " P=" + std::to_string(P) + " rank=" + std::to_string(rank));
        EXPECT_EQ(w.count, P);
        EXPECT_LE(w.count, kMaxLsaRanks);
        EXPECT_EQ(w.first % P, 0);
        EXPECT_LE(w.first, rank);
        EXPECT_LT(rank, w.first + w.count);  // its own region is in the table
      }
    }
  for (int R : {32, 33, 64, 320}) {
    const LowLatencyLayout l = LowLatencyLayout::make(128, 7168, R, 2 * R);
    EXPECT_EQ(low_latency_per_rank_wanted(l, true, kLowLatencyPerRankMaxLevel), R <= 32 && l.per_rank_fits(true)) << R;
  }
  EXPECT_EQ(low_latency_clean_flag_bytes(320), 320u * 8);
  EXPECT_LE(2 * sizeof(int32_t) * kMaxLowLatencyRanks + 8, static_cast<size_t>(kLowLatencyNetStaticSmem));
  EXPECT_LE(kMaxLowLatencyRanks * kGinSignalsPerRank, 1 << 16);  // NCCL's signal ids are 16 bits
}

// The per-rank dispatch (EPCOMM_LL_PER_RANK >= 1, the default) overlays its staging slots on the
// messages of the same buffer, and the per-rank combine (= 2) its plan on the headers after their
// first row; both only where they fit, never past the part they borrow.
TEST(GeometryRanks, PerRankOverlaysStayInsideThePartsTheyBorrow) {
  for (int tmax : {1, 7, 128})
    for (int hidden : {128, 256, 7168})
      for (int R : kRanks)
        for (int per_rank : {1, 2, 9, 72}) {
          SCOPED_TRACE("R=" + std::to_string(R) + " E/R=" + std::to_string(per_rank) + " Tmax=" + std::to_string(tmax) +
                       " hidden=" + std::to_string(hidden));
          const LowLatencyLayout l = LowLatencyLayout::make(tmax, hidden, R, R * per_rank);
          EXPECT_TRUE(l.per_rank_fits(true));
          EXPECT_EQ(l.per_rank_fits(false), per_rank >= 2);
          for (bool fp8 : {true, false}) {
            if (!l.per_rank_fits(fp8)) continue;
            for (int b = 0; b < 2; ++b) {
              EXPECT_LE(l.staged(b, R - 1, tmax - 1, fp8) + l.staged_stride(fp8), l.buffer(b) + l.dispatch_header);
              EXPECT_EQ(l.staged(b, R - 1, tmax - 1, fp8) % 16, 0u);
              EXPECT_LT(l.staged_head_offset(fp8), l.staged_stride(fp8));
              // The staged token's flag: the high half of a header of the first header row.
              EXPECT_LT(l.staged_flag(b, R - 1, tmax - 1), l.buffer(b) + l.pr_base());
            }
          }
          if (l.per_rank_combine_fits()) {
            for (int b = 0; b < 2; ++b) {
              EXPECT_GE(l.pr_head(b, 0, 0), l.buffer(b) + l.pr_base());
              EXPECT_LE(l.pr_count(b, R - 1) + 4, l.buffer(b) + l.dispatch_count);
              EXPECT_LE(l.pr_entries(b, R - 1, tmax - 1) + 4 * static_cast<size_t>(l.kslots), l.pr_weights(b, 0));
              EXPECT_LE(l.pr_weights(b, R - 1) + 8 * static_cast<size_t>(tmax) * l.kslots, l.pr_count(b, 0));
              EXPECT_EQ(l.pr_weights(b, 0) % 8, 0u);  // 8-byte tagged weights
              // Wide partials (fine: 3 bytes per element, float32: 4): pr_dests rows inside the
              // token's kslots rows, 16-byte aligned (the fine rows' 8-byte plane too).
              for (int bytes : {3, 4}) {
                if (!l.pr_wide_fits(bytes)) continue;
                const int D = l.pr_dests();
                EXPECT_LE(l.pr_wide_row(b, tmax - 1, D - 1, bytes) + bytes * static_cast<size_t>(l.hidden),
                          l.combine_row(b, tmax - 1, 0) + l.kslots * l.msg_bytes);
                EXPECT_EQ(l.pr_wide_row(b, tmax - 1, D - 1, bytes) % 16, 0u);
                EXPECT_EQ((l.pr_wide_row(b, 0, 0, bytes) + 2 * static_cast<size_t>(l.hidden)) % 16, 0u);
              }
              EXPECT_LE(l.pr_dests() * l.pr_parts(), l.kslots);
            }
          }
        }
  // The per-rank combine's plan takes the per-expert headers' place: E/R >= 1.6 kslots, about
  // (kslots = 16 where E >= 16).
  EXPECT_TRUE(LowLatencyLayout::make(128, 7168, 4, 288).per_rank_combine_fits());
  EXPECT_TRUE(LowLatencyLayout::make(128, 7168, 8, 256).per_rank_combine_fits());  // DeepSeek-V3 EP8
  EXPECT_TRUE(LowLatencyLayout::make(64, 512, 4, 128).per_rank_combine_fits());
  EXPECT_FALSE(LowLatencyLayout::make(64, 512, 4, 80).per_rank_combine_fits());  // 20 experts per rank: too few
  EXPECT_FALSE(LowLatencyLayout::make(128, 7168, 4, 32).per_rank_combine_fits());
  // Wide partials need bytes * pr_dests <= 2 * kslots (kslots = 16 where E >= 16): fine partials
  // up to 10 ranks, float32 partials up to 8.
  EXPECT_TRUE(LowLatencyLayout::make(128, 7168, 4, 288).pr_wide_fits(3));
  EXPECT_TRUE(LowLatencyLayout::make(128, 7168, 8, 256).pr_wide_fits(3));  // DeepSeek-V3 EP8
  EXPECT_FALSE(LowLatencyLayout::make(128, 7168, 16, 256).pr_wide_fits(3));
  EXPECT_TRUE(LowLatencyLayout::make(128, 7168, 8, 256).pr_wide_fits(4));
  EXPECT_FALSE(LowLatencyLayout::make(128, 7168, 9, 288).pr_wide_fits(4));
}

// The fine partials' rounding (kernels/low_latency/params.hpp, used by the LL combine): nearest at
// 16 significant bits against a double computation, the bound 2^-16 |x|, the carry into the
// exponent, Inf, NaN, signed zeros and subnormals.
using ref::testing_util::from_bits;
using ref::testing_util::uniform;

TEST(FinePartials, RoundsToNearestAtSixteenBits) {
  EPCOMM_SEEDED_RNG(rng);
  std::uniform_int_distribution<uint32_t> any;
  int checked = 0;
  for (int i = 0; i < 200000; ++i) {
    const uint32_t bits = any(rng);
    const float x = from_bits(bits);
    if (!std::isfinite(x)) continue;
    const uint32_t r = fine_round_bits(bits);
    ASSERT_EQ(r & 0xffu, 0u);
    const float y = from_bits(r);
    if (!std::isfinite(y)) {  // only within half a unit of the largest finite value
      ASSERT_GE(std::fabs(static_cast<double>(x)), 3.4027e38);
      continue;
    }
    // The two neighbours at 16 significant bits: y is the nearer (ties away from zero).
    const uint32_t down = bits & 0xffffff00u;
    const double e_down = std::fabs(static_cast<double>(from_bits(down)) - x);
    const double e_up = std::fabs(static_cast<double>(from_bits(down + 0x100u)) - x);
    const double err = std::fabs(static_cast<double>(y) - x);
    ASSERT_EQ(err, std::min(e_down, e_up)) << std::hex << bits;
    if (e_down == e_up) ASSERT_EQ(r, down + 0x100u) << std::hex << bits;
    if (std::fabs(x) >= 1.17549435e-38f)
      ASSERT_LE(err, std::ldexp(std::fabs(static_cast<double>(x)), -16)) << std::hex << bits;
    ++checked;
  }
  EXPECT_GT(checked, 190000);
  EXPECT_EQ(fine_round_bits(0x3fffff80u), 0x40000000u);  // 1.99999... -> 2: carry into the exponent
  EXPECT_EQ(fine_round_bits(0xbfffff7fu), 0xbfffff00u);  // below half a unit: down (negative)
  EXPECT_EQ(fine_round_bits(0x7f800000u), 0x7f800000u);  // Inf
  EXPECT_EQ(fine_round_bits(0xff800000u), 0xff800000u);  // -Inf
  EXPECT_EQ(fine_round_bits(0x7f800001u), 0x7fc00000u);  // a NaN whose payload is in the dropped bits
  EXPECT_EQ(fine_round_bits(0x80000000u), 0x80000000u);  // -0
  EXPECT_EQ(fine_round_bits(0x00000080u), 0x00000100u);  // subnormal, tie away from zero
  EXPECT_EQ(fine_round_bits(ref::testing_util::bits(1.0f)), ref::testing_util::bits(1.0f));
}

TEST(GeometryRanks, LowLatencySizeHintNoLargerThanDeepEP) {
  for (int tmax : {1, 2, 7, 128, 1024})
    for (int hidden : {128, 256, 2048, 7168})
      for (int R : kRanks)
        for (int per_rank : {1, 2, 5, 9, 72})
          for (int extra : {0, 1}) {
            const int E = R * per_rank + extra * R;
            EXPECT_LE(Buffer::low_latency_size_hint(tmax, hidden, R, E),
                      deepep_low_latency_size_hint(tmax, hidden, R, E))
                << "Tmax=" << tmax << " hidden=" << hidden << " R=" << R << " E=" << E;
          }
  // The standard problem: about half of DeepEP's; EP8 (DeepSeek-V3 shape) likewise.
  EXPECT_LT(Buffer::low_latency_size_hint(128, 7168, 4, 288), deepep_low_latency_size_hint(128, 7168, 4, 288) * 6 / 10);
  EXPECT_LT(Buffer::low_latency_size_hint(128, 7168, 8, 256), deepep_low_latency_size_hint(128, 7168, 8, 256) * 6 / 10);
}

// The internode region at every split of up to 8 ranks: control words in order, and the dispatch
// and combine halves large enough for the widest rows when sized by internode_size_hint.
TEST(GeometryRanks, InternodeRegionForEverySplitOfEightRanks) {
  struct Split {
    int R, P;
  };
  for (const Split s :
       {Split{8, 4}, Split{8, 2}, Split{8, 1}, Split{4, 2}, Split{4, 1}, Split{6, 3}, Split{6, 2}, Split{2, 1},
        Split{16, 8}, Split{32, 8}, Split{64, 8}, Split{64, 32}, Split{64, 2}, Split{128, 8}, Split{128, 4}}) {
    for (int tokens : {1, 300, 4096}) {
      const int hidden = 7168, K = 8, EL = 32;
      SCOPED_TRACE(std::to_string(s.R / s.P) + " nodes x " + std::to_string(s.P) + ", T=" + std::to_string(tokens));
      const size_t hint = Buffer::internode_size_hint(tokens, hidden, s.R, s.P, K, EL);
      const InterLayout l = buffer_layout(s.R, s.P, tokens, EL, hint);
      EXPECT_EQ(l.num_nodes * l.ranks_per_node, s.R);
      EXPECT_GE(l.max_tokens, tokens + 32);
      EXPECT_EQ(l.max_tokens % 32, 0);
      EXPECT_LE(l.signal(kNumSignals - 1, s.R - 1) + 8, l.shadows);
      EXPECT_LE(l.shadow(kNumSignals - 1, s.R - 1) + 8, l.flags);
      EXPECT_GE(l.flag_stride, l.num_nodes);
      EXPECT_GE(l.flag_stride, l.ranks_per_node);
      EXPECT_LE(l.flag(kNumFlags - 1, l.flag_stride - 1) + 8, l.counters);
      EXPECT_LE(l.counters + 4 * kNumCounters, l.stats);
      EXPECT_LE(l.stats + 8 * kNumStats, l.meta_in);
      EXPECT_LE(l.meta(1, s.R - 1) + l.meta_entry.stride, l.meta_out);
      EXPECT_LE(l.meta_staging(s.R - 1) + l.meta_entry.stride, l.control_bytes);
      EXPECT_EQ(l.control_bytes % 4096, 0u);
      EXPECT_GT(l.half_bytes, 0u);
      EXPECT_EQ(2 * l.half_bytes, hint);  // the hint is the data halves; the Buffer adds the control part
      for (const bool fp8 : {false, true}) {
        const int row_bytes = fp8 ? hidden : 2 * hidden, scales = fp8 ? hidden / 128 : 0;
        const InterDispatchGeometry d = InterDispatchGeometry::make(l, row_bytes, scales, K);
        EXPECT_GE(d.window, tokens) << (fp8 ? "fp8" : "bf16");  // the hint's region: every token in one round
        EXPECT_LE(d.bytes_for(l, d.window), l.half_bytes) << (fp8 ? "fp8" : "bf16");
        EXPECT_LE(d.row(l, l.num_nodes - 1, d.window - 1) + d.drow, l.dispatch_base() + l.half_bytes);
        EXPECT_LE(d.send_mask(l, l.num_nodes - 1, l.max_tokens - 1) + 4, d.rows);
        EXPECT_EQ(d.drow % 16, 0u);
      }
      // Every array of a combine geometry inside the combine half, in order.
      const auto inside_half = [&](const InterCombineGeometry& g) {
        EXPECT_LE(g.bytes_for(l, g.window), l.half_bytes);
        EXPECT_LE(g.in_row(l, l.num_nodes - 1, s.P - 1, g.window - 1) + g.crow, g.out);
        EXPECT_LE(g.out_row(l, l.num_nodes - 1, g.window - 1) + g.prow, g.net);
        EXPECT_LE(g.net_row(l, l.num_nodes - 1, g.window - 1) + g.prow, l.combine_base() + l.half_bytes);
      };
      const InterCombineGeometry c = InterCombineGeometry::make(l, hidden, K);
      EXPECT_GE(c.window, tokens);
      inside_half(c);
      EXPECT_EQ(c.crow % 16, 0u);
      EXPECT_EQ(c.prow % 16, 0u);
      EXPECT_EQ(c.partial_weights(hidden), 4 * static_cast<size_t>(hidden));
      // BF16 partials (BufferOptions::internode_bf16_partials): half the partial row (the weights stay
      // float32), so at least the float32 window, and the same bounds.
      const InterCombineGeometry b = InterCombineGeometry::make(l, hidden, K, 4, true);
      EXPECT_EQ(b.prow, align_up(2 * static_cast<size_t>(hidden) + 4 * static_cast<size_t>(K), 16));
      EXPECT_EQ(b.partial_weights(hidden), 2 * static_cast<size_t>(hidden));
      EXPECT_LE(2 * b.prow, c.prow + 4 * static_cast<size_t>(K) + 32);  // half, but for the float32 weights
      EXPECT_GE(b.window, c.window);
      inside_half(b);
      EXPECT_EQ(b.out % 16, 0u);
      EXPECT_EQ(b.net % 16, 0u);
    }
  }
}

// The internode rows hold a window of tokens per node (kernels/internode/params.hpp, inter_window),
// and a call with more tokens runs in rounds: the hint's region holds every token in one round; a
// region a third that size still works, in rounds of the most whole steps that fit (one more step
// does not), the same windows on every rank (a function of sizes only); a region that holds no step
// has window 0 (the Buffer refuses it, naming the size). The memory stays what num_rdma_bytes says
// whatever the nodes: more nodes only mean smaller windows.
TEST(GeometryRanks, InternodeWindowsFromTheRegion) {
  struct Split {
    int R, P;
  };
  for (const Split s : {Split{4, 2}, Split{16, 8}, Split{64, 8}, Split{8, 1}, Split{64, 2}})
    for (int hidden : {256, 7168})
      for (int T : {1, 100, 4096})
        for (int chunk : {8, 12, 32}) {
          SCOPED_TRACE("R=" + std::to_string(s.R) + " P=" + std::to_string(s.P) + " hidden=" + std::to_string(hidden) +
                       " T=" + std::to_string(T) + " chunk=" + std::to_string(chunk));
          const int EL = 32, K = 8;
          const int step = inter_window_step(chunk);
          EXPECT_EQ(step % chunk, 0);
          EXPECT_EQ(step % 4, 0);
          const size_t hint = Buffer::internode_size_hint(T, hidden, s.R, s.P, K, EL);
          const InterLayout full = buffer_layout(s.R, s.P, T, EL, hint);
          // One round covers the tokens rounded up to whole chunks (the kernels' windows are whole chunks).
          const int rounded = (T + chunk - 1) / chunk * chunk;
          EXPECT_GE(InterDispatchGeometry::make(full, 2 * hidden, 0, K, step).window, rounded);
          EXPECT_GE(InterCombineGeometry::make(full, hidden, K, step).window, rounded);
          EXPECT_GE(internode_round_capacity(full, hidden, K, step), rounded);
          const InterLayout small = buffer_layout(s.R, s.P, T, EL, hint / 3);
          for (const int row_bytes : {2 * hidden, hidden}) {
            const InterDispatchGeometry d =
                InterDispatchGeometry::make(small, row_bytes, row_bytes == hidden ? hidden / 128 : 0, K, step);
            if (d.window == 0) continue;  // T small: a third holds less than a step
            EXPECT_EQ(d.window % step, 0);
            EXPECT_LE(d.bytes_for(small, d.window), small.half_bytes);
            if (d.window + step <= small.max_tokens) EXPECT_GT(d.bytes_for(small, d.window + step), small.half_bytes);
            EXPECT_LE(d.row(small, small.num_nodes - 1, d.window - 1) + d.drow,
                      small.dispatch_base() + small.half_bytes);
          }
          const InterCombineGeometry c = InterCombineGeometry::make(small, hidden, K, step);
          if (c.window > 0) {
            EXPECT_EQ(c.window % step, 0);
            if (T >= 100) EXPECT_LT(c.window, T);  // the bigger problems take rounds here
            EXPECT_LE(c.bytes_for(small, c.window), small.half_bytes);
            EXPECT_GT(c.bytes_for(small, c.window + step), small.half_bytes);
            EXPECT_LE(c.net_row(small, small.num_nodes - 1, c.window - 1) + c.prow,
                      small.combine_base() + small.half_bytes);
          }
        }
  const InterLayout tiny =
      InterLayout::make(4, 2, 65536, 8192, 32, InterLayout::make(4, 2, 65536, 8192, 32, 0).control_bytes + 8192);
  EXPECT_EQ(InterCombineGeometry::make(tiny, 7168, 8).window, 0);
  EXPECT_EQ(internode_round_capacity(tiny, 7168, 8, 8), 0);
  EXPECT_EQ(inter_window_step(8), 8);
  EXPECT_EQ(inter_window_step(12), 12);
  EXPECT_EQ(inter_window_step(10), 20);
  EXPECT_EQ(inter_window_step(9), 36);
}

// BufferOptions::internode_combine_nvl: the combine's pushed rows in num_nvl_bytes's part of the
// region (where it holds one step of them), the combine half only the partials. Random shapes and
// sizes (seed printed): the rows of each array inside their own part, the two parts apart in the
// region Buffer lays out (plan_regions), the window the most whole steps both parts hold (never
// fewer than without the part), Buffer::internode_windows the same; a part smaller than a step
// leaves everything in the combine half, as before. At DeepSeek's shape with DeepEP's hints the
// combine takes under half the rounds.
TEST(GeometryRanks, InternodeCombineRowsInTheNvlPart) {
  const uint32_t seed = std::random_device{}();
  std::mt19937 rng(seed);
  SCOPED_TRACE("seed " + std::to_string(seed));
  struct Split {
    int R, P;
  };
  const Split splits[] = {{4, 2}, {8, 1}, {16, 8}, {64, 8}, {6, 3}};
  int in_nvl = 0, not_in_nvl = 0;
  for (int trial = 0; trial < 400; ++trial) {
    const Split sp = splits[rng() % 5];
    const int hidden = 128 * (1 + static_cast<int>(rng() % 56)), K = 1 + static_cast<int>(rng() % 8), EL = 8;
    const int T = 1 + static_cast<int>(rng() % 2048), chunk = 8 * (1 + static_cast<int>(rng() % 4));
    const bool bf16 = rng() % 2 == 0;
    const int step = inter_window_step(chunk);
    const size_t hint = Buffer::internode_size_hint(T, hidden, sp.R, sp.P, K, EL);
    const size_t rdma = hint / (1 + rng() % 10);
    const InterLayout l = buffer_layout(sp.R, sp.P, T, EL, rdma);
    const InterCombineGeometry off = InterCombineGeometry::make(l, hidden, K, step, bf16);
    // The pushed rows of between 0 and 2 x all tokens (some below one step).
    const size_t all_in = off.in_bytes_for(l, l.max_tokens);
    const size_t nvl = align_up(static_cast<size_t>(std::uniform_real_distribution<double>(0, 2)(rng) * all_in), 4096);
    const RegionPlan plan = plan_regions(nvl, rdma, sp.R, sp.P, T, EL, true);
    const InterCombineGeometry g =
        InterCombineGeometry::make(l, hidden, K, step, bf16, plan.data_offset, plan.data_bytes);
    SCOPED_TRACE("R=" + std::to_string(sp.R) + " P=" + std::to_string(sp.P) + " hidden=" + std::to_string(hidden) +
                 " K=" + std::to_string(K) + " T=" + std::to_string(T) + " step=" + std::to_string(step) +
                 " rdma=" + std::to_string(rdma) + " nvl=" + std::to_string(nvl) + " window " +
                 std::to_string(g.window) + " (without " + std::to_string(off.window) + ")");
    // The part holds the pushed rows where that gives a larger window than the half alone.
    const int partials = inter_window(l.half_bytes, static_cast<size_t>(l.num_nodes) * 2 * g.prow, step, l.max_tokens);
    const int in_part = inter_window(plan.data_bytes, g.in_bytes_for(l, 1), step, l.max_tokens);
    ASSERT_EQ(g.in_nvl, std::min(partials, in_part) > off.window);
    if (!g.in_nvl) {
      ++not_in_nvl;
      EXPECT_EQ(g.window, off.window);
      EXPECT_EQ(g.in, off.in);
      EXPECT_EQ(g.out, off.out);
      continue;
    }
    ++in_nvl;
    EXPECT_GT(g.window, off.window);
    EXPECT_EQ(g.window, std::min(partials, in_part));
    EXPECT_EQ(g.bytes_for(l, 1), static_cast<size_t>(l.num_nodes) * 2 * g.prow);  // the partials only
    EXPECT_EQ(Buffer::internode_windows(rdma, T, hidden, sp.R, sp.P, K, EL, chunk, nvl).combine,
              InterCombineGeometry::make(l, hidden, K, step, false, plan.data_offset, plan.data_bytes).window);
    EXPECT_EQ(g.window % step, 0);
    // Pushed rows inside the part num_nvl_bytes gives, before the internode region starts.
    EXPECT_EQ(g.in, plan.data_offset);
    const size_t in_end = g.in_row(l, l.num_nodes - 1, sp.P - 1, g.window - 1) + g.crow;
    EXPECT_LE(in_end, plan.data_offset + plan.data_bytes);
    EXPECT_LE(plan.data_offset + plan.data_bytes, plan.inter_offset);
    // Partials inside the combine half (offsets from the internode region's start).
    EXPECT_EQ(g.out, l.combine_base());
    EXPECT_LE(g.out_row(l, l.num_nodes - 1, g.window - 1) + g.prow, g.net);
    EXPECT_LE(g.net_row(l, l.num_nodes - 1, g.window - 1) + g.prow, l.combine_base() + l.half_bytes);
    // The most whole steps both parts hold.
    const int next = g.window + step;
    if (next <= static_cast<int>(align_up(static_cast<size_t>(l.max_tokens), static_cast<size_t>(step))))
      EXPECT_TRUE(g.bytes_for(l, next) > l.half_bytes || g.in_bytes_for(l, next) > plan.data_bytes);
  }
  EXPECT_GT(in_nvl, 50);
  EXPECT_GT(not_in_nvl, 20);
  // DeepSeek's shape, 2 nodes of 8, 4096 tokens, top-8, with DeepEP's hints (88 MB, 360 MB):
  // float32 partials under half the combine rounds, BF16 partials under a third.
  const int T = 4096, H = 7168, step = inter_window_step(32);
  const InterLayout l = buffer_layout(16, 8, T, 16, size_t{88} << 20);
  const RegionPlan plan = plan_regions(size_t{360} << 20, size_t{88} << 20, 16, 8, T, 16, true);
  const auto rounds = [&](bool bf16, bool nvl) {
    const int w = InterCombineGeometry::make(l, H, 8, step, bf16, plan.data_offset, nvl ? plan.data_bytes : 0).window;
    return (T + w - 1) / w;
  };
  std::printf("[geometry] 16 ranks, 2 nodes, 88 MB + 360 MB: combine rounds %d -> %d (float32), %d -> %d (BF16)\n",
              rounds(false, false), rounds(false, true), rounds(true, false), rounds(true, true));
  EXPECT_LT(2 * rounds(false, true), rounds(false, false));
  EXPECT_LT(3 * rounds(true, true), rounds(true, false));
}

// The rounds of a call, with the index arithmetic the internode kernels use (dispatch.cuh,
// combine.cuh): over all rounds every chunk of every source is sent and received exactly once; a
// row's place inside the window stays below the window (the row stride); the mask slice a round
// puts starts 16-byte aligned and stays inside the source node's mask row; the last round is the
// last; the combine's window covers every token once. Random T per rank, chunks 8-32, regions from
// a tenth of the hint to the hint.
TEST(GeometryRanks, InternodeRoundsCoverEveryChunkOnce) {
  std::mt19937 rng(20261207);
  struct Split {
    int R, P;
  };
  int most_rounds = 0;  // the test must have cut calls into several rounds
  for (const Split s : {Split{4, 2}, Split{8, 1}, Split{16, 8}, Split{128, 8}})
    for (int chunk : {8, 10, 12, 32})
      for (int divisor : {1, 3, 10}) {
        const int limit = 600, hidden = 512, K = 8, EL = 8;
        const size_t hint = Buffer::internode_size_hint(limit, hidden, s.R, s.P, K, EL);
        const InterLayout l = buffer_layout(s.R, s.P, limit, EL, hint / divisor);
        const int step = inter_window_step(chunk);
        const InterDispatchGeometry d = InterDispatchGeometry::make(l, 2 * hidden, 0, K, step);
        const InterCombineGeometry c = InterCombineGeometry::make(l, hidden, K, step);
        SCOPED_TRACE("R=" + std::to_string(s.R) + " P=" + std::to_string(s.P) + " chunk=" + std::to_string(chunk) +
                     " region/" + std::to_string(divisor) + " windows " + std::to_string(d.window) + "/" +
                     std::to_string(c.window));
        ASSERT_GT(d.window, 0);
        ASSERT_GT(c.window, 0);
        std::vector<int> T(s.R);
        for (int& t : T) t = std::uniform_int_distribution<int>(0, limit)(rng);
        int max_chunks = 0;
        for (int t : T) max_chunks = std::max(max_chunks, (t + chunk - 1) / chunk);
        const int tokens = max_chunks * chunk;  // Buffer::Impl::internode_round_tokens with the counts
        // Dispatch: per source, how often each chunk was sent (send kernel) and received (receive kernel).
        std::vector<std::vector<int>> sent(s.R), received(s.R);
        for (int i = 0; i < s.R; ++i) sent[i].assign(max_chunks, 0), received[i].assign(max_chunks, 0);
        int rounds = 0, last_rounds = 0;
        for_each_internode_round(tokens, d.window, [&](int wb, int we, bool last) {
          ++rounds;
          last_rounds += last;
          EXPECT_EQ(wb % step, 0);
          EXPECT_EQ(we % chunk, 0);
          EXPECT_LE(we - wb, d.window);
          for (int i = 0; i < s.R; ++i) {
            const int num_chunks = (T[i] + chunk - 1) / chunk;
            const int c_begin = wb / chunk, c_end = std::min(num_chunks, we / chunk);
            for (int ch = c_begin; ch < c_end; ++ch) {
              ++sent[i][ch];
              for (int t = ch * chunk; t < std::min((ch + 1) * chunk, T[i]); ++t) {
                ASSERT_GE(t - wb, 0);
                ASSERT_LT(t - wb, d.window);
                ASSERT_LE(d.row(l, s.R / s.P - 1, t - wb) + d.drow, l.dispatch_base() + l.half_bytes);
              }
            }
            const size_t bytes = align_up(static_cast<size_t>(std::max(c_end - c_begin, 0)) * chunk * 4, 16);
            EXPECT_EQ(d.mask(l, i / s.P, wb) % 16, 0u);
            if (bytes > 0) EXPECT_LE(d.mask(l, i / s.P, wb) + bytes, d.mask(l, i / s.P, 0) + 4 * l.max_tokens);
            // Receive kernel: items (source, chunk) of the window, past max_chunks skipped.
            const int wchunks = (we - wb) / chunk;
            for (int item = 0; item < wchunks; ++item) {
              const int ch = c_begin + item;
              if (ch < max_chunks) ++received[i][ch];
            }
          }
        });
        EXPECT_EQ(last_rounds, 1);
        EXPECT_EQ(rounds, std::max((tokens + d.window - 1) / d.window, 1));
        if (divisor == 1) EXPECT_EQ(rounds, 1) << "the hint's region moves every token in one round";
        most_rounds = std::max(most_rounds, rounds);
        for (int i = 0; i < s.R; ++i)
          for (int ch = 0; ch < max_chunks; ++ch) {
            const int num_chunks = (T[i] + chunk - 1) / chunk;
            EXPECT_EQ(sent[i][ch], ch < num_chunks ? 1 : 0) << "source " << i << " chunk " << ch;
            EXPECT_EQ(received[i][ch], 1) << "source " << i << " chunk " << ch;
          }
        // Combine: every origin token in exactly one round's window, at a place inside it.
        std::vector<int> combined(tokens, 0);
        for_each_internode_round(tokens, c.window, [&](int wb, int we, bool) {
          EXPECT_LE(we - wb, c.window);
          for (int t = wb; t < we; ++t) {
            ++combined[t];
            ASSERT_LE(c.net_row(l, s.R / s.P - 1, t - wb) + c.prow, l.combine_base() + l.half_bytes);
          }
        });
        for (int t = 0; t < tokens; ++t) EXPECT_EQ(combined[t], 1) << "token " << t;
      }
  EXPECT_GE(most_rounds, 3);
}

// Normal mode: every R from 2 to 8 gets a valid default config, and its NVL size hint holds at
// least one ring slot per block of the widest BF16 row for dispatch and for combine.
TEST(GeometryRanks, NormalConfigAndRingSlotsFromTwoToEightRanks) {
  const int hidden = 7168, K = 8;
  for (int R = 2; R <= 8; ++R) {
    SCOPED_TRACE("R=" + std::to_string(R));
    const Config d = Config::dispatch_default(R), c = Config::combine_default(R);
    EXPECT_NO_THROW(d.validate(132));
    EXPECT_NO_THROW(c.validate(132));
    const size_t dslot = ring::dispatch_slot_bytes(d.chunk_tokens(), hidden * 2, 0, K);
    const size_t cslot = ring::combine_slot_bytes(c.chunk_tokens(), R, hidden, K);
    EXPECT_GE(d.get_nvl_buffer_size_hint(hidden * 2, R), dslot * d.num_sms) << "dispatch ring";
    EXPECT_GE(c.get_nvl_buffer_size_hint(hidden * 2, R), cslot * c.num_sms) << "combine ring";
    EXPECT_EQ(ring::dispatch_meta_row_bytes(hidden / 128, K) % 16, 0);
    EXPECT_EQ(ring::combine_weights_offset(c.chunk_tokens(), R, hidden) % 128, 0u);
  }
}

// The NVLink hint stops at a node of 8 ranks (unless told more), yet epcomm runs up to kMaxNvlRanks
// ranks in one node (multi-node NVLink): a buffer sized by the 8-rank hint must still hold one ring
// slot per SM for dispatch and combine there (Buffer's ring_slots refuses less), at every row width.
TEST(GeometryRanks, EightRankNvlHintHoldsASlotUpToTheLargestNode) {
  EPCOMM_SEEDED_RNG(rng);
  for (int i = 0; i < 40; ++i) {
    const int R = uniform(rng, 9, kMaxNvlRanks);
    const int hidden = 128 * uniform(rng, 1, 128);
    const int topk = uniform(rng, 1, kMaxTopk);
    const int sms = uniform(rng, 1, 64);
    SCOPED_TRACE("R=" + std::to_string(R) + " hidden=" + std::to_string(hidden) + " topk=" + std::to_string(topk) +
                 " sms=" + std::to_string(sms));
    Config d = Config::dispatch_default(R), c = Config::combine_default(R);
    d.num_sms = c.num_sms = sms;
    const size_t nvl =
        std::max(d.get_nvl_buffer_size_hint(hidden * 2, R, 8), c.get_nvl_buffer_size_hint(hidden * 2, R, 8));
    const size_t half = plan_regions(nvl, 0, R, R, 4096, 64, false).data_bytes / 2;  // Buffer::Impl::ring_region_bytes
    EXPECT_GE(half, sms * ring::dispatch_slot_bytes(d.chunk_tokens(), hidden * 2, hidden / 128, topk)) << "dispatch";
    EXPECT_GE(half, sms * ring::combine_slot_bytes(c.chunk_tokens(), R, hidden, topk)) << "combine";
  }
}

// A buffer sized by epcomm's two Config hints (DeepEP's sizing code) runs across nodes at every rank
// count normal mode supports (kMaxInterRanks on kMaxInterNodes): each hint holds at least a round of
// Config::kHintRoundTokens tokens per source node, for dispatch and combine, with the combine's rows
// in either part. Until session 20 the rdma hint was DeepEP's ring (88 MB at hidden 7168: up to 128
// combine rounds at 128 ranks). Past those limits a buffer is low-latency only and the hint stays
// DeepEP's ring.
TEST(GeometryRanks, ConfigHintsHoldARoundAtEveryRankCount) {
  EPCOMM_SEEDED_RNG(rng);
  for (int i = 0; i < 12; ++i) {
    const int P = uniform(rng, 1, 8);
    const int R = P * uniform(rng, 2, std::min(kMaxInterNodes, kMaxInterRanks / P));
    const int hidden = 128 * uniform(rng, 1, 64);
    const int topk = uniform(rng, 1, kMaxTopk);
    const int local_experts = uniform(rng, 1, 64);
    SCOPED_TRACE("R=" + std::to_string(R) + " P=" + std::to_string(P) + " hidden=" + std::to_string(hidden) +
                 " topk=" + std::to_string(topk));
    const Config d = Config::dispatch_default(R), c = Config::combine_default(R);
    const size_t rdma =
        std::max(d.get_rdma_buffer_size_hint(hidden * 2, R, P), c.get_rdma_buffer_size_hint(hidden * 2, R, P));
    const size_t nvl =
        std::max(d.get_nvl_buffer_size_hint(hidden * 2, R, P), c.get_nvl_buffer_size_hint(hidden * 2, R, P));
    for (const size_t nvl_part : {size_t{0}, nvl}) {
      const Buffer::InternodeWindows w =
          Buffer::internode_windows(rdma, 4096, hidden, R, P, topk, local_experts, d.chunk_tokens(), nvl_part);
      EXPECT_GE(w.dispatch, Config::kHintRoundTokens) << "nvl part " << nvl_part;
      EXPECT_GE(w.combine, Config::kHintRoundTokens) << "nvl part " << nvl_part;
    }
    // The same nodes past normal mode's limits (more ranks per node): the ring, whatever R.
    const int big = std::max(P, kMaxInterRanks / (R / P) + 1);
    const Config b = Config::dispatch_default(big * (R / P));
    EXPECT_EQ(b.get_rdma_buffer_size_hint(hidden * 2, big * (R / P), big),
              static_cast<size_t>(b.num_sms) * b.rdma_buffer_size *
                      (hidden * 2 + 4 * ((hidden * 2 + 127) / 128) + 8 * kMaxTopk + 16) * 2 +
                  static_cast<size_t>(big) * (R / P) * 4096);
  }
}

}  // namespace
}  // namespace epcomm
