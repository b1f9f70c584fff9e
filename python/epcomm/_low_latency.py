"""Low-latency mode of epcomm.Buffer (docs/contract.md §3.3 and §4): DeepEP's signatures, defaults and return
tuples over epcomm's C++ low-latency entry points (``epcomm._epcomm.Runtime.low_latency_*``).

Decoding: no host synchronization, fixed shapes (every size follows from ``Tmax =
num_max_dispatch_tokens_per_rank``, ``hidden`` and ``num_experts``), CUDA-graph capturable. The
buffer's low-latency memory (``num_rdma_bytes``, at least ``get_low_latency_rdma_size_hint``) holds
two buffers; each dispatch takes the next one and records it in the handle (``handle[5]``), and its
combine uses the same one.

Streams, as in DeepEP: without ``async_finish`` the kernels run on the caller's current stream (the
same order as a hop through the communication stream, without its cost); with it they run on the
communication stream after it waited for the caller's, the call returns an EventOverlap, and every
tensor the call touched is ``record_stream``-ed there and held by the EventOverlap. With
``return_recv_hook`` the call launches only the send half on the caller's stream and returns
``hook``; ``hook()`` launches the receive half on that same stream (the one current at the send) and
returns None. No SM is held in between, so two micro-batches can overlap; the hook holds every
tensor of the call until it is dropped. ``async_finish`` and ``return_recv_hook`` exclude each
other, as in DeepEP.

Rules of use (all ranks make the same calls in the same order; docs/contract.md §3.3):
- The first low-latency call fixes ``(Tmax, hidden, num_experts)``; another shape needs
  ``clean_low_latency_buffer`` with the new one first on every rank (ValueError otherwise). It runs
  on the current stream without a host wait (capturable), as DeepEP's.
- Zeroing the low-latency region (``get_local_buffer_tensor(dtype, use_rdma_buffer=True).zero_()``,
  vLLM's fault-tolerance path) on every rank while no low-latency call is in flight leaves the
  buffer working: every flag there is compared with the current call's number, so zeros read as
  "not arrived yet". Other writes into the region need ``clean_low_latency_buffer``.
- A dispatch's combine must come before the dispatch after next (any decode step does); a CUDA graph
  of dispatches only must hold an even number of them.
- ``topk_idx`` entries outside ``[-1, num_experts)`` are treated as -1 on the device (checking them
  on the host would need a sync). A token that lists one expert twice sends two rows.

Shrink mode (``Buffer(..., enable_shrink=True)``): a low-latency wait on a rank that does not answer
within the timeout (``EPCOMM_TIMEOUT_MS``) masks that rank instead of failing the call. The call
completes with what the live ranks sent (dispatch: no rows from the masked rank; combine: its
experts contribute nothing), and later calls skip masked ranks: nothing is sent to them and nothing
is waited for. The mask is this rank's own view, on the GPU (CUDA graphs see it too):
``low_latency_query_mask_buffer`` reads it, ``low_latency_update_mask_buffer`` masks or unmasks one
rank, ``low_latency_clean_mask_buffer`` unmasks all (all on the current stream). A masked rank takes
part again only after ``clean_low_latency_buffer`` on every rank (which keeps the mask) and
``low_latency_clean_mask_buffer``. Without shrink mode a timeout raises ``epcomm.TimeoutError``.
"""

from typing import Tuple

from . import _epcomm
from ._alloc import empty
from ._args import ArgumentError, check_bool, check_int, check_low_latency_handle, check_tensor
from ._compat import torch
from .event import EventOverlap
from .handle import LowLatencyHandle

SCALE_GROUP = 128  # channels per FP8 scale


class RecvHook:
    """The ``hook`` of a low-latency call made with ``return_recv_hook=True``: calling it launches
    the receive half (once) on the stream the send half ran on, and returns None. Holds the call's
    tensors until it is dropped."""

    __slots__ = ("_call", "_tensors", "_what")

    def __init__(self, call, tensors: tuple, what: str) -> None:
        self._call, self._tensors, self._what = call, tensors, what

    def __call__(self) -> None:
        self._call.recv()

    def __repr__(self) -> str:
        state = "pending" if self._call.recv_pending else "received"
        return f"<epcomm {self._what} recv hook, {state}>"


def _fp8_dtype():
    dtype = getattr(torch, "float8_e4m3fn", None)
    if dtype is None:
        raise RuntimeError(f"use_fp8=True needs PyTorch with torch.float8_e4m3fn (2.1 or newer); this is "
                           f"{torch.__version__}")
    return dtype


def _current_stream(device) -> int:
    """cudaStream_t of the current stream of `device` (the fast accessor when torch has it: this is
    on the decode path, and torch.cuda.current_stream() builds a Stream object)."""
    if device.type == "cpu":  # tests of the Python layer over a host stand-in for the core
        return 0
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw(device.index)
    return torch.cuda.current_stream(device).cuda_stream


def _exclusive(async_finish: bool, return_recv_hook: bool) -> None:
    if async_finish and return_recv_hook:
        raise ArgumentError("async_finish, return_recv_hook: not both (as in DeepEP): a hook call's receive half "
                            "runs on the caller's stream when hook() is called, there is no event to return")


class LowLatencyMixin:
    """The low-latency half of Buffer (its state: ``_ll_shapes``, ``_ll_fast_dispatch``,
    ``_ll_fast_combine`` and ``_raw_stream``, set in Buffer.__init__)."""

    # The eager calls in one C call each (python/src/eager.cpp), where _torch_ops makes the outputs;
    # None (stand-in buffers of the CPU tests, no _torch_ops, after destroy()): the Python path.
    _ll_fast_dispatch = None
    _ll_fast_combine = None

    # ------------------------------------------------------------------ sizes and cleaning
    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """``num_rdma_bytes`` low-latency mode needs for this problem (both buffers, BF16 or FP8).
        DeepEP's signature has no node count, so with more than one rank it also covers the network
        path that ranks of other nodes take (a few percent more: its staging). At most DeepEP's hint
        for the same arguments with 32 or more experts and 2 or more per rank (a handful of experts
        can need up to ~1.5x DeepEP's there). Raises ValueError for a shape low-latency mode cannot
        run (hidden not a multiple of 128, num_experts not divisible by num_ranks, Tmax out of range)."""
        args = (check_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, lo=1),
                check_int("hidden", hidden, lo=1), check_int("num_ranks", num_ranks, lo=1),
                check_int("num_experts", num_experts, lo=1))
        inside = _epcomm.low_latency_size_hint(*args)
        return inside if args[2] == 1 else max(inside, _epcomm.low_latency_net_size_hint(*args))

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Zeroes the low-latency flags (the words calls wait on, not the rows) and call counters on
        every rank and fixes the shape ``(Tmax, hidden, num_experts)`` for later calls. Collective (every rank calls it at the same
        point), as DeepEP's: GPU work on the current stream (a barrier, the zeroing, a barrier;
        one kernel within a node), no host wait, so it may be captured in a CUDA graph; it comes after this
        buffer's earlier calls, an unfinished ``async_finish`` one included. Needed to change the
        shape, after writing other than zeros into the region through
        ``get_local_buffer_tensor(..., use_rdma_buffer=True)``, and to recover after a low-latency
        error (a timeout, or more than Tmax rows for one expert; then it first clears the recorded
        error, which waits for the buffer's communication stream)."""
        runtime = self._rt()
        tmax = check_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, lo=1)
        hidden = check_int("hidden", hidden, lo=1)
        num_experts = check_int("num_experts", num_experts, lo=1)
        runtime.clean_low_latency_buffer(tmax, hidden, num_experts, _current_stream(self._device))

    def _check_low_latency_shape(self, tmax: int, hidden: int, num_experts: int) -> None:
        # The core checks every call; this runs once per shape (the calls test the set first), before
        # the Python layer allocates tensors whose sizes follow from it (so a bad Tmax raises instead
        # of allocating).
        key = (tmax, hidden, num_experts)
        if key not in self._ll_shapes:
            _epcomm.low_latency_size_hint(tmax, hidden, self.group_size, num_experts)
            self._ll_shapes.add(key)

    # ------------------------------------------------------------------ dispatch / combine
    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank: int, num_experts: int,
                             cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None,
                             use_fp8: bool = True, round_scale: bool = False, use_ue8m0: bool = False,
                             async_finish: bool = False, return_recv_hook: bool = False) -> Tuple:
        """Delivers each token to every selected expert (DeepEP's low-latency dispatch). Over NVLink a
        token crosses once per destination rank and the receiver fills its experts' rows
        (``EPCOMM_LL_PER_RANK`` >= 1, the default; ``0`` sends it once per expert; same outputs).

        ``x`` is ``[T, hidden]`` BF16 (T <= Tmax, hidden a multiple of 128), ``topk_idx`` ``[T, K]``
        int64 (K <= 16). With ``use_fp8`` each token is cast per 128 channels on the GPU: ``scale =
        max(amax, 1e-4) / 448`` in float32 (rounded up to a power of two with ``round_scale``), ``q =
        e4m3(x / scale)`` (round to nearest even, saturating).

        Returns ``(recv_x, recv_count, handle, event, hook)``:

        - ``recv_x``: ``(x_e4m3 [E/R, R*Tmax, hidden], scales [E/R, R*Tmax, hidden/128] float32)``
          with ``use_fp8``, the scales transposed (storage ``[E/R, hidden/128, R*Tmax]``, so the token
          dimension is contiguous per expert: DeepEP's strides, though made by ``empty_strided``, not
          as a view); with ``use_ue8m0`` (needs ``round_scale``) the scales are the exponent bytes
          packed 4 per int32, ``[E/R, R*Tmax, ceil(hidden/512)]``, transposed the same way;
          ``[E/R, R*Tmax, hidden]`` BF16 without ``use_fp8``. Rows of local expert ``e`` past
          ``recv_count[e]`` are not written.
        - ``recv_count`` ``[E/R]`` int32: rows received per local expert.
        - ``handle``: ``(src_info [E/R, R*Tmax] int32 (source token index of each row), layout_range
          [E/R, R] int64 ((begin << 32) | count of the rows from each source rank), Tmax, hidden,
          num_experts, buffer_index)`` (epcomm/handle.py, LowLatencyHandle); rows from one source
          rank are contiguous, in no fixed order among themselves.
        - ``event``: an EventOverlap (holding an event only with ``async_finish``).
        - ``hook``: with ``return_recv_hook``, a callable that launches the receive half (the
          outputs are valid after it ran); else None.

        ``cumulative_local_expert_recv_stats`` (``[E/R]`` int32) gets ``+= recv_count``;
        ``dispatch_wait_recv_cost_stats`` (``[R]`` int64) gets the GPU clock cycles spent waiting
        for each source rank added.
        """
        fast = self._ll_fast_dispatch
        if fast is not None:
            # The decode path in one C call (python/src/eager.cpp): None where it does not take the
            # arguments as they come (async_finish, a hook, other types), and then the code below
            # judges them.
            r = fast(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, cumulative_local_expert_recv_stats,
                     dispatch_wait_recv_cost_stats, use_fp8, round_scale, use_ue8m0, async_finish, return_recv_hook)
            if r is not None:
                return r
        runtime = self._rt()
        x = check_tensor("x", x, ndim=2)
        topk_idx = check_tensor("topk_idx", topk_idx, ndim=2)
        tmax = check_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, lo=1)
        num_experts = check_int("num_experts", num_experts, lo=1)
        cum_stats = check_tensor("cumulative_local_expert_recv_stats", cumulative_local_expert_recv_stats,
                                 ndim=1, allow_none=True)
        wait_stats = check_tensor("dispatch_wait_recv_cost_stats", dispatch_wait_recv_cost_stats, ndim=1,
                                  allow_none=True)
        use_fp8 = check_bool("use_fp8", use_fp8)
        round_scale = check_bool("round_scale", round_scale)
        use_ue8m0 = check_bool("use_ue8m0", use_ue8m0)
        async_finish = check_bool("async_finish", async_finish)
        return_recv_hook = check_bool("return_recv_hook", return_recv_hook)
        _exclusive(async_finish, return_recv_hook)
        hidden = x.size(1)
        if (tmax, hidden, num_experts) not in self._ll_shapes:
            self._check_low_latency_shape(tmax, hidden, num_experts)

        R, dev = self.group_size, self._device
        EL, RT = num_experts // R, R * tmax
        stream = _current_stream(dev)
        if use_fp8:
            # scales: [E/R, RT, S] over storage [E/R, S, RT] (tokens contiguous per expert), DeepEP's
            # strides (its empty((EL, S, RT)).transpose(1, 2)) made in one allocation.
            words = (hidden // SCALE_GROUP + 3) // 4 if use_ue8m0 else hidden // SCALE_GROUP
            x_spec = (_fp8_dtype(), (EL, RT, hidden))
            scale_spec = (torch.int32 if use_ue8m0 else torch.float32, (EL, RT, words), (words * RT, 1, RT))
        else:
            x_spec, scale_spec = (torch.bfloat16, (EL, RT, hidden)), None
        # Two allocations (epcomm/_alloc.py): the rows with their scales, and the counts with the
        # handle's tensors, each group held together by its user (the experts; the handle). One
        # for all five would save one allocator call (~2.7 us, run 83) but keep the rows as long
        # as the handle (up to the combine): more peak memory in a serving process.
        recv_x, scales = empty(dev, (x_spec, scale_spec), shared=True)
        recv_count, src_info, layout_range = empty(dev, ((torch.int32, (EL,)), (torch.int32, (EL, RT)),
                                                         (torch.int64, (EL, R))), shared=True)
        call = runtime.low_latency_dispatch(
            x, topk_idx, tmax, num_experts, cum_stats, wait_stats, use_fp8, round_scale, use_ue8m0,
            recv_x.data_ptr(), None if scales is None else scales.data_ptr(), recv_count.data_ptr(),
            src_info.data_ptr(), layout_range.data_ptr(), stream, async_finish, return_recv_hook)
        handle = LowLatencyHandle(src_info, layout_range, tmax, hidden, num_experts, call.buffer_index)
        if not (async_finish or return_recv_hook):  # the decode path: nothing to hold, no event
            return (recv_x, scales) if use_fp8 else recv_x, recv_count, handle, EventOverlap(), None
        inputs = (x, topk_idx, cum_stats, wait_stats)
        outputs = (recv_x, scales, recv_count, src_info, layout_range)
        overlap = self._finish(call.event, async_finish, False, None, inputs, outputs)
        hook = RecvHook(call, inputs + outputs, "low_latency_dispatch") if return_recv_hook else None
        return (recv_x, scales) if use_fp8 else recv_x, recv_count, handle, overlap, hook

    def low_latency_combine(self, x, topk_idx, topk_weights, handle: tuple, use_logfmt: bool = False,
                            zero_copy: bool = False, async_finish: bool = False, return_recv_hook: bool = False,
                            out=None, combine_wait_recv_cost_stats=None) -> Tuple:
        """Weighted sum of the experts' outputs back on each token's rank (DeepEP's low-latency
        combine).

        ``x`` is ``[E/R, R*Tmax, hidden]`` BF16, rows as the dispatch of ``handle`` returned them;
        ``topk_idx`` and ``topk_weights`` (``[T, K]`` float32) are that dispatch's. Returns
        ``(combined_x [T, hidden] bf16, event, hook)``: ``combined_x[t] = sum over k with
        topk_idx[t, k] >= 0 of topk_weights[t, k] * x[row of (t, expert k)]``, in float32 in k
        order, rounded once (a token sent nowhere gets zeros). By default (``EPCOMM_LL_PER_RANK=4``)
        each expert rank first sums its rows of a token in float32, so the sum's order differs from
        k order (float32 rounding only); ``1`` keeps k order bit for bit; ``3`` and ``2`` send
        narrower partials (docs/design-low-latency.md). ``out`` (``[T, hidden]`` BF16) receives
        the result in place and is returned. With ``zero_copy`` the caller already wrote the
        expert outputs into ``get_next_low_latency_combine_buffer(handle)``; ``x`` is then only
        checked for its shape (it may be that buffer). ``use_logfmt`` is accepted and ignored:
        epcomm always sends BF16 (exact). ``combine_wait_recv_cost_stats`` (``[R]`` int64) gets the
        GPU clock cycles spent waiting for each rank added. ``event`` and ``hook`` as in
        ``low_latency_dispatch``.
        """
        fast = self._ll_fast_combine
        if fast is not None:
            r = fast(x, topk_idx, topk_weights, handle, use_logfmt, zero_copy, async_finish, return_recv_hook, out,
                     combine_wait_recv_cost_stats)
            if r is not None:
                return r
        runtime = self._rt()
        x = check_tensor("x", x, ndim=3)
        topk_idx = check_tensor("topk_idx", topk_idx, ndim=2)
        topk_weights = check_tensor("topk_weights", topk_weights, ndim=2)
        h = check_low_latency_handle(handle)
        use_logfmt = check_bool("use_logfmt", use_logfmt)
        zero_copy = check_bool("zero_copy", zero_copy)
        async_finish = check_bool("async_finish", async_finish)
        return_recv_hook = check_bool("return_recv_hook", return_recv_hook)
        out = check_tensor("out", out, ndim=2, allow_none=True)
        wait_stats = check_tensor("combine_wait_recv_cost_stats", combine_wait_recv_cost_stats, ndim=1,
                                  allow_none=True)
        _exclusive(async_finish, return_recv_hook)
        src_info, layout_range, tmax, hidden, num_experts, buffer_index = h
        if (tmax, hidden, num_experts) not in self._ll_shapes:
            self._check_low_latency_shape(tmax, hidden, num_experts)

        stream = _current_stream(self._device)
        combined_x = out if out is not None else empty(self._device, ((torch.bfloat16, (topk_idx.size(0), hidden)),))[0]
        call = runtime.low_latency_combine(
            x, topk_idx, topk_weights, src_info, layout_range, tmax, hidden, num_experts, buffer_index,
            out if out is not None else combined_x.data_ptr(), wait_stats, use_logfmt, zero_copy, stream, async_finish,
            return_recv_hook)
        if not (async_finish or return_recv_hook):  # the decode path: nothing to hold, no event
            return combined_x, EventOverlap(), None
        inputs = (x, topk_idx, topk_weights, src_info, layout_range, wait_stats)
        overlap = self._finish(call.event, async_finish, False, None, inputs, (combined_x,))
        hook = RecvHook(call, inputs + (combined_x,), "low_latency_combine") if return_recv_hook else None
        return combined_x, overlap, hook

    def get_next_low_latency_combine_buffer(self, handle: object):
        """The ``[E/R, R*Tmax, hidden]`` BF16 buffer a ``low_latency_combine(..., zero_copy=True)``
        of ``handle`` reads: write the expert outputs there (rows as the dispatch returned them)
        once that dispatch's receive half ran, then combine with ``zero_copy=True``. A view of this
        rank's low-latency memory (the dispatch's receive area): it keeps the Buffer object alive,
        and later dispatches into the same buffer overwrite it. After ``destroy()`` it must not be
        used."""
        runtime = self._rt()
        h = check_low_latency_handle(handle)
        ptr, nbytes, shape = runtime.next_combine_buffer(h.src_info, h.layout_range, h.num_max_dispatch_tokens_per_rank,
                                                         h.hidden, h.num_experts, h.buffer_index)
        return self._wrap_memory(ptr, nbytes).view(torch.bfloat16).view(shape)

    # ------------------------------------------------------------------ shrink mode
    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Masks (``mask=True``) or unmasks ``rank_to_mask`` in this rank's view, on the current
        stream: low-latency calls after it skip a masked rank (send nothing to it, wait for nothing
        from it). Masking needs ``enable_shrink=True`` and another rank than this one (ValueError
        otherwise); unmasking is always accepted. ``rank_to_mask`` must be in ``[0, R)``."""
        runtime = self._rt()
        rank_to_mask = check_int("rank_to_mask", rank_to_mask, lo=0)
        if rank_to_mask >= self.group_size:
            raise ArgumentError(f"rank_to_mask = {rank_to_mask} must be in [0, {self.group_size})")
        mask = check_bool("mask", mask)
        runtime.low_latency_update_mask_buffer(rank_to_mask, mask, _current_stream(self._device))

    def low_latency_query_mask_buffer(self, mask_status) -> None:
        """Writes this rank's mask into ``mask_status`` (``[R]`` int32 on this buffer's GPU), on the
        current stream: 1 for a masked rank (by a timed-out wait in shrink mode, or by
        ``low_latency_update_mask_buffer``), 0 otherwise."""
        runtime = self._rt()
        mask_status = check_tensor("mask_status", mask_status, ndim=1)
        runtime.low_latency_query_mask_buffer(mask_status, _current_stream(self._device))

    def low_latency_clean_mask_buffer(self) -> None:
        """Unmasks every rank in this rank's view, on the current stream. A rank that was masked
        because it stopped answering also needs ``clean_low_latency_buffer`` on every rank before it
        takes part again (its call counters are behind)."""
        self._rt().low_latency_clean_mask_buffer(_current_stream(self._device))

    # ------------------------------------------------------------------ raw memory
    def _wrap_memory(self, ptr: int, nbytes: int):
        """A ``[nbytes]`` uint8 tensor over epcomm's memory at ``ptr`` on this buffer's device,
        keeping this Buffer object alive while any view of it lives (DLPack, no copy)."""
        if nbytes == 0:
            return torch.empty((0,), dtype=torch.uint8, device=self._device)
        from torch.utils.dlpack import from_dlpack

        device = -1 if self._device.type == "cpu" else self._device.index  # cpu: for tests without a GPU
        return from_dlpack(_epcomm.wrap_memory(ptr, nbytes, device, self))
