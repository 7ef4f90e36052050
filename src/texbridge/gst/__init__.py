"""texbridge inside GStreamer: `texbridgesink` publishes a sender, `texbridgesrc` receives one (`_elements.py`).

GStreamer's Python plugin loader (Debian: gstreamer1.0-python3-plugin-loader, python3-gst-1.0) runs the *system*
Python and scans `<dir>/python/*.py` for every dir in GST_PLUGIN_PATH. texbridge may live in another environment (a
venv, an editable checkout), so `plugin_path()` writes two small loader files into a per-environment cache
directory that first put this environment's site directories on the loader's sys.path (site.addsitedir, so .pth
files and editable installs work), then hand over the element classes. `texbridge gst-plugin-path` prints it.
"""

from __future__ import annotations

import hashlib
import os
import site
import sys
from pathlib import Path

ELEMENTS = {"texbridgesink": "TexbridgeSink", "texbridgesrc": "TexbridgeSrc"}

_SHIM = '''\
# Written by `texbridge gst-plugin-path` for the Python environment at {prefix!r}: GStreamer's Python plugin loader
# (the system Python) loads this file; it adds that environment's site directories, then registers {element}.
# elements source {elements_hash} (a new texbridge rewrites this file, so GStreamer's registry rescans it)
import os, site, sys
_PATHS = {paths!r}
os.environ.setdefault("TEXBRIDGE_PYTHON", {python!r})  # a broker started from here runs in texbridge's environment
_VERSION = {version!r}
if sys.version_info[:2] != tuple(_VERSION):
    raise ImportError("texbridge is installed for Python %d.%d (%s) but GStreamer's plugin loader runs Python %d.%d: "
                      "install texbridge for that Python" % (*_VERSION, {prefix!r}, *sys.version_info[:2]))
for _p in _PATHS:
    if _p not in sys.path:
        site.addsitedir(_p)
from texbridge.gst._elements import {cls} as _element
__gstelementfactory__ = ({element!r}, _element.RANK, _element)
'''


def _site_dirs() -> list[str]:
    """Where this environment's packages are found: its site-packages, and the directory texbridge itself is imported
    from (an editable checkout's src/)."""
    dirs = [*site.getsitepackages(), site.getusersitepackages()] if site.ENABLE_USER_SITE else site.getsitepackages()
    here = str(Path(__file__).resolve().parents[2])
    return [d for d in dict.fromkeys([here, *dirs]) if os.path.isdir(d)]


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "texbridge" / "gst"


def plugin_path() -> Path:
    """The directory to put in GST_PLUGIN_PATH for this environment (its `python/` holds the loader files, written
    or refreshed now)."""
    paths = _site_dirs()
    key = hashlib.sha256("\0".join([sys.prefix, *paths]).encode()).hexdigest()[:16]
    root = cache_root() / key
    target = root / "python"
    target.mkdir(parents=True, exist_ok=True)
    elements_hash = hashlib.sha256((Path(__file__).parent / "_elements.py").read_bytes()).hexdigest()[:16]
    for element, cls in ELEMENTS.items():
        text = _SHIM.format(prefix=sys.prefix, python=sys.executable, element=element, cls=cls, paths=paths, elements_hash=elements_hash,
                            version=list(sys.version_info[:2]))
        path = target / f"{element}.py"
        if not path.exists() or path.read_text() != text:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)  # a loader scanning now sees the old file or the new one, never half of one
    return root


def path_problem(path_env: str | None = None) -> str | None:
    """Why GStreamer's Python loader would fail in this PATH, or None. The loader embeds the system Python, which
    takes the first `python3` on PATH for its home: an activated venv without system site packages then hides the
    system's `gi` (PyGObject), and the loader stops with "pygobject initialization failed" before texbridge's files
    are read. Nothing a plugin file can do fixes that, so the CLI says it."""
    for d in (path_env if path_env is not None else os.environ.get("PATH", "")).split(os.pathsep):
        exe = Path(d or ".") / "python3"
        if not exe.is_file():
            continue
        cfg = exe.parent.parent / "pyvenv.cfg"
        if not cfg.is_file():
            return None
        text = cfg.read_text(errors="replace").replace(" ", "").lower()
        if "include-system-site-packages=true" in text:
            return None
        return (f"the first python3 on PATH is the venv {exe.parent.parent} (no system site packages): GStreamer's "
                "Python loader would take it for its home and not find PyGObject (gi). Run gst-launch-1.0 with "
                f"that venv's bin/ off PATH (e.g. after `deactivate`), or make the venv with --system-site-packages")
    return None
