"""The pipe read path of a ``SwitchableTransport``, past its hot part:
holding the peer's bytes while the protocol paused reading, and reading
into a ``BufferedProtocol``'s buffers.  Draining the incoming pipe,
doorbell wake-ups, spinning and sleeping run per message and are the data
path's (``data_path``, compiled); the methods here forward to it.
"""

from __future__ import annotations

from typing import Any

from aiocoloc.errors import RingCorrupted
from aiocoloc.transport.state import READ_CHUNK, TransportState

__all__ = ["HOLD_LIMIT", "PipeReadPath"]

#: Bytes a reader whose protocol paused reading still takes from its pipe
#: and keeps while its own writer waits for room too: two peers that each
#: write a large message before they read would otherwise wait for each
#: other for good, where sockets' buffers (Linux grows a loopback socket's
#: to 6 MiB) would have held it.  Only then: a reader that is merely slower
#: than its writer leaves the bytes in the pipe (no copy).
HOLD_LIMIT = 4 << 20


class PipeReadPath(TransportState):
    """Holding and buffered reads; the rest forwards to the data path."""

    # The hot part is the data path's (``data_path``): these forward to it.

    def _schedule_drain(self) -> None:
        self._core.schedule_drain()

    def _sleep(self) -> None:
        self._core.sleep()

    def _hold(self) -> None:
        """The protocol paused reading while our writer waits for room: go on
        emptying the pipe into a buffer of our own, up to ``HOLD_LIMIT`` and
        never past the next switch, and be rung when more comes.  Delivered
        first once reading resumes."""
        shm = self._shm
        assert shm is not None
        consumer = shm.consumer
        held = self._rx_held
        if held is None:
            held = self._rx_held = bytearray()
        data: Any = None
        try:
            while len(held) < HOLD_LIMIT:
                room = min(self._rx_switch_at - self._rx_pos - len(held), HOLD_LIMIT - len(held))
                if room <= 0:
                    return  # the rest comes after the switch, or after resume_reading
                data = consumer.read(min(room, READ_CHUNK))
                if not data:
                    break  # None: empty for now; b"": EOF, left for the drain after resuming
                held += data
                if consumer.wake_needed():
                    shm.doorbell.ring()  # the producer waits for the space we freed
            else:
                return  # full: resume_reading drains
            if data is None and not self._rx_asleep:
                self._sleep()
        except RingCorrupted as exc:
            self._fatal_error(
                ConnectionResetError(f"shared-memory pipe corrupted: {exc}"), "pipe corrupted"
            )

    def _deliver_held(self) -> bool:
        """Deliver what ``_hold`` kept; False if the protocol paused again first."""
        held = self._rx_held
        assert held is not None
        while held and not self._paused_reading and not self._lost_called:
            chunk = bytes(held[:READ_CHUNK])
            del held[:READ_CHUNK]
            self._deliver(chunk)
        return not held

    def _read_buffered(self, consumer: Any, limit: int) -> int | None:
        if not consumer.used():  # get_buffer() only when bytes came, as the loops call it
            return 0 if consumer.at_eof() else None
        target = self._get_buffer(-1)
        if target is None:
            return None
        n = consumer.readinto(target[:limit])
        if n:
            self._rx_pos += n
            self._call(self._protocol.buffer_updated, n, what="buffer_updated")  # type: ignore[attr-defined]
        return n  # type: ignore[no-any-return]
