"""Machine-readable CLI output (--json on ls, senders, info, doctor, bench), -n before the command, and the senders
list when piped. Commands run as users run them: subprocesses against a real broker in a private runtime dir."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

import texbridge

from conftest import spawn_py


def cli(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "texbridge.cli", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


def test_ls_info_senders_json(runtime):
    with texbridge.Sender("cam one", 32, 16) as tx, texbridge.connect() as s:
        tx.send(np.zeros(tx.shape, np.uint8))
        tex = s.create_texture(8, 4, "rgba8", name="plain")
        try:
            listing = json.loads(cli("ls", "--json").stdout)
            by_name = {n: r for r in listing for n in r["names"]}
            assert by_name["plain"]["handle"] == str(tex.handle) and by_name["plain"]["width"] == 8
            assert by_name["cam one"]["meta"]["texbridge.sender"] == 1
            info = json.loads(cli("info", "plain", "--json").stdout)
            assert info["handle"] == str(tex.handle) and info["descriptor"]["format"] == "rgba8"
            assert info["descriptor"]["width"] == 8 and info["descriptor"]["memory"] == "memfd"
            senders = json.loads(cli("senders", "--json").stdout)
            assert [(x["name"], x["width"], x["height"], x["active"]) for x in senders] == [("cam one", 32, 16, True)]
            assert senders[0]["handle"].startswith("tb:") and senders[0]["pid"] > 0
        finally:
            tex.close()


def test_ls_json_without_a_broker_is_an_empty_list(runtime):
    res = cli("ls", "--json")
    assert res.returncode == 0 and json.loads(res.stdout) == []


def test_namespace_before_the_command(runtime, monkeypatch):
    monkeypatch.setenv("TEXBRIDGE_NAMESPACE", "elsewhere")
    with texbridge.connect("first-ns") as s:
        tex = s.create_texture(4, 4, name="here")
        try:
            before = json.loads(cli("-n", "first-ns", "ls", "--json").stdout)
            after = json.loads(cli("ls", "-n", "first-ns", "--json").stdout)
            assert [r["names"] for r in before] == [r["names"] for r in after] == [["here"]]
            assert json.loads(cli("ls", "--json").stdout) == []  # the environment's namespace: nothing there
        finally:
            tex.close()
    res = cli("--namespace", "bad/name", "ls")
    assert res.returncode == 1 and "Traceback" not in res.stderr and res.stderr.count("\n") == 1


def test_doctor_json_says_whether_the_viewer_can_run(runtime, monkeypatch):
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    report = json.loads(cli("doctor", "--json", env=env).stdout)
    assert {"platform", "keyed mutex", "memfd", "vulkan", "gl", "cuda", "viewer"} <= set(report)
    assert all(isinstance(t["available"], bool) and t["detail"] for t in report.values())
    assert report["viewer"]["available"] is False and "DISPLAY" in report["viewer"]["detail"]
    with_display = json.loads(cli("doctor", "--json", env=dict(env, DISPLAY=":12345")).stdout)["viewer"]
    try:
        import glfw  # noqa: F401
        import OpenGL  # noqa: F401
    except ImportError:
        assert not with_display["available"] and "texbridge[view]" in with_display["detail"]
    else:
        assert with_display["available"] and ":12345" in with_display["detail"]


def test_bench_json(runtime, tmp_path, monkeypatch):
    (tmp_path / "mybench").mkdir()
    (tmp_path / "mybench" / "__init__.py").write_text("")
    (tmp_path / "mybench" / "_report.py").write_text(
        "from texbridge.benchmarks._report import *  # noqa\n")
    (tmp_path / "mybench" / "tiny.py").write_text(
        "from ._report import Row\n"
        "def run(quick):\n    return [Row('g', 'texbridge', 1.5, 'us', 2.0, 'n=1')]\n")
    (tmp_path / "mybench" / "broken.py").write_text("def run(quick):\n    raise RuntimeError('boom')\n")
    monkeypatch.setenv("TEXBRIDGE_BENCHMARKS", str(tmp_path / "mybench"))
    res = cli("bench", "--json", "tiny")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out == {"rows": [{"group": "g", "subject": "texbridge", "value": 1.5, "unit": "us", "p99": 2.0,
                             "note": "n=1", "higher_is_better": False}], "failed": []}
    res = cli("bench", "--json", "tiny", "broken")
    assert res.returncode == 1 and json.loads(res.stdout)["failed"] == ["broken"] and "boom" in res.stderr
    assert set(json.loads(cli("bench", "--list", "--json").stdout)) == {"tiny", "broken"}


def test_senders_piped_prints_the_table_then_one_line_per_change(runtime):
    p = subprocess.Popen([sys.executable, "-m", "texbridge.cli", "senders"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        header = [p.stdout.readline() for _ in range(3)]
        assert "senders in namespace" in header[0] and "name" in "".join(header)
        time.sleep(0.5)
        with texbridge.Sender("late one", 24, 12):
            line = ""
            while "announced" not in line:
                line = p.stdout.readline()
                assert line, p.stderr.read()
        assert "late one" in line and "24x12" in line and "\x1b" not in line
        while "retired" not in line:
            line = p.stdout.readline()
            assert line, p.stderr.read()
        assert "late one" in line
    finally:
        p.terminate()
        p.wait(10)
