// The reusable argument checks of docs/contract.md §6 (src/core/checks.hpp) and Config/env validation: each
// rule fed a bad value must raise ArgumentError naming the argument, the value and the rule; good
// values must pass. These run without a GPU: the checks only read views.
#include <gtest/gtest.h>

#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "core/argument_checks.hpp"
#include "cpu/test_reference_util.hpp"
#include "core/env.hpp"
#include "epcomm/config.hpp"
#include "epcomm/error.hpp"

namespace epcomm {
namespace {

// Runs fn, expects ArgumentError whose message contains every fragment.
void expect_argument_error(const std::function<void()>& fn, const std::vector<std::string>& fragments) {
  try {
    fn();
    ADD_FAILURE() << "no ArgumentError";
  } catch (const ArgumentError& e) {
    const std::string msg = e.what();
    for (const auto& f : fragments) EXPECT_NE(msg.find(f), std::string::npos) << "'" << f << "' not in: " << msg;
  }
}

TensorView view(void* data, DType dtype, std::initializer_list<int64_t> shape, int device = 0) {
  return TensorView::contiguous(data, dtype, shape, device);
}

alignas(16) char storage[4096];

TEST(ArgumentChecks, Dtype) {
  const TensorView x = view(storage, DType::kF32, {4, 8});
  EXPECT_NO_THROW(checks::dtype_in("x", x, {DType::kF32}));
  expect_argument_error(
      [&] {
        checks::dtype_in("x", x, {DType::kBF16, DType::kFP8E4M3});
      },
      {"x", "bfloat16 or float8_e4m3fn", "float32"});
}

TEST(ArgumentChecks, ShapeAndRank) {
  const TensorView t = view(storage, DType::kI64, {6, 8});
  EXPECT_NO_THROW(checks::ndim("topk_idx", t, 2));
  EXPECT_NO_THROW(checks::dim("topk_idx", t, 1, 8, "topk"));
  expect_argument_error([&] { checks::ndim("topk_idx", t, 1); }, {"topk_idx", "1 dimensions", "[6, 8]"});
  expect_argument_error([&] { checks::dim("topk_idx", t, 0, 5, "tokens of x"); },
                        {"topk_idx", "dimension 0", "5", "tokens of x"});
}

TEST(ArgumentChecks, Contiguity) {
  TensorView t = view(storage, DType::kF32, {4, 8});
  EXPECT_NO_THROW(checks::contiguous("x", t));
  t.strides = {1, 4, 0, 0};  // column-major
  expect_argument_error([&] { checks::contiguous("x", t); }, {"x", "contiguous"});
}

TEST(ArgumentChecks, Device) {
  const TensorView host = view(storage, DType::kF32, {2}, -1);
  expect_argument_error([&] { checks::on_device("x", host, 1); }, {"x", "cuda:1", "cpu"});
  const TensorView dev1 = view(storage, DType::kF32, {2}, 1);
  expect_argument_error([&] { checks::on_device("x", dev1, 0); }, {"x", "cuda:0", "cuda:1"});
}

TEST(ArgumentChecks, Alignment) {
  EXPECT_NO_THROW(checks::aligned("x", view(storage, DType::kBF16, {8}), 16));
  expect_argument_error([&] { checks::aligned("x", view(storage + 2, DType::kBF16, {8}), 16); }, {"x", "16-byte"});
}

TEST(ArgumentChecks, Ranges) {
  EXPECT_NO_THROW(checks::in_range("num_topk", 16, 1, 16));
  expect_argument_error([&] { checks::in_range("num_topk", 17, 1, 16); }, {"num_topk", "17", "[1, 16]"});
  expect_argument_error([&] { checks::positive("num_experts", 0); }, {"num_experts", "0", "positive"});
  expect_argument_error([&] { checks::divisible("num_experts", 10, "num_ranks", 4); },
                        {"num_experts", "10", "num_ranks", "4"});
}

TEST(ArgumentChecks, TopkIdsOnTheHost) {
  std::vector<int64_t> ids = {0, 1, -1, 7, 3, 2};
  const TensorView t = view(ids.data(), DType::kI64, {3, 2}, -1);
  EXPECT_NO_THROW(checks::topk_ids_host("topk_idx", t, 8));
  ids[3] = 8;
  expect_argument_error([&] { checks::topk_ids_host("topk_idx", t, 8); }, {"topk_idx[1][1]", "8", "[-1, 8)"});
  ids[3] = -2;
  expect_argument_error([&] { checks::topk_ids_host("topk_idx", t, 8); }, {"topk_idx[1][1]", "-2"});
}

TEST(ArgumentChecks, DeviceTensorBundle) {
  expect_argument_error(
      [&] {
        checks::device_tensor("x", view(nullptr, DType::kBF16, {4, 8}), 0, {DType::kBF16}, 2);
      },
      {"x", "null"});
  EXPECT_NO_THROW(checks::device_tensor("x", view(nullptr, DType::kBF16, {0, 8}), 0, {DType::kBF16}, 2));
}

TEST(ArgumentChecks, ConfigRules) {
  Config c;
  EXPECT_NO_THROW(c.validate(132));
  c.num_sms = 0;
  expect_argument_error([&] { c.validate(132); }, {"config.num_sms", "0"});
  c.num_sms = 200;
  expect_argument_error([&] { c.validate(132); }, {"config.num_sms", "200", "132"});
  c = Config{};
  c.nvl_chunk_size = 0;
  expect_argument_error([&] { c.validate(132); }, {"config.nvl_chunk_size"});
  // Chunk sizes are clamped into [8, 32]; slots into [1, 16].
  c.nvl_chunk_size = 6;
  EXPECT_EQ(c.chunk_tokens(), 8);
  c.nvl_chunk_size = 64;
  EXPECT_EQ(c.chunk_tokens(), 32);
  c.nvl_buffer_size = 10000;
  EXPECT_EQ(c.ring_slots(), 16);
  // A hint grows with ranks and rows, and covers both rings.
  const Config d = Config::dispatch_default(4);
  EXPECT_GT(d.get_nvl_buffer_size_hint(14336, 8), d.get_nvl_buffer_size_hint(14336, 4));
  EXPECT_GT(d.get_nvl_buffer_size_hint(14336, 4), d.get_nvl_buffer_size_hint(2048, 4));
}

// The NVLink hint covers one node's rings: past ranks_per_node it stays that node's, whatever the
// rank count (it grew to 27 GB at 320 ranks before); within a node it is unchanged.
TEST(ArgumentChecks, NvlHintStopsGrowingAtTheNode) {
  using ref::testing_util::uniform;
  EPCOMM_SEEDED_RNG(rng);
  const Config d = Config::dispatch_default(8), c = Config::combine_default(8);
  for (int i = 0; i < 20; ++i) {
    const int P = uniform(rng, 1, 16);
    const int R = P * uniform(rng, 2, 40);
    const size_t hb = 256 * static_cast<size_t>(uniform(rng, 1, 64));
    SCOPED_TRACE("R=" + std::to_string(R) + " P=" + std::to_string(P) + " hidden_bytes=" + std::to_string(hb));
    for (const Config* cfg : {&d, &c}) {
      EXPECT_EQ(cfg->get_nvl_buffer_size_hint(hb, R, P), cfg->get_nvl_buffer_size_hint(hb, P, P));
      EXPECT_EQ(cfg->get_nvl_buffer_size_hint(hb, P, P), cfg->get_nvl_buffer_size_hint(hb, P, R));
      EXPECT_EQ(cfg->get_nvl_buffer_size_hint(hb, P, 0), cfg->get_nvl_buffer_size_hint(hb, P, P));  // 0: no bound
      if (P > 1) EXPECT_LT(cfg->get_nvl_buffer_size_hint(hb, P - 1, P), cfg->get_nvl_buffer_size_hint(hb, P, P));
    }
  }
  // Without ranks_per_node: EPCOMM_RANKS_PER_NODE, else max(8, visible GPUs) (8 on a machine without one).
  ::setenv("EPCOMM_RANKS_PER_NODE", "4", 1);
  EXPECT_EQ(Config::nvl_hint_domain_ranks(), 4);
  EXPECT_EQ(d.get_nvl_buffer_size_hint(14336, 64), d.get_nvl_buffer_size_hint(14336, 4, 4));
  ::unsetenv("EPCOMM_RANKS_PER_NODE");
  const int domain = Config::nvl_hint_domain_ranks();
  EXPECT_GE(domain, 8);
  EXPECT_EQ(d.get_nvl_buffer_size_hint(14336, 320), d.get_nvl_buffer_size_hint(14336, domain, domain));
  EXPECT_EQ(c.get_nvl_buffer_size_hint(14336, 2), c.get_nvl_buffer_size_hint(14336, 2, 2));
}

TEST(ArgumentChecks, EnvironmentValues) {
  ::setenv("EPCOMM_TIMEOUT_MS", "1234", 1);
  EXPECT_EQ(env_value("EPCOMM_TIMEOUT_MS"), 1234);
  ::setenv("EPCOMM_TIMEOUT_MS", "soon", 1);
  expect_argument_error([] { env_value("EPCOMM_TIMEOUT_MS"); }, {"EPCOMM_TIMEOUT_MS", "soon"});
  ::setenv("EPCOMM_TIMEOUT_MS", "-5", 1);
  expect_argument_error([] { env_value("EPCOMM_TIMEOUT_MS"); }, {"EPCOMM_TIMEOUT_MS", "-5"});
  ::unsetenv("EPCOMM_TIMEOUT_MS");
  EXPECT_EQ(env_value("EPCOMM_TIMEOUT_MS"), 100000);  // DeepEP's order (about 100 s)
  EXPECT_THROW(env_value("EPCOMM_NOT_A_PARAMETER"), Error);
}

}  // namespace
}  // namespace epcomm
