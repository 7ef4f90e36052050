"""The `texbridge` command. One module per command family; shared plumbing in `_common`:

    resources  ls, info                     broker  broker start|stop|status
    senders    send-test, senders, view     demo    demo (and the two processes it runs)
    doctor     doctor (and what it gathers) bench   bench (runs texbridge.benchmarks)
    viewer     the GLFW window and test pattern behind view and send-test
    mps        mps start|stop|status|env (a per-user CUDA MPS daemon)
    bridge     bridge serve|join|vm-args|remove|status (a VM's shared file, TCP)
    gst        gst-plugin-path (GStreamer elements: texbridge/gst/)

Only the public Session API is used (plus the broker launcher and diagnostics), so the CLI exercises exactly what
applications use. Commands that only look (ls, info, broker status/stop) never auto-start a broker.
"""

from __future__ import annotations

import click

from . import bench, bridge, broker, demo, doctor, gst, mps, resources, senders
from ._common import namespace_option


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="texbridge")
@namespace_option
def main() -> None:
    """texbridge: DXGI-style shared textures and buffers between Linux processes.

    -n/--namespace works before the command (texbridge -n show ls) or after it (texbridge ls -n show)."""


for _command in (demo.demo, resources.ls, resources.info, broker.broker, doctor.doctor, bench.bench,
                 senders.send_test, senders.senders, senders.view, mps.mps, bridge.bridge, gst.gst_plugin_path):
    main.add_command(_command)

__all__ = ["main"]
