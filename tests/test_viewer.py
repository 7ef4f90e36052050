"""`texbridge view` renders a known pattern: run it under Xvfb (llvmpipe GLX), read back its window and compare.

The test publishes a 64x48 frame of four coloured quadrants and asks for a 256x192 window (exact 4x scale, nearest
filtering), so every pixel outside the overlay bar has one expected value.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import texbridge

COLORS = np.array([(255, 0, 0, 255), (0, 255, 0, 255), (0, 0, 255, 255), (255, 255, 255, 255)], np.uint8)


def _pattern(w: int = 64, h: int = 48) -> np.ndarray:
    img = np.empty((h, w, 4), np.uint8)
    img[: h // 2, : w // 2], img[: h // 2, w // 2:] = COLORS[0], COLORS[1]
    img[h // 2:, : w // 2], img[h // 2:, w // 2:] = COLORS[2], COLORS[3]
    img[5, 7] = (10, 20, 30, 255)  # one odd pixel: catches flips and off-by-one scaling
    return img


@pytest.fixture
def display(tmp_path):
    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb is not installed (apt package xvfb)")
    try:
        import glfw  # noqa: F401
    except ImportError:
        pytest.skip("the glfw Python package is not installed")
    for n in range(90, 140):
        if not os.path.exists(f"/tmp/.X11-unix/X{n}") and not os.path.exists(f"/tmp/.X{n}-lock"):
            break
    proc = subprocess.Popen(["Xvfb", f":{n}", "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not os.path.exists(f"/tmp/.X11-unix/X{n}"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"Xvfb :{n} did not start: {proc.stderr.read().decode()[-500:]}")
        time.sleep(0.05)
    yield f":{n}"
    proc.terminate()
    proc.wait(10)


def _view(display: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, DISPLAY=display)
    env.pop("PYOPENGL_PLATFORM", None)
    return subprocess.run([sys.executable, "-m", "texbridge.cli", "view", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_view_renders_the_sender_pixel_exact(runtime, display, tmp_path):
    shot = tmp_path / "shot.npy"
    img = _pattern()
    with texbridge.Sender("viewer-test", 64, 48) as s:
        s.send(img)
        # keep sending the same picture so --frames 3 sees three new frames
        stop = threading.Event()

        def pump() -> None:
            while not stop.is_set():
                s.send(img)
                time.sleep(0.02)

        t = threading.Thread(target=pump, daemon=True)
        t.start()
        try:
            res = _view(display, "viewer-test", "--size", "256x192", "--frames", "3", "--screenshot", str(shot),
                        "--timeout", "30")
        finally:
            stop.set()
            t.join()
    assert res.returncode == 0, res.stderr
    got = np.load(shot)
    assert got.shape == (192, 256, 4)
    expected = img.repeat(4, 0).repeat(4, 1)
    bar = 7 * 2 + 8  # the overlay bar's height in window pixels (5x7 font at scale 2, 4 px padding)
    np.testing.assert_array_equal(got[bar:, :, :3], expected[bar:, :, :3])
    # the overlay is drawn over the top rows: white text on a darkened bar
    top = got[:bar, :200, :3]
    assert (top == 255).all(axis=-1).any(), "no overlay text"
    assert not np.array_equal(top, expected[:bar, :200, :3])


def test_view_without_overlay_and_resize(runtime, display, tmp_path):
    shot = tmp_path / "shot.npy"
    with texbridge.Sender("viewer-test2", 64, 48) as s:
        s.send(_pattern())
        stop = threading.Event()

        def pump() -> None:
            while not stop.is_set():
                s.resize(32, 24) if s.frame_number == 5 else None
                s.send(_pattern(s.width, s.height))
                time.sleep(0.02)

        t = threading.Thread(target=pump, daemon=True)
        t.start()
        try:
            res = _view(display, "viewer-test2", "--size", "256x192", "--no-overlay", "--frames", "12",
                        "--screenshot", str(shot), "--timeout", "30")
        finally:
            stop.set()
            t.join()
    assert res.returncode == 0, res.stderr
    got = np.load(shot)
    expected = _pattern(32, 24).repeat(8, 0).repeat(8, 1)  # the viewer followed the resize: 8x scale now
    np.testing.assert_array_equal(got[..., :3], expected[..., :3])


def test_view_times_out_without_sender(runtime, display):
    res = _view(display, "nobody-here", "--frames", "1", "--screenshot", "/dev/null", "--timeout", "1")
    assert res.returncode == 2 and "timed out" in res.stderr


def test_view_of_a_missing_sender_says_it_waits_and_why_it_gave_up(runtime, display):
    with texbridge.Sender("someone-else", 8, 8):
        res = _view(display, "nobody-here", "--timeout", "1")
    assert res.returncode == 2, res.stderr
    assert "waiting for sender 'nobody-here'" in res.stderr and "'someone-else'" in res.stderr
    assert "SenderNotFound" in res.stderr and "None" not in res.stderr
    assert "Traceback" not in res.stderr


def test_view_of_a_non_sender_is_one_clear_line(runtime, display):
    with texbridge.connect() as s:
        s.create_texture(8, 8, name="just-a-texture")
        res = _view(display, "just-a-texture", "--timeout", "5")
    assert res.returncode == 1
    assert "not a sender" in res.stderr and "NotASender" in res.stderr and "Traceback" not in res.stderr


def test_view_timeout_names_the_frames_it_missed(runtime, display):
    with texbridge.Sender("silent", 8, 8):  # connected, never sends
        res = _view(display, "silent", "--frames", "2", "--timeout", "1")
    assert res.returncode == 2 and "0 of 2 frame(s)" in res.stderr and "TexbridgeTimeout" in res.stderr
