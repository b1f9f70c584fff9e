// HostCluster as a collective runtime: errors reach every rank the same way, misuse fails instead
// of hanging, and the cluster stays usable. (Bit-for-bit equality with the all-ranks functions is
// checked by the random normal, low-latency and layout tests.)
#include <stdexcept>

#include "cpu/test_reference_util.hpp"
#include "epcomm/host_cluster.hpp"

namespace epcomm::ref {
namespace {

using namespace testing_util;

constexpr int kR = 4;

NormalOptions small_options() {
  NormalOptions o;
  o.hidden = 16;
  o.num_topk = 2;
  o.num_experts = 8;
  return o;
}

std::vector<NormalInput> small_inputs(std::mt19937& rng) {
  std::vector<NormalInput> in(kR);
  for (auto& r : in) {
    r.num_tokens = uniform(rng, 1, 10);
    r.x = as_bytes(random_small_bf16(rng, static_cast<size_t>(r.num_tokens) * 16));
    r.topk_idx = random_topk(rng, r.num_tokens, 2, 8);
    r.topk_weights = random_weights(rng, r.topk_idx.size());
  }
  return in;
}

std::string what_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "<nothing thrown>";
}

TEST(ReferenceHostCluster, ArgumentErrorOnOneRankRaisesOnAllAndClusterStaysUsable) {
  EPCOMM_SEEDED_RNG(rng);
  auto good = small_inputs(rng);
  auto bad = good;
  bad[2].topk_idx[1] = 300;
  const auto want = normal_dispatch(good, small_options());
  std::vector<std::string> messages(kR);
  std::vector<NormalDispatchOutput> got(kR);
  HostCluster cluster(kR, 2);
  cluster.run([&](int rank) {
    messages[rank] = expect_argument_error([&] { cluster.dispatch(rank, bad[rank], small_options()); },
                                           {"rank 2: ", "topk_idx[0][1] = 300", "[-1, 8)"});
    got[rank] = cluster.dispatch(rank, good[rank], small_options());
  });
  for (int r = 0; r < kR; ++r) {
    EXPECT_EQ(messages[r], messages[0]);
    EXPECT_EQ(got[r].recv_x, want[r].recv_x);
    EXPECT_EQ(got[r].handle.recv_src_idx, want[r].handle.recv_src_idx);
  }
}

TEST(ReferenceHostCluster, ReceiverSideErrorRaisesOnAllRanks) {
  // num_worst_tokens too small is only visible once the routing of every rank is known.
  EPCOMM_SEEDED_RNG(rng);
  auto in = small_inputs(rng);
  for (auto& r : in) r.topk_idx.assign(r.topk_idx.size(), 7);  // everything to rank 3
  auto o = small_options();
  o.num_worst_tokens = 1;
  HostCluster cluster(kR, kR);
  cluster.run([&](int rank) {
    expect_argument_error([&] { cluster.dispatch(rank, in[rank], o); }, {"rank 3: ", "num_worst_tokens = 1"});
  });
}

TEST(ReferenceHostCluster, OptionsMustMatchAcrossRanks) {
  EPCOMM_SEEDED_RNG(rng);
  auto in = small_inputs(rng);
  HostCluster cluster(kR, kR);
  cluster.run([&](int rank) {
    auto o = small_options();
    if (rank == 1) o.expert_alignment = 4;
    expect_argument_error([&] { cluster.dispatch(rank, in[rank], o); },
                          {"rank 1: ", "expert_alignment = 4", "rank 0's 1"});
  });
}

TEST(ReferenceHostCluster, MismatchedCollectivesFailInsteadOfHanging) {
  EPCOMM_SEEDED_RNG(rng);
  auto in = small_inputs(rng);
  LowLatencyDispatchInput ll;
  LowLatencyOptions llo;
  llo.hidden = 128, llo.num_topk = 1, llo.num_experts = 4, llo.num_max_dispatch_tokens_per_rank = 1;
  HostCluster cluster(kR, kR);
  const std::string message = what_of([&] {
    cluster.run([&](int rank) {
      if (rank == 0) cluster.dispatch(rank, in[rank], small_options());
      else cluster.low_latency_dispatch(rank, ll, llo);
    });
  });
  EXPECT_NE(message.find("same collective calls"), std::string::npos) << message;
}

TEST(ReferenceHostCluster, RankThatReturnsEarlyDoesNotHangTheOthers) {
  EPCOMM_SEEDED_RNG(rng);
  auto in = small_inputs(rng);
  HostCluster cluster(kR, kR);
  const std::string message = what_of([&] {
    cluster.run([&](int rank) {
      if (rank != 1) cluster.dispatch(rank, in[rank], small_options());
    });
  });
  EXPECT_NE(message.find("rank 1 is elsewhere"), std::string::npos) << message;
}

TEST(ReferenceHostCluster, ExceptionOnOneRankIsRethrownAndOthersAbandon) {
  EPCOMM_SEEDED_RNG(rng);
  auto in = small_inputs(rng);
  HostCluster cluster(kR, kR);
  std::atomic<int> abandoned{0};
  const std::string message = what_of([&] {
    cluster.run([&](int rank) {
      if (rank == 3) throw std::runtime_error("boom on rank 3");
      try {
        cluster.dispatch(rank, in[rank], small_options());
      } catch (const Error&) {
        ++abandoned;
        throw;
      }
    });
  });
  EXPECT_EQ(message, "boom on rank 3");  // the cause, not the peers' "abandoned"
  EXPECT_EQ(abandoned.load(), kR - 1);
  // The next run starts clean.
  std::vector<NormalDispatchOutput> got(kR);
  cluster.run([&](int rank) { got[rank] = cluster.dispatch(rank, in[rank], small_options()); });
  EXPECT_EQ(got[1].recv_x, normal_dispatch(in, small_options())[1].recv_x);
}

TEST(ReferenceHostCluster, ManyCollectivesInARow) {
  // Exercises the alternating slot sets: ranks race ahead into the next collective.
  EPCOMM_SEEDED_RNG(rng);
  std::vector<std::vector<NormalInput>> rounds;
  for (int i = 0; i < 50; ++i) rounds.push_back(small_inputs(rng));
  std::vector<std::vector<NormalDispatchOutput>> got(rounds.size(), std::vector<NormalDispatchOutput>(kR));
  HostCluster cluster(kR, kR);
  cluster.run([&](int rank) {
    for (size_t i = 0; i < rounds.size(); ++i) got[i][rank] = cluster.dispatch(rank, rounds[i][rank], small_options());
  });
  for (size_t i = 0; i < rounds.size(); ++i) {
    const auto want = normal_dispatch(rounds[i], small_options());
    for (int r = 0; r < kR; ++r) ASSERT_EQ(got[i][r].recv_x, want[r].recv_x) << "round " << i << " rank " << r;
  }
}

TEST(ReferenceHostCluster, Misuse) {
  expect_argument_error([] { HostCluster(0, 1); }, {"num_ranks = 0"});
  expect_argument_error([] { HostCluster(4, 3); }, {"ranks_per_node = 3"});
  HostCluster cluster(2, 1);
  EXPECT_EQ(cluster.num_ranks(), 2);
  EXPECT_EQ(cluster.ranks_per_node(), 1);
  NormalInput in;
  const std::string outside = what_of([&] { cluster.dispatch(0, in, small_options()); });
  EXPECT_NE(outside.find("outside HostCluster::run"), std::string::npos) << outside;
  cluster.run([&](int rank) {
    expect_argument_error([&] { cluster.get_dispatch_layout(rank + 2, {}, 0, 1, 2); }, {"rank = ", "[0, 2)"});
  });
}

}  // namespace
}  // namespace epcomm::ref
