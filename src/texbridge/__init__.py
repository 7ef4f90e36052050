"""texbridge: DXGI-style shared textures and buffers for Linux.

A process creates a texture or buffer (memfd, Vulkan, OpenGL or CUDA memory) and gets a shared handle; any process
in the same namespace opens the handle and gets the same memory, zero-copy. A keyed mutex hands frames back and forth.

    import texbridge
    with texbridge.connect() as s:
        tex = s.create_texture(1920, 1080, "rgba8", name="camera", keyed_mutex=True)
        ...  # another process: texbridge.connect().open("camera")

Where each module sits, and what it may import: the layer table in docs/architecture.md (tests/test_architecture.py
checks the code against it).
"""

import types as _types

from ._client import Event as Event
from ._client import Session as Session
from ._client import connect as connect
from ._descriptor import Descriptor as Descriptor
from ._descriptor import Usage as Usage
from ._errors import AccessDenied as AccessDenied
from ._errors import BackendError as BackendError
from ._errors import BrokenError as BrokenError
from ._errors import BrokerBusy as BrokerBusy
from ._errors import BrokerUnavailable as BrokerUnavailable
from ._errors import ClosedError as ClosedError
from ._errors import IncompatibleDevice as IncompatibleDevice
from ._errors import InvalidArgument as InvalidArgument
from ._errors import InvalidDescriptor as InvalidDescriptor
from ._errors import KeyedMutexAbandoned as KeyedMutexAbandoned
from ._errors import KeyedMutexError as KeyedMutexError
from ._errors import KeyedMutexTimeout as KeyedMutexTimeout
from ._errors import LocalProtocolError as LocalProtocolError
from ._errors import NameInUse as NameInUse
from ._errors import NoKeyedMutex as NoKeyedMutex
from ._errors import NotASender as NotASender
from ._errors import NotFound as NotFound
from ._errors import NotHostVisible as NotHostVisible
from ._errors import ProtocolError as ProtocolError
from ._errors import QuotaExceeded as QuotaExceeded
from ._errors import RemoteProtocolError as RemoteProtocolError
from ._errors import SenderNotFound as SenderNotFound
from ._errors import TexbridgeError as TexbridgeError
from ._errors import TexbridgeTimeout as TexbridgeTimeout
from ._errors import WouldBlock as WouldBlock
from ._formats import FORMATS as FORMATS
from ._handle import Handle as Handle
from ._resources import Resource as Resource
from .keyed_mutex import KeyedMutex as KeyedMutex
from .keyed_mutex import KeyedMutexStats as KeyedMutexStats
from .senders import MAX_USER_DATA as MAX_USER_DATA
from .senders import Frame as Frame
from .senders import Receiver as Receiver
from .senders import Sender as Sender
from .senders import SenderEvent as SenderEvent
from .senders import SenderInfo as SenderInfo
from .senders import list_senders as list_senders
from .senders import watch_senders as watch_senders

__version__ = "0.1.0"

__all__ = [
    # connecting and resources
    "connect", "Session", "Event", "Resource", "Descriptor", "Usage", "Handle", "FORMATS",
    # synchronisation
    "KeyedMutex", "KeyedMutexStats",
    # senders and receivers
    "Sender", "Receiver", "Frame", "MAX_USER_DATA", "SenderInfo", "SenderEvent", "list_senders", "watch_senders",
    # errors
    "TexbridgeError", "AccessDenied", "BackendError", "BrokenError", "BrokerBusy", "BrokerUnavailable", "ClosedError",
    "IncompatibleDevice", "InvalidArgument", "InvalidDescriptor", "KeyedMutexAbandoned", "KeyedMutexError",
    "KeyedMutexTimeout", "LocalProtocolError", "NameInUse", "NoKeyedMutex", "NotASender", "NotFound", "NotHostVisible",
    "ProtocolError", "QuotaExceeded", "RemoteProtocolError", "SenderNotFound", "TexbridgeTimeout", "WouldBlock",
]


def _fixup_module_metadata() -> None:
    """Show public classes and functions as `texbridge.X`, where users meet them (tracebacks, reprs, help), not as
    the private module that defines them (`texbridge._errors.NotFound`): trio does the same. Pickling still works,
    as `texbridge.X` is the same object."""
    namespace = globals()
    for name in __all__:
        obj = namespace[name]
        if isinstance(obj, (type, _types.FunctionType)) and obj.__module__.startswith(__name__ + "."):
            obj.__module__ = __name__


_fixup_module_metadata()
