"""Senders and receivers: Spout/Syphon for Linux on top of shared resources (design: docs/senders.md).

A Sender owns a ring of shared textures (triple buffered by default) and one small shared *control* buffer published
under the sender's name; receivers pin the newest slot, copy it, and keep the copy only if the slot's seqlock did not
move. The package's rooms:

- `ring`: the control-buffer layout and the whole seqlock/pin handoff (RingWriter, RingReader) over any buffer, and
  the FrameSink / FrameSource seam other transports implement;
- `directory`: senders as the broker lists them, the active sender, watch_senders();
- `frame`: Frame (a received frame with its metadata and array protocols);
- `sender`: Sender (slot resources, resize, frame_sync, metadata thread);
- `receiver`: Receiver (finding and following a sender, opening slots, the copy path).
"""

from .directory import ACTIVE_NAME, SenderEvent, SenderInfo, active_sender, list_senders, set_active_sender, \
    watch_senders
from .frame import Frame
from .receiver import Receiver
from .ring import MAX_USER_DATA, FrameSink, FrameSource
from .sender import Sender

__all__ = ["Sender", "Receiver", "Frame", "MAX_USER_DATA", "SenderInfo", "SenderEvent", "list_senders", "watch_senders", "active_sender",
           "set_active_sender", "ACTIVE_NAME", "FrameSink", "FrameSource"]
