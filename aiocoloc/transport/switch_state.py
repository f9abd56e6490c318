"""The switch state machine of one connection: which path each direction
takes, the switches in flight, and what a peer may announce.  Pure: no I/O,
no clock, no loop (``tests/test_switch_state.py`` runs it without sockets).

Each direction switches on its own.  Our sending direction moves at once
when we announce "my stream continues on <path> from byte N", then waits
for the peer's acknowledgement: until it comes, a further switch is
deferred, or bytes on the new path could overtake the announcement.  The
receiving direction queues the peer's announcements, in order, and takes
each when its bytes reach the announced offset.

Every change of state goes through a table of allowed transitions
(``TX_TRANSITIONS``, ``RX_TRANSITIONS``); anything else is an error: ours
(``RuntimeError``) or the peer's (``ProtocolViolation``).
"""

from __future__ import annotations

import collections
from typing import Any

from aiocoloc.errors import ProtocolViolation

__all__ = [
    "NO_SWITCH",
    "RX_TRANSITIONS",
    "SHM",
    "TCP",
    "TX_TRANSITIONS",
    "SwitchState",
]

TCP, SHM = "tcp", "shm"
#: Our sending direction on its way to a path: moved, not acknowledged yet.
TO_TCP, TO_SHM = "tcp (unacknowledged)", "shm (unacknowledged)"
#: The offset of the next incoming switch while none is pending: past any stream.
NO_SWITCH = 1 << 62

#: Our sending direction: (state, event) -> next state.
TX_TRANSITIONS: dict[tuple[str, str], str] = {
    (TCP, "announce"): TO_SHM,
    (TO_SHM, "acknowledged"): SHM,
    (SHM, "announce"): TO_TCP,
    (TO_TCP, "acknowledged"): TCP,
}
#: The receiving direction: path -> the only path a switch may lead to.
RX_TRANSITIONS: dict[str, str] = {TCP: SHM, SHM: TCP}
#: The path a sending state carries bytes on.
_PATH = {TCP: TCP, TO_SHM: SHM, SHM: SHM, TO_TCP: TCP}


class SwitchState:
    """Both directions' paths and the switches in flight of one connection."""

    __slots__ = ("_acked_at", "_pending", "_rx", "_tx", "deferred")

    def __init__(self) -> None:
        self._tx = TCP
        self._acked_at: int | None = None  # offset of our unacknowledged switch
        self.deferred: str | None = None  # asked for while one was unacknowledged
        self._rx = TCP
        self._pending: collections.deque[tuple[int, str]] = collections.deque()

    # ------------------------------------------------------------ sending

    @property
    def tx(self) -> str:
        """The path our bytes take now."""
        return _PATH[self._tx]

    @property
    def tx_state(self) -> str:
        """Our sending direction's state: a path, or on its way to one."""
        return self._tx

    @property
    def unacknowledged(self) -> int | None:
        """The offset of our switch the peer has not acknowledged, if any."""
        return self._acked_at

    def _move_tx(self, event: str) -> None:
        new = TX_TRANSITIONS.get((self._tx, event))
        if new is None:
            raise RuntimeError(f"switch state {self._tx!r} does not allow {event!r}")
        self._tx = new

    def announce(self, target: str, offset: int) -> None:
        """We announced that our stream continues on ``target`` from ``offset``."""
        if target != RX_TRANSITIONS[self.tx]:
            raise RuntimeError(f"cannot switch from {self.tx!r} to {target!r}")
        self._move_tx("announce")
        self._acked_at = offset

    def defer(self, target: str) -> None:
        """Switch to ``target`` once the unacknowledged switch is acknowledged."""
        if self._acked_at is None:
            raise RuntimeError("nothing to wait for: switch now")
        self.deferred = target

    def acknowledged(self, offset: Any) -> str | None:
        """The peer acknowledged our switch at ``offset``; returns the
        deferred target, if one is due."""
        if offset != self._acked_at:
            raise ProtocolViolation(f"peer acknowledged an unknown switch {offset!r}")
        if offset is None:
            return None  # nothing in flight, and no offset: nothing to take
        self._move_tx("acknowledged")
        self._acked_at = None
        target, self.deferred = self.deferred, None
        return target if target is not None and target != self.tx else None

    # ------------------------------------------------------------ receiving

    @property
    def rx(self) -> str:
        """The path incoming bytes come from now."""
        return self._rx

    @property
    def next_rx_switch(self) -> int:
        """The offset of the next pending incoming switch (``NO_SWITCH``: none)."""
        return self._pending[0][0] if self._pending else NO_SWITCH

    def announced(self, offset: Any, target: Any, rx_pos: int) -> None:
        """The peer announced that its stream continues on ``target`` from
        ``offset``; ``rx_pos`` bytes were received so far."""
        last_offset, last_target = self._pending[-1] if self._pending else (rx_pos, self._rx)
        if (
            not isinstance(offset, int)
            or RX_TRANSITIONS.get(last_target) != target
            or offset < last_offset
        ):
            raise ProtocolViolation(f"impossible switch to {target!r} at {offset!r}")
        self._pending.append((offset, target))

    def reach(self, rx_pos: int) -> str:
        """Take the pending switches at ``rx_pos``; returns the incoming path."""
        while self._pending and self._pending[0][0] == rx_pos:
            _, self._rx = self._pending.popleft()
        return self._rx
