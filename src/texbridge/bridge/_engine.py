"""The bridge engine: mirrors senders and keyed-mutex resources between this namespace and a peer over a link.

One `Bridge` serves one endpoint (a shared file or a TCP address) for one namespace. Around `Endpoint.establish` it
runs a reconnect loop with backoff; over each link it
- exports every local sender (not the mirrors of any bridge): a thread per sender reads its newest frame straight
  into the stream writer's buffer (one copy) and commits it;
- imports every sender the peer announces as a local mirror `NAME@PEERLABEL` (a real Sender, so local receivers
  import it into any backend) and copies each frame from the stream reader straight into a mirror slot (one copy);
- carries keyed-mutex resources across (docs/bridge.md, "Keyed mutex across"): the side that does not hold the
  content keeps its copy acquired; waiters' keys travel to the side holding it, whose bridge acquires the key as
  soon as it is free there and ships content, key, sync value and private data;
- writes a small JSON status file every ~0.5 s for `texbridge bridge status`.

The peer is untrusted: every control message goes through `_wire.parse` (a malformed one ends the session), and
what a well-formed peer asks for is held to this side's limits (streams, bytes, frame size): over the limits a
stream is refused, not the session. A dead link (heartbeat timeout, a peer error) retires every mirror at once.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import _paths
from .._client import Session, connect
from .._errors import KeyedMutexAbandoned, KeyedMutexTimeout, TexbridgeError
from .._formats import get_format
from .._resources import Resource
from ..senders.directory import SenderInfo, is_sender, watch_senders
from ..senders.frame import realtime_offset_ns
from ..senders.receiver import Receiver
from ..senders.sender import Sender
from . import _wire
from ._link import (FOLLOW_MIN_BYTES, MAX_STREAMS, Backoff, BridgeAuthError, BridgeError, BridgePeerError, Cadence,
                    Endpoint, FrameMeta, Link, StreamFormat, StreamReader, StreamWriter)

log = logging.getLogger("texbridge.bridge")

STATUS_INTERVAL = 0.5  # seconds between status-file writes
RESOURCE_POLL = 0.5  # seconds between looks for keyed-mutex resources to share
HELLO_TIMEOUT = 5.0  # a peer that sends no hello this long after the link is up is dropped
MAX_ERRORS = 8  # peer errors kept for status
KM_HOT_S = 0.25  # after keyed-mutex traffic, poll local waiters every KM_HOT_POLL_S (else every 2 ms) for this long
KM_HOT_POLL_S = 100e-6
EXPORT_CHUNKS = 8  # a large frame is copied into the link in up to this many row bands, each announced with progress()
EXPORT_BAND_BYTES = 512 * 1024  # ... of at least this many bytes: a smaller frame is one band (a band costs Python time)


@dataclass(frozen=True, slots=True)
class BridgeLimits:
    """What one peer may make this side hold. Over a limit a stream is refused (and the refusal shown in status)."""

    max_streams: int = MAX_STREAMS  # streams (senders + keyed-mutex resources) the peer may mirror here at once
    max_bytes: int = 2 << 30  # frame bytes of all of them together
    max_width: int = 7680  # largest frame the peer may send here (told to it in the hello)
    max_height: int = 4320

    def __post_init__(self) -> None:
        if not 1 <= self.max_streams <= MAX_STREAMS:
            raise ValueError(f"max_streams must be 1..{MAX_STREAMS}")
        if not (0 < self.max_width <= 16384 and 0 < self.max_height <= 16384):
            raise ValueError("max size must be within 16384x16384")


def default_label() -> str:
    """The hostname's first part, cut to a valid label."""
    name = "".join(c if c.isalnum() or c in "_.-" else "-" for c in socket.gethostname().split(".")[0])[:32]
    return name if name and _wire.LABEL_RE.match(name) else "texbridge"


def status_dir() -> Path:
    return _paths.runtime_dir() / "bridges"


def _rows(pixels: np.ndarray, fmt: StreamFormat) -> np.ndarray | None:
    """A (height, width, channels) slot view seen as the stream's (height, row_bytes) uint8 rows without a copy
    (pitched rows included), or None when its layout does not allow one."""
    try:
        rows = pixels.view(np.uint8)
        rows.shape = (fmt.height, fmt.row_bytes)  # raises rather than copy
    except (ValueError, AttributeError):
        return None
    return rows


def _pixels(flat: np.ndarray, fmt: StreamFormat) -> np.ndarray:
    """A stream's (height, row_bytes) uint8 array seen as (height, width, channels) pixels of its format."""
    f = get_format(fmt.format)
    return flat.view(f.numpy_dtype).reshape(fmt.height, fmt.width, f.channels)


class _Rate:
    """Frames/s and bytes/s over the last ~2 s, for status."""

    def __init__(self) -> None:
        self.events: deque[tuple[float, int]] = deque(maxlen=4096)
        self.frames = 0
        self.bytes = 0

    def add(self, nbytes: int) -> None:
        self.frames += 1
        self.bytes += nbytes
        self.events.append((time.monotonic(), nbytes))

    def rates(self) -> tuple[float, float]:
        now = time.monotonic()
        while self.events and now - self.events[0][0] > 2.0:
            self.events.popleft()
        if len(self.events) < 2:
            return 0.0, 0.0
        span = max(now - self.events[0][0], 1e-3)
        return len(self.events) / span, sum(n for _, n in self.events) / span


@dataclass
class _Export:
    """A local sender streamed to the peer (its own thread)."""

    name: str
    info: SenderInfo
    stream: int = -1
    fmt: StreamFormat | None = None
    thread: threading.Thread | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    rate: _Rate = field(default_factory=_Rate)
    latency_ns: deque = field(default_factory=lambda: deque(maxlen=256))  # sender commit -> stream commit
    cadence: Cadence = field(default_factory=Cadence)
    error: str = ""
    refused: bool = False  # the peer refused the stream (limits): not retired, not restarted


@dataclass
class _Import:
    """A peer's sender mirrored here."""

    name: str  # NAME@PEERLABEL
    stream: int
    fmt: StreamFormat
    mirror: Sender
    reader: StreamReader
    last: int = 0
    rate: _Rate = field(default_factory=_Rate)
    drops: int = 0
    latency_ns: deque = field(default_factory=lambda: deque(maxlen=256))  # sender's capture -> mirror commit
    cadence: Cadence = field(default_factory=Cadence)


@dataclass
class _Shared:
    """A keyed-mutex resource shared with the peer: ours (origin) or the peer's (mirror)."""

    id: int
    name: str
    res: Resource
    kind: str
    fmt: StreamFormat
    size: int
    origin: bool
    has_content: bool  # True: local apps may use it; False: this bridge holds it while the content is across
    writer: StreamWriter | None = None
    out_stream: int = -1
    reader: StreamReader | None = None
    last_in: int = 0
    sent: int = 0
    peer_wants: tuple[int, ...] = ()
    told_wants: tuple[int, ...] | None = None
    transfers_in: int = 0
    transfers_out: int = 0


class _Session:
    """The state of one established link (one peer); dropped whole when the link dies."""

    def __init__(self, bridge: "Bridge", link: Link) -> None:
        self.bridge, self.link = bridge, link
        self.label = ""
        self.peer_max = (1, 1)
        self.lock = threading.Lock()  # stream numbers, exports
        self.out_used: set[int] = set()
        self.next_out = 0
        self.exports: dict[str, _Export] = {}
        self.imports: dict[int, _Import] = {}
        self.in_bytes = 0
        self.shared_out: dict[int, _Shared] = {}  # our resources, by id
        self.shared_in: dict[int, _Shared] = {}  # the peer's resources, by its id
        self.shared_names: dict[str, int] = {}  # our resource names shared -> id
        self.refused: set[str] = set()
        self.since = time.time()
        self.stopping = False
        self.km_hot_until = 0.0  # keyed-mutex traffic seen lately: the loop polls waiters' keys fast until then

    # -- stream numbers ---------------------------------------------------------------------------------------------
    def alloc_stream(self) -> int:
        """A stream number of our direction not in use (reused only after the peer said its reader closed)."""
        with self.lock:
            for i in range(MAX_STREAMS):
                s = (self.next_out + i) % MAX_STREAMS
                if s not in self.out_used:
                    self.out_used.add(s)
                    self.next_out = (s + 1) % MAX_STREAMS
                    return s
        raise BridgeError(f"all {MAX_STREAMS} outgoing streams are in use")

    def free_stream(self, s: int) -> None:
        with self.lock:
            self.out_used.discard(s)


class Bridge:
    """Mirror this namespace's senders and keyed-mutex resources with one peer's, over `endpoint`, until stop()."""

    def __init__(self, endpoint: Endpoint, *, label: str | None = None, namespace: str | None = None,
                 limits: BridgeLimits | None = None, session: Session | None = None,
                 status_file: Path | None | bool = True, share_keyed_mutexes: bool = True) -> None:
        self.endpoint = endpoint
        self.label = label or default_label()
        if not _wire.LABEL_RE.match(self.label):
            raise ValueError(f"label {self.label!r}: use 1-32 of A-Z a-z 0-9 _ . - (not starting with _ . -)")
        self.namespace = _paths.namespace_name(namespace)
        self.limits = limits or BridgeLimits()
        self.share_keyed_mutexes = share_keyed_mutexes
        self._given_session = session
        self._session: Session | None = session
        self._stop = threading.Event()
        self._current: _Session | None = None
        self.errors: deque[str] = deque(maxlen=MAX_ERRORS)
        self.connects = 0
        self.disconnects = 0
        self.state = "starting"
        self._last_peer = ""
        self._last_drop = 0.0
        if status_file is True:
            self.status_path: Path | None = status_dir() / f"{self.namespace}.{self.label}.{os.getpid()}.json"
        else:
            self.status_path = status_file or None
        self._status_t = 0.0
        self._woke = 0.0

    # -- lifetime -----------------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask run() to return (from any thread or a signal handler): mirrors are retired, the peer told."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    @property
    def connected(self) -> bool:
        return self._current is not None and self.state == "connected"

    def run(self) -> None:
        """Serve until stop(): establish a link, mirror over it, reconnect with backoff when it dies. Raises
        BridgeError when the very first attempt fails (a setup error) and BridgeAuthError whenever the peer
        refuses our secret or we refuse its (a wrong secret does not fix itself)."""
        if self._session is None:
            self._session = connect(self.namespace, app_name=f"texbridge-bridge:{self.label}")
        backoff = Backoff()
        first = True
        try:
            while not self._stop.is_set():
                self.state = "waiting"
                self._write_status(force=True)
                try:
                    link = self.endpoint.establish(0.5)  # waits for the peer meanwhile
                except BridgeError as e:
                    if first or isinstance(e, BridgeAuthError):
                        raise  # a setup error (file too small, address in use) or a wrong secret: not transient
                    self._note(f"connect: {e}")
                    link = None
                first = False
                if link is None:
                    self._stop.wait(backoff.next())
                    continue
                backoff.reset()
                self.connects += 1
                try:
                    self._serve(link)
                finally:
                    self.disconnects += 1
                    self._last_drop = time.time()
        finally:
            self.state = "stopped"
            try:
                self.endpoint.close()
            except Exception:
                pass
            if self.status_path is not None:
                try:
                    self.status_path.unlink()
                except OSError:
                    pass
            if self._given_session is None and self._session is not None:
                self._session.close()
                self._session = None

    def _note(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        self.errors.append(f"{stamp} {text}")
        log.warning("bridge %s: %s", self.label, text)

    # -- one link -------------------------------------------------------------------------------------------------------
    def _serve(self, link: Link) -> None:
        ses = _Session(self, link)
        self._current = ses
        watch = None
        try:
            link.send(_wire.hello(self.label, self.limits.max_width, self.limits.max_height))
            pending = self._await_hello(ses)
            self.state = "connected"
            self._last_peer = ses.label
            log.info("bridge %s: linked with %s (%s)", self.label, ses.label, self.endpoint.describe())
            watch = watch_senders(self._session, initial=True)
            for m in pending:
                self._handle(ses, m)
            next_poll = 0.0
            km_hot = False
            while not self._stop.is_set():
                if not link.alive:
                    raise BridgeError("the peer stopped answering")
                for raw in link.receive():
                    self._handle(ses, _wire.parse(raw))
                self._sender_events(ses, watch)
                busy = self._pump_imports(ses)
                if self.share_keyed_mutexes:
                    now = time.monotonic()
                    if now >= next_poll:
                        next_poll = now + RESOURCE_POLL
                        self._poll_resources(ses)
                    if self._pump_shared(ses):
                        ses.km_hot_until = time.monotonic() + KM_HOT_S
                    km_hot = time.monotonic() < ses.km_hot_until  # a ping-pong in progress: poll its wants fast
                self._reap_exports(ses)
                self._write_status()
                timeout = (KM_HOT_POLL_S if km_hot else 0.0005 if busy
                           else 0.002 if ses.shared_in or ses.shared_out else 0.02)
                spin, now = 0.0, time.monotonic()
                for imp in ses.imports.values():  # a mirrored stream's frame is due: wake for its window, spin
                    win = imp.cadence.window(now)
                    if win is not None:
                        if now < win[0]:
                            timeout = min(timeout, win[0] - now)
                        else:
                            spin = max(spin, win[1] - now)
                link.wait(max(timeout, spin), spin)
                self._woke = time.monotonic()  # when a frame imported next was noticed (its cadence's arrival)
            ses.stopping = True
            try:
                link.send(_wire.bye())
            except BridgeError:
                pass
        except BridgePeerError as e:
            self._note(f"peer {ses.label or '?'} broke the protocol: {e}")
        except BridgeError as e:
            self._note(f"link to {ses.label or '?'} lost: {e}")
        except _PeerLeft:
            log.info("bridge %s: peer %s stopped", self.label, ses.label)
        except (TexbridgeError, OSError) as e:  # this side's broker or memory: drop the link, start afresh
            self._note(f"{type(e).__name__}: {e}")
        except Exception as e:  # a bug here must cost the link, not the bridge
            log.exception("bridge %s: internal error", self.label)
            self._note(f"internal error: {type(e).__name__}: {e}")
        finally:
            self._current = None
            self.state = "waiting"
            self._teardown(ses)
            if watch is not None:
                watch.close()
            try:
                link.close()
            except Exception:
                pass

    def _await_hello(self, ses: _Session) -> list[dict[str, Any]]:
        deadline = time.monotonic() + HELLO_TIMEOUT
        while not self._stop.is_set():
            msgs = ses.link.receive()
            if msgs:
                first = _wire.parse(msgs[0])
                if first["t"] != "hello":
                    raise BridgePeerError(f"the peer's first message is {first['t']!r}, not hello")
                if first["v"] != _wire.VERSION:
                    raise BridgePeerError(f"the peer speaks bridge version {first['v']}, this side {_wire.VERSION}")
                ses.label = first["label"]
                if ses.link.peer_label and ses.link.peer_label != ses.label:
                    log.info("bridge %s: peer calls itself %s (transport: %s)", self.label, ses.label,
                             ses.link.peer_label)
                ses.peer_max = (first["max_w"], first["max_h"])
                if ses.label == self.label:
                    self._note(f"both sides are labelled {self.label!r}: mirrors here and there read alike "
                               "(give each side its own --label)")
                return [_wire.parse(m) for m in msgs[1:]]
            if time.monotonic() > deadline:
                raise BridgeError(f"no hello from the peer within {HELLO_TIMEOUT:g} s")
            ses.link.wait(0.01)
        raise BridgeError("stopped")

    def _teardown(self, ses: _Session) -> None:
        """The link is gone: retire mirrors (first: that is what the other side's users see), stop exports, hand
        keyed mutexes back (abandoned where held)."""
        ses.stopping = True
        for ex in list(ses.exports.values()):
            ex.stop.set()
        for imp in list(ses.imports.values()):
            self._drop_import(ses, imp, tell=False)
        for ex in list(ses.exports.values()):
            if ex.thread is not None:
                ex.thread.join(2.0)
        ses.exports.clear()
        for sh in list(ses.shared_out.values()) + list(ses.shared_in.values()):
            self._drop_shared(sh)
        ses.shared_out.clear()
        ses.shared_in.clear()

    # -- control messages ---------------------------------------------------------------------------------------------
    def _handle(self, ses: _Session, m: dict[str, Any]) -> None:
        t = m["t"]
        if t == "announce":
            self._on_announce(ses, m)
        elif t == "format":
            self._on_format(ses, m)
        elif t == "retire":
            imp = ses.imports.get(m["s"])
            if imp is not None:
                self._drop_import(ses, imp, tell=True)
        elif t == "closed":
            self._on_closed(ses, m["s"])
        elif t == "km_announce":
            self._on_km_announce(ses, m)
        elif t == "km_ready":
            self._on_km_ready(ses, m)
        elif t == "km_want":
            target = (ses.shared_in if m["own"] else ses.shared_out).get(m["id"])
            if target is not None:
                target.peer_wants = m["keys"]
        elif t == "km_retire":
            sh = ses.shared_in.pop(m["id"], None)
            if sh is not None:
                ses.in_bytes -= sh.fmt.nbytes
                self._drop_shared(sh)
                ses.free_stream(sh.out_stream)  # the origin closed its reader of it before retiring
                ses.link.send(_wire.closed(m["id"]))
        elif t == "bye":
            raise _PeerLeft()
        elif t == "hello":
            raise BridgePeerError("a second hello")

    def _on_closed(self, ses: _Session, s: int) -> None:
        """The peer closed its reader of our stream `s` (a retire, a resize, a refusal): the number is free once
        nothing of ours writes it; a stream it refused stops here."""
        for ex in list(ses.exports.values()):
            if ex.stream == s:
                ex.refused = True
                self._stop_export(ses, ex)
                ses.refused.add(ex.name)
        for ident, sh in list(ses.shared_out.items()):
            if sh.out_stream == s:  # our keyed-mutex resource refused by the peer
                del ses.shared_out[ident]
                self._drop_shared(sh)
                ses.refused.add(sh.name)
        ses.free_stream(s)

    def _admit(self, ses: _Session, name: str, fmt: StreamFormat) -> str | None:
        """Why the peer's new stream is refused here (None: admitted)."""
        lim = self.limits
        if fmt.width > lim.max_width or fmt.height > lim.max_height:
            return f"{fmt.width}x{fmt.height} exceeds this side's {lim.max_width}x{lim.max_height}"
        if len(ses.imports) + len(ses.shared_in) >= lim.max_streams:
            return f"the peer already has {lim.max_streams} streams here"
        if ses.in_bytes + fmt.nbytes > lim.max_bytes:
            return f"{ses.in_bytes + fmt.nbytes} bytes of frames would exceed this side's {lim.max_bytes}"
        return None

    def _on_announce(self, ses: _Session, m: dict[str, Any]) -> None:
        s = m["s"]
        if s in ses.imports:
            raise BridgePeerError(f"stream {s} announced twice")
        fmt = StreamFormat(m["w"], m["h"], m["fmt"])
        name = _wire.mirror_name(m["name"], ses.label)
        why = "name too long" if name is None else self._admit(ses, name, fmt)
        if why is None:
            try:
                mirror = Sender(name, fmt.width, fmt.height, fmt.format, session=self._session,
                                app_name="texbridge-bridge", bridged=ses.label)
            except TexbridgeError as e:
                why = f"{type(e).__name__}: {e}"
        if why is not None:
            self._note(f"refused {m['name']!r} from {ses.label}: {why}")
            ses.link.send(_wire.closed(s))
            return
        try:
            reader = ses.link.open_reader(s, fmt)
        except BaseException:
            mirror.close()
            raise
        ses.imports[s] = _Import(name, s, fmt, mirror, reader)
        ses.in_bytes += fmt.nbytes
        log.info("bridge %s: mirroring %s (%dx%d %s)", self.label, name, fmt.width, fmt.height, fmt.format)

    def _on_format(self, ses: _Session, m: dict[str, Any]) -> None:
        imp = ses.imports.get(m["s"])
        if imp is None:
            ses.link.send(_wire.closed(m["to"]))  # a stream we refused: refuse its successor too
            return
        if m["to"] in ses.imports and m["to"] != m["s"]:
            raise BridgePeerError(f"stream {m['to']} is in use")
        fmt = StreamFormat(m["w"], m["h"], m["fmt"])
        imp.reader.close()
        ses.link.send(_wire.closed(imp.stream))
        del ses.imports[imp.stream]
        ses.in_bytes -= imp.fmt.nbytes
        ses.imports[m["to"]] = imp  # held while checking, so the limit counts it once
        why = self._admit(ses, imp.name, fmt)
        del ses.imports[m["to"]]
        if why is not None:
            self._note(f"refused resize of {imp.name!r}: {why}")
            imp.mirror.close()
            ses.link.send(_wire.closed(m["to"]))
            return
        imp.mirror.resize(fmt.width, fmt.height, fmt.format)
        imp.reader = ses.link.open_reader(m["to"], fmt)
        imp.stream, imp.fmt, imp.last = m["to"], fmt, 0
        ses.imports[imp.stream] = imp
        ses.in_bytes += fmt.nbytes

    def _drop_import(self, ses: _Session, imp: _Import, *, tell: bool) -> None:
        ses.imports.pop(imp.stream, None)
        ses.in_bytes -= imp.fmt.nbytes
        try:
            imp.reader.close()
        except BridgeError:
            pass
        try:
            imp.mirror.close()
        except TexbridgeError as e:
            log.debug("closing mirror %s: %s", imp.name, e)
        if tell:
            ses.link.send(_wire.closed(imp.stream))
        log.info("bridge %s: retired %s", self.label, imp.name)

    # -- imports: peer stream -> mirror ---------------------------------------------------------------------------------
    def _pump_imports(self, ses: _Session) -> bool:
        got_any = False
        for imp in list(ses.imports.values()):
            if self._import_one(imp):
                got_any = True
        return got_any

    def _import_one(self, imp: _Import) -> bool:
        """Copy the peer's newest frame of one stream straight into a mirror slot (aborted if torn)."""
        if getattr(imp.reader, "read_into", None) is not None:
            return self._import_chunked(imp)
        return self._import_lazy(imp)

    def _import_lazy(self, imp: _Import) -> bool:
        """Enter the mirror slot only once the reader hands a frame over (inside its copy callback)."""
        state: dict[str, Any] = {}

        def copy(view: np.ndarray, meta: FrameMeta) -> FrameMeta:
            if "ctx" in state and state["meta"] is not meta:  # a retry found a newer frame: its own metadata
                state.pop("ctx").__exit__(_Torn, _Torn(), None)
            if "ctx" not in state:
                # wall clock on the wire -> this side's CLOCK_MONOTONIC (exact on one host, NTP-close across hosts)
                ts = meta.timestamp_ns - realtime_offset_ns() if meta.timestamp_ns else None
                state["ctx"] = ctx = imp.mirror.writing(timestamp_ns=ts if ts and ts > 0 else None,
                                                        user_data=meta.user_data or None)
                state["buf"], state["meta"] = ctx.__enter__(), meta
            np.copyto(state["buf"], _pixels(view, imp.fmt))
            return meta

        try:
            got = imp.reader.read(copy, imp.last)
        except BaseException as e:
            if "ctx" in state:
                state["ctx"].__exit__(type(e), e, e.__traceback__)
            raise
        ctx = state.get("ctx")
        if ctx is None:
            return False
        if got is None:
            ctx.__exit__(_Torn, _Torn(), None)  # the slot is given back unpublished
            return False
        ctx.__exit__(None, None, None)
        self._imported(imp, got)
        return True

    def _import_chunked(self, imp: _Import) -> bool:
        """A transport whose reader copies rows while the peer still writes them (the shared file): give it the
        mirror slot itself, so the copy out of the link overlaps the peer's copy in."""
        ctx = imp.mirror.writing()
        buf = ctx.__enter__()
        try:
            rows = _rows(buf, imp.fmt)
            got = None if rows is None else imp.reader.read_into(rows, imp.last,
                                                                 follow=imp.fmt.nbytes >= FOLLOW_MIN_BYTES)
            if got is None:
                ctx.__exit__(_Torn, _Torn(), None)  # nothing new (or torn): the slot goes back unpublished
                return False if rows is not None else self._import_lazy(imp)
            ts = got.timestamp_ns - realtime_offset_ns() if got.timestamp_ns else 0
            imp.mirror.set_frame_metadata(timestamp_ns=ts if ts > 0 else None, user_data=got.user_data or None)
        except BaseException as e:
            ctx.__exit__(type(e), e, e.__traceback__)
            raise
        ctx.__exit__(None, None, None)
        self._imported(imp, got)
        return True

    def _imported(self, imp: _Import, got: FrameMeta) -> None:
        if got.timestamp_ns:  # the sender's wall clock: periodic like its frames, at a steady offset from ours
            imp.cadence.tick(got.timestamp_ns * 1e-9, self._woke)
        if imp.last and got.frame > imp.last + 1:
            imp.drops += got.frame - imp.last - 1
        imp.last = got.frame
        imp.rate.add(imp.fmt.nbytes)
        if got.timestamp_ns:  # wall clock: exact on one host, clock skew included across hosts
            imp.latency_ns.append(time.time_ns() - got.timestamp_ns)

    # -- exports: local sender -> peer stream ---------------------------------------------------------------------------
    def _sender_events(self, ses: _Session, watch: Any) -> None:
        while True:
            try:
                readable, _, _ = select.select([watch.fileno()], [], [], 0) if watch.fileno() >= 0 else ([1], 0, 0)
            except (OSError, ValueError):
                readable = [1]
            if not readable:
                return
            ev = watch.next(0.001)
            if ev is None:
                return
            if ev.kind == "announced" and ev.info is not None:
                self._start_export(ses, ev.info)
            elif ev.kind == "retired":
                ex = ses.exports.get(ev.name)
                if ex is not None and ex.info.handle == ev.handle:
                    self._stop_export(ses, ex)
                ses.refused.discard(ev.name)  # a later sender of that name is tried again

    def _exportable(self, ses: _Session, info: SenderInfo) -> bool:
        return not info.bridged and "@" + ses.label not in info.name

    def _start_export(self, ses: _Session, info: SenderInfo) -> None:
        if not self._exportable(ses, info) or info.name in ses.refused:
            return
        old = ses.exports.get(info.name)
        if old is not None:
            self._stop_export(ses, old)  # a restarted sender: the old instance's stream goes first
        ex = _Export(info.name, info)
        ex.thread = threading.Thread(target=self._export_loop, args=(ses, ex), name=f"texbridge-export-{info.name}",
                                     daemon=True)
        ses.exports[info.name] = ex
        ex.thread.start()

    def _stop_export(self, ses: _Session, ex: _Export) -> None:
        ex.stop.set()
        if ex.thread is not None and ex.thread is not threading.current_thread():
            ex.thread.join(2.0)
        if ses.exports.get(ex.name) is ex:
            del ses.exports[ex.name]

    def _reap_exports(self, ses: _Session) -> None:
        for ex in list(ses.exports.values()):
            if ex.thread is not None and not ex.thread.is_alive() and ex.error.startswith("link:"):
                raise BridgeError(ex.error[5:].strip())

    def _export_loop(self, ses: _Session, ex: _Export) -> None:
        link = ses.link
        writer: StreamWriter | None = None
        rx: Receiver | None = None
        frames = bands = step = 0
        dtype: Any = None
        shape: tuple[int, int, int] = (0, 0, 0)
        try:
            rx = Receiver(ex.name, session=self._session, app_name="texbridge-bridge")
            while not ex.stop.is_set() and not ses.stopping:
                now = time.monotonic()
                win = ex.cadence.window(now)
                if win is None:
                    got = rx.next_frame(0.1, copy=False)
                else:  # a frame is due: sleep until its window opens, then spin across it
                    got = rx.next_frame(win[0] - now, copy=False) if now < win[0] else None
                    if got is None:
                        got = rx.next_frame(0.1, copy=False, spin=max(0.0, win[1] - time.monotonic()))
                if got is not None:
                    sent = rx.sent_ns * 1e-9  # the sender's commit, on our clock: no transit to learn
                    ex.cadence.tick(sent, sent)
                frame = None if got is None else got.pixels
                if frame is None:
                    if rx.status == "no_sender" and rx.events and rx.events[-1].kind == "retired":
                        break
                    continue
                fmt = ex.fmt
                if fmt is None or (got.width, got.height, got.format) != (fmt.width, fmt.height, fmt.format):
                    fmt = StreamFormat(got.width, got.height, got.format)  # this frame's own (a resize follows)
                    if fmt.width > ses.peer_max[0] or fmt.height > ses.peer_max[1]:
                        ex.error = f"{fmt.width}x{fmt.height} exceeds the peer's {ses.peer_max[0]}x{ses.peer_max[1]}"
                        rx.release()
                        if writer is not None:  # the peer retires the mirror
                            writer.close()
                            link.send(_wire.retire(ex.stream))
                            writer, ex.fmt, ex.stream = None, None, -1
                        continue
                    new = ses.alloc_stream()
                    new_writer = link.open_writer(new, fmt)
                    if writer is None:
                        link.send(_wire.announce(new, ex.name, fmt.width, fmt.height, fmt.format, ex.info.fps))
                    else:
                        link.send(_wire.format_change(ex.stream, new, fmt.width, fmt.height, fmt.format))
                        writer.close()
                    writer, ex.stream, ex.fmt = new_writer, new, fmt
                    ex.error = ""
                    bands = max(1, min(EXPORT_CHUNKS, fmt.nbytes // EXPORT_BAND_BYTES))
                    step = -(-fmt.height // bands)
                    dtype, shape = get_format(fmt.format).numpy_dtype, (fmt.height, fmt.width, -1)
                buf = writer.begin()
                dst = buf.view(dtype).reshape(shape)
                if bands == 1:
                    np.copyto(dst, frame)
                else:
                    for r0 in range(0, fmt.height, step):  # rows final as they go: the peer may copy them out already
                        np.copyto(dst[r0:r0 + step], frame[r0:r0 + step])
                        writer.progress(min(r0 + step, fmt.height))
                if rx.still_valid():
                    frames += 1
                    # the wire carries wall-clock time: the peer's CLOCK_MONOTONIC is another clock
                    writer.commit(FrameMeta(frames, timestamp_ns=got.realtime_ns, user_data=got.user_data))
                    ex.latency_ns.append(time.monotonic_ns() - got.timestamp_ns)
                    ex.rate.add(fmt.nbytes)
                else:
                    writer.abort()
                rx.release()
        except BridgeError as e:
            ex.error = f"link: {e}"
        except TexbridgeError as e:
            ex.error = f"{type(e).__name__}: {e}"
            log.warning("bridge %s: exporting %s: %s", self.label, ex.name, e)
        except Exception as e:  # a bug costs this stream (shown in status), not the bridge
            ex.error = f"internal error: {type(e).__name__}: {e}"
            log.exception("bridge %s: exporting %s", self.label, ex.name)
        finally:
            if rx is not None:
                try:
                    rx.close()
                except TexbridgeError:
                    pass
            if writer is not None:
                try:
                    writer.close()
                    if not ses.stopping and not ex.refused and link.alive:
                        link.send(_wire.retire(ex.stream))
                except BridgeError:
                    pass

    # -- keyed-mutex resources ------------------------------------------------------------------------------------------
    def _poll_resources(self, ses: _Session) -> None:
        """Share new published keyed-mutex resources with the peer; tell it of ones gone."""
        try:
            listed = self._session.list()
        except TexbridgeError as e:
            self._note(f"listing resources: {e}")
            return
        live: dict[str, dict[str, Any]] = {}
        for r in listed:
            meta = r.get("meta") or {}
            if not r.get("keyed_mutex") and r.get("kind") != "keyed_mutex":
                continue
            if is_sender(meta) or (isinstance(meta, dict) and meta.get("bridged")):
                continue
            for name in r.get("names") or ():
                if "@" + ses.label not in name:
                    live[name] = r
        for name, ident in list(ses.shared_names.items()):
            sh = ses.shared_out.get(ident)
            if name not in live or (sh is not None and live[name]["handle"] != sh.res.handle.value):
                del ses.shared_names[name]
                if sh is not None:
                    del ses.shared_out[ident]
                    self._drop_shared(sh)  # our reader of the peer's stream closes before it hears of the retire
                    ses.link.send(_wire.km_retire(ident))  # its number is free at the peer's "closed"
        for name, r in live.items():
            if name not in ses.shared_names and name not in ses.refused:
                self._share(ses, name, r)

    def _share(self, ses: _Session, name: str, r: dict[str, Any]) -> None:
        kind = {"texture2d": "texture", "buffer": "buffer", "keyed_mutex": "mutex"}.get(r.get("kind", ""))
        if kind is None:
            ses.refused.add(name)
            return
        try:
            if kind == "texture":
                fmt = StreamFormat(int(r["width"]), int(r["height"]), str(r["format"]))
                size = fmt.nbytes
            else:  # bytes as rows of r8 pixels, as wide as the peer takes (the last row padded)
                size = max(1, int(r.get("size") or 1)) if kind == "buffer" else 1
                w = min(size, ses.peer_max[0])
                fmt = StreamFormat(w, -(-size // w), "r8")
        except (TexbridgeError, ValueError, KeyError) as e:
            ses.refused.add(name)
            self._note(f"not sharing {name!r}: {e}")
            return
        if fmt.width > ses.peer_max[0] or fmt.height > ses.peer_max[1]:
            ses.refused.add(name)
            self._note(f"not sharing {name!r}: larger than the peer accepts")
            return
        try:
            res = self._session.open(r["handle"])
        except TexbridgeError as e:
            self._note(f"not sharing {name!r}: {e}")
            return
        if kind == "texture" and res.host_visible and res.shape != (fmt.height, fmt.width,
                                                                     get_format(fmt.format).channels):
            res.close()  # layers, planes: more than one image of rows, which a stream does not carry
            ses.refused.add(name)
            self._note(f"not sharing {name!r}: a {res.shape} texture is not one image")
            return
        try:
            ident = ses.alloc_stream()  # ids share the stream number space: no more than streams can exist
            s = ident
            writer = ses.link.open_writer(s, fmt)
        except BaseException:
            res.close()
            raise
        sh = _Shared(ident, name, res, kind, fmt, size, origin=True, has_content=True, writer=writer, out_stream=s)
        ses.shared_out[ident] = sh
        ses.shared_names[name] = ident
        ses.link.send(_wire.km_announce(ident, s, name, kind, fmt.width, fmt.height, fmt.format, size))
        log.info("bridge %s: sharing keyed-mutex %s %s", self.label, kind, name)

    def _on_km_announce(self, ses: _Session, m: dict[str, Any]) -> None:
        ident = m["id"]
        if ident in ses.shared_in:
            raise BridgePeerError(f"keyed-mutex resource {ident} announced twice")
        if m["kind"] == "texture":
            fmt = StreamFormat(m["w"], m["h"], m["fmt"])
            if fmt.nbytes != m["size"]:
                raise BridgePeerError(f"texture {m['w']}x{m['h']} {m['fmt']} is not {m['size']} bytes")
        else:
            fmt = StreamFormat(m["w"], m["h"], "r8")
            if m["fmt"] != "r8" or not m["size"] <= fmt.nbytes < m["size"] + fmt.width:
                raise BridgePeerError(f"{m['kind']} of {m['size']} bytes does not fit its stream {m['w']}x{m['h']}")
        name = _wire.mirror_name(m["name"], ses.label)
        why = "name too long" if name is None else self._admit(ses, name, fmt)
        res = None
        if why is None:
            try:
                if m["kind"] == "texture":
                    res = self._session.create_texture(fmt.width, fmt.height, fmt.format, keyed_mutex=True)
                elif m["kind"] == "buffer":
                    res = self._session.create_buffer(m["size"], keyed_mutex=True)
                else:
                    res = self._session.create_keyed_mutex()
                res.mutex.acquire(0, 0)  # fresh: free with key 0; held here until the content comes across
                self._session.update(res.handle, {"bridged": ses.label})
                res.publish(name)
            except TexbridgeError as e:
                why = f"{type(e).__name__}: {e}"
                if res is not None:
                    res.close()
        if why is not None:
            self._note(f"refused keyed-mutex resource {m['name']!r} from {ses.label}: {why}")
            ses.link.send(_wire.closed(m["s"]))
            return
        sh = _Shared(ident, name, res, m["kind"], fmt, m["size"], origin=False, has_content=False)
        try:
            sh.reader = ses.link.open_reader(m["s"], fmt)
            sh.out_stream = ses.alloc_stream()
            sh.writer = ses.link.open_writer(sh.out_stream, fmt)
        except BaseException:
            self._drop_shared(sh)
            raise
        ses.shared_in[ident] = sh
        ses.in_bytes += fmt.nbytes
        ses.link.send(_wire.km_ready(ident, sh.out_stream))
        log.info("bridge %s: mirroring keyed-mutex %s %s", self.label, m["kind"], name)

    def _on_km_ready(self, ses: _Session, m: dict[str, Any]) -> None:
        sh = ses.shared_out.get(m["id"])
        if sh is None:
            return  # retired meanwhile
        if sh.reader is not None:
            raise BridgePeerError(f"keyed-mutex resource {m['id']} made ready twice")
        sh.reader = ses.link.open_reader(m["s"], sh.fmt)

    def _drop_shared(self, sh: _Shared) -> None:
        """Closing a copy this bridge holds abandons it: local waiters learn the content is lost with the link."""
        for end in (sh.reader, sh.writer):
            if end is not None:
                try:
                    end.close()
                except BridgeError:
                    pass
        try:
            if not sh.origin:  # the name goes now, even while local apps still hold the mirror
                self._session.unpublish(sh.name)
        except TexbridgeError:
            pass
        try:
            sh.res.close()
        except TexbridgeError as e:
            log.debug("closing %s: %s", sh.name, e)

    def _pump_shared(self, ses: _Session) -> bool:
        busy = False
        for sh in list(ses.shared_out.values()) + list(ses.shared_in.values()):
            if sh.reader is None or sh.writer is None:
                continue
            try:
                if sh.has_content:
                    busy |= self._ship(ses, sh)
                else:
                    busy |= self._take_delivery(ses, sh)
                    if not sh.has_content:
                        wants = sh.res.mutex.waiting_keys()
                        if wants != sh.told_wants:
                            ses.link.send(_wire.km_want(sh.id, sh.origin, wants))
                            sh.told_wants = wants
                            busy = True
            except (BridgeError, KeyboardInterrupt):
                raise
            except (TexbridgeError, ValueError) as e:  # this resource's memory or mutex: it stops crossing
                self._note(f"keyed-mutex {sh.name!r} stops crossing: {type(e).__name__}: {e}")
                self._unshare(ses, sh)
        return busy

    def _unshare(self, ses: _Session, sh: _Shared) -> None:
        """Stop sharing one resource (its copy abandoned where this bridge held it); the peer drops its side."""
        self._drop_shared(sh)
        if sh.origin:
            ses.shared_out.pop(sh.id, None)
            ses.refused.add(sh.name)
            ses.link.send(_wire.km_retire(sh.id))
        else:
            ses.shared_in.pop(sh.id, None)
            ses.in_bytes -= sh.fmt.nbytes
            # the origin's content stream (numbered as its id): the origin drops its side and shares it no more;
            # our own stream back stays reserved (no "closed" will come for it) until the link is renewed
            ses.link.send(_wire.closed(sh.id))

    def _ship(self, ses: _Session, sh: _Shared) -> bool:
        """The content is here and the peer waits for a key: take the key when free, send content and key."""
        for key in sh.peer_wants:
            try:
                sync = sh.res.mutex.acquire(key, 0)
            except KeyedMutexTimeout:
                continue
            except KeyedMutexAbandoned:
                sync = sh.res.mutex.statistics().sync_value  # its owner died: we own it; pass on what is there
            private = sh.res.mutex.private_data
            buf = sh.writer.begin()
            self._read_content(sh, buf)
            sh.sent += 1
            sh.writer.commit(FrameMeta(sh.sent, user_data=_wire.transfer_data(key, sync, private)))
            sh.has_content = False
            sh.transfers_out += 1
            sh.peer_wants = ()
            sh.told_wants = None  # report this side's waiters from now on
            return True
        return False

    def _take_delivery(self, ses: _Session, sh: _Shared) -> bool:
        """Content from the peer: write it into our held copy, then release it with the peer's key."""
        def copy(view: np.ndarray, meta: FrameMeta) -> FrameMeta:
            self._write_content(sh, view)
            return meta

        got = sh.reader.read(copy, sh.last_in)
        if got is None:
            return False
        key, sync, private = _wire.parse_transfer(got.user_data)
        sh.last_in = got.frame
        sh.res.mutex.release(key, private_data=private, sync_value=sync)
        sh.has_content = True
        sh.transfers_in += 1
        return True

    def _read_content(self, sh: _Shared, buf: np.ndarray) -> None:
        if sh.kind == "mutex":
            return
        if sh.kind == "texture":
            src = sh.res.numpy() if sh.res.host_visible else sh.res.download()
            np.copyto(_pixels(buf, sh.fmt), src.reshape(sh.fmt.height, sh.fmt.width, -1))
        else:
            src = sh.res.numpy() if sh.res.host_visible else sh.res.download()
            buf.reshape(-1)[:sh.size] = src.reshape(-1).view(np.uint8)[:sh.size]

    def _write_content(self, sh: _Shared, view: np.ndarray) -> None:
        if sh.kind == "mutex":
            return
        if sh.kind == "texture":
            pixels = _pixels(view, sh.fmt)
            if sh.res.host_visible:
                np.copyto(sh.res.numpy().reshape(pixels.shape), pixels)
            else:
                sh.res.upload(pixels)
        else:
            data = np.ascontiguousarray(view).reshape(-1)[:sh.size]
            if sh.res.host_visible:
                sh.res.numpy().reshape(-1).view(np.uint8)[:sh.size] = data
            else:
                sh.res.upload(data)

    # -- status -------------------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """What `texbridge bridge status` shows: the link, its streams each way, rates, latency, drops, errors."""
        ses = self._current
        out: dict[str, Any] = {
            "pid": os.getpid(), "label": self.label, "namespace": self.namespace,
            "endpoint": self.endpoint.describe(), "state": self.state, "time": time.time(),
            "connects": self.connects, "disconnects": self.disconnects, "last_peer": self._last_peer,
            "last_drop": self._last_drop, "errors": list(self.errors), "peer": None, "out": [], "in": [],
            "keyed_mutex": [],
        }
        if ses is None:
            return out
        try:
            st = ses.link.stats()
            stats = {"frames_out": st.frames_out, "frames_in": st.frames_in, "bytes_out": st.bytes_out,
                     "bytes_in": st.bytes_in, "drops": st.drops, "errors": list(st.errors)[-MAX_ERRORS:]}
        except Exception as e:  # a dying link: status must still be written
            stats = {"error": str(e)}
        out["peer"] = {"label": ses.label, "since": ses.since, **stats}
        for ex in list(ses.exports.values()):
            fps, bps = ex.rate.rates()
            lat = sorted(ex.latency_ns)
            out["out"].append({"name": ex.name, "stream": ex.stream,
                               "size": f"{ex.fmt.width}x{ex.fmt.height} {ex.fmt.format}" if ex.fmt else "",
                               "frames": ex.rate.frames, "fps": round(fps, 1), "MBps": round(bps / 1e6, 2),
                               "latency_us": round(lat[len(lat) // 2] / 1e3, 1) if lat else None,
                               "error": ex.error})
        for imp in list(ses.imports.values()):
            fps, bps = imp.rate.rates()
            lat = sorted(imp.latency_ns)
            out["in"].append({"name": imp.name, "stream": imp.stream,
                              "size": f"{imp.fmt.width}x{imp.fmt.height} {imp.fmt.format}",
                              "frames": imp.rate.frames, "fps": round(fps, 1), "MBps": round(bps / 1e6, 2),
                              "latency_us": round(lat[len(lat) // 2] / 1e3, 1) if lat else None,
                              "drops": imp.drops, "receivers": imp.mirror.receivers})
        for sh in list(ses.shared_out.values()) + list(ses.shared_in.values()):
            out["keyed_mutex"].append({"name": sh.name, "kind": sh.kind, "origin": sh.origin,
                                       "content_here": sh.has_content, "to_peer": sh.transfers_out,
                                       "from_peer": sh.transfers_in})
        return out

    def _write_status(self, force: bool = False) -> None:
        if self.status_path is None:
            return
        now = time.monotonic()
        if not force and now - self._status_t < STATUS_INTERVAL:
            return
        self._status_t = now
        try:
            self.status_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = self.status_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.status()))
            os.replace(tmp, self.status_path)
        except OSError as e:
            log.debug("status file: %s", e)


class _Torn(Exception):
    """A mirror slot's copy was overwritten by the peer meanwhile: the slot is given back unpublished."""


class _PeerLeft(Exception):
    """The peer said bye."""


def read_statuses() -> list[dict[str, Any]]:
    """Every running bridge's last status (files of exited bridges are removed)."""
    from .. import _liveness

    out = []
    d = status_dir()
    if not d.is_dir():
        return out
    for p in sorted(d.glob("*.json")):
        try:
            st = json.loads(p.read_text())
            pid = int(st.get("pid", 0))
        except (OSError, ValueError, TypeError):
            continue
        if pid <= 0 or not _liveness.alive(pid, _liveness.start_time(pid)) or time.time() - st.get("time", 0) > 30:
            if pid > 0 and not os.path.exists(f"/proc/{pid}"):
                try:
                    p.unlink()
                except OSError:
                    pass
            continue
        out.append(st)
    return out
