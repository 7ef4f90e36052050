"""Where the shared file lives and how a VM gets it: default path, sizing, QEMU/libvirt arguments, the guest's
ivshmem BAR. Used by `texbridge bridge serve/join/vm-args/remove` (cli/bridge.py)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .._errors import InvalidArgument
from . import _shmlayout as L
from ._link import MAX_DIMENSION, BridgeError, StreamFormat

IVSHMEM_VENDOR, IVSHMEM_DEVICE = 0x1AF4, 0x1110  # Red Hat, Inc. Inter-VM shared memory
SYSFS_PCI = "/sys/bus/pci/devices"
MiB = 1 << 20


def default_path(namespace: str) -> str:
    """The host-side file of a namespace's bridge (tmpfs: the bytes never touch a disk)."""
    if not namespace or "/" in namespace or namespace in (".", ".."):
        raise InvalidArgument(f"namespace {namespace!r} cannot name a file")
    return f"/dev/shm/texbridge-{namespace}"


def looking_glass_size(max_w: int, max_h: int) -> int:
    """Looking Glass's documented rule (doc/install_libvirt.rst): ceil(W*4/256)*256*H*3 + 4 MiB, for one direction."""
    return -(-max_w * 4 // 256) * 256 * max_h * 3 + 4 * MiB


def size_for(max_w: int, max_h: int, *, bytes_per_pixel: int = 4, slots: int = L.DEFAULT_SLOTS,
             streams: int = 1) -> int:
    """Bytes of a file that carries `streams` streams of up to max_w x max_h each way, `slots` slots each; never
    below Looking Glass's rule per direction; rounded up to a power-of-two MiB (what an ivshmem BAR wants)."""
    if not (0 < max_w <= MAX_DIMENSION and 0 < max_h <= MAX_DIMENSION):
        raise InvalidArgument(f"largest stream {max_w}x{max_h} outside 1..{MAX_DIMENSION}")
    fmt = {4: "rgba8", 8: "rgba16", 16: "rgba32f"}.get(bytes_per_pixel)
    if fmt is None:
        raise InvalidArgument(f"bytes per pixel: 4, 8 or 16, got {bytes_per_pixel}")
    ours = L.size_needed(streams * L.stream_bytes(StreamFormat(max_w, max_h, fmt), slots))
    floor = L.size_needed(looking_glass_size(max_w, max_h))
    need = max(ours, floor)
    mib = 1
    while mib * MiB < need:
        mib *= 2
    return mib * MiB


def parse_size(text: str) -> tuple[int, int]:
    """'1920x1080' -> (1920, 1080), for --max-size."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InvalidArgument(f"a size is WIDTHxHEIGHT (e.g. 1920x1080), got {text!r}") from None
    if not (0 < w <= MAX_DIMENSION and 0 < h <= MAX_DIMENSION):
        raise InvalidArgument(f"size {w}x{h} outside 1..{MAX_DIMENSION}")
    return w, h


def vm_args(path: str, size_mb: int) -> str:
    """The QEMU arguments and the libvirt <shmem> element that put `path` in a guest as an ivshmem-plain device."""
    if size_mb <= 0 or size_mb & (size_mb - 1):
        raise InvalidArgument(f"an ivshmem size is a power of two MiB, got {size_mb}")
    p = Path(path)
    q = str(p).replace(",", ",,")  # QEMU's option syntax: a comma inside a value is doubled
    lines = [
        "# QEMU (add to the command line):",
        f"-object memory-backend-file,id=texbridge,mem-path={q},size={size_mb}M,share=on "
        "-device ivshmem-plain,memdev=texbridge",
        "",
        "# libvirt (virsh edit <domain>, inside <devices>):",
    ]
    if p.parent == Path("/dev/shm"):
        lines += [f"<shmem name='{p.name}'>", "  <model type='ivshmem-plain'/>", f"  <size unit='M'>{size_mb}</size>",
                  "</shmem>"]
    else:
        lines += [f"# libvirt's <shmem name='NAME'> maps /dev/shm/NAME only; for {p} use <qemu:commandline>:",
                  "<qemu:commandline>",
                  "  <qemu:arg value='-object'/>",
                  f"  <qemu:arg value='memory-backend-file,id=texbridge,mem-path={q},size={size_mb}M,share=on'/>",
                  "  <qemu:arg value='-device'/>", "  <qemu:arg value='ivshmem-plain,memdev=texbridge'/>",
                  "</qemu:commandline>"]
    lines += ["", "# in the guest: texbridge bridge join --shm auto"]
    return "\n".join(lines)


def remove(path: str) -> bool:
    """Delete the shared file (False: there was none). Refused while a bridge serves it (it holds the file's lock)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise BridgeError(f"cannot open {path}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BridgeError(f"a bridge is serving {path}: stop it first") from None
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise BridgeError(f"cannot remove {path}: {e.strerror}") from None
        return True
    finally:
        os.close(fd)


def find_ivshmem(sysfs: str = SYSFS_PCI) -> str:
    """The guest's ivshmem BAR2 (`--shm auto`): resource2 of the first PCI device 1af4:1110, by address."""
    found = []
    try:
        names = sorted(os.listdir(sysfs))
    except OSError as e:
        raise BridgeError(f"cannot list PCI devices in {sysfs}: {e.strerror}") from None
    for name in names:
        d = os.path.join(sysfs, name)
        try:
            with open(os.path.join(d, "vendor")) as f:
                vendor = int(f.read().strip(), 16)
            with open(os.path.join(d, "device")) as f:
                device = int(f.read().strip(), 16)
        except (OSError, ValueError):
            continue
        if (vendor, device) == (IVSHMEM_VENDOR, IVSHMEM_DEVICE) and os.path.exists(os.path.join(d, "resource2")):
            found.append(os.path.join(d, "resource2"))
    if not found:
        raise BridgeError(f"no ivshmem device (PCI {IVSHMEM_VENDOR:04x}:{IVSHMEM_DEVICE:04x}) in {sysfs}: give the "
                          "VM the device `texbridge bridge vm-args` prints, or pass --shm PATH")
    return found[0]


