"""``deep_ep.utils`` as DeepEP 1.x has it: EventOverlap, EventHandle (Megatron-LM imports both from
here), and check_nvlink_connections."""

from epcomm import EventOverlap  # noqa: F401
from epcomm.event import EventHandle  # noqa: F401


def check_nvlink_connections(group) -> None:
    """DeepEP checks that PCIe GPUs of the group are NVLink-connected pairs. epcomm needs every rank
    reachable by NVLink load/store and checks that itself when a Buffer is built (it raises
    RuntimeError naming the unreachable rank), so this does nothing."""
    del group


__all__ = ["EventOverlap", "EventHandle", "check_nvlink_connections"]
