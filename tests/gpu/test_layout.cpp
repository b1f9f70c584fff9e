// get_dispatch_layout on the GPU against the CPU reference: random and skewed routing, T = 0, 1,
// 4096, 16384, E = 8 ... 512, with -1 entries.
#include <gtest/gtest.h>

#include <random>

#include "harness.hpp"

namespace epcomm::test {
namespace {

void run_layout_cases(int num_ranks, const std::vector<int>& expert_counts) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("R=" + std::to_string(num_ranks) + " seed=" + std::to_string(seed));
  run_ranks(num_ranks, [&](int r, std::shared_ptr<Group> group) {
    BufferOptions bo;
    bo.num_nvl_bytes = 1 << 20;
    Buffer buf(group, bo);
    std::mt19937_64 rng(seed + r);
    const int dev = group->device();
    for (int E : expert_counts)
      for (int T : {0, 1, 4096, 16384})
        for (bool skewed : {false, true}) {
          SCOPED_TRACE("E=" + std::to_string(E) + " T=" + std::to_string(T) + (skewed ? " skewed" : ""));
          const int K = std::min(8, E);
          const auto topk_host = random_topk(rng, T, RoutingSpec{E, K, skewed, 0.05});
          DeviceTensor topk(DType::kI64, {T, K}, dev);
          topk.upload(topk_host);
          DeviceTensor per_rank(DType::kI32, {num_ranks}, dev), per_expert(DType::kI32, {E}, dev);
          DeviceTensor in_rank(DType::kBool, {T, num_ranks}, dev);
          cudaStream_t stream = buf.comm_stream();
          buf.get_dispatch_layout(topk.view(), E, {per_rank.view(), std::nullopt, per_expert.view(), in_rank.view()},
                                  StreamOrder{stream, nullptr, false});
          cuda_ok(cudaStreamSynchronize(stream), "sync");
          const ref::Layout want = ref::get_dispatch_layout(topk_host, T, K, E, num_ranks, num_ranks);
          EXPECT_TRUE(same_values(per_rank.download<int32_t>(), want.num_tokens_per_rank, "num_tokens_per_rank"));
          EXPECT_TRUE(same_values(per_expert.download<int32_t>(), want.num_tokens_per_expert, "num_tokens_per_expert"));
          EXPECT_TRUE(same_values(in_rank.download<uint8_t>(), want.is_token_in_rank, "is_token_in_rank"));
        }
  });
}

TEST(LayoutGpu, FourRanks) { run_layout_cases(4, {8, 64, 256, 512}); }
TEST(LayoutGpu, ThreeRanks) { run_layout_cases(3, {12, 96, 384}); }

}  // namespace
}  // namespace epcomm::test
