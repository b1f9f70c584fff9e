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
