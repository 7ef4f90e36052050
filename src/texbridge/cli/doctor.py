"""`texbridge doctor`: what this machine can share, one topic per backend plus the platform and the keyed mutex.

Each backend reports through its own `diagnostics()` (the backend knows its API best: Vulkan devices and their
external-memory extensions, EGL/GL memory-object extensions, CUDA devices). This module only aggregates, and it must
never raise: a missing library, a broken driver or a backend that crashes while probing all become a topic that says
"unavailable" and why, because `doctor` is exactly what people run when something is missing.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

import click
from rich.markup import escape
from rich.tree import Tree

from ..backends import BACKENDS
from ._common import console, json_option, print_json


def backend_report(name: str) -> dict[str, Any]:
    """One backend's diagnostics, or why it cannot give any."""
    from .._errors import BackendError
    from ..backends import get_backend

    try:
        backend = get_backend(name)
    except BackendError as e:
        return {"available": False, "detail": str(e)}
    except Exception as e:  # a backend module that fails to import in an unexpected way
        return {"available": False, "detail": f"loading the backend failed: {type(e).__name__}: {e}"}
    try:
        report = backend.diagnostics()
    except Exception as e:  # diagnostics() must not raise; if it does, say so instead of crashing doctor
        return {"available": False, "detail": f"diagnostics failed: {type(e).__name__}: {e}"}
    if not isinstance(report, dict):
        return {"available": False, "detail": f"diagnostics returned {type(report).__name__}, not a mapping"}
    return report


def keyed_mutex_report() -> dict[str, Any]:
    """Whether the compiled futex core of the keyed mutex is built and importable."""
    try:
        from .. import _synccore  # noqa: F401
    except ImportError as e:
        return {"available": False, "detail": f"the compiled core is missing ({e}); run `pip install -e .`"}
    try:
        from .. import keyed_mutex  # noqa: F401
    except ImportError as e:
        return {"available": False, "detail": f"the compiled core is built but texbridge.keyed_mutex is missing: {e}"}
    return {"available": True, "detail": "C11 atomics + futex core built"}


def platform_report() -> dict[str, Any]:
    from .._paths import namespace_name, runtime_dir

    try:
        namespace = namespace_name()
    except ValueError as e:
        namespace = f"invalid TEXBRIDGE_NAMESPACE: {e}"
    import numpy

    return {
        "available": True,
        "detail": f"{platform.system()} {platform.release()} {platform.machine()}, Python {platform.python_version()}",
        "python": sys.executable,
        "numpy": numpy.__version__,
        "cpus": os.cpu_count(),
        "runtime dir": str(runtime_dir()),
        "namespace": namespace,
    }


def viewer_report() -> dict[str, Any]:
    """Whether `texbridge view` can open a window here: glfw and PyOpenGL importable, and a display to open it on."""
    import importlib.util

    missing, versions = [], {}
    try:
        import glfw

        versions["glfw"] = ".".join(map(str, glfw.get_version())) if hasattr(glfw, "get_version") else "present"
    except Exception as e:  # ImportError, or the bundled library failing to load
        missing.append(f"glfw ({type(e).__name__}: {e})")
    if importlib.util.find_spec("OpenGL") is None:
        missing.append("PyOpenGL")
    else:
        versions["PyOpenGL"] = "present"
    display = os.environ.get("WAYLAND_DISPLAY") or os.environ.get("DISPLAY") or ""
    problems = ([f"missing {', '.join(missing)}: pip install 'texbridge[view]'"] if missing else []) + \
        ([] if display else ["no display: neither DISPLAY nor WAYLAND_DISPLAY is set (run it in a desktop session, "
                             "or under xvfb-run)"])
    return {"available": not problems,
            "detail": "; ".join(problems) if problems else f"can open a window on {display}",
            "display": display or "-", **versions}


def mps_report(cuda: dict[str, Any] | None) -> dict[str, Any]:
    """Whether a CUDA MPS daemon serves this user's CUDA processes, and what starting one would gain: one line and
    the command. Only looks: never starts a daemon, never initializes CUDA (the cuda topic did)."""
    from .. import _mps

    if not cuda or not cuda.get("available"):
        why = (cuda or {}).get("detail", "the cuda backend is not loaded")
        return {"available": False, "detail": f"not applicable: MPS serves CUDA only, and CUDA is unavailable ({why})"}
    mine = _mps.status(_mps.directories().pipe)
    serving = _mps.status()
    if serving.running:
        return {"available": True, "detail": f"CUDA processes started from this shell are MPS clients: "
                                             f"{serving.detail}"}
    report: dict[str, Any] = {"available": False}
    if mine.running:
        report["detail"] = ("texbridge's MPS daemon runs, but this shell's CUDA processes do not use it "
                            f"(CUDA_MPS_PIPE_DIRECTORY is not {mine.pipe}): {_mps.MEASURED_GAIN}")
        report["command"] = 'eval "$(texbridge mps env)"'
    else:
        report["detail"] = (f"no MPS daemon serves this user: GPU frames handed between CUDA processes pay a context "
                            f"switch each way ({_mps.MEASURED_GAIN})")
        report["command"] = 'texbridge mps start && eval "$(texbridge mps env)"'
    if _mps.control_path() is None:
        report["note"] = f"{_mps.CONTROL} is not on PATH (NVIDIA compute utilities): install it first"
    return report


def collect() -> dict[str, dict[str, Any]]:
    """Every topic, in display order: platform, keyed mutex, each backend, CUDA MPS, then the viewer."""
    topics: dict[str, dict[str, Any]] = {}
    for name, probe in (("platform", platform_report), ("keyed mutex", keyed_mutex_report)):
        try:
            topics[name] = probe()
        except Exception as e:
            topics[name] = {"available": False, "detail": f"{type(e).__name__}: {e}"}
    for name in BACKENDS:
        topics[name] = backend_report(name)
    try:
        topics["mps"] = mps_report(topics.get("cuda"))
    except Exception as e:  # doctor never crashes (a broken control binary, an unreadable directory)
        topics["mps"] = {"available": False, "detail": f"{type(e).__name__}: {e}"}
    try:
        topics["viewer"] = viewer_report()
    except Exception as e:
        topics["viewer"] = {"available": False, "detail": f"{type(e).__name__}: {e}"}
    return topics


def _tree_add(node: Tree, value: Any) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, (dict, list)) and v:
                _tree_add(node.add(f"[bold]{k}[/]"), v)
            else:
                node.add(f"[bold]{k}[/]: {escape(_scalar(v))}")
    elif isinstance(value, list):
        if all(not isinstance(v, (dict, list)) for v in value):
            node.add(escape(", ".join(_scalar(v) for v in value)))
        else:
            for i, v in enumerate(value):
                _tree_add(node.add(f"[{i}]"), v)
    else:
        node.add(escape(_scalar(value)))


def _scalar(v: Any) -> str:
    if isinstance(v, bytes):
        return v.hex() or "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


@click.command()
@json_option
def doctor(as_json: bool) -> None:
    """What this machine can share: memfd, Vulkan, EGL/GL, CUDA (and whether an MPS daemon serves it), the keyed mutex core, and whether `view` can run."""
    topics = collect()
    if as_json:
        print_json(topics)
        return
    for topic, report in topics.items():
        ok = bool(report.get("available"))
        mark = "[green]✔[/]" if ok else "[red]✘[/]"
        tree = Tree(f"{mark} [bold]{topic}[/]: {escape(str(report.get('detail', '')))}")
        _tree_add(tree, {k: v for k, v in report.items() if k not in ("available", "detail")})
        console.print(tree, soft_wrap=True)
