"""GStreamer figures (issue 13), peers in the same run: 1080p RGBA frames per second through texbridgesrc and
texbridgesink against appsrc / appsink moving the same frames as NumPy copies (what a Python program does without
texbridge), each pipeline ending in fakesink sync=false or starting at videotestsrc, so the elements are measured.

Rate = buffers / the time gst-launch reports between PLAYING and EOS (no start-up). texbridgesrc reads a sender in
this process that publishes a new frame as soon as the source took the last one (frame_sync; touching a few bytes
per frame: the source's copy is measured, not the producer's); appsrc pushes a NumPy frame copied into each buffer; appsink pulls each buffer and copies it out.
The peers run in the system Python GStreamer uses (with this environment's NumPy), as the elements do.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading

from ._report import Row, private_namespace, rate_row

W, H = 1920, 1080
CAPS = f"video/x-raw,format=RGBA,width={W},height={H},framerate=60/1"

_PEER = r"""
import sys, time, site
for p in sys.argv[3:]:
    site.addsitedir(p)
import numpy as np, gi
gi.require_version("Gst", "1.0"); gi.require_version("GstApp", "1.0")
from gi.repository import Gst, GstApp
Gst.init(None)
mode, n = sys.argv[1], int(sys.argv[2])
W, H = 1920, 1080
caps = Gst.Caps.from_string("video/x-raw,format=RGBA,width=%d,height=%d,framerate=60/1" % (W, H))
if mode == "appsrc":
    pipe = Gst.parse_launch("appsrc name=src format=time ! fakesink sync=false")
    src = pipe.get_by_name("src"); src.set_property("caps", caps)
    frame = np.full((H, W, 4), 7, np.uint8)
    pipe.set_state(Gst.State.PLAYING)
    t = time.perf_counter()
    for i in range(n):
        buf = Gst.Buffer.new_allocate(None, frame.nbytes, None)
        ok, m = buf.map(Gst.MapFlags.WRITE)
        np.copyto(np.ndarray(frame.shape, np.uint8, buffer=m.data), frame)
        buf.unmap(m)
        buf.pts = i * 16666667
        src.emit("push-buffer", buf)
    src.emit("end-of-stream")
else:
    pipe = Gst.parse_launch("videotestsrc num-buffers=%d pattern=black ! %s ! appsink name=sink sync=false"
                            % (n, caps.to_string()))
    sink = pipe.get_by_name("sink")
    pipe.set_state(Gst.State.PLAYING)
    t = time.perf_counter()
    got = 0
    while True:
        sample = sink.emit("pull-sample")
        if sample is None:
            break
        buf = sample.get_buffer()
        ok, m = buf.map(Gst.MapFlags.READ)
        out = np.frombuffer(m.data, np.uint8).reshape(H, W, 4).copy()
        buf.unmap(m)
        got += 1
bus = pipe.get_bus()
bus.timed_pop_filtered(Gst.CLOCK_TIME_NONE, Gst.MessageType.EOS | Gst.MessageType.ERROR)
print(time.perf_counter() - t)
pipe.set_state(Gst.State.NULL)
"""


def _skip_reason() -> str | None:
    if shutil.which("gst-launch-1.0") is None:
        return "gst-launch-1.0 not installed (Debian: gstreamer1.0-tools)"
    if subprocess.run(["gst-inspect-1.0", "python"], capture_output=True).returncode != 0:
        return "GStreamer's Python plugin loader is missing (Debian: gstreamer1.0-python3-plugin-loader)"
    return None


def _launch_seconds(env: dict[str, str], pipeline: str) -> float:
    """Seconds from PLAYING to EOS as gst-launch reports them."""
    proc = subprocess.run(["gst-launch-1.0", *pipeline.split()], capture_output=True, text=True, env=env,
                          timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"gst-launch-1.0 {pipeline} failed: {proc.stderr[-500:]}")
    m = re.search(r"Execution ended after (\d+):(\d+):(\d+\.\d+)", proc.stdout)
    if not m:
        raise RuntimeError(f"no timing in gst-launch's output: {proc.stdout[-300:]}")
    h, mi, s = m.groups()
    return int(h) * 3600 + int(mi) * 60 + float(s)


def _peer_seconds(env: dict[str, str], mode: str, n: int) -> float:
    from ..gst import _site_dirs

    proc = subprocess.run(["/usr/bin/python3", "-c", _PEER, mode, str(n), *_site_dirs()], capture_output=True,
                          text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} peer failed: {proc.stderr[-500:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def run(quick: bool) -> list[Row]:
    reason = _skip_reason()
    if reason:
        return [Row("gst 1080p", f"skipped: {reason}", 0.0, "frames/s", note=reason, higher_is_better=True)]
    import texbridge
    from ..gst import plugin_path

    n = 60 if quick else 600
    rows: list[Row] = []
    with private_namespace("bench-gst") as env:
        env = {**env, "GST_PLUGIN_PATH": str(plugin_path())}
        # source side: texbridgesrc from a sender publishing flat out, vs appsrc pushing NumPy copies
        stop = threading.Event()
        # frame_sync: the producer sleeps until the source took the last frame (no core spent spinning on a
        # 2-core machine), and a new frame is always ready when the source asks
        sender = texbridge.Sender("bench-gst", W, H, frame_sync=True, sync_timeout=0.2)

        def produce() -> None:
            while not stop.is_set():
                with sender.writing() as buf:
                    buf[0, 0, 0] = sender.frame_number & 0xFF

        t = threading.Thread(target=produce, daemon=True)
        t.start()
        try:
            s = _launch_seconds(env, f"texbridgesrc sender=bench-gst num-buffers={n} ! fakesink sync=false")
        finally:
            stop.set()
            t.join(5)
            sender.close()
        rows.append(rate_row("gst source 1080p RGBA -> fakesink", "texbridgesrc (sender in another process)", n, s,
                             "frames/s", "one copy: pinned slot -> buffer"))
        s = _peer_seconds(env, "appsrc", n)
        rows.append(rate_row("gst source 1080p RGBA -> fakesink", "appsrc + NumPy copy into each buffer", n, s,
                             "frames/s", "Python pushes from its own frame"))
        # sink side: videotestsrc into texbridgesink vs appsink + NumPy copy out
        s = _launch_seconds(env, f"videotestsrc num-buffers={n} pattern=black ! {CAPS} ! "
                                 "texbridgesink sender=bench-gst-sink sync=false")
        rows.append(rate_row("gst sink 1080p RGBA from videotestsrc", "texbridgesink (publishes a sender)", n, s,
                             "frames/s", "one copy: buffer -> slot"))
        s = _peer_seconds(env, "appsink", n)
        rows.append(rate_row("gst sink 1080p RGBA from videotestsrc", "appsink + NumPy copy of each buffer", n, s,
                             "frames/s", "Python pulls into its own array"))
        s = _launch_seconds(env, f"videotestsrc num-buffers={n} pattern=black ! {CAPS} ! fakesink sync=false")
        rows.append(rate_row("gst sink 1080p RGBA from videotestsrc", "fakesink (the source alone: the ceiling)", n,
                             s, "frames/s"))
    return rows


if __name__ == "__main__":
    import sys

    from ._report import print_rows

    print_rows(run("--quick" in sys.argv))
