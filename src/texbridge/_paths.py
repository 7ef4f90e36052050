"""Where a namespace's broker lives: $XDG_RUNTIME_DIR/texbridge/<namespace>.sock, else /tmp/texbridge-<uid>/.

The directory is created 0700 and must belong to us: another user's directory in /tmp could otherwise be used to
hijack or spy on the socket.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from ._errors import AccessDenied, BrokerUnavailable

_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def namespace_name(namespace: str | None = None) -> str:
    ns = namespace or os.environ.get("TEXBRIDGE_NAMESPACE") or "default"
    if not _NAMESPACE_RE.match(ns):
        raise ValueError(f"namespace {ns!r}: use 1-64 of A-Z a-z 0-9 _ . - (not starting with . _ -)")
    return ns


def runtime_dir() -> Path:
    override = os.environ.get("TEXBRIDGE_RUNTIME_DIR")
    if override:
        return Path(override)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "texbridge"
    return Path(f"/tmp/texbridge-{os.getuid()}")


def ensure_runtime_dir(mode: int = 0o700) -> Path:
    d = runtime_dir()
    try:
        d.mkdir(mode=mode, parents=True, exist_ok=True)
    except OSError as e:
        raise BrokerUnavailable(f"cannot create {d}: {e}") from None
    st = d.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise AccessDenied(f"{d} is not a directory owned by uid {os.getuid()}; refusing to use it")
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(d, mode)
    return d


def socket_path(namespace: str | None = None) -> Path:
    return runtime_dir() / f"{namespace_name(namespace)}.sock"


def lock_path(namespace: str | None = None) -> Path:
    return runtime_dir() / f"{namespace_name(namespace)}.lock"
