"""Events, as DeepEP's Python layer has them: EventHandle (one CUDA event) and EventOverlap (an
optional event plus tensors kept alive until the caller is done with it)."""

from typing import Any, Optional, Tuple

from . import _epcomm
from ._compat import require_torch


class EventHandle:
    """One CUDA event. ``EventHandle()`` records a new one on the current stream."""

    __slots__ = ("native",)

    def __init__(self, native: Optional[_epcomm.Event] = None) -> None:
        if native is None:
            torch = require_torch("EventHandle()")
            stream = torch.cuda.current_stream()
            native = _epcomm.Event.record(stream.cuda_stream, stream.device.index)
        self.native = native

    def current_stream_wait(self) -> None:
        """Makes ``torch.cuda.current_stream()`` wait for the event (no host wait)."""
        torch = require_torch("EventHandle.current_stream_wait")
        self.native.wait(torch.cuda.current_stream().cuda_stream)

    def synchronize(self) -> None:
        self.native.synchronize()

    def query(self) -> bool:
        return self.native.query()

    @property
    def cuda_event(self) -> int:
        return self.native.ptr


class EventOverlap:
    """An event to overlap with, and the tensors its work still uses.

    ``with overlap: ...`` runs the body, then makes the current stream wait for the event.
    ``extra_tensors`` keeps tensors alive until this object goes away (``record_stream`` does the
    same for the caching allocator; both are set on async calls)."""

    def __init__(self, event: Optional[EventHandle] = None, extra_tensors: Optional[Tuple[Any, ...]] = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        if self.event is None:
            raise RuntimeError("EventOverlap.current_stream_wait: this overlap holds no event "
                               "(the call that returned it did not set async_finish)")
        self.event.current_stream_wait()

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        if self.event is not None:
            self.event.current_stream_wait()

    def __repr__(self) -> str:
        state = "no event" if self.event is None else f"event 0x{self.event.cuda_event:x}"
        return f"EventOverlap({state})"
