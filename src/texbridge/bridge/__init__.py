"""The bridge: the same senders and keyed mutexes across a VM boundary (a shared file QEMU maps into the guest as
an ivshmem device) and between hosts (TCP). Design: docs/bridge.md.

Rooms: `_link` (the seam: what one end of a link offers the engine), transports behind it, and the engine that
mirrors senders and keyed-mutex resources over a link.
"""
