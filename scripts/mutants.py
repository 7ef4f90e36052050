#!/usr/bin/env python3
"""Hand-made mutation checks: break one guarantee, run the tests that should notice, put the code back.

Each mutant below is one textual edit of the source that breaks a guarantee the docs promise (docs/testing.md has
the table). For each mutant this script applies the edit, runs the tests named for it `--repeat` times, and counts
the mutant as caught only if every run fails; the file is restored in every case (a `finally`, then a check that
`git diff` of the file is empty). A mutant of `_synccore.c` rebuilds the extension before and after.

    scripts/mutants.py --list            # the mutants
    scripts/mutants.py                   # run them all (slow: minutes)
    scripts/mutants.py open-quota d3d11-mips --repeat 5

Run it in a clean worktree: it refuses to start when a file it would mutate has uncommitted changes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = "src/texbridge/"


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to src/texbridge/
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest node ids (or files) expected to fail
    guarantee: str


MUTANTS = [
    # -- issue 16's list ----------------------------------------------------------------------------------------------
    Mutant("open-quota", "_broker/registry.py",
           "if rec.handle not in client.refs and len(client.refs) >= self.quotas.resources:",
           "if False:",
           ("tests/test_registry.py::test_open_counts_against_the_resource_quota",),
           "OPEN takes a reference only within the client's resource quota"),
    Mutant("memfd-offset", "backends/memfd.py", "fmt.numpy_dtype, offset=d.offset,", "fmt.numpy_dtype, offset=0,",
           ("tests/test_memfd.py",), "numpy() starts at the descriptor's plane offset"),
    Mutant("memfd-pitch", "backends/memfd.py", "strides=(d.row_pitch, fmt.bytes_per_pixel, item)",
           "strides=(d.width * fmt.bytes_per_pixel, fmt.bytes_per_pixel, item)",
           ("tests/test_memfd.py",), "numpy() rows are the descriptor's row pitch apart"),
    Mutant("layout-align", "_descriptor.py", "*, pitch_align: int = 256)", "*, pitch_align: int = 64)",
           ("tests/test_memfd.py::test_created_textures_use_the_d3d_pitch_rule",),
           "created CPU textures pad rows to D3D's 256-byte pitch"),
    Mutant("required-size-offset", "_descriptor.py", "return max(off + pitch * self.height * self.array_size",
           "return max(pitch * self.height * self.array_size",
           ("tests/test_memfd.py::test_memory_smaller_than_offset_plus_layout_is_refused",),
           "a texture's memory covers offset + pitch * height (validation and import)"),
    Mutant("memfd-import-size", "backends/memfd.py",
           "if not facts.size_sealed or facts.size < descriptor.required_size():", "if not facts.size_sealed:",
           ("tests/test_memfd.py::test_memory_smaller_than_offset_plus_layout_is_refused",),
           "memfd import refuses memory smaller than its layout (SIGBUS)"),
    Mutant("d3d11-mips-array", "_d3d11.py", "pack(width, height, mip_levels, array_size,", "pack(width, height, 1, 1,",
           ("tests/test_descriptor.py", "tests/test_vulkan.py"), "the D3D11 description carries MipLevels and ArraySize"),
    Mutant("d3d11-keyed-flag", "_d3d11.py", "D3D11_RESOURCE_MISC_SHARED_KEYEDMUTEX if keyed_mutex else",
           "D3D11_RESOURCE_MISC_SHARED if keyed_mutex else", ("tests/test_descriptor.py",),
           "a keyed-mutex texture's D3D11 MiscFlags say SHARED_KEYEDMUTEX"),
    Mutant("d3d11-format", "_d3d11.py", "get_format(format).dxgi, 1, 0, 0,", "get_format(format).vk, 1, 0, 0,",
           ("tests/test_descriptor.py",), "the D3D11 Format is the DXGI_FORMAT value"),
    Mutant("memfd-d3d11-keyed", "backends/memfd.py", "d3d11_texture_desc(width, height, format, keyed_mutex=keyed_mutex)",
           "d3d11_texture_desc(width, height, format)",
           ("tests/test_descriptor.py",), "memfd textures describe their keyed mutex to D3D11"),
    Mutant("dxgi-table", "_formats.py", 'Format("rgba16", 11,', 'Format("rgba16", 13,',
           ("tests/test_descriptor.py",), "the format table's DXGI values are dxgiformat.h's"),
    Mutant("sequential-handles", "_broker/registry.py", "            handle = self._new_handle() or 1\n            while",
           "            handle = self.counters['registered'] + 1\n            while",
           ("tests/test_broker.py::test_handles_a_real_broker_hands_out_are_unguessable",
            "tests/test_registry.py::test_a_registry_draws_its_handles_at_random"),
           "the broker's handles are random 64-bit values"),
    Mutant("narrow-handles", "_broker/registry.py", "new_handle: Callable[[], int] = lambda: secrets.randbits(64),",
           "new_handle: Callable[[], int] = lambda: secrets.randbits(32),",
           ("tests/test_broker.py::test_handles_a_real_broker_hands_out_are_unguessable",),
           "handles use all 64 bits"),
    Mutant("gid-for-uid", "_broker/server.py", "pid, uid = creds.pid, creds.uid", "pid, uid = creds.pid, creds.gid",
           ("tests/test_broker.py::test_peer_credentials_are_read_in_ucred_order_without_root",
            "tests/test_broker.py::test_admission_goes_by_uid_never_gid"),
           "admission goes by SO_PEERCRED's uid, not its gid"),
    Mutant("ucred-order", "_broker/server.py", "    uid: int\n    gid: int", "    gid: int\n    uid: int",
           ("tests/test_broker.py::test_peer_credentials_are_read_in_ucred_order_without_root",
            "tests/test_broker.py::test_admission_goes_by_uid_never_gid"),
           "struct ucred is read as {pid, uid, gid}"),
    # -- senders: the ring's seqlock and pins (docs/senders.md) -----------------------------------------------------
    Mutant("ring-no-recheck", "senders/ring.py", "if int(u[_SEQ + slot]) != s1 or int(u[_GEN]) != generation:\n                continue",
           "if False:\n                continue",
           ("tests/test_senders.py::test_a_copy_overlapped_by_sends_into_every_pinned_slot_is_refused",
            "tests/test_ring.py::test_a_copy_overlapped_by_a_write_is_detected_and_retried_on_the_newer_frame"),
           "a copy overlapped by a write is dropped (seqlock re-check after the copy)"),
    Mutant("ring-reads-odd-slot", "senders/ring.py", "if s1 & 1 or int(u[_SLOT_FRAME + slot]) != frame:",
           "if int(u[_SLOT_FRAME + slot]) != frame:", ("tests/test_ring.py",),
           "a reader never copies a slot whose sequence is odd (being written)"),
    Mutant("ring-ignores-pins", "senders/ring.py", "return int(np.bitwise_or.reduce(self.rows[:, _R_PIN]))", "return 0",
           ("tests/test_ring.py", "tests/test_senders.py::test_receive_semantics_in_process"),
           "the writer skips slots a reader has pinned"),
    Mutant("ring-no-pin-recheck", "senders/ring.py", "if not (pinned >> cand) & 1:\n                return cand",
           "if True:\n                return cand",
           ("tests/test_ring.py::test_a_pin_landing_between_the_busy_mark_and_the_recheck_makes_the_writer_back_off",),
           "Dekker: the writer re-reads the pins after marking a slot busy, and backs off"),
    Mutant("ring-overwrite-silent", "senders/ring.py", "self.overwrites += 1\n        u[_SEQ + slot] += 1",
           "self.overwrites += 1\n        u[_SEQ + slot] += 2", ("tests/test_ring.py",),
           "overwriting a pinned slot makes its sequence odd while writing"),
    Mutant("ring-unpin-zero-copy", "senders/ring.py", "if not keep_pin:\n                rows[row, _R_PIN] = 0",
           "if True:\n                rows[row, _R_PIN] = 0",
           ("tests/test_ring.py", "tests/test_senders.py::test_receive_semantics_in_process"),
           "a zero-copy read keeps its slot pinned until release()"),
    Mutant("ring-abort-keeps-frame", "senders/ring.py", "u[_SLOT_FRAME + slot] = 0\n        u[_SEQ + slot] += 1",
           "u[_SEQ + slot] += 1", ("tests/test_ring.py::test_abort_leaves_no_frame_and_moves_the_sequence",),
           "an aborted write leaves no frame in its slot"),
    Mutant("ring-no-stale", "senders/ring.py", "if int(u[_GEN]) != generation:\n                return Stale",
           "if False:\n                return Stale", ("tests/test_ring.py",),
           "a read after a resize says Stale (reopen the slots)"),
    Mutant("ring-close-no-park", "senders/ring.py", "u[_LATEST] = (self.frame << _SLOT_BITS) | _SLOT_MASK\n",
           "pass\n", ("tests/test_ring.py",),
           "a closing sender parks `latest` so readers stop and waiters wake"),
    Mutant("ring-publish-no-bump", "senders/ring.py", "u[_SEQ:_SEQ + n] += 1  # odd: a receiver mid-copy", "pass  # odd: a receiver mid-copy",
           ("tests/test_ring.py",), "a new ring generation moves every slot's sequence (mid-copy readers retry)"),
]


def run_tests(tests: tuple[str, ...], timeout: float) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *tests]
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, "timed out"
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    return p.returncode, lines[-1] if lines else p.stderr[-300:]


def rebuild() -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."],
                   cwd=ROOT, check=True, capture_output=True)


def dirty(path: Path) -> bool:
    return subprocess.run(["git", "diff", "--quiet", "--", str(path)], cwd=ROOT).returncode != 0


def check(m: Mutant, repeat: int, timeout: float) -> tuple[bool, list[str]]:
    path = ROOT / SRC / m.file
    original = path.read_text()
    count = original.count(m.old)
    if count != 1:
        raise SystemExit(f"{m.name}: the text to mutate occurs {count} times in {m.file} (the code moved?)")
    results = []
    try:
        path.write_text(original.replace(m.old, m.new, 1))
        if path.suffix == ".c":
            rebuild()
        for _ in range(repeat):
            rc, last = run_tests(m.tests, timeout)
            results.append(f"rc={rc} {last}")
            if rc == 0:
                break  # survived once: no need to run it again
    finally:
        path.write_text(original)
        if path.suffix == ".c":
            rebuild()
    if dirty(path):
        raise SystemExit(f"{m.name}: {m.file} differs from git after restoring: check it by hand")
    caught = len(results) == repeat and all(not r.startswith("rc=0 ") for r in results)
    return caught, results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="runs per mutant; caught only if every run fails")
    ap.add_argument("--timeout", type=float, default=300)
    args = ap.parse_args()
    names = {m.name for m in MUTANTS}
    if len(names) != len(MUTANTS):
        raise SystemExit("duplicate mutant names")
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:28} {m.file:28} {m.guarantee}")
        return 0
    unknown = set(args.names) - names
    if unknown:
        raise SystemExit(f"unknown mutants: {', '.join(sorted(unknown))}")
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    for m in chosen:
        if dirty(ROOT / SRC / m.file):
            raise SystemExit(f"{m.file} has uncommitted changes: commit or stash them first")
    survivors = []
    for m in chosen:
        t0 = time.monotonic()
        caught, results = check(m, args.repeat, args.timeout)
        print(f"{'CAUGHT  ' if caught else 'SURVIVED'} {m.name:28} {time.monotonic() - t0:6.1f}s  {results[-1]}",
              flush=True)
        if not caught:
            survivors.append(m.name)
    print(f"{len(chosen) - len(survivors)}/{len(chosen)} caught" + (f"; survived: {', '.join(survivors)}"
                                                                     if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
