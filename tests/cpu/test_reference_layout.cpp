// Dispatch layout (docs/contract.md §3.1): a hand-computed case, then properties on random routing.
#include "cpu/test_reference_util.hpp"
#include "epcomm/host_cluster.hpp"

namespace epcomm::ref {
namespace {

using namespace testing_util;
using V32 = std::vector<int32_t>;
using V8 = std::vector<uint8_t>;

TEST(ReferenceLayout, HandComputed) {
  // 4 ranks, 8 experts (2 per rank). Token 0 -> experts 0,1 (both rank 0: counted once);
  // token 1 -> experts 2 (rank 1) and 7 (rank 3); token 2 -> no choice, then expert 5 (rank 2).
  const std::vector<int64_t> topk = {0, 1, 2, 7, -1, 5};
  Layout one_node = get_dispatch_layout(topk, 3, 2, 8, 4, 4);
  EXPECT_EQ(one_node.num_tokens_per_rank, (V32{1, 1, 1, 1}));
  EXPECT_EQ(one_node.num_tokens_per_expert, (V32{1, 1, 1, 0, 0, 1, 0, 1}));
  EXPECT_EQ(one_node.is_token_in_rank, (V8{1, 0, 0, 0, /**/ 0, 1, 0, 1, /**/ 0, 0, 1, 0}));
  EXPECT_TRUE(one_node.num_tokens_per_node.empty());

  // Two nodes of two ranks: token 1 reaches both nodes, the others one each.
  Layout two_nodes = get_dispatch_layout(topk, 3, 2, 8, 4, 2);
  EXPECT_EQ(two_nodes.num_tokens_per_node, (V32{2, 2}));
  EXPECT_EQ(two_nodes.num_tokens_per_rank, one_node.num_tokens_per_rank);
  EXPECT_EQ(two_nodes.is_token_in_rank, one_node.is_token_in_rank);
}

TEST(ReferenceLayout, RepeatedExpertCountsPerEntryButOncePerRank) {
  // Token 0 lists expert 3 twice and expert 2 (same rank): one token for rank 1, two entries for
  // expert 3.
  Layout l = get_dispatch_layout({3, 3, 2}, 1, 3, 4, 2, 1);
  EXPECT_EQ(l.num_tokens_per_rank, (V32{0, 1}));
  EXPECT_EQ(l.num_tokens_per_expert, (V32{0, 0, 1, 2}));
  EXPECT_EQ(l.num_tokens_per_node, (V32{0, 1}));
}

TEST(ReferenceLayout, EmptyAndAllMinusOne) {
  Layout empty = get_dispatch_layout({}, 0, 4, 16, 8, 4);
  EXPECT_EQ(empty.num_tokens_per_rank, V32(8, 0));
  EXPECT_EQ(empty.num_tokens_per_node, V32(2, 0));
  EXPECT_EQ(empty.num_tokens_per_expert, V32(16, 0));
  EXPECT_TRUE(empty.is_token_in_rank.empty());
  Layout none = get_dispatch_layout(std::vector<int64_t>(6, -1), 3, 2, 4, 2, 2);
  EXPECT_EQ(none.num_tokens_per_rank, (V32{0, 0}));
  EXPECT_EQ(none.is_token_in_rank, V8(6, 0));
}

// Checks every output against its definition, written here token by token.
void check_layout_properties(const Layout& l, const std::vector<int64_t>& topk, int T, int K, int E, int R, int P) {
  const int per_rank = E / R;
  const int nodes = R / P;
  V32 per_expert(E, 0), tokens_per_rank(R, 0), tokens_per_node(nodes, 0);
  for (int t = 0; t < T; ++t) {
    std::vector<bool> on_rank(R, false), on_node(nodes, false);
    for (int k = 0; k < K; ++k) {
      const int64_t e = topk[t * K + k];
      if (e < 0) continue;
      ++per_expert[e];
      on_rank[e / per_rank] = true;
      on_node[e / per_rank / P] = true;
    }
    for (int r = 0; r < R; ++r) {
      ASSERT_EQ(l.is_token_in_rank[t * R + r], on_rank[r] ? 1 : 0) << "token " << t << " rank " << r;
      tokens_per_rank[r] += on_rank[r];
    }
    for (int n = 0; n < nodes; ++n) tokens_per_node[n] += on_node[n];
  }
  EXPECT_EQ(l.num_tokens_per_expert, per_expert);
  EXPECT_EQ(l.num_tokens_per_rank, tokens_per_rank);
  if (nodes == 1) EXPECT_TRUE(l.num_tokens_per_node.empty());
  else EXPECT_EQ(l.num_tokens_per_node, tokens_per_node);
}

TEST(ReferenceLayout, RandomRoutingMatchesDefinition) {
  EPCOMM_SEEDED_RNG(rng);
  for (int R : {1, 2, 3, 4, 8}) {
    for (int P : {R, R % 2 == 0 ? R / 2 : R}) {
      for (int trial = 0; trial < 5; ++trial) {
        const int E = R * uniform(rng, 1, 6);
        const int K = uniform(rng, 1, 9);
        const int T = trial == 0 ? 0 : trial == 1 ? 1 : uniform(rng, 2, 200);
        const auto topk = random_topk(rng, T, K, E, 0.15, /*allow_duplicates=*/trial % 2 == 1);
        SCOPED_TRACE(::testing::Message() << "R=" << R << " P=" << P << " E=" << E << " K=" << K << " T=" << T);
        check_layout_properties(get_dispatch_layout(topk, T, K, E, R, P), topk, T, K, E, R, P);
      }
    }
  }
}

TEST(ReferenceLayout, SkewedRoutingToOneExpert) {
  const int T = 50, K = 4, E = 16, R = 4;
  std::vector<int64_t> topk(T * K, -1);
  for (int t = 0; t < T; ++t) topk[t * K] = 13;
  Layout l = get_dispatch_layout(topk, T, K, E, R, 2);
  EXPECT_EQ(l.num_tokens_per_rank, (V32{0, 0, 0, T}));
  EXPECT_EQ(l.num_tokens_per_node, (V32{0, T}));
  EXPECT_EQ(l.num_tokens_per_expert[13], T);
}

TEST(ReferenceLayout, HostClusterMatchesAllRanks) {
  EPCOMM_SEEDED_RNG(rng);
  const int R = 4, P = 2, E = 32, K = 6;
  std::vector<std::vector<int64_t>> topk(R);
  std::vector<int> T(R);
  for (int r = 0; r < R; ++r) {
    T[r] = uniform(rng, 0, 64);
    topk[r] = random_topk(rng, T[r], K, E);
  }
  std::vector<Layout> got(R);
  HostCluster cluster(R, P);
  cluster.run([&](int rank) { got[rank] = cluster.get_dispatch_layout(rank, topk[rank], T[rank], K, E); });
  for (int r = 0; r < R; ++r) {
    const Layout want = get_dispatch_layout(topk[r], T[r], K, E, R, P);
    EXPECT_EQ(got[r].num_tokens_per_rank, want.num_tokens_per_rank);
    EXPECT_EQ(got[r].num_tokens_per_node, want.num_tokens_per_node);
    EXPECT_EQ(got[r].num_tokens_per_expert, want.num_tokens_per_expert);
    EXPECT_EQ(got[r].is_token_in_rank, want.is_token_in_rank);
  }
}

}  // namespace
}  // namespace epcomm::ref
