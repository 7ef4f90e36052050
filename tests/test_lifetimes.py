"""Mapping lifetimes: no Python call may crash the interpreter.

Rule (docs/architecture.md, "Mapping lifetimes"): a view keeps its mapping alive; close() only drops texbridge's own
reference. Each crash-prone sequence runs in a child process with faulthandler on, so a SIGSEGV shows up as a
failed child (exit -11 and a faulthandler traceback) instead of killing pytest.
"""

from __future__ import annotations


import pytest

import texbridge
from texbridge._errors import ClosedError

from conftest import run_py

PRELUDE = """
import faulthandler, gc, sys, numpy as np, texbridge
faulthandler.enable()
"""


def run_clean(code: str) -> str:
    proc = run_py(PRELUDE + code, check=False, timeout=90)
    assert proc.returncode == 0 and "Fatal Python error" not in proc.stderr, \
        f"child exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_numpy_view_outlives_close(runtime):
    out = run_clean("""
with texbridge.connect() as s:
    tex = s.create_texture(64, 32, "rgba8")
    a = tex.numpy()
    a[...] = 7
    buf = s.create_buffer(4096)
    b = buf.numpy()
    b[:] = 9
    tex.close()
    buf.close()
    gc.collect()
    print("after close", int(a.sum()) == 7 * a.size, int(b.sum()) == 9 * b.size)
    a[0, 0, 0] = 1  # still writable: the pages are this process's until the view goes
print("after session", int(a.sum()), int(b[-1]))
""")
    assert "after close True True" in out
    assert f"after session {7 * 64 * 32 * 4 - 6} 9" in out


def test_view_made_inside_with_connect_outlives_the_block(runtime):
    out = run_clean("""
with texbridge.connect() as s:
    a = s.create_texture(16, 16, "r32f").numpy()
    a[...] = 1.5
gc.collect()
print("sum", float(a.sum()))
""")
    assert "sum 384.0" in out


def test_zero_copy_receive_outlives_receiver_close(runtime):
    out = run_clean("""
with texbridge.Sender("lt", 32, 16) as snd:
    rx = texbridge.Receiver("lt")
    snd.send(np.full(snd.shape, 42, np.uint8))
    v = rx.wait_frame(10, copy=False)
    assert v is not None
    rx.close()
    gc.collect()
    print("view", int(v.min()), int(v.max()), v.shape)
print("after sender", int(v.sum()) == 42 * v.size)
""")
    assert "view 42 42 (16, 32, 4)" in out and "after sender True" in out


def test_old_zero_copy_view_survives_resize(runtime):
    out = run_clean("""
with texbridge.Sender("rs", 32, 16) as snd, texbridge.Receiver("rs") as rx:
    snd.send(np.full(snd.shape, 5, np.uint8))
    old = rx.wait_frame(10, copy=False)
    rx.release()
    snd.resize(8, 8)  # the sender closes the old ring
    snd.send(np.full(snd.shape, 6, np.uint8))
    new = rx.wait_frame(10, copy=False)  # the receiver follows: it closes its old slots
    gc.collect()
    print("old", old.shape, int(old.max()), "new", new.shape, int(new.max()))
""")
    assert "old (16, 32, 4) 5 new (8, 8, 4) 6" in out


def test_sender_writing_buffer_and_control_views_outlive_close(runtime):
    out = run_clean("""
snd = texbridge.Sender("wb", 8, 8)
with snd.writing() as buf:
    buf[...] = 3
ctl = snd._ctl.u  # the control buffer's words, as the receivers' C waits see them
snd.close()
gc.collect()
print("buf", int(buf.max()), "closed word", int(ctl[8]))
""")
    assert "buf 3 closed word" in out


def test_keyed_mutex_after_close_raises_closed_error(runtime):
    with texbridge.connect() as s:
        tex = s.create_texture(8, 8, keyed_mutex=True)
        m = tex.mutex
        m.acquire(0, timeout=5)
        m.release(1)
        tex.close()
        for call in (lambda: m.acquire(1, 1), lambda: m.release(1), lambda: m.statistics(), lambda: m.owned,
                     lambda: m.private_data, lambda: m.acquire_nowait(1)):
            with pytest.raises(ClosedError):
                call()
        km = s.create_keyed_mutex()
        inner = km.mutex
        km.close()
        with pytest.raises(ClosedError):
            inner.acquire(0, 1)
        assert "closed" in repr(inner)


def _texbridge_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum("texbridge:" in line for line in f)


def test_close_unmaps_at_once_without_views_and_with_the_last_view(session):
    """The other half of the rule: nothing keeps a mapping after close except a live view."""
    base = _texbridge_mappings()
    tex = session.create_texture(64, 64)
    assert _texbridge_mappings() == base + 1
    tex.close()
    assert _texbridge_mappings() == base  # no view: unmapped by close() itself
    tex = session.create_texture(64, 64)
    view = tex.numpy()[1:3]
    tex.close()
    assert _texbridge_mappings() == base + 1  # the view holds it
    del view
    assert _texbridge_mappings() == base


def test_closed_resource_refuses_new_views(session):
    tex = session.create_texture(8, 8)
    tex.close()
    with pytest.raises(ClosedError):
        tex.numpy()
    with pytest.raises(ClosedError):
        tex.download()


def test_vulkan_staged_memfd_import_close_is_clean(runtime):
    pytest.importorskip("cffi")
    try:
        texbridge.backends.get_backend("vulkan").diagnostics()["available"] or pytest.skip("no Vulkan device")
    except texbridge.BackendError as e:
        pytest.skip(f"vulkan backend unavailable: {e}")
    out = run_clean("""
with texbridge.connect() as s:
    src = s.create_texture(16, 8, "rgba8")
    src.numpy()[...] = 11
    vk = s.open(src.handle, backend="vulkan", host_import=False)
    print("zero_copy", vk.zero_copy, int(vk.download().max()))
    vk.close()
    src.close()
""")
    assert "zero_copy False 11" in out


def test_close_while_another_thread_waits_on_the_control_buffer(runtime):
    """The C futex wait holds a buffer of the control mapping: closing from another thread must not unmap it."""
    out = run_clean("""
import threading, time
snd = texbridge.Sender("cw", 8, 8)
rx = texbridge.Receiver("cw")
results = []
def wait_rx():
    try:
        results.append(("rx", rx.wait_frame(1.0)))
    except texbridge.TexbridgeError as e:
        results.append(("rx", type(e).__name__))
def wait_snd():
    try:
        results.append(("snd", snd.wait_for_receivers(5, timeout=1.0)))
    except texbridge.TexbridgeError as e:
        results.append(("snd", type(e).__name__))
threads = [threading.Thread(target=wait_rx), threading.Thread(target=wait_snd)]
for t in threads:
    t.start()
time.sleep(0.3)  # both are asleep in the kernel on words of the two control mappings
rx.close()
snd.close()
gc.collect()
for t in threads:
    t.join(10)
print("done", sorted(r[0] for r in results))
""")
    assert "done ['rx', 'snd']" in out


def test_vulkan_close_from_another_thread_waits_for_a_transfer(runtime):
    """Staging memory is a vkMapMemory pointer: close() must not free it while a transfer writes through it."""
    try:
        texbridge.backends.get_backend("vulkan").diagnostics()["available"] or pytest.skip("no Vulkan device")
    except texbridge.BackendError as e:
        pytest.skip(f"vulkan backend unavailable: {e}")
    out = run_clean("""
import threading
from texbridge.backends import get_backend
vk = get_backend("vulkan")
outcomes = []
for round in range(20):
    tex = vk.create_texture(256, 256, "rgba8")
    frame = np.full(tex.shape, round, np.uint8)
    def pump():
        try:
            while True:
                tex.upload(frame)
                tex.download()
        except texbridge.ClosedError:
            outcomes.append("closed")
    t = threading.Thread(target=pump)
    t.start()
    tex.close()
    t.join(10)
print("outcomes", len(outcomes), set(outcomes))
""")
    assert "outcomes 20 {'closed'}" in out
