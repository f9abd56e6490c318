"""The state a ``SwitchableTransport``'s parts share, declared once.

The transport is one object composed of mixins, one module per concern
(``switchable`` lists them), plus its hot half, a ``DataPath``
(``data_path``, compiled): what runs for every message, with the fields it
reads.  The mixins read and write the attributes declared here on the
transport; those the data path owns are properties that reach into it
(``_tx_pos`` is ``_core.tx_pos``), which costs a little on the cold paths
and nothing on the hot ones.  Only these modules touch them; every other
object (the control link, the resizer, the loop watch, the connection
set-up) goes through methods.

Immutable starting values of the cold attributes live on the class: a
connection that never leaves TCP sets only what it changes (set-up cost
counts for short connections).  The methods one part calls on another are
declared at the end, for the type checker only.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import operator
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

from aiocoloc import compiled
from aiocoloc.notify.spin import SpinPolicy
from aiocoloc.transport.loop_watch import LoopWatch
from aiocoloc.transport.switch_state import SwitchState

if TYPE_CHECKING:
    from aiocoloc.control import ControlChannel, Message
    from aiocoloc.transport.pipe_write import Resizing
    from aiocoloc.transport.shm_path import ShmPath
    from aiocoloc.transport.switchable import SwitchableTransport

__all__ = ["READ_CHUNK", "DataPath", "TransportState", "load_data_path"]

_log = logging.getLogger("aiocoloc.transport")


def load_data_path() -> ModuleType:
    """The ``data_path`` module: compiled, or its pure-Python source when
    ``AIOCOLOC_NO_EXTENSIONS`` asks for it (``aiocoloc.compiled.load``)."""
    return compiled.load("aiocoloc.transport.data_path")


# Everything else imports the data path from here, so that one module is used.
if TYPE_CHECKING:
    from aiocoloc.transport.data_path import READ_CHUNK, DataPath
else:
    _data_path = load_data_path()
    DataPath, READ_CHUNK = _data_path.DataPath, _data_path.READ_CHUNK


def _field(name: str) -> Any:
    """A transport attribute that lives in its ``DataPath``."""

    def set_field(self: TransportState, value: Any) -> None:
        setattr(self._core, name, value)

    return property(operator.attrgetter("_core." + name), set_field)


class TransportState(asyncio.transports._FlowControlMixin):
    """The attributes of a ``SwitchableTransport``, with their starting values."""

    # Set by __init__.
    _loop: asyncio.AbstractEventLoop
    _core: DataPath  # the hot half, which owns the fields below marked so
    _extra: dict[str, Any]
    _close_callbacks: list[Callable[[SwitchableTransport], object]]

    # _FlowControlMixin's state: asyncio's default limits, 64 KiB / 16 KiB.
    _protocol_paused = False
    _high_water = 64 * 1024
    _low_water = 16 * 1024
    _link: ControlChannel | None = None
    # Switching: the state machine (from attach_shm on); the data paths
    # test copies of its answers (_tx, _rx, _rx_switch_at).
    _switching: SwitchState | None = None
    # Life cycle.
    _tcp_closed = False
    _tcp_dropped = False  # TCP was lost while we were not closing it
    _peer_closed_link = False
    _peer_gone = False
    _fallback_reason: str | None = None
    _fallback_detail: str | None = None
    _backlog_paused = False
    _tcp_reading = True
    _tcp_eof_seen = False
    # Traffic: the data paths call _check_traffic once _tx_pos + _rx_pos
    # reaches _traffic_goal (the upgrade's hook, the loop watch: ``loop_watch``).
    _loop_watch: LoopWatch | None = None
    _nudged = False  # the protocol is paused by us, only to let the loop run
    nudges = 0  # times a writer was paused to let the loop run
    switches = 0  # switches of our sending direction

    # Owned by the data path (``_core``; starting values in DataPath.__init__).
    if TYPE_CHECKING:
        _protocol: asyncio.BaseProtocol
        _context: contextvars.Context
        _buffered: bool  # we copy into the protocol's buffers (get_buffer/buffer_updated)
        # Until a shared-memory path is attached, the loop's TCP transport
        # calls the protocol through the TcpAdapter with nothing in between:
        # in its own context and under its own guard, as for any connection.
        _direct: bool
        _entered: bool  # running in the connection's context already
        _overflow: bytearray  # written, not yet placed in the pipe
        _tcp_backlog: bytearray  # TCP bytes not delivered yet (a later TCP segment)
        _rx_held: bytearray | None  # pipe bytes taken while the protocol paused reading
        _tcp: asyncio.Transport | None
        _shm: ShmPath | None  # (set through _core.set_shm)
        _tx: str  # the path our bytes take
        _rx: str  # the path incoming bytes come from
        _rx_switch_at: int  # stream offset of the next pending incoming switch
        _traffic_goal: int
        _tx_pos: int
        _rx_pos: int
        _eof_pending: bool  # write_eof() waits for the overflow
        _eof_written: bool
        _waiting_space: bool
        _woke_peer: bool  # we rang the peer since our incoming pipe last ran empty
        _resizing: Resizing | None  # our pipe's place in the pool's resizer
        _rx_eof: bool
        _drain_scheduled: bool
        _spin: SpinPolicy | None
        _spin_handle: asyncio.Handle | None
        _rx_asleep: bool  # our consumer announced it sleeps
        _slept_at: int
        _slept_for: int  # what we sleep after: the pipe ran empty, or a write
        _paused_reading: bool
        _closing: bool
        _conn_lost: int
        _lost_called: bool
    else:
        _protocol = _field("protocol")
        _context = _field("context")
        _buffered = _field("buffered")
        _direct = _field("direct")
        _entered = _field("entered")
        _overflow = _field("overflow")
        _tcp_backlog = _field("tcp_backlog")
        _rx_held = _field("rx_held")
        _tcp = _field("tcp")
        _shm = property(operator.attrgetter("_core.shm"), lambda self, v: self._core.set_shm(v))
        _tx = _field("tx")
        _rx = _field("rx")
        _rx_switch_at = _field("rx_switch_at")
        _traffic_goal = _field("traffic_goal")
        _tx_pos = _field("tx_pos")
        _rx_pos = _field("rx_pos")
        _eof_pending = _field("eof_pending")
        _eof_written = _field("eof_written")
        _waiting_space = _field("waiting_space")
        _woke_peer = _field("woke_peer")
        _resizing = _field("resizing")
        _rx_eof = _field("rx_eof")
        _drain_scheduled = _field("drain_scheduled")
        _spin = _field("spin")
        _spin_handle = _field("spin_handle")
        _rx_asleep = _field("rx_asleep")
        _slept_at = _field("slept_at")
        _slept_for = _field("slept_for")
        _paused_reading = _field("paused_reading")
        _closing = _field("closing")
        _conn_lost = _field("conn_lost")
        _lost_called = _field("lost_called")

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

        # write, pipe_write
        def _check_alive(self) -> None: ...
        def _finish_write_eof(self) -> None: ...
        def _ring_peer(self) -> None: ...
        def _ring_peer_after(self, action: Callable[[], None]) -> None: ...
        def _wait_for_space(self) -> None: ...
        def _flush_overflow(self) -> None: ...
