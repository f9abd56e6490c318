"""The switchable transport: an ``asyncio.Transport`` born with a TCP
connection whose directions move to shared-memory pipes and back at
announced byte offsets (``switchable``); TLS on top of it (``tls``); why a
connection stays on TCP (``fallback``)."""

from aiocoloc.transport.switchable import (
    Adopter,
    ShmPath,
    SwitchableTransport,
    attach_shared_memory,
    close_end,
    open_transport,
)

__all__ = [
    "Adopter",
    "ShmPath",
    "SwitchableTransport",
    "attach_shared_memory",
    "close_end",
    "open_transport",
]
