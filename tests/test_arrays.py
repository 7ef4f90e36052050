"""Array protocols and pixel layouts (issue 13): np.asarray / np.from_dlpack on CPU-visible resources and frames,
zero-copy, never outliving their mapping; send(pixel_format=...) and Receiver(pixel_format=...) conversions."""

from __future__ import annotations

import numpy as np
import pytest

import texbridge
from texbridge import _pixels
from texbridge._errors import InvalidArgument, NotHostVisible
from texbridge._formats import get_format

from conftest import run_py

# -- array protocols ------------------------------------------------------------------------------------------------------


def test_a_memfd_texture_is_a_zero_copy_array_and_dlpack_tensor(session):
    tex = session.create_texture(16, 8, "rgba8")
    a, d = np.asarray(tex), np.from_dlpack(tex)
    assert a.shape == d.shape == (8, 16, 4) and d.dtype == np.uint8
    assert tex.__dlpack_device__() == (1, 0)
    d[2, 3] = (1, 2, 3, 4)  # written through the DLPack tensor, seen through the resource's own view
    assert tuple(tex.numpy()[2, 3]) == (1, 2, 3, 4) and tuple(a[2, 3]) == (1, 2, 3, 4)
    assert np.shares_memory(d, tex.numpy())
    buf = session.create_buffer(64)
    assert np.from_dlpack(buf).shape == (64,) and np.shares_memory(np.from_dlpack(buf), buf.numpy())


LIFETIME = """
import gc, numpy as np, texbridge
s = texbridge.connect()
tex = s.create_texture(64, 64, "rgba8")
tex.numpy()[...] = 7
from_dlpack, capsule, asarray = np.from_dlpack(tex), tex.__dlpack__(), np.asarray(tex)
with texbridge.Sender("life", 32, 16) as snd, texbridge.Receiver("life") as rx:
    snd.send(np.full(snd.shape, 9, np.uint8), user_data=b"u")
    frame = rx.receive_frame(copy=False)
    view = np.from_dlpack(frame)
tex.close()
s.close()
del tex, s
gc.collect()
assert int(from_dlpack.sum()) == int(asarray.sum()) == 7 * 64 * 64 * 4
from_dlpack[...] = 1  # still mapped: writes land in memory that is ours until the last view goes
assert int(np.from_dlpack(capsule_holder := type("H", (), {"__dlpack__": lambda self, **k: capsule,
                                                            "__dlpack_device__": lambda self: (1, 0)})()).max()) == 1
assert int(view.min()) == 9 and not view.flags.writeable and frame.user_data == b"u"
print("ok")
"""


def test_views_and_dlpack_tensors_outlive_close_without_a_crash(runtime):
    """The resource, its session, the receiver and the sender are all closed: the arrays and an unconsumed DLPack
    capsule still read (and write) their memory, in a child process so a segfault would show as its exit status."""
    proc = run_py(LIFETIME, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_frames_are_arrays_too(runtime):
    with texbridge.Sender("arr", 8, 4) as s, texbridge.Receiver("arr") as rx:
        s.send(np.arange(8 * 4 * 4, dtype=np.uint8).reshape(s.shape))
        frame = rx.receive_frame()
        assert np.asarray(frame) is frame.pixels and frame.shape == (4, 8, 4) and frame.dtype == np.uint8
        assert np.shares_memory(np.from_dlpack(frame), frame.pixels)
        assert frame.__dlpack_device__() == (1, 0)
        copied = np.array(frame)
        assert not np.shares_memory(copied, frame.pixels) and np.array_equal(copied, frame.pixels)
        assert np.asarray(frame, dtype=np.float32).dtype == np.float32
        view = rx.receive_frame(copy=False)  # not new: the same frame, as a Frame
        assert view.frame_number == 1


def test_torch_from_dlpack_shares_the_memory(session):
    torch = pytest.importorskip("torch", reason="torch is not installed (NumPy's from_dlpack covers the protocol)")
    tex = session.create_texture(4, 4, "rgba8")
    t = torch.from_dlpack(tex)
    t[0, 0, 0] = 200
    assert int(tex.numpy()[0, 0, 0]) == 200


def test_gpu_only_memory_says_so_instead_of_a_dlpack_view(session):
    try:
        tex = session.create_texture(4, 4, "rgba8", backend="vulkan")
    except texbridge.BackendError as e:
        pytest.skip(f"no Vulkan device here: {e}")
    with tex:
        with pytest.raises(NotHostVisible, match="download"):
            tex.__dlpack_device__()
        with pytest.raises(NotHostVisible, match="download"):
            np.from_dlpack(tex)


# -- pixel layouts ------------------------------------------------------------------------------------------------------
H, W = 6, 10
RNG = np.random.default_rng(13)
RGB = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
ALPHA = RNG.integers(0, 256, (H, W), dtype=np.uint8)
RGBA = np.dstack([RGB, ALPHA])


@pytest.mark.parametrize("fmt", ["rgba8", "bgra8"])
def test_send_converts_named_layouts_into_the_senders_format_pixel_exact(runtime, fmt):
    order = "rgba" if fmt == "rgba8" else "bgra"

    def stored(rgba: np.ndarray) -> np.ndarray:  # what the slot must hold, in the sender's memory order
        return rgba[..., ["rgba".index(c) for c in order]]

    opaque = np.dstack([RGB, np.full((H, W), 255, np.uint8)])
    gray = RGB[..., 1]
    cases = [
        ("rgb8", RGB, opaque),
        ("bgr8", RGB[..., ::-1].copy(), opaque),
        ("rgba8", RGBA, RGBA),
        ("bgra8", RGBA[..., [2, 1, 0, 3]].copy(), RGBA),
        ("gray8", gray, np.dstack([gray, gray, gray, np.full((H, W), 255, np.uint8)])),
        ("rgbf", RGB.astype(np.float64) / 255, opaque),
        ("rgbaf", RGBA.astype(np.float32) / 255, RGBA),
        ("grayf", np.full((H, W), 2.0, np.float32), np.full((H, W, 4), 255, np.uint8)),  # clipped to 1.0
    ]
    with texbridge.Sender("conv", W, H, fmt) as s, texbridge.Receiver("conv") as rx:
        for layout, pixels, rgba in cases:
            s.send(pixels, pixel_format=layout)
            got = rx.receive()
            assert np.array_equal(got, stored(rgba)), f"{layout} into {fmt}"


def test_send_refuses_to_guess_and_refuses_what_the_layout_does_not_describe(runtime):
    with texbridge.Sender("noguess", W, H, "rgba8") as s:
        with pytest.raises(InvalidArgument, match="pixel_format='rgb8' or 'bgr8'"):
            s.send(RGB)  # RGB or BGR? texbridge does not guess
        with pytest.raises(InvalidArgument, match="pixel_format='rgbaf'"):
            s.send(RGBA.astype(np.float32))
        with pytest.raises(InvalidArgument, match="takes uint8"):
            s.send(RGB.astype(np.uint16), pixel_format="rgb8")
        with pytest.raises(InvalidArgument, match="takes float"):
            s.send(RGB, pixel_format="rgbf")
        with pytest.raises(InvalidArgument, match=r"shape \(6, 10, 3\)"):
            s.send(RGBA, pixel_format="rgb8")
        with pytest.raises(InvalidArgument, match="unknown pixel_format"):
            s.send(RGB, pixel_format="yuv420")
        assert s.frame_number == 0
    with texbridge.Sender("gray-only", W, H, "r8") as s:
        with pytest.raises(InvalidArgument, match="luma"):
            s.send(RGB, pixel_format="rgb8")
        s.send(RGB[..., 0], pixel_format="gray8")
    with texbridge.Sender("raw-only", W, H, "rg8") as s:
        with pytest.raises(InvalidArgument, match="no pixel_format conversion"):
            s.send(RGB, pixel_format="rgb8")


@pytest.mark.parametrize("fmt", ["rgba8", "bgra8", "rgba16", "rgba32f"])
def test_receivers_ask_for_an_output_layout(runtime, fmt):
    with texbridge.Sender("out", W, H, fmt) as s:
        s.send(RGBA, pixel_format="rgba8")
        want = {"rgb8": RGB, "bgr8": RGB[..., ::-1], "rgba8": RGBA, "bgra8": RGBA[..., [2, 1, 0, 3]],
                "float32": RGBA.astype(np.float32) / 255}
        for layout, expected in want.items():
            with texbridge.Receiver("out", pixel_format=layout) as rx:
                frame = rx.receive_frame()
                assert frame.pixel_format == layout and frame.format == fmt
                assert frame.pixels.dtype == expected.dtype and frame.pixels.shape == expected.shape
                if expected.dtype == np.float32:
                    np.testing.assert_allclose(frame.pixels, expected, atol=1e-6)
                else:
                    assert np.array_equal(frame.pixels, expected), f"{fmt} -> {layout}"
                out = np.zeros_like(expected)
                s.send(RGBA, pixel_format="rgba8")
                assert rx.receive(out=out) is out and np.allclose(out, expected, atol=1e-6)


def test_receiver_output_layouts_refused_where_they_would_guess(runtime):
    with pytest.raises(InvalidArgument, match="unknown pixel_format"):
        texbridge.Receiver("x", pixel_format="nv12")
    with pytest.raises(InvalidArgument, match="NumPy frames"):
        texbridge.Receiver("x", backend="gl", pixel_format="rgb8")
    with texbridge.Sender("to-gray", W, H) as s, texbridge.Receiver("to-gray", pixel_format="gray8") as rx:
        s.send(RGBA, pixel_format="rgba8")
        with pytest.raises(InvalidArgument, match="luma"):
            rx.receive()


def test_every_format_with_a_rule_round_trips_8_bit_pixels():
    """The rules themselves, without a broker: 8-bit RGBA into each covered format and back is exact."""
    for name, (order, _scale) in _pixels._FORMATS.items():
        fmt = get_format(name)
        shape = (H, W, fmt.channels)
        if order == "l":
            src, layout = RGB[..., 0], "gray8"
        elif name == "rgb10a2":  # 2-bit alpha: only 0, 85, 170, 255 survive
            src, layout = np.dstack([RGB, np.full((H, W), 170, np.uint8)]), "rgba8"
        else:
            src, layout = RGBA, "rgba8"
        stored = _pixels.to_format(src, layout, fmt, shape)
        assert stored.dtype == fmt.numpy_dtype and stored.shape == shape
        assert np.array_equal(_pixels.from_format(stored, fmt, layout), src), name
