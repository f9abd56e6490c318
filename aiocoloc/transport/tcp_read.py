"""The TCP read path of a ``SwitchableTransport``: bytes from the loop's own
TCP transport (through the ``TcpAdapter``, ``switchable``) to the protocol,
up to the next announced switch; the backlog of bytes past it; EOF and the
loss of the TCP connection.

A segment's way in is the data path's (``DataPath.tcp_received``, compiled:
in direct mode, TCP alone and the usual protocol, it calls the protocol
itself); what is here runs only around switches, pauses and EOF.
"""

from __future__ import annotations

from aiocoloc.transport.state import TransportState
from aiocoloc.transport.switch_state import NO_SWITCH, TCP

__all__ = ["TcpReadPath"]


class TcpReadPath(TransportState):
    """TCP segments to the protocol, switches respected."""

    def _feed_tcp(self) -> None:
        """Deliver TCP bytes up to the next switch; keep the rest for later.

        TCP bytes past a switch to shared memory belong to a later TCP
        segment (after a switch back) whose announcement may not be here yet.
        """
        while (
            self._rx == TCP
            and self._tcp_backlog
            and not self._paused_reading
            and not self._lost_called
        ):
            n = min(self._rx_switch_at - self._rx_pos, len(self._tcp_backlog))
            if n == 0:
                break
            chunk = bytes(self._tcp_backlog[:n])
            del self._tcp_backlog[:n]
            self._deliver(chunk)
            if self._tx_pos + self._rx_pos >= self._traffic_goal:
                self._check_traffic()
            if self._rx_switch_at == self._rx_pos:
                self._advance_rx()
                return
        self._backlog_paused = len(self._tcp_backlog) > 4 * self._high_water
        self._sync_tcp_reading()
        if (
            self._rx == TCP
            and self._tcp_eof_seen
            and not self._tcp_backlog
            and self._rx_switch_at == NO_SWITCH
            and not self._rx_eof
            and not self._lost_called
        ):
            self._on_rx_eof()

    def _tcp_eof(self) -> None:
        self._tcp_eof_seen = True
        self._feed_tcp()

    def _tcp_lost(self, exc: Exception | None) -> None:
        self._tcp_closed = True
        core = self._core  # (its fields read directly: every connection ends here)
        if core.lost_called:
            return
        self._tcp_dropped = not core.closing
        if core.direct:  # the loop's transport has reported any error already
            self._force_close(exc, now=True)
        elif self._closing:
            self._finish_close(now=True)
        elif exc is not None:
            self._fatal_error(exc, "TCP connection lost")
        elif self._rx == TCP and self._tx == TCP and self._shm is None:
            self._force_close(None, now=True)
        else:
            self._fatal_error(
                ConnectionResetError("TCP connection closed by the peer"), "TCP connection lost"
            )

    def _sync_tcp_reading(self) -> None:
        """Read TCP unless the protocol paused us while TCP is the path, or the
        backlog is full.  While reading from the pipe, pausing the socket
        would only cost system calls (asyncio re-registers it each time)."""
        tcp = self._tcp
        if tcp is None or self._lost_called or self._closing or tcp.is_closing():
            return
        want = not self._backlog_paused and not (self._paused_reading and self._rx == TCP)
        if want != self._tcp_reading:
            self._tcp_reading = want
            if want:
                tcp.resume_reading()
            else:
                tcp.pause_reading()
