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
            res = _view(display, "viewer-test", "--size", "256x292", "--frames", "3", "--screenshot", str(shot),
                        "--timeout", "30")
        finally:
            stop.set()
            t.join()
    assert res.returncode == 0, res.stderr
    got = np.load(shot)
    assert got.shape == (292, 256, 4)
    expected = img.repeat(4, 0).repeat(4, 1)
    # the overlay is a bar above the image, never over it: the whole image is there, exactly, below the bar
    at = [y for y in range(1, 101) if np.array_equal(got[y:y + 192, :, :3], expected[..., :3])]
    assert at, "the image is not shown whole and unscaled below the overlay"
    top = got[:at[0], :, :3]
    assert (top == 255).all(axis=-1).any(), "no overlay text"


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


@pytest.mark.parametrize("fmt", ["rgba8", "bgra8"])
def test_view_opens_1_to_1_and_copies_the_frame_exactly(runtime, display, tmp_path, fmt):
    """Without --size the window is the image plus the bar, so the image is copied 1:1 (the blit path that costs
    no shader on llvmpipe); RGBA frames are swizzled into the window's BGRA order while uploading, BGRA ones are
    not: both must come out exactly."""
    shot = tmp_path / "shot.npy"
    rng = np.random.default_rng(7)
    rgba = rng.integers(0, 256, (240, 320, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    sent = rgba[..., [2, 1, 0, 3]].copy() if fmt == "bgra8" else rgba  # the sender's own byte order
    with texbridge.Sender(f"one-to-one-{fmt}", 320, 240, fmt) as s:
        stop = threading.Event()

        def pump() -> None:
            while not stop.is_set():
                s.send(sent)
                time.sleep(0.02)

        t = threading.Thread(target=pump, daemon=True)
        t.start()
        try:
            res = _view(display, f"one-to-one-{fmt}", "--frames", "3", "--screenshot", str(shot), "--timeout", "30")
        finally:
            stop.set()
            t.join()
    assert res.returncode == 0, res.stderr
    got = np.load(shot)
    assert got.shape[1] == 320 and 240 < got.shape[0] < 240 + 100, got.shape  # 1:1, plus the overlay bar
    np.testing.assert_array_equal(got[-240:, :, :3], rgba[..., :3])


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


def test_overlay_wraps_to_the_window_and_never_covers_the_image():
    """The layout alone (no display): lines fit any window width, and the image rect starts below the bar."""
    from texbridge.cli.viewer import LINE_GAP, overlay_layout, text_mask

    items = [["a sender with a long name", "3840x2160 rgba16f"],
             ["59.9 fps", "frame 123456789", "dropped 12345", "view 60 fps"]]
    for width in (120, 200, 320, 480, 639, 640, 800, 1280, 1920):
        for height in (90, 360, 1080):
            lines, scale, bar, rect = overlay_layout(items, (width, height), (3840, 2160))
            assert lines and all(text_mask(line, scale).shape[1] + 2 * LINE_GAP <= width for line in lines), \
                (width, lines)
            assert "".join(lines).replace(" ", "") == "".join(i for line in items for i in line).replace(" ", "")
            if rect is not None:
                x0, y0, x1, y1 = rect
                assert y0 >= bar and y1 <= height + 1e-6 and x0 >= 0 and x1 <= width + 1e-6, (width, height, rect)
    assert overlay_layout([], (640, 360), (64, 48))[2:] == (0, (80.0, 0.0, 560.0, 360.0))


def test_view_window_title_is_the_sender_name(runtime, display):
    if shutil.which("xwininfo") is None:
        pytest.skip("xwininfo is not installed (apt package x11-utils)")
    with texbridge.Sender("title check", 32, 16) as s:
        s.send(np.zeros(s.shape, np.uint8))
        env = dict(os.environ, DISPLAY=display)
        env.pop("PYOPENGL_PLATFORM", None)
        p = subprocess.Popen([sys.executable, "-m", "texbridge.cli", "view", "title check", "--timeout", "20"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline, tree = time.monotonic() + 20, ""
            while time.monotonic() < deadline and '"title check - texbridge view"' not in tree:
                tree = subprocess.run(["xwininfo", "-root", "-tree", "-display", display], capture_output=True,
                                      text=True).stdout
                time.sleep(0.2)
            assert '"title check - texbridge view"' in tree, tree[-2000:]
        finally:
            p.terminate()
            p.wait(10)


# Runs the Viewer in its own process (GLFW needs GLX, which must be chosen before OpenGL is imported) and drives it
# with its own key callback, as GLFW would: picker, sender list, fullscreen, waiting text, redraws only on change.
VIEWER_KEYS = r"""
import json, sys, time, numpy as np, glfw, texbridge
from texbridge.cli.viewer import Viewer
out = {}
v = Viewer("nobody yet", overlay=True, size=(320, 200))
out["waiting"] = v.overlay_items()
out["waiting_title"] = v._title()
a = texbridge.Sender("alpha", 16, 8); b = texbridge.Sender("beta", 16, 8)
a.send(np.zeros(a.shape, np.uint8)); b.send(np.zeros(b.shape, np.uint8))
def press(key, mods=0):
    v._on_key(v.window, key, 0, glfw.PRESS, mods)
press(glfw.KEY_TAB); out["after_tab"] = v.receiver.name
press(glfw.KEY_TAB); out["after_tab2"] = v.receiver.name
press(glfw.KEY_TAB, glfw.MOD_SHIFT); out["after_shift_tab"] = v.receiver.name
out["title"] = v._title()
press(glfw.KEY_L); out["list"] = v.overlay_items()
press(glfw.KEY_F); glfw.poll_events(); out["fullscreen"] = bool(glfw.get_window_monitor(v.window))
press(glfw.KEY_F); glfw.poll_events(); out["windowed"] = not glfw.get_window_monitor(v.window)
press(glfw.KEY_L); press(glfw.KEY_O)  # no list, no overlay: only new frames redraw
sender = a if v.receiver.name == "alpha" else b
import threading
stop = threading.Event()
def pump():
    while not stop.is_set():
        sender.send(np.zeros(sender.shape, np.uint8)); time.sleep(0.1)
t = threading.Thread(target=pump); t.start()
v.run(frames=None, timeout=2.0)
stop.set(); t.join()
out["shown"], out["draws"] = v.shown, v.draws
v.close(); a.close(); b.close()
print(json.dumps(out))
"""


def test_view_keys_picker_list_fullscreen_and_redraws_only_on_change(runtime, display):
    env = dict(os.environ, DISPLAY=display, PYOPENGL_PLATFORM="glx")
    res = subprocess.run([sys.executable, "-c", VIEWER_KEYS], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = __import__("json").loads(res.stdout.strip().splitlines()[-1])
    assert out["waiting"] == [["waiting for sender 'nobody yet'..."]]
    assert out["waiting_title"].startswith("waiting for 'nobody yet'")
    assert (out["after_tab"], out["after_tab2"], out["after_shift_tab"]) == ("alpha", "beta", "alpha")
    assert out["title"] == "alpha - texbridge view"
    flat = [" ".join(line) for line in out["list"]]
    assert any(line.startswith("> alpha") for line in flat) and any(line.startswith("  beta") for line in flat)
    assert out["fullscreen"] and out["windowed"]
    # ~20 frames in 2 s at 10 fps: one draw per new frame (and a few for the overlay's refresh and start-up), not
    # hundreds of redraws of an unchanged picture
    assert out["shown"] >= 5 and out["draws"] <= out["shown"] + 12, out


def test_the_view_extra_installs_everything_the_viewer_imports():
    """`pip install texbridge[view]` must give a working viewer (PyOpenGL was missing once): every third-party
    module the viewer imports belongs to a base dependency or to the [view] extra."""
    import ast
    import importlib.metadata
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    wanted = {r.split(">")[0].split("=")[0].split("[")[0].strip().lower()
              for r in project["dependencies"] + project["optional-dependencies"]["view"]}
    tree = ast.parse((root / "src/texbridge/cli/viewer.py").read_text())
    modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    third_party = modules - set(sys.stdlib_module_names) - {"texbridge"}
    dists = importlib.metadata.packages_distributions()
    missing = {m: dists.get(m) for m in third_party if not {d.lower() for d in dists.get(m, [])} & wanted}
    assert third_party >= {"glfw", "OpenGL"} and not missing, f"imported by the viewer but not in [view]: {missing}"


def test_the_bgra8_test_pattern_is_the_same_picture_in_bgra_order():
    """send-test --format bgra8 publishes what rgba8 shows, its bytes in B, G, R, A order."""
    from texbridge.cli.viewer import TestPattern

    rgba, bgra = np.empty((90, 160, 4), np.uint8), np.empty((90, 160, 4), np.uint8)
    TestPattern(160, 90, "x").render(7, rgba)
    TestPattern(160, 90, "x", bgra=True).render(7, bgra)
    np.testing.assert_array_equal(bgra, rgba[..., [2, 1, 0, 3]])
    assert not np.array_equal(bgra, rgba)


@pytest.mark.parametrize("fmt", ["rgba8", "bgra8"])
def test_the_1_to_1_draw_path_is_pixel_exact_on_a_headless_context(fmt):
    """The viewer's 1:1 draw without a window, so it runs on any GL the project runs on (llvmpipe here, NVIDIA on the
    GPU machine, where no X server exists): Viewer._storage's texture (unsized GL_RGBA given BGRA data), a pitched
    upload as a receiver's slot gives it, Viewer._blit's y-flipped glBlitFramebuffer into a BGRA-ordered framebuffer
    like a window's back buffer, read back top row first."""
    import types

    from texbridge.backends._glcontext import headless_context
    from texbridge.cli.viewer import Viewer

    try:
        ctx = headless_context()
    except texbridge.TexbridgeError as e:
        pytest.skip(f"no headless EGL GL context: {e}")
    ctx.enter()
    from OpenGL import GL

    w, h, pitch = 96, 40, 96 * 4 + 64
    v = types.SimpleNamespace(GL=GL, fb_size=(w, h))
    GL.glPixelStorei(GL.GL_UNPACK_ALIGNMENT, 1)
    GL.glPixelStorei(GL.GL_PACK_ALIGNMENT, 1)
    win_tex, tex = GL.glGenTextures(2)
    win_fbo, fbo = GL.glGenFramebuffers(2)
    try:
        Viewer._storage(v, win_tex, win_fbo, w, h, True)  # the "window": B, G, R, A like an X back buffer
        Viewer._storage(v, tex, fbo, w, h, True)  # 1:1: the image stored in the window's order
        rows = np.random.default_rng(7).integers(0, 256, (h, pitch), np.uint8)
        frame = np.lib.stride_tricks.as_strided(rows, (h, w, 4), (pitch, 4, 1))
        GL.glBindTexture(GL.GL_TEXTURE_2D, tex)
        GL.glPixelStorei(GL.GL_UNPACK_ROW_LENGTH, pitch // 4)
        GL.glTexSubImage2D(GL.GL_TEXTURE_2D, 0, 0, 0, w, h, GL.GL_BGRA if fmt == "bgra8" else GL.GL_RGBA,
                           GL.GL_UNSIGNED_BYTE, rows)
        GL.glPixelStorei(GL.GL_UNPACK_ROW_LENGTH, 0)
        GL.glBindFramebuffer(GL.GL_DRAW_FRAMEBUFFER, win_fbo)
        Viewer._blit(v, fbo, (w, h), (0, 0, w, h))
        GL.glBindFramebuffer(GL.GL_READ_FRAMEBUFFER, win_fbo)
        raw = GL.glReadPixels(0, 0, w, h, GL.GL_RGBA, GL.GL_UNSIGNED_BYTE)
    finally:
        GL.glBindFramebuffer(GL.GL_FRAMEBUFFER, 0)
        GL.glDeleteFramebuffers(2, [win_fbo, fbo])
        GL.glDeleteTextures([win_tex, tex])
    shown = np.frombuffer(raw, np.uint8).reshape(h, w, 4)[::-1]
    want = frame if fmt == "rgba8" else frame[..., [2, 1, 0, 3]]
    assert np.array_equal(shown, want)
