"""epcomm.Buffer: DeepEP's legacy ``deep_ep.Buffer`` API over epcomm's C++ core.

Code written for DeepEP 1.x runs unchanged after ``import epcomm as deep_ep``: same methods,
argument names, order and defaults, same return tuples, dtypes and shapes (docs/contract.md §4).
What differs is inside: one NCCL communicator (its unique id travels through the caller's process
group), epcomm's own handle layout (see epcomm/handle.py), and arguments that mean nothing here,
which are accepted and documented as such.

Streams and lifetimes follow PyTorch rules. Every call runs on the buffer's communication stream
after that stream waits for the caller's current stream (or ``previous_event``). Without
``async_finish`` the caller's stream then waits for the communication stream; with it, the call
returns an EventOverlap and every tensor the call touched is ``record_stream``-ed on the
communication stream (and held by the EventOverlap), so freeing it early is safe. With
``allocate_on_comm_stream`` the outputs come from the communication stream's memory pool and are
``record_stream``-ed on the caller's stream (dispatch's receive tensors are allocated before its
count exchange, on the same stream; ``dispatch`` says how they are sized). The low-latency calls
(``_low_latency.py``) run on the caller's stream unless ``async_finish``; their module docstring
has their rules.
"""

import collections
import functools
import warnings
from typing import Callable, Optional

from . import _epcomm
from ._alloc import empty, empty_grouped, first_rows
from ._args import (INT64_MAX, ArgumentError, check_bool, check_config, check_handle, check_int, check_tensor,
                    event_of, split_x, unpack_bias)
from ._compat import require_torch, torch
from ._low_latency import LowLatencyMixin, _current_stream
from .event import EventHandle, EventOverlap
from .handle import DispatchHandle, HandleMeta, LowLatencyHandle

Config = _epcomm.Config


def _default_num_sms() -> int:
    # EPCOMM_NUM_SMS (read by the core's default config) sets the starting value; 24 otherwise.
    try:
        return Config.dispatch_default(1).num_sms
    except ValueError as e:
        warnings.warn(f"epcomm: {e}; Buffer.num_sms starts at 24")
        return 24


class Buffer(LowLatencyMixin):
    """The communication buffer of one rank (one process, one GPU) of an expert-parallel group.

    Arguments:
        group: the ``torch.distributed`` ProcessGroup of the EP ranks (any backend). It carries the
            NCCL unique id at construction; epcomm then talks through its own NCCL communicator.
        num_nvl_bytes: NVLink ring memory for normal mode; ``Config.get_nvl_buffer_size_hint``.
        num_rdma_bytes: low-latency memory (both buffers): at least
            ``Buffer.get_low_latency_rdma_size_hint(Tmax, hidden, num_ranks, num_experts)``.
        low_latency_mode: DeepEP's switch for low-latency mode; recorded and passed to the core,
            which runs the low-latency calls whenever ``num_rdma_bytes`` is large enough. Across
            nodes it decides the memory: True holds ``num_rdma_bytes`` once, shared with normal-mode
            calls (call ``clean_low_latency_buffer`` before low-latency calls that follow normal-mode
            ones, as with DeepEP); False gives normal mode a region of its own (twice the bytes).
        num_qps_per_rank, allow_nvlink_for_low_latency_mode, allow_mnnvl, use_fabric: accepted and
            ignored; they tune NVSHMEM/IBGDA, which epcomm does not use (NCCL GIN and LSA instead).
        explicitly_destroy: if True, resources are freed by ``destroy()`` only; otherwise when the
            buffer is garbage-collected.
        enable_shrink: low-latency shrink mode: a rank that does not answer within the timeout
            (``EPCOMM_TIMEOUT_MS``) is masked instead of failing the call, and later calls skip it
            (see ``low_latency_update_mask_buffer`` and the module docstring of ``_low_latency``).
        comm: an mpi4py communicator to use instead of ``group`` for the unique-id exchange.

    The current CUDA device (``torch.cuda.current_device()``) is the buffer's device.
    """

    num_sms: int = _default_num_sms()
    # Allocate normal-mode receive tensors before the count exchange (see ``dispatch``); False: after
    # it, with storage of exactly the rows received (the GPU then waits for the allocation).
    reserve_recv_rows: bool = True
    RESERVE_WINDOW = 8  # dispatches whose row counts size the reservation

    def __init__(self, group, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_qps_per_rank: int = 24, allow_nvlink_for_low_latency_mode: bool = True,
                 allow_mnnvl: bool = False, use_fabric: bool = False, explicitly_destroy: bool = False,
                 enable_shrink: bool = False, comm=None) -> None:
        self.runtime = None  # so that a failed construction leaves a destroyed-looking object
        torch_ = require_torch("epcomm.Buffer")
        self.num_nvl_bytes = check_int("num_nvl_bytes", num_nvl_bytes, lo=0, hi=INT64_MAX)
        self.num_rdma_bytes = check_int("num_rdma_bytes", num_rdma_bytes, lo=0, hi=INT64_MAX)
        self.low_latency_mode = check_bool("low_latency_mode", low_latency_mode)
        check_int("num_qps_per_rank", num_qps_per_rank, lo=0)
        check_bool("allow_nvlink_for_low_latency_mode", allow_nvlink_for_low_latency_mode)
        check_bool("allow_mnnvl", allow_mnnvl)
        check_bool("use_fabric", use_fabric)
        self.explicitly_destroy = check_bool("explicitly_destroy", explicitly_destroy)
        self.enable_shrink = check_bool("enable_shrink", enable_shrink)

        if group is not None:
            self.rank, self.group_size, self.group = group.rank(), group.size(), group

            def all_gather_object(obj):
                objects = [None] * self.group_size
                torch_.distributed.all_gather_object(objects, obj, group)
                return objects
        elif comm is not None:
            self.rank, self.group_size, self.group = comm.Get_rank(), comm.Get_size(), comm
            all_gather_object = comm.allgather
        else:
            raise ArgumentError("group: a torch.distributed ProcessGroup is required (or an mpi4py 'comm')")

        # Checked on every rank before any collective, so no rank is left waiting for another.
        if not torch_.cuda.is_available():
            raise RuntimeError("epcomm.Buffer: no CUDA GPU is available to this process "
                               "(torch.cuda.is_available() is False); epcomm runs on Hopper (sm_90) GPUs")
        device = torch_.cuda.current_device()

        # Rank 0 makes the NCCL unique id; a failure travels as text so every rank raises.
        payload = None
        if self.rank == 0:
            try:
                payload = _epcomm.get_unique_id()
            except Exception as e:  # noqa: BLE001 -- forwarded to every rank below
                payload = f"{type(e).__name__}: {e}"
        unique_id = all_gather_object(payload)[0]
        if not isinstance(unique_id, bytes):
            raise RuntimeError(f"epcomm.Buffer: rank 0 could not make the NCCL unique id ({unique_id})")
        self._device = torch_.device("cuda", device)
        # The communication stream comes from PyTorch's stream pool, which is never destroyed (as
        # DeepEP's): tensors of async calls are record_stream-ed on it, and the caching allocator
        # records an event on that stream whenever it frees one of them, which may be after this
        # buffer is gone (at interpreter exit, or after destroy()). A stream the core made and
        # destroyed with the buffer aborted such processes at exit ("context is destroyed").
        self._comm_stream = torch_.cuda.Stream(device=self._device)
        self.runtime = _epcomm.Runtime(unique_id, self.group_size, self.rank, device, self.num_nvl_bytes,
                                       self.num_rdma_bytes, self.low_latency_mode,
                                       enable_shrink=self.enable_shrink,
                                       comm_stream=self._comm_stream.cuda_stream)
        self._num_nodes = self.runtime.num_nodes
        # A dispatch receives at most this many rows: num_worst_tokens beyond it is refused before
        # anything is allocated.
        self._max_recv_rows = self.group_size * self.runtime.max_tokens_per_rank
        self._chunk_offset_strides = {}  # nvl_chunk_size -> columns of handle.chunk_offset
        self._default_configs = {}  # (kind, num_sms) -> Config, never handed out (users may mutate theirs)
        self._ll_shapes = set()  # (Tmax, hidden, num_experts) already checked (_low_latency.py)
        # cudaStream_t of the device's current stream (torch's own accessor where it has one), bound
        # to the device, not to this object: the fast calls below hold it, and a bound method would
        # make a reference cycle through them (the buffer then freed only by the collector).
        raw_stream = getattr(getattr(torch_, "_C", None), "_cuda_getCurrentRawStream", None)
        self._raw_stream = functools.partial(raw_stream, device) if raw_stream is not None else \
            functools.partial(_current_stream, self._device)
        if _epcomm._tensor_allocator_set():
            # The eager calls as C functions bound to this runtime: the call's whole result, or None
            # for anything they do not take as it comes (then the Python path below them runs).
            fast = _epcomm._low_latency_fast_calls(self.runtime, LowLatencyHandle, EventOverlap, self._raw_stream)
            if fast is not None:  # None: a stand-in runtime (CPU tests)
                self._ll_fast_dispatch, self._ll_fast_combine = fast
        self._recent_rows = collections.deque(maxlen=Buffer.RESERVE_WINDOW)  # rows of recent dispatches

    # ------------------------------------------------------------------ lifetime and statics
    def destroy(self) -> None:
        """Frees the communicator and memory now (collective). Needs ``explicitly_destroy=True``."""
        if not self.explicitly_destroy:
            raise RuntimeError("destroy(): this Buffer was made with explicitly_destroy=False; "
                               "its resources are released when it is garbage-collected")
        runtime = self._rt()
        self.runtime = None
        self._ll_fast_dispatch = self._ll_fast_combine = None  # they hold the runtime
        runtime.destroy()

    def reset(self) -> None:
        """Brings the buffer back after a failed call (a GPU timeout, or its call numbers used up
        after 2^32 - 256 calls of one kind), collectively: every rank calls it at the same point.
        Waits for this buffer's work, clears its flags and call counters (low-latency ones too) and
        meets the other ranks. An epcomm extension (DeepEP has no such call)."""
        self._rt().reset()

    @staticmethod
    def is_sm90_compiled() -> bool:
        return _epcomm.is_sm90_compiled()

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Sets the SMs the default configs use (any positive count; DeepEP's evenness rule does
        not apply to epcomm's kernels)."""
        Buffer.num_sms = check_int("new_num_sms", new_num_sms, lo=1)

    @staticmethod
    def capture() -> EventOverlap:
        """An event recorded on the current stream, to pass as ``previous_event``."""
        return EventOverlap(EventHandle())

    @staticmethod
    def get_internode_rdma_size_hint(num_max_tokens_per_rank: int, hidden: int, num_ranks: int, ranks_per_node: int,
                                     num_topk: int = 8) -> int:
        """(epcomm extension) ``num_rdma_bytes`` normal mode needs across nodes when a rank dispatches
        up to ``num_max_tokens_per_rank`` tokens of ``hidden`` channels (BF16 or FP8) with up to
        ``num_topk`` experts each, in one round; set ``EPCOMM_MAX_TOKENS_PER_RANK`` to the same token
        count before making the Buffer. A smaller region works in rounds of a window of tokens per node
        (slower, the same results), e.g. ``Config.get_rdma_buffer_size_hint`` (DeepEP's, far below this)."""
        return _epcomm.internode_size_hint(check_int("num_max_tokens_per_rank", num_max_tokens_per_rank, lo=1),
                                           check_int("hidden", hidden, lo=1), check_int("num_ranks", num_ranks, lo=1),
                                           check_int("ranks_per_node", ranks_per_node, lo=1),
                                           check_int("num_topk", num_topk, lo=1, hi=16))

    @staticmethod
    def get_internode_windows(num_rdma_bytes: int, hidden: int, num_ranks: int, ranks_per_node: int,
                              num_topk: int = 8, num_max_tokens_per_rank: int = 65536) -> tuple:
        """(epcomm extension) ``(dispatch, combine)``: the tokens per node one round of normal mode across
        nodes moves when the Buffer has ``num_rdma_bytes`` (BF16 rows of ``hidden``, up to ``num_topk``
        experts per token, the Buffer's token limit ``num_max_tokens_per_rank``, i.e.
        ``EPCOMM_MAX_TOKENS_PER_RANK``). A call of T tokens per rank runs ``ceil(T / window)`` rounds;
        0 means the region holds not one round (such calls are refused, naming the size)."""
        return _epcomm.internode_windows(check_int("num_rdma_bytes", num_rdma_bytes, lo=0, hi=INT64_MAX),
                                         check_int("num_max_tokens_per_rank", num_max_tokens_per_rank, lo=1),
                                         check_int("hidden", hidden, lo=1), check_int("num_ranks", num_ranks, lo=1),
                                         check_int("ranks_per_node", ranks_per_node, lo=1),
                                         check_int("num_topk", num_topk, lo=1, hi=16))

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """epcomm's default dispatch config (a rule, not a per-rank-count table) with
        ``Buffer.num_sms`` SMs."""
        config = Config.dispatch_default(check_int("num_ranks", num_ranks, lo=1))
        config.num_sms = Buffer.num_sms
        return config

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        config = Config.combine_default(check_int("num_ranks", num_ranks, lo=1))
        config.num_sms = Buffer.num_sms
        return config

    def get_comm_stream(self):
        """The communication stream, as a ``torch.cuda.Stream`` (an ExternalStream)."""
        self._rt()
        return self._comm_stream

    def get_local_buffer_tensor(self, dtype, size=None, offset: int = 0, use_rdma_buffer: bool = False):
        """This rank's part of the buffer's symmetric memory as a ``dtype`` tensor (no copy): the
        normal-mode region (``num_nvl_bytes``), or the low-latency region (``num_rdma_bytes``) with
        ``use_rdma_buffer``, starting ``offset`` bytes in (a multiple of the element size). 1-D
        over the rest of the region, or the first ``prod(size)`` elements viewed as ``size``.
        Epcomm's calls overwrite this memory, and writing it while a call is in flight corrupts
        that call. Zeroing the low-latency region on every rank between calls is harmless (vLLM
        does it to recover from a fault); after writing anything else there,
        ``clean_low_latency_buffer`` before the next low-latency call. The tensor keeps this Buffer
        object alive; after ``destroy()`` it must not be used."""
        runtime = self._rt()
        offset = check_int("offset", offset, lo=0, hi=INT64_MAX)
        use_rdma_buffer = check_bool("use_rdma_buffer", use_rdma_buffer)
        if not isinstance(dtype, torch.dtype):
            raise ArgumentError(f"dtype: expected a torch.dtype, got {type(dtype).__name__} {dtype!r}")
        element = torch.empty((), dtype=dtype).element_size()
        ptr, nbytes = runtime.local_buffer(use_rdma_buffer)
        region = "num_rdma_bytes" if use_rdma_buffer else "num_nvl_bytes"
        if offset > nbytes or offset % element:
            raise ArgumentError(f"offset = {offset} must be a multiple of {element} (the size of {dtype}) and at most "
                                f"the {nbytes} bytes of the region ({region})")
        numel = (nbytes - offset) // element
        tensor = self._wrap_memory(ptr + offset, numel * element).view(dtype)
        if size is None:
            return tensor
        size = torch.Size([size] if isinstance(size, int) else size)
        if size.numel() > numel:
            raise ArgumentError(f"size = {list(size)}: {size.numel()} elements of {dtype} do not fit in the "
                                f"{nbytes - offset} bytes past offset {offset} ({region} = {nbytes})")
        return tensor[:size.numel()].view(size)

    # ------------------------------------------------------------------ helpers
    def _rt(self):
        runtime = self.runtime
        if runtime is None:
            raise RuntimeError("epcomm.Buffer: this buffer was destroyed (destroy() was called)")
        return runtime

    def _default_config(self, kind: str) -> Config:
        key = (kind, Buffer.num_sms)
        config = self._default_configs.get(key)
        if config is None:
            make = Buffer.get_dispatch_config if kind == "dispatch" else Buffer.get_combine_config
            config = self._default_configs[key] = make(self.group_size)
        return config

    def _chunk_offset_stride(self, runtime, config: Config) -> int:
        stride = self._chunk_offset_strides.get(config.nvl_chunk_size)
        if stride is None:
            stride = self._chunk_offset_strides[config.nvl_chunk_size] = runtime.chunk_offset_stride(config)
        return stride

    def _allocate(self, on_comm_stream: bool, make: Callable[[], tuple]) -> tuple:
        if not on_comm_stream:
            return make()
        with torch.cuda.stream(self._comm_stream):
            return make()

    def _finish(self, event, async_finish: bool, on_comm_stream: bool, compute_stream, inputs: tuple,
                outputs: tuple) -> EventOverlap:
        """Applies the lifetime rules of the module docstring and wraps the event. ``compute_stream``
        (the caller's current stream) is only needed with ``on_comm_stream``; None looks it up. With
        neither flag it only returns ``EventOverlap()``, and the calls return that without calling it."""
        if on_comm_stream:
            if compute_stream is None:
                compute_stream = torch.cuda.current_stream(self._device)
            for t in outputs:
                if t is not None:
                    t.record_stream(compute_stream)
        if not async_finish or event is None:
            return EventOverlap()
        touched = tuple(t for t in inputs + outputs if t is not None)
        for t in touched:
            t.record_stream(self._comm_stream)
        return EventOverlap(EventHandle(event), touched)

    # ------------------------------------------------------------------ layout
    def get_dispatch_layout(self, topk_idx, num_experts: int, previous_event: Optional[EventOverlap] = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Counts for a dispatch, on the GPU, no host sync.

        Returns ``(num_tokens_per_rank [R] int32, num_tokens_per_rdma_rank [nodes] int32 or None with
        one node, num_tokens_per_expert [E] int32, is_token_in_rank [T, R] bool, event)``.
        """
        runtime = self._rt()
        topk_idx = check_tensor("topk_idx", topk_idx, ndim=2)
        num_experts = check_int("num_experts", num_experts, lo=1)
        async_finish = check_bool("async_finish", async_finish)
        on_comm = check_bool("allocate_on_comm_stream", allocate_on_comm_stream)
        prev = event_of(previous_event)
        stream = _current_stream(self._device)
        R, T, dev, i32 = self.group_size, topk_idx.size(0), self._device, torch.int32
        # One allocation for the four (small, made and consumed together: one allocator call).
        outputs = self._allocate(on_comm, lambda: empty(dev, (
            (i32, (R,)), (i32, (self._num_nodes,)) if self._num_nodes > 1 else None, (i32, (num_experts,)),
            (torch.bool, (T, R))), shared=True))
        event = runtime.get_dispatch_layout(topk_idx, num_experts, *outputs, stream, prev, async_finish)
        overlap = (self._finish(event, async_finish, on_comm, None, (topk_idx,), outputs)
                   if async_finish or on_comm else EventOverlap())
        return (*outputs, overlap)

    # ------------------------------------------------------------------ normal mode
    def dispatch(self, x, handle: Optional[tuple] = None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config: Optional[Config] = None,
                 previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False):
        """Sends each token once to every rank that holds one of its experts.

        ``x`` is ``[T, hidden]`` BF16, or the FP8 pair ``(x_e4m3 [T, hidden], scales)``, the scales
        in any of DeepEP's forms, any strides: ``[T, ceil(hidden/128)]`` float32, float32 of another
        group count, or int32 words (UE8M0 exponents packed four per word, column-major as DeepGEMM
        takes them): ``[T, S]`` with 1 <= S <= 512, moved bit for bit. Without ``handle`` it needs
        the layout tensors; with ``handle`` (cached dispatch) it reuses that routing and takes
        neither topk argument.

        Returns ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list,
        handle, event)``: ``recv_x`` as ``x`` (for FP8 a tuple with the scales as DeepEP returns
        them: ``[rows, S]`` row-major, the dtype of the input scales), rows from source
        rank 0 first then 1, ..., ascending token index within a source; ``recv_topk_idx`` [rows, K]
        int64 with local expert ids (-1 for experts elsewhere); ``recv_topk_weights`` [rows, K]
        float32, 0 where the id is -1; the list of received tokens per local expert rounded up to
        ``expert_alignment`` (empty with ``num_worst_tokens``); ``handle`` (epcomm/handle.py,
        ``handle[0]`` is the rank prefix matrix). Cached: ``(recv_x, None, None, None, None, event)``.

        ``num_worst_tokens > 0`` allocates that many rows and never waits for the host (CUDA-graph
        capturable); unused rows have ``recv_topk_idx = -1``. ``num_tokens_per_rdma_rank`` is
        accepted and unused (the core derives the per-node routing from ``is_token_in_rank``).

        Receive memory: without ``num_worst_tokens`` the row count is known only after the count
        exchange, and the GPU would wait while the host allocated the receive tensors. So the
        buffer allocates them before the exchange, sized for the most rows one of its last 8
        dispatches received (+1/32, rounded up to 128 rows), and returns tensors of exactly the
        received rows over that storage (ordinary tensors, not views; ``untyped_storage()`` shows
        the reserved size, and the storage goes with the last tensor using it). A dispatch that
        receives more rows allocates after the exchange instead. ``Buffer.reserve_recv_rows =
        False`` turns this off (storage of exactly the received rows, a slower dispatch).
        """
        return self._dispatch(x, handle, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx,
                              topk_weights, expert_alignment, num_worst_tokens, config, previous_event, async_finish,
                              allocate_on_comm_stream)

    def internode_dispatch(self, x, handle: Optional[tuple] = None, num_tokens_per_rank=None,
                           num_tokens_per_rdma_rank=None, is_token_in_rank=None, num_tokens_per_expert=None,
                           topk_idx=None, topk_weights=None, expert_alignment: int = 1, num_worst_tokens: int = 0,
                           config: Optional[Config] = None, previous_event: Optional[EventOverlap] = None,
                           async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Same as ``dispatch``: epcomm's core picks the hierarchical path itself when the group
        spans nodes."""
        return self._dispatch(x, handle, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx,
                              topk_weights, expert_alignment, num_worst_tokens, config, previous_event, async_finish,
                              allocate_on_comm_stream)

    def _dispatch(self, x, handle, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx,
                  topk_weights, expert_alignment, num_worst_tokens, config, previous_event, async_finish,
                  allocate_on_comm_stream):
        runtime = self._rt()
        x, x_scales = split_x(x)
        config = self._default_config("dispatch") if config is None else check_config("config", config)
        expert_alignment = check_int("expert_alignment", expert_alignment, lo=1, hi=1 << 20)
        num_worst_tokens = check_int("num_worst_tokens", num_worst_tokens, lo=0, hi=self._max_recv_rows)
        async_finish = check_bool("async_finish", async_finish)
        on_comm = check_bool("allocate_on_comm_stream", allocate_on_comm_stream)
        prev = event_of(previous_event)
        stream = _current_stream(self._device)
        dev, hidden = self._device, x.size(1)

        if handle is not None:
            if topk_idx is not None or topk_weights is not None:
                raise ArgumentError("topk_idx, topk_weights: a cached dispatch (handle given) reuses the handle's "
                                    "routing; pass neither")
            h = check_handle(handle)
            rows = h.meta.num_rows
            recv_x, recv_x_scales = self._allocate(on_comm, lambda: empty(dev, (
                (x.dtype, (rows, hidden)), None if x_scales is None else (x_scales.dtype, (rows, x_scales.size(1)))),
                shared=True))
            event = runtime.cached_dispatch(x, x_scales, h.rank_prefix_matrix, h.chunk_offset, h.recv_src_idx,
                                            h.is_token_in_rank, h.meta, recv_x, recv_x_scales, config,
                                            stream, prev, async_finish)
            overlap = (self._finish(event, async_finish, on_comm, None, (x, x_scales) + tuple(h[:4]),
                                    (recv_x, recv_x_scales)) if async_finish or on_comm else EventOverlap())
            return (recv_x if x_scales is None else (recv_x, recv_x_scales)), None, None, None, None, overlap

        if num_tokens_per_rank is None or is_token_in_rank is None or num_tokens_per_expert is None:
            raise ArgumentError("num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert: a dispatch without a "
                                "handle needs all three (from get_dispatch_layout)")
        num_tokens_per_rank = check_tensor("num_tokens_per_rank", num_tokens_per_rank, ndim=1)
        is_token_in_rank = check_tensor("is_token_in_rank", is_token_in_rank, ndim=2)
        num_tokens_per_expert = check_tensor("num_tokens_per_expert", num_tokens_per_expert, ndim=1)
        topk_idx = check_tensor("topk_idx", topk_idx, ndim=2, allow_none=True)
        topk_weights = check_tensor("topk_weights", topk_weights, ndim=2, allow_none=True)
        R, stride = self.group_size, self._chunk_offset_stride(runtime, config)
        num_topk = 0 if topk_idx is None else topk_idx.size(1)
        num_scales = 0 if x_scales is None else x_scales.size(1)

        # The receive tensors' specs (epcomm/_alloc.py) in groups of one allocation each, by who holds
        # them: the rows with their scales (the experts), the routing rows (the experts, then
        # combine), and the source indices with the handle's other tensors.
        def rows_groups(rows):
            return (((x.dtype, (rows, hidden)), None if x_scales is None else (x_scales.dtype, (rows, num_scales))),
                    (None if topk_idx is None else (torch.int64, (rows, num_topk)),
                     None if topk_idx is None or topk_weights is None else (torch.float32, (rows, num_topk))))

        handle_specs = ((torch.int32, (R, R)), (torch.int32, (R, stride)))
        # Receive tensors are made before the count exchange (see _reserve_rows), so that nothing
        # runs in Python between the host seeing the counts and the launch of the data kernel.
        capacity = num_worst_tokens or self._reserve_rows()
        if capacity:
            rank_prefix_matrix, chunk_offset, src_idx, *rows_part = self._allocate(on_comm, lambda: empty_grouped(
                dev, (handle_specs + ((torch.int32, (capacity,)),),) + rows_groups(capacity)))
            reserved = (*rows_part, src_idx)  # the order of the core's receive tensors
        else:
            rank_prefix_matrix, chunk_offset = self._allocate(on_comm, lambda: empty(dev, handle_specs, shared=True))
            reserved = ()
        pointers = None
        if reserved:
            pointers = (*[None if t is None else t.data_ptr() for t in reserved], capacity)
        # Phase 1 exchanges the counts (the host waits for them unless num_worst_tokens > 0) and, when
        # the rows fit the reserved tensors, phase 2 moves the data at once (in C++, without the GIL).
        call = runtime.dispatch_prepare(x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
                                        num_tokens_per_expert, expert_alignment, num_worst_tokens, config,
                                        rank_prefix_matrix, chunk_offset, stream, prev, async_finish,
                                        pointers)
        rows = call.num_rows
        if call.ran:
            event = call.take_event()
            outputs = first_rows(tuple(reserved), rows)
        else:
            # More rows than reserved (or nothing reserved yet): tensors of exactly that many rows,
            # passed as pointers (the GPU waits for this stretch; the core knows their shapes).
            outputs = self._allocate(on_comm,
                                     lambda: empty_grouped(dev, rows_groups(rows) + (((torch.int32, (rows,)),),)))
            event = call.run(*(None if t is None else t.data_ptr() for t in outputs))
        if not num_worst_tokens:
            self._recent_rows.append(rows)
        recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, recv_src_idx = outputs
        handle = DispatchHandle(rank_prefix_matrix, chunk_offset, recv_src_idx, is_token_in_rank,
                                HandleMeta._make(call.meta))
        overlap = (self._finish(event, async_finish, on_comm, None,
                                (x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
                                 num_tokens_per_expert),
                                (rank_prefix_matrix, chunk_offset) + outputs)
                   if async_finish or on_comm else EventOverlap())
        recv = recv_x if x_scales is None else (recv_x, recv_x_scales)
        return recv, recv_topk_idx, recv_topk_weights, call.num_recv_tokens_per_expert, handle, overlap

    def _reserve_rows(self) -> int:
        """Receive rows to allocate before the count exchange: the peak of the last
        RESERVE_WINDOW dispatches' row counts plus 1/32, rounded up to 128 rows (0: none)."""
        if not self.reserve_recv_rows or not self._recent_rows:
            return 0
        peak = max(self._recent_rows)
        return -(-(peak + peak // 32) // 128) * 128

    def combine(self, x, handle: tuple, topk_weights=None, bias=None, config: Optional[Config] = None,
                previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                allocate_on_comm_stream: bool = False):
        """Sums each token's rows back on the rank that sent it (no weights).

        ``x`` is ``[rows, hidden]`` BF16 in the order dispatch returned; ``bias`` is None, one
        ``[T, hidden]`` BF16 tensor, or a pair. Returns ``(combined_x [T, hidden] bf16,
        combined_topk_weights [T, K] float32 or None, event)``: ``combined_x[t]`` = the sum over the
        ranks that received ``t`` of their row (+ biases), in float32, rounded once; a token sent
        nowhere gets zeros (+ biases). ``combined_topk_weights`` sums ``topk_weights`` the same way.
        """
        return self._combine(x, handle, topk_weights, bias, config, previous_event, async_finish,
                             allocate_on_comm_stream)

    def internode_combine(self, x, handle: tuple, topk_weights=None, bias=None, config: Optional[Config] = None,
                          previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                          allocate_on_comm_stream: bool = False):
        """Same as ``combine`` (the core picks the path)."""
        return self._combine(x, handle, topk_weights, bias, config, previous_event, async_finish,
                             allocate_on_comm_stream)

    def _combine(self, x, handle, topk_weights, bias, config, previous_event, async_finish, allocate_on_comm_stream):
        runtime = self._rt()
        x = check_tensor("x", x, ndim=2)
        h = check_handle(handle)
        topk_weights = check_tensor("topk_weights", topk_weights, ndim=2, allow_none=True)
        bias0, bias1 = unpack_bias(bias)
        config = self._default_config("combine") if config is None else check_config("config", config)
        async_finish = check_bool("async_finish", async_finish)
        on_comm = check_bool("allocate_on_comm_stream", allocate_on_comm_stream)
        prev = event_of(previous_event)
        stream = _current_stream(self._device)
        dev, T = self._device, h.meta.num_tokens
        outputs = self._allocate(on_comm, lambda: empty(dev, (
            (torch.bfloat16, (T, x.size(1))),
            None if topk_weights is None else (torch.float32, (T, topk_weights.size(1))))))
        event = runtime.combine(x, topk_weights, bias0, bias1, h.rank_prefix_matrix, h.chunk_offset, h.recv_src_idx,
                                h.is_token_in_rank, h.meta, *outputs, config, stream, prev, async_finish)
        overlap = (self._finish(event, async_finish, on_comm, None, (x, topk_weights, bias0, bias1) + tuple(h[:4]),
                                outputs) if async_finish or on_comm else EventOverlap())
        return outputs[0], outputs[1], overlap

