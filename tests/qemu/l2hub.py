"""A dumb Ethernet hub on the host's loopback for QEMU socket netdevs.

Each guest runs ``-netdev socket,connect=127.0.0.1:<hub.port>``.  On that
stream QEMU sends every Ethernet frame prefixed by its length (4 bytes, big
endian); the hub copies each frame to every other connected guest, so any
number of guests share one L2 segment.  No learning, no filtering: the
traffic is a handful of test connections.

    with L2Hub() as hub:
        start_guest(..., net=f"connect:{hub.port}", ip="169.254.7.1/16")
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
from collections import deque
from types import TracebackType

__all__ = ["L2Hub"]

_HEADER = struct.Struct(">I")
MAX_FRAME = 65535
#: Bytes queued for one slow guest beyond which new frames to it are dropped,
#: as a real hub would: one stalled guest must not stall the others, and TCP
#: in the guests recovers the loss.
MAX_QUEUED = 8 << 20


class _Port:
    """One guest's connection: bytes received so far and frames waiting to go out."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbox = bytearray()
        self.outbox: deque[memoryview] = deque()
        self.queued = 0
        self.writing = False  # registered for EVENT_WRITE


class L2Hub:
    """Copies length-prefixed frames between QEMU socket netdevs, on a background thread.

    Listens on 127.0.0.1 only, on an ephemeral ``port``.  A connection that
    sends a zero or over-long (> 65535 B) length is closed.
    """

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._ports: dict[socket.socket, _Port] = {}
        self._closing = False
        #: Frames copied so far (counted once per frame received) and connections dropped.
        self.frames = 0
        self.dropped_connections = 0
        self._thread = threading.Thread(target=self._serve, name="l2hub", daemon=True)
        self._thread.start()

    # -- public API ------------------------------------------------------------------------

    @property
    def connections(self) -> int:
        """Guests connected right now."""
        return len(self._ports)

    def close(self) -> None:
        """Stop the hub and close every connection (idempotent)."""
        if self._closing:
            return
        self._closing = True
        self._wake_w.send(b"x")
        self._thread.join()
        for port in list(self._ports.values()):
            port.sock.close()
        self._ports.clear()
        self._selector.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> L2Hub:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the loop ------------------------------------------------------------------------

    def _serve(self) -> None:
        while not self._closing:
            for key, events in self._selector.select():
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._wake_r:
                    continue
                if sock is self._listener:
                    self._accept()
                    continue
                port = self._ports.get(sock)
                if port is None:  # dropped earlier in this round
                    continue
                if events & selectors.EVENT_READ:
                    self._receive(port)
                if events & selectors.EVENT_WRITE and sock in self._ports:
                    self._flush(port)

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._ports[sock] = _Port(sock)
        self._selector.register(sock, selectors.EVENT_READ)

    def _drop(self, port: _Port) -> None:
        self._selector.unregister(port.sock)
        del self._ports[port.sock]
        port.sock.close()
        self.dropped_connections += 1

    def _receive(self, port: _Port) -> None:
        try:
            data = port.sock.recv(1 << 18)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(port)
            return
        port.inbox += data
        inbox, offset = port.inbox, 0
        while len(inbox) - offset >= _HEADER.size:
            (length,) = _HEADER.unpack_from(inbox, offset)
            if length == 0 or length > MAX_FRAME:
                self._drop(port)  # a malformed stream cannot be resynchronised
                return
            end = offset + _HEADER.size + length
            if end > len(inbox):
                break
            self._broadcast(port, memoryview(bytes(inbox[offset:end])))
            offset = end
        del inbox[:offset]

    def _broadcast(self, source: _Port, frame: memoryview) -> None:
        self.frames += 1
        for port in list(self._ports.values()):
            if port is source or port.queued + len(frame) > MAX_QUEUED:
                continue
            was_idle = not port.outbox
            port.outbox.append(frame)
            port.queued += len(frame)
            if was_idle:
                self._flush(port)

    def _flush(self, port: _Port) -> None:
        while port.outbox:
            head = port.outbox[0]
            try:
                sent = port.sock.send(head)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(port)
                return
            port.queued -= sent
            if sent < len(head):
                port.outbox[0] = head[sent:]
                break
            port.outbox.popleft()
        if port.writing != bool(port.outbox):
            port.writing = bool(port.outbox)
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if port.writing else 0)
            self._selector.modify(port.sock, events)
