"""CUDA MPS (Multi-Process Service) for this user: is a daemon serving us, and a per-user one to start and stop.

Why texbridge cares: without MPS every CUDA process has its own GPU context and the GPU time-slices between them, so
a frame handed between two processes that each run a kernel pays a context switch each way. Under MPS the processes'
work goes through one server context and runs back to back. Measured on an H200 (`texbridge bench cuda --mps`): a
1080p frame round trip with one tiny kernel per side went from 410 us to 57 us.

How a process ends up under MPS: at cuInit the CUDA driver looks for a control daemon in $CUDA_MPS_PIPE_DIRECTORY
(default /tmp/nvidia-mps); if one answers, the process becomes an MPS client, otherwise it runs as usual. So the
choice is made per process, once, by that variable. texbridge's daemon uses per-user directories (`directories()`),
and a process uses it when it starts with CUDA_MPS_PIPE_DIRECTORY set to that pipe directory (`client_env()`;
`texbridge mps env` prints the line for a shell).

Limits (docs/performance.md): MPS is CUDA-only (Vulkan and GL contexts are not affected: they keep time-slicing);
one user's MPS server has a GPU at a time (a second user's clients wait until the first user's clients are done, or
run without MPS with their own daemon); a client that crashes can take the other clients of its server down with it.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ._errors import BackendError

CONTROL = "nvidia-cuda-mps-control"
DEFAULT_PIPE_DIRECTORY = "/tmp/nvidia-mps"  # where CUDA looks when CUDA_MPS_PIPE_DIRECTORY is unset
# What the issue measured on an H200 (one kernel per side, 1080p rgba8 handoff round trip), quoted by `doctor`.
MEASURED_GAIN = "on an H200 a 1080p handoff with one kernel per side went 410 -> 57 us (7x)"
_TIMEOUT = 10.0


@dataclass(frozen=True)
class Directories:
    pipe: Path  # CUDA_MPS_PIPE_DIRECTORY: the control daemon's and server's sockets and pipes
    log: Path  # CUDA_MPS_LOG_DIRECTORY: control.log and server.log


@dataclass(frozen=True)
class Status:
    running: bool  # a control daemon answers in `pipe`
    pipe: Path
    detail: str  # one line: what answered, or why nothing did
    servers: tuple[int, ...] = ()  # MPS server pids (a server starts with the first client)


def control_path() -> str | None:
    """The nvidia-cuda-mps-control binary on PATH (it ships with the NVIDIA driver's compute utilities), or None."""
    return shutil.which(CONTROL)


def directories() -> Directories:
    """texbridge's per-user MPS directories: `mps/pipe` and `mps/log` under the runtime dir (_paths.runtime_dir)."""
    from ._paths import runtime_dir

    base = runtime_dir() / "mps"
    return Directories(base / "pipe", base / "log")


def client_env(dirs: Directories | None = None) -> dict[str, str]:
    """The variables that make a CUDA process a client of texbridge's daemon (set before the process starts CUDA)."""
    d = dirs or directories()
    return {"CUDA_MPS_PIPE_DIRECTORY": str(d.pipe), "CUDA_MPS_LOG_DIRECTORY": str(d.log)}


def serving_pipe() -> Path:
    """The pipe directory this process's CUDA would look in: $CUDA_MPS_PIPE_DIRECTORY, else /tmp/nvidia-mps."""
    return Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_PIPE_DIRECTORY)


def require_control() -> str:
    path = control_path()
    if path is None:
        raise BackendError(f"{CONTROL} is not on PATH: MPS ships with the NVIDIA driver's compute utilities (Debian/Ubuntu: "
                       f"nvidia-compute-utils-<version> or nvidia-utils-<version>); install them or add their "
                       f"directory to PATH. MPS only helps CUDA on NVIDIA GPUs")
    return path


def _control(pipe: Path, command: str | None = None, *, log: Path | None = None, daemon: bool = False,
             timeout: float = _TIMEOUT) -> subprocess.CompletedProcess:
    """Run the control binary: a command on its stdin (client mode), or `-d` (daemon=True). The daemon's output goes
    to a file, not a pipe: a daemon that kept an inherited pipe open would leave us waiting for EOF."""
    env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=str(pipe))
    if log is not None:
        env["CUDA_MPS_LOG_DIRECTORY"] = str(log)
    binary = require_control()
    try:
        if not daemon:
            return subprocess.run([binary], env=env, capture_output=True, text=True, timeout=timeout,
                                  input=(command or "") + "\n")
        out_path = (log or pipe) / "texbridge-start.out"
        with open(out_path, "w+") as out:
            proc = subprocess.run([binary, "-d"], env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                  timeout=timeout)
            out.seek(0)
            return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), "")
    except subprocess.TimeoutExpired:
        raise BackendError(f"{CONTROL} did not answer within {timeout:g}s (pipe directory {pipe})") from None
    except OSError as e:
        raise BackendError(f"cannot run {CONTROL}: {e}") from None


def status(pipe: Path | None = None) -> Status:
    """Whether a control daemon answers in `pipe` (default: the one this process's CUDA would use). Never starts one.

    Without the control binary, the pipe directory's `control` socket is the only evidence (a daemon that died
    leaves it behind, so the answer says it is unconfirmed)."""
    pipe = Path(pipe) if pipe is not None else serving_pipe()
    control = pipe / "control"
    if control_path() is None:
        if _is_socket_or_fifo(control):
            return Status(True, pipe, f"{control} exists ({CONTROL} is not on PATH to confirm a daemon answers)")
        return Status(False, pipe, f"no MPS control daemon in {pipe} ({CONTROL} is not on PATH either)")
    if not pipe.is_dir():
        return Status(False, pipe, f"no MPS control daemon in {pipe} (no such directory)")
    proc = _control(pipe, "get_server_list")
    if proc.returncode != 0:
        why = (proc.stderr or proc.stdout).strip().splitlines()
        return Status(False, pipe, f"no MPS control daemon answers in {pipe}" + (f" ({why[-1]})" if why else ""))
    servers = tuple(int(w) for w in proc.stdout.split() if w.isdigit())
    return Status(True, pipe, f"MPS control daemon in {pipe}; "
                              + (f"server pid(s) {', '.join(map(str, servers))}" if servers else
                                 "no server yet (one starts with the first CUDA client)"), servers)


def start(dirs: Directories | None = None) -> tuple[Status, bool]:
    """Start texbridge's per-user control daemon (`nvidia-cuda-mps-control -d` with its own pipe and log
    directories, 0700). Returns (status, started): started is False when one was already running there."""
    d = dirs or directories()
    require_control()
    if dirs is None:
        from ._paths import ensure_runtime_dir

        ensure_runtime_dir()  # 0700 and ours, like the brokers' sockets beside it
    for p in (d.pipe.parent, d.pipe, d.log):
        _private_dir(p)
    current = status(d.pipe)
    if current.running:
        return current, False
    proc = _control(d.pipe, log=d.log, daemon=True)
    if proc.returncode != 0:
        raise BackendError(f"{CONTROL} -d failed (exit {proc.returncode}): "
                       f"{(proc.stderr or proc.stdout).strip() or 'no output'}; see {d.log / 'control.log'}")
    deadline = time.monotonic() + _TIMEOUT
    while True:
        current = status(d.pipe)
        if current.running:
            return current, True
        if time.monotonic() > deadline:
            raise BackendError(f"the MPS control daemon started but does not answer in {d.pipe} after {_TIMEOUT:g}s; "
                           f"see {d.log / 'control.log'}")
        time.sleep(0.05)


def stop(dirs: Directories | None = None, *, timeout: float = 30.0) -> bool:
    """Ask texbridge's daemon to quit (`echo quit | nvidia-cuda-mps-control`) and wait until it is gone. False when
    none was running. The daemon stops its servers once their clients have exited."""
    d = dirs or directories()
    require_control()
    if not status(d.pipe).running:
        return False
    proc = _control(d.pipe, "quit", log=d.log)
    if proc.returncode != 0:
        raise BackendError(f"'quit' to the MPS control daemon failed (exit {proc.returncode}): "
                       f"{(proc.stderr or proc.stdout).strip() or 'no output'}")
    deadline = time.monotonic() + timeout
    while status(d.pipe).running:
        if time.monotonic() > deadline:
            raise BackendError(f"the MPS control daemon in {d.pipe} is still running {timeout:g}s after 'quit' "
                           f"(CUDA clients still attached? `nvidia-smi` lists them)")
        time.sleep(0.05)
    return True


def _private_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise BackendError(f"cannot create {path}: {e}") from None
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise BackendError(f"{path} is not a directory owned by uid {os.getuid()}; refusing to use it")


def _is_socket_or_fifo(path: Path) -> bool:
    try:
        mode = path.lstat().st_mode
    except OSError:
        return False
    return stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode)
