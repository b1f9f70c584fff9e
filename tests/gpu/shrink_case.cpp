// See shrink_case.hpp.
#include "shrink_case.hpp"

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <random>
#include <string>

namespace epcomm::test {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// `m` is allocated once per rank, before its first call: ranks that share a GPU are threads of one
// process, and a cudaFree here would wait for a co-resident rank's kernel that may be waiting (up to
// the timeout) for a masked rank, making this rank late enough to be masked as well.
std::vector<int32_t> query_mask(Buffer& buf, cudaStream_t stream, DeviceTensor& m) {
  buf.low_latency_query_mask_buffer(m.view(), stream);
  cuda_ok(cudaStreamSynchronize(stream), "sync after query");
  return m.download<int32_t>();
}

std::vector<int32_t> mask_of(int R, int masked_rank) {
  std::vector<int32_t> m(R, 0);
  if (masked_rank >= 0) m[masked_rank] = 1;
  return m;
}

// The halves of one LL round; `do_combine` = false leaves after the dispatch.
void dispatch_half(const LLCase& c, Buffer& buf, cudaStream_t stream, Batch& b, const RoundInput& in, bool hook,
                   RoundOutput& out) {
  const StreamOrder order{stream, nullptr, false};
  upload_dispatch_inputs(b, in);
  buf.low_latency_dispatch(b.din, b.dout, b.handle, hook, order);
  if (hook) buf.low_latency_dispatch_recv(b.din, b.dout, b.handle, order);
  cuda_ok(cudaStreamSynchronize(stream), "sync after dispatch");
  buf.check_device_errors();
  out = download_dispatch(c, c.num_ranks, b);
}

void combine_half(const LLCase& c, Buffer& buf, cudaStream_t stream, Batch& b, const RoundInput& in, bool hook,
                  RoundOutput& out) {
  const StreamOrder order{stream, nullptr, false};
  upload_y(c, buf, b, in);
  buf.low_latency_combine(b.cin, b.handle, b.out.view(), hook, order);
  if (hook) buf.low_latency_combine_recv(b.cin, b.handle, b.out.view(), order);
  cuda_ok(cudaStreamSynchronize(stream), "sync after combine");
  buf.check_device_errors();
  out.out = b.out.download<uint16_t>();
}

// P > 0: virtual nodes of P ranks; net = 1: LL through the network transport to other nodes.
LLCase shrink_case(int R, int P, int net) {
  LLCase c = small_case(R, /*Tmax=*/32, /*H=*/512, /*E=*/4 * R, /*K=*/4);
  c.ranks_per_node = P;
  c.low_latency_net = net;
  c.drop_rate = 0.05;
  return c;
}

DeadRankRun make_dead_rank_run(const LLCase& c, int dead, bool stop_in_combine, int64_t timeout_ms, uint64_t seed) {
  DeadRankRun run;
  run.c = c;
  run.dead = dead;
  run.stop_in_combine = stop_in_combine;
  run.timeout_ms = timeout_ms;
  run.seed = seed;
  const int R = c.num_ranks;
  run.tokens.resize(R);
  for (int r = 0; r < R; ++r) {
    std::mt19937_64 rng(seed + 31 * r);
    run.tokens[r] = r == 0 ? c.max_tokens : std::uniform_int_distribution<int>(1, c.max_tokens)(rng);
  }
  run.in.assign(kDeadRankRounds, std::vector<RoundInput>(R));
  for (int k = 0; k < kDeadRankRounds; ++k)
    for (int r = 0; r < R; ++r) run.in[k][r] = make_input(c, seed, k, r, run.tokens[r]);
  return run;
}

// Rounds: 0 all; 1 the dead rank stops; 2 it stays away (hooks); 3 all again; 4 masked by hand.
DeadRankResult run_dead_rank_rank(const DeadRankRun& run, int r, const std::shared_ptr<Group>& group) {
  const LLCase& c = run.c;
  const int R = c.num_ranks, dead = run.dead;
  DeadRankResult res;
  res.got.resize(kDeadRankRounds);
  res.secs.assign(kDeadRankRounds, 0.0);
  res.masks.resize(kDeadRankRounds);
  RankBuffer rb(group, c, run.timeout_ms, /*enable_shrink=*/true);
  Buffer& buf = *rb.buffer;
  cudaStream_t s = rb.stream;
  Batch b = make_batch(c, run.tokens[r], rb.device);
  DeviceTensor mask_t(DType::kI32, {R}, rb.device);
  auto round = [&](int k, bool hook) {
    const auto t0 = std::chrono::steady_clock::now();
    dispatch_half(c, buf, s, b, run.in[k][r], hook, res.got[k]);
    combine_half(c, buf, s, b, run.in[k][r], hook, res.got[k]);
    res.secs[k] = seconds_since(t0);
    res.masks[k] = query_mask(buf, s, mask_t);
  };
  round(0, false);
  if (r != dead) {
    round(1, false);  // the dead rank stops answering here: masked after the timeout
    round(2, true);   // skipped without waiting
  } else if (run.stop_in_combine) {
    dispatch_half(c, buf, s, b, run.in[1][r], false, res.got[1]);
  }
  // Every rank, the dead one included, brings the group back: counters and regions, then the mask.
  buf.clean_low_latency_buffer(c.max_tokens, c.hidden, c.num_experts, s);
  EXPECT_EQ(query_mask(buf, s, mask_t), mask_of(R, r == dead ? -1 : dead)) << "rank " << r << ": clean keeps the mask";
  buf.low_latency_clean_mask_buffer(s);
  round(3, false);
  // Masking by hand: the live ranks mask the dead rank before it stops; nobody waits for it.
  if (r != dead) {
    buf.low_latency_update_mask_buffer(dead, true, s);
    round(4, false);
    buf.low_latency_update_mask_buffer(dead, false, s);
    EXPECT_EQ(query_mask(buf, s, mask_t), mask_of(R, -1)) << "rank " << r << ": unmasked by hand";
  }
  // Nobody tears down (the cudaFree of its batch and buffer) before every live rank finished round
  // 4. Ranks that share a GPU are threads of one process, and a cudaFree waits for the device to be
  // idle while holding up the other threads' launches: the dead rank freeing its tensors while the
  // live ranks ran round 4 delayed their launches past the 1 s timeout, and they masked each other
  // (1 x H100, four ranks on GPU 0: "unmasked by hand" with live ranks masked, in three ShrinkGpu
  // tests). The test's setup was at fault, not shrink mode: the dead rank still takes no part in
  // round 4; it only leaves after it. On distinct GPUs (and between processes) nothing changes.
  ranks_meet();
  return res;
}

void check_dead_rank(const DeadRankRun& run, const std::vector<DeadRankResult>& results) {
  const LLCase& c = run.c;
  const int R = c.num_ranks, dead = run.dead;
  const double timeout_s = run.timeout_ms / 1000.0;
  std::vector<std::vector<RoundOutput>> got(kDeadRankRounds, std::vector<RoundOutput>(R));
  for (int k = 0; k < kDeadRankRounds; ++k)
    for (int r = 0; r < R; ++r) got[k][r] = results[r].got[k];
  std::vector<uint8_t> masked(R, 0);
  masked[dead] = 1;
  compare_round(c, 0, run.in[0], got[0]);
  compare_round(c, 1, run.in[1], got[1], masked, /*masked_from_dispatch=*/!run.stop_in_combine);
  compare_round(c, 2, run.in[2], got[2], masked);
  compare_round(c, 3, run.in[3], got[3]);
  compare_round(c, 4, run.in[4], got[4], masked);
  for (int r = 0; r < R; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    const DeadRankResult& x = results[r];
    EXPECT_EQ(x.masks[0], mask_of(R, -1));
    EXPECT_EQ(x.masks[3], mask_of(R, -1)) << "after low_latency_clean_mask_buffer";
    if (r == dead) continue;
    EXPECT_EQ(x.masks[1], mask_of(R, dead)) << "the dead rank is masked after the round it missed";
    EXPECT_EQ(x.masks[2], mask_of(R, dead));
    EXPECT_EQ(x.masks[4], mask_of(R, dead));
    // Round 1 waited about one timeout per half at most; rounds 2 and 4 never wait for the dead rank.
    EXPECT_LT(x.secs[1], 3.0 * timeout_s + 2.0) << "round 1 took " << x.secs[1] << " s";
    EXPECT_GE(x.secs[1], 0.5 * timeout_s) << "round 1 cannot finish before the timeout";
    EXPECT_LT(x.secs[2], 0.25 * timeout_s) << "round 2 took " << x.secs[2] << " s: it waited";
    EXPECT_LT(x.secs[4], 0.25 * timeout_s) << "round 4 took " << x.secs[4] << " s: it waited";
  }
}

void run_dead_rank(int R, int dead, bool stop_in_combine, int64_t timeout_ms, int P, int net) {
  const uint64_t seed = std::random_device{}();
  const LLCase c = shrink_case(R, P, net);
  SCOPED_TRACE(describe(c) + " dead rank " + std::to_string(dead) + (stop_in_combine ? " (stops in combine)" : "") +
               " seed=" + std::to_string(seed));
  const DeadRankRun run = make_dead_rank_run(c, dead, stop_in_combine, timeout_ms, seed);
  std::vector<DeadRankResult> results(R);
  if (!run_ranks_cleanly(
          R, [&](int r, std::shared_ptr<Group> group) { results[r] = run_dead_rank_rank(run, r, group); },
          c.ranks_per_node))
    return;  // a rank failed: its outputs are incomplete
  check_dead_rank(run, results);
}

}  // namespace epcomm::test
