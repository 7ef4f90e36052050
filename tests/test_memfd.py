"""The memfd backend's memory layout, checked against bytes placed independently of the code under test.

Comparing two processes that share a texture proves only that they agree: both could use the same wrong pitch or
ignore the same plane offset. So every test here computes where each pixel must lie from the descriptor's numbers
(offset + y * pitch + x * bytes per pixel), writes or reads the memfd's bytes there with os.pwrite/os.pread, and
compares with what numpy()/upload()/download() show.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from texbridge import Descriptor, InvalidDescriptor
from texbridge._sharedmem import create_sealed
from texbridge.backends.memfd import BACKEND

from conftest import run_py

# An odd geometry on purpose: a nonzero plane offset, a pitch that is neither tight nor 256-aligned.
W, H, BPP = 37, 11, 4
OFFSET, PITCH = 4096 + 12, W * BPP + 20
SIZE = OFFSET + PITCH * H + 64  # a tail after the last row, which no view may reach either


def pattern(h: int = H, w: int = W) -> np.ndarray:
    y, x, c = np.indices((h, w, 4))
    return ((y * 31 + x * 7 + c * 3 + 1) % 251).astype(np.uint8)


def place(img: np.ndarray, offset: int, pitch: int, size: int, fill: int = 0xEE) -> bytes:
    """The memory image holding `img` at `offset` with rows `pitch` apart; every other byte is `fill`."""
    raw = bytearray([fill]) * size
    h, w, c = img.shape
    for y in range(h):
        start = offset + y * pitch
        raw[start:start + w * c] = img[y].tobytes()
    return bytes(raw)


def offset_descriptor(**changes) -> Descriptor:
    return Descriptor(kind="texture2d", size=SIZE, width=W, height=H, format="rgba8",
                      planes=((OFFSET, PITCH),), **changes).validate()


def memfd_with(data: bytes) -> int:
    fd = create_sealed("test-layout", len(data))
    os.pwrite(fd, data, 0)
    return fd


def test_numpy_view_honours_a_nonzero_plane_offset_and_an_odd_pitch():
    img = pattern()
    res = BACKEND.import_resource(offset_descriptor(), [memfd_with(place(img, OFFSET, PITCH, SIZE))])
    try:
        view = res.numpy()
        assert view.shape == (H, W, 4) and view.strides == (PITCH, BPP, 1)
        assert np.array_equal(view, img), "numpy() does not read the pixels where offset + y * pitch puts them"
        assert np.array_equal(res.download(), img)
    finally:
        res.close()


def test_upload_writes_only_where_the_layout_puts_pixels():
    fd = memfd_with(bytes([0xEE]) * SIZE)
    check = os.dup(fd)
    res = BACKEND.import_resource(offset_descriptor(), [fd])
    try:
        img = pattern()[::-1].copy()
        res.upload(img)
        assert os.pread(check, SIZE, 0) == place(img, OFFSET, PITCH, SIZE), \
            "upload() wrote outside the rows the descriptor describes (offset, pitch or padding)"
    finally:
        res.close()
        os.close(check)


def test_an_offset_layout_crosses_processes_byte_exact(session):
    """Another process registers a texture with an offset and a padded pitch and writes it through numpy(); this one
    opens it: both its view and the raw bytes must match the layout computed here, not merely each other."""
    img = pattern()
    code = textwrap.dedent(f"""
        import numpy as np, texbridge, sys
        from texbridge import Descriptor
        from texbridge._sharedmem import create_sealed
        from texbridge.backends.memfd import BACKEND
        d = Descriptor(kind="texture2d", size={SIZE}, width={W}, height={H}, format="rgba8",
                       planes=(({OFFSET}, {PITCH}),)).validate()
        y, x, c = np.indices(({H}, {W}, 4))
        with texbridge.connect() as s:
            res = s._register(BACKEND.import_resource(d, [create_sealed("child", {SIZE})]), "offset-tex")
            res.numpy()[...] = ((y * 31 + x * 7 + c * 3 + 1) % 251).astype(np.uint8)
            print(res.handle, flush=True)
            sys.stdin.readline()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        handle = proc.stdout.readline().strip()
        assert handle.startswith("tb:"), "the child did not register its texture"
        with session.open(handle) as tex:
            assert tex.descriptor.planes == ((OFFSET, PITCH),)
            assert np.array_equal(tex.numpy(), img), "the view differs from the layout computed here"
            fd = tex.export_fds()[0]
            try:
                raw = os.pread(fd, SIZE, 0)
            finally:
                os.close(fd)
            expected = place(img, OFFSET, PITCH, SIZE, fill=0)
            assert raw == expected, "the child's numpy() wrote bytes outside the computed layout"
    finally:
        proc.stdin.close()
        proc.wait(10)


def test_created_textures_use_the_d3d_pitch_rule(session):
    """create_texture's layout: offset 0, rows padded to 256 bytes (D3D's pitch alignment, which Wine relies on),
    and the pixels where that rule puts them, seen from another process's raw bytes."""
    w, h = 333, 7
    tex = session.create_texture(w, h, "rgba8")
    pitch = -(-w * 4 // 256) * 256
    assert tex.descriptor.planes == ((0, pitch),) and tex.descriptor.size == pitch * h
    img = pattern(h, w)
    tex.upload(img)
    out = run_py(f"""
        import os, texbridge
        with texbridge.connect() as s, s.open("{tex.handle}") as r:
            fd = r.export_fds()[0]
            print(os.pread(fd, {pitch * h}, 0).hex())
    """).stdout.strip()
    assert bytes.fromhex(out) == place(img, 0, pitch, pitch * h, fill=0)


@pytest.mark.parametrize("size", [OFFSET + PITCH * H - 1, OFFSET + PITCH * (H - 1) + W * BPP - 1])
def test_memory_smaller_than_offset_plus_layout_is_refused(size):
    """A memfd that ends before the layout's last row (counting the offset) would SIGBUS a reader."""
    with pytest.raises(InvalidDescriptor):
        Descriptor(kind="texture2d", size=size, width=W, height=H, format="rgba8",
                   planes=((OFFSET, PITCH),)).validate()
    desc = offset_descriptor()
    fd = create_sealed("short", size)
    with pytest.raises(InvalidDescriptor):
        BACKEND.import_resource(desc, [fd])  # the descriptor claims SIZE; the memfd has less


@pytest.mark.parametrize("memory", ["opaque_fd", "dma_buf"])
def test_gpu_memory_is_never_mapped_as_a_cpu_layout(memory):
    """lavapipe exports opaque_fd memory as a sealed memfd: mappable, but its bytes are a driver's tiling, not rows.
    The memfd backend must refuse it (naming who can import it) rather than show garbage."""
    desc = Descriptor(kind="texture2d", size=SIZE, width=W, height=H, format="rgba8", memory=memory,
                      backend="vulkan").validate()
    fd = create_sealed("gpu-memory", SIZE)
    with pytest.raises(InvalidDescriptor, match="cannot import"):
        BACKEND.import_resource(desc, [fd])
    with pytest.raises(OSError):
        os.fstat(fd)  # refused, and the fd it was given is closed
