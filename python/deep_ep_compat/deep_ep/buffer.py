"""``deep_ep.buffer`` as DeepEP 1.x has it: the Buffer class and the names its module imports."""

from epcomm import Buffer, Config, EventOverlap  # noqa: F401
from epcomm.event import EventHandle  # noqa: F401

from .utils import check_nvlink_connections  # noqa: F401

__all__ = ["Buffer", "Config", "EventOverlap", "EventHandle"]
