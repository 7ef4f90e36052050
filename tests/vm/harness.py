"""The VM test harness: boot a throw-away Linux guest under QEMU (TCG: no hardware virtualisation needed) with an
ivshmem-plain device backed by a host file, run one shell command in it, return its exit status and console.

    python tests/vm/harness.py [--shm FILE] [--shm-mb N] [--timeout S] -- 'COMMAND'      (scripts/vm-test wraps it)

The guest sees this machine's / read-only over 9p under a tmpfs overlay, so the checkout and its .venv are there
as on the host and the command starts in the caller's directory; nothing it writes reaches the host except through
the shared file, which is PCI BAR2 of device 1af4:1110 in the guest (`texbridge.bridge._ivshmem.find_ivshmem`).

What it needs (`capabilities()` names what is missing, for a test's skip): qemu-system-x86_64, a static busybox,
and a Debian kernel image package (downloaded once with `apt-get download`, unpacked with dpkg-deb, cached with an
initramfs built here in Python in $TEXBRIDGE_VM_CACHE, default ~/.cache/texbridge-vm). `scripts/dev vm` installs
the Debian packages. Boot + a short command: ~6-10 s; guest Python runs 10-30x slower than the host's.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

QEMU = "qemu-system-x86_64"
BUSYBOX = "/bin/busybox"
WANTED_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")  # plus whatever modules.dep says they need
EXIT_MARK = "texbridge-vm: exit "


def cache_dir() -> Path:
    return Path(os.environ.get("TEXBRIDGE_VM_CACHE", Path.home() / ".cache" / "texbridge-vm"))


def capabilities() -> str:
    """'' when a VM can run here, else what is missing (for pytest.skip)."""
    missing = []
    if shutil.which(QEMU) is None:
        missing.append(f"{QEMU} (apt: qemu-system-x86)")
    if not _static_busybox():
        missing.append("a static busybox (apt: busybox-static)")
    if not (cache_dir() / "vmlinuz").exists() and (shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None):
        missing.append("a cached guest kernel or apt-get + dpkg-deb to fetch one")
    return ", ".join(missing)


def _static_busybox() -> bool:
    try:
        head = Path(BUSYBOX).read_bytes()[:4096 * 4]
    except OSError:
        return False
    return head[:4] == b"\x7fELF" and b"ld-linux" not in head  # no dynamic loader named: static


# -- kernel and initramfs -------------------------------------------------------------------------------------------
def ensure_guest() -> tuple[Path, Path]:
    """The cached (vmlinuz, initrd.gz), built on first use."""
    d = cache_dir()
    # The init script lives in the initramfs: a changed INIT must not boot a stale cached one.
    tag = hashlib.sha256(INIT.encode()).hexdigest()[:12]
    kernel, initrd = d / "vmlinuz", d / f"initrd-{tag}.gz"
    if kernel.exists() and initrd.exists():
        return kernel, initrd
    d.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pkg = _kernel_package()
        subprocess.run(["apt-get", "download", pkg], cwd=work, check=True, capture_output=True)
        deb = next(work.glob("*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "root")], check=True)
        kver = sorted(os.listdir(work / "root/lib/modules"))[-1]
        mods = _module_order(work / "root/lib/modules" / kver)
        image = _initramfs(mods)
        (d / "initrd.gz.tmp").write_bytes(image)
        shutil.copyfile(work / "root/boot" / f"vmlinuz-{kver}", d / "vmlinuz.tmp")
    os.replace(d / "initrd.gz.tmp", initrd)
    os.replace(d / "vmlinuz.tmp", kernel)
    return kernel, initrd


def _kernel_package() -> str:
    def depends() -> str:
        out = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True).stdout
        m = re.search(r"Depends: (linux-image-\d\S*-amd64)$", out, re.M)
        return m.group(1) if m else ""

    pkg = depends()
    if not pkg:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        pkg = depends()
    if not pkg:
        raise RuntimeError("apt knows no linux-image-amd64 package to take a guest kernel from")
    return pkg


def _module_order(moddir: Path) -> list[tuple[str, bytes]]:
    """(name, uncompressed .ko) of the wanted modules and their dependencies, each after what it needs. The package
    ships no modules.dep (depmod makes it at install): each module's own `depends=` modinfo field says."""
    paths = {_mod_name(p.name): p for p in moddir.rglob("*.ko*")}
    order: list[str] = []
    blobs: dict[str, bytes] = {}

    def visit(name: str) -> None:
        if name in order:
            return
        if name not in paths:
            raise RuntimeError(f"the guest kernel has no module {name} (built in?)")
        raw = paths[name].read_bytes()
        if paths[name].name.endswith(".xz"):
            raw = lzma.decompress(raw)
        elif not paths[name].name.endswith(".ko"):
            raise RuntimeError(f"{paths[name].name}: only plain or xz-compressed kernel modules are supported")
        m = re.search(rb"\0depends=([^\0]*)\0", raw)
        for dep in (m.group(1).decode().split(",") if m and m.group(1) else []):
            visit(dep.replace("-", "_"))
        blobs[name] = raw
        order.append(name)

    for want in WANTED_MODULES:
        visit(want)
    return [(n, blobs[n]) for n in order]


def _mod_name(path: str) -> str:
    base = os.path.basename(path)
    return re.sub(r"\.ko(\.xz|\.zst|\.gz)?$", "", base).replace("-", "_")


INIT = """#!/bin/sh
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
CMD=$(sed -n 's/.*tbcmd=\\([^ ]*\\).*/\\1/p' /proc/cmdline)
for m in {mods}; do insmod /mods/$m.ko || echo "texbridge-vm: insmod $m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose host /lower \\
  || echo "texbridge-vm: 9p mount failed"
mount -t tmpfs tmpfs /upper; mkdir -p /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w /root
for d in proc sys dev; do mount --bind /$d /root/$d 2>/dev/null || mount -t $d $d /root/$d; done
mount -t tmpfs tmpfs /root/run; mkdir -p /root/dev/shm; mount -t tmpfs tmpfs /root/dev/shm
chroot /root /bin/sh "$CMD"
echo "{mark}$?"
poweroff -f
"""


def _initramfs(mods: list[tuple[str, bytes]]) -> bytes:
    """A gzip'd newc cpio: busybox as /bin/*, the modules, and /init (written here: no cpio tool needed)."""
    files: list[tuple[str, int, bytes]] = []  # (path, mode, data); mode includes the type bits
    for d in ("bin", "mods", "proc", "sys", "dev", "lower", "upper", "root"):
        files.append((d, 0o040755, b""))
    files.append(("bin/busybox", 0o100755, Path(BUSYBOX).read_bytes()))
    for applet in ("sh", "mount", "insmod", "mkdir", "sed", "chroot", "poweroff", "cat", "echo"):
        files.append((f"bin/{applet}", 0o120777, b"busybox"))
    for name, raw in mods:
        files.append((f"mods/{name}.ko", 0o100644, raw))
    init = INIT.format(mods=" ".join(n for n, _ in mods), mark=EXIT_MARK)
    files.append(("init", 0o100755, init.encode()))
    buf = io.BytesIO()
    for ino, (path, mode, data) in enumerate(files + [("TRAILER!!!", 0, b"")], start=1):
        name = path.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name), 0]
        buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + name)
        buf.write(b"\0" * (-(110 + len(name)) % 4))
        buf.write(data + b"\0" * (-len(data) % 4))
    return gzip.compress(buf.getvalue(), compresslevel=1)


# -- running -------------------------------------------------------------------------------------------------------------
def qemu_command(kernel: Path, initrd: Path, cmdfile: Path, shm: str | None, mem_mb: int = 1024) -> list[str]:
    cmd = [QEMU, "-accel", "tcg", "-cpu", "max", "-m", str(mem_mb), "-smp", "1", "-nographic", "-no-reboot",
           "-nic", "none", "-kernel", str(kernel), "-initrd", str(initrd),
           "-append", f"console=ttyS0 panic=-1 quiet tbcmd={cmdfile}",
           "-virtfs", "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap"]
    if shm:
        size = os.stat(shm).st_size
        path = str(shm).replace(",", ",,")  # QEMU's option syntax
        cmd += ["-object", f"memory-backend-file,id=tbshm,mem-path={path},size={size},share=on",
                "-device", "ivshmem-plain,memdev=tbshm"]
    return cmd


class Guest:
    """A running guest: its console is collected as it comes (text()), finish() waits for the exit status."""

    def __init__(self, proc: subprocess.Popen, cmdfile: Path) -> None:
        self.proc, self.cmdfile = proc, cmdfile
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, b""):
            self._chunks.append(line)

    def text(self) -> str:
        return re.sub(rb"\x1b\[[0-9;?]*[a-zA-Z]|\x1bc|\r|\x00", b"", b"".join(self._chunks)).decode(errors="replace")

    def running(self) -> bool:
        return self.proc.poll() is None

    def finish(self, timeout: float) -> tuple[int, str]:
        """Wait for the guest; (the command's exit status, console). 124: no exit status (timeout, boot failure)."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            self.cmdfile.unlink(missing_ok=True)
        self._reader.join(5)
        text = self.text()
        m = re.findall(re.escape(EXIT_MARK) + r"(\d+)", text)
        return (int(m[-1]) if m else 124), text

    def kill(self) -> None:
        if self.running():
            self.proc.kill()
        self.finish(10)


def start(command: str, *, shm: str | None = None, cwd: str | None = None, env: dict[str, str] | None = None) -> Guest:
    """Boot the guest running `command` (in `cwd`, default ours). The shared file must exist with its final size."""
    kernel, initrd = ensure_guest()
    fd, name = tempfile.mkstemp(prefix="texbridge-vm-", suffix=".sh", dir="/var/tmp")
    lines = [f"cd {shlex.quote(cwd or os.getcwd())} || exit 97"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    lines += ["export PYTHONDONTWRITEBYTECODE=1", command]
    os.write(fd, ("\n".join(lines) + "\n").encode())
    os.close(fd)
    os.chmod(name, 0o644)
    proc = subprocess.Popen(qemu_command(kernel, initrd, Path(name), shm), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return Guest(proc, Path(name))


def run(command: str, *, shm: str | None = None, timeout: float = 300, **kw: object) -> tuple[int, str]:
    return start(command, shm=shm, **kw).finish(timeout)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shm", help="host file for the ivshmem device (created with --shm-mb if missing)")
    p.add_argument("--shm-mb", type=int, default=16)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--prepare", action="store_true", help="only fetch the kernel and build the initramfs")
    p.add_argument("command", nargs="?", default="")
    a = p.parse_args(argv)
    missing = capabilities()
    if missing:
        print(f"vm-test: missing {missing}", file=sys.stderr)
        return 2
    if a.prepare:
        t = time.monotonic()
        print(f"vm-test: guest kernel + initramfs in {ensure_guest()[0].parent} ({time.monotonic() - t:.1f} s)")
        return 0
    if a.shm and not os.path.exists(a.shm):
        with open(a.shm, "wb") as f:
            f.truncate(a.shm_mb << 20)
    rc, text = run(a.command or "true", shm=a.shm, timeout=a.timeout)
    keep = [ln for ln in text.splitlines() if ln and not re.match(r"(SeaBIOS|iPXE|Press Ctrl-B|Booting from|\[ *\d)", ln)
            and not ln.startswith(EXIT_MARK)]
    print("\n".join(keep))
    if rc == 124:
        print("vm-test: the guest did not finish (timeout or boot failure)", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
