"""Benchmarks run by `texbridge bench` (they ship in the package, so an installed wheel can measure itself).

Each module exposes `run(quick) -> list[_report.Row]` and can run alone: `python -m texbridge.benchmarks.NAME
[--quick]`. Adding one: the module here and its row in BENCHMARKS (`texbridge bench --list` shows the text).
"""

from __future__ import annotations

import importlib
from types import ModuleType

BENCHMARKS = {
    "broker": "open by handle → NumPy, open/close rate, many clients, registry scale (vs SharedMemory)",
    "keyed_mutex": "AcquireSync/ReleaseSync handoff latency, 4K handoff rate, timeout precision (vs multiprocessing, a pipe)",
    "senders": "sender → receiver latency and frames/s at 1080p/4K (vs multiprocessing.Queue, shared_memory)",
    "vulkan": "fd → VkImage, open → VkImage, upload/download throughput, keyed-mutex ping-pong",
    "gst": "GStreamer 1080p: texbridgesrc / texbridgesink frames/s (vs appsrc / appsink with NumPy copies)",
    "gl": "exported fd → GL texture, against the raw GL calls",
    "gpu_receive": "GL receiver: receive() into a GL texture vs download + upload, 1080p and 4K",
    "cuda": "open → device pointer/torch, handoff with a kernel per side, Vulkan → CUDA chain; with and without MPS (vs torch.multiprocessing)",
    "bridge": "the bridge over a shared file and TCP: transport rows, then sender → bridge → mirror → receiver latency vs local, 4 remote receivers, kill -9 recovery",
    "multigpu": "GPU 0 memory used on GPU 1: peer-mapped cuda_vmm, peer_copy (vs cuMemcpyPeer, host-staged)",
}


def load(name: str) -> ModuleType:
    """The benchmark module `name` (a key of BENCHMARKS)."""
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; available: {', '.join(BENCHMARKS)}")
    return importlib.import_module(f"{__name__}.{name}")
