"""The guest's half of the VM tests: join the bridge over the ivshmem BAR and answer the host.

    python tests/vm/guest_side.py echo [--shm PATH|auto]

echo: read stream 1 (the host's frames), write each back on stream 2 transformed (255 - byte, the same frame
number and user data) until the host sends {"op": "stop"}; then say {"op": "bye", "frames": n} and exit 0.
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


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["echo"])
    p.add_argument("--shm", default="auto")
    p.add_argument("--timeout", type=float, default=240)
    a = p.parse_args()
    path = find_ivshmem() if a.shm == "auto" else a.shm
    return echo(path, a.timeout)


if __name__ == "__main__":
    sys.exit(main())
