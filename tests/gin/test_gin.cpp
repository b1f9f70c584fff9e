// The cases epcomm_gin_tests runs in every child process (main.cpp): the ranks of this process are
// one node to NCCL, the other processes other nodes, so Buffer reaches them through NCCL GIN. The
// bodies are the ones the virtual-node tests run (tests/gpu/internode_case, ll_case, shrink_case),
// checked against the CPU reference with the same seed in every process; the low-latency results
// are exchanged (every rank's handles are needed) and compared on rank 0.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <string>

#include "epcomm/error.hpp"
#include "gin/world.hpp"
#include "harness.hpp"
#include "internode_case.hpp"
#include "ll_case.hpp"
#include "shrink_case.hpp"

namespace epcomm::gin_test {
namespace {

using test::InterCase;
using test::LLCase;

uint64_t case_seed(int k) { return world().seed * 1000003ull + static_cast<uint64_t>(k); }

// The timeout the shrink and error-path cases use: short, unless fake nodes share a GPU (their
// kernels then take turns, and a live peer can be seconds late).
int64_t short_timeout_ms() { return world().shared_gpus ? 10000 : 2000; }

InterCase inter_case() {
  const GinWorld& w = world();
  InterCase c;
  c.num_ranks = w.num_ranks;
  c.ranks_per_node = w.ranks_per_node;
  c.num_experts = 16 * w.num_ranks;
  c.report_traffic = true;
  return c;
}

void run_inter(const InterCase& c, int k) {
  const test::InterRun run = test::make_inter_run(c, case_seed(k));
  std::printf("[case] %s seed %llu\n", test::describe(c).c_str(), static_cast<unsigned long long>(run.seed));
  run_world([&](int r, std::shared_ptr<Group> g) {
    ASSERT_EQ(g->ranks_per_node(), c.ranks_per_node) << "NCCL's load/store domain is not this process's ranks";
    test::run_inter_rank(c, run, r, g);
  });
}

void run_ll(LLCase c, int k) {
  const GinWorld& w = world();
  c.low_latency_net = -1;  // across real nodes the network path is the default
  c.expect_network = true;
  c.timeout_ms = w.timeout_ms;
  const test::LLRun run = test::make_ll_run(c, case_seed(k));
  std::printf("[case] %s seed %llu\n", test::describe(c).c_str(), static_cast<unsigned long long>(run.seed));
  run_world([&](int r, std::shared_ptr<Group> g) {
    const auto all = run_and_exchange(*g, [&] {
      const test::LLRankResult mine = test::run_ll_rank(c, run, r, g);
      std::printf("[traffic] rank %d LL (%d round(s)): network puts %llu, bytes %llu, network path %s\n", r, run.rounds,
                  static_cast<unsigned long long>(mine.net_puts), static_cast<unsigned long long>(mine.net_bytes),
                  mine.net_used ? "yes" : "NO");
      return pack(mine);
    });
    if (r != 0 || all.empty()) return;
    std::vector<test::LLRankResult> results;
    for (const auto& b : all) results.push_back(unpack_ll(b));
    test::check_ll_run(c, run, results);
  });
}

// ---- normal mode (hierarchical: each token once per destination node over GIN) ----

TEST(GinNormal, Bf16) { run_inter(inter_case(), 1); }

TEST(GinNormal, Fp8PartialScaleGroup) {
  InterCase c = inter_case();
  c.dtype = DType::kFP8E4M3;
  c.hidden = 1008;  // not a multiple of 128: a partial scale group
  c.num_experts = 8 * c.num_ranks;
  run_inter(c, 2);
}

TEST(GinNormal, WithoutTopkAndOtherChunks) {
  for (int chunk : {8, 32}) {
    InterCase c = inter_case();
    c.with_topk = false;
    c.chunk = chunk;
    run_inter(c, 3 + chunk);
  }
}

TEST(GinNormal, WorstTokensAndCudaGraph) {
  InterCase c = inter_case();
  c.worst = true;
  c.graph = true;
  run_inter(c, 50);
}

TEST(GinNormal, SkewedAndEmptyRanks) {
  InterCase c = inter_case();
  c.skewed = true;
  c.num_topk = 4;
  run_inter(c, 60);
  for (int t : {0, 1}) {  // every rank empty, then one token each
    InterCase z = inter_case();
    z.fixed_tokens = t;
    run_inter(z, 61 + t);
  }
  InterCase one = inter_case();  // only the last rank has tokens
  one.tokens = [R = one.num_ranks, T = one.max_tokens](int r) { return r == R - 1 ? T : 0; };
  run_inter(one, 63);
}

// num_rdma_bytes an eighth of the hint: dispatch and combine run in rounds (a window of tokens per
// node each, kernels/internode/params.hpp), each round a call of its own for GIN's signals; with
// num_worst_tokens and the CUDA graph too.
TEST(GinNormal, SmallRegionRunsInRounds) {
  InterCase c = inter_case();
  c.region_divisor = 8;
  run_inter(c, 70);
  InterCase g = inter_case();
  g.region_divisor = 8;
  g.worst = true;
  g.graph = true;
  g.dtype = DType::kFP8E4M3;
  run_inter(g, 71);
}

// BufferOptions::internode_bf16_partials: the node partials put over GIN as BF16 (half the bytes);
// the combine within that extra rounding.
TEST(GinNormal, Bf16Partials) {
  InterCase c = inter_case();
  c.bf16_partials = true;
  run_inter(c, 72);
}

// BufferOptions::internode_combine_nvl: the rows node peers push in combine lie in num_nvl_bytes's
// part (LSA inside the node), the combine half only the partials put over GIN: fewer rounds in a
// small region (the count checked), with BF16 partials and the CUDA graph too.
TEST(GinNormal, CombineRowsInTheNvlPart) {
  InterCase c = inter_case();
  c.region_divisor = 4;
  c.combine_nvl_divisor = 1;
  run_inter(c, 73);
  InterCase g = inter_case();
  g.region_divisor = 6;
  g.combine_nvl_divisor = 2;
  g.bf16_partials = true;
  g.worst = true;
  g.graph = true;
  run_inter(g, 74);
}

// ---- low-latency mode (network path to other nodes, LSA inside the node) ----

TEST(GinLowLatency, EveryFeature) {
  const GinWorld& w = world();
  int k = 100;
  for (const LLCase& c : test::ll_network_cases(w.num_ranks, w.ranks_per_node)) run_ll(c, k++);
}

TEST(GinLowLatency, AskingForLsaToEveryRankIsAnArgumentError) {
  run_world([&](int, std::shared_ptr<Group> g) {
    BufferOptions bo;
    bo.num_rdma_bytes = Buffer::low_latency_net_size_hint(16, 256, g->size(), 4 * g->size());
    bo.low_latency_net = 0;
    test::expect_error<ArgumentError>([&] { Buffer buf(g, bo); }, {"low_latency_net"},
                                      "low_latency_net = 0 across real nodes");
    g->barrier();  // every rank threw before anything collective
  });
}

// ---- shrink mode: a rank that stops answering over the network is masked ----

void run_dead(bool stop_in_combine, int k) {
  const GinWorld& w = world();
  LLCase c = test::shrink_case(w.num_ranks, w.ranks_per_node, -1);
  c.expect_network = true;
  const int dead = w.num_ranks - 1;  // on another node than rank 0
  const test::DeadRankRun run = test::make_dead_rank_run(c, dead, stop_in_combine, short_timeout_ms(), case_seed(k));
  std::printf("[case] %s dead rank %d%s seed %llu\n", test::describe(c).c_str(), dead,
              stop_in_combine ? " (stops before its combine)" : "", static_cast<unsigned long long>(run.seed));
  run_world([&](int r, std::shared_ptr<Group> g) {
    const auto all = run_and_exchange(*g, [&] { return pack(test::run_dead_rank_rank(run, r, g)); });
    if (r != 0 || all.empty()) return;
    std::vector<test::DeadRankResult> results;
    for (const auto& b : all) results.push_back(unpack_dead_rank(b));
    test::check_dead_rank(run, results);
  });
}

TEST(GinShrink, RankThatStopsIsMaskedSkippedAndCleanBringsItBack) { run_dead(false, 200); }
TEST(GinShrink, RankThatStopsBeforeCombineIsMaskedThere) { run_dead(true, 201); }

// ---- errors: a peer that stops answering is a TimeoutError naming it; reset() brings all back ----

TEST(GinReliability, StoppedPeerIsATimeoutNamingItAndResetRecovers) {
  const GinWorld& w = world();
  InterCase c = inter_case();
  c.steps = 1;
  const test::InterRun run = test::make_inter_run(c, case_seed(300));
  const int stopped = w.num_ranks - 1;
  run_world([&](int r, std::shared_ptr<Group> g) {
    BufferOptions bo = test::inter_buffer_options(c);
    bo.timeout_ms = short_timeout_ms();
    Buffer buf(g, bo);
    if (r != stopped) {
      const std::string msg = test::expect_error<TimeoutError>([&] { test::run_inter_steps(c, run, r, g, buf); },
                                                               {"peer " + std::to_string(stopped)},
                                                               "rank " + std::to_string(r) + " while rank " +
                                                                   std::to_string(stopped) + " makes no call");
      std::printf("[error] rank %d: %s\n", r, msg.c_str());
    } else {
      // The barrier run_inter_steps makes before its first kernel (every rank's tensors exist):
      // without it this rank's reset met the others' one barrier early, zeroed its region before
      // their failed count exchange wrote into it, and kept that stale count after (run 90; the
      // named barriers now refuse that pairing).
      g->barrier("run_inter_steps: tensors made");
    }
    buf.reset();  // collective: the stopped rank joins here
    test::run_inter_steps(c, run, r, g, buf);
  });
}

// ---- no GIN (no plugin): every rank fails alike, none hangs ----

TEST(GinUnavailable, EveryRankFailsAlikeNamingWhatIsMissing) {
  run_world([&](int r, std::shared_ptr<Group> g) {
    ASSERT_GT(g->num_nodes(), 1) << "the processes must be different nodes to NCCL (NCCL_HOSTID)";
    BufferOptions bo;
    bo.num_rdma_bytes = 1 << 20;
    for (int attempt = 0; attempt < 2; ++attempt) {  // the second attempt fails the same way
      // "rank(s) 0": every rank failed, rank 0 first.
      const std::string msg =
          test::expect_error<RuntimeFailure>([&] { Buffer buf(g, bo); }, {"GIN", "ncclDevCommCreate", "rank(s) 0"},
                                             "rank " + std::to_string(r) + ": a Buffer across nodes with no GIN");
      std::printf("[error] rank %d, attempt %d: %s\n", r, attempt, msg.c_str());
      g->barrier();  // nobody is left inside a collective
    }
  });
}

}  // namespace
}  // namespace epcomm::gin_test
