"""Keyed mutexes through the broker: attached to resources, standalone and named, abandoned on disconnect."""

import time

import pytest

from texbridge import KeyedMutexAbandoned, KeyedMutexTimeout

from conftest import spawn_py


def test_texture_frames_ping_pong_with_the_keyed_mutex(session):
    tex = session.create_texture(64, 64, "rgba8", name="pp", keyed_mutex=True)
    assert tex.mutex is not None
    consumer = spawn_py("""
        import numpy as np, texbridge
        with texbridge.connect() as s, s.open("pp") as t:
            for i in range(1000):
                with t.mutex.hold(acquire=1, release=0, timeout=10):
                    v = t.numpy()
                    assert v[0, 0, 0] == i % 256 and (v == i % 256).all(), f"frame {i} torn"
                    v[...] = 255 - i % 256
        print("ok", flush=True)
    """)
    for i in range(1000):
        with tex.mutex.hold(acquire=0, release=1, timeout=10):
            if i:
                assert (tex.numpy() == 255 - (i - 1) % 256).all()
            tex.numpy()[...] = i % 256
    out, err = consumer.communicate(timeout=60)
    assert consumer.returncode == 0 and out.strip() == "ok", err


def test_standalone_named_keyed_mutex(session):
    km = session.create_keyed_mutex(name="lock", initial_key=7)
    with pytest.raises(KeyedMutexTimeout):
        km.acquire(0, timeout=0.01)
    km.acquire(7, timeout=0)
    other = spawn_py("""
        import texbridge
        with texbridge.connect() as s, s.open("lock") as m:
            m.acquire(9, timeout=10)
            m.release(3)
        print("ok", flush=True)
    """)
    time.sleep(0.2)
    km.release(9)
    assert other.communicate(timeout=30)[0].strip() == "ok"
    km.acquire(3, timeout=5)
    km.release(0)


def test_disconnect_while_holding_abandons_through_the_broker(session):
    """The holder process stays alive but hangs up: the broker, not a dead pid, tells the waiter."""
    tex = session.create_texture(16, 16, name="held", keyed_mutex=True)
    holder = spawn_py("""
        import sys, texbridge
        s = texbridge.connect()
        t = s.open("held")
        t.mutex.acquire(0, timeout=10)
        print("holding", flush=True)
        sys.stdin.readline()
        s._channel.close()          # hang up without releasing; the process lives on
        print("hung up", flush=True)
        sys.stdin.readline()
    """, stdin=__import__("subprocess").PIPE)
    assert holder.stdout.readline().strip() == "holding"
    holder.stdin.write("\n")
    holder.stdin.flush()
    assert holder.stdout.readline().strip() == "hung up"
    with pytest.raises(KeyedMutexAbandoned):
        tex.mutex.acquire(0, timeout=5)
    tex.mutex.release(1)  # the abandoned mutex is owned and recoverable
    holder.stdin.write("\n")
    holder.stdin.flush()
    holder.wait(10)


def test_mutex_outlives_its_creator(session):
    creator = spawn_py("""
        import texbridge
        s = texbridge.connect()
        t = s.create_texture(16, 16, name="heir", keyed_mutex=True)
        t.mutex.acquire(0)
        t.numpy()[...] = 42
        t.mutex.release(5)
        print(t.handle, flush=True)
        import sys; sys.stdin.readline()
    """, stdin=__import__("subprocess").PIPE)
    handle = creator.stdout.readline().strip()
    tex = session.open(handle)
    creator.stdin.write("\n")
    creator.stdin.flush()
    creator.wait(10)
    tex.mutex.acquire(5, timeout=5)
    assert (tex.numpy() == 42).all()
    tex.mutex.release(0)
