"""Low-latency mode of epcomm.Buffer: DeepEP's signatures, defaults and return tuples (SPEC.md 3.3
and 4), checked here; the C++ entry points are not in this build yet, so each call ends in
NotImplementedError. Wiring one: give epcomm._epcomm.Runtime the method, then replace the
``self._low_latency_missing(...)`` line with the allocation and call (the shapes are documented
on each method)."""

from typing import Tuple

from ._args import check_bool, check_int, check_tensor

_MISSING = "low-latency mode is not in this build yet (the C++ core has no low-latency entry points)"


def _missing(what: str):
    raise NotImplementedError(f"{what}: {_MISSING}")


class LowLatencyMixin:
    """The low-latency half of Buffer (decoding: fixed shapes, no host sync, hook mode)."""

    def _low_latency_missing(self, what: str):
        self._rt()  # a destroyed buffer says so first
        _missing(what)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """``num_rdma_bytes`` low-latency mode needs (BF16 sizing)."""
        check_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, lo=1)
        check_int("hidden", hidden, lo=1)
        check_int("num_ranks", num_ranks, lo=1)
        check_int("num_experts", num_experts, lo=1)
        _missing("get_low_latency_rdma_size_hint")

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Zeroes the low-latency signalling memory (needed after normal-mode use of the buffer)."""
        check_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, lo=1)
        check_int("hidden", hidden, lo=1)
        check_int("num_experts", num_experts, lo=1)
        self._low_latency_missing("clean_low_latency_buffer")

    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank: int, num_experts: int,
                             cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None,
                             use_fp8: bool = True, round_scale: bool = False, use_ue8m0: bool = False,
                             async_finish: bool = False, return_recv_hook: bool = False) -> Tuple:
        """Sends each token once per selected expert.

        Returns ``(recv_x, recv_count, handle, event, hook)``: ``recv_x`` is ``(x_e4m3 [E/R, R*Tmax,
        hidden], scales [E/R, R*Tmax, hidden/128] float32)`` (token dimension contiguous per expert;
        int32 ``[.., hidden/512]`` with ``use_ue8m0``) or ``[E/R, R*Tmax, hidden]`` BF16 without
        ``use_fp8``; ``recv_count [E/R] int32``; ``handle = (src_info [E/R, R*Tmax] int32,
        layout_range [E/R, R] int64, Tmax, hidden, E)``; ``hook`` receives when
        ``return_recv_hook``.
        """
        check_tensor("x", x, ndim=2)
        check_tensor("topk_idx", topk_idx, ndim=2)
        check_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, lo=1)
        check_int("num_experts", num_experts, lo=1)
        check_tensor("cumulative_local_expert_recv_stats", cumulative_local_expert_recv_stats, allow_none=True)
        check_tensor("dispatch_wait_recv_cost_stats", dispatch_wait_recv_cost_stats, allow_none=True)
        for name, value in (("use_fp8", use_fp8), ("round_scale", round_scale), ("use_ue8m0", use_ue8m0),
                            ("async_finish", async_finish), ("return_recv_hook", return_recv_hook)):
            check_bool(name, value)
        self._low_latency_missing("low_latency_dispatch")

    def low_latency_combine(self, x, topk_idx, topk_weights, handle: tuple, use_logfmt: bool = False,
                            zero_copy: bool = False, async_finish: bool = False, return_recv_hook: bool = False,
                            out=None, combine_wait_recv_cost_stats=None) -> Tuple:
        """Weighted sum of the experts' outputs back on each token's rank.

        ``x`` is ``[E/R, R*Tmax, hidden]`` BF16; returns ``(combined_x [T, hidden] bf16, event,
        hook)``; ``out`` receives the result in place when given.
        """
        check_tensor("x", x, ndim=3)
        check_tensor("topk_idx", topk_idx, ndim=2)
        check_tensor("topk_weights", topk_weights, ndim=2)
        check_tensor("out", out, ndim=2, allow_none=True)
        check_tensor("combine_wait_recv_cost_stats", combine_wait_recv_cost_stats, allow_none=True)
        for name, value in (("use_logfmt", use_logfmt), ("zero_copy", zero_copy), ("async_finish", async_finish),
                            ("return_recv_hook", return_recv_hook)):
            check_bool(name, value)
        self._low_latency_missing("low_latency_combine")

    def get_next_low_latency_combine_buffer(self, handle: object):
        """The ``[E/R, R*Tmax, hidden]`` BF16 buffer the next ``low_latency_combine(zero_copy=True)``
        reads."""
        self._low_latency_missing("get_next_low_latency_combine_buffer")

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Masks (``mask=True``) or unmasks a rank for later low-latency calls (shrink mode)."""
        check_int("rank_to_mask", rank_to_mask, lo=0)
        check_bool("mask", mask)
        self._low_latency_missing("low_latency_update_mask_buffer")

    def low_latency_query_mask_buffer(self, mask_status) -> None:
        """Writes 1 for masked ranks, 0 otherwise, into ``mask_status [R] int32``."""
        check_tensor("mask_status", mask_status, ndim=1)
        self._low_latency_missing("low_latency_query_mask_buffer")

    def low_latency_clean_mask_buffer(self) -> None:
        """Unmasks every rank."""
        self._low_latency_missing("low_latency_clean_mask_buffer")

