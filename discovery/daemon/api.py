"""The local API server: a Unix socket for this user only.

The socket is created mode 0600 in a directory created 0700, and every
connection's peer is checked with ``SO_PEERCRED``: a process of another user
(root included) gets one ``forbidden`` error line and is hung up on.  The
messages are ``discovery.api_messages``'s.  A bad request gets an error reply
and the connection goes on; a handler's bug is logged and answered with
``internal``: nothing a client sends stops the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from discovery.api_messages import (
    MAX_LINE,
    ApiError,
    Request,
    decode_request,
    encode_error,
    encode_event,
    encode_result,
)
from discovery.events import Subscription

__all__ = ["ApiServer", "ApiStartError", "Peer", "peer_allowed", "peer_credentials"]

_log = logging.getLogger("discovery.daemon.api")


class ApiStartError(RuntimeError):
    """The API socket cannot be set up (another daemon on it, a bad path)."""


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a connection (``SO_PEERCRED``)."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> Peer:
    """The credentials the kernel recorded when the peer connected."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Peer(*struct.unpack("3i", raw))


def peer_allowed(peer: Peer, uid: int | None = None) -> bool:
    """Owner-only: the peer runs as the user the daemon runs as."""
    return peer.uid == (os.geteuid() if uid is None else uid)


Handler = Callable[[Request, Peer], Awaitable[Any]]


class ApiServer:
    """Serves ``handler`` on the socket at ``path``; ``subscribe()`` gives a
    connection that asks for events its subscription."""

    def __init__(self, path: Path, handler: Handler, subscribe: Callable[[], Subscription]) -> None:
        self.path = path
        self._handler = handler
        self._subscribe = subscribe
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._closing = False

    async def bind(self) -> None:
        """Create the socket (not serving yet); ``ApiStartError`` when it cannot."""
        path = self.path
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ApiStartError(f"cannot create the API directory {path.parent}: {exc}") from None
        self._clear_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Created 0600 from the start (the umask), not chmod-ed after a window.
            old = os.umask(0o177)
            try:
                sock.bind(str(path))
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
            sock.listen(64)
            st = os.stat(path)
            self._inode = (st.st_dev, st.st_ino)
            self._server = await asyncio.start_unix_server(
                self._client, sock=sock, limit=MAX_LINE, start_serving=False
            )
        except OSError as exc:
            sock.close()
            raise ApiStartError(f"cannot listen on the API socket {path}: {exc}") from None

    @staticmethod
    def _clear_stale(path: Path) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ApiStartError(f"API socket {path}: {exc}") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise ApiStartError(f"API socket {path} exists and is not a socket; not touching it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise ApiStartError(f"API socket {path}: {exc}") from None
            _log.info("removing stale API socket %s", path)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        else:
            raise ApiStartError(f"another aiocoloc-discoveryd answers on {path}")
        finally:
            probe.close()

    async def serve(self) -> None:
        """Start accepting connections."""
        assert self._server is not None
        await self._server.start_serving()

    async def close(self) -> None:
        """Stop listening, hang up on every client, remove the socket file."""
        if self._server is not None:
            self._closing = True
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:  # still ours, not a successor's
                self.path.unlink()

    # -- one connection --------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        subscription: Subscription | None = None
        pump: asyncio.Task[None] | None = None
        try:
            peer = peer_credentials(writer.get_extra_info("socket"))
            if not peer_allowed(peer):
                _log.warning(
                    "refused an API connection from pid %d uid %d (owner-only)", peer.pid, peer.uid
                )
                writer.write(encode_error(ApiError("forbidden", "this API is for its owner only")))
                await writer.drain()
                return
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # longer than MAX_LINE: the rest cannot be framed
                    writer.write(
                        encode_error(ApiError("bad-request", f"line longer than {MAX_LINE} bytes"))
                    )
                    await writer.drain()
                    return
                if not line:
                    return
                if not line.strip():
                    continue
                try:
                    request = decode_request(line)
                except ApiError as exc:
                    writer.write(encode_error(exc))
                    await writer.drain()
                    continue
                if request.op == "subscribe":
                    if subscription is None:
                        # Subscribed before the reply is written: no event
                        # after the reply is missed.
                        subscription = self._subscribe()
                        pump = asyncio.get_running_loop().create_task(
                            self._pump(subscription, writer)
                        )
                    writer.write(encode_result(request.id, {"subscribed": True}))
                else:
                    writer.write(await self._answer(request, peer))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away
        except asyncio.CancelledError:
            # Hung up by close(): end normally, or asyncio's stream callback
            # logs the cancellation as an error, once per open connection.
            if not self._closing:
                raise
        finally:
            if subscription is not None:
                subscription.close()
            if pump is not None:
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                    await pump
            writer.close()
            self._connections.discard(task)

    async def _answer(self, request: Request, peer: Peer) -> bytes:
        try:
            return encode_result(request.id, await self._handler(request, peer))
        except ApiError as exc:
            exc.request_id = request.id
            return encode_error(exc)
        except Exception:
            _log.exception("API %s failed", request.op)
            return encode_error(ApiError("internal", "the daemon failed; see its log", request.id))

    @staticmethod
    async def _pump(subscription: Subscription, writer: asyncio.StreamWriter) -> None:
        async for event in subscription:
            writer.write(encode_event(event))
            await writer.drain()
