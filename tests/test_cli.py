"""The `texbridge` command, run as users run it: in subprocesses, against real brokers in a private runtime dir.

The `runtime` fixture (conftest) gives each test its own TEXBRIDGE_RUNTIME_DIR and namespace; every broker a test
starts is stopped with `texbridge broker stop` at teardown (and SIGTERM as a last resort by the fixture).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import texbridge
import texbridge.benchmarks._report
from texbridge import benchmarks
from texbridge._errors import BackendError
from texbridge.backends import BACKENDS, get_backend

from conftest import wait_until


def cli(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "texbridge.cli", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


def broker_running(namespace: str | None = None) -> bool:
    return cli("broker", "status", *(["--namespace", namespace] if namespace else [])).returncode == 0


def alive(pid: int) -> bool:
    """Running and not a zombie (a detached broker is reaped by init, perhaps not at once)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


@pytest.fixture
def cli_env(runtime):
    """A private runtime dir + namespace; any broker left in it is stopped through the CLI at the end."""
    yield runtime
    cli("broker", "stop")


def backend_available(name: str) -> tuple[bool, str]:
    try:
        report = get_backend(name).diagnostics()
    except BackendError as e:
        return False, str(e)
    return bool(report.get("available")), str(report.get("detail", ""))


# -- demo ------------------------------------------------------------------------------------------------------------
def test_demo_verifies_every_frame(cli_env):
    proc = cli("demo", "--frames", "60", "--size", "320x240")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "60/60 frames verified pixel-exact" in proc.stdout
    fps = re.search(r"frames/s\s+([\d,]+)", proc.stdout)
    handoffs = re.search(r"handoffs/s\s+([\d,]+)", proc.stdout)
    assert fps and int(fps.group(1).replace(",", "")) > 0
    assert handoffs and int(handoffs.group(1).replace(",", "")) > 0
    assert re.search(r"tb:[0-9a-f]{16}", proc.stdout)


def test_demo_fails_when_a_frame_is_wrong(cli_env):
    """The verifier is real: one flipped bit in one frame makes the demo fail and name that frame."""
    proc = cli("demo", "--frames", "30", "--size", "64x48", "--corrupt-frame", "7")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "29/30 frames verified, 1 failed" in proc.stdout
    assert "frame 7: 1 pixels differ" in proc.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["vulkan", "gl"])
def test_demo_through_a_gpu_backend(cli_env, backend):
    ok, why = backend_available(backend)
    if not ok:
        pytest.skip(f"{backend} backend unavailable: {why}")
    proc = cli("demo", "--frames", "20", "--size", "128x64", "--backend", backend)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "20/20 frames verified pixel-exact" in proc.stdout
    assert f"in {backend} memory" in proc.stdout


def test_demo_with_an_unavailable_backend_says_why(cli_env):
    """One line naming the backend and the reason, exit status 1, no traceback, no processes started."""
    lacking = [(b, why) for b in ("cuda", "vulkan", "gl") for ok, why in [backend_available(b)] if not ok]
    if not lacking:
        pytest.skip("cuda, vulkan and gl are all available on this machine: no backend to be missing")
    backend, why = lacking[0]
    proc = cli("demo", "--frames", "5", "--backend", backend)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert backend in proc.stderr and why.split(":")[0] in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "producer pid" not in proc.stdout


@pytest.mark.parametrize("to", ["parent", "group"])
def test_ctrl_c_ends_a_long_demo_at_once_with_the_partial_summary(cli_env, to):
    """SIGINT to the parent alone (`kill -INT`) or to the whole process group (a terminal's Ctrl-C; the children
    ignore it, the parent stops them): both children stop, the summary covers the frames checked so far, exit
    status 130."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "texbridge.cli", "demo", "--frames", "10000000", "--size",
                             "64x48"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        lines = []
        while not any("frames checked" in line for line in lines):  # progress lines: a long demo shows them
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            lines.append(line)
        pids = [int(m) for m in re.findall(r"(?:producer|consumer) pid (\d+)", "".join(lines))]
        t = time.monotonic()
        if to == "parent":
            proc.send_signal(signal.SIGINT)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - t
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out + err
    assert took < 3.0, took  # about 0.5 s; generous for a loaded machine
    done = int(re.search(r"interrupted after (\d+) of 10000000 frames", err).group(1))
    assert 0 < done < 10_000_000
    assert re.search(rf"{done}/10000000 frames verified, 0 failed", out), out
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert len(pids) == 2 and not any(alive(p) for p in pids)


def test_demo_rejects_a_bad_size(cli_env):
    proc = cli("demo", "--size", "12by7")
    assert proc.returncode == 2
    assert "WIDTHxHEIGHT" in proc.stderr


# -- ls / info -------------------------------------------------------------------------------------------------------
def test_ls_shows_a_published_resource(cli_env):
    with texbridge.connect() as s:
        tex = s.create_texture(320, 240, "rgba8", name="camera")
        buf = s.create_buffer(5000)
        proc = cli("ls")
        assert proc.returncode == 0, proc.stderr
        lines = {line.split("│")[1].strip(): line for line in proc.stdout.splitlines() if "tb:" in line}
        row = lines[str(tex.handle)]
        for text in ("camera", "texture2d", "320x240", "rgba8", "memfd", str(os.getpid())):
            assert text in row
        assert re.search(r"│\s+1\s+│\s*$", row), row  # open count
        assert "buffer" in lines[str(buf.handle)] and "4.9 KiB" in lines[str(buf.handle)]
        assert "2 resource(s)" in proc.stdout


def test_ls_without_a_broker_starts_none(cli_env):
    proc = cli("ls")
    assert proc.returncode == 0
    assert "no broker is running" in proc.stdout
    assert not broker_running()


def test_ls_watch_follows_events(cli_env):
    with texbridge.connect() as s:
        watcher = subprocess.Popen([sys.executable, "-m", "texbridge.cli", "ls", "--watch"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        try:
            seen = []
            for line in watcher.stdout:
                seen.append(line)
                if "watching" in line:
                    break
            tex = s.create_texture(16, 16, "rgba8", name="live-one")
            handle = str(tex.handle)
            tex.close()
            events = []
            for line in watcher.stdout:
                events.append(line)
                if "retired" in line:
                    break
            text = "".join(events)
            assert re.search(rf"published\s+{handle} 'live-one'.*texture2d 16x16 rgba8", text), text
            assert re.search(rf"retired\s+{handle}", text), text
        finally:
            watcher.terminate()
            watcher.wait(timeout=10)
            watcher.stdout.close()
            watcher.stderr.close()


def test_info_by_name_and_by_handle(cli_env):
    with texbridge.connect() as s:
        tex = s.create_texture(320, 240, "bgra8", name="info-me", keyed_mutex=True)
        for target in ("info-me", str(tex.handle)):
            proc = cli("info", target)
            assert proc.returncode == 0, proc.stderr
            out = proc.stdout
            assert str(tex.handle) in out and "info-me" in out
            assert "320x240" in out and "bgra8" in out and "DXGI_FORMAT 87" in out
            assert f"row pitch {tex.descriptor.row_pitch} B" in out
            assert re.search(r"keyed mutex\s+│\s+yes", out)
            assert "D3D11_TEXTURE2D_DESC Width=320, Height=240" in out
            assert re.search(rf"creator pid\s+│\s+{os.getpid()}", out)


def test_info_errors_are_one_clear_line(cli_env):
    with texbridge.connect():
        proc = cli("info", "no-such-name")
        assert proc.returncode == 1
        assert "no-such-name" in proc.stderr and "NotFound" in proc.stderr and "Traceback" not in proc.stderr
        proc = cli("info", "tb:0123456789abcdef")
        assert proc.returncode == 1 and "NotFound" in proc.stderr


# -- broker -------------------------------------------------------------------------------------------------------
def test_broker_start_status_stop(cli_env):
    ns = os.environ["TEXBRIDGE_NAMESPACE"] + "-b"
    try:
        status = cli("broker", "status", "--namespace", ns)
        assert status.returncode == 1 and "no broker is running" in status.stdout

        start = cli("broker", "start", "--persistent", "--namespace", ns)
        assert start.returncode == 0, start.stderr
        pid = int(re.search(r"pid (\d+)", start.stdout).group(1))
        assert "started" in start.stdout and "persistent" in start.stdout

        again = cli("broker", "start", "--namespace", ns)
        assert again.returncode == 0 and "already running" in again.stdout and f"pid {pid}" in again.stdout

        with texbridge.connect(ns) as s:
            s.create_buffer(4096, name="held")
            for missing in ("no-such-1", "no-such-2"):
                with pytest.raises(texbridge.NotFound):
                    s.open(missing)
            status = cli("broker", "status", "--namespace", ns)
        assert status.returncode == 0, status.stderr
        for key, value in (("pid", pid), ("resources", 1), ("names", 1), ("fds", 1), ("clients", 2)):
            assert re.search(rf"│ {key}\s+│\s+{value}\b", status.stdout), (key, status.stdout)
        # errors say what they were: a count per code, then the last few with the op and message
        assert re.search(r"│ errors\s+│\s+2 \(not_found 2\)", status.stdout), status.stdout
        assert "last errors" in status.stdout and "no-such-2" in status.stdout and "open" in status.stdout

        stop = cli("broker", "stop", "--namespace", ns)
        assert stop.returncode == 0 and f"pid {pid}" in stop.stdout
        assert not alive(pid)
        assert cli("broker", "status", "--namespace", ns).returncode == 1
        stop = cli("broker", "stop", "--namespace", ns)
        assert stop.returncode == 0 and "no broker is running" in stop.stdout
    finally:
        cli("broker", "stop", "--namespace", ns)


def test_broker_stop_refuses_while_clients_are_live_unless_forced(cli_env):
    """`broker stop` names the live clients and refuses; --force cuts them off. Without autostart nobody starts a
    new broker, so the client's next request fails with BrokenError, not a hang."""
    assert cli("broker", "start", "--persistent").returncode == 0
    with texbridge.connect(autostart=False, app_name="holder") as s:
        s.create_buffer(4096)
        refused = cli("broker", "stop")
        text = " ".join((refused.stdout + refused.stderr).split())
        assert refused.returncode == 1 and f"pid {os.getpid()} (holder)" in text and "--force" in text, text
        assert s.stats()["clients"] == 1  # still serving
        assert cli("broker", "stop", "--force").returncode == 0
        with pytest.raises(texbridge.BrokenError):
            s.stats()


def test_broker_start_with_idle_timeout_exits(cli_env):
    start = cli("broker", "start", "--idle", "0.3")
    assert start.returncode == 0 and "0.3s idle" in start.stdout
    pid = int(re.search(r"pid (\d+)", start.stdout).group(1))
    # Watch the pid, not the socket: connecting to ask would itself keep the broker busy.
    assert wait_until(lambda: not alive(pid), timeout=10)
    assert not broker_running()


# -- doctor / bench ------------------------------------------------------------------------------------------------
def test_doctor_reports_memfd_and_never_crashes(cli_env):
    proc = cli("doctor")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"✔ memfd: memfd_create", proc.stdout)
    for topic in ("platform", "keyed mutex", "vulkan", "gl", "cuda"):
        assert re.search(rf"[✔✘] {topic}:", proc.stdout), topic
    assert "Traceback" not in proc.stdout + proc.stderr


def test_doctor_survives_a_missing_library(cli_env):
    """With the vulkan package made unimportable, doctor still exits 0 and says why vulkan is unavailable."""
    code = textwrap.dedent("""
        import sys
        sys.modules["vulkan"] = None  # what a machine without the package looks like to `import vulkan`
        from texbridge.cli import main
        main(["doctor"])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"✘ vulkan: .*unavailable", proc.stdout), proc.stdout
    assert "✔ memfd" in proc.stdout


def test_bench_lists_the_packaged_benchmarks():
    proc = cli("bench", "--list")
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    assert listed == list(benchmarks.BENCHMARKS)


def test_every_benchmark_module_has_its_row_and_every_row_its_module():
    """BENCHMARKS is what `texbridge bench` runs: a module without a row would never run, a row without a module
    would fail at run time."""
    here = Path(benchmarks.__file__).parent
    modules = sorted(p.stem for p in here.glob("*.py") if not p.stem.startswith("_"))
    assert modules == sorted(benchmarks.BENCHMARKS)


def test_bench_runs_from_an_installed_wheel(tmp_path):
    """Issue 13: the benchmarks ship inside the wheel. The wheel is built and installed into a bare folder that
    shadows the editable install (PYTHONPATH comes first), and `texbridge bench` runs from a directory with no
    checkout in sight."""
    # A clean copy: setuptools reuses a checkout's build/ folder, which would hide a package left out of the wheel.
    source = tmp_path / "source"
    shutil.copytree(texbridge_root(), source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".hypothesis", ".pytest_cache", ".gl", ".whl", "*.so"))
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(wheels), str(source)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("texbridge-*.whl")
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("TEXBRIDGE_BENCHMARKS", None)
    where = subprocess.run([sys.executable, "-c", "import texbridge.benchmarks as b; print(b.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.strip().startswith(str(target)), where.stdout + where.stderr
    proc = cli("bench", "--list", cwd=elsewhere, env=env)
    assert proc.returncode == 0 and "senders" in proc.stdout, proc.stdout + proc.stderr
    proc = cli("bench", "--quick", "gl", cwd=elsewhere, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "texbridge benchmarks" in proc.stdout


def test_bench_runs_modules_and_survives_a_broken_one(tmp_path):
    """A failing benchmark is reported by name; the others' rows are still printed; the exit status says so."""
    bench = tmp_path / "mybench"
    bench.mkdir()
    (bench / "_report.py").write_text(Path(benchmarks._report.__file__).read_text())
    (bench / "__init__.py").write_text("")  # benchmark folders are packages, like the repo's own
    (bench / "good.py").write_text(textwrap.dedent("""
        from ._report import Row
        def run(quick):
            return [Row("thing", "texbridge widget", 42.0 if quick else 1.0, "us")]
    """))
    (bench / "bad.py").write_text("def run(quick):\n    raise RuntimeError('deliberately broken')\n")
    env = {**os.environ, "TEXBRIDGE_BENCHMARKS": str(bench)}
    proc = cli("bench", "--quick", env=env)
    assert proc.returncode == 1
    assert "texbridge widget" in proc.stdout and "42.00 us" in proc.stdout
    assert "benchmark bad failed" in proc.stderr and "deliberately broken" in proc.stderr
    proc = cli("bench", "good", env=env)
    assert proc.returncode == 0 and "1.00 us" in proc.stdout
    proc = cli("bench", "nope", env=env)
    assert proc.returncode == 1 and "unknown benchmark" in proc.stderr


def texbridge_root():
    from pathlib import Path

    return Path(texbridge.__file__).resolve().parents[2]


# -- plumbing every command shares ---------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["ls"], ["info", "x"], ["broker", "start"], ["broker", "stop"],
                                     ["broker", "status"], ["demo", "--frames", "1", "--size", "8x8"],
                                     ["send-test", "--frames", "1"], ["senders", "--once"],
                                     ["view", "--timeout", "1"]])
def test_every_command_reports_a_bad_namespace_in_one_line(cli_env, command):
    """The one --namespace option and the one error wrapper: the same one-line error and exit status 1 from every
    command, never a traceback."""
    proc = cli(*command, "--namespace", "bad/ns")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: namespace 'bad/ns': use 1-64 of A-Z a-z 0-9 _ . - (not starting with . _ -)"], proc.stderr


def test_a_bad_namespace_is_said_before_the_viewer_needs_glfw(cli_env, tmp_path):
    """Seen on a machine without glfw: `view --namespace bad/ns` blamed glfw. The namespace is checked first."""
    (tmp_path / "glfw.py").write_text("raise ImportError('no glfw on this machine')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    proc = cli("view", "--timeout", "1", "--namespace", "bad/ns", env=env)
    assert proc.returncode == 1 and "namespace 'bad/ns'" in proc.stderr, proc.stderr


def test_the_namespace_option_reaches_what_a_command_opens(cli_env):
    """--namespace wins over $TEXBRIDGE_NAMESPACE for the session commands and for the senders directory alike."""
    ns = os.environ["TEXBRIDGE_NAMESPACE"] + "-n"
    try:
        senders = cli("senders", "--once", "--namespace", ns)
        assert senders.returncode == 0, senders.stderr
        assert f"senders in namespace {ns!r}" in senders.stdout
        ls = cli("ls", "-n", ns)
        assert ls.returncode == 0 and f"namespace {ns!r}: 0 resource(s)" in ls.stdout, ls.stdout
    finally:
        cli("broker", "stop", "--namespace", ns)


def test_backend_choices_come_from_the_backend_table(cli_env):
    proc = cli("demo", "--backend", "nope")
    assert proc.returncode == 2
    for name in BACKENDS:
        assert repr(name) in proc.stderr, proc.stderr
    assert all(name in cli("send-test", "--help").stdout for name in BACKENDS)
