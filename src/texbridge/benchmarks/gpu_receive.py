"""A GL receiver's per-frame cost: receive() into a GL texture (a GPU copy of the imported slot) against the
download + upload path a GL consumer had before (slot → NumPy → its texture), at 1080p and 4K, in the same run.

Both sides read the same Vulkan sender's slots imported into the same GL context; each iteration the sender
publishes a new frame first (not timed), so every receive() copies. A memfd sender's receive() (one upload from
the shared pages) is shown for reference. Run as a script to print the table.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from ._report import Row, latency_row, print_rows, private_namespace


def run(quick: bool) -> list[Row]:
    import texbridge

    rows: list[Row] = []
    with private_namespace("bench-gpu-receive"):
        for (w, h), n in (((1920, 1080), 10 if quick else 100), ((3840, 2160), 4 if quick else 40)):
            frame = np.full((h, w, 4), 7, np.uint8)
            group = f"GL receiver, {w}x{h} rgba8 frame → GL texture"
            with texbridge.Sender(f"gpu-{w}", w, h, backend="vulkan") as tx, \
                    texbridge.Receiver(f"gpu-{w}", backend="gl") as rx:
                renderer = ""
                gpu, cpu = [], []
                for i in range(n + 1):  # the first of each is a warm-up (texture creation, lazy entry points)
                    tx.send(frame)
                    t0 = time.perf_counter()
                    tex = rx.receive()
                    dt = time.perf_counter() - t0
                    assert tex is not None and rx.is_new
                    if i:
                        gpu.append(dt)
                    renderer = tex.context.caps.renderer.split(" (")[0]
                    tx.send(frame)
                    slot = rx._link.slots[0]  # a slot imported into GL, as the old path read it (any slot costs the same)
                    t0 = time.perf_counter()
                    tex.upload(slot.download())  # the old path: GPU → NumPy → GPU
                    dt = time.perf_counter() - t0
                    if i:
                        cpu.append(dt)
                rows.append(latency_row(group + f" ({renderer})", f"texbridge receive() ({rx.gpu_path})", gpu,
                                        f"n={n}"))
                rows.append(latency_row(group + f" ({renderer})", "download() + upload() (CPU round trip)", cpu,
                                        f"n={n}"))
            with texbridge.Sender(f"cpu-{w}", w, h) as tx, texbridge.Receiver(f"cpu-{w}", backend="gl") as rx:
                samples = []
                for i in range(n + 1):
                    tx.send(frame)
                    t0 = time.perf_counter()
                    assert rx.receive() is not None
                    if i:
                        samples.append(time.perf_counter() - t0)
                rows.append(latency_row(f"GL receiver of a memfd sender, {w}x{h}", f"receive() ({rx.gpu_path})",
                                        samples, f"n={n}"))
    return rows


if __name__ == "__main__":
    print_rows(run("--quick" in sys.argv))
