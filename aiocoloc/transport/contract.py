"""The asyncio contract of a ``SwitchableTransport``, whatever path its bytes take.

Towards the protocol it behaves as the loop's own TCP transport does
(asyncio's ``selector_events.py``, or uvloop's where the two differ: limits,
messages, what raises once closed; ``tests/conformance``): callbacks in the
connection's context under the standard guard, ``connection_lost`` exactly
once, flow control with strictly paired ``pause_writing``/``resume_writing``,
``BufferedProtocol`` support, closing and aborting, ``get_extra_info``.

Two mixins of the one transport object (``state`` declares what they share):
``ProtocolCalls`` calls the protocol (the guard, delivering bytes, flow
control); ``LifeCycle`` is what the protocol calls (reading, closing).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiocoloc import debug
from aiocoloc.control.messages import Close
from aiocoloc.transport.loop_watch import NO_TRAFFIC_GOAL
from aiocoloc.transport.state import TransportState
from aiocoloc.transport.switch_state import SHM

__all__ = ["LifeCycle", "ProtocolCalls", "reads_into_buffers"]

_log = logging.getLogger("aiocoloc.transport")


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


class ProtocolCalls(TransportState):
    """Calling the protocol: the guard, delivering bytes, flow control."""

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

    # ------------------------------------------------------------ received bytes

    def _deliver(self, data: bytes | memoryview) -> None:
        """Give received bytes to the protocol (either path; ``DataPath.deliver``)."""
        self._core.deliver(data)

    def _deliver_into_buffers(self, data: bytes | memoryview) -> None:
        """Copy received bytes into a ``BufferedProtocol``'s buffers (from ``deliver``)."""
        view = memoryview(data)
        while view and not self._lost_called:
            target = self._get_buffer(len(view))
            if target is None:
                return
            n = min(len(target), len(view))
            target[:n] = view[:n]
            view = view[n:]
            self._call(self._protocol.buffer_updated, n, what="buffer_updated")  # type: ignore[attr-defined]

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

    def _on_rx_eof(self) -> None:
        self._rx_eof = True
        keep_open = self._call(self._protocol.eof_received, what="eof_received")  # type: ignore[attr-defined]
        if not keep_open and not self._lost_called:
            self.close()

    # ------------------------------------------------------------ write flow control

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

    def _let_loop_run(self) -> None:
        """Pause the protocol until the next loop iteration: its drain() yields
        (the loop watch's nudge, ``loop_watch``)."""
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


class LifeCycle(TransportState):
    """What the protocol calls, besides writing: reading, its protocol,
    extra info, closing and aborting."""

    def pause_reading(self) -> None:
        self._core.pause_reading()  # (set on the instance once shared memory is attached)

    def resume_reading(self) -> None:
        self._core.resume_reading()

    def is_reading(self) -> bool:
        if self._paused_reading or self._closing:
            return False
        # uvloop's transport stops reading at EOF (libuv does); asyncio's reads on.
        return not self._rx_eof or isinstance(self._loop, asyncio.BaseEventLoop)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._core.set_protocol(protocol, reads_into_buffers(self._loop, protocol))

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
                "doorbell": self._shm.doorbell.KIND if self._shm is not None else None,
            }
        extra: dict[str, Any] = self._extra
        if name in extra:
            return extra[name]
        if self._tcp is not None:
            return self._tcp.get_extra_info(name, default)
        return default

    def is_closing(self) -> bool:
        # The data path's (``DataPath.is_closing``); adopted transports on TCP
        # alone use the loop transport's in place of this, and attach_shm
        # sets the data path's on the instance.
        return self._core.is_closing()

    def close(self) -> None:
        # (The data path's fields read from it directly: every connection closes.)
        core = self._core
        if core.closing:
            return
        core.closing = True
        tcp = core.tcp
        if core.shm is None and tcp is not None and not self._tcp_closed:
            # TCP alone (most connections): the loop's transport closes, and
            # its connection_lost finishes ours (_finish_close's TCP step,
            # without the call).
            if not tcp.is_closing():
                tcp.close()
            return
        if self._shm is not None and tcp is not None:
            tcp.pause_reading()  # (on TCP alone, closing it stops reading)
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
                self._ring_peer_after(self._shm.producer.close)
            if self._link is not None and not self._link.closed:
                try:
                    self._link.post(Close())
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
        core = self._core
        if core.lost_called:
            return
        core.lost_called = core.closing = True
        debug.live.transports -= 1
        # Hooks often close over this transport: drop them, so that a closed
        # connection is freed by reference counting, not by the cycle
        # collector.  (A loop-watch marker still queued runs once, on the
        # dropped watch: harmless, and cheaper than a call per connection.)
        core.traffic_goal, self._loop_watch = NO_TRAFFIC_GOAL, None
        core.conn_lost = core.conn_lost or 1  # close() may have counted already
        if core.tcp is not None and not self._tcp_closed:
            core.tcp.abort()
        if not core.direct:
            self._release_shared_memory()
        if now:
            self._call_connection_lost(exc)
        else:
            self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        core = self._core
        try:
            if core.direct:
                core.protocol.connection_lost(exc)
            else:
                self._in_context(core.protocol.connection_lost, exc)
        finally:
            core.protocol = core.owner = None  # (no cycle: see DataPath)
            callbacks, self._close_callbacks = self._close_callbacks, []
            for callback in callbacks:
                try:
                    callback(self)  # type: ignore[arg-type]
                except Exception as exc:
                    self._loop.call_exception_handler(
                        {"message": "close callback failed", "exception": exc, "transport": self}
                    )

    def __repr__(self) -> str:
        return self._core.owner_repr()
