"""``SwitchableTransport``: an asyncio transport whose bytes travel over the TCP
connection it was born with or over a pair of shared-memory pipes, switching
between the two at announced byte offsets without losing or reordering one.

Every connection is a TCP connection first (``docs/architecture.md``).  The
TCP side is the loop's own transport (asyncio's or uvloop's), driven by a
small inner protocol; the shared-memory side is an ``ShmPath`` (our pipe
producer, our pipe consumer, a doorbell).  Each direction switches on its
own: the sender announces over the control channel "my stream continues in
the pipe (or back on TCP) from byte N" and moves on; the receiver delivers
exactly N bytes from the old path, then continues from the new one.  Nothing
is ever injected into the TCP byte stream.

Towards the protocol it behaves as the loop's own TCP transport does
(asyncio's ``selector_events.py``, or uvloop's where the two differ: limits,
messages, what raises once closed; ``tests/conformance``): ``connection_made`` via
``call_soon``, ``connection_lost`` exactly once, ``write`` copies what it
cannot place, writes after close are dropped with asyncio's warning (uvloop
refuses them), flow
control with strictly paired ``pause_writing``/``resume_writing``, half-close,
``BufferedProtocol`` support and the standard guard around callbacks.

Until a shared-memory path is attached (most connections, under the default
policy), the loop's TCP transport calls the protocol through the ``Adopter``
with nothing in between: in the loop transport's context, under its guard,
with its messages.  Short connections pay for little more than one call.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from aiocoloc.control import ControlLink
from aiocoloc.errors import PoolError, RingClosed, RingCorrupted
from aiocoloc.notify.doorbell import ControlDoorbell, Doorbell
from aiocoloc.notify.hub import HubDoorbell
from aiocoloc.notify.spin import AFTER_EMPTY, AFTER_WRITE, SpinConfig, SpinPolicy
from aiocoloc.shm.elastic import ElasticConfig, ElasticProducer
from aiocoloc.shm.resizer import Enrollment, resizer_for
from aiocoloc.transport import fallback
from aiocoloc.transport.tls import let_loop_start_tls

__all__ = ["Adopter", "ShmPath", "SwitchableTransport", "attach_shared_memory", "open_transport"]

_log = logging.getLogger("aiocoloc.transport")

#: asyncio's threshold for warning about writes to a lost connection.
LOG_THRESHOLD_FOR_CONNLOST_WRITES = 5
#: Bytes moved from a pipe to the protocol before yielding to the loop.
DRAIN_BUDGET = 4 << 20
#: Largest chunk handed to ``Protocol.data_received``.
READ_CHUNK = 256 * 1024

TCP, SHM = "tcp", "shm"
#: ``_traffic_goal`` when no hook waits: more bytes than a connection moves.
NO_TRAFFIC_GOAL = 1 << 62
#: While the loop is watched (``watch_loop``), the write and read paths look
#: at it every so many bytes of traffic: adapted between these bounds so that
#: looks come about four per watch period, whatever the write size.
WATCH_STEP_MIN = 4 * 1024
WATCH_STEP_MAX = 1 << 20


class ShmPath:
    """The shared-memory side of a connection.

    ``producer`` writes our outgoing pipe, ``consumer`` reads the incoming
    one (``aiocoloc.ring`` pipe or ring ends); ``doorbell`` wakes the peer and
    wakes us (the connection's own, or its share of a hub, ``aiocoloc.notify.hub``).
    ``on_close(incoming_done, outgoing_done)`` runs once when the
    transport is done with them, to return pipes to their pool: a pipe may
    be freed only when the other side is done with it too (it closed its
    end, or it is gone), else a write or read racing with the free could
    touch slices another pipe already reuses.  So the side that closes last
    frees both.
    """

    def __init__(
        self,
        producer: Any,
        consumer: Any,
        doorbell: Doorbell | ControlDoorbell | HubDoorbell,
        *,
        pool_id: str | None = None,
        on_close: Callable[[bool, bool], None] | None = None,
        resizer: ElasticProducer | None = None,
        spin: SpinConfig | None = None,
    ) -> None:
        self.producer = producer
        self.spin = spin  # busy-wait policy of the reader (None: always sleep)
        self.resizer = resizer  # grows/shrinks the outgoing pipe, if elastic
        self.consumer = consumer
        self.doorbell = doorbell
        self.pool_id = pool_id
        self._on_close = on_close
        self.closed = False

    def close(self, peer_gone: bool = False) -> None:
        """Release the pipe ends and the doorbell.  Idempotent."""
        if self.closed:
            return
        self.closed = True
        outgoing_done = close_end(self.producer) or peer_gone
        incoming_done = close_end(self.consumer) or peer_gone
        self.doorbell.close()
        if self._on_close is not None:
            self._on_close(incoming_done, outgoing_done)


def close_end(end: Any) -> bool:
    """Close and release one pipe end; True if the peer is done with the pipe.

    Our end is closed *before* we look at the peer's: when both sides close
    at once, both then see the other's flag and both free the pipe (the
    second free fails harmlessly on the generation), where looking first
    could let both miss it and leak the pipe.
    """
    if end.released:
        return False
    done = False
    if not end.corrupted:
        end.close()
        done = bool(end.peer_closed)
    end.release()
    return done


def reads_into_buffers(loop: asyncio.AbstractEventLoop, protocol: Any) -> bool:
    """Whether the loop's own transport would call ``get_buffer``/``buffer_updated``:
    asyncio's for a ``BufferedProtocol``; uvloop's also for any protocol with
    ``get_buffer`` that is not an ``asyncio.Protocol``."""
    if isinstance(protocol, asyncio.BufferedProtocol):
        return True
    return (
        not isinstance(protocol, asyncio.Protocol)
        and hasattr(protocol, "get_buffer")
        and not isinstance(loop, asyncio.BaseEventLoop)
    )


class SwitchableTransport(asyncio.transports._FlowControlMixin):
    """A TCP connection that can carry its bytes through shared memory.

    An ``asyncio.Transport``; built on asyncio's flow-control mixin, which
    ``loop.sendfile()``'s fallback (aiohttp's ``FileResponse``) requires.
    """

    _start_tls_compatible = True
    _sendfile_compatible = asyncio.constants._SendfileMode.FALLBACK

    # Immutable starting values live on the class: a connection that never
    # leaves TCP sets only what it changes (connection set-up cost counts for
    # short connections).
    _entered = False
    # _FlowControlMixin's state: asyncio's default limits, 64 KiB / 16 KiB.
    _protocol_paused = False
    _high_water = 64 * 1024
    _low_water = 16 * 1024
    # Until a shared-memory path is attached, the loop's TCP transport calls
    # the protocol through the Adopter with nothing in between: in its own
    # context and under its own guard, as for any asyncio connection.
    _direct = True
    _tcp: asyncio.Transport | None = None
    _shm: ShmPath | None = None
    _link: ControlLink | None = None
    # Sending.
    _tx = TCP
    _tx_pos = 0
    _eof_pending = False  # write_eof() waits for the overflow
    _eof_written = False
    _waiting_space = False
    _unacked_switch: int | None = None  # offset the peer has not acknowledged
    _deferred_switch: str | None = None  # asked for while one was unacknowledged
    # Receiving.
    _rx = TCP
    _rx_pos = 0
    _backlog_paused = False
    _tcp_reading = True
    _tcp_eof_seen = False
    _rx_eof = False
    _drain_scheduled = False
    _spin: SpinPolicy | None = None
    _spin_handle: asyncio.Handle | None = None
    _rx_asleep = False  # our consumer announced it sleeps
    _rang = False  # we woke the peer since the pipe last ran empty
    _slept_at = 0
    _slept_for = AFTER_EMPTY  # what we sleep after: the pipe ran empty, or a write
    _tick_handle: Enrollment | None = None  # our pipe's place in the pool's resizer
    # Life cycle.
    _paused_reading = False
    _closing = False
    _tcp_closed = False
    _conn_lost = 0
    _lost_called = False
    _fallback_reason: str | None = None
    _fallback_detail: str | None = None
    _traffic_goal = NO_TRAFFIC_GOAL  # _check_traffic once this many bytes moved
    _hook_goal = NO_TRAFFIC_GOAL  # call _on_traffic once this many bytes moved
    _on_traffic: Callable[[], None] | None = None
    _hook_watch: float | None = None  # watch_loop() period from the hook on
    # Keeping the event loop turning (watch_loop).
    _watch_ns = 0  # 0: not watched; else how long a writer may starve the loop
    _watch_goal = NO_TRAFFIC_GOAL  # traffic at which to look next
    _watch_step = WATCH_STEP_MIN
    _watch_looked = 0  # monotonic ns of the last look
    _watch_since = 0  # monotonic ns when the pending marker was queued
    _watch_marker: asyncio.Handle | None = None  # runs when the loop turns
    _nudged = False  # the protocol is paused by us, only to let the loop run
    nudges = 0  # times a writer was paused to let the loop run
    _peer_closed_link = False
    _peer_gone = False
    switches = 0

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        protocol: asyncio.BaseProtocol,
        *,
        extra: dict[str, Any] | None = None,
    ) -> None:
        # _FlowControlMixin's __init__ is not called: its state starts as the
        # class attributes below (asyncio's default limits), which saves three
        # calls on every connection.
        self._extra = {} if extra is None else extra
        self._loop = loop
        self._context = contextvars.copy_context()
        self._protocol: asyncio.BaseProtocol = protocol
        # (The usual protocol answers the first test: no call per connection.)
        self._buffered = not isinstance(protocol, asyncio.Protocol) and reads_into_buffers(
            loop, protocol
        )
        self._direct = not self._buffered
        self._overflow = bytearray()
        self._tcp_backlog = bytearray()  # TCP bytes not delivered yet (a later TCP segment)
        self._rx_switches: collections.deque[tuple[int, str]] = collections.deque()
        self._close_callbacks: list[Callable[[SwitchableTransport], object]] = []
        self._early_control: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ set-up

    def attach_shm(self, path: ShmPath, link: ControlLink) -> None:
        """Give the transport its shared-memory path and control channel."""
        if self._shm is not None:
            raise RuntimeError("a shared-memory path is already attached")
        if self._lost_called:  # closed while the path was being set up
            link.close()
            path.close()
            return
        self._shm = path
        self._link = link
        self._direct = False  # from now on, every callback goes through _call
        vars(self).pop("is_closing", None)  # ours again (see Adopter.connection_made)
        if path.spin is not None:
            self._spin = SpinPolicy(path.spin)
        path.doorbell.listen(self._loop, self._on_doorbell, self._may_be_rung)
        if path.resizer is not None:  # an idle new pipe gives its first slices back
            self._start_resize_timer()
        early, self._early_control = self._early_control, []
        for message in early:
            self._on_control(message)

    # ------------------------------------------------------ protocol calls

    def _in_context(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` in the connection's context (entered once, not re-entered)."""
        if self._entered:
            return fn(*args)
        self._entered = True
        try:
            return self._context.run(fn, *args)
        finally:
            self._entered = False

    def _call(self, callback: Callable[..., Any], *args: Any, what: str) -> Any:
        """Run a protocol callback in the connection's context, with asyncio's guard."""
        try:
            return self._in_context(callback, *args)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, self._callback_failed(what))
            return None

    def _callback_failed(self, what: str) -> str:
        """What the loop's own transport says when a protocol callback raised."""
        if isinstance(self._loop, asyncio.BaseEventLoop):
            return f"Fatal error: protocol.{what}() call failed."
        return f"Fatal error on transport {type(self).__name__}"  # uvloop's words

    # ------------------------------------------------------------ switching

    @property
    def mode(self) -> str:
        """``"shm"`` when our outgoing bytes go through shared memory, else ``"tcp"``."""
        return self._tx

    def switch_tx(self, target: str) -> int | None:
        """Send our stream on ``target`` (``"shm"`` or ``"tcp"``) from now on.

        Announces the byte offset where the old path ends and returns it.
        Switches are serialised: until the peer has acknowledged the previous
        announcement (one control round trip), a new switch is deferred --
        taken when the acknowledgement arrives -- and ``None`` is returned.
        Otherwise bytes on the new path could overtake the announcement and
        the peer could not tell where the old path's bytes end.
        """
        if target not in (TCP, SHM):
            raise ValueError(f"unknown path {target!r}")
        if self._shm is None or self._link is None:
            raise RuntimeError("no shared-memory path is attached")
        if self._eof_written or self._eof_pending:
            raise RuntimeError("cannot switch after write_eof()")
        if self._closing:
            raise RuntimeError("cannot switch a closing transport")
        if self._unacked_switch is not None:
            self._deferred_switch = target
            return None
        if target == self._tx:
            return self._tx_pos
        if target == SHM:
            offset = self._tx_pos
            self._link.send({"op": "switch", "offset": offset, "to": SHM})
            self._tx = SHM
        else:
            offset = self._tx_pos - len(self._overflow)  # the pipe ends here
            self._link.send({"op": "switch", "offset": offset, "to": TCP})
            self._tx = TCP
            if self._overflow:
                assert self._tcp is not None
                self._tcp.write(bytes(self._overflow))
                self._overflow.clear()
            self._waiting_space = False
        self._unacked_switch = offset
        self.switches += 1
        return offset

    def _on_control(self, message: dict[str, Any]) -> None:
        if self._shm is None:  # the link delivers before attach_shm() returned
            self._early_control.append(message)
            return
        op = message.get("op")
        if op == "switch-ack":
            self._on_switch_ack(message.get("offset"))
            return
        if op == "bell":
            doorbell = self._shm.doorbell
            if isinstance(doorbell, ControlDoorbell):
                doorbell.on_ring()
            return
        if op == "close":
            self._peer_closed_link = True  # a graceful close: its loss is no error
            return
        if op != "switch":
            return
        offset, target = message.get("offset"), message.get("to")
        last_offset, last_target = (
            self._rx_switches[-1] if self._rx_switches else (self._rx_pos, self._rx)
        )
        if (
            not isinstance(offset, int)
            or target not in (TCP, SHM)
            or target == last_target
            or offset < last_offset
        ):
            self._fatal_error(
                ConnectionResetError(f"peer announced an impossible switch: {message!r:.80}"),
                "protocol violation",
            )
            return
        self._rx_switches.append((offset, target))
        assert self._link is not None
        try:
            self._link.send({"op": "switch-ack", "offset": offset})
        except ConnectionResetError:
            pass  # reported by the link's own loss
        self._advance_rx()

    def _on_switch_ack(self, offset: Any) -> None:
        if offset != self._unacked_switch:
            self._fatal_error(
                ConnectionResetError(f"peer acknowledged an unknown switch {offset!r}"),
                "protocol violation",
            )
            return
        self._unacked_switch = None
        target, self._deferred_switch = self._deferred_switch, None
        if target is not None and target != self._tx and not self._lost_called:
            if not (self._eof_written or self._eof_pending):
                self.switch_tx(target)

    def _next_switch_room(self) -> int | None:
        """Bytes the current path may still deliver before the next switch."""
        if not self._rx_switches:
            return None
        return self._rx_switches[0][0] - self._rx_pos

    def _advance_rx(self) -> None:
        """Take pending switches whose offset is reached, then feed the new path."""
        while self._rx_switches and self._rx_switches[0][0] == self._rx_pos:
            _, self._rx = self._rx_switches.popleft()
        self._sync_tcp_reading()
        if self._rx == SHM:
            self._schedule_drain()
        else:
            self._feed_tcp()

    def _on_link_lost(self, exc: BaseException | None) -> None:
        if self._lost_called or self._closing or self._peer_closed_link:
            return
        if self._tx == SHM or self._rx == SHM or self._rx_switches:
            self._peer_gone = True
            self._fatal_error(
                ConnectionResetError("the peer's control channel closed (peer process or VM gone)"),
                "peer lost",
            )
            return
        # Both directions still on TCP: the connection goes on without shared memory.
        shm, self._shm, self._link = self._shm, None, None
        if shm is not None:
            shm.close()
        fallback.record(self, fallback.PROTOCOL_ERROR, f"control channel lost: {exc}")

    # ------------------------------------------------------------ writing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            data = self._other_data(data)
        if self._eof_written or self._eof_pending:
            raise RuntimeError("Cannot call write() after write_eof()")
        if not data:
            return
        if self._conn_lost:
            self._check_alive()
            if self._tx == TCP and self._tcp is not None:
                self._tcp.write(data)  # dropped and counted by the loop's transport
                return
            if self._conn_lost >= LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                _log.warning("socket.send() raised exception.")
            self._conn_lost += 1
            return
        size = len(data) if type(data) is bytes else memoryview(data).nbytes
        self._tx_pos += size
        if self._tx == TCP:
            assert self._tcp is not None
            self._tcp.write(data)  # its pause_writing reaches us through the Adopter
            if self._overflow:
                self._maybe_pause_protocol()
            if self._tx_pos + self._rx_pos >= self._traffic_goal:
                self._check_traffic()
            return
        assert self._shm is not None
        if not self._overflow:
            try:
                written = self._shm.producer.write(data)
            except (RingClosed, RingCorrupted) as exc:
                self._fatal_error(
                    ConnectionResetError(f"shared-memory pipe failed: {exc}"), "pipe write failed"
                )
                return
            if written:
                if self._tick_handle is None and self._shm.resizer is not None:
                    self._start_resize_timer()
                if self._shm.producer.wake_needed():  # the reader sleeps: ring it
                    self._shm.doorbell.ring()
                    self._rang = True
                if self._rx_asleep:  # a reply may be on its way: watch for it
                    self._slept_at = time.monotonic_ns()  # a reply soon re-arms spinning
                    self._slept_for = AFTER_WRITE
                    self._rest(AFTER_WRITE)
            if written == size:
                return
            self._overflow += memoryview(data).cast("B")[written:]
        else:
            self._overflow += data
        self._wait_for_space()
        self._maybe_pause_protocol()

    def writelines(self, list_of_data: Any) -> None:
        if isinstance(self._loop, asyncio.BaseEventLoop):
            # asyncio's transport joins them (one write, and its TypeError).
            self.write(b"".join(list_of_data))
            return
        self._check_alive()  # uvloop's: each buffer in turn, with its messages
        if self._eof_written or self._eof_pending:
            raise RuntimeError("Cannot call writelines() after write_eof()")
        for data in list_of_data:
            self.write(data)

    def _other_data(self, data: Any) -> bytes | memoryview:
        """What the loop's own transport makes of a write that is not bytes,
        bytearray or memoryview: asyncio's refuses it; uvloop's ignores an
        empty one and takes any other buffer (``memoryview``'s TypeError else)."""
        if isinstance(self._loop, asyncio.BaseEventLoop):
            raise TypeError(
                f"data argument must be a bytes-like object, not {type(data).__name__!r}"
            )
        if not data:
            return b""
        return memoryview(data).cast("B")

    def _check_alive(self) -> None:
        """uvloop's transports refuse writes and limits once closed (asyncio's
        drop writes with a warning): on uvloop, so do we."""
        if self._lost_called and not isinstance(self._loop, asyncio.BaseEventLoop):
            raise RuntimeError(f"unable to perform operation on {self!r}; the handler is closed")

    def _after_pipe_write(self) -> None:
        if self._tick_handle is None and self._shm is not None and self._shm.resizer is not None:
            self._start_resize_timer()
        self._ring_bell()

    def _start_resize_timer(self) -> None:
        """Have the pool's resizer on this loop follow our outgoing pipe while
        it is busy or settling (one timer per pool, not one per pipe)."""
        shm = self._shm
        if shm is None or shm.resizer is None or shm.closed or self._lost_called:
            return
        resizer = shm.resizer
        self._tick_handle = resizer_for(resizer.pool, self._loop, resizer.config).enroll(
            resizer, self._resize_stopped
        )

    def _resize_stopped(self) -> None:
        """The pipe is idle at its share: the next write enrolls it again."""
        self._tick_handle = None

    def _ring_bell(self) -> None:
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
                self._rang = True
        except (RingCorrupted, ValueError):
            pass  # reported by the next write

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

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self._check_alive()
        if self._eof_written or self._eof_pending or self._closing:
            return
        if self._tx == SHM and self._overflow:
            self._eof_pending = True
            return
        self._eof_pending = True
        self._finish_write_eof()

    def _finish_write_eof(self) -> None:
        self._eof_pending = False
        self._eof_written = True
        if self._tx == TCP:
            assert self._tcp is not None
            self._tcp.write_eof()
        else:
            assert self._shm is not None
            self._ring_bell_after(lambda: self._shm.producer.close())  # type: ignore[union-attr]

    def _ring_bell_after(self, action: Callable[[], None]) -> None:
        try:
            action()
        except (RingCorrupted, ValueError):
            pass
        self._ring_bell()

    # -------------------------------------------------- write flow control

    def get_write_buffer_size(self) -> int:
        inner = self._tcp.get_write_buffer_size() if self._tcp is not None else 0
        return inner + len(self._overflow)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        if self._tcp is not None:  # they pause us on TCP (uvloop's low mark is 16 bytes)
            return self._tcp.get_write_buffer_limits()
        return (self._low_water, self._high_water)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._tcp is not None:
            # The loop's transport checks them and rounds them its way (its
            # errors, its RuntimeError once closed on uvloop): we follow it.
            self._tcp.set_write_buffer_limits(high, low)
            self._low_water, self._high_water = self._tcp.get_write_buffer_limits()
        else:
            if high is None:
                high = 64 * 1024 if low is None else 4 * low
            if low is None:
                low = high // 4
            if not high >= low >= 0:
                raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
            self._high_water, self._low_water = high, low
        self._maybe_pause_protocol()
        self._maybe_resume_protocol()

    def _maybe_pause_protocol(self) -> None:
        if self._protocol_paused or self.get_write_buffer_size() <= self._high_water:
            return
        self._protocol_paused = True
        self._report_failure(self._protocol.pause_writing, "pause_writing")

    def _maybe_resume_protocol(self) -> None:
        if not self._protocol_paused or self.get_write_buffer_size() > self._low_water:
            return
        self._protocol_paused = False
        self._report_failure(self._protocol.resume_writing, "resume_writing")

    def _report_failure(self, callback: Callable[[], Any], what: str) -> None:
        """Flow-control callbacks that raise are reported, not fatal (as asyncio's
        and uvloop's transports do)."""
        try:
            self._in_context(callback)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._loop.call_exception_handler(
                {
                    "message": f"protocol.{what}() failed",
                    "exception": exc,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )

    # ------------------------------------------------------------ hooks

    def call_after_traffic(
        self, nbytes: int, callback: Callable[[], None], *, watch: float | None = None
    ) -> None:
        """Call ``callback`` (once, soon) when ``nbytes`` have been written and
        received in all; at once if they already have.  One hook at a time.
        With ``watch``, ``watch_loop(watch)`` starts when the goal is reached,
        so the callback runs even if the application never yields."""
        self._hook_goal, self._on_traffic, self._hook_watch = nbytes, callback, watch
        self._traffic_goal = min(nbytes, self._watch_goal)
        if self._tx_pos + self._rx_pos >= self._traffic_goal:
            self._check_traffic()

    def _check_traffic(self) -> None:
        """Run what waits for traffic: the hook, a look at the loop (callers
        test first on hot paths: ``_tx_pos + _rx_pos >= _traffic_goal``)."""
        moved = self._tx_pos + self._rx_pos
        callback = self._on_traffic
        if callback is not None and moved >= self._hook_goal:
            self._hook_goal, self._on_traffic = NO_TRAFFIC_GOAL, None
            if self._hook_watch is not None:
                self.watch_loop(self._hook_watch)
            self._loop.call_soon(callback, context=self._context)
        if moved >= self._watch_goal:
            self._look_at_loop(moved)
        self._traffic_goal = min(self._hook_goal, self._watch_goal)

    # ------------------------------------------------- keeping the loop turning

    def watch_loop(self, period: float | None) -> None:
        """Keep the event loop turning for work this connection waits for
        (an upgrade's handshake), whatever the application's loop shape.

        ``write(); await drain()`` never yields while the transport is not
        paused, so a bulk writer can starve the loop for good.  While
        watched, the traffic paths look every few KiB whether the loop ran
        since the last look (a marker callback); a writer that kept it from
        running for ``period`` seconds gets one ``pause_writing`` and, on the
        next loop iteration, ``resume_writing``: its ``drain()`` yields once.
        An application that yields by itself is never paused.  ``None``
        stops watching.  Nothing is added to the traffic paths: the looks
        share the traffic-goal test that they already make.
        """
        if period is None or self._lost_called:
            self._watch_ns, self._watch_goal = 0, NO_TRAFFIC_GOAL
            self._traffic_goal = self._hook_goal
            if self._watch_marker is not None:
                self._watch_marker.cancel()
                self._watch_marker = None
            return
        self._watch_ns = max(int(period * 1e9), 1)
        if self._watch_goal == NO_TRAFFIC_GOAL:
            # Nothing else until the first look: a server watches every
            # connection it accepts, and most are short.
            self._watch_looked = 0
            self._watch_goal = self._tx_pos + self._rx_pos + self._watch_step
            self._traffic_goal = min(self._hook_goal, self._watch_goal)

    def _loop_turned(self) -> None:
        self._watch_marker = None

    def _look_at_loop(self, moved: int) -> None:
        now = time.monotonic_ns()
        period = self._watch_ns
        if self._watch_marker is None:  # the loop ran since the last look (or first look)
            self._watch_since = now
            self._watch_marker = self._loop.call_soon(self._loop_turned)
        elif now - self._watch_since >= period:  # starved for a whole period
            self._let_loop_run()
            self._watch_since = now
        # Look about four times a period: the step follows the write rate.
        if self._watch_looked:
            elapsed = now - self._watch_looked
            if elapsed < period // 8 and self._watch_step < WATCH_STEP_MAX:
                self._watch_step *= 2
            elif elapsed > period // 2 and self._watch_step > WATCH_STEP_MIN:
                self._watch_step //= 2
        self._watch_looked = now
        self._watch_goal = moved + self._watch_step

    def _let_loop_run(self) -> None:
        """Pause the protocol until the next loop iteration: its drain() yields."""
        if self._protocol_paused or self._closing:
            return  # drain() waits already, or nothing is left to wait for
        self.nudges += 1
        self._protocol_paused = self._nudged = True
        self._report_failure(self._protocol.pause_writing, "pause_writing")
        self._loop.call_soon(self._end_nudge)

    def _end_nudge(self) -> None:
        if not self._nudged:
            return
        self._nudged = False
        # Unless the buffers filled meanwhile: then flow control resumes as usual.
        if (
            self._protocol_paused
            and not self._lost_called
            and self.get_write_buffer_size() <= self._high_water
        ):
            self._protocol_paused = False
            self._report_failure(self._protocol.resume_writing, "resume_writing")

    def add_close_callback(self, callback: Callable[[SwitchableTransport], object]) -> None:
        """Call ``callback(transport)`` right after ``connection_lost``."""
        self._close_callbacks.append(callback)

    def note_fallback(self, reason: str, detail: str | None = None) -> None:
        """Record why this connection stays on (or went back to) TCP."""
        self._fallback_reason, self._fallback_detail = reason, detail

    @property
    def tx_finished(self) -> bool:
        """True once ``write_eof()`` was called: our direction carries no more bytes."""
        return self._eof_written or self._eof_pending

    @property
    def rx_mode(self) -> str:
        """The path incoming bytes currently come from."""
        return self._rx

    # ------------------------------------------------------------ reading

    def _tcp_data(self, data: bytes) -> None:
        if self._lost_called:
            return
        if self._rx == TCP and not (self._rx_switches or self._tcp_backlog or self._paused_reading):
            self._deliver(data)  # the common case: straight through, no copy
            if self._tx_pos + self._rx_pos >= self._traffic_goal:
                self._check_traffic()
            return
        self._tcp_backlog += data
        self._feed_tcp()

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
            room = self._next_switch_room()
            n = len(self._tcp_backlog) if room is None else min(room, len(self._tcp_backlog))
            if n == 0:
                break
            chunk = bytes(self._tcp_backlog[:n])
            del self._tcp_backlog[:n]
            self._deliver(chunk)
            if self._tx_pos + self._rx_pos >= self._traffic_goal:
                self._check_traffic()
            if self._rx_switches and self._rx_switches[0][0] == self._rx_pos:
                self._advance_rx()
                return
        self._backlog_paused = len(self._tcp_backlog) > 4 * self._high_water
        self._sync_tcp_reading()
        if (
            self._rx == TCP
            and self._tcp_eof_seen
            and not self._tcp_backlog
            and not self._rx_switches
            and not self._rx_eof
            and not self._lost_called
        ):
            self._on_rx_eof()

    def _deliver(self, data: bytes | memoryview) -> None:
        self._rx_pos += len(data)
        if self._buffered:
            view = memoryview(data)
            while view and not self._lost_called:
                target = self._get_buffer(len(view))
                if target is None:
                    return
                n = min(len(target), len(view))
                target[:n] = view[:n]
                view = view[n:]
                self._call(self._protocol.buffer_updated, n, what="buffer_updated")  # type: ignore[attr-defined]
        else:
            if type(data) is not bytes:
                data = bytes(data)
            try:  # (free in 3.11 unless raised) a protocol without one fails as on the loop's
                data_received = self._protocol.data_received  # type: ignore[attr-defined]
            except AttributeError as exc:
                self._fatal_error(exc, self._callback_failed("data_received"))
                return
            self._call(data_received, data, what="data_received")

    def _on_doorbell(self) -> None:
        self._in_context(self._woken)

    def _may_be_rung(self) -> bool:
        """For a hub (a doorbell shared with other connections): whether a
        ring may be for us -- our reader sleeps and its writer rang (took
        the flag) or bytes or EOF came; or our writer waits and its reader
        rang or room came.  The others stay asleep, flags set.  (A taken
        flag wakes us even when a drain already took the bytes: ``_rest``
        leaves a reader that still counts as asleep alone, and a ring that
        is not followed by a wake-up would leave it so with no flag set.)"""
        shm = self._shm
        if shm is None or shm.closed:
            return False
        try:
            if self._rx_asleep and shm.consumer.sleep_over():
                return True
            return self._waiting_space and bool(shm.producer.wait_over())
        except (RingCorrupted, ValueError):
            return True  # the wake-up's read or write reports it

    def _woken(self) -> None:
        if self._rx_asleep:
            self._rx_asleep = False
            # A hub may wake us before our writer cleared the flag: withdraw
            # it, or the writer would ring once more for nothing.  (Safe: we
            # drain now, and the next prepare_sleep re-checks the pipe.)
            try:
                self._shm.consumer.cancel_sleep()  # type: ignore[union-attr]
            except (RingCorrupted, ValueError):
                pass  # reported by the drain
            if self._spin is not None:
                self._spin.woken_after(self._slept_for, time.monotonic_ns() - self._slept_at)
        if self._overflow and self._tx == SHM:
            self._flush_overflow()
        if self._rx == SHM:
            self._drain()

    def _schedule_drain(self) -> None:
        if not self._drain_scheduled:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain_soon)

    def _drain_soon(self) -> None:
        self._drain_scheduled = False
        if self._rx == SHM:
            self._drain()

    def _drain(self) -> None:
        """Move bytes from the incoming pipe to the protocol."""
        shm = self._shm
        if shm is None or shm.closed or self._paused_reading or self._rx_eof or self._lost_called:
            return
        consumer = shm.consumer
        moved = 0
        self._rang = False
        try:
            while moved < DRAIN_BUDGET and not self._paused_reading and not self._lost_called:
                limit = READ_CHUNK
                room = self._next_switch_room()
                if room is not None:
                    limit = min(limit, room)
                    if limit == 0:
                        self._advance_rx()
                        return
                if self._buffered:
                    n = self._read_buffered(consumer, limit)
                    if n is None:
                        break
                    if n == 0:
                        self._on_rx_eof()
                        return
                    moved += n
                else:
                    data = consumer.read(limit)
                    if data is None:
                        break
                    if not data:
                        self._on_rx_eof()
                        return
                    moved += len(data)
                    self._deliver(data)
                if shm.closed:
                    return  # the protocol closed us from its callback
                if consumer.wake_needed():
                    shm.doorbell.ring()  # the producer waits for the space we freed
                    self._rang = True
            else:
                if moved >= DRAIN_BUDGET:
                    self._schedule_drain()  # let other callbacks run, then go on
                return
            if shm.closed:
                return  # get_buffer() failed: the pipes are gone
            self._rest(AFTER_EMPTY)
        except RingCorrupted as exc:
            self._fatal_error(
                ConnectionResetError(f"shared-memory pipe corrupted: {exc}"), "pipe corrupted"
            )

    def _rest(self, trigger: int) -> None:
        """The incoming pipe is empty: watch it a little while if that pays
        (``aiocoloc.notify.spin``), else sleep until rung."""
        policy, shm = self._spin, self._shm
        assert shm is not None
        rang, self._rang = self._rang, False
        if (
            policy is not None
            and policy.alone(self._loop)  # (notes that we rest, whatever comes next)
            and self._spin_handle is None
            and policy.wants(trigger)
            # The peer we just woke may be placed on our CPU: leave it free,
            # but for a probe now and then.
            and (not rang or policy.may_spin_after_ring(trigger))
            and policy.claim(self._loop)
        ):
            if self._rx_asleep:
                self._rx_asleep = False
                shm.consumer.cancel_sleep()  # awake: the writer need not ring
            # A probe is judged against the wake-ups after the same trigger:
            # from our write, or from the pipe running empty (now).
            probe_from = 0
            if rang:
                probe_from = self._slept_at if trigger == AFTER_WRITE else time.monotonic_ns()
            # After the callbacks already queued: a task that wants to write
            # first (the next request) does so before we wait for the reply.
            self._spin_handle = self._loop.call_soon(self._spin_wait, trigger, probe_from)
        elif not self._rx_asleep:
            self._sleep()

    def _sleep(self) -> None:
        """Sleep until rung, unless data slipped in meanwhile."""
        assert self._shm is not None
        if self._shm.consumer.prepare_sleep():
            self._rx_asleep = True
            self._slept_at = time.monotonic_ns()
            self._slept_for = AFTER_EMPTY
        else:
            self._schedule_drain()

    def _spin_wait(self, trigger: int, probe_from: int) -> None:
        policy, shm = self._spin, self._shm
        assert policy is not None
        self._spin_handle = None
        policy.release(self._loop)
        if shm is None or shm.closed or self._rx != SHM or self._lost_called:
            return
        if self._paused_reading or self._rx_eof:
            return  # resume_reading drains; nothing more comes after EOF
        try:
            found = shm.consumer.spin_until_readable(policy.config.max_ns)
            policy.record(trigger, found)
            if probe_from:
                policy.probed(trigger, time.monotonic_ns() - probe_from if found else None)
            if found:
                self._drain()
            else:
                self._sleep()
        except RingCorrupted as exc:
            self._fatal_error(
                ConnectionResetError(f"shared-memory pipe corrupted: {exc}"), "pipe corrupted"
            )

    def _get_buffer(self, sizehint: int) -> memoryview | None:
        """The protocol's buffer as bytes; None after a fatal error (asyncio's
        transport reports the protocol's exception, uvloop's its own)."""
        try:
            buf = self._in_context(self._protocol.get_buffer, sizehint)  # type: ignore[attr-defined]
            target = memoryview(buf).cast("B")
            if not len(target):
                raise RuntimeError("get_buffer() returned an empty buffer")
            return target
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            error = exc
            if not isinstance(self._loop, asyncio.BaseEventLoop):
                error = RuntimeError("unhandled error (or an empty buffer) in get_buffer()")
            self._fatal_error(error, self._callback_failed("get_buffer"))
            return None

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

    def _on_rx_eof(self) -> None:
        self._rx_eof = True
        keep_open = self._call(self._protocol.eof_received, what="eof_received")  # type: ignore[attr-defined]
        if not keep_open and not self._lost_called:
            self.close()

    def _tcp_eof(self) -> None:
        self._tcp_eof_seen = True
        self._feed_tcp()

    def _tcp_lost(self, exc: Exception | None) -> None:
        self._tcp_closed = True
        if self._lost_called:
            return
        if self._direct:  # the loop's transport has reported any error already
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

    def pause_reading(self) -> None:
        if self._closing or self._paused_reading:
            return
        self._paused_reading = True
        self._sync_tcp_reading()

    def resume_reading(self) -> None:
        if self._closing or not self._paused_reading:
            return
        self._paused_reading = False
        self._sync_tcp_reading()
        if self._rx == SHM:
            self._schedule_drain()
        else:
            self._loop.call_soon(self._feed_tcp)

    def is_reading(self) -> bool:
        if self._paused_reading or self._closing:
            return False
        # uvloop's transport stops reading at EOF (libuv does); asyncio's reads on.
        return not self._rx_eof or isinstance(self._loop, asyncio.BaseEventLoop)

    # ------------------------------------------------------------ protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        self._buffered = reads_into_buffers(self._loop, protocol)
        if self._buffered:  # we copy into its buffers: no direct calls
            self._direct = False

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "aiocoloc":
            return {
                "mode": self._tx,
                "rx_mode": self._rx,
                "pool": self._shm.pool_id if self._shm is not None else None,
                "fallback_reason": self._fallback_reason,
                "fallback_detail": self._fallback_detail,
                "switches": self.switches,
            }
        extra: dict[str, Any] = self._extra
        if name in extra:
            return extra[name]
        if self._tcp is not None:
            return self._tcp.get_extra_info(name, default)
        return default

    # ------------------------------------------------------------ closing

    def is_closing(self) -> bool:
        # The loop's TCP transport may have failed (a send met EPIPE or a
        # reset) with its connection_lost still queued: StreamWriter.drain()
        # yields only when this says so, so a write()/drain() loop would
        # never let that callback run.  (Adopted transports on TCP alone use
        # the loop transport's is_closing in place of this.)
        if self._closing:
            return True
        tcp = self._tcp
        return tcp is not None and tcp.is_closing()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._shm is not None and self._tcp is not None:
            self._tcp.pause_reading()  # (on TCP alone, closing it stops reading)
        if self._tx == SHM:
            if self._overflow:
                return  # _flush_overflow finishes the close
            # Nothing left to send: later writes are dropped, as asyncio's
            # transport drops them (on TCP the loop's transport does that).
            self._conn_lost = 1
        self._finish_close()

    def _finish_close(self, now: bool = False) -> None:
        """Once our bytes are placed: EOF on the pipe, close TCP, then connection_lost."""
        if self._lost_called:
            return
        if self._shm is not None and not self._shm.closed:
            if self._tx == SHM and not self._eof_written:
                self._ring_bell_after(self._shm.producer.close)
            if self._link is not None and not self._link.closed:
                try:
                    self._link.send({"op": "close"})
                except ConnectionResetError:
                    pass
        if self._tcp is not None and not self._tcp_closed:
            if not self._tcp.is_closing():
                self._tcp.close()
            return  # _tcp_lost calls us again
        self._force_close(None, now)

    def abort(self) -> None:
        self._force_close(None)

    def _fatal_error(self, exc: BaseException, message: str) -> None:
        if isinstance(exc, OSError):
            _log.debug("%r: %s", self, message, exc_info=True)
        else:
            self._loop.call_exception_handler(
                {
                    "message": message,
                    "exception": exc,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )
        self._force_close(exc)

    def _force_close(self, exc: BaseException | None, now: bool = False) -> None:
        """Release everything; ``connection_lost`` follows via ``call_soon``, or
        at once with ``now`` (when we are in a loop callback already: the TCP
        side's own ``connection_lost``)."""
        if self._lost_called:
            return
        self._lost_called = True
        self._closing = True
        # Hooks often close over this transport: drop them, so that a closed
        # connection is freed by reference counting, not by the cycle collector.
        self._traffic_goal, self._on_traffic = NO_TRAFFIC_GOAL, None
        self._hook_goal = self._watch_goal = NO_TRAFFIC_GOAL
        if self._watch_marker is not None:
            self._watch_marker.cancel()
            self._watch_marker = None
        self._conn_lost = self._conn_lost or 1  # close() may have counted already
        if self._tcp is not None and not self._tcp_closed:
            self._tcp.abort()
        if not self._direct:
            self._release_shared_memory()
        if now:
            self._call_connection_lost(exc)
        else:
            self._loop.call_soon(self._call_connection_lost, exc)

    def _release_shared_memory(self) -> None:
        self._overflow.clear()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        if self._spin_handle is not None:
            self._spin_handle.cancel()
            self._spin_handle = None
            assert self._spin is not None
            self._spin.release(self._loop)
        if self._link is not None:
            self._link.close()
        if self._shm is not None:
            self._shm.close(peer_gone=self._peer_gone)

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        try:
            if self._direct:
                self._protocol.connection_lost(exc)  # type: ignore[arg-type]
            else:
                self._in_context(self._protocol.connection_lost, exc)
        finally:
            self._protocol = None  # type: ignore[assignment]
            callbacks, self._close_callbacks = self._close_callbacks, []
            for callback in callbacks:
                try:
                    callback(self)
                except Exception as exc:
                    self._loop.call_exception_handler(
                        {"message": "close callback failed", "exception": exc, "transport": self}
                    )

    def __repr__(self) -> str:
        state = "closed" if self._lost_called else "closing" if self._closing else "open"
        return f"<SwitchableTransport {state} tx={self._tx} rx={self._rx}>"


class Adopter(asyncio.Protocol):
    """A protocol to hand the loop (``create_server``, ``create_connection``,
    ``connect_accepted_socket``): on ``connection_made`` it wraps the loop's
    TCP transport in a ``SwitchableTransport`` carrying the user's protocol.

    ``transport`` and ``protocol`` are what the user gets; ``on_adopted`` (if
    any) is called with the new transport, e.g. to start an upgrade.  The
    adopter stays the loop transport's protocol and forwards its events.
    """

    def __init__(
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        on_adopted: Callable[[SwitchableTransport], None] | None = None,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._factory = protocol_factory
        self._on_adopted = on_adopted
        self._loop = loop
        self.transport: SwitchableTransport | None = None
        self.protocol: asyncio.BaseProtocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        loop = self._loop or asyncio.get_running_loop()
        try:
            self.protocol = self._factory()
        except Exception as exc:  # as asyncio's server does: report, drop the connection
            loop.call_exception_handler(
                {"message": "protocol_factory() failed", "exception": exc, "transport": transport}
            )
            transport.abort()  # type: ignore[attr-defined]
            return
        # The loop's TCP transport (asyncio's, or uvloop's, which is not an
        # asyncio.Transport) becomes the TCP side of ours.
        # Its write buffer limits are left alone: asyncio's and uvloop's start
        # with our high-water mark, so it asks us to pause when we would.
        outer = self.transport = SwitchableTransport(loop, self.protocol)
        outer._tcp = transport  # type: ignore[assignment]
        # On TCP alone we close exactly when the loop's transport does, and it
        # knows first when a send failed: drain() asks us on every call, so
        # it asks the loop's transport itself (attach_shm takes this back).
        outer.is_closing = transport.is_closing  # type: ignore[method-assign]
        # The loop calls us as it calls connection_made (from a call_soon), so
        # the protocol gets it from here: no second hop, and the loop's guard.
        try:
            self.protocol.connection_made(outer)
        except BaseException:
            if not isinstance(loop, asyncio.BaseEventLoop):
                # uvloop starts reading only once connection_made returned: never, now.
                outer._paused_reading = True
            raise
        if self._on_adopted is not None:
            self._on_adopted(outer)

    def data_received(self, data: bytes) -> None:
        outer = self.transport
        assert outer is not None
        if outer._direct:  # TCP alone: straight to the protocol, no copy
            outer._rx_pos += len(data)
            outer._protocol.data_received(data)  # type: ignore[attr-defined]
            if outer._tx_pos + outer._rx_pos >= outer._traffic_goal:
                outer._check_traffic()
        else:
            outer._tcp_data(data)

    def eof_received(self) -> bool:
        outer = self.transport
        assert outer is not None
        if outer._direct:  # TCP alone: the loop's transport acts on the answer
            outer._tcp_eof_seen = outer._rx_eof = True
            keep_open = bool(outer._protocol.eof_received())  # type: ignore[attr-defined]
            if not keep_open:
                outer._closing = True  # the loop's transport closes; _tcp_lost follows
            return keep_open
        outer._tcp_eof()
        return True  # half-close: the switchable transport decides when to close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.transport._tcp_lost(exc)

    def pause_writing(self) -> None:
        self.transport._maybe_pause_protocol()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        self.transport._maybe_resume_protocol()  # type: ignore[union-attr]


async def open_transport(
    loop: asyncio.AbstractEventLoop,
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    sock: socket.socket,
) -> tuple[SwitchableTransport, asyncio.BaseProtocol]:
    """Wrap a connected TCP socket in a ``SwitchableTransport`` (TCP mode)."""
    let_loop_start_tls(loop)
    sock.setblocking(False)
    adopter = Adopter(protocol_factory)
    await loop.connect_accepted_socket(lambda: adopter, sock=sock)
    assert adopter.transport is not None and adopter.protocol is not None
    return adopter.transport, adopter.protocol


async def attach_shared_memory(
    transport: SwitchableTransport,
    pool: Any,
    *,
    send: Any,
    receive: Any,
    listen_fd: int,
    ring_fd: int | None,
    control: socket.socket,
    socket_bell: bool = False,
    elastic: ElasticConfig | None = ElasticConfig(),  # noqa: B008 - frozen
    spin: SpinConfig | None = SpinConfig(),  # noqa: B008 - frozen
    pending_control: bytes = b"",
    on_detach: Callable[[], None] | None = None,
    hub: HubDoorbell | None = None,
) -> None:
    """Give ``transport`` the pool pipes ``send``/``receive`` (pipe handles), the
    eventfds it listens on and rings (owned from now on) and the connected
    control socket.  ``hub``: a share of a hub (owned from now on) to use in
    place of the eventfds (-1 then).  With ``socket_bell`` (peers in different
    kernels) the doorbell is a message on the control socket and the eventfds
    (or the share) are closed.
    With ``elastic`` (the default) the outgoing pipe grows and shrinks with
    its demand (``aiocoloc.shm.elastic``); with ``None`` its size stays fixed.
    ``spin`` bounds how long the reader busy-waits before sleeping
    (``aiocoloc.notify.spin``); ``None`` never spins.  ``pending_control``: control
    bytes already read from ``control`` (after a handshake).  ``on_detach``
    runs once the pipes are given back.
    The transport stays in TCP mode until ``switch_tx``.
    """
    loop = asyncio.get_running_loop()
    _, link = await loop.create_unix_connection(
        lambda: ControlLink(transport._on_control, transport._on_link_lost), sock=control
    )
    if pending_control:
        link.data_received(pending_control)

    def give_back(incoming_done: bool, outgoing_done: bool) -> None:
        for handle, done in ((receive, incoming_done), (send, outgoing_done)):
            if done:
                try:
                    pool.destroy_pipe(handle)
                except PoolError:
                    pass  # the peer (or the pool's reaper) freed it first
        if on_detach is not None:
            on_detach()

    doorbell: Doorbell | ControlDoorbell | HubDoorbell
    if socket_bell:
        for fd in (listen_fd, ring_fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        if hub is not None:
            hub.close()
        doorbell = ControlDoorbell(link.send)
    elif hub is not None:
        doorbell = hub
    else:
        assert ring_fd is not None
        doorbell = Doorbell(listen_fd, ring_fd)
    producer = pool.pipe_producer(send)
    resizer = ElasticProducer(pool, send, elastic, end=producer) if elastic is not None else None
    path = ShmPath(
        producer,
        pool.pipe_consumer(receive),
        doorbell,
        pool_id=str(pool.id),
        on_close=give_back,
        resizer=resizer,
        spin=spin,
    )
    transport.attach_shm(path, link)
