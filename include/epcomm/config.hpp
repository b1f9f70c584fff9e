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

  // Tokens per source node a round across nodes holds at least in a region of the rdma hint's size.
  static constexpr int kHintRoundTokens = 32;

  int chunk_tokens() const;
  int ring_slots() const;
  // Bytes of NVLink buffer (num_nvl_bytes) that dispatch and combine with this config need for rows
  // of `hidden_bytes` bytes (DeepEP passes hidden * max(element size, 2)): the rings of a node of
  // min(num_ranks, ranks_per_node) ranks. Across nodes the rings are not used; the combine's pushed
  // rows may lie there instead (BufferOptions::internode_combine_nvl), so the hint stays that of one
  // node rather than growing with num_ranks. Without ranks_per_node: nvl_hint_domain_ranks().
  size_t get_nvl_buffer_size_hint(size_t hidden_bytes, int num_ranks) const;
  size_t get_nvl_buffer_size_hint(size_t hidden_bytes, int num_ranks, int ranks_per_node) const;
  // Bytes of network memory (num_rdma_bytes) normal mode needs across nodes: 0 when all num_ranks
  // ranks fit in one node of ranks_per_node ranks (DeepEP's rule: no network memory inside one NVLink
  // domain). Else DeepEP's ring for this config, or, where more and normal mode runs (kMaxInterRanks
  // on kMaxInterNodes), a round of kHintRoundTokens tokens per source node (rows of hidden_bytes / 2
  // BF16 channels, top-16): calls with more tokens run in rounds (Buffer::internode_size_hint gives
  // one round for a token bound). Without ranks_per_node: nvlink_domain_ranks().
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
  // The node size the NVLink hint assumes: EPCOMM_RANKS_PER_NODE if set, else the larger of 8
  // (DeepEP's NUM_MAX_NVL_PEERS, its rule for this hint) and the visible CUDA devices. It errs on the
  // side of memory the other way from the network hint: too few ranks per node here would make an
  // intranode group's rings too small.
  static int nvl_hint_domain_ranks();
};

}  // namespace epcomm
