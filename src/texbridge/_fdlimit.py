"""Lift this process's RLIMIT_NOFILE: the one home of that step, for the broker, its fd keepers and clients.

Standard library only and free of package imports: the fd keeper (_broker/_keeper.py) is a bare script that loads
this file by path, without texbridge.
"""

from __future__ import annotations

import resource


def raise_fd_limit(want: int = 1 << 20) -> int:
    """Lift RLIMIT_NOFILE as far as allowed (the broker and each keeper hold one fd per resource; a client keeps a
    dup of each of its resources' fds to re-attach them). Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (max(want, hard), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
        except (ValueError, OSError):
            continue
    return soft
