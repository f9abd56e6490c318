"""Exceptions raised by aiocoloc: every one is defined here, under ``AiocolocError``."""

from __future__ import annotations

__all__ = [
    "AiocolocError",
    "ClientGone",
    "ControlChannelClosed",
    "ControlProtocolError",
    "HandshakeAbandoned",
    "HandshakeFailed",
    "LayoutMismatch",
    "PoolBusy",
    "PoolCorrupted",
    "PoolError",
    "PoolExhausted",
    "ProtocolViolation",
    "RegistryError",
    "RingAttachError",
    "RingClosed",
    "RingCorrupted",
    "RingError",
    "SegmentError",
    "UnknownOperation",
    "VersionMismatch",
    "VfioUnavailable",
]


class AiocolocError(Exception):
    """Base class of every error aiocoloc raises."""


# --- rings and pipes ---------------------------------------------------------------


class RingError(AiocolocError):
    """A shared-memory ring cannot be used."""


class RingAttachError(RingError, ValueError):
    """A buffer cannot hold a ring: too small, read-only, unaligned, or an unknown header."""


class RingCorrupted(RingError):
    """The peer broke the channel's invariants; the end that saw it refuses further use."""


class RingClosed(RingError, BrokenPipeError):
    """Writing to a ring whose consumer has gone, or using an end after close."""


class LayoutMismatch(AiocolocError, ImportError):
    """The compiled ring was built with layout numbers other than ``_ring_layout``'s."""


# --- segments and pools ---------------------------------------------------------------


class SegmentError(AiocolocError):
    """A shared-memory segment cannot be created, opened or mapped."""


class VfioUnavailable(AiocolocError, OSError):
    """An ivshmem device cannot be opened through VFIO here (the message says why)."""


class PoolError(AiocolocError):
    """A pool cannot be created, attached or used."""


class PoolExhausted(PoolError):
    """The pool has no free slice, pipe entry or member slot for the request."""


class PoolBusy(PoolExhausted):
    """Another member holds the allocator lock and the caller does not wait: try later."""


class PoolCorrupted(PoolError):
    """The pool's shared tables break their invariants (a buggy or hostile member)."""


# --- the transport ------------------------------------------------------------------------


class ProtocolViolation(AiocolocError):
    """The peer announced or acknowledged a switch that cannot be."""


# --- connecting --------------------------------------------------------------------------


class ControlProtocolError(AiocolocError):
    """The peer sent a control frame or message that is not well-formed."""


class UnknownOperation(ControlProtocolError):
    """A control message whose operation this version does not know (ignored
    on an upgraded connection's link, refused during the handshake)."""


class VersionMismatch(ControlProtocolError):
    """The peer's handshake speaks another protocol version."""


class ControlChannelClosed(AiocolocError, ConnectionError):
    """The peer closed the control channel (or it failed) mid-conversation."""


class HandshakeFailed(AiocolocError):
    """The upgrade did not happen; ``reason`` is a fallback reason, ``detail`` says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class HandshakeAbandoned(HandshakeFailed):
    """The peer hung up mid-handshake: nothing to refuse, nobody to tell (a
    client that asked several endpoints at once closes the ones it does not
    need)."""


class ClientGone(AiocolocError):
    """The client closed its control socket while the server waited."""


class RegistryError(AiocolocError):
    """The registry directory cannot be used safely."""
