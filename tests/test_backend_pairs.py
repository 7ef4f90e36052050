"""Every producer/consumer backend pair (4 x 4): a texture made by one backend, opened by another in a second
process, is pixel-exact, or the import is refused with a typed error saying exactly why.

What each pair does is the memory-type table's word (`_memory_types.py`): a consumer listed among the importers of
the producer's memory must give the producer's pixels; any other must raise InvalidDescriptor naming the backends
that can (and, for NumPy, `download()`). Pairs whose backend this machine lacks skip naming the capability; pairs
whose two sides are different GPUs skip naming both. docs/backends.md has the table.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import texbridge
from texbridge._errors import BackendError
from texbridge._memory_types import MEMORY_TYPES
from texbridge.backends import BACKENDS, get_backend

from conftest import run_py

pytestmark = pytest.mark.gpu

W, H = 72, 40  # rows of 288 bytes: not a multiple of 256, so a pitch mistake shows


def _reason(name: str) -> str | None:
    try:
        diag = get_backend(name).diagnostics()
    except BackendError as e:
        return f"backend {name} unavailable: {e}"
    if not diag.get("available"):
        return f"backend {name} has no usable device: {diag.get('detail')}"
    if name == "cuda" and not any(d.get("vmm_posix_fd") for d in diag.get("devices", [])):
        return "no CUDA device exports cuda_vmm POSIX fds"
    return None


CONSUMER = r"""
import json, sys, hashlib, numpy as np, texbridge
name, backend = sys.argv[1], sys.argv[2]
try:
    with texbridge.connect() as s:
        res = s.open(name, backend=backend)
        px = res.download()
        out = {"ok": True, "type": type(res).__name__, "shape": list(px.shape),
               "sha": hashlib.sha256(np.ascontiguousarray(px).tobytes()).hexdigest(),
               "zero_copy": getattr(res, "zero_copy", None), "path": getattr(res, "access", None)}
        res.close()
except texbridge.TexbridgeError as e:
    out = {"ok": False, "error": type(e).__name__, "message": str(e)}
print(json.dumps(out))
"""


@pytest.mark.parametrize("consumer", list(BACKENDS))
@pytest.mark.parametrize("producer", list(BACKENDS))
def test_pair(runtime, producer, consumer):
    for side in dict.fromkeys((producer, consumer)):
        reason = _reason(side)
        if reason:
            pytest.skip(reason)
    import hashlib

    pixels = ((np.arange(H * W * 4) * 13 + 7) % 253).astype(np.uint8).reshape(H, W, 4)
    with texbridge.connect() as s:
        tex = s.create_texture(W, H, "rgba8", backend=producer, name="pair")
        try:
            tex.upload(pixels)
            memory = tex.descriptor.memory
            got = json.loads(run_py(CONSUMER, "pair", consumer).stdout.strip().splitlines()[-1])
        finally:
            tex.close()
    importers = MEMORY_TYPES[memory].importers
    if consumer in importers:
        if not got["ok"] and got["error"] == "IncompatibleDevice":
            pytest.skip(f"{producer} and {consumer} are on different devices here: {got['message']}")
        assert got["ok"], f"{producer} ({memory}) -> {consumer} must work: {got}"
        assert got["shape"] == [H, W, 4]
        assert got["sha"] == hashlib.sha256(pixels.tobytes()).hexdigest(), f"{producer} -> {consumer} pixels differ"
    else:
        assert not got["ok"] and got["error"] == "InvalidDescriptor", got
        assert f"cannot import {memory!r} memory: open it with {' or '.join(importers)}" in got["message"]
        if consumer == "memfd":
            assert "download()" in got["message"], "a NumPy user must be told how to get a copy"


def test_memfd_in_gl_is_an_uploaded_copy_kept_in_step_by_sync(runtime):
    """GL cannot import CPU memory: it gets a copy, uploaded at import and by sync_to_image() after CPU writes;
    sync_to_host() writes GL's pixels back to the shared pages; upload() updates both."""
    reason = _reason("gl")
    if reason:
        pytest.skip(reason)
    with texbridge.connect() as s:
        cpu = s.create_texture(W, H, "rgba8", backend="memfd", name="m")
        cpu.numpy()[...] = 1
        gl = s.open("m", backend="gl")
        try:
            assert gl.zero_copy is False and int(gl.download().max()) == 1
            cpu.numpy()[...] = 2
            assert int(gl.download().max()) == 1, "a copy: CPU writes reach GL only by sync_to_image()"
            gl.sync_to_image()
            assert int(gl.download().min()) == 2
            gl.upload(np.full(gl.shape, 3, np.uint8))
            assert int(cpu.numpy().min()) == 3, "upload() writes the shared pages too"
            gl.sync_to_host()
            assert int(cpu.numpy().min()) == 3
        finally:
            gl.close()
            cpu.close()
        with pytest.raises(texbridge.InvalidDescriptor, match="memfd buffers"):
            buf = s.create_buffer(4096, name="b")
            try:
                s.open("b", backend="gl")
            finally:
                buf.close()
