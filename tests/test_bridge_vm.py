"""The bridge across a real VM boundary: a QEMU guest (TCG) with an ivshmem-plain device backed by a host file,
the exact path a VM user has (tests/vm/harness.py boots it; tests/vm/guest_side.py is the guest's half).

Skips only when the machine cannot run a VM (the skip names what is missing: `scripts/dev vm` installs it).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from texbridge.bridge._link import FrameMeta, StreamFormat
from texbridge.bridge._shmfile import ShmEndpoint

sys.path.insert(0, str(Path(__file__).parent / "vm"))
import harness  # noqa: E402
from guest_side import pattern as guest_side_pattern  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MISSING = harness.capabilities()
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"no VM on this machine: missing {MISSING}")


@pytest.fixture(scope="module", autouse=True)
def guest_kernel():
    """The cached guest kernel + initramfs (fetched once: ~15 s). No kernel to be had is a missing capability."""
    try:
        harness.ensure_guest()
    except (OSError, RuntimeError, harness.subprocess.CalledProcessError) as e:
        pytest.skip(f"no guest kernel for the VM: {e}")


def pattern(fmt: StreamFormat, n: int) -> np.ndarray:
    h, rb = fmt.height, fmt.row_bytes
    return ((np.arange(h * rb, dtype=np.uint32).reshape(h, rb) * 31 + n * 7) % 253).astype(np.uint8)


def test_guest_round_trip_over_ivshmem_bar_pixel_exact(tmp_path):
    """Host writes frames, the guest reads them through its BAR and writes back 255 - each byte: both directions
    pixel-exact, frame numbers and user data carried."""
    shm = Path("/dev/shm") / f"texbridge-vmtest-{os.getpid()}"
    fmt = StreamFormat(256, 256, "rgba8")  # 256 KiB frames: small for a TCG guest
    ep = ShmEndpoint(shm, "serve", size=16 << 20, label="host")
    ep.establish(0)  # create and format the file before QEMU maps it
    guest = harness.start(f"{ROOT}/.venv/bin/python tests/vm/guest_side.py echo", shm=str(shm), cwd=str(ROOT))
    try:
        link = None
        deadline = time.monotonic() + 180
        while link is None and time.monotonic() < deadline and guest.running():
            link = ep.establish(0.5)
        assert link is not None, f"the guest never joined: {ep.last_problem}\n{guest.text()[-3000:]}"
        assert link.peer_label == "guest"
        link.send({"op": "format", "w": fmt.width, "h": fmt.height, "format": fmt.format})
        w, r = link.open_writer(1, fmt), link.open_reader(2, fmt)
        for n in range(1, 11):
            view = w.begin()
            view[...] = pattern(fmt, n)
            w.commit(FrameMeta(n, timestamp_ns=n * 1000, user_data=b"frame %d" % n))
            got = None
            until = time.monotonic() + 60
            while got is None and time.monotonic() < until:
                link.wait(0.05)
                got = r.read(lambda v, m: (v.copy(), m), n - 1)
            assert got is not None, f"frame {n} never came back"
            assert got[1].frame == n and got[1].user_data == b"frame %d" % n and got[1].timestamp_ns == n * 1000
            assert np.array_equal(got[0], 255 - pattern(fmt, n)), f"frame {n} not pixel-exact"
        link.send({"op": "stop"})
        msgs: list = []
        until = time.monotonic() + 60
        while not msgs and time.monotonic() < until:
            link.wait(0.1)
            msgs = link.receive()
        assert msgs == [{"op": "bye", "frames": 10}]
        rc, console = guest.finish(timeout=120)
        assert rc == 0, console[-3000:]
    finally:
        guest.kill()
        ep.close()
        shm.unlink(missing_ok=True)


def test_senders_cross_the_vm_boundary_both_ways(runtime, tmp_path):
    """The whole bridge as a VM user runs it: `texbridge bridge serve --shm` on the host (its broker), `texbridge
    bridge join --shm auto` in the guest (the guest's own broker: its own kernel). Host Sender -> guest Receiver
    and guest Sender -> host Receiver, pixel-exact (tests/vm/guest_side.py senders is the guest's half)."""
    import subprocess

    import texbridge as tb
    from texbridge.senders import Receiver, Sender, list_senders

    ns = os.environ["TEXBRIDGE_NAMESPACE"]
    shm = Path("/dev/shm") / f"texbridge-vmtest-{os.getpid()}"
    log_path = tmp_path / "serve.log"
    log = open(log_path, "w")
    serve = subprocess.Popen([sys.executable, "-m", "texbridge.cli", "bridge", "serve", "--shm", str(shm), "--size",
                              "16", "--max-size", "256x256", "--label", "host", "-n", ns],
                             stdout=log, stderr=subprocess.STDOUT)
    guest = None
    try:
        deadline = time.monotonic() + 30
        while not (shm.exists() and shm.stat().st_size == 16 << 20) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert shm.exists(), log_path.read_text()
        guest = harness.start(f"{ROOT}/.venv/bin/python tests/vm/guest_side.py senders --timeout 400", shm=str(shm),
                              cwd=str(ROOT))
        session = tb.connect(ns)
        shape = (48, 64, 4)
        mine, want = guest_side_pattern(shape, 1), guest_side_pattern(shape, 2)
        with Sender("hostcam", 64, 48, session=session) as snd:
            rx = None
            got_guest = False
            deadline = time.monotonic() + 420
            while time.monotonic() < deadline and guest.running():
                snd.send(mine)
                if rx is None and "guestcam@guest" in {i.name for i in list_senders(session)}:
                    rx = Receiver("guestcam@guest", session=session)
                if rx is not None and not got_guest:
                    frame = rx.wait_frame(0.2)
                    got_guest = frame is not None and frame.shape == want.shape and np.array_equal(frame, want)
                else:
                    time.sleep(0.1)
                if got_guest and "guest: hostcam@host pixel-exact" in guest.text():
                    break
            assert got_guest, f"guestcam@guest never arrived pixel-exact\n{log_path.read_text()}\n{guest.text()}"
            if rx is not None:
                rx.close()
        # hostcam retired: the guest sees hostcam@host go and exits 0
        rc, console = guest.finish(timeout=300)
        assert "guest: hostcam@host pixel-exact" in console and rc == 0, console[-4000:] + log_path.read_text()
    finally:
        if guest is not None:
            guest.kill()
        serve.terminate()
        try:
            serve.wait(10)
        except subprocess.TimeoutExpired:
            serve.kill()
        log.close()
        shm.unlink(missing_ok=True)
