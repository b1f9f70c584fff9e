"""The handle a normal-mode dispatch returns, for combine and cached dispatch to reuse.

A plain tuple to code that only passes it along (as DeepEP's is); named fields for code that looks
inside. ``handle[0]`` is ``rank_prefix_matrix`` as in DeepEP; the other items are epcomm's own.
"""

from typing import Any, NamedTuple


class HandleMeta(NamedTuple):
    """Host-side facts about a dispatch (plain ints, so a handle costs no device sync to reuse)."""

    num_recv_tokens: int  # rows that arrived; -1 with num_worst_tokens (only the device knows)
    num_rows: int  # rows of the receive tensors (= num_worst_tokens when that was given)
    max_chunks: int  # chunks the routing was cut into (loop bound of the kernels)
    chunk: int  # tokens per chunk
    num_tokens: int  # T of this rank as a sender (rows of combine's output)
    num_experts: int


class DispatchHandle(NamedTuple):
    """``(rank_prefix_matrix, chunk_offset, recv_src_idx, is_token_in_rank, meta)``."""

    rank_prefix_matrix: Any  # [R, R] int32: [i][j] = tokens ranks 0..i send to rank j
    chunk_offset: Any  # [R, chunk_offset_stride] int32: first receive row of each (source, chunk)
    recv_src_idx: Any  # [num_rows] int32: source token index of each received row
    is_token_in_rank: Any  # [T, R] bool: this rank's tokens -> destination ranks (from the layout)
    meta: HandleMeta


class LowLatencyHandle(NamedTuple):
    """What ``low_latency_dispatch`` returns for its combine: DeepEP's ``(src_info, layout_range,
    num_max_dispatch_tokens_per_rank, hidden, num_experts)`` plus ``buffer_index``, the one of the
    two low-latency buffers the dispatch used (its combine and
    ``get_next_low_latency_combine_buffer`` use the same one). A plain tuple to code that passes
    it along."""

    src_info: Any  # [E/R, R*Tmax] int32: source token index of each received row
    layout_range: Any  # [E/R, R] int64: (begin << 32) | count of the rows from each source rank
    num_max_dispatch_tokens_per_rank: int  # Tmax
    hidden: int
    num_experts: int
    buffer_index: int  # 0 or 1
