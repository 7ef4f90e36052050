"""A TCP bridge end in its own process, for tests/test_bridge_tcp.py (and the veth namespace test).

echo (default): control {"op": "open", "stream", "width", "height", "format"} opens a reader and a writer of that
stream and answers {"op": "opened"}; every frame read is written back unchanged on the same stream number;
{"op": "echo", ...} comes back as {"op": "echoed", ...}. --slow S sleeps S seconds per loop turn (a slow receiver).
drive N: open stream 0, send N frames (random UI-like changes, with and without damage), check each echo
pixel-exact, print "VERIFIED N". Lines on stdout: "PORT p", "LINKED label codec", "DEAD Class: msg", "AUTH ...".
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from texbridge.bridge._link import Backoff, BridgeAuthError, BridgeError, FrameMeta, StreamFormat
from texbridge.bridge._tcp import TcpEndpoint, TlsOptions


def say(*words: object) -> None:
    print(*words, flush=True)


def echo(link, slow: float) -> None:
    readers, writers, last = {}, {}, {}
    while True:
        for m in link.receive():
            if m.get("op") == "open":
                s = m["stream"]
                fmt = StreamFormat(m["width"], m["height"], m["format"])
                writers[s] = link.open_writer(s, fmt)
                readers[s] = link.open_reader(s, fmt)
                last[s] = 0
                link.send({"op": "opened", "stream": s})
            elif m.get("op") == "echo":
                link.send({**m, "op": "echoed"})
        for s, r in readers.items():
            w = writers[s]

            def copy(view, meta, w=w):
                w.begin()[:] = view
                return meta

            meta = r.read(copy, last[s])
            if meta is not None:
                w.commit(meta)
                last[s] = meta.frame
        if slow:
            time.sleep(slow)
        link.wait(0.05)


def fuzz_target(link) -> None:
    """Stand still for a hostile peer: everything it sends reaches a decoder."""
    small, big = StreamFormat(64, 48, "rgba8"), StreamFormat(1920, 1080, "rgba8")
    readers = [link.open_reader(0, small), link.open_reader(1, big)]
    w = link.open_writer(0, small)
    w.begin()[:] = 1
    w.commit(FrameMeta(1))
    while True:
        link.receive()
        for r in readers:
            r.read(lambda v, m: int(v[0, 0]), 0)
        link.wait(0.05)


def drive(link, n: int, width: int, height: int) -> None:
    fmt = StreamFormat(width, height, "rgba8")
    w = link.open_writer(0, fmt)
    r = link.open_reader(0, fmt)
    link.send({"op": "open", "stream": 0, "width": width, "height": height, "format": "rgba8"})
    deadline = time.monotonic() + 10
    while not any(m.get("op") == "opened" for m in link.receive()):
        if time.monotonic() > deadline:
            raise SystemExit("no 'opened' answer")
        link.wait(0.05)
    rng = np.random.default_rng(7)
    cur = rng.integers(0, 256, (height, fmt.row_bytes), dtype=np.uint8)
    for i in range(1, n + 1):
        x, y = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        cur[y:y + 8, x * 4:(x + 8) * 4] = rng.integers(0, 256, (8, 32), dtype=np.uint8)
        w.begin()[:] = cur
        w.commit(FrameMeta(i, time.monotonic_ns(), ((x, y, 8, 8),) if i % 2 else (), b"%d" % i))
        deadline = time.monotonic() + 10
        while True:
            got = r.read(lambda v, m: (np.array_equal(v, cur), m), i - 1)
            if got is not None and got[1].frame == i:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"frame {i} did not come back")
            link.wait(0.05)
        if not got[0] or got[1].user_data != b"%d" % i:
            raise SystemExit(f"frame {i} came back different")
    say("VERIFIED", n)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["serve", "join"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--secret")
    p.add_argument("--label", default="peer")
    p.add_argument("--codec", default="lz4")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--tls-ca")
    p.add_argument("--slow", type=float, default=0.0)
    p.add_argument("--drive", type=int, default=0)
    p.add_argument("--size", default="320x240")
    p.add_argument("--once", action="store_true", help="exit when the first link dies")
    p.add_argument("--advertise", action="store_true", help="serve: announce over mDNS")
    p.add_argument("--find", help="join: the server announcing this label over mDNS")
    p.add_argument("--fuzz-target", action="store_true",
                   help="readers on stream 0 (64x48) and 1 (1920x1080) and a writer on 0 from the start")
    a = p.parse_args()
    say("STARTED")
    tls = TlsOptions(a.tls_cert, a.tls_key, a.tls_ca, "localhost") if (a.tls_cert or a.tls_ca) else None
    try:
        ep = TcpEndpoint(a.role, "" if a.find else a.host, a.port, secret=a.secret, tls=tls, label=a.label,
                         codecs=(a.codec,), advertise=a.advertise, find=a.find)
    except BridgeError as e:
        say("REFUSED", f"{type(e).__name__}: {e}")
        sys.exit(3)
    if a.role == "serve":
        say("PORT", ep.port)
    backoff = Backoff()
    while True:
        try:
            link = ep.establish(1.0)
        except BridgeAuthError as e:
            say("AUTH", f"{type(e).__name__}: {e}")
            sys.exit(4)
        if link is None:
            if ep.errors:
                say("ERRORS", ep.errors[-1])
            time.sleep(backoff.next())
            continue
        backoff.reset()
        say("LINKED", link.peer_label, link.codec)
        try:
            if a.drive:
                width, height = (int(v) for v in a.size.split("x"))
                drive(link, a.drive, width, height)
                link.close()
                return
            if a.fuzz_target:
                fuzz_target(link)
            echo(link, a.slow)
        except BridgeError as e:
            say("DEAD", f"{type(e).__name__}: {e}")
            link.close()
            if a.once:
                return


if __name__ == "__main__":
    main()
