"""The broker end to end: real processes, real sockets, real fds."""

from __future__ import annotations

import collections
import os
import resource
import signal
import socket
import tempfile
import textwrap
import time

import msgpack
import numpy as np
import pytest

import texbridge
from texbridge._sharedmem import create_sealed
from texbridge._protocol import MAX_FRAME, VERSION
from texbridge._seqpacket import recv_frame, send_frame

from conftest import assert_unguessable, fd_count, raw_socket, run_py, spawn_py, wait_until

PATTERN = "np.arange(h * w * 4, dtype=np.uint32).astype(np.uint8).reshape(h, w, 4) ^ 0x5A"


def pattern(h, w):
    return eval(PATTERN)


def test_two_processes_share_a_texture_pixel_exact(session):
    tex = session.create_texture(333, 77, "rgba8", name="shared")
    tex.numpy()[:] = pattern(77, 333)
    run_py(f"""
        import numpy as np, texbridge
        with texbridge.connect() as s, s.open("{tex.handle}") as r:
            h, w = 77, 333
            assert r.numpy().shape == (h, w, 4)
            assert np.array_equal(r.numpy(), {PATTERN}), "content differs"
            r.numpy()[10, 20] = (1, 2, 3, 4)      # write back through the shared memory
    """)
    assert tuple(tex.numpy()[10, 20]) == (1, 2, 3, 4)
    assert tex.descriptor.row_pitch % 256 == 0 and tex.numpy().strides[0] == tex.descriptor.row_pitch


def test_handles_a_real_broker_hands_out_are_unguessable(session):
    """The broker's handles, not Handle.new(): a client must not reach a resource by guessing the next handle."""
    handles = []
    for _ in range(48):
        buf = session.create_buffer(64)
        handles.append(buf.handle.value)
        buf.close()  # retired at once: a counter restarting at the lowest free value would show too
    assert_unguessable(handles)
    with texbridge.connect() as other:
        assert_unguessable([other.create_buffer(64).handle.value for _ in range(48)])


def test_buffer_is_a_flat_uint8_view(session):
    buf = session.create_buffer(1000, name="buf")
    buf.numpy()[:] = np.arange(1000) % 251
    run_py("""
        import numpy as np, texbridge
        with texbridge.connect() as s, s.open("buf") as r:
            assert r.numpy().shape == (1000,) and r.numpy().dtype == np.uint8
            assert np.array_equal(r.download(), np.arange(1000) % 251)
    """)


def test_resource_outlives_its_creator(session):
    creator = spawn_py(f"""
        import sys, numpy as np, texbridge
        s = texbridge.connect()
        t = s.create_texture(64, 48, "rgba8", name="orphan")
        h, w = 48, 64
        t.numpy()[:] = {PATTERN}
        print(t.handle, flush=True)
        sys.stdin.readline()          # exit (without closing) when told
    """, stdin=__import__("subprocess").PIPE)
    handle = creator.stdout.readline().strip()
    res = session.open(handle)
    creator.stdin.write("go\n")
    creator.stdin.flush()
    assert creator.wait(30) == 0
    assert wait_until(lambda: "orphan" not in [n for r in session.list() for n in r["names"]])
    assert np.array_equal(res.numpy(), pattern(48, 64))  # memory intact after the creator is gone
    again = session.open(handle)  # and the handle still opens
    assert np.array_equal(again.numpy(), pattern(48, 64))
    again.close()
    res.close()
    with pytest.raises(texbridge.NotFound):
        session.open(handle)


def test_sigkill_releases_references(session):
    broker = session.broker_pid
    baseline = fd_count(broker)
    child = spawn_py("""
        import time, texbridge
        s = texbridge.connect()
        keep = [s.create_texture(32, 32, "rgba8") for _ in range(5)] + [s.create_buffer(4096, keyed_mutex=False)]
        print("ready", flush=True)
        time.sleep(60)
    """)
    assert child.stdout.readline().strip() == "ready"
    assert fd_count(broker) >= baseline + 7  # 6 resources + the connection
    assert session.stats()["resources"] == 6
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert wait_until(lambda: fd_count(broker) == baseline), (fd_count(broker), baseline)
    assert session.stats()["resources"] == 0


def test_autostart_race_yields_exactly_one_broker(runtime):
    kids = [spawn_py("""
        import texbridge
        with texbridge.connect() as s:
            print(s.broker_pid, flush=True)
    """) for _ in range(20)]
    pids = set()
    for k in kids:
        out, err = k.communicate(timeout=60)
        assert k.returncode == 0, err
        pids.add(int(out))
    assert len(pids) == 1
    assert os.path.exists(f"/proc/{pids.pop()}")


def test_broker_exits_when_idle(runtime, monkeypatch):
    monkeypatch.setenv("TEXBRIDGE_BROKER_IDLE", "0.3")
    with texbridge.connect() as s:
        pid = s.broker_pid
        s.create_buffer(100).close()
    assert wait_until(lambda: not os.path.exists(f"/proc/{pid}") or _zombie(pid), timeout=10)
    with texbridge.connect() as s:  # and the next client simply starts a new one
        assert s.broker_pid != pid


def test_persistent_broker_stays(runtime):
    run_py("import texbridge._launch as l; l.start_broker(persistent=True, idle=0.1)")
    with texbridge.connect(autostart=False) as s:
        pid = s.broker_pid
    time.sleep(0.8)
    with texbridge.connect(autostart=False) as s:
        assert s.broker_pid == pid


def test_no_broker_without_autostart(runtime):
    with pytest.raises(texbridge.BrokerUnavailable):
        texbridge.connect(autostart=False)


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def _as_user(uid: int, fn, gid: int | None = None) -> str:
    """Run fn() in a forked child with dropped privileges (gid defaults to uid); returns what it reported."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid if gid is None else gid)
            os.setuid(uid)
            out = fn()
        except BaseException as e:  # report anything, never return into pytest
            out = f"{type(e).__name__}: {e}"
        os.write(w, out.encode()[:4000])
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return text


def _try_connect() -> str:
    with texbridge.connect(autostart=False) as s:
        return f"connected {s.session_id}"


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to drop to another uid")
def test_other_uid_is_refused(monkeypatch):
    base = tempfile.mkdtemp(prefix="tb-uid-")
    os.chmod(base, 0o711)
    run = os.path.join(base, "run")
    monkeypatch.setenv("TEXBRIDGE_RUNTIME_DIR", run)
    monkeypatch.setenv("TEXBRIDGE_NAMESPACE", "uidtest")
    try:
        # Default: directory 0700 and socket 0600 keep other users out entirely.
        run_py("import texbridge._launch as l; l.start_broker()")
        assert _as_user(65534, _try_connect).startswith("AccessDenied")
        with texbridge.connect(autostart=False) as s:
            s._channel.request(texbridge._protocol.Op.SHUTDOWN, {})
        time.sleep(0.3)
        # With an allow-list the socket is reachable, and SO_PEERCRED decides.
        run_py("import texbridge._launch as l; l.start_broker(extra_args=['--allow-uid', '12345'])")
        denied = _as_user(65534, _try_connect)
        assert denied.startswith("AccessDenied") and "uid 65534" in denied, denied
        assert _as_user(12345, _try_connect).startswith("connected")
        with texbridge.connect(autostart=False) as s:
            s._channel.request(texbridge._protocol.Op.SHUTDOWN, {})
    finally:
        import shutil
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to become a user whose gid differs from its uid")
def test_admission_goes_by_uid_never_gid(monkeypatch):
    """SO_PEERCRED gives pid, uid and gid: a client with an allowed uid and another gid is admitted; a client whose
    gid (not uid) is the allowed number is refused. Both ways, so swapping the two fields cannot pass."""
    base = tempfile.mkdtemp(prefix="tb-gid-")
    os.chmod(base, 0o711)
    monkeypatch.setenv("TEXBRIDGE_RUNTIME_DIR", os.path.join(base, "run"))
    monkeypatch.setenv("TEXBRIDGE_NAMESPACE", "gidtest")
    try:
        run_py("import texbridge._launch as l; l.start_broker(extra_args=['--allow-uid', '23456'])")
        assert _as_user(23456, _try_connect, gid=34567).startswith("connected")
        denied = _as_user(34567, _try_connect, gid=23456)
        assert denied.startswith("AccessDenied") and "uid 34567" in denied, denied
        with texbridge.connect(autostart=False) as s:
            s._channel.request(texbridge._protocol.Op.SHUTDOWN, {})
    finally:
        import shutil
        shutil.rmtree(base, ignore_errors=True)


_IN_USER_NAMESPACE = """
    import ctypes, os, socket, sys
    outer_uid, outer_gid = os.getuid(), os.getgid()
    if ctypes.CDLL(None, use_errno=True).unshare(0x10000000) != 0:  # CLONE_NEWUSER, while single-threaded
        print("SKIP unshare(CLONE_NEWUSER): " + os.strerror(ctypes.get_errno()))
        sys.exit(0)
    try:  # refused where user namespaces are restricted (AppArmor's restrict_unprivileged_userns)
        for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"1000 {outer_uid} 1"),
                           ("/proc/self/gid_map", f"2000 {outer_gid} 1")):
            with open(path, "w") as f:
                f.write(text)
    except OSError as e:
        print(f"SKIP mapping ids in a user namespace: {e}")
        sys.exit(0)
    assert (os.getuid(), os.getgid()) == (1000, 2000)
    from texbridge._broker import server
    from texbridge._broker.registry import Policy, Registry
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    assert server.peer_credentials(a) == (os.getpid(), 1000, 2000), server.peer_credentials(a)
    for broker_uid in (1000, 2000):
        srv = server.BrokerServer(socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET),
                                  Registry(policy=Policy(broker_uid=broker_uid)), idle_timeout=None,
                                  max_connections=8)
        peer = srv._admit(a)
        print(broker_uid, peer.uid, dict(srv._per_uid), type(peer.refusal).__name__, flush=True)
"""


def test_peer_credentials_are_read_in_ucred_order_without_root():
    """In a user namespace the test's process is uid 1000 and gid 2000 (no root needed): SO_PEERCRED must read as
    exactly that, and the server must admit it under a broker of uid 1000 and refuse it under one of uid 2000."""
    out = run_py(_IN_USER_NAMESPACE).stdout
    if out.startswith("SKIP"):
        pytest.skip(f"needs unprivileged user namespaces ({out[5:].strip()})")
    assert out.splitlines() == ["1000 1000 {1000: 1} NoneType", "2000 1000 {1000: 1} AccessDenied"], out


# -- bad input ------------------------------------------------------------------------------------------------------

def frame(op, fields=None, nfds=0, rid=1):
    return msgpack.packb([VERSION, rid, op, fields or {}, nfds], use_bin_type=True)


def ask(sock, data, fds=()):
    send_frame(sock, data, fds)
    reply, rfds, _ = recv_frame(sock)
    for fd in rfds:
        os.close(fd)
    return msgpack.unpackb(reply)


def hello(sock):
    r = ask(sock, frame("hello", {"version": VERSION, "name": "raw", "pid": os.getpid()}))
    assert r[2] == "reply", r
    return r


def tex_desc(**kw):
    d = {"kind": "texture2d", "size": 256 * 16, "width": 16, "height": 16, "format": "rgba8", "planes": [[0, 256]]}
    d.update(kw)
    return d


@pytest.fixture
def raw(session):
    sock = raw_socket()
    hello(sock)
    baseline = fd_count(session.broker_pid)
    yield sock
    assert session.stats()["clients"] >= 1  # the broker still serves
    sock.close()
    assert wait_until(lambda: fd_count(session.broker_pid) == baseline - 1), "broker leaked fds"


def error_code(reply):
    assert reply[2] == "error", reply
    return reply[3]["code"]


def test_garbage_truncated_and_oversized_frames(raw):
    assert error_code(ask(raw, b"\xc1\xc1\xc1")) == "protocol"
    assert error_code(ask(raw, frame("list")[:-3])) == "protocol"  # truncated msgpack
    assert error_code(ask(raw, b"\x92" + b"\x00" * (MAX_FRAME + 100))) == "protocol"  # oversized
    assert error_code(ask(raw, frame("nonsense"))) == "protocol"
    assert error_code(ask(raw, msgpack.packb([VERSION + 1, 1, "list", {}, 0]))) == "protocol"
    assert ask(raw, frame("stats"))[2] == "reply"


def test_wrong_fd_counts_close_every_fd(raw):
    a, b = create_sealed("a", 4096), create_sealed("b", 4096)
    try:
        assert error_code(ask(raw, frame("register", {"descriptor": tex_desc()}, nfds=1), [a, b])) == "protocol"
        assert error_code(ask(raw, frame("list", {}, nfds=0), [a])) == "protocol"
        assert error_code(ask(raw, frame("register", {"descriptor": tex_desc()}, nfds=2), [a, b])) \
            == "invalid_descriptor"
        many = [os.dup(a) for _ in range(40)]
        ask(raw, frame("list", nfds=40), many)  # far more than a frame may carry: cut by the kernel, all closed
        for fd in many:
            os.close(fd)
    finally:
        os.close(a), os.close(b)


@pytest.mark.parametrize("make", ["socket", "directory", "pipe", "unsealed", "small", "regular"])
def test_fd_of_the_wrong_type_is_refused(raw, make, tmp_path):
    if make == "socket":
        s1, s2 = socket.socketpair()
        fds, extra = [s1.fileno()], [s1, s2]
    elif make == "directory":
        fds, extra = [os.open(tmp_path, os.O_RDONLY)], []
    elif make == "pipe":
        r, w = os.pipe()
        fds, extra = [r], [w]
    elif make == "unsealed":
        fd = os.memfd_create("x", os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, 4096)
        fds, extra = [fd], []
    elif make == "small":
        fds, extra = [create_sealed("x", 100)], []
    else:
        p = tmp_path / "f"
        p.write_bytes(b"\0" * 4096)
        fds, extra = [os.open(p, os.O_RDWR)], []
    assert error_code(ask(raw, frame("register", {"descriptor": tex_desc()}, nfds=1), fds)) == "invalid_descriptor"
    for x in extra:
        x.close() if hasattr(x, "close") else os.close(x)
    if make not in ("socket",):
        os.close(fds[0])


@pytest.mark.parametrize("desc", [tex_desc(width=0), tex_desc(height=-5), tex_desc(format="rgb9"),
                                  tex_desc(size=(1 << 64) - 1), tex_desc(planes=[[1 << 62, 1 << 62]]),
                                  tex_desc(width=1 << 40), {"kind": "buffer"}, "nope", tex_desc(extra=1)])
def test_bad_descriptors_are_refused(raw, desc):
    fd = create_sealed("x", 4096)
    try:
        code = error_code(ask(raw, frame("register", {"descriptor": desc}, nfds=1), [fd]))
        # a descriptor that is not even a map fails the wire schema; the rest fail validation
        assert code == ("protocol" if desc == "nope" else "invalid_descriptor")
    finally:
        os.close(fd)


def test_names_and_lifecycle_errors(session):
    t = session.create_texture(8, 8, name="taken")
    with pytest.raises(texbridge.NameInUse):
        session.create_buffer(10, name="taken")
    h = t.handle
    t.close()
    t.close()  # double close is a no-op locally
    with pytest.raises(texbridge.NotFound):
        session.open(h)  # open after close
    with pytest.raises(texbridge.NotFound):
        session._close_handle(h.value) or session._channel.request(texbridge._protocol.Op.CLOSE, {"handle": h.value})
    with pytest.raises(texbridge.InvalidDescriptor):
        session.create_texture(0, 8)
    with pytest.raises(texbridge.InvalidDescriptor):
        session.create_texture(8, 8, "nope")
    with pytest.raises(texbridge.ClosedError):
        t.numpy()


def test_thousands_of_clients_at_once(session):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    broker = session.broker_pid
    baseline = fd_count(broker)
    n = min(2000, hard - fd_count() - 100)
    socks = []
    try:
        for _ in range(n):
            socks.append(raw_socket())
        for s in socks:
            send_frame(s, frame("hello", {"version": VERSION, "name": "many", "pid": os.getpid()}))
        assert all(msgpack.unpackb(recv_frame(s)[0])[2] == "reply" for s in socks)
        assert session.stats()["clients"] == n + 1
    finally:
        for s in socks:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert wait_until(lambda: fd_count(broker) == baseline, timeout=20)


def test_handles_of_another_namespace_are_not_found(session, monkeypatch):
    t = session.create_texture(8, 8)
    with texbridge.connect(session.namespace + "-other") as other:
        with pytest.raises(texbridge.NotFound):
            other.open(t.handle)
        other._channel.request(texbridge._protocol.Op.SHUTDOWN, {})


def test_watch_sees_publish_and_retire(session):
    with session.watch() as events:
        t = session.create_texture(8, 8, name="watched")
        kinds = []
        while "published" not in kinds:
            kinds.append(events.next(timeout=5).kind)
        t.close()
        seen = []
        while "retired" not in seen:
            ev = events.next(timeout=5)
            assert ev is not None
            seen.append(ev.kind)
        assert seen == ["released", "unpublished", "retired"]


def test_fds_past_the_brokers_own_capacity_go_to_keepers(runtime, monkeypatch):
    """With room for only 20 fds of its own, the broker spills the rest to keeper processes, transparently."""
    monkeypatch.setenv("TEXBRIDGE_BROKER_LOCAL_FDS", "20")
    with texbridge.connect() as s:
        texs = []
        for i in range(120):
            t = s.create_texture(16, 8, "rgba8", name=f"spill-{i}", keyed_mutex=(i % 10 == 0))
            t.numpy()[:] = i
            texs.append(t)
        keepers = _children(s.broker_pid)
        assert keepers, "no keeper process was started"
        run_py("""
            import numpy as np, texbridge
            with texbridge.connect() as s:
                for i in range(120):
                    with s.open(f"spill-{i}") as r:
                        assert (r.numpy() == i).all(), i
                        if r.descriptor.keyed_mutex:
                            r.mutex.acquire(0, timeout=5)
                            r.mutex.release(1)
        """)
        held = sum(fd_count(k) for k in keepers)
        for t in texs:
            t.close()
        assert wait_until(lambda: sum(fd_count(k) for k in keepers) < held - 90), "keepers kept dropped fds"
        assert s.stats()["resources"] == 0
        broker = s.broker_pid
        s.shutdown()
    assert wait_until(lambda: all(_zombie(k) for k in keepers + [broker]), timeout=10), "keepers outlived the broker"


def test_a_killed_fd_keeper_is_replaced_and_what_it_held_retired(runtime, monkeypatch):
    """kill -9 of a keeper: its resources answer NotFound (no reference counted), watchers see them retired,
    registrations go on in a fresh keeper, and resources the broker keeps itself are untouched."""
    monkeypatch.setenv("TEXBRIDGE_BROKER_LOCAL_FDS", "10")
    with texbridge.connect() as s, s.watch() as events:
        local = [s.create_texture(16, 8, "rgba8", name=f"local-{i}") for i in range(10)]

        def retired_events(n):
            seen, deadline = set(), time.monotonic() + 10
            while len(seen) < n and time.monotonic() < deadline:
                ev = events.next(timeout=1)
                if ev is not None and ev.kind == "retired":
                    seen.add(ev.handle)
            return seen

        for rnd in range(2):
            kept = [s.create_texture(16, 8, "rgba8", name=f"kept-{rnd}-{i}") for i in range(20)]
            (keeper,) = _children(s.broker_pid)
            os.kill(keeper, signal.SIGKILL)
            if rnd == 1:  # asked at once: the failed fetch itself finds the keeper dead
                with pytest.raises(texbridge.NotFound):
                    s.open(kept[5].handle)
            # else the broker's periodic check finds it
            assert retired_events(20) == {t.handle for t in kept}
            assert wait_until(lambda: keeper not in _children(s.broker_pid))  # reaped, not left a zombie
            for i, t in enumerate(kept):
                with pytest.raises(texbridge.NotFound):
                    s.open(t.handle)
                with pytest.raises(texbridge.NotFound):
                    s.open(f"kept-{rnd}-{i}")
            assert s.stats()["resources"] == 10
        more = [s.create_texture(16, 8, "rgba8", name=f"more-{i}") for i in range(20)]  # a fresh keeper takes them
        assert len(_children(s.broker_pid)) == 1
        run_py("""
            import texbridge
            with texbridge.connect() as s:
                for prefix in ("local", "more"):
                    for i in range(10):
                        s.open(f"{prefix}-{i}").close()
        """)
        assert s.stats()["resources"] == 30
        for t in local + more:
            t.close()
        assert wait_until(lambda: s.stats()["resources"] == 0)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


# -- hardening: nothing a client sends kills or stalls the broker ---------------------------------------------------

def test_huge_echo_before_hello_is_answered_and_the_broker_lives(session):
    """Each of these once made an error reply larger than a frame, and encode() took the daemon down."""
    for envelope in (["v" * 60_000, 1, "hello", {}, 0], [VERSION, 1, "o" * 60_000, {}, 0],
                     [VERSION, "r" * 60_000, "hello", {}, 0], [VERSION, 1, "hello", {}, "n" * 60_000]):
        sock = raw_socket()
        reply = ask(sock, msgpack.packb(envelope))
        assert error_code(reply) == "protocol" and len(reply[3]["message"]) < 200
        sock.close()
    assert session.stats()["clients"] == 1


def test_strict_envelope_and_nesting_over_a_real_socket(raw):
    assert error_code(ask(raw, msgpack.packb([True, 1, "stats", {}, 0]))) == "protocol"
    assert error_code(ask(raw, msgpack.packb([VERSION, 1, "stats", {}, 0.0]))) == "protocol"
    deep: dict = {}
    node = deep
    for _ in range(600):
        node["d"] = {}
        node = node["d"]
    fd = create_sealed("x", 4096)
    try:
        reply = ask(raw, frame("register", {"descriptor": tex_desc(driver_private=deep)}, nfds=1), [fd])
        assert error_code(reply) == "protocol" and "nests deeper" in reply[3]["message"]
    finally:
        os.close(fd)


def test_meta_is_bounded_and_list_pages_by_bytes(session):
    """200 buffers with 300-byte meta once made list() fail (a 200-entry page over 64 KiB)."""
    bufs = [session.create_buffer(64) for _ in range(200)]
    for i, b in enumerate(bufs):
        session.update(b.handle, {"note": f"{i:03d}" + "m" * 300})
    listed = session.list()
    assert sorted(r["meta"]["note"][:3] for r in listed) == [f"{i:03d}" for i in range(200)]
    with pytest.raises(texbridge.QuotaExceeded):
        session.update(bufs[0].handle, {"big": "x" * 10_000})
    assert session.info(bufs[0].handle)["meta"]["note"].startswith("000")
    for b in bufs:
        b.close()


def _wrong_fd(kind, tmp_path):
    """(fd to send, things to close afterwards) for an fd that is not GPU memory."""
    if kind == "eventfd":
        fd = os.eventfd(0)
    elif kind == "epoll":
        import select
        ep = select.epoll()
        return ep.fileno(), [ep]
    elif kind == "pidfd":
        fd = os.pidfd_open(os.getpid())
    elif kind == "devnull":
        fd = os.open(os.devnull, os.O_RDWR)
    elif kind == "timerfd":
        import ctypes
        fd = ctypes.CDLL(None).timerfd_create(1, 0)
        assert fd >= 0
    return fd, [fd]


@pytest.mark.parametrize("memory", ["opaque_fd", "dma_buf"])
@pytest.mark.parametrize("kind", ["eventfd", "epoll", "pidfd", "devnull", "timerfd"])
def test_fds_that_are_never_gpu_memory_are_refused(raw, kind, memory, tmp_path):
    fd, extra = _wrong_fd(kind, tmp_path)
    try:
        reply = ask(raw, frame("register", {"descriptor": tex_desc(memory=memory, backend="vulkan")}, nfds=1), [fd])
        assert error_code(reply) == "invalid_descriptor", reply
    finally:
        for x in extra:
            x.close() if hasattr(x, "close") else os.close(x)


def test_scribbled_keyed_mutex_state_does_not_stall_the_broker(session):
    """A client registers keyed-mutex states whose meta lock word it set (and claims ownership), then hangs up: the
    broker's abandon path once took that lock first, 2 s per mutex, serving nobody meanwhile."""
    import mmap
    import struct
    from texbridge.keyed_mutex import create_state
    sock = raw_socket()
    sid = hello(sock)[3]["session_id"]
    for _ in range(6):
        fd = create_state()
        m = mmap.mmap(fd, 4096)
        struct.pack_into("<I", m, 8, os.getpid())  # meta lock "held" by a live thread (this test process)
        struct.pack_into("<I", m, 16, 1)  # locked...
        struct.pack_into("<i", m, 32, os.getpid())  # ...by a live pid...
        struct.pack_into("<I", m, 36, sid)  # ...of the disconnecting session
        m.close()
        desc = {"kind": "keyed_mutex", "size": 4096, "keyed_mutex": True}
        assert ask(sock, frame("register", {"descriptor": desc}, nfds=1), [fd])[2] == "reply"
        os.close(fd)
    sock.close()
    t0 = time.monotonic()
    session.stats()
    assert wait_until(lambda: session.stats()["resources"] == 0, timeout=5)
    assert time.monotonic() - t0 < 5, "the broker stalled on client-writable memory"


def test_connections_per_uid_are_limited(runtime, monkeypatch):
    monkeypatch.setenv("TEXBRIDGE_BROKER_MAX_CONNECTIONS", "4")
    sessions = [texbridge.connect() for _ in range(4)]
    try:
        with pytest.raises(texbridge.QuotaExceeded, match="connections"):
            texbridge.connect(autostart=False)
        sessions.pop().close()
        with texbridge.connect(autostart=False) as s:  # room again once one goes
            assert s.stats()["clients"] == 4
    finally:
        for s in sessions:
            s.close()


def _holds_memfd(pid: int, name: str) -> bool:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == f"/memfd:{name} (deleted)":
                return True
        except OSError:
            pass
    return False


def test_a_refused_client_s_fds_are_closed(runtime, monkeypatch):
    """A connection over its uid's limit is answered with the refusal and hung up on; the fds its first frame
    carried must not stay in the broker."""
    monkeypatch.setenv("TEXBRIDGE_BROKER_MAX_CONNECTIONS", "1")
    with texbridge.connect() as s:
        name = f"refused-probe-{os.getpid()}"
        fds = [create_sealed(name, 4096) for _ in range(2)]
        try:
            sock = raw_socket()
            send_frame(sock, frame("hello", {"version": VERSION, "name": "x", "pid": os.getpid()}, nfds=2), fds)
            reply = msgpack.unpackb(recv_frame(sock)[0])
            assert reply[2] == "error" and reply[3]["code"] == "quota_exceeded", reply
            assert recv_frame(sock)[0] == b""  # hung up on
            sock.close()
        finally:
            for fd in fds:
                os.close(fd)
        s.stats()  # a round trip: the broker has finished with the refused connection
        assert not _holds_memfd(s.broker_pid, name), "the broker kept a refused client's fds"


def test_a_client_that_never_reads_its_replies_is_disconnected(session):
    """Replies the broker cannot send are queued, up to 1024 frames: past that the client is cut off, so a client
    that sends without reading cannot make the broker's memory grow without bound. Others are served meanwhile."""
    sock = raw_socket()
    hello(sock)
    sock.setblocking(False)
    request = frame("stats", rid=2)
    sent, cut = 0, False
    deadline = time.monotonic() + 60
    while not cut and sent < 50_000 and time.monotonic() < deadline:
        try:
            send_frame(sock, request)
            sent += 1
        except BlockingIOError:
            time.sleep(0.001)  # the broker reads on; its replies are what piles up
        except (BrokenPipeError, ConnectionResetError):
            cut = True
    if not cut:  # the last requests may have gone in before the hang-up: the stream ends after the queued replies
        sock.settimeout(10)
        try:
            while recv_frame(sock)[0]:
                pass
            cut = True
        except ConnectionResetError:
            cut = True
        except (TimeoutError, BlockingIOError):
            pass  # replies still coming after 50,000 requests, or none and no hang-up: not cut
    sock.close()
    assert cut, f"{sent} unread replies later the broker still queues for this client"
    assert session.stats()["clients"] >= 1


def test_out_of_fds_answers_busy_backs_off_and_recovers(tmp_path):
    """A broker at its fd limit once spun at 100% CPU writing megabytes of log while new clients hung. Now: a new
    client gets BrokerBusy, the loop idles, the log stays short, and service resumes once fds are free."""
    broker, connect, log_path = _spawn_broker(tmp_path, """
        n = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (n + 40, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    """)
    try:

        held = []
        for _ in range(60):  # more connections than the broker has fds for
            s = connect()
            held.append(s)
            send_frame(s, frame("hello", {"version": VERSION, "name": "fill", "pid": os.getpid()}))
        codes = []
        for s in held:
            try:
                reply = msgpack.unpackb(recv_frame(s)[0])
                codes.append(reply[2] if reply[2] == "reply" else reply[3]["code"])
            except OSError:
                codes.append("closed")
        print("codes:", collections.Counter(codes))
        assert "reply" in codes and "busy" in codes, codes
        cpu0 = _cpu_seconds(broker.pid)
        time.sleep(2)
        assert _cpu_seconds(broker.pid) - cpu0 < 1.0, "the broker spins while out of fds"
        for s in held:
            s.close()
        s = connect()  # fds are free again: a new client is served
        assert ask(s, frame("hello", {"version": VERSION, "name": "after", "pid": os.getpid()}))[2] == "reply"
        s.close()
        assert log_path.stat().st_size < 20_000, log_path.read_text()[-2000:]
    finally:
        broker.kill()
        broker.wait()


def test_fds_dropped_by_a_broker_out_of_fds_are_answered_busy(tmp_path):
    """At its fd limit the broker cannot receive fds: the kernel drops them and flags the frame (MSG_CTRUNC). The
    client must learn that the broker is out of fds (busy, retry later), not that it sent a malformed frame."""
    broker, connect, _ = _spawn_broker(tmp_path, """
        n = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (n + 24, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    """)
    held = []
    try:
        admitted = []
        for _ in range(40):
            s = connect()
            held.append(s)
            send_frame(s, frame("hello", {"version": VERSION, "name": "fill", "pid": os.getpid()}))
            try:
                reply = msgpack.unpackb(recv_frame(s)[0])
            except OSError:
                break
            if reply[2] != "reply":
                break  # busy: the broker's fd table is full now
            admitted.append(s)
        assert admitted and len(admitted) < 40, "the broker never ran out of fds"
        fd = create_sealed("dropped", 4096)
        try:
            reply = ask(admitted[0], frame("register", {"descriptor": tex_desc(size=4096)}, nfds=1), [fd])
        finally:
            os.close(fd)
        assert error_code(reply) == "busy", reply
    finally:
        for s in held:
            s.close()
        broker.kill()
        broker.wait()


def _cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _spawn_broker(tmp_path, setup=""):
    """A BrokerServer in a child process, served on a private socket after running `setup` (limits, injected
    faults). Returns (process, connect(), log path)."""
    sock_path, log_path = tmp_path / "b.sock", tmp_path / "b.log"
    broker = spawn_py(f"""
        import logging, os, resource, socket, sys
        from texbridge._broker.registry import Registry
        from texbridge._broker import server
        logging.basicConfig(filename={str(log_path)!r}, level=logging.INFO)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind({str(sock_path)!r})
        listener.listen(4096)
""" + textwrap.indent(textwrap.dedent(setup), " " * 8) + """
        print("ready", flush=True)
        server.BrokerServer(listener, Registry(broker_pid=os.getpid()), idle_timeout=None,
                            max_connections=1000).serve()
    """)
    assert broker.stdout.readline().strip() == "ready", broker.stderr.read()

    def connect():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.settimeout(10)
        s.connect(str(sock_path))
        return s
    return broker, connect, log_path


def test_a_broker_bug_costs_one_session_never_the_broker(tmp_path):
    """Faults injected outside the registry's own guard: fd inspection raises, a reply cannot be encoded. The
    first costs that client its session (its fds closed), the second one request; the broker serves on."""
    broker, connect, log_path = _spawn_broker(tmp_path, """
        def boom(fd):
            raise RuntimeError("injected fault")
        server.inspect_fd = boom
        real = Registry._op_stats
        def unencodable(self, client, msg, fds, fx):
            fx.reply(client.id, msg.request_id, blob=b"x" * 70_000)
            return False
        Registry._op_stats = unencodable
    """)
    try:
        s = connect()
        hello(s)
        baseline = fd_count(broker.pid)
        for rid in range(7, 300):
            reply = ask(s, frame("stats", rid=rid))
            assert error_code(reply) == "error" and reply[1] == rid and "encoded" in reply[3]["message"]
        fd = create_sealed("x", 4096)
        send_frame(s, frame("register", {"descriptor": tex_desc()}, nfds=1), [fd])
        os.close(fd)
        assert recv_frame(s)[0] == b""  # hung up on: this session is gone
        s.close()
        assert wait_until(lambda: fd_count(broker.pid) == baseline - 1), "the failed frame's fd leaked"
        s = connect()
        assert hello(s)[2] == "reply"  # and the broker serves the next client
        s.close()
        assert broker.poll() is None
        log_text = log_path.read_text()
        assert "injected fault" in log_text
        assert 1 <= log_text.count("cannot send reply") <= 10, "a client can flood the log"
    finally:
        broker.kill()
        broker.wait()


def test_names_and_meta_stay_within_what_replies_and_events_can_carry(session):
    """Hundreds of names once made OPEN's reply, and a large UPDATE the watchers' events, exceed a frame."""
    from texbridge._broker.registry import MAX_META, MAX_NAMES
    t = session.create_texture(8, 8, name="n-0")
    for i in range(1, MAX_NAMES):
        session.publish(t.handle, f"n-{i}" + "\U0001F600" * 100)
    with pytest.raises(texbridge.QuotaExceeded, match="names"):
        session.publish(t.handle, "one-too-many")
    with session.watch() as events:
        session.update(t.handle, {"m": "x" * (MAX_META - 16)})  # the largest meta allowed reaches the watcher
        seen = []
        while "updated" not in seen:
            ev = events.next(timeout=5)
            assert ev is not None
            seen.append(ev.kind)
        with pytest.raises(texbridge.QuotaExceeded):
            session.update(t.handle, {"m": "x" * MAX_META})
    with session.open("n-0") as r:  # OPEN carries every name and the meta
        assert r.descriptor.width == 8
    assert len(session.info(t.handle)["names"]) == MAX_NAMES
    t.close()
