"""An asyncio client for a Serf agent's RPC protocol (msgpack on TCP).

One ``SerfRPC`` is one connection: ``connect()`` opens it and performs the
``handshake`` (and ``auth`` when given a key).  Requests may run
concurrently; a single reader task matches response headers to requests by
``Seq`` and knows, from the command, whether a body follows (see
``discovery.serf.wire``).  Streams (``stream``, ``monitor``, ``query``) are
``RecordStream``s: bounded queues a consumer reads at its own pace; an event
stream whose consumer falls behind loses records and says so with a
``StreamGap`` record.  Every wait is bounded by a timeout; a lost connection
fails every pending request and ends every stream with
``SerfConnectionError``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import msgpack

from discovery.member import join_host
from discovery.serf.streams import STREAM_LIMIT, Call, RecordStream
from discovery.serf.wire import (
    IPC_VERSION,
    NO_BODY_ERRORS,
    KeyResponse,
    QueryRecord,
    SerfConnectionError,
    SerfError,
    SerfMember,
    SerfProtocolError,
    SerfTimeoutError,
    StreamGap,
    StreamRecord,
    agent_error,
    is_header,
    parse_key_response,
    parse_members,
    parse_query_record,
    parse_record,
)

__all__ = ["DEFAULT_TIMEOUT", "RecordStream", "SerfRPC"]

_log = logging.getLogger("discovery.serf.rpc")

#: Seconds any request waits for its answer unless told otherwise.
DEFAULT_TIMEOUT = 10.0
#: Largest response this client buffers (a member list of ~20k nodes).
MAX_BUFFER = 16 * 1024 * 1024
_READ_CHUNK = 64 * 1024
_NOTHING: Any = object()

T = TypeVar("T")


_Pending = Call | RecordStream[Any]


class SerfRPC:
    """One RPC connection to a Serf agent; make it with ``connect()``."""

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
    async def connect(
        cls, address: str, *, auth_key: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> SerfRPC:
        """Connect to the agent's RPC address ``"host:port"``, handshake, and
        authenticate with ``auth_key`` when given (``SerfAuthError`` if the
        agent refuses it)."""
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
        rpc = cls(reader, writer, address, timeout)
        try:
            await rpc._call("handshake", {"Version": IPC_VERSION})
            if auth_key is not None:
                await rpc._call("auth", {"AuthKey": auth_key})
        except BaseException:
            await rpc.close()
            raise
        return rpc

    @property
    def closed(self) -> bool:
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

    # ----------------------------------------------------------- commands

    async def members(self) -> list[SerfMember]:
        """Every member the agent knows, itself included."""
        return parse_members(await self._call("members"))

    async def members_filtered(
        self, tags: Mapping[str, str] | None = None, status: str = "", name: str = ""
    ) -> list[SerfMember]:
        """Members whose tags, status and name match the (Go RE2, anchored)
        regular expressions.  An invalid expression makes the agent close
        the connection without an answer (``SerfConnectionError``)."""
        body = {"Tags": dict(tags or {}), "Status": status, "Name": name}
        return parse_members(await self._call("members-filtered", body))

    async def join(
        self, addresses: Sequence[str], *, replay: bool = False, timeout: float | None = None
    ) -> int:
        """Join the members at ``"host:port"`` addresses; how many answered."""
        body = await self._call(
            "join",
            {"Existing": list(addresses), "Replay": replay},
            timeout=timeout,
            error_body=True,
        )
        num = body.get("Num") if isinstance(body, dict) else None
        if not isinstance(num, int):
            raise SerfProtocolError(f"join answered {body!r:.60}")
        return num

    async def leave(self) -> None:
        """Leave the cluster gracefully; the agent then shuts down."""
        await self._call("leave", timeout=max(self.timeout, 15.0))

    async def force_leave(self, node: str, *, prune: bool = False) -> None:
        """Mark a failed node as left (``prune``: forget it at once)."""
        await self._call("force-leave", {"Node": node, "Prune": prune})

    async def update_tags(
        self, tags: Mapping[str, str] | None = None, delete: Sequence[str] = ()
    ) -> None:
        """Set ``tags`` and delete the ``delete`` keys of the agent's tags."""
        await self._call("tags", {"Tags": dict(tags or {}), "DeleteTags": list(delete)})

    async def user_event(self, name: str, payload: bytes = b"", *, coalesce: bool = True) -> None:
        await self._call("event", {"Name": name, "Payload": payload, "Coalesce": coalesce})

    async def stats(self) -> dict[str, dict[str, str]]:
        """The agent's ``stats`` sections (``agent``, ``serf``, ``runtime``, ...)."""
        body = await self._call("stats")
        if not isinstance(body, dict):
            raise SerfProtocolError(f"stats answered {body!r:.60}")
        return {
            str(section): {str(k): str(v) for k, v in values.items()}
            for section, values in body.items()
            if isinstance(values, dict)
        }

    async def install_key(self, key: bytes, *, timeout: float | None = None) -> KeyResponse:
        """Install ``key`` on every member (not primary)."""
        return await self._key_call("install-key", key, timeout)

    async def use_key(self, key: bytes, *, timeout: float | None = None) -> KeyResponse:
        """Make ``key`` every member's primary key (each must hold it)."""
        return await self._key_call("use-key", key, timeout)

    async def remove_key(self, key: bytes, *, timeout: float | None = None) -> KeyResponse:
        """Remove ``key`` from every member (refused where it is primary)."""
        return await self._key_call("remove-key", key, timeout)

    async def list_keys(self, *, timeout: float | None = None) -> KeyResponse:
        """Every key installed on some member, and on how many (``keys``)."""
        return await self._key_call("list-keys", None, timeout)

    async def _key_call(
        self, command: str, key: bytes | None, timeout: float | None
    ) -> KeyResponse:
        """A key command: a query to every member, answered once all have
        answered or the query's deadline passed (bounded by a generous
        ``timeout``).  A ``KeyResponse`` whatever the members said;
        ``SerfAgentError`` only if the agent answered no body."""
        body = None if key is None else {"Key": base64.b64encode(key).decode("ascii")}
        error, response = await self._exchange(
            command, body, timeout=timeout or max(self.timeout, 30.0)
        )
        if error in NO_BODY_ERRORS or response is None:
            raise agent_error(command, error or "no answer")
        return parse_key_response(error, response)

    async def respond(self, query_id: int, payload: bytes) -> None:
        """Answer the query event ``query_id`` received on this connection."""
        await self._call("respond", {"ID": query_id, "Payload": payload})

    async def stop(self, seq: int) -> None:
        """Stop the stream or monitor started with ``seq`` (always succeeds)."""
        await self._call("stop", {"Stop": seq})

    async def stream(self, event_filter: str = "*") -> RecordStream[StreamRecord]:
        """Subscribe to events: ``"*"``, or a comma-separated list such as
        ``"member-join,member-leave,user:deploy,query:ping"``."""
        return await self._open(
            "stream", {"Type": event_filter}, parse_record, gap=StreamGap, limit=STREAM_LIMIT
        )

    async def monitor(self, level: str = "INFO") -> RecordStream[str]:
        """The agent's log lines at ``level`` and above."""

        def parse(body: Any) -> str:
            if not isinstance(body, dict) or not isinstance(body.get("Log"), str):
                raise SerfProtocolError(f"log record {body!r:.60}")
            line: str = body["Log"]
            return line

        return await self._open("monitor", {"LogLevel": level}, parse)

    async def query(
        self,
        name: str,
        payload: bytes = b"",
        *,
        filter_nodes: Sequence[str] = (),
        filter_tags: Mapping[str, str] | None = None,
        request_ack: bool = False,
        relay_factor: int = 0,
        timeout: float | None = None,
    ) -> RecordStream[QueryRecord]:
        """Send a query; its acks and responses arrive on the stream, which
        ends at the query's deadline (``timeout``, or Serf's default)."""
        body = {
            "FilterNodes": list(filter_nodes),
            "FilterTags": dict(filter_tags or {}),
            "RequestAck": request_ack,
            "RelayFactor": relay_factor,
            "Timeout": int((timeout or 0) * 1e9),  # a Go time.Duration
            "Name": name,
            "Payload": payload,
        }
        return await self._open("query", body, parse_query_record, limit=STREAM_LIMIT)

    # ------------------------------------------------------------ plumbing

    async def _forget(self, stream: RecordStream[Any]) -> None:
        """A closed stream: stopped at the agent (event and log streams) and
        forgotten (a query's, at its ``done``)."""
        if stream.command not in ("stream", "monitor"):
            return
        if not self.closed:
            with contextlib.suppress(SerfError):
                await self.stop(stream.seq)
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

    async def _call(
        self,
        command: str,
        body: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        error_body: bool = False,
    ) -> Any:
        error, response = await self._exchange(command, body, timeout=timeout)
        if error:
            raise agent_error(command, error)
        if error_body and response is None:
            raise SerfProtocolError(f"{command} answered without a body")
        return response

    async def _exchange(
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

    async def _open(
        self,
        command: str,
        body: Mapping[str, Any],
        parse: Callable[[Any], T | None],
        *,
        gap: Callable[[int], T] | None = None,
        limit: int = STREAM_LIMIT,
    ) -> RecordStream[T]:
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
