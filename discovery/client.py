"""A small asyncio client of the sidecar's local API.

What the library (and the ``aiocoloc`` CLI) use to ask ``aiocoloc-discoveryd``
about membership.  Cheap to import: no engine, no shared memory.  Every call
is bounded by the client's ``timeout``; when no daemon answers (no socket,
connection refused, no answer in time, the daemon going away) it raises
``SidecarUnavailable`` and the caller falls back (the library to its host
registry).  Reconnecting is the caller's choice: a later call simply
connects again, and a subscription that ends raises ``SidecarUnavailable``
from its iterator.

    client = SidecarClient()                 # default_api_path()
    answer = await client.colocated("10.0.0.7:8080")
    if answer.colocated: ...                 # answer.pool, answer.endpoints
    async with await client.subscribe() as feed:
        async for event in feed: ...
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from discovery.api_messages import (
    MAX_LINE,
    ApiError,
    Colocation,
    MemberView,
    PoolInfo,
    Reply,
    decode_server_line,
    encode_request,
)
from discovery.events import Event

__all__ = [
    "API_ENV",
    "DEFAULT_TIMEOUT",
    "ApiError",
    "EventFeed",
    "SidecarClient",
    "SidecarUnavailable",
    "default_api_path",
    "runtime_dir",
]

#: Environment variable naming the API socket (overrides the default path).
API_ENV = "AIOCOLOC_DISCOVERY_API"
#: The socket's name in the runtime directory.
API_SOCKET_NAME = "discoveryd.sock"
#: Seconds a call waits for the daemon, connecting included.
DEFAULT_TIMEOUT = 5.0
T = TypeVar("T")
# Operations that change nothing: retried once on a fresh connection when a
# kept one turns out dead (the daemon restarted since).
_READ_ONLY = frozenset({"status", "members", "colocated", "pools"})


class SidecarUnavailable(ConnectionError):
    """No sidecar answers on the API socket (absent, refused, silent or gone)."""


def runtime_dir() -> Path:
    """The per-user runtime directory: ``$AIOCOLOC_RUNTIME_DIR``, else
    ``$XDG_RUNTIME_DIR/aiocoloc``, else ``/tmp/aiocoloc-<uid>``.

    The same rule as the library's host registry
    (``aiocoloc.connect.registry.default_directory``, which this module does
    not import to stay cheap); a test checks the two agree."""
    explicit = os.environ.get("AIOCOLOC_RUNTIME_DIR")
    if explicit:
        return Path(explicit)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "aiocoloc"
    return Path(tempfile.gettempdir()) / f"aiocoloc-{os.getuid()}"


def default_api_path() -> Path:
    """Where the daemon listens and clients connect by default:
    ``$AIOCOLOC_DISCOVERY_API``, else ``discoveryd.sock`` in ``runtime_dir()``."""
    explicit = os.environ.get(API_ENV)
    if explicit:
        return Path(explicit)
    return runtime_dir() / API_SOCKET_NAME


class _Connection:
    """One connection to the daemon: requests in order, lines back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.loop = asyncio.get_running_loop()
        self.next_id = 1

    @classmethod
    async def open(cls, path: Path) -> _Connection:
        try:
            reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_LINE)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise SidecarUnavailable(
                f"no aiocoloc-discoveryd answers on {path} ({exc.strerror or exc})"
            ) from None
        except OSError as exc:  # permission denied, not a socket, path too long
            raise SidecarUnavailable(f"cannot reach aiocoloc-discoveryd on {path}: {exc}") from None
        # Whoever can put a socket at the path could answer in the daemon's
        # place: only our own user's daemon (or root's) is believed.
        sock = writer.get_extra_info("socket")
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        uid = struct.unpack("3i", raw)[1]
        if uid not in (os.getuid(), 0):
            writer.close()
            raise SidecarUnavailable(f"{path} is served by uid {uid}, not by us; not using it")
        return cls(reader, writer)

    async def send(self, op: str, args: dict[str, Any]) -> int:
        request_id = self.next_id
        self.next_id += 1
        self.writer.write(encode_request(op, request_id, **args))
        await self.writer.drain()
        return request_id

    async def read(self) -> Reply | Event:
        """The next line the daemon writes; ``SidecarUnavailable`` at EOF."""
        try:
            line = await self.reader.readline()
        except ValueError:  # longer than MAX_LINE: not our daemon, or a broken one
            raise SidecarUnavailable("the sidecar sent a line longer than the API allows") from None
        if not line.endswith(b"\n"):
            raise SidecarUnavailable("the sidecar closed the connection")
        try:
            return decode_server_line(line)
        except ApiError as exc:
            raise SidecarUnavailable(f"the sidecar sent garbage: {exc.message}") from None

    async def call(self, op: str, args: dict[str, Any]) -> Any:
        request_id = await self.send(op, args)
        while True:
            message = await self.read()
            if isinstance(message, Event):
                continue  # a subscription's event: not what we wait for
            if message.id != request_id and message.id is not None:
                continue
            if message.error is not None:
                if message.error.code == "forbidden":
                    raise SidecarUnavailable(f"the sidecar refused us: {message.error.message}")
                raise message.error
            return message.result

    def close(self) -> None:
        self.writer.close()


class SidecarClient:
    """A client of the local API at ``path`` (default ``default_api_path()``).

    Keeps one connection per event loop, opened on first use.  Calls raise
    ``SidecarUnavailable`` when no daemon answers within ``timeout`` seconds,
    and ``ApiError`` when it answers with an error (bad request, unknown
    pool, ...).  ``close()`` (or ``async with``) when done.
    """

    def __init__(
        self, path: str | os.PathLike[str] | None = None, *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.path = Path(path) if path is not None else default_api_path()
        self.timeout = timeout
        self._conn: _Connection | None = None
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None

    async def request(self, op: str, **args: Any) -> Any:
        """Send one request and return its result (the raw JSON value)."""
        loop = asyncio.get_running_loop()
        if self._conn is not None and self._conn.loop is not loop:
            self._drop()  # a connection made on another loop cannot serve this one
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        async with self._lock:
            try:
                async with asyncio.timeout(self.timeout):
                    return await self._request(op, args)
            except TimeoutError:
                self._drop()  # its reply may still come: never read it as another's
                raise SidecarUnavailable(
                    f"aiocoloc-discoveryd on {self.path} did not answer within {self.timeout} s"
                ) from None

    async def _request(self, op: str, args: dict[str, Any]) -> Any:
        for attempt in (1, 2):
            reused = self._conn is not None
            if self._conn is None:
                self._conn = await _Connection.open(self.path)
            try:
                return await self._conn.call(op, args)
            except ApiError:
                raise  # the daemon answered: the connection is fine
            except ConnectionError as exc:
                self._drop()
                if reused and attempt == 1 and op in _READ_ONLY:
                    continue  # the kept connection was dead (a restarted daemon): afresh
                raise _unavailable(exc, self.path) from None
            except BaseException:
                self._drop()  # cancelled mid-call: a late reply must not be read as another's
                raise
        raise AssertionError("unreachable")

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- the operations -------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """The daemon's status (node, engine, profile, counts)."""
        result = await self.request("status")
        if not isinstance(result, dict):
            raise SidecarUnavailable("the sidecar sent a status that is not an object")
        return result

    async def members(self) -> list[MemberView]:
        """Every member the daemon knows, itself included."""
        result = await self.request("members")
        return [_parsed(MemberView.from_json, m) for m in _list(result, "members")]

    async def colocated(self, address: str) -> Colocation:
        """Whether ``address`` (``"ip"`` or ``"ip:port"``, ``"[v6]:port"``)
        belongs to a member co-located with us, and through which pool."""
        return _parsed(Colocation.from_json, await self.request("colocated", address=address))

    async def pools(self) -> list[PoolInfo]:
        """The pools the daemon maps."""
        result = await self.request("pools")
        return [_parsed(PoolInfo.from_json, p) for p in _list(result, "pools")]

    async def attach_pool(self, name: str) -> PoolInfo:
        """Map the pool ``name`` (a POSIX shm name or an ivshmem device path)."""
        result = await self.request("pools.attach", name=name)
        return _parsed(PoolInfo.from_json, result.get("pool") if isinstance(result, dict) else None)

    async def detach_pool(self, name: str) -> PoolInfo:
        """Unmap the pool ``name`` (as attached, or its pool id)."""
        result = await self.request("pools.detach", name=name)
        return _parsed(PoolInfo.from_json, result.get("pool") if isinstance(result, dict) else None)

    async def advertise(self, endpoints: Sequence[str]) -> list[str]:
        """Add control endpoints to our member record; they are withdrawn when
        this process exits (or by ``withdraw``).  Returns all advertised."""
        return _strings(await self.request("advertise", endpoints=list(endpoints)))

    async def withdraw(self, endpoints: Sequence[str]) -> list[str]:
        """Remove control endpoints from our member record.  Returns those left."""
        return _strings(await self.request("withdraw", endpoints=list(endpoints)))

    async def subscribe(self) -> EventFeed:
        """A feed of membership events from now on, on a connection of its own.

        Returns once the daemon has confirmed the subscription, so no event
        after that moment is missed."""
        try:
            async with asyncio.timeout(self.timeout):
                conn = await _Connection.open(self.path)
                try:
                    await conn.call("subscribe", {})
                except BaseException:
                    conn.close()
                    raise
        except TimeoutError:
            raise SidecarUnavailable(
                f"aiocoloc-discoveryd on {self.path} did not answer within {self.timeout} s"
            ) from None
        except ConnectionError as exc:
            raise _unavailable(exc, self.path) from None
        return EventFeed(conn)

    async def close(self) -> None:
        """Close the kept connection.  Idempotent."""
        self._drop()

    async def __aenter__(self) -> SidecarClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class EventFeed:
    """A subscription's events, in order: ``async for event in feed``.

    The iterator raises ``SidecarUnavailable`` when the daemon goes away (a
    ``resync`` event means the daemon dropped events for us: read
    ``members()`` again).  ``aclose()`` (or ``async with``) ends it."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.closed = False

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        if self.closed:
            raise StopAsyncIteration
        while True:
            try:
                message = await self._conn.read()
            except ConnectionError as exc:
                await self.aclose()
                raise _unavailable(exc, "the API socket") from None
            if isinstance(message, Event):
                return message

    async def aclose(self) -> None:
        """Stop the feed and close its connection.  Idempotent."""
        if not self.closed:
            self.closed = True
            self._conn.close()

    async def __aenter__(self) -> EventFeed:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _unavailable(exc: ConnectionError, where: object) -> SidecarUnavailable:
    if isinstance(exc, SidecarUnavailable):
        return exc
    return SidecarUnavailable(f"lost the sidecar on {where}: {exc}")


def _parsed(decode: Callable[[Any], T], raw: Any) -> T:
    """``decode(raw)``; a daemon whose answer does not parse is as good as none."""
    try:
        return decode(raw)
    except ApiError as exc:
        raise SidecarUnavailable(f"the sidecar's answer does not parse: {exc.message}") from None


def _list(result: Any, key: str) -> list[Any]:
    value = result.get(key) if isinstance(result, dict) else None
    if not isinstance(value, list):
        raise SidecarUnavailable(f"the sidecar's answer has no list {key!r}")
    return value


def _strings(result: Any) -> list[str]:
    value = _list(result, "endpoints")
    if not all(isinstance(e, str) for e in value):
        raise SidecarUnavailable("the sidecar's endpoints are not strings")
    return value
