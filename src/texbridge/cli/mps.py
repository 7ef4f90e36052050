"""`texbridge mps start|stop|status|env`: a per-user CUDA MPS daemon, so GPU frames handed between CUDA processes
stop paying a context switch each way (texbridge._mps says why and what the limits are; docs/performance.md)."""

from __future__ import annotations

import shlex

import click
from rich.markup import escape

from .. import _mps
from ._common import console, friendly


@click.group()
def mps() -> None:
    """A per-user CUDA MPS daemon: CUDA processes started with its pipe directory share one GPU context."""


def _env_line() -> str:
    return "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in _mps.client_env().items())


@mps.command("start")
@friendly
def mps_start() -> None:
    """Start the daemon (nvidia-cuda-mps-control -d) with texbridge's own pipe and log directories."""
    state, started = _mps.start()
    dirs = _mps.directories()
    verb = "started" if started else "already running:"
    console.print(f"MPS {verb} {escape(state.detail)}; log in {escape(str(dirs.log))}")
    console.print("CUDA processes use it when they start with:", markup=False)
    console.print(f"  {_env_line()}", markup=False, soft_wrap=True)
    console.print("(or: eval \"$(texbridge mps env)\"). Processes already running keep their own context.",
                  markup=False)


@mps.command("stop")
@click.option("--timeout", type=click.FloatRange(min=0), default=30.0, show_default=True, metavar="S",
              help="How long to wait for the daemon to exit (it waits for its CUDA clients to finish).")
@friendly
def mps_stop(timeout: float) -> None:
    """Stop texbridge's daemon (echo quit | nvidia-cuda-mps-control)."""
    if _mps.stop(timeout=timeout):
        console.print("MPS daemon stopped")
    else:
        console.print(f"no texbridge MPS daemon was running ({escape(str(_mps.directories().pipe))})")


@mps.command("status")
@friendly
def mps_status() -> None:
    """Whether texbridge's daemon runs, and whether this shell's CUDA processes would use an MPS daemon."""
    mine = _mps.status(_mps.directories().pipe)
    console.print(f"texbridge's daemon: {'running' if mine.running else 'not running'} ({escape(mine.detail)})")
    serving = _mps.status()
    if serving.pipe != mine.pipe:
        console.print(f"this shell's CUDA processes ($CUDA_MPS_PIPE_DIRECTORY or {_mps.DEFAULT_PIPE_DIRECTORY}): "
                      f"{'served' if serving.running else 'not served'} ({escape(serving.detail)})")
    else:
        console.print(f"this shell's CUDA processes: {'served by it' if serving.running else 'not served'}")
    if _mps.control_path() is None:
        console.print(f"{_mps.CONTROL} is not on PATH: `texbridge mps start` needs it (NVIDIA compute utilities)",
                      markup=False)


@mps.command("env")
def mps_env() -> None:
    """Print the shell line that makes CUDA processes use texbridge's daemon: eval "$(texbridge mps env)"."""
    click.echo(_env_line())
