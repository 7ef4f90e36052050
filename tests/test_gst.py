"""GStreamer elements (issue 13): real gst-launch-1.0 pipelines with texbridgesink and texbridgesrc, pixel-exact,
buffer times carried as frame timestamps, renegotiation on resize, errors as bus messages.

The plugin is found the way users find it: GST_PLUGIN_PATH=$(texbridge gst-plugin-path) and nothing else (the
registry file is private to the test, so a user's cached registry plays no part).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import texbridge

GST_LAUNCH = shutil.which("gst-launch-1.0")


def _loader_problem() -> str | None:
    if GST_LAUNCH is None:
        return "gst-launch-1.0 not installed (Debian: gstreamer1.0-tools)"
    probe = subprocess.run(["gst-inspect-1.0", "python"], capture_output=True, text=True)
    if probe.returncode != 0:
        return "GStreamer's Python plugin loader is missing (Debian: gstreamer1.0-python3-plugin-loader)"
    system = subprocess.run(["python3", "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True,
                            text=True, env={"PATH": "/usr/bin:/bin"})
    if system.stdout.split() != [str(v) for v in sys.version_info[:2]]:
        return f"the system Python ({system.stdout.strip()}) is not this Python's minor version"
    return None


pytestmark = pytest.mark.skipif(_loader_problem() is not None, reason=str(_loader_problem()))


@pytest.fixture
def gst_env(runtime, tmp_path):
    """The environment a user has: this test's broker namespace, plus GST_PLUGIN_PATH from the CLI."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    # A user runs gst-launch without texbridge's venv activated (scripts/dev puts .venv/bin first on PATH): with it
    # first, GStreamer's embedded Python takes the venv for its home and cannot import gi (see path_problem()).
    venv_bin = os.path.dirname(sys.executable)
    env["PATH"] = os.pathsep.join(d for d in env.get("PATH", "").split(os.pathsep) if d != venv_bin)
    out = subprocess.run([sys.executable, "-m", "texbridge.cli", "gst-plugin-path"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    path = out.stdout.strip()
    assert os.path.isfile(os.path.join(path, "python", "texbridgesink.py"))
    env.update(GST_PLUGIN_PATH=path, GST_REGISTRY=str(tmp_path / "registry.bin"))
    return env


def launch(env, pipeline: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([GST_LAUNCH, "-v", *pipeline.split()], capture_output=True, text=True, env=env,
                          timeout=timeout, **kw)


def spawn(env, pipeline: str) -> subprocess.Popen:
    return subprocess.Popen([GST_LAUNCH, "-v", *pipeline.split()], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def reference(env, tmp_path, caps: str, pattern: str = "smpte75") -> bytes:
    """One frame of videotestsrc as GStreamer itself writes it (the same run's plugins)."""
    out = tmp_path / "ref.raw"
    proc = launch(env, f"videotestsrc num-buffers=1 pattern={pattern} ! {caps} ! filesink location={out}")
    assert proc.returncode == 0, proc.stderr
    return out.read_bytes()


def test_the_plugin_path_alone_makes_both_elements_loadable(gst_env):
    for element in ("texbridgesink", "texbridgesrc"):
        proc = subprocess.run(["gst-inspect-1.0", element], capture_output=True, text=True, env=gst_env, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert re.search(r"^\s+sender\s+:", proc.stdout, re.M), proc.stdout


def _collect(rx: texbridge.Receiver, until: threading.Event, into: list) -> None:
    while not until.is_set():
        frame = rx.next_frame(0.1)
        if frame is not None:
            into.append(frame)


@pytest.mark.parametrize("gst_format, fmt, pixel_size", [("RGBA", "rgba8", 4), ("BGRA", "bgra8", 4),
                                                         ("RGB", "rgba8", 3), ("BGR", "bgra8", 3),
                                                         ("GRAY8", "r8", 1)])
def test_texbridgesink_publishes_pixel_exact_frames_stamped_with_buffer_times(gst_env, tmp_path, gst_format, fmt,
                                                                               pixel_size):
    caps = f"video/x-raw,format={gst_format},width=64,height=48,framerate=30/1"
    ref = np.frombuffer(reference(gst_env, tmp_path, caps), np.uint8)
    if pixel_size == 3:  # 3-byte rows are padded to 4 bytes in GStreamer's buffers: 64 * 3 = 192 needs none
        ref = ref.reshape(48, 64, 3)
        alpha = np.full((48, 64, 1), 255, np.uint8)
        ref = np.concatenate([ref, alpha], axis=2)  # RGB -> RGBA, BGR -> BGRA: the sender's layouts
    ref = ref.reshape(48, 64, -1)
    rx = texbridge.Receiver("gst-sink")
    frames: list[texbridge.Frame] = []
    stop = threading.Event()
    t = threading.Thread(target=_collect, args=(rx, stop, frames))
    t.start()
    try:
        proc = launch(gst_env, f"videotestsrc num-buffers=30 pattern=smpte75 ! {caps} ! "
                               "texbridgesink sender=gst-sink")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        time.sleep(0.2)
    finally:
        stop.set()
        t.join(5)
        rx.close()
    assert len(frames) >= 3, f"only {len(frames)} frames arrived"
    for f in frames:
        assert (f.width, f.height, f.format) == (64, 48, fmt)
        assert np.array_equal(f.pixels.reshape(48, 64, -1), ref), f"frame {f.frame_number} differs"
    # 30/1 buffers: pts k/30 s; the sink stamps base_time + running time on the monotonic system clock
    steps = [(b.timestamp_ns - a.timestamp_ns) / (1e9 / 30) for a, b in zip(frames, frames[1:])]
    assert all(abs(s - round(s)) < 1e-6 and round(s) >= 1 for s in steps), steps
    assert abs(frames[-1].timestamp_ns - time.monotonic_ns()) < 30e9


PATTERN = np.random.default_rng(4).integers(0, 256, (48, 64, 4), dtype=np.uint8)
SMALL = np.random.default_rng(5).integers(0, 256, (16, 32, 4), dtype=np.uint8)


def _send_patterns(stop: threading.Event, resize_at: int, name: str = "gst-src", period: float = 0.005) -> None:
    """Frame n is PATTERN ^ n (64x48), from frame resize_at SMALL ^ n (32x16): every byte checks the frame."""
    with texbridge.Sender(name, 64, 48) as s:
        s.wait_for_receivers(1, 30)  # texbridgesrc attached: from now on it sees every size
        n = 0
        while not stop.is_set():
            n += 1
            if n == resize_at:
                s.resize(32, 16)
            s.send((PATTERN if n < resize_at else SMALL) ^ np.uint8(n % 256))
            time.sleep(period)


def _whole_frames(data: bytes, base: np.ndarray) -> int:
    """How many whole frames `data` holds, each `base ^ n` for some n (a torn or shifted frame fails)."""
    frames = np.frombuffer(data, np.uint8).reshape(-1, base.size)
    for i, f in enumerate(frames):
        n = int(f[0] ^ base.reshape(-1)[0])
        assert np.array_equal(f, (base ^ np.uint8(n)).reshape(-1)), f"buffer {i} is not one whole frame"
    return len(frames)


def test_texbridgesrc_gives_pixel_exact_buffers_and_renegotiates_on_resize(gst_env, tmp_path):
    stop = threading.Event()
    t = threading.Thread(target=_send_patterns, args=(stop, 60))
    t.start()
    try:
        proc = launch(gst_env, f"texbridgesrc sender=gst-src num-buffers=100 ! "
                               f"multifilesink location={tmp_path}/buf-%03d.raw")
    finally:
        stop.set()
        t.join(10)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    caps = re.findall(r"texbridgesrc0\.GstPad:src: caps = (.*)", proc.stdout)
    assert any("width=(int)64, height=(int)48" in c for c in caps) and \
        any("width=(int)32, height=(int)16" in c for c in caps), caps
    files = sorted(tmp_path.glob("buf-*.raw"))
    assert len(files) == 100
    sizes, last = [], -1
    for f in files:
        data = np.frombuffer(f.read_bytes(), np.uint8)
        base = PATTERN if data.size == PATTERN.size else SMALL
        assert data.size == base.size, f"{f.name}: {data.size} bytes"
        n = int(data[0] ^ base.reshape(-1)[0])
        assert np.array_equal(data, (base ^ np.uint8(n)).reshape(-1)), f"{f.name} is not one whole frame"
        sizes.append(data.size)
    assert sizes == sorted(sizes, reverse=True) and sizes[0] != sizes[-1], "big frames, then (after the resize) small"


def test_a_frame_crosses_gstreamer_and_back_pixel_exact(gst_env, tmp_path):
    """videotestsrc ! texbridgesink in one process, texbridgesrc ! filesink in another."""
    caps = "video/x-raw,format=BGRA,width=80,height=60,framerate=60/1"
    ref = reference(gst_env, tmp_path, caps, "colors")
    sink = spawn(gst_env, f"videotestsrc is-live=true pattern=colors ! {caps} ! texbridgesink sender=gst-rt")
    try:
        out = tmp_path / "rt.raw"
        proc = launch(gst_env, f"texbridgesrc sender=gst-rt num-buffers=5 ! filesink location={out}")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        data = out.read_bytes()
        assert len(data) == 5 * len(ref) and data == ref * 5
        assert "format=(string)BGRA, width=(int)80, height=(int)60" in proc.stdout
    finally:
        sink.terminate()
        sink.wait(10)


def test_errors_are_bus_errors_not_tracebacks(gst_env, session):
    taken = session.create_texture(8, 8, "rgba8", name="gst-taken")
    try:
        proc = launch(gst_env, "videotestsrc num-buffers=2 ! texbridgesink sender=gst-taken")
        assert proc.returncode != 0
        assert "texbridgesink" in proc.stderr + proc.stdout and "gst-taken" in proc.stderr + proc.stdout
        proc = launch(gst_env, "texbridgesrc sender=gst-taken num-buffers=1 ! fakesink")
        assert proc.returncode != 0 and "not a sender" in proc.stderr + proc.stdout
    finally:
        taken.close()


PIPEWIRE_SCRIPT = r"""
pipewire > "$XDG_RUNTIME_DIR/pipewire.log" 2>&1 &
for i in $(seq 50); do [ -S "$XDG_RUNTIME_DIR/pipewire-0" ] && break; sleep 0.1; done
wireplumber > "$XDG_RUNTIME_DIR/wireplumber.log" 2>&1 &
sleep 1
gst-launch-1.0 $PROVIDE ! \
    pipewiresink mode=provide stream-properties="props,media.class=Video/Source,node.name=texbridge-test" \
    > "$XDG_RUNTIME_DIR/provide.log" 2>&1 &
for i in $(seq 100); do pw-cli ls Node 2>/dev/null | grep -q 'node.name = "texbridge-test"' && break; sleep 0.1; done
timeout 30 gst-launch-1.0 pipewiresrc target-object=texbridge-test num-buffers=20 ! $CONSUME
rc=$?
kill %3 %2 %1 2>/dev/null
wait
exit $rc
"""


def _pipewire(gst_env, tmp_path, provide: str, consume: str) -> dict[str, str]:
    """Run `provide ! pipewiresink` (a PipeWire video source node) and `pipewiresrc ! consume` (20 buffers) through
    a real PipeWire daemon and WirePlumber started for the test on their own D-Bus session and runtime dir; the
    tails of their logs."""
    missing = [t for t in ("pipewire", "wireplumber", "pw-cli", "dbus-run-session") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (Debian: pipewire wireplumber dbus)")
    if subprocess.run(["gst-inspect-1.0", "pipewiresink"], capture_output=True, env=gst_env).returncode != 0:
        pytest.skip("GStreamer's pipewire elements are missing (Debian: gstreamer1.0-pipewire)")
    runtime_dir = tmp_path / "xdg"
    runtime_dir.mkdir(mode=0o700)
    env = {**gst_env, "XDG_RUNTIME_DIR": str(runtime_dir), "PROVIDE": provide, "CONSUME": consume}
    env.pop("DBUS_SESSION_BUS_ADDRESS", None)
    proc = subprocess.run(["dbus-run-session", "--", "bash", "-c", PIPEWIRE_SCRIPT], capture_output=True,
                          text=True, env=env, timeout=120)
    logs = {p.name: p.read_text(errors="replace")[-2000:] for p in runtime_dir.glob("*.log")}
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}{logs}"
    return logs


def test_a_pipewire_stream_becomes_a_texbridge_sender_pixel_exact(gst_env, tmp_path):
    """A PipeWire video source (videotestsrc ! pipewiresink, as OBS's virtual camera or a screen cast would be)
    read with pipewiresrc ! texbridgesink."""
    caps = "video/x-raw,format=RGBA,width=64,height=48,framerate=30/1"
    ref = np.frombuffer(reference(gst_env, tmp_path, caps, "colors"), np.uint8).reshape(48, 64, 4)
    rx = texbridge.Receiver("gst-pw")
    frames: list[texbridge.Frame] = []
    stop = threading.Event()
    t = threading.Thread(target=_collect, args=(rx, stop, frames))
    t.start()
    try:
        _pipewire(gst_env, tmp_path, f"videotestsrc is-live=true pattern=colors ! {caps}",
                  f"{caps} ! texbridgesink sender=gst-pw")
    finally:
        stop.set()
        t.join(5)
        rx.close()
    assert frames, "no frame arrived through PipeWire"
    for f in frames:
        assert np.array_equal(f.pixels, ref), f"frame {f.frame_number} changed on the way"


def test_a_texbridge_sender_becomes_a_pipewire_stream_pixel_exact(gst_env, tmp_path):
    """texbridgesrc ! pipewiresink (texbridge senders to OBS or a browser): pipewiresink proposes its own buffer
    pool with size 0, so texbridgesrc has to size it (PipeWire 0.3.65 made empty buffers otherwise: critical
    warnings, a crash, no frame), and read back with pipewiresrc, every buffer is one whole sent frame."""
    stop = threading.Event()
    t = threading.Thread(target=_send_patterns, args=(stop, 1 << 30, "gst-pw-out", 1 / 30))
    t.start()
    out = tmp_path / "pw.raw"
    try:
        logs = _pipewire(gst_env, tmp_path, "texbridgesrc sender=gst-pw-out",
                         f"video/x-raw,format=RGBA,width=64,height=48 ! filesink location={out}")
    finally:
        stop.set()
        t.join(10)
    assert _whole_frames(out.read_bytes(), PATTERN) == 20
    assert "gst_buffer" not in logs["provide.log"] and "please add queues" not in logs["provide.log"], logs


def test_plugin_path_warns_when_an_activated_venv_would_hide_pygobject(tmp_path):
    """The one setup the loader files cannot rescue (measured: "pygobject initialization failed" in
    gst-plugin-scanner): the CLI says so, and only then."""
    from texbridge.gst import path_problem

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python3").write_text("")
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\ninclude-system-site-packages = false\n")
    assert "PyGObject" in path_problem(f"{venv / 'bin'}:/usr/bin")
    assert path_problem("/usr/bin") is None
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\ninclude-system-site-packages = true\n")
    assert path_problem(f"{venv / 'bin'}:/usr/bin") is None
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}",
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-m", "texbridge.cli", "gst-plugin-path"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 0 and os.path.isdir(out.stdout.strip())
    venv_here = os.path.isfile(os.path.join(os.path.dirname(os.path.dirname(sys.executable)), "pyvenv.cfg"))
    assert ("pygobject" in out.stderr.lower() or "PyGObject" in out.stderr) == (venv_here and path_problem(env["PATH"])
                                                                                 is not None)
