// The stress test's steps (test_stress.cpp): the random sequence of calls drawn from the test's
// seed, one rank's normal-mode or low-latency step on device tensors sized for the largest step,
// and the comparison of every rank's outputs of a step with the CPU reference (recomputed from the
// seed by the verifier threads while the GPUs go on).
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <string>
#include <vector>

#include "harness.hpp"
#include "ll_harness.hpp"

namespace epcomm::test::stress {

// ---------------------------------------------------------------- the sequence
constexpr int kNormalTmax = 160;
constexpr int kNormalHiddens[] = {256, 512, 1008};  // 1008: a partial FP8 scale group
constexpr int kMaxHidden = 1008;
constexpr int kLLTmax = 32, kLLHidden = 512;

int env_int(const char* name, int fallback);

struct Step {
  bool low_latency = false;
  bool fp8 = false;
  int routing = 0;      // 0 uniform, 1 hot rank (experts of ranks 0-1 only), 2 every token to expert 0
  bool worst = false;   // normal: num_worst_tokens
  bool cached = false;  // normal: also a cached dispatch
  bool hook = false;    // LL: send and receive halves as two calls
  int hidden = 0;
  int num_topk = 0;
  std::vector<int> tokens;  // per rank
  int calls() const { return low_latency ? 2 : 3 + (cached ? 1 : 0); }
};

struct Problem {
  int num_ranks = 0;
  uint64_t seed = 0;
  int normal_experts() const { return 8 * num_ranks; }
  int ll_experts() const { return 4 * num_ranks; }
};

// Step `index` of the sequence (the same on every rank).
Step make_step(const Problem& p, int index);

// ---------------------------------------------------------------- normal mode
struct NormalRankResult {
  std::vector<int32_t> per_rank, per_expert, prefix, src_idx, recv_per_expert;
  std::vector<uint8_t> in_rank, recv_x, cached_x;
  std::vector<float> recv_scales, recv_weights, cached_scales, combined_weights;
  std::vector<int64_t> recv_idx;
  std::vector<uint16_t> combined_x;
  int num_rows = 0;
};

// Device tensors sized for the largest step, used through views of each step's shape.
struct NormalDevice {
  NormalDevice(int R, int E, int dev) {
    const int rows = R * kNormalTmax, G = (kMaxHidden + 127) / 128, K = 16;
    for (DeviceTensor* t : {&x, &cached_x, &recv_x, &cached_recv, &bias0, &y, &out})
      *t = DeviceTensor(DType::kBool, {static_cast<int64_t>(std::max(rows, kNormalTmax)) * kMaxHidden * 2}, dev);
    for (DeviceTensor* t : {&scales, &cached_scales, &recv_scales, &cached_recv_scales})
      *t = DeviceTensor(DType::kF32, {static_cast<int64_t>(rows) * G}, dev);
    topk = DeviceTensor(DType::kI64, {kNormalTmax * K}, dev);
    weights = DeviceTensor(DType::kF32, {kNormalTmax * K}, dev);
    recv_idx = DeviceTensor(DType::kI64, {rows * K}, dev);
    recv_weights = DeviceTensor(DType::kF32, {rows * K}, dev);
    out_weights = DeviceTensor(DType::kF32, {kNormalTmax * K}, dev);
    src = DeviceTensor(DType::kI32, {rows}, dev);
    per_rank = DeviceTensor(DType::kI32, {R}, dev);
    per_expert = DeviceTensor(DType::kI32, {E}, dev);
    in_rank = DeviceTensor(DType::kBool, {kNormalTmax * R}, dev);
    prefix = DeviceTensor(DType::kI32, {R * R}, dev);
    recv_per_expert = DeviceTensor(DType::kI32, {E / R}, dev);
  }
  DeviceTensor x, cached_x, scales, cached_scales, topk, weights, per_rank, per_expert, in_rank, prefix, chunk_off,
      recv_per_expert, recv_x, recv_scales, recv_idx, recv_weights, src, cached_recv, cached_recv_scales, y, bias0, out,
      out_weights;
};

// One rank's normal step: layout, dispatch, combine (and a cached dispatch), outputs downloaded.
NormalRankResult run_normal(const Problem& p, const Step& s, int step, int rank, Buffer& buf, NormalDevice& d,
                            cudaStream_t stream, int sms);
// The first difference of every rank's outputs of a normal step from the reference ("" if none).
std::string check_normal(const Problem& p, const Step& s, int step, const std::vector<NormalRankResult>& got);

// ---------------------------------------------------------------- low-latency mode
LLCase ll_case(const Problem& p, const Step& s);
RoundInput ll_input(const Problem& p, const Step& s, int step, int rank);

struct LLDevice {
  LLDevice(const Problem& p, int dev, int sms) {
    for (int fp8 = 0; fp8 < 2; ++fp8) {
      Step s;
      s.fp8 = fp8 != 0;
      s.num_topk = 8;
      LLCase c = ll_case(p, s);
      batch[fp8] = make_batch(c, p.num_ranks, kLLTmax, dev, sms, nullptr, nullptr, nullptr);
    }
  }
  Batch batch[2];  // bf16, fp8; sized for Tmax tokens and top-8
};

// One rank's low-latency step: dispatch and combine (hooks where the step says), outputs downloaded.
RoundOutput run_low_latency(const Problem& p, const Step& s, int step, int rank, Buffer& buf, LLDevice& d,
                            cudaStream_t stream);

}  // namespace epcomm::test::stress
