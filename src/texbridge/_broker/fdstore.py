"""Where the broker keeps registered fds: in its own fd table while there is room, past that in keeper processes.

Why: every registered resource is an open fd in the broker, and RLIMIT_NOFILE caps those. Where the broker may raise
the limit (CAP_SYS_RESOURCE) that is enough; where it may not (a hard limit of 20,000 is common in containers) a
broker would refuse the 20,001st resource. A keeper is a tiny child process whose only job is to hold fds: each has
its own fd table and limit, so capacity grows by one limit per keeper.

The registry never sees the difference: it is given *tokens*. A token > 0 names an fd in this process; a token < 0
names an fd a keeper holds. Tokens are never reused, unlike fd numbers: a token dropped twice, or used after its
drop, can never reach another fd (a raw fd number could by then be a client's memfd). resolve() turns tokens into
fds usable now (fetching kept ones as temporary copies); drop() releases tokens. The keeper itself, and its wire format, are in _keeper.py (standard library only, run by
path, so a keeper costs a bare interpreter).

A keeper can die (kill -9, OOM killer). Its fds are then gone for good: the store notices (a failed request, or
check() finding it exited), reaps it, and lists its tokens in take_lost() so the server retires those resources
(NotFound from then on, watchers told). Later fds go to a fresh keeper: a dead one never blocks registrations.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

from .._seqpacket import close_fds, recv_frame, send_frame
from ._keeper import ID as _ID

log = logging.getLogger("texbridge.broker")
_KEEPER_SCRIPT = str(Path(__file__).with_name("_keeper.py"))


def local_capacity() -> int:
    """How many resource fds the broker keeps itself: its fd limit less room for clients and housekeeping."""
    override = os.environ.get("TEXBRIDGE_BROKER_LOCAL_FDS")
    if override:
        return max(0, int(override))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(0, soft - max(2048, soft // 4))


class KeeperError(OSError):
    """A keeper request failed. `dead`: the keeper itself failed or went away, and every fd it held is lost."""

    def __init__(self, message: str, dead: bool = True) -> None:
        super().__init__(message)
        self.dead = dead


_KEEPER_TIMEOUT = 10.0  # a keeper answers in microseconds; one that does not answer in this long is declared dead


class _Keeper:
    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen([sys.executable, "-I", _KEEPER_SCRIPT, str(theirs.fileno())],
                                         pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, close_fds=True)
        finally:
            theirs.close()
        self.sock = ours
        ours.settimeout(_KEEPER_TIMEOUT)  # a stopped keeper must not hang the broker
        self.count = 0
        try:
            self.capacity = int(self._ask(b"C", ())[1:])
        except (KeeperError, ValueError):
            self.close(kill=True)
            raise KeeperError("an fd keeper failed to start") from None

    def _ask(self, request: bytes, fds: tuple[int, ...] | list[int]) -> bytes:
        return self._ask_fds(request, fds)[0]

    def _ask_fds(self, request: bytes, fds: tuple[int, ...] | list[int]) -> tuple[bytes, list[int]]:
        try:
            send_frame(self.sock, request, fds)
            data, got, _ = recv_frame(self.sock)
        except OSError as e:
            raise KeeperError(f"fd keeper pid {self.proc.pid} failed: {e}") from None
        if not data:
            raise KeeperError(f"fd keeper pid {self.proc.pid} exited")
        return data, got

    def put(self, fd: int) -> int:
        reply = self._ask(b"P", [fd])
        if len(reply) != _ID.size:
            self.capacity = self.count  # full: the next put starts another keeper
            raise KeeperError(f"fd keeper pid {self.proc.pid} could not take an fd", dead=False)
        ident = _ID.unpack(reply)[0]
        self.count += 1
        return ident

    def get(self, ident: int) -> int:
        data, fds = self._ask_fds(b"G" + _ID.pack(ident), ())
        if data[:1] != b"K" or len(fds) != 1:
            close_fds(fds)
            raise KeeperError(f"fd keeper pid {self.proc.pid} has no fd {ident}", dead=False)
        return fds[0]

    def drop(self, ident: int) -> None:
        try:
            send_frame(self.sock, b"D" + _ID.pack(ident))
        except OSError:
            pass
        self.count -= 1

    def exited(self) -> bool:
        return self.proc.poll() is not None  # reaps it when it has

    def close(self, kill: bool = False) -> None:
        """Idempotent. The keeper exits on EOF, closing everything it held; `kill` for one that went wrong."""
        self.sock.close()
        if kill and self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class FdStore:
    """Tokens for registered fds; see the module docstring."""

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = local_capacity() if capacity is None else capacity
        self._local: dict[int, int] = {}  # token -> an fd this process holds for the registry; closed once, by drop()
        self._keepers: list[_Keeper] = []
        self._kept: dict[int, tuple[_Keeper, int]] = {}
        self._next = 1
        self._lost: list[int] = []  # tokens of dead keepers, not yet taken by the server

    def keep(self, fds: list[int]) -> list[int]:
        """Tokens for fds just received (ownership passes to the store); fds past local capacity go to a keeper."""
        tokens = []
        for i, fd in enumerate(fds):
            if len(self._local) < self.capacity:
                self._local[self._next] = fd
                tokens.append(self._next)
                self._next += 1
                continue
            try:
                keeper, ident = self._put(fd)
            except (KeeperError, OSError):
                self.drop(tokens)
                close_fds(fds[i:])
                raise
            os.close(fd)
            token = -self._next
            self._next += 1
            self._kept[token] = (keeper, ident)
            tokens.append(token)
        return tokens

    def resolve(self, tokens) -> tuple[list[int], list[int]]:
        """(fds usable now, temporary fds the caller closes after use)."""
        fds, temps = [], []
        try:
            for t in tokens:
                if t >= 0:
                    fds.append(self._local[t])  # KeyError for a dropped token, like a lost one
                else:
                    keeper, ident = self._kept[t]
                    try:
                        fd = keeper.get(ident)
                    except KeeperError as e:
                        if e.dead:
                            self._bury(keeper)
                        raise
                    temps.append(fd)
                    fds.append(fd)
        except BaseException:
            close_fds(temps)
            raise
        return fds, temps

    def drop(self, tokens) -> None:
        """Release tokens; one not held (dropped twice) is ignored."""
        for t in tokens:
            if t >= 0:
                fd = self._local.pop(t, None)
                if fd is None:
                    log.error("fd token %d dropped twice (ignored)", t)
                else:
                    close_fds([fd])
            else:
                entry = self._kept.pop(t, None)
                if entry is not None:
                    entry[0].drop(entry[1])

    @property
    def local(self) -> int:
        return len(self._local)

    @property
    def spilled(self) -> int:
        return len(self._kept)

    def keeper_pids(self) -> list[int]:
        return [k.proc.pid for k in self._keepers]

    def check(self) -> None:
        """Notice keepers that died on their own (their tokens go to take_lost())."""
        for k in [k for k in self._keepers if k.exited()]:
            self._bury(k)

    @property
    def lost(self) -> bool:
        """Whether take_lost() has tokens to give (cheap: asked after every request)."""
        return bool(self._lost)

    def take_lost(self) -> list[int]:
        """Tokens whose fds died with their keeper since the last call: the server retires their resources."""
        lost, self._lost = self._lost, []
        return lost

    def close(self) -> None:
        for k in self._keepers:
            k.close()
        self._keepers.clear()
        self._kept.clear()

    def _put(self, fd: int) -> tuple[_Keeper, int]:
        """Hand fd to a keeper with room; a keeper found dead on the way is buried and the next one tried."""
        error: KeeperError | None = None
        for _ in range(3):
            try:
                keeper = self._keeper_with_room()  # KeeperError when a new one died starting
            except KeeperError as e:
                error = e
                continue
            try:
                return keeper, keeper.put(fd)
            except KeeperError as e:
                error = e
                if e.dead:
                    self._bury(keeper)
                # else it is merely full (capacity lowered): the next round picks or starts another keeper
        raise KeeperError(f"fd keepers keep failing: {error}")

    def _bury(self, keeper: _Keeper) -> None:
        """A keeper is dead or broken: reap it, forget it, and queue its tokens as lost."""
        if keeper in self._keepers:
            self._keepers.remove(keeper)
        keeper.close(kill=True)
        lost = [t for t, (k, _) in self._kept.items() if k is keeper]
        for t in lost:
            del self._kept[t]
        self._lost.extend(lost)
        log.error("fd keeper %d died (exit %s): %d resource fds lost", keeper.proc.pid, keeper.proc.returncode,
                  len(lost))

    def _keeper_with_room(self) -> _Keeper:
        for k in self._keepers:
            if k.count < k.capacity:
                return k
        k = _Keeper()
        self._keepers.append(k)
        log.info("fd keeper %d started (capacity %d fds)", k.proc.pid, k.capacity)
        return k
