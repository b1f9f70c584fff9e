#include "epcomm/config.hpp"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <string>

#include "core/env.hpp"
#include "core/ring_geometry.hpp"
#include "epcomm/buffer.hpp"
#include "epcomm/error.hpp"

namespace epcomm {

int Config::chunk_tokens() const { return std::clamp(nvl_chunk_size, 8, kMaxChunkTokens); }

int Config::ring_slots() const { return std::clamp(nvl_buffer_size / chunk_tokens(), 1, 16); }

size_t Config::get_nvl_buffer_size_hint(size_t hidden_bytes, int num_ranks) const {
  return get_nvl_buffer_size_hint(hidden_bytes, num_ranks, nvl_hint_domain_ranks());
}

size_t Config::get_nvl_buffer_size_hint(size_t hidden_bytes, int num_ranks, int ranks_per_node) const {
  // The data part is split in two halves: dispatch ring, combine ring. Assume the widest rows:
  // fp8 scales for hidden_bytes channels and top-16 routing. The combine slot holds a row per
  // node rank (the rings span one node).
  if (ranks_per_node > 0) num_ranks = std::min(num_ranks, ranks_per_node);
  const int chunk = chunk_tokens();
  const int row = static_cast<int>(hidden_bytes);
  const int hidden = static_cast<int>(hidden_bytes / 2);
  const size_t dispatch =
      static_cast<size_t>(num_sms) * ring_slots() * ring::dispatch_slot_bytes(chunk, row, (row + 127) / 128, kMaxTopk);
  const size_t combine =
      static_cast<size_t>(num_sms) * ring_slots() * ring::combine_slot_bytes(chunk, num_ranks, hidden, kMaxTopk);
  return 2 * std::max(dispatch, combine);
}

int Config::nvlink_domain_ranks() {
  const int64_t env = env_value("EPCOMM_RANKS_PER_NODE");
  if (env > 0) return static_cast<int>(env);
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess) {
    cudaGetLastError();  // no driver or no GPU: not an error here
    devices = 0;
  }
  return devices > 0 ? devices : 8;
}

int Config::nvl_hint_domain_ranks() {
  const int64_t env = env_value("EPCOMM_RANKS_PER_NODE");
  if (env > 0) return static_cast<int>(env);
  return std::max(8, nvlink_domain_ranks());
}

size_t Config::get_rdma_buffer_size_hint(size_t hidden_bytes, int num_ranks) const {
  return get_rdma_buffer_size_hint(hidden_bytes, num_ranks, nvlink_domain_ranks());
}

size_t Config::get_rdma_buffer_size_hint(size_t hidden_bytes, int num_ranks, int ranks_per_node) const {
  if (num_ranks <= ranks_per_node) return 0;  // one node: NVLink only, no network memory
  const size_t per_token = hidden_bytes + 4 * ((hidden_bytes + 127) / 128) + 8 * kMaxTopk + 16;
  const size_t ring = static_cast<size_t>(num_sms) * std::max(rdma_buffer_size, 1) * per_token * 2 +
                      static_cast<size_t>(num_ranks) * 4096;
  // epcomm's region holds a window of tokens per node whose rows grow with the ranks (not a ring of
  // chunks as DeepEP's): at least a round of kHintRoundTokens tokens per source node, so that a buffer
  // sized by this hint runs normal mode (in rounds) at every rank count it supports, in a few dozen
  // rounds (DeepEP's ring, 88 MB at hidden 7168, gave up to 128 combine rounds at 128 ranks). Past
  // normal mode's limits (kMaxInterRanks, kMaxInterNodes) a buffer is low-latency only: the ring.
  if (ranks_per_node < 1 || num_ranks % ranks_per_node != 0 || num_ranks > kMaxInterRanks ||
      num_ranks / ranks_per_node > kMaxInterNodes)
    return ring;
  const int hidden = static_cast<int>(std::max<size_t>(1, (hidden_bytes + 1) / 2));
  return std::max(ring, Buffer::internode_size_hint(kHintRoundTokens, hidden, num_ranks, ranks_per_node, kMaxTopk));
}

void Config::validate(int device_sm_count) const {
  if (num_sms < 1 || num_sms > std::min(device_sm_count, kMaxBlocks))
    throw ArgumentError("config.num_sms = " + std::to_string(num_sms) + " must be in [1, " +
                        std::to_string(std::min(device_sm_count, kMaxBlocks)) + "] on this device");
  if (nvl_chunk_size < 1)
    throw ArgumentError("config.nvl_chunk_size = " + std::to_string(nvl_chunk_size) + " must be positive");
  if (nvl_buffer_size < 1)
    throw ArgumentError("config.nvl_buffer_size = " + std::to_string(nvl_buffer_size) + " must be positive");
}

std::string Config::describe() const {
  return "Config(num_sms=" + std::to_string(num_sms) + ", nvl_chunk_size=" + std::to_string(nvl_chunk_size) +
         ", nvl_buffer_size=" + std::to_string(nvl_buffer_size) +
         ", rdma_chunk_size=" + std::to_string(rdma_chunk_size) +
         ", rdma_buffer_size=" + std::to_string(rdma_buffer_size) + ")";
}

// Rule: EPCOMM_NUM_SMS SMs (24 by default: DeepEP's budget, leaving the rest of an H100/H200 to
// compute), 32-token chunks (one mask word), four ring slots for dispatch (a sender can run three
// chunks ahead) and two for combine (whose slots hold R times more rows).
Config Config::dispatch_default(int /*num_ranks*/) {
  Config c;
  c.num_sms = static_cast<int>(env_value("EPCOMM_NUM_SMS"));
  c.nvl_chunk_size = 32;
  c.nvl_buffer_size = 128;
  return c;
}

Config Config::combine_default(int /*num_ranks*/) {
  Config c;
  c.num_sms = static_cast<int>(env_value("EPCOMM_NUM_SMS"));
  c.nvl_chunk_size = 32;
  c.nvl_buffer_size = 64;
  return c;
}

}  // namespace epcomm
