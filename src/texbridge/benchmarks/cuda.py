"""CUDA figures, every row with and without CUDA MPS in the same run, peers in the same run.

- open by handle → CUDA device pointer (and → torch tensor where torch is installed);
- a 1080p rgba8 frame handed back and forth between two processes with the keyed mutex, with one tiny kernel per
  side (PTX compiled by the driver's JIT: no NVRTC, no torch needed) and without GPU work, against
  torch.multiprocessing passing the same CUDA tensor through queues (where torch is installed);
- the chain a user runs: a Vulkan producer (fill on its queue) → a CUDA consumer (one kernel), ordered on the GPU by
  the keyed mutex's timeline semaphore, and where the consumer's time goes: acquire (the key handoff, CPU), GPU wait
  (its stream waiting for Vulkan's signal, CUDA events), kernel (events), release (signal + key, CPU).

A CUDA process decides once, at cuInit, whether it is an MPS client (a daemon answers at $CUDA_MPS_PIPE_DIRECTORY),
so the rows are measured in worker processes started per mode and the parent never touches CUDA: "no MPS" workers get
a pipe directory where nothing runs; "MPS" workers get the daemon's. The MPS rows use texbridge's per-user daemon if
it runs (or the one this user's CUDA already reaches); otherwise one is started for them and stopped after when the
user allows it (`texbridge bench --mps cuda`, TEXBRIDGE_BENCH_MPS=1), else they are skipped, saying why.

Targets (issue 14, H200): ≤ 100 us round trip with one kernel per side under MPS, ≥ 10x torch.multiprocessing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Any

from ._report import Row, latency_row, print_rows, private_namespace

W, H = 1920, 1080
_ROWS = "TEXBRIDGE-ROWS "  # the worker's one line of results on stdout
_MODES = ("no MPS", "MPS")
# Workers and peers run this module again with -m: its real name, also when it runs as __main__.
_MODULE = __spec__.name if __spec__ is not None else "texbridge.benchmarks.cuda"


# -- the parent: modes, the MPS daemon, ordering ----------------------------------------------------------------------
def run(quick: bool) -> list[Row]:
    try:
        import cuda.bindings.driver  # noqa: F401
    except ImportError as e:
        print(f"cuda benchmark skipped: cuda-bindings not installed ({e})", file=sys.stderr)
        return []
    from .. import _mps

    rows: dict[str, list[Row]] = {}
    with tempfile.TemporaryDirectory(prefix="texbridge-no-mps-") as nowhere:
        got = _run_worker("no MPS", {"CUDA_MPS_PIPE_DIRECTORY": nowhere}, quick)
        if got is None:
            return []
        rows["no MPS"] = got
    env, stop_after, why = _mps_env(_mps)
    if env is None:
        print(f"cuda benchmark: MPS rows skipped: {why}", file=sys.stderr)
    else:
        print(f"cuda benchmark: MPS rows with {why}", file=sys.stderr)
        try:
            rows["MPS"] = _run_worker("MPS", env, quick) or []
        finally:
            if stop_after:
                _mps.stop()
    return _ordered(rows)


def _mps_env(mps: Any) -> tuple[dict[str, str] | None, bool, str]:
    """(the workers' environment for the MPS rows or None, whether to stop the daemon after, what was decided)."""
    mine = mps.status(mps.directories().pipe)
    if mine.running:
        return mps.client_env(), False, f"texbridge's daemon ({mine.detail})"
    serving = mps.status()
    if serving.running and mps.control_path() is not None:
        return {"CUDA_MPS_PIPE_DIRECTORY": str(serving.pipe)}, False, f"the daemon this user's CUDA reaches " \
                                                                       f"({serving.detail})"
    if os.environ.get("TEXBRIDGE_BENCH_MPS") != "1":
        return None, False, "no MPS daemon runs; `texbridge bench --mps cuda` starts one for these rows"
    if mps.control_path() is None:
        return None, False, f"{mps.CONTROL} is not on PATH (NVIDIA compute utilities)"
    state, started = mps.start()
    return mps.client_env(), started, f"a daemon started for them ({state.detail})"


def _run_worker(mode: str, env: dict[str, str], quick: bool) -> list[Row] | None:
    """The rows of one mode, measured in a fresh process (and its peers, which inherit the environment)."""
    cmd = [sys.executable, "-m", _MODULE, "--worker", mode] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, env=dict(os.environ, **env), stdout=subprocess.PIPE, text=True, timeout=1800)
    payload = None
    for line in proc.stdout.splitlines():
        if line.startswith(_ROWS):
            payload = json.loads(line[len(_ROWS):])
        else:
            print(line, file=sys.stderr)
    if proc.returncode != 0 or payload is None:
        raise RuntimeError(f"the {mode} worker failed (exit {proc.returncode}); its error is above")
    if "skip" in payload:
        print(f"cuda benchmark skipped: {payload['skip']}", file=sys.stderr)
        return None
    return [Row(**r) for r in payload["rows"]]


def _ordered(by_mode: dict[str, list[Row]]) -> list[Row]:
    """Groups in first-seen order; in each, texbridge under MPS first (the figure to compare with), then texbridge
    without, then the peers. The mode is named in each subject."""
    groups: dict[str, list[tuple[int, int, Row]]] = {}
    for mode in _MODES:
        for i, r in enumerate(by_mode.get(mode, [])):
            r.subject = f"{r.subject}, {mode}"
            rank = (0 if r.subject.startswith("texbridge") else 2) + (0 if mode == "MPS" else 1)
            groups.setdefault(r.group, []).append((rank, i, r))
    return [r for members in groups.values() for _, _, r in sorted(members, key=lambda m: (m[0], m[1]))]


# -- one tiny kernel ----------------------------------------------------------------------------------------------------
# The first 32-bit word of a buffer += 1. PTX, JIT-compiled by the driver (PTX ISA 7.0 for sm_70, which any newer GPU
# runs): no NVRTC library, no torch.
_PTX = b"""
.version 7.0
.target sm_70
.address_size 64
.visible .entry texbridge_bump(.param .u64 texbridge_bump_p)
{
    .reg .b32 %r<3>;
    .reg .b64 %rd<3>;
    ld.param.u64 %rd1, [texbridge_bump_p];
    cvta.to.global.u64 %rd2, %rd1;
    ld.global.u32 %r1, [%rd2];
    add.s32 %r2, %r1, 1;
    st.global.u32 [%rd2], %r2;
    ret;
}
"""


class Bump:
    """Launch the one-thread kernel on a stream of `device` (its primary context, as texbridge's CUDA resources)."""

    def __init__(self, device: Any) -> None:
        import numpy as np
        from cuda.bindings import driver as cu

        from texbridge.backends.cuda import check

        self._cu, self._check, self.device = cu, check, device
        image = np.frombuffer(_PTX + b"\0", np.uint8)
        with device:
            self.module = check(cu.cuModuleLoadData(image.ctypes.data), "cuModuleLoadData")
            self.function = check(cu.cuModuleGetFunction(self.module, b"texbridge_bump"), "cuModuleGetFunction")
        self._arg = np.zeros(1, np.uint64)  # the kernel's one parameter: the word's address
        self._params = np.array([self._arg.ctypes.data], np.uint64)  # kernelParams: pointers to each parameter

    def __call__(self, ptr: int, stream: Any) -> None:
        from texbridge.backends.cuda import _as_stream

        self._arg[0] = ptr
        with self.device:
            self._check(self._cu.cuLaunchKernel(self.function, 1, 1, 1, 1, 1, 1, 0, _as_stream(stream),
                                                self._params.ctypes.data, 0), "cuLaunchKernel")


class Events:
    """CUDA events recorded on a stream, read after the run (elapsed times in seconds)."""

    def __init__(self, device: Any, n: int) -> None:
        from cuda.bindings import driver as cu

        from texbridge.backends.cuda import check

        self._cu, self._check, self.device = cu, check, device
        with device:
            self.events = [check(cu.cuEventCreate(0), "cuEventCreate") for _ in range(n)]

    def record(self, i: int, stream: Any) -> None:
        from texbridge.backends.cuda import _as_stream

        with self.device:
            self._check(self._cu.cuEventRecord(self.events[i], _as_stream(stream)), "cuEventRecord")

    def elapsed(self, a: int, b: int) -> float:
        with self.device:
            self._check(self._cu.cuEventSynchronize(self.events[b]), "cuEventSynchronize")
            return self._check(self._cu.cuEventElapsedTime(self.events[a], self.events[b]), "cuEventElapsedTime") / 1e3

    def destroy(self) -> None:
        with self.device:
            for e in self.events:
                self._cu.cuEventDestroy(e)


# -- the worker: every row of one mode -----------------------------------------------------------------------------------
def _worker(mode: str, quick: bool) -> dict[str, Any]:
    from texbridge.backends.cuda import get_device, unavailable_reason

    reason = unavailable_reason()
    if reason:
        return {"skip": reason}
    dev = get_device()
    try:
        import torch
        torch_note = None if torch.cuda.is_available() else "torch sees no CUDA device"
    except ImportError:
        torch_note = "torch is not installed"
    where = f"{dev.name}, {mode}"
    rows = _open(quick, where, torch_note is None)
    rows += _handoff(quick, where, dev)
    if torch_note is None:
        rows += _torch_handoff(quick, where)
    else:
        print(f"cuda benchmark ({mode}): torch.multiprocessing rows skipped: {torch_note}", file=sys.stderr)
    rows += _chain(quick, where, dev)
    return {"rows": [asdict(r) for r in rows]}


def _open(quick: bool, where: str, with_torch: bool) -> list[Row]:
    import texbridge

    n = 200 if quick else 2000
    rows = []
    with private_namespace("bench-cuda-open"), texbridge.connect() as s:
        sources = [("cuda_vmm 1080p rgba8 texture", s.create_texture(W, H, "rgba8", backend="cuda"))]
        try:
            sources.append(("Vulkan opaque_fd 8 MB buffer", s.create_buffer(W * H * 4, backend="vulkan")))
        except texbridge.TexbridgeError as e:
            print(f"cuda benchmark: no Vulkan source ({e})", file=sys.stderr)
        for what, src in sources:
            ptrs, tensors = [], []
            for _ in range(n + 10):
                t0 = time.perf_counter()
                r = s.open(src.handle, backend="cuda")
                assert r.device_ptr
                ptrs.append(time.perf_counter() - t0)
                r.close()
            rows.append(latency_row("open by handle → CUDA device pointer", f"texbridge: {what}", ptrs[10:],
                                    f"{where}; broker round trip + CUDA import + map, {n} runs"))
            if with_torch:
                import torch

                for _ in range(n + 10):
                    t0 = time.perf_counter()
                    r = s.open(src.handle, backend="cuda")
                    t = torch.from_dlpack(r)
                    tensors.append(time.perf_counter() - t0)
                    assert t.data_ptr() == r.device_ptr
                    del t
                    r.close()
                rows.append(latency_row("open by handle → torch tensor", f"texbridge: {what}", tensors[10:],
                                        f"{where}; + torch.from_dlpack, {n} runs"))
            src.close()
        s.shutdown()
    return rows


def _handoff(quick: bool, where: str, dev: Any) -> list[Row]:
    """Round trips of one frame between two processes; each side (optionally) runs the kernel on the frame on its
    resource's stream, and release synchronizes that stream (cuda_vmm has no semaphore) before handing over."""
    n = 300 if quick else 3000
    rows = []
    for kernel in (True, False):
        group = (f"frame handoff round trip, one kernel per side (2 processes, {H}p rgba8)" if kernel else
                 "frame handoff round trip, no GPU work (the handoff's own cost)")
        rows.append(latency_row(group, "texbridge keyed mutex (cuda_vmm, stream sync)", _keyed_mutex(n, kernel, dev),
                                f"{where}; acquire → {'kernel → ' if kernel else ''}stream sync → release; {n} frames"))
    return rows


def _keyed_mutex(n: int, kernel: bool, dev: Any) -> list[float]:
    import texbridge

    with private_namespace("bench-cuda-handoff") as env, texbridge.connect() as s:
        tex = s.create_texture(W, H, "rgba8", backend="cuda", keyed_mutex=True, name="bench-handoff")
        tex.sync_stream = tex.stream
        bump = Bump(dev) if kernel else None
        peer = subprocess.Popen([sys.executable, "-m", _MODULE, "--peer", "handoff", str(n), str(int(kernel))],
                                env=env, stdout=subprocess.PIPE, text=True)
        try:
            assert peer.stdout.readline().strip() == "ready"
            samples = []
            ptr = tex.device_ptr
            for _ in range(n):  # each turn waits for the peer's: one iteration is one round trip
                t0 = time.perf_counter()
                tex.mutex.acquire(0, timeout=30)
                if bump:
                    bump(ptr, tex.sync_stream)
                tex.mutex.release(1)
                samples.append(time.perf_counter() - t0)
            tex.mutex.acquire(0, timeout=30)
            word = int(tex.download().reshape(-1).view("<u4")[0])
            assert word == 2 * n * kernel, f"frames were lost: first word {word}, expected {2 * n * kernel}"
            assert tex.cuda_sync == "stream_sync"
            tex.mutex.release(0)
            assert peer.wait(60) == 0, "the handoff peer failed"
        finally:
            if peer.poll() is None:
                peer.kill()
        tex.close()
        s.shutdown()
    return samples[10:]


def _peer_handoff(n: int, kernel: bool) -> None:
    import texbridge
    from texbridge.backends.cuda import get_device

    with texbridge.connect() as s:
        r = s.open("bench-handoff", backend="cuda")
        r.sync_stream = r.stream
        bump = Bump(get_device()) if kernel else None
        ptr = r.device_ptr
        print("ready", flush=True)
        for _ in range(n):
            r.mutex.acquire(1, timeout=30)
            if bump:
                bump(ptr, r.sync_stream)
            r.mutex.release(0)
        r.close()


def _torch_handoff(quick: bool, where: str) -> list[Row]:
    n = 300 if quick else 3000
    rows = []
    for kernel in (True, False):
        group = (f"frame handoff round trip, one kernel per side (2 processes, {H}p rgba8)" if kernel else
                 "frame handoff round trip, no GPU work (the handoff's own cost)")
        rows.append(latency_row(group, "torch.multiprocessing queue (same CUDA tensor)", _torch_mp(n, kernel),
                                f"{where}; put the tensor, peer {'runs the kernel, syncs, ' if kernel else ''}acks"))
    return rows


def _torch_mp(n: int, kernel: bool) -> list[float]:
    import torch
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    frame = torch.zeros((H, W, 4), dtype=torch.uint8, device="cuda")
    proc = ctx.Process(target=_mp_peer, args=(inbox, outbox, n, kernel))
    proc.start()
    try:
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            if kernel:
                frame[0, 0, 0] += 1
            torch.cuda.current_stream().synchronize()
            inbox.put(frame)
            outbox.get(timeout=60)
            samples.append(time.perf_counter() - t0)
        assert int(frame[0, 0, 0]) == (2 * n * kernel) % 256, "frames were lost"
        proc.join(60)
    finally:
        if proc.is_alive():
            proc.kill()
    return samples[10:]


def _mp_peer(inbox, outbox, n, kernel):  # module level: torch.multiprocessing's spawn pickles it by name
    import torch

    for _ in range(n):
        t = inbox.get()
        if kernel:
            t[0, 0, 0] += 1
        torch.cuda.current_stream().synchronize()
        outbox.put(1)
        del t


# -- Vulkan producer → CUDA consumer on the timeline semaphore ------------------------------------------------------------
CHAIN = "Vulkan producer → CUDA consumer (keyed mutex + timeline semaphore, 8 MB buffer)"


def _chain(quick: bool, where: str, dev: Any) -> list[Row]:
    """This process is the Vulkan producer (fills the buffer on its queue); a peer process is the CUDA consumer (one
    kernel). Each side's GPU work waits on the GPU for the other's timeline signal; nobody synchronizes a queue or
    stream on the CPU except Vulkan's fill (a fence wait inside clear())."""
    import texbridge

    try:
        from texbridge.backends import _vk

        vk = _vk.default_device()
    except Exception as e:
        print(f"cuda benchmark: chain rows skipped: no Vulkan device ({type(e).__name__}: {e})", file=sys.stderr)
        return []
    if vk.device_uuid != dev.uuid or vk.gpu_sync != "timeline_semaphore":
        print(f"cuda benchmark: chain rows skipped: Vulkan device {vk.name} is not CUDA device 0 or has no "
              f"exportable timeline semaphores (gpu_sync={vk.gpu_sync})", file=sys.stderr)
        return []
    n = 300 if quick else 3000
    with private_namespace("bench-cuda-chain") as env, texbridge.connect() as s:
        buf = s.create_buffer(W * H * 4, backend="vulkan", keyed_mutex=True, name="bench-chain")
        assert buf.descriptor.gpu_sync == "timeline_opaque_fd"
        peer = subprocess.Popen([sys.executable, "-m", _MODULE, "--peer", "chain", str(n), "1"], env=env,
                                stdout=subprocess.PIPE, text=True)
        try:
            assert peer.stdout.readline().strip() == "ready"
            rounds = []
            for i in range(n):
                t0 = time.perf_counter()
                buf.mutex.acquire(0, timeout=30)  # the fill below waits on the GPU for the consumer's signal
                buf.clear(2 * i)  # vkCmdFillBuffer, fence-waited
                buf.mutex.release(1)  # the queue signals the next value
                rounds.append(time.perf_counter() - t0)
            buf.mutex.acquire(0, timeout=30)
            word = int(buf.download().view("<u4")[0])
            assert word == 2 * (n - 1) + 1, f"the consumer's last kernel is missing: first word {word}"
            buf.mutex.release(0)
            parts = json.loads(peer.stdout.readline())
            assert peer.wait(60) == 0, "the chain consumer failed"
        finally:
            if peer.poll() is None:
                peer.kill()
        buf.close()
        s.shutdown()
    note = f"{where}; {n} frames"
    rows = [latency_row(f"{CHAIN}: round trip", "texbridge (producer's acquire → fill → release)", rounds[10:],
                        f"{note}; each turn includes the consumer's")]
    for part, what in (("acquire", "CPU: the key handed over (includes waiting for the producer's turn)"),
                       ("gpu_wait", "GPU: the consumer's stream waiting for Vulkan's timeline signal (events)"),
                       ("kernel", "GPU: the kernel (events)"),
                       ("launch", "CPU: enqueueing the kernel"),
                       ("release", "CPU: enqueueing the timeline signal + releasing the key")):
        rows.append(latency_row(f"{CHAIN}: consumer {part}", "texbridge CUDA consumer", parts[part][10:],
                                f"{note}; {what}"))
    return rows


def _peer_chain(n: int) -> None:
    import texbridge

    with texbridge.connect() as s:
        r = s.open("bench-chain", backend="cuda")
        assert r.semaphore is not None, "the Vulkan buffer's timeline semaphore did not reach CUDA"
        r.sync_stream = r.stream
        bump, ev = Bump(r.device), Events(r.device, 3 * n)
        ptr, m, stream = r.device_ptr, r.mutex, r.sync_stream
        times: dict[str, list[float]] = {"acquire": [], "launch": [], "release": []}
        pc = time.perf_counter
        print("ready", flush=True)
        for i in range(n):
            t0 = pc()
            value = m._mutex.acquire(1, timeout=30)  # the key alone (the plain KeyedMutex under ResourceMutex)...
            t1 = pc()
            ev.record(3 * i, stream)
            m._acquired(value)  # ...then what acquire adds: the stream waits on the GPU for the producer's value
            ev.record(3 * i + 1, stream)
            t2 = pc()
            bump(ptr, stream)
            ev.record(3 * i + 2, stream)
            t3 = pc()
            m.release(0)  # signals acquired+1 on the stream after the kernel, then hands the key back
            t4 = pc()
            times["acquire"].append(t1 - t0)
            times["launch"].append(t3 - t2)
            times["release"].append(t4 - t3)
        times["gpu_wait"] = [ev.elapsed(3 * i, 3 * i + 1) for i in range(n)]
        times["kernel"] = [ev.elapsed(3 * i + 1, 3 * i + 2) for i in range(n)]
        ev.destroy()
        assert r.cuda_sync == "timeline_semaphore", r.cuda_sync
        print(json.dumps(times), flush=True)
        r.close()


if __name__ == "__main__":
    if "--worker" in sys.argv:
        out = _worker(sys.argv[sys.argv.index("--worker") + 1], "--quick" in sys.argv)
        print(_ROWS + json.dumps(out), flush=True)
    elif "--peer" in sys.argv:
        kind, count, flag = sys.argv[sys.argv.index("--peer") + 1:][:3]
        if kind == "handoff":
            _peer_handoff(int(count), flag == "1")
        else:
            _peer_chain(int(count))
    else:
        print_rows(run(quick="--quick" in sys.argv))
