"""The state a ``SwitchableTransport``'s parts share, declared once.

The transport is one object composed of mixins, one module per concern
(``switchable`` lists them).  They read and write the attributes declared
here on that one object: a method of the same instance costs nothing more
per call, which the data paths count on.  Only these modules touch them;
every other object (the control link, the resizer, the loop watch, the
connection set-up) goes through methods.

Immutable starting values live on the class: a connection that never
leaves TCP sets only what it changes (set-up cost counts for short
connections).  The methods one part calls on another are declared at the
end, for the type checker only.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiocoloc.notify.spin import AFTER_EMPTY, SpinPolicy
from aiocoloc.transport.loop_watch import NO_TRAFFIC_GOAL, LoopWatch
from aiocoloc.transport.switch_state import NO_SWITCH, TCP, SwitchState

if TYPE_CHECKING:
    from aiocoloc.control import ControlChannel, Message
    from aiocoloc.transport.pipe_write import Resizing
    from aiocoloc.transport.shm_path import ShmPath
    from aiocoloc.transport.switchable import SwitchableTransport

__all__ = ["TransportState"]


class TransportState(asyncio.transports._FlowControlMixin):
    """The attributes of a ``SwitchableTransport``, with their starting values."""

    # Set by __init__.
    _loop: asyncio.AbstractEventLoop
    _protocol: asyncio.BaseProtocol
    _context: contextvars.Context
    _extra: dict[str, Any]
    _buffered: bool  # we copy into the protocol's buffers (get_buffer/buffer_updated)
    _overflow: bytearray  # written, not yet placed in the pipe
    _tcp_backlog: bytearray  # TCP bytes not delivered yet (a later TCP segment)
    _rx_held: bytearray | None = None  # pipe bytes taken while the protocol paused reading
    _close_callbacks: list[Callable[[SwitchableTransport], object]]

    _entered = False  # running in the connection's context already
    # _FlowControlMixin's state: asyncio's default limits, 64 KiB / 16 KiB.
    _protocol_paused = False
    _high_water = 64 * 1024
    _low_water = 16 * 1024
    # Until a shared-memory path is attached, the loop's TCP transport calls
    # the protocol through the TcpAdapter with nothing in between: in its own
    # context and under its own guard, as for any asyncio connection.
    _direct = True
    _tcp: asyncio.Transport | None = None
    _shm: ShmPath | None = None
    _link: ControlChannel | None = None
    # Switching: the state machine (from attach_shm on), and the copies of
    # its answers that the data paths test.
    _switching: SwitchState | None = None
    _tx = TCP  # the path our bytes take
    _rx = TCP  # the path incoming bytes come from
    _rx_switch_at = NO_SWITCH  # stream offset of the next pending incoming switch
    # Sending.
    _tx_pos = 0
    _eof_pending = False  # write_eof() waits for the overflow
    _eof_written = False
    _waiting_space = False
    _woke_peer = False  # we rang the peer since our incoming pipe last ran empty
    _resizing: Resizing | None = None  # our pipe's place in the pool's resizer
    # Receiving.
    _rx_pos = 0
    _backlog_paused = False
    _tcp_reading = True
    _tcp_eof_seen = False
    _rx_eof = False
    _drain_scheduled = False
    _spin: SpinPolicy | None = None
    _spin_handle: asyncio.Handle | None = None
    _rx_asleep = False  # our consumer announced it sleeps
    _slept_at = 0
    _slept_for = AFTER_EMPTY  # what we sleep after: the pipe ran empty, or a write
    # Life cycle.
    _paused_reading = False
    _closing = False
    _tcp_closed = False
    _tcp_dropped = False  # TCP was lost while we were not closing it
    _conn_lost = 0
    _lost_called = False
    _peer_closed_link = False
    _peer_gone = False
    _fallback_reason: str | None = None
    _fallback_detail: str | None = None
    # Traffic: the data paths call _check_traffic once _tx_pos + _rx_pos
    # reaches this (the upgrade's hook, the loop watch: ``loop_watch``).
    _traffic_goal = NO_TRAFFIC_GOAL
    _loop_watch: LoopWatch | None = None
    _nudged = False  # the protocol is paused by us, only to let the loop run
    nudges = 0  # times a writer was paused to let the loop run
    switches = 0  # switches of our sending direction

    if TYPE_CHECKING:
        # What one part calls on another (defined in the module named).

        # contract
        def _in_context(self, fn: Callable[..., Any], *args: Any) -> Any: ...
        def _call(self, callback: Callable[..., Any], *args: Any, what: str) -> Any: ...
        def _callback_failed(self, what: str) -> str: ...
        def _deliver(self, data: bytes | memoryview) -> None: ...
        def _get_buffer(self, sizehint: int) -> memoryview | None: ...
        def _on_rx_eof(self) -> None: ...
        def _maybe_pause_protocol(self) -> None: ...
        def _maybe_resume_protocol(self) -> None: ...
        def _report_failure(self, callback: Callable[[], Any], what: str) -> None: ...
        def _let_loop_run(self) -> None: ...
        def _fatal_error(self, exc: BaseException, message: str) -> None: ...
        def _finish_close(self, now: bool = False) -> None: ...
        def _force_close(self, exc: BaseException | None, now: bool = False) -> None: ...
        def get_write_buffer_size(self) -> int: ...

        # switchable, switching
        def _check_traffic(self) -> None: ...
        def _release_shared_memory(self) -> None: ...
        def _advance_rx(self) -> None: ...
        def _on_control(self, message: Message) -> None: ...
        def _on_link_lost(self, exc: BaseException | None) -> None: ...
        def switch_tx(self, target: str) -> int | None: ...

        # tcp_read, pipe_read
        def _feed_tcp(self) -> None: ...
        def _sync_tcp_reading(self) -> None: ...
        def _schedule_drain(self) -> None: ...
        def _drain(self) -> None: ...
        def _wait_for_bytes(self, trigger: int) -> None: ...

        # write, pipe_write
        def _check_alive(self) -> None: ...
        def _finish_write_eof(self) -> None: ...
        def _ring_peer(self) -> None: ...
        def _ring_peer_after(self, action: Callable[[], None]) -> None: ...
        def _wait_for_space(self) -> None: ...
        def _flush_overflow(self) -> None: ...
