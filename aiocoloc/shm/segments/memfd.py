"""memfd segments, sealed and passed over Unix sockets with SCM_RIGHTS."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import stat

from aiocoloc.errors import SegmentError
from aiocoloc.shm.segments.base import Segment

_log = logging.getLogger("aiocoloc.shm.segments.memfd")

#: Seals every memfd pool carries: its size can never change under a mapping
#: (a shrink would turn our accesses into SIGBUS), and the seals are final.
REQUIRED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
ALL_SEALS = REQUIRED_SEALS | fcntl.F_SEAL_SEAL

#: First bytes of the message that carries a memfd over a Unix socket.
_HANDOFF_MAGIC = b"ACOLMFD1"


class MemfdSegment(Segment):
    """An anonymous memfd sealed against shrinking and growing."""

    kind = "memfd"

    @classmethod
    def create(cls, size: int, name: str = "aiocoloc-pool") -> MemfdSegment:
        """A new zero-filled memfd of ``size`` bytes, sealed."""
        if size <= 0:
            raise SegmentError(f"memfd size must be positive, got {size}")
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, ALL_SEALS)
            return cls.from_fd(fd)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def from_fd(cls, fd: int) -> MemfdSegment:
        """Adopt a memfd received from a peer, checking it is safe to map.

        The descriptor is owned by the segment from then on (closed with it),
        also when this raises.
        """
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SegmentError("descriptor is not a memfd (not a regular file)")
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            except OSError as exc:
                raise SegmentError(f"descriptor is not a sealable memfd: {exc}") from exc
            if seals & REQUIRED_SEALS != REQUIRED_SEALS:
                raise SegmentError(
                    "memfd is not sealed against shrinking and growing: a peer could "
                    "truncate it under our mapping (refusing to map it)"
                )
            if st.st_size <= 0:
                raise SegmentError("memfd is empty")
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, st.st_size, f"memfd:{st.st_dev}:{st.st_ino}")

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "identity": self.identity, "size": self.size}


def send_segment(sock: socket.socket, segment: MemfdSegment, tag: bytes = b"") -> None:
    """Pass ``segment``'s descriptor to the peer of a Unix socket (SCM_RIGHTS)."""
    if sock.family != socket.AF_UNIX:
        raise SegmentError("a memfd can only be passed over a Unix socket")
    if len(tag) > 255:
        raise ValueError("tag must be at most 255 bytes")
    socket.send_fds(sock, [_HANDOFF_MAGIC + bytes([len(tag)]) + tag], [segment.fd])


def receive_segment(sock: socket.socket, timeout: float | None = 5.0) -> tuple[MemfdSegment, bytes]:
    """Receive a memfd sent with ``send_segment``; returns it and its tag."""
    previous = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        msg, fds, _flags, _addr = socket.recv_fds(sock, len(_HANDOFF_MAGIC) + 256, 4)
    except TimeoutError:
        raise SegmentError(f"no memfd arrived within {timeout} s") from None
    finally:
        sock.settimeout(previous)
    if not msg.startswith(_HANDOFF_MAGIC) or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise SegmentError(
            f"peer did not send one memfd (got {len(fds)} descriptors, message {msg[:16]!r})"
        )
    tag = msg[len(_HANDOFF_MAGIC) + 1 : len(_HANDOFF_MAGIC) + 1 + msg[len(_HANDOFF_MAGIC)]]
    return MemfdSegment.from_fd(fds[0]), tag
