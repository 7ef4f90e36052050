"""`texbridge gst-plugin-path`: the directory to put in GST_PLUGIN_PATH for texbridgesink / texbridgesrc."""

from __future__ import annotations

import click

from ._common import console, fail


@click.command("gst-plugin-path")
def gst_plugin_path() -> None:
    """Print the directory that makes GStreamer find texbridgesink and texbridgesrc:

    GST_PLUGIN_PATH=$(texbridge gst-plugin-path) gst-launch-1.0 videotestsrc ! texbridgesink sender=X

    It holds two loader files for GStreamer's Python plugin loader (Debian: gstreamer1.0-python3-plugin-loader,
    python3-gst-1.0) that add this Python environment's packages to the loader's sys.path, so it works from a venv
    or a checkout; the system Python GStreamer runs must be the same minor version as this one. With a venv
    activated (its bin/ first on PATH), GStreamer's loader cannot find PyGObject: it warns on stderr."""
    from ..gst import path_problem, plugin_path

    try:
        path = plugin_path()
    except OSError as e:
        fail(f"cannot write the GStreamer loader files: {e}")
    console.print(str(path), markup=False, highlight=False, soft_wrap=True)
    problem = path_problem()
    if problem:
        click.echo(f"texbridge: warning: {problem}", err=True)
