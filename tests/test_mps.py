"""`texbridge mps` and doctor's MPS topic: clear errors without the NVIDIA control binary (everywhere), and, where
nvidia-cuda-mps-control and a CUDA device exist, a real per-user daemon that a CUDA child process becomes a client
of, then stopped."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from texbridge import _mps
from texbridge._errors import BackendError


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "texbridge.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture
def no_control(runtime, tmp_path):
    """An environment whose PATH has no nvidia-cuda-mps-control (an empty directory): what most machines have."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    return dict(os.environ, PATH=str(empty))


def test_start_and_stop_without_the_control_binary_say_what_to_install(no_control):
    for command in ("start", "stop"):
        proc = cli("mps", command, env=no_control)
        assert proc.returncode == 1, proc
        assert "nvidia-cuda-mps-control is not on PATH" in proc.stderr and "compute utilities" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (_mps.directories().pipe).exists(), "nothing is created when nothing can start"


def test_status_without_the_control_binary_reports_not_running(no_control):
    proc = cli("mps", "status", env=no_control)
    assert proc.returncode == 0, proc.stderr
    assert "texbridge's daemon: not running" in proc.stdout
    assert "not on PATH" in proc.stdout


def test_env_names_the_per_user_directories_under_the_runtime_dir(runtime):
    proc = cli("mps", "env")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (f"export CUDA_MPS_PIPE_DIRECTORY={runtime / 'mps' / 'pipe'} "
                                   f"CUDA_MPS_LOG_DIRECTORY={runtime / 'mps' / 'log'}")


def test_a_leftover_control_socket_is_not_taken_for_a_daemon_without_saying_so(runtime, tmp_path, monkeypatch):
    """Without the binary, a `control` socket is the only evidence: reported, flagged as unconfirmed."""
    monkeypatch.setenv("PATH", str(tmp_path))
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    assert not _mps.status(pipe).running
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(pipe / "control"))
        st = _mps.status(pipe)
        assert st.running and "not on PATH to confirm" in st.detail
    finally:
        s.close()


def test_api_refuses_without_the_binary(runtime, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BackendError, match="not on PATH"):
        _mps.start()
    with pytest.raises(BackendError, match="not on PATH"):
        _mps.stop()


def test_doctor_has_an_mps_topic_with_one_line_and_the_command(runtime):
    from texbridge.cli.doctor import mps_report

    unavailable = mps_report({"available": False, "detail": "no CUDA device"})
    assert not unavailable["available"] and "CUDA only" in unavailable["detail"]
    assert "no CUDA device" in unavailable["detail"]
    available = mps_report({"available": True, "detail": "1 device"})
    if available["available"]:  # this user is already served (a daemon at $CUDA_MPS_PIPE_DIRECTORY)
        assert "MPS clients" in available["detail"]
    else:
        assert "410 -> 57 us" in available["detail"] and "\n" not in available["detail"]
        assert available["command"].startswith(("texbridge mps start", "eval"))
    proc = cli("doctor")
    assert proc.returncode == 0, proc.stderr
    assert " mps: " in proc.stdout


# -- on an NVIDIA machine with the MPS control binary ---------------------------------------------------------------------
def _daemon_reason() -> str | None:
    if _mps.control_path() is None:
        return f"{_mps.CONTROL} is not on PATH (NVIDIA compute utilities)"
    try:
        from texbridge.backends.cuda import unavailable_reason
    except ImportError as e:
        return f"cuda-bindings not installed ({e})"
    reason = unavailable_reason()
    if reason:
        return reason
    for pipe in (_mps.serving_pipe(), _mps.directories().pipe):
        st = _mps.status(pipe)
        if st.running:  # e.g. scripts/device-mps-check runs the suite under MPS: one daemon per GPU at a time
            return f"an MPS daemon already runs ({st.detail}); not starting a second one"
    return None


CLIENT = textwrap.dedent("""
    import os, sys
    from cuda.bindings import driver as cu
    assert cu.cuInit(0)[0] == cu.CUresult.CUDA_SUCCESS
    err, dev = cu.cuDeviceGet(0)
    err, ctx = cu.cuDevicePrimaryCtxRetain(dev)
    assert err == cu.CUresult.CUDA_SUCCESS, err
    cu.cuCtxSetCurrent(ctx)
    err, ptr = cu.cuMemAlloc(1 << 20)
    assert err == cu.CUresult.CUDA_SUCCESS, err
    print(os.getpid(), flush=True)
    sys.stdin.readline()
""")


@pytest.mark.gpu
def test_a_cuda_process_with_the_client_env_becomes_a_client_of_the_daemon(runtime):
    reason = _daemon_reason()
    if reason:
        pytest.skip(reason)
    state, started = _mps.start()
    assert started and state.running
    dirs = _mps.directories()
    assert oct(dirs.pipe.stat().st_mode & 0o777) == "0o700"
    child = subprocess.Popen([sys.executable, "-c", CLIENT], env=dict(os.environ, **_mps.client_env()),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid = int(child.stdout.readline())
        deadline = time.monotonic() + 10
        while not (servers := _mps.status(dirs.pipe).servers):
            assert time.monotonic() < deadline, "no MPS server started for the client"
            time.sleep(0.1)
        clients = _mps._control(dirs.pipe, f"get_client_list {servers[0]}").stdout.split()
        assert str(pid) in clients, (pid, clients)
    finally:
        child.communicate("\n", timeout=30)
        assert _mps.stop()
    assert child.returncode == 0, child.stderr
    assert not _mps.status(dirs.pipe).running


# -- the cuda benchmark's MPS rows ----------------------------------------------------------------------------------------
def test_bench_mps_rows_need_a_daemon_or_the_users_leave(runtime, tmp_path, monkeypatch):
    from texbridge.benchmarks import cuda

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "nothing"))
    monkeypatch.delenv("TEXBRIDGE_BENCH_MPS", raising=False)
    env, stop_after, why = cuda._mps_env(_mps)
    assert env is None and not stop_after and "--mps" in why
    monkeypatch.setenv("TEXBRIDGE_BENCH_MPS", "1")
    env, stop_after, why = cuda._mps_env(_mps)
    assert env is None and "not on PATH" in why


def test_bench_rows_put_texbridge_under_mps_first_in_each_group():
    from texbridge.benchmarks import cuda
    from texbridge.benchmarks._report import Row

    def rows():
        return [Row("handoff", "texbridge keyed mutex", 1.0, "us"), Row("handoff", "torch.multiprocessing", 9.0, "us"),
                Row("open", "texbridge: x", 2.0, "us")]

    ordered = cuda._ordered({"no MPS": rows(), "MPS": rows()})
    assert [(r.group, r.subject) for r in ordered] == [
        ("handoff", "texbridge keyed mutex, MPS"), ("handoff", "texbridge keyed mutex, no MPS"),
        ("handoff", "torch.multiprocessing, MPS"), ("handoff", "torch.multiprocessing, no MPS"),
        ("open", "texbridge: x, MPS"), ("open", "texbridge: x, no MPS")]
