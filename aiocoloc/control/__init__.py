"""The control channel: framed msgpack messages on a connection's control
socket (Unix socket in one kernel, TCP between VMs), and the link an upgraded
connection keeps for switches, doorbells and closing."""

from aiocoloc.control.frames import MAX_FRAME, ControlLink, FrameDecoder, encode_frame

__all__ = ["MAX_FRAME", "ControlLink", "FrameDecoder", "encode_frame"]
