"""_seqpacket's spin policy: spinning stops when it was descheduled (an oversubscribed machine) and probes again
after a back-off; and a spinning receive still gets its frame (with fds) whichever way it waits."""

from __future__ import annotations

import os
import socket
import threading

from texbridge._seqpacket import PREEMPTED_GAP, SpinPolicy, recv_frame_spinning, send_frame


def test_a_descheduled_spin_stops_spinning_for_a_growing_back_off():
    p = SpinPolicy(500e-6)
    assert p.window(10.0) == 500e-6
    p.preempted(10.0)
    assert p.window(10.0) == 0.0 and p.window(10.099) == 0.0
    assert p.window(10.1) == 500e-6  # probes again after 0.1 s
    p.preempted(10.1)
    assert p.window(10.299) == 0.0 and p.window(10.3) == 500e-6  # 0.2 s the second time
    for i in range(10):
        p.preempted(20.0)
    assert p.window(24.99) == 0.0 and p.window(25.0) == 500e-6  # capped at 5 s
    p.clean()
    p.preempted(30.0)
    assert p.window(30.1) == 500e-6  # a clean spin resets the back-off


def test_no_spinning_configured_means_no_window():
    assert SpinPolicy(0.0).window(0.0) == 0.0


def test_a_spinning_receive_gets_a_late_frame_and_its_fds():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        policy = SpinPolicy(50e-6)  # a short window: the frame comes after it, from the blocking receive
        timer = threading.Timer(0.05, send_frame, (a, b"late", [r]))
        timer.start()
        data, fds, truncated = recv_frame_spinning(b, policy)
        timer.join()
        assert (data, len(fds), truncated) == (b"late", 1, False)
        os.close(fds[0])
        assert PREEMPTED_GAP > 50e-6
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()
