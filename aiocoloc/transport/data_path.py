# cython: annotation_typing=False
"""The transport's hot half: what runs for every message.

``DataPath`` holds the state a ``SwitchableTransport``'s data paths read per
message, and the methods that run per message: ``write``, TCP segments in,
delivery, the pipe drain, waking, spinning and sleeping.  The transport
(``owner``) keeps the cold parts in its mixins and reads these fields
through properties (``state``).

Compiled by Cython in pure-Python mode (``data_path.pxd`` makes it a ``cdef
class`` with typed fields); the same source, interpreted, is the reference
that ``AIOCOLOC_NO_EXTENSIONS=1`` selects (``state.load_data_path``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiocoloc.errors import RingClosed, RingCorrupted
from aiocoloc.notify.spin import AFTER_EMPTY, AFTER_WRITE
from aiocoloc.transport.loop_watch import NO_TRAFFIC_GOAL
from aiocoloc.transport.switch_state import NO_SWITCH, SHM, TCP

__all__ = [
    "COMPILED",
    "DRAIN_BUDGET",
    "LEND_CHUNK",
    "LEND_MIN",
    "LOG_THRESHOLD_FOR_CONNLOST_WRITES",
    "READ_CHUNK",
    "DataPath",
]

_log = logging.getLogger("aiocoloc.transport")

#: True when this module runs compiled (the interpreter runs ``data_path.py``).
COMPILED = not __file__.endswith(".py")
#: Largest chunk handed to ``Protocol.data_received``.
READ_CHUNK = 128 * 1024
#: Bytes moved from a pipe to the protocol before yielding to the loop: one
#: chunk, as a socket reads once per loop iteration (aiohttp, say, buffers
#: what it gets and would copy several chunks into one).
DRAIN_BUDGET = READ_CHUNK
#: Chunks at least this large are lent to a protocol that copies at once
#: (a view of the pipe, ``set_protocol``); smaller ones are copied out.
LEND_MIN = 64 * 1024
#: Largest chunk lent: ``StreamReader`` takes it in one copy, and its
#: reader wakes once per chunk.
LEND_CHUNK = 256 * 1024
#: asyncio's threshold for warning about writes to a lost connection.
LOG_THRESHOLD_FOR_CONNLOST_WRITES = 5


def _copies_at_once(protocol: Any) -> bool:
    """asyncio's own stream protocol copies what it is given at once
    (``StreamReader.feed_data`` extends its buffer): it may read straight
    from the pipe, one copy less.  Any other protocol may keep what it gets,
    and the peer may overwrite pipe bytes once they are consumed."""
    return (
        type(protocol) is asyncio.StreamReaderProtocol
        and type(getattr(protocol, "_stream_reader", None)) is asyncio.StreamReader
    )


class DataPath:
    """The per-message state and methods of one ``SwitchableTransport``.

    Field names are the transport's without the underscore (``tx_pos`` is
    its ``_tx_pos``); ``state.TransportState`` declares what each means.
    ``owner`` (the transport, for the cold paths) is let go once the
    connection is lost, so that nothing makes a cycle of the two: what can
    still be called then (a write, a late wake-up) does not need it."""

    def __init__(self, owner: Any, loop: Any, protocol: Any, context: Any, buffered: bool) -> None:
        self.owner: Any = owner
        self.loop = loop
        self.context = context
        self.direct = True
        self.shm: Any = None
        self.set_protocol(protocol, buffered)
        self.overflow = bytearray()
        self.tcp_backlog = bytearray()
        self.rx_held: Any = None
        self.tcp: Any = None
        self.producer: Any = None
        self.consumer: Any = None
        self.doorbell: Any = None
        self.resizing: Any = None
        self.spin: Any = None
        self.spin_handle: Any = None
        self.tx = TCP
        self.rx = TCP
        self.rx_switch_at = NO_SWITCH
        self.traffic_goal = NO_TRAFFIC_GOAL
        self.tx_pos = 0
        self.rx_pos = 0
        self.conn_lost = 0
        self.slept_at = 0
        self.slept_for = AFTER_EMPTY
        self.big_reads = False  # the last chunk read was at least LEND_MIN
        self.entered = False
        self.eof_pending = False
        self.eof_written = False
        self.waiting_space = False
        self.woke_peer = False
        self.rx_eof = False
        self.rx_asleep = False
        self.drain_scheduled = False
        self.paused_reading = False
        self.closing = False
        self.lost_called = False

    def set_shm(self, shm: Any) -> None:
        """Our shared-memory path (``ShmPath``), or None once it is dropped."""
        self.shm = shm
        self.lends = shm is not None and _copies_at_once(self.protocol)
        self.producer = None if shm is None else shm.producer
        self.consumer = None if shm is None else shm.consumer
        self.doorbell = None if shm is None else shm.doorbell

    # ------------------------------------------------------------ writing

    def write(self, data: Any) -> None:
        """``transport.write``: the TCP branch first (most connections), the
        pipe's inline after it, so that a write costs one call on either path."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            data = self.other_data(data)
        if self.eof_written or self.eof_pending:
            raise RuntimeError("Cannot call write() after write_eof()")
        if not data:
            return
        if self.conn_lost:
            self.write_after_loss(data)
            return
        owner = self.owner
        size = len(data) if type(data) is bytes else memoryview(data).nbytes
        self.tx_pos += size
        if self.tx == TCP:
            self.tcp.write(data)  # its pause_writing reaches us through the TcpAdapter
            if self.overflow:
                owner._maybe_pause_protocol()
            if self.tx_pos + self.rx_pos >= self.traffic_goal:
                owner._check_traffic()
            return
        producer = self.producer
        if not self.overflow:
            try:
                written = producer.write(data)
            except (RingClosed, RingCorrupted) as exc:
                owner._fatal_error(
                    ConnectionResetError(f"shared-memory pipe failed: {exc}"), "pipe write failed"
                )
                return
            if written:
                resizing = self.resizing
                if resizing is not None and resizing.idle:
                    resizing.enroll()
                if producer.wake_needed():  # the reader sleeps: ring it
                    self.doorbell.ring()
                    self.woke_peer = True
                if self.rx_asleep:  # a reply may be on its way: watch for it
                    self.slept_at = time.monotonic_ns()  # a reply soon re-arms spinning
                    self.slept_for = AFTER_WRITE
                    self.wait_for_bytes(AFTER_WRITE)
            if written == size:
                return
            self.overflow += memoryview(data).cast("B")[written:]
        else:
            self.overflow += data
        owner._wait_for_space()
        owner._maybe_pause_protocol()

    def other_data(self, data: Any) -> Any:
        """What the loop's own transport makes of a write that is not bytes,
        bytearray or memoryview: asyncio's refuses it; uvloop's ignores an
        empty one and takes any other buffer (``memoryview``'s TypeError else)."""
        if isinstance(self.loop, asyncio.BaseEventLoop):
            raise TypeError(
                f"data argument must be a bytes-like object, not {type(data).__name__!r}"
            )
        if not data:
            return b""
        return memoryview(data).cast("B")

    def check_alive(self) -> None:
        """uvloop's transports refuse writes and limits once closed (asyncio's
        drop writes with a warning): on uvloop, so do we."""
        if self.lost_called and not isinstance(self.loop, asyncio.BaseEventLoop):
            raise RuntimeError(
                f"unable to perform operation on {self.owner_repr()}; the handler is closed"
            )

    def write_after_loss(self, data: Any) -> None:
        """A write once the connection is lost: dropped and counted, as the
        loop's own transport does (uvloop's raises once it was closed)."""
        self.check_alive()
        if self.tx == TCP and self.tcp is not None:
            self.tcp.write(data)  # dropped and counted by the loop's transport
            return
        if self.conn_lost >= LOG_THRESHOLD_FOR_CONNLOST_WRITES:
            _log.warning("socket.send() raised exception.")
        self.conn_lost += 1

    def owner_repr(self) -> str:
        """How the transport shows (``SwitchableTransport.__repr__``), also once
        the connection is lost and the data path let go of it."""
        state = "closed" if self.lost_called else "closing" if self.closing else "open"
        return f"<SwitchableTransport {state} tx={self.tx} rx={self.rx}>"

    def is_closing(self) -> bool:
        """``transport.is_closing`` once shared memory is attached: the loop's
        TCP transport may have failed with its ``connection_lost`` still
        queued, and ``StreamWriter.drain()`` yields only when this says so."""
        if self.closing:
            return True
        tcp = self.tcp
        return tcp is not None and tcp.is_closing()

    # ------------------------------------------------------------ receiving

    def pause_reading(self) -> None:
        """``transport.pause_reading`` (``StreamReader`` pauses and resumes for
        every chunk past its limit).  While bytes come from the pipe, the TCP
        socket reads on whatever the protocol says: only the flag changes."""
        if self.closing or self.paused_reading:
            return
        self.paused_reading = True
        if self.rx != SHM:
            self.owner._sync_tcp_reading()

    def resume_reading(self) -> None:
        """``transport.resume_reading`` once shared memory is attached."""
        if self.closing or not self.paused_reading:
            return
        self.paused_reading = False
        if self.rx == SHM:
            self.schedule_drain()
        else:
            self.owner._sync_tcp_reading()
            self.loop.call_soon(self.owner._feed_tcp)

    def deliver(self, data: Any) -> None:
        """Give received bytes to the protocol (either path), in the
        connection's context under asyncio's guard."""
        self.rx_pos += len(data)
        if self.buffered:
            self.owner._deliver_into_buffers(data)
            return
        if type(data) is not bytes:
            data = bytes(data)
        self.call_data_received(data)

    def call_data_received(self, data: Any) -> None:
        """``protocol.data_received(data)`` in the connection's context, under
        asyncio's guard (a protocol without one fails as on the loop's)."""
        owner = self.owner
        try:  # (free unless raised)
            data_received = self.protocol.data_received
        except AttributeError as exc:
            owner._fatal_error(exc, owner._callback_failed("data_received"))
            return
        try:
            if self.entered:
                data_received(data)
            else:
                self.entered = True
                try:
                    self.context.run(data_received, data)
                finally:
                    self.entered = False
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            owner._fatal_error(exc, owner._callback_failed("data_received"))

    def set_protocol(self, protocol: Any, buffered: bool) -> None:
        """The protocol we deliver to, and how."""
        self.protocol = protocol
        self.buffered = buffered
        if buffered:  # we copy into its buffers: no direct calls
            self.direct = False
        self.lends = self.shm is not None and _copies_at_once(protocol)

    def tcp_received(self, data: bytes) -> None:
        """A TCP segment from the loop's transport (``TcpAdapter.data_received``).
        In direct mode (TCP alone, the usual protocol) it goes straight to the
        protocol, in the loop transport's context and under its guard."""
        if self.direct:
            self.rx_pos += len(data)
            self.protocol.data_received(data)
            if self.tx_pos + self.rx_pos >= self.traffic_goal:
                self.owner._check_traffic()
        else:
            self.tcp_data(data)

    def tcp_data(self, data: bytes) -> None:
        """A TCP segment, switches respected (the rest is ``tcp_read``'s)."""
        if self.lost_called:
            return
        if (
            self.rx == TCP
            and self.rx_switch_at == NO_SWITCH
            and not (self.tcp_backlog or self.paused_reading)
        ):
            self.deliver(data)  # the common case: straight through, no copy
            if self.tx_pos + self.rx_pos >= self.traffic_goal:
                self.owner._check_traffic()
            return
        self.tcp_backlog += data
        self.owner._feed_tcp()

    # ------------------------------------------------------------ the incoming pipe

    def on_doorbell(self) -> None:
        """Our doorbell rang (its listener's callback)."""
        if self.entered:
            self.woken()
            return
        self.entered = True
        try:
            self.context.run(self.woken)
        finally:
            self.entered = False

    def may_be_rung(self) -> bool:
        """For a hub (a doorbell shared with other connections): whether a
        ring may be for us -- our reader sleeps and its writer rang (took the
        flag) or bytes or EOF came; or our writer waits and its reader rang
        or room came.  (A taken flag wakes us even when a drain took the
        bytes already: a reader that still counts as asleep would otherwise
        stay so with no flag set.)"""
        shm = self.shm
        if shm is None or shm.closed:
            return False
        try:
            if self.rx_asleep and self.consumer.sleep_over():
                return True
            return self.waiting_space and bool(self.producer.wait_over())
        except (RingCorrupted, ValueError):
            return True  # the wake-up's read or write reports it

    def woken(self) -> None:
        if self.rx_asleep:
            self.rx_asleep = False
            # A hub may wake us before our writer cleared the flag: withdraw
            # it, or the writer would ring once more for nothing.  (Safe: we
            # drain now, and the next prepare_sleep re-checks the pipe.)
            try:
                self.consumer.cancel_sleep()
            except (RingCorrupted, ValueError, AttributeError):
                pass  # reported by the drain
            if self.spin is not None:
                self.spin.woken_after(self.slept_for, time.monotonic_ns() - self.slept_at)
        if self.overflow and self.tx == SHM:
            self.owner._flush_overflow()
        if self.rx == SHM:
            self.drain()

    def schedule_drain(self) -> None:
        if not self.drain_scheduled:
            self.drain_scheduled = True
            self.loop.call_soon(self.drain_soon)

    def drain_soon(self) -> None:
        self.drain_scheduled = False
        if self.rx == SHM:
            self.drain()

    def drain(self) -> None:
        """Move bytes from the incoming pipe to the protocol."""
        shm = self.shm
        if shm is None or shm.closed or self.rx_eof or self.lost_called:
            return
        owner = self.owner
        if self.paused_reading:
            if self.overflow:  # we wait for the peer, who may wait for us
                owner._hold()
            return
        if self.rx_held and not owner._deliver_held():
            return  # paused again
        consumer = self.consumer
        moved = 0
        self.woke_peer = False
        try:
            while moved < DRAIN_BUDGET and not self.paused_reading and not self.lost_called:
                limit = self.rx_switch_at - self.rx_pos  # room before the next switch
                chunk = LEND_CHUNK if self.lends and self.big_reads else READ_CHUNK
                if limit > chunk:
                    limit = chunk
                elif limit == 0:
                    owner._advance_rx()
                    return
                if self.buffered:
                    n = owner._read_buffered(consumer, limit)
                    if n is None:
                        break
                    if n == 0:
                        owner._on_rx_eof()
                        return
                    moved += n
                elif self.lends and self.big_reads:  # straight from the pipe (set_protocol)
                    view = consumer.peek(limit)
                    if view is None:
                        break
                    n = len(view)
                    if n == 0:
                        owner._on_rx_eof()
                        return
                    self.big_reads = n >= LEND_MIN
                    moved += n
                    self.rx_pos += n
                    try:
                        self.call_data_received(view)
                    finally:
                        view.release()
                    if shm.closed:
                        return  # the protocol closed us from its callback
                    consumer.consume(n)
                else:
                    data = consumer.read(limit)
                    if data is None:
                        break
                    if not data:
                        owner._on_rx_eof()
                        return
                    moved += len(data)
                    # (Lending costs three calls where reading costs one: it
                    # pays from LEND_MIN bytes a chunk, for a run of them.)
                    self.big_reads = len(data) >= LEND_MIN
                    self.deliver(data)
                if shm.closed:
                    return  # the protocol closed us from its callback
                if consumer.wake_needed():
                    self.doorbell.ring()  # the producer waits for the space we freed
                    self.woke_peer = True
            else:
                if moved >= DRAIN_BUDGET:
                    self.schedule_drain()  # let other callbacks run, then go on
                elif self.paused_reading and self.overflow and not self.lost_called:
                    owner._hold()
                return
            if shm.closed:
                return  # get_buffer() failed: the pipes are gone
            self.wait_for_bytes(AFTER_EMPTY)
        except RingCorrupted as exc:
            owner._fatal_error(
                ConnectionResetError(f"shared-memory pipe corrupted: {exc}"), "pipe corrupted"
            )

    def wait_for_bytes(self, trigger: int) -> None:
        """The incoming pipe is empty (``AFTER_EMPTY``) or we just wrote and a
        reply may come (``AFTER_WRITE``): watch the pipe a little while if
        that pays (``aiocoloc.notify.spin``), else sleep until rung."""
        policy = self.spin
        woke_peer = self.woke_peer
        self.woke_peer = False
        if (
            policy is not None
            and policy.alone(self.loop)  # (notes that we rest, whatever comes next)
            and self.spin_handle is None
            and policy.wants(trigger)
            # The peer we just woke may be placed on our CPU: leave it free,
            # but for a probe now and then.
            and (not woke_peer or policy.may_spin_after_ring(trigger))
            and policy.claim(self.loop)
        ):
            if self.rx_asleep:
                self.rx_asleep = False
                self.consumer.cancel_sleep()  # awake: the writer need not ring
            # A probe is judged against the wake-ups after the same trigger:
            # from our write, or from the pipe running empty (now).
            probe_from = 0
            if woke_peer:
                probe_from = self.slept_at if trigger == AFTER_WRITE else time.monotonic_ns()
            # After the callbacks already queued: a task that wants to write
            # first (the next request) does so before we wait for the reply.
            self.spin_handle = self.loop.call_soon(self.spin_wait, trigger, probe_from)
        elif not self.rx_asleep:
            self.sleep()

    def sleep(self) -> None:
        """Sleep until rung, unless data slipped in meanwhile."""
        if self.consumer.prepare_sleep():
            self.rx_asleep = True
            self.slept_at = time.monotonic_ns()
            self.slept_for = AFTER_EMPTY
        else:
            self.schedule_drain()

    def spin_wait(self, trigger: int, probe_from: int) -> None:
        policy, shm = self.spin, self.shm
        self.spin_handle = None
        policy.release(self.loop)
        if shm is None or shm.closed or self.rx != SHM or self.lost_called:
            return
        if self.paused_reading or self.rx_eof:
            return  # resume_reading drains; nothing more comes after EOF
        try:
            found = self.consumer.spin_until_readable(policy.config.max_ns)
            policy.record(trigger, found)
            if probe_from:
                policy.probed(trigger, time.monotonic_ns() - probe_from if found else None)
            if found:
                self.drain()
            else:
                self.sleep()
        except RingCorrupted as exc:
            self.owner._fatal_error(
                ConnectionResetError(f"shared-memory pipe corrupted: {exc}"), "pipe corrupted"
            )
