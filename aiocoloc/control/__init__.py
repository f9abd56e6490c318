"""The control channel beside every data path: framed msgpack messages
(``frames``), every message with its fields and types (``messages``), and the
channel object that carries them for a connection's whole life, handshake
and link (``channel``).  A Unix socket in one kernel, TCP between VMs."""

from aiocoloc.control.channel import ControlChannel
from aiocoloc.control.frames import MAX_FRAME, FrameDecoder, encode_frame
from aiocoloc.control.messages import PROTOCOL_VERSION, Message, decode

__all__ = [
    "MAX_FRAME",
    "PROTOCOL_VERSION",
    "ControlChannel",
    "FrameDecoder",
    "Message",
    "decode",
    "encode_frame",
]
