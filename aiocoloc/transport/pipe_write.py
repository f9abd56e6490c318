"""The pipe write path of a ``SwitchableTransport``, past ``write`` itself
(``write``): ringing the peer when its reader sleeps, the overflow (bytes
written while the pipe was full) and waiting for room, and the outgoing
pipe's enrollment in the pool's resizer (``Resizing``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiocoloc.errors import RingClosed, RingCorrupted
from aiocoloc.shm.elastic import ElasticProducer
from aiocoloc.shm.resizer import Enrollment, resizer_for
from aiocoloc.transport.state import TransportState
from aiocoloc.transport.switch_state import SHM

__all__ = ["PipeWritePath", "Resizing"]


class Resizing:
    """Our outgoing pipe's place in the pool's resizer on this loop (one
    timer per pool, not one per pipe): enrolled while the pipe is busy or
    settling, let go once it is idle at its share (the next write enrolls
    it again).  ``idle`` is read on the write path: no call while enrolled."""

    __slots__ = ("_closed", "_enrollment", "_loop", "_producer", "idle")

    def __init__(self, producer: ElasticProducer, loop: asyncio.AbstractEventLoop) -> None:
        self._producer = producer
        self._loop = loop
        self._enrollment: Enrollment | None = None
        self._closed = False
        self.idle = True

    def enroll(self) -> None:
        """Have the resizer follow the pipe (it is busy, or new)."""
        if self._closed:
            return
        producer = self._producer
        self.idle = False
        self._enrollment = resizer_for(producer.pool, self._loop, producer.config).enroll(
            producer, self._stopped
        )

    def _stopped(self) -> None:
        self._enrollment, self.idle = None, True

    def close(self) -> None:
        """The connection is done with the pipe."""
        self._closed = True
        if self._enrollment is not None:
            self._enrollment.cancel()
            self._enrollment = None


class PipeWritePath(TransportState):
    """Ringing, the overflow, waiting for room in the outgoing pipe."""

    def _ring_peer(self) -> None:
        """Ring the peer if its consumer sleeps (event suppression otherwise).

        Rung right after the write: the sleep flag already limits rings to
        one per sleep, so a busy consumer costs no system call, and deferring
        the ring to the end of the loop iteration (an anticipatory window)
        measured slower on ping-pong and no faster on streams.  A hub (a
        doorbell shared by the connections between two loops) skips the
        system call while the peer has not taken its last ring
        (``aiocoloc.notify.hub``).
        """
        shm = self._shm
        if shm is None or shm.closed:
            return
        try:
            if shm.producer.wake_needed():
                shm.doorbell.ring()
                self._woke_peer = True
        except (RingCorrupted, ValueError):
            pass  # reported by the next write

    def _ring_peer_after(self, action: Callable[[], None]) -> None:
        """Run ``action`` (EOF into the pipe, say), then ring the peer."""
        try:
            action()
        except (RingCorrupted, ValueError):
            pass
        self._ring_peer()

    def _after_pipe_write(self) -> None:
        resizing = self._resizing
        if resizing is not None and resizing.idle:
            resizing.enroll()
        self._ring_peer()

    def _wait_for_space(self) -> None:
        """Ask to be rung when the pipe has room; flush at once if it has."""
        assert self._shm is not None
        if self._waiting_space:
            return
        self._waiting_space = True
        try:
            must_wait = self._shm.producer.prepare_wait(1)
        except (RingCorrupted, ValueError) as exc:
            self._fatal_error(
                ConnectionResetError(f"shared-memory pipe failed: {exc}"), "pipe failed"
            )
            return
        if not must_wait:
            self._loop.call_soon(self._flush_overflow)
        if self._paused_reading and self._rx == SHM:  # hold the peer's bytes (pipe_read)
            self._schedule_drain()

    def _flush_overflow(self) -> None:
        self._waiting_space = False
        shm = self._shm
        if self._tx != SHM or shm is None or shm.closed or self._lost_called:
            return
        while self._overflow:
            try:
                written = shm.producer.write(self._overflow)
            except (RingClosed, RingCorrupted) as exc:
                self._fatal_error(
                    ConnectionResetError(f"shared-memory pipe failed: {exc}"), "pipe write failed"
                )
                return
            if not written:
                break
            del self._overflow[:written]
            self._after_pipe_write()
        if self._overflow:
            self._wait_for_space()
            return
        self._maybe_resume_protocol()
        if self._eof_pending:
            self._finish_write_eof()
        if self._closing:  # (write_eof() then close(): both waited for the pipe)
            self._finish_close()
