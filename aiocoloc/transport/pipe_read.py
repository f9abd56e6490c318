"""The pipe read path of a ``SwitchableTransport``: draining the incoming
pipe into the protocol, doorbell wake-ups, and what a reader does once its
pipe ran empty: spin a little while if that pays (``aiocoloc.notify.spin``),
else announce that it sleeps and wait to be rung.
"""

from __future__ import annotations

import time
from typing import Any

from aiocoloc.errors import RingCorrupted
from aiocoloc.notify.spin import AFTER_EMPTY, AFTER_WRITE
from aiocoloc.transport.state import TransportState
from aiocoloc.transport.switch_state import SHM

__all__ = ["DRAIN_BUDGET", "HOLD_LIMIT", "READ_CHUNK", "PipeReadPath"]

#: Bytes moved from a pipe to the protocol before yielding to the loop.
DRAIN_BUDGET = 4 << 20
#: Largest chunk handed to ``Protocol.data_received``.
READ_CHUNK = 256 * 1024
#: Bytes a reader whose protocol paused reading still takes from its pipe
#: and keeps while its own writer waits for room too: two peers that each
#: write a large message before they read would otherwise wait for each
#: other for good, where sockets' buffers (Linux grows a loopback socket's
#: to 6 MiB) would have held it.  Only then: a reader that is merely slower
#: than its writer leaves the bytes in the pipe (no copy).
HOLD_LIMIT = 4 << 20


class PipeReadPath(TransportState):
    """The incoming pipe to the protocol; sleeping, spinning and waking."""

    def _on_doorbell(self) -> None:
        self._in_context(self._woken)

    def _may_be_rung(self) -> bool:
        """For a hub (a doorbell shared with other connections): whether a
        ring may be for us -- our reader sleeps and its writer rang (took
        the flag) or bytes or EOF came; or our writer waits and its reader
        rang or room came.  The others stay asleep, flags set.  (A taken
        flag wakes us even when a drain already took the bytes:
        ``_wait_for_bytes`` leaves a reader that still counts as asleep
        alone, and a ring that is not followed by a wake-up would leave it
        so with no flag set.)"""
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
        if shm is None or shm.closed or self._rx_eof or self._lost_called:
            return
        if self._paused_reading:
            if self._overflow:  # we wait for the peer, who may wait for us
                self._hold()
            return
        if self._rx_held and not self._deliver_held():
            return  # paused again
        consumer = shm.consumer
        moved = 0
        self._woke_peer = False
        try:
            while moved < DRAIN_BUDGET and not self._paused_reading and not self._lost_called:
                limit = self._rx_switch_at - self._rx_pos  # room before the next switch
                if limit > READ_CHUNK:
                    limit = READ_CHUNK
                elif limit == 0:
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
                    self._woke_peer = True
            else:
                if moved >= DRAIN_BUDGET:
                    self._schedule_drain()  # let other callbacks run, then go on
                elif self._paused_reading and self._overflow and not self._lost_called:
                    self._hold()
                return
            if shm.closed:
                return  # get_buffer() failed: the pipes are gone
            self._wait_for_bytes(AFTER_EMPTY)
        except RingCorrupted as exc:
            self._fatal_error(
                ConnectionResetError(f"shared-memory pipe corrupted: {exc}"), "pipe corrupted"
            )

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

    def _wait_for_bytes(self, trigger: int) -> None:
        """The incoming pipe is empty (``AFTER_EMPTY``) or we just wrote and a
        reply may come (``AFTER_WRITE``): watch the pipe a little while if
        that pays (``aiocoloc.notify.spin``), else sleep until rung."""
        policy, shm = self._spin, self._shm
        assert shm is not None
        woke_peer, self._woke_peer = self._woke_peer, False
        if (
            policy is not None
            and policy.alone(self._loop)  # (notes that we rest, whatever comes next)
            and self._spin_handle is None
            and policy.wants(trigger)
            # The peer we just woke may be placed on our CPU: leave it free,
            # but for a probe now and then.
            and (not woke_peer or policy.may_spin_after_ring(trigger))
            and policy.claim(self._loop)
        ):
            if self._rx_asleep:
                self._rx_asleep = False
                shm.consumer.cancel_sleep()  # awake: the writer need not ring
            # A probe is judged against the wake-ups after the same trigger:
            # from our write, or from the pipe running empty (now).
            probe_from = 0
            if woke_peer:
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
