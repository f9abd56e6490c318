"""The switchable transport: an ``asyncio.Transport`` born with a TCP
connection whose directions move to shared-memory pipes and back at
announced byte offsets.

``switchable`` composes it: its hot half, what runs per message
(``data_path``, compiled), the asyncio contract (``contract``), the cold
read and write paths per side (``tcp_read``, ``pipe_read``, ``write``,
``pipe_write``), switching on the control link (``switching``) by the rules
of a pure state machine (``switch_state``), the traffic hook and loop watch
(``loop_watch``), the state they share (``state``); the shared-memory side
and attaching it (``shm_path``); TLS on top of it (``tls``); why a
connection stays on TCP (``fallback``)."""

from aiocoloc.transport.shm_path import ShmPath, attach_shared_memory, close_end
from aiocoloc.transport.switchable import SwitchableTransport, TcpAdapter, open_transport

__all__ = [
    "ShmPath",
    "SwitchableTransport",
    "TcpAdapter",
    "attach_shared_memory",
    "close_end",
    "open_transport",
]
