// Tuning of the normal-mode kernels, in DeepEP's terms. See docs/design-normal.md "Config".
#pragma once

#include <cstddef>
#include <string>

namespace epcomm {

struct Config {
  // SMs (one block each) a normal-mode kernel uses. Every rank must pass the same value.
  int num_sms = 24;
  // Tokens per chunk, the unit of staging and signalling. Clamped into [8, 32].
  int nvl_chunk_size = 32;
  // Tokens of ring per SM; ring slots = nvl_buffer_size / nvl_chunk_size, clamped into [1, 16].
  int nvl_buffer_size = 128;
  // Across nodes (hierarchical mode): the same for the network hop.
  int rdma_chunk_size = 16;
  int rdma_buffer_size = 128;

  int chunk_tokens() const;
  int ring_slots() const;
  // Bytes of NVLink buffer (num_nvl_bytes) that dispatch and combine with this config need for rows
  // of `hidden_bytes` bytes (DeepEP passes hidden * max(element size, 2)).
  size_t get_nvl_buffer_size_hint(size_t hidden_bytes, int num_ranks) const;
  // Bytes of network memory (num_rdma_bytes) normal mode needs across nodes: 0 when all num_ranks
  // ranks fit in one node of ranks_per_node ranks (DeepEP's rule: no network memory inside one NVLink
  // domain). Without ranks_per_node: nvlink_domain_ranks().
  size_t get_rdma_buffer_size_hint(size_t hidden_bytes, int num_ranks) const;
  size_t get_rdma_buffer_size_hint(size_t hidden_bytes, int num_ranks, int ranks_per_node) const;
  // Throws ArgumentError naming the field when a value cannot work.
  void validate(int device_sm_count) const;
  std::string describe() const;

  // Defaults: a documented rule, not a per-rank-count table (docs/design-normal.md "Config").
  static Config dispatch_default(int num_ranks);
  static Config combine_default(int num_ranks);
  // Ranks one node holds, as this process can tell before any communicator exists:
  // EPCOMM_RANKS_PER_NODE if set, else the CUDA devices visible to this process (one rank per GPU),
  // else 8 (an HGX node, DeepEP's NUM_MAX_NVL_PEERS). The hint above errs on the side of memory:
  // fewer visible devices than a node has only means network memory that goes unused.
  static int nvlink_domain_ranks();
};

}  // namespace epcomm
