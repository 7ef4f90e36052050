"""Every exception texbridge raises derives from TexbridgeError.

Errors travel on the wire as a short code string; `error_from_code` turns a reply's code back into the same
exception class on the client, so a broker-side refusal reads exactly like a local one.
"""

from __future__ import annotations

MAX_ECHO = 40  # characters of a peer's value quoted back in an error: an echo must never make a reply too large
MAX_MESSAGE = 1024  # characters of an error message on the wire


class TexbridgeError(Exception):
    """Base class: catch this to catch anything texbridge raises."""

    code = "error"


class ProtocolError(TexbridgeError):
    """A message broke the wire protocol. Not raised directly: see Local/RemoteProtocolError."""

    code = "protocol"

    def __new__(cls, *args, **kwargs):
        if cls is ProtocolError:
            raise TypeError("raise LocalProtocolError or RemoteProtocolError, not ProtocolError")
        return super().__new__(cls, *args, **kwargs)


class LocalProtocolError(ProtocolError):
    """We were about to send something illegal: a bug on this side."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something illegal: garbage, a truncated frame, the wrong number of fds."""


class NotFound(TexbridgeError):
    """No such handle or name in this namespace (handles of other namespaces are never found)."""

    code = "not_found"


class AccessDenied(TexbridgeError):
    """The broker refused this process (uid not allowed) or this operation (not a holder of the resource)."""

    code = "access_denied"


class InvalidDescriptor(TexbridgeError):
    """A descriptor or its memory is unusable: bad sizes, unknown format, an unsealed or too-small memfd."""

    code = "invalid_descriptor"


class InvalidArgument(TexbridgeError, ValueError):
    """A Python call got a value texbridge cannot use as given: a frame of the wrong shape or dtype (never silently
    reshaped or cast), a malformed handle string. Local only: the message says what was expected."""

    code = "invalid_argument"


class NoKeyedMutex(TexbridgeError, AttributeError):
    """`.mutex` of a resource created without keyed_mutex=True (an AttributeError, so getattr(res, "mutex", None)
    still works)."""

    code = "no_keyed_mutex"


class NotHostVisible(TexbridgeError, TypeError, NotImplementedError):
    """A zero-copy host view of memory only a GPU API sees (np.asarray(vulkan_texture), .numpy()): use download()."""

    code = "not_host_visible"


class NotASender(TexbridgeError):
    """A Receiver was pointed at a name published by something other than a Sender (a plain texture or buffer)."""

    code = "not_a_sender"


class NameInUse(TexbridgeError):
    """The name is already published in this namespace."""

    code = "name_in_use"


class QuotaExceeded(TexbridgeError):
    """A limit was reached: this client's resources, bytes, names or connections, or a resource's names or
    metadata size."""

    code = "quota_exceeded"


class SenderNotFound(NotFound):
    """No live sender has this name (Receiver(name, require_sender=True), `texbridge view NAME --timeout`)."""

    code = "sender_not_found"


class BrokerBusy(TexbridgeError):
    """The broker is out of file descriptors for now: it refused this connection or request; retry later."""

    code = "busy"


class BrokerUnavailable(TexbridgeError):
    """No broker could be reached or started for this namespace."""

    code = "broker_unavailable"


class ClosedError(TexbridgeError):
    """This process already closed the object (session or resource) being used."""

    code = "closed"


class BrokenError(TexbridgeError):
    """Something outside this process went away: the broker connection dropped mid-call."""

    code = "broken"


class BackendError(TexbridgeError):
    """A graphics or compute API failed (a VkResult, a GL/EGL error, a CUresult), or a backend is unavailable."""

    code = "backend"


class IncompatibleDevice(BackendError):
    """The memory was exported by a different driver or device (UUID mismatch): OPAQUE_FD cannot cross it."""

    code = "incompatible_device"


class TexbridgeTimeout(TexbridgeError, TimeoutError):
    """A wait ran out of time."""

    code = "timeout"


class WouldBlock(TexbridgeError):
    """A *_nowait call could not complete at once."""

    code = "would_block"


class KeyedMutexError(TexbridgeError):
    """Misuse of a keyed mutex (release by a non-owner, recursive acquire) or a corrupted shared state."""

    code = "keyed_mutex"


class KeyedMutexTimeout(TexbridgeTimeout):
    """acquire(key, timeout) ran out of time: the mutex was busy or held another key."""

    code = "keyed_mutex_timeout"


class KeyedMutexAbandoned(TexbridgeError):
    """The previous owner died holding the mutex. The caller now OWNS it: inspect the data, then release(key)."""

    code = "keyed_mutex_abandoned"


_BY_CODE = {
    cls.code: cls
    for cls in (
        TexbridgeError, NotFound, AccessDenied, InvalidDescriptor, NameInUse, QuotaExceeded, BrokerBusy,
        BrokerUnavailable,
        ClosedError, BrokenError, BackendError, IncompatibleDevice, TexbridgeTimeout, WouldBlock,
    )
}
_BY_CODE["protocol"] = RemoteProtocolError


def error_from_code(code: str, message: str) -> TexbridgeError:
    """The exception a client raises for an error reply; unknown codes (a newer broker) map to TexbridgeError."""
    return _BY_CODE.get(code, TexbridgeError)(message)


def echo(value: object) -> str:
    """A peer's value quoted in an error message: its repr, cut to MAX_ECHO characters, so no echo can make a
    reply larger than a frame (and no log line larger than a line)."""
    if isinstance(value, (list, tuple, dict)):  # never repr a container: it may be huge or nested thousands deep
        return f"<{type(value).__name__} of {len(value)}>"
    text = repr(value[:MAX_ECHO] if isinstance(value, (bytes, str)) else value)
    return text if len(text) <= MAX_ECHO else text[:MAX_ECHO - 3] + "..."
