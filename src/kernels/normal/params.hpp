// Arguments of the normal-mode kernels (notify, dispatch, combine): plain structs filled by the
// host (core/buffer_normal.cpp) and passed by value.
//
// The algorithm in one paragraph. Each rank cuts its tokens into chunks of its `cut` tokens (at
// most `chunk`, the slot's row count, which every rank shares; the cut is chosen per call so that
// every block gets nearly the same number of tokens, and travels in chunk_offset's last column);
// chunk c is handled
// by block c % num_blocks on every rank, as that block's iteration n = c / num_blocks. Dispatch is a
// pull: each rank stages its own chunk into a ring slot of its symmetric region and tells the ranks
// that need it; each receiver copies the rows it needs straight from the sender's slot into recv_x
// with bulk copies, then releases the slot. Combine is a push: each expert rank copies the rows of
// an origin's chunk into a ring slot in the origin's region; the origin sums them in float32 and
// releases the slot. Within a block, the pulling (pushing) warps take the (chunk, peer) segments
// from a shared counter, and the flags of one peer go out in chunk order. Flags carry
// (call sequence << 32 | iteration + 1), so they are never reset.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/common/common_params.hpp"
#include "kernels/common/control.hpp"

namespace epcomm {

// Dispatch ring slot: [x rows: chunk * row_bytes][meta: chunk * meta_row_bytes]
// where a meta row is [scales: num_scales 4-byte words][topk idx: K i32][topk weights: K f32], padded to 16.
struct DispatchRing {
  size_t offset = 0;  // of slot (0, 0) inside the symmetric region
  size_t slot_bytes = 0;
  size_t meta_offset = 0;  // inside a slot
  int slots = 0;           // per block
  int meta_row_bytes = 0;

  EPCOMM_HD size_t slot(int block, int s) const {
    return offset + (static_cast<size_t>(block) * slots + s) * slot_bytes;
  }
};

struct NotifyParams {
  CommonParams common;
  int num_tokens = 0;
  int num_experts = 0;
  int chunk = 0;  // ring geometry (rows per slot), the same on every rank
  int cut = 0;    // this rank's tokens per chunk, <= chunk
  int num_blocks = 0;
  int expert_alignment = 1;
  int worst_tokens = 0;  // 1: num_worst_tokens given (checked alike across nodes only)
  int row_bytes = 0;     // x's row bytes, and (scale words << 8) | top-k: checked alike (NotifyHeader)
  int rows_words = 0;
  const uint8_t* is_token_in_rank = nullptr;       // [T, R]
  const int32_t* num_tokens_per_rank = nullptr;    // [R]
  const int32_t* num_tokens_per_expert = nullptr;  // [E]
  uint32_t* parity_counter = nullptr;              // device: notifies so far (selects the meta slot)
  // outputs
  int32_t* rank_prefix_matrix = nullptr;          // [R, R]
  int32_t* chunk_offset = nullptr;                // [R, stride]: first recv row of (source, chunk), then
                                                  // the end row, then (last column) the source's cut
  int32_t* num_recv_tokens_per_expert = nullptr;  // [E/R], aligned
  int chunk_offset_stride = 0;
  int32_t* invalid_topk = nullptr;  // device: first bad topk entry the layout saw, or -1
  int32_t* host_result = nullptr;   // mapped: see NotifyResult
  int32_t host_token = 0;           // written to kNotifyStatus (negated on failure)
};

// Layout of the mapped ints the notify kernel hands to the host.
enum NotifyResult : int {
  kNotifyStatus = 0,  // the call's token when done, minus it on failure
  kNotifyNumRecv = 1,
  kNotifyMaxChunks = 2,
  kNotifyInvalidTopk = 3,
  kNotifyExpertCounts = 4,  // [E/R]
};

struct DispatchParams {
  CommonParams common;
  DispatchRing ring;
  int num_blocks = 0;
  int chunk = 0;
  int max_chunks = 0;  // chunks of the rank with the most tokens (loop bound)
  int num_tokens = 0;  // T of this rank
  int row_bytes = 0;   // hidden * element size
  int num_scales = 0;  // FP8: scale words per token (x_scales' columns), else 0
  int num_topk = 0;    // 0: dispatch without topk
  int experts_per_rank = 0;
  int puller_warps = 0;
  int puller_stages = 0;
  int stager_piece_bytes = 0;
  bool cached = false;
  // inputs of this rank
  const uint8_t* x = nullptr;  // [T, hidden], rows contiguous
  // [T, num_scales] 4-byte words, any strides: float32 scales or int32 words (packed UE8M0
  // exponents), moved bit for bit.
  const uint32_t* x_scales = nullptr;
  int64_t scale_stride_token = 0, scale_stride_group = 0;  // in elements
  const int64_t* topk_idx = nullptr;                       // [T, K]
  const float* topk_weights = nullptr;                     // [T, K]
  const uint8_t* is_token_in_rank = nullptr;               // [T, R]
  // routing of what this rank receives
  const int32_t* chunk_offset = nullptr;  // [R, chunk_offset_stride]
  int chunk_offset_stride = 0;
  const uint32_t* parity_counter = nullptr;  // not cached: the meta slot the notify filled
  // outputs
  uint8_t* recv_x = nullptr;
  uint32_t* recv_scales = nullptr;     // [rows, num_scales] words, row-major
  int64_t* recv_topk_idx = nullptr;    // [rows, K]
  float* recv_topk_weights = nullptr;  // [rows, K]
  int32_t* recv_src_idx = nullptr;     // [rows]; input when cached
  int num_worst_tokens = 0;            // > 0: pad rows past num_recv
  int num_rows = 0;                    // rows the caller allocated (writes beyond are dropped)
};

// Combine ring slot: [R senders][chunk rows of hidden bf16] then [R senders][chunk][K] f32.
struct CombineRing {
  size_t offset = 0;
  size_t slot_bytes = 0;
  size_t weights_offset = 0;  // inside a slot
  int slots = 0;

  EPCOMM_HD size_t slot(int block, int s) const {
    return offset + (static_cast<size_t>(block) * slots + s) * slot_bytes;
  }
};

struct CombineParams {
  CommonParams common;
  CombineRing ring;
  int num_blocks = 0;
  int chunk = 0;
  int max_chunks = 0;
  int num_tokens = 0;  // T of this rank (origin side)
  int hidden = 0;
  int num_topk = 0;  // 0: no weights
  int pusher_warps = 0;
  int pusher_stages = 0;
  int piece_bytes = 0;
  int reducer_warps = 0;
  // expert side
  const uint16_t* x = nullptr;            // [num_recv, hidden] bf16
  const float* topk_weights = nullptr;    // [num_recv, K]
  const int32_t* chunk_offset = nullptr;  // [R, stride]
  int chunk_offset_stride = 0;
  // origin side
  const uint8_t* is_token_in_rank = nullptr;  // [T, R]
  const uint16_t* bias0 = nullptr;
  const uint16_t* bias1 = nullptr;
  uint16_t* out = nullptr;            // [T, hidden]
  float* out_topk_weights = nullptr;  // [T, K]
};

struct LayoutParams {
  const int64_t* topk_idx = nullptr;
  int num_tokens = 0;
  int num_topk = 0;
  int num_experts = 0;
  int num_ranks = 0;
  int ranks_per_node = 0;
  int32_t* num_tokens_per_rank = nullptr;
  int32_t* num_tokens_per_node = nullptr;  // may be null (one node)
  int32_t* num_tokens_per_expert = nullptr;
  uint8_t* is_token_in_rank = nullptr;
  int32_t* invalid_index = nullptr;  // device: first bad topk entry seen (flat index), or -1
};

// Host-side launchers (kernels/*/*.cu).
void launch_layout(const LayoutParams& p, void* stream);
void launch_notify_dispatch(const NotifyParams& p, void* stream);
void launch_dispatch(const DispatchParams& p, int smem_bytes, void* stream);
void launch_combine(const CombineParams& p, int smem_bytes, void* stream);
#ifdef __CUDACC__
// Tokens per chunk of rank i: the last column of its chunk_offset row (the notify kernel writes it).
__device__ __forceinline__ int cut_of(const int32_t* chunk_offset, int stride, int i) {
  return chunk_offset[static_cast<int64_t>(i) * stride + stride - 1];
}
#endif

int dispatch_shared_bytes(int puller_warps, int puller_stages, int row_bytes, int chunk, int meta_row_bytes,
                          int stager_piece_bytes);
int dispatch_max_puller_warps();
int dispatch_max_slots();
int combine_shared_bytes(int pusher_warps, int pusher_stages, int piece_bytes);
int combine_max_pusher_warps();
int combine_max_reducer_warps();
int combine_max_pusher_bufs();
int combine_max_slots();

}  // namespace epcomm
