"""``ControlChannel``: one connection's control socket, for its whole life.

During the upgrade handshake it carries a conversation: ``send`` a message
(with descriptors, SCM_RIGHTS, within one kernel) and ``recv`` the next.
Once the connection is upgraded the same object becomes its link: ``serve``
hands every incoming message to a callback on the event loop, and ``post``
sends without waiting (what the kernel does not take at once is kept and
flushed when the socket is writable).  A Unix socket within one kernel, TCP
between VMs.  The socket is registered with the loop directly (no loop
transport): a connection's set-up creates one object less.

Messages are ``aiocoloc.control.messages`` classes, framed by
``aiocoloc.control.frames``.  Errors: ``ControlChannelClosed`` when the peer
goes away mid-conversation, ``ControlProtocolError`` for what it sent.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from aiocoloc import debug
from aiocoloc.control.frames import FrameDecoder, encode_frame
from aiocoloc.control.messages import Message, decode
from aiocoloc.errors import ControlChannelClosed, ControlProtocolError, UnknownOperation

__all__ = ["ControlChannel"]

_log = logging.getLogger("aiocoloc.control")
_MAX_FDS = 4  # most descriptors one handshake message carries
_READ = 65536
#: Seconds a closed channel keeps flushing what the kernel had not taken.
LINGER = 1.0
#: Seconds ``wait_for_peer_close`` waits before giving up.
PEER_CLOSE_WAIT = 5.0

OnMessage = Callable[[Message], None]
OnLost = Callable[[BaseException | None], None]


class ControlChannel:
    """A connected, non-blocking control socket (owned: ``close()`` closes it)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._fd = sock.fileno()
        self._loop = asyncio.get_running_loop()
        self._decoder = FrameDecoder()
        self._messages: collections.deque[dict[str, Any]] = collections.deque()
        self._fds: list[int] = []  # received, not yet handed out
        self._out = bytearray()  # posted, not yet taken by the kernel
        self._on_message: OnMessage | None = None
        self._on_lost: OnLost | None = None
        self._serving = False  # our reader is registered
        self._discarding = False  # waiting for the peer to close: data is dropped
        self.closed = False
        debug.live.control_channels += 1

    # --- the handshake: a conversation --------------------------------------------------

    async def send(self, message: Message, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send ``message`` (and ``fds``, which stay ours) once the kernel took it."""
        data = memoryview(encode_frame(message.fields()))
        first = True
        while data:
            try:
                if first and fds:
                    sent = socket.send_fds(self.sock, [data], list(fds))
                else:
                    sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                await self._wait(writable=True)
                continue
            except OSError as exc:
                raise ControlChannelClosed(f"control socket: {exc}") from None
            first = False
            data = data[sent:]

    async def recv(self) -> tuple[Message, list[int]]:
        """The next message, and the descriptors that came since the last one
        (owned by the caller).  A message that does not decode raises
        ``ControlProtocolError``, its descriptors closed."""
        while not self._messages:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, _READ, _MAX_FDS)
            except (BlockingIOError, InterruptedError):
                await self._wait(writable=False)
                continue
            except OSError as exc:
                raise ControlChannelClosed(f"control socket: {exc}") from None
            self._fds.extend(fds)
            if not data:
                raise ControlChannelClosed("the peer closed the control socket")
            self._messages.extend(self._decoder.feed(data))
        fds, self._fds = self._fds, []
        try:
            return decode(self._messages.popleft()), fds
        except ControlProtocolError:
            _close_all(fds)
            raise

    async def _wait(self, writable: bool) -> None:
        waiter: asyncio.Future[None] = self._loop.create_future()

        def ready() -> None:
            if not waiter.done():
                waiter.set_result(None)

        if writable:
            self._loop.add_writer(self._fd, ready)
        else:
            self._loop.add_reader(self._fd, ready)
        try:
            await waiter
        finally:
            if writable:
                self._loop.remove_writer(self._fd)
            else:
                self._loop.remove_reader(self._fd)

    # --- the link of an upgraded connection -----------------------------------------------

    def serve(self, on_message: OnMessage, on_lost: OnLost) -> None:
        """From now on call ``on_message`` with each message (unknown
        operations skipped: a newer peer's additions), and ``on_lost`` once
        when the channel is lost: None when the peer closed it, else why.
        Messages that came with the handshake's last read go first, now."""
        if self.closed:
            raise ControlChannelClosed("the control channel is closed")
        _close_all(self._fds)  # a link carries no descriptors
        self._fds.clear()
        self._on_message, self._on_lost = on_message, on_lost
        self._serving = True
        self._loop.add_reader(self._fd, self._read_ready)
        self._deliver()

    def post(self, message: Message) -> None:
        """Send ``message`` without waiting.  ``ConnectionResetError`` once
        the channel is closed; a failing socket is reported to ``on_lost``."""
        self.post_frame(encode_frame(message.fields()))

    def post_frame(self, frame: bytes) -> None:
        """``post`` for a frame encoded once in advance (a doorbell's)."""
        if self.closed or self._discarding:
            raise ConnectionResetError("control channel is closed")
        if self._out:
            self._out += frame
            return
        try:
            sent = self.sock.send(frame)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:  # reported as a loss, as a transport would
            self._loop.call_soon(self._lost, ControlChannelClosed(f"control socket: {exc}"))
            return
        if sent < len(frame):
            self._out += frame[sent:]
            self._loop.add_writer(self._fd, self._write_ready)

    def wait_for_peer_close(
        self, on_closed: Callable[[], None], on_timeout: Callable[[], None], timeout: float
    ) -> None:
        """End our side (shut down for writing, drop what was posted), then
        read and discard until the peer closes its end: ``on_closed()``, or
        ``on_timeout()`` after ``timeout`` seconds; the channel is closed
        either way.  How a connection whose TCP side died learns whether
        its peer is gone too (its control socket closes with it)."""
        if self.closed:
            raise ControlChannelClosed("the control channel is closed")
        self._out.clear()
        self._loop.remove_writer(self._fd)
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # closed by the peer already: the read below says so
        self._discarding = True

        def timed_out() -> None:
            self._on_lost = None
            self.close()
            on_timeout()

        timer = self._loop.call_later(timeout, timed_out)

        def closed(_exc: BaseException | None) -> None:
            timer.cancel()
            on_closed()

        self._on_message, self._on_lost = None, closed
        if not self._serving:
            self._serving = True
            self._loop.add_reader(self._fd, self._read_ready)

    def _read_ready(self) -> None:
        try:
            data = self.sock.recv(_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(ControlChannelClosed(f"control socket: {exc}"))
            return
        if not data:
            self._lost(None)
            return
        if self._discarding:
            return
        try:
            self._messages.extend(self._decoder.feed(data))
        except ControlProtocolError as exc:
            self._lost(exc)
            return
        self._deliver()

    def _deliver(self) -> None:
        while self._messages and not self.closed and not self._discarding:
            try:
                message = decode(self._messages.popleft())
            except UnknownOperation as exc:
                _log.debug("ignoring %s", exc)
                continue
            except ControlProtocolError as exc:
                self._lost(exc)
                return
            assert self._on_message is not None
            self._on_message(message)

    def _write_ready(self) -> None:
        try:
            sent = self.sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._out.clear()
            self._loop.remove_writer(self._fd)
            if self.closed:
                self._close_socket()
            else:
                self._lost(ControlChannelClosed(f"control socket: {exc}"))
            return
        del self._out[:sent]
        if not self._out:
            self._loop.remove_writer(self._fd)
            if self.closed:  # lingered to flush: done
                self._close_socket()

    def _lost(self, exc: BaseException | None) -> None:
        if self.closed:
            return
        if isinstance(exc, ControlProtocolError):
            _log.warning("control channel lost: %s", exc)
        elif exc is not None:  # the peer went, or closed first: its transport says more
            _log.debug("control channel lost: %s", exc)
        on_lost = self._on_lost
        self._out.clear()  # nobody reads it any more
        self.close()
        if on_lost is not None:
            on_lost(exc)

    # --- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop serving and close the socket (after flushing what was posted,
        for at most ``LINGER`` seconds).  Idempotent."""
        if self.closed:
            return
        self.closed = True
        debug.live.control_channels -= 1
        # The callbacks are bound to our owner, which holds us: a closed
        # channel must not keep that cycle for the garbage collector to find.
        self._on_message = self._on_lost = None
        _close_all(self._fds)
        self._fds.clear()
        if self._loop.is_closed():
            self.sock.close()
            return
        self._loop.remove_reader(self._fd)
        if self._out:
            self._loop.call_later(LINGER, self._close_socket)
        else:
            self._close_socket()

    def _close_socket(self) -> None:
        if self.sock.fileno() < 0:
            return
        if self._out and not self._loop.is_closed():
            _log.debug("dropping %d unsent control bytes", len(self._out))
        self._out.clear()
        if not self._loop.is_closed():
            self._loop.remove_writer(self._fd)
        self.sock.close()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
