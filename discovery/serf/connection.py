"""One connection to a Serf agent's RPC listener: ``SerfConnection``.

Requests may run concurrently; a single reader task matches response
headers to requests by ``Seq`` and knows, from the command, whether a body
follows (see ``discovery.serf.wire``).  A stream (``open_stream``) is a
``RecordStream``: a bounded queue a consumer reads at its own pace; an event
stream whose consumer falls behind loses records and says so with a
``StreamGap`` record.  Every wait is bounded by a timeout; a lost connection
fails every pending request and ends every stream with
``SerfConnectionError``.

The commands themselves, and what their answers mean, are ``SerfRPC``'s
(``discovery.serf.rpc``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import msgpack

from discovery.member import join_host
from discovery.serf.streams import STREAM_LIMIT, Call, RecordStream
from discovery.serf.wire import (
    SerfConnectionError,
    SerfError,
    SerfProtocolError,
    SerfTimeoutError,
    agent_error,
    is_header,
)

__all__ = ["DEFAULT_TIMEOUT", "SerfConnection"]

_log = logging.getLogger("discovery.serf.rpc")

#: Seconds any request waits for its answer unless told otherwise.
DEFAULT_TIMEOUT = 10.0
#: Largest response this client buffers (a member list of ~20k nodes).
MAX_BUFFER = 16 * 1024 * 1024
_READ_CHUNK = 64 * 1024
_NOTHING: Any = object()

T = TypeVar("T")


_Pending = Call | RecordStream[Any]


class SerfConnection:
    """Requests and streams on one TCP connection to a Serf agent, matched
    to their answers by ``Seq``; make it with ``open()``."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        address: str,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.address = address
        self.timeout = timeout
        sockname = writer.get_extra_info("sockname")
        #: This end's ``"ip:port"``, as the agent names this client in its log.
        self.local_address = join_host(sockname[0], sockname[1]) if sockname else ""
        self._reader = reader
        self._writer = writer
        self._unpacker = msgpack.Unpacker(
            raw=False, unicode_errors="surrogateescape", max_buffer_size=MAX_BUFFER
        )
        self._pushback: Any = _NOTHING
        self._pending: dict[int, _Pending] = {}
        self._seq = 0
        self._error: SerfError | None = None
        self._reading = asyncio.create_task(self._read_loop(), name=f"serf-rpc {address}")

    @classmethod
    async def open(cls, address: str, *, timeout: float = DEFAULT_TIMEOUT) -> SerfConnection:
        """Connect to the agent's RPC address ``"host:port"``."""
        host, sep, port_text = address.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port_text.isdigit():
            raise SerfConnectionError(f"bad serf RPC address {address!r} (want host:port)")
        port = int(port_text)
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port, limit=_READ_CHUNK)
        except (OSError, TimeoutError) as exc:
            raise SerfConnectionError(f"cannot reach serf agent at {address}: {exc!r}") from None
        return cls(reader, writer, address, timeout)

    @property
    def closed(self) -> bool:
        """The connection is closed or lost."""
        return self._error is not None

    async def close(self) -> None:
        """Close the connection; pending requests and streams fail."""
        self._shutdown(SerfConnectionError(f"connection to serf agent at {self.address} closed"))
        self._reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reading
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(1.0):
                await self._writer.wait_closed()

    # ------------------------------------------------------------ requests

    async def call(
        self,
        command: str,
        body: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        error_body: bool = False,
    ) -> Any:
        """Send a request; its answer's body (None if it has none).
        ``SerfAgentError`` if the agent answered an error; ``error_body``:
        a body is required."""
        error, response = await self.exchange(command, body, timeout=timeout)
        if error:
            raise agent_error(command, error)
        if error_body and response is None:
            raise SerfProtocolError(f"{command} answered without a body")
        return response

    async def exchange(
        self, command: str, body: Mapping[str, Any] | None, *, timeout: float | None
    ) -> tuple[str, Any]:
        """Send a request; its answer's error string and body."""
        seq = self._next_seq()
        call = Call(command)
        self._pending[seq] = call
        try:
            await self._send(command, seq, body)
            try:
                async with asyncio.timeout(timeout or self.timeout):
                    error, response = await call.future
            except TimeoutError:
                raise SerfTimeoutError(
                    f"serf agent at {self.address} did not answer {command!r} "
                    f"within {timeout or self.timeout:g}s"
                ) from None
        finally:
            if self._pending.get(seq) is call:
                del self._pending[seq]  # a late answer is then skipped as an orphan
        return error, response

    async def open_stream(
        self,
        command: str,
        body: Mapping[str, Any],
        parse: Callable[[Any], T | None],
        *,
        gap: Callable[[int], T] | None = None,
        limit: int = STREAM_LIMIT,
    ) -> RecordStream[T]:
        """Send a request that answers records under its ``Seq`` (``stream``,
        ``monitor``, ``query``); the stream of them, ``parse``d, once the
        agent has accepted it."""
        seq = self._next_seq()
        stream = RecordStream(command, seq, parse, gap=gap, limit=limit, on_close=self._forget)
        self._pending[seq] = stream
        try:
            await self._send(command, seq, body)
            async with asyncio.timeout(self.timeout):
                await asyncio.shield(stream.started)
        except TimeoutError:
            self._pending.pop(seq, None)
            raise SerfTimeoutError(
                f"serf agent at {self.address} did not start {command!r}"
            ) from None
        except BaseException:
            self._pending.pop(seq, None)
            raise
        return stream

    async def _forget(self, stream: RecordStream[Any]) -> None:
        """A closed stream: stopped at the agent (event and log streams) and
        forgotten (a query's, at its ``done``)."""
        if stream.command not in ("stream", "monitor"):
            return
        if not self.closed:
            with contextlib.suppress(SerfError):
                await self.call("stop", {"Stop": stream.seq})
        if self._pending.get(stream.seq) is stream:
            del self._pending[stream.seq]

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    async def _send(self, command: str, seq: int, body: Mapping[str, Any] | None) -> None:
        if self._error is not None:
            raise self._error
        data = msgpack.packb({"Command": command, "Seq": seq}, use_bin_type=True)
        if body is not None:
            data += msgpack.packb(body, use_bin_type=True)
        try:
            self._writer.write(data)
            async with asyncio.timeout(self.timeout):
                await self._writer.drain()
        except (OSError, RuntimeError, TimeoutError) as exc:
            # Part of a request may have gone: nothing after it can be framed.
            error = SerfConnectionError(f"cannot write to serf agent at {self.address}: {exc!r}")
            self._shutdown(error)
            raise error from None

    # ------------------------------------------------------------- answers

    async def _next(self) -> Any:
        if self._pushback is not _NOTHING:
            obj, self._pushback = self._pushback, _NOTHING
            return obj
        while True:
            try:
                return next(self._unpacker)
            except StopIteration:
                pass
            data = await self._reader.read(_READ_CHUNK)
            if not data:
                raise SerfConnectionError(f"serf agent at {self.address} closed the connection")
            self._unpacker.feed(data)

    async def _read_loop(self) -> None:
        try:
            while True:
                header = await self._next()
                if not is_header(header):
                    raise SerfProtocolError(f"expected a response header, got {header!r:.80}")
                seq, error = header["Seq"], header["Error"]
                if not isinstance(seq, int) or not isinstance(error, str):
                    raise SerfProtocolError(f"bad response header {header!r:.80}")
                pending = self._pending.get(seq)
                if pending is None:
                    # A request that timed out, or a stream record in flight
                    # after stop: its body, if any, is whatever is not a header.
                    following = await self._next()
                    if is_header(following):
                        self._pushback = following
                    _log.debug("skipped an answer to forgotten seq %d", seq)
                    continue
                body = await self._next() if pending.expects_body(error) else None
                if pending.deliver(error, body) and self._pending.get(seq) is pending:
                    del self._pending[seq]
        except asyncio.CancelledError:
            raise
        except SerfConnectionError as exc:
            self._shutdown(exc)
        except (SerfProtocolError, ValueError, msgpack.UnpackException) as exc:
            _log.warning("unreadable answer from serf agent at %s: %s", self.address, exc)
            self._shutdown(
                SerfProtocolError(f"unreadable answer from serf agent at {self.address}: {exc}")
            )
        except OSError as exc:
            self._shutdown(
                SerfConnectionError(f"connection to serf agent at {self.address} lost: {exc!r}")
            )
        finally:
            self._writer.close()

    def _shutdown(self, exc: SerfError) -> None:
        if self._error is not None:
            return
        self._error = exc
        pending, self._pending = self._pending, {}
        for handler in pending.values():
            handler.fail(exc)
        self._writer.close()
