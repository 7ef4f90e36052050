"""The guest's half of the VM tests: join the bridge over the ivshmem BAR and answer the host.

    python tests/vm/guest_side.py echo [--shm PATH|auto]
    python tests/vm/guest_side.py senders

echo (transport level): read stream 1 (the host's frames), write each back on stream 2 transformed (255 - byte, the
same frame number and user data) until the host sends {"op": "stop"}; then say {"op": "bye", "frames": n}, exit 0.

senders (the whole bridge, as a user runs it): start `texbridge bridge join --shm auto --label guest` against the
guest's own broker, publish Sender "guestcam" (pattern(seed=2)), and receive "hostcam@host" until it holds
pattern(seed=1) pixel-exact; exit 0 once that happened and the host retired hostcam (its signal that it received
guestcam@guest pixel-exact too).
"""

from __future__ import annotations

import argparse
import sys
import time

from texbridge.bridge._ivshmem import find_ivshmem
from texbridge.bridge._link import BridgeError, FrameMeta, StreamFormat
from texbridge.bridge._shmfile import ShmEndpoint


def echo(path: str, timeout: float) -> int:
    ep = ShmEndpoint(path, "join", label="guest")
    deadline = time.monotonic() + timeout
    link = None
    while link is None and time.monotonic() < deadline:
        link = ep.establish(1.0)
    if link is None:
        print(f"guest: no bridge on {path}: {ep.last_problem}", flush=True)
        return 3
    print(f"guest: joined {link.peer_label} over {path}", flush=True)
    reader = writer = None
    fmt = None
    last = n = 0
    try:
        while time.monotonic() < deadline:
            link.wait(0.2)
            for m in link.receive():
                if m.get("op") == "format":  # the host's stream geometry
                    fmt = StreamFormat(m["w"], m["h"], m["format"])
                    reader, writer = link.open_reader(1, fmt), link.open_writer(2, fmt)
                elif m.get("op") == "stop":
                    link.send({"op": "bye", "frames": n})
                    time.sleep(0.3)
                    return 0
            if reader is None or writer is None:
                continue
            got = reader.read(lambda v, meta: (255 - v, meta), last)
            if got is not None:
                pixels, meta = got
                last = meta.frame
                out = writer.begin()
                out[...] = pixels
                writer.commit(FrameMeta(meta.frame, meta.timestamp_ns, meta.damage, meta.user_data))
                n += 1
    except BridgeError as e:
        print(f"guest: link failed: {e}", flush=True)
        return 4
    finally:
        link.close()
        ep.close()
    print("guest: timed out", flush=True)
    return 5


def pattern(shape: tuple[int, ...], seed: int) -> "np.ndarray":
    import numpy as np

    n = 1
    for d in shape:
        n *= d
    return ((np.arange(n, dtype=np.uint32) * 7 + seed * 13) % 251).astype(np.uint8).reshape(shape)


def senders(timeout: float) -> int:
    import os
    import subprocess

    import numpy as np

    from texbridge.senders import Receiver, Sender, list_senders

    import texbridge as tb

    os.environ.setdefault("TEXBRIDGE_RUNTIME_DIR", "/tmp/texbridge-run")
    os.environ["TEXBRIDGE_NAMESPACE"] = "vm"
    t0 = time.monotonic()
    session = tb.connect("vm", timeout=timeout / 2)  # starts the guest's broker (slow under TCG) before the bridge
    print(f"guest: broker up ({time.monotonic() - t0:.1f} s)", flush=True)
    log = open("/tmp/bridge-join.log", "w")
    join = subprocess.Popen([sys.executable, "-m", "texbridge.cli", "bridge", "join", "--shm", "auto", "--label",
                             "guest", "-n", "vm"], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    got_host = False
    try:
        mine = pattern((48, 64, 4), 2)
        want = pattern((48, 64, 4), 1)
        with Sender("guestcam", 64, 48, session=session) as snd:
            rx = None
            while time.monotonic() < deadline:
                snd.send(mine)
                names = {i.name for i in list_senders(session)}
                if rx is None and "hostcam@host" in names:
                    rx = Receiver("hostcam@host", session=session)
                    print("guest: hostcam@host appeared", flush=True)
                if rx is not None and not got_host:
                    frame = rx.wait_frame(0.2)
                    if frame is not None and frame.shape == want.shape and np.array_equal(frame, want):
                        got_host = True
                        print("guest: hostcam@host pixel-exact", flush=True)
                elif got_host and "hostcam@host" not in names:
                    print("guest: hostcam@host retired: done", flush=True)
                    return 0
                else:
                    time.sleep(0.1)
        print("guest: timed out" + ("" if got_host else " (hostcam@host never arrived pixel-exact)"), flush=True)
        return 5
    finally:
        join.terminate()
        try:
            join.wait(20)
        except subprocess.TimeoutExpired:
            join.kill()
        log.close()
        if not got_host:
            print(open("/tmp/bridge-join.log").read()[-3000:], flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["echo", "senders"])
    p.add_argument("--shm", default="auto")
    p.add_argument("--timeout", type=float, default=240)
    a = p.parse_args()
    if a.mode == "senders":
        return senders(a.timeout)
    path = find_ivshmem() if a.shm == "auto" else a.shm
    return echo(path, a.timeout)


if __name__ == "__main__":
    sys.exit(main())
