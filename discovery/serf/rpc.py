"""An asyncio client for a Serf agent's RPC protocol (msgpack on TCP).

One ``SerfRPC`` is one connection (a ``SerfConnection``, which matches the
agent's answers to requests and streams): ``connect()`` opens it and
performs the ``handshake`` (and ``auth`` when given a key).  Each method is
one of Serf's commands; the streams (``stream``, ``monitor``, ``query``) are
``RecordStream``s, read at the consumer's own pace.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence

from discovery.serf.connection import DEFAULT_TIMEOUT, SerfConnection
from discovery.serf.streams import STREAM_LIMIT, RecordStream
from discovery.serf.wire import (
    IPC_VERSION,
    NO_BODY_ERRORS,
    KeyResponse,
    QueryRecord,
    SerfMember,
    SerfProtocolError,
    StreamGap,
    StreamRecord,
    agent_error,
    parse_key_response,
    parse_log_record,
    parse_members,
    parse_query_record,
    parse_record,
)

__all__ = ["RecordStream", "SerfRPC"]


class SerfRPC:
    """Serf's RPC commands on one connection to an agent; make it with
    ``connect()``."""

    def __init__(self, connection: SerfConnection) -> None:
        self._connection = connection

    @classmethod
    async def connect(
        cls, address: str, *, auth_key: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> SerfRPC:
        """Connect to the agent's RPC address ``"host:port"``, handshake, and
        authenticate with ``auth_key`` when given (``SerfAuthError`` if the
        agent refuses it)."""
        connection = await SerfConnection.open(address, timeout=timeout)
        try:
            await connection.call("handshake", {"Version": IPC_VERSION})
            if auth_key is not None:
                await connection.call("auth", {"AuthKey": auth_key})
        except BaseException:
            await connection.close()
            raise
        return cls(connection)

    @property
    def address(self) -> str:
        """The agent's RPC address."""
        return self._connection.address

    @property
    def timeout(self) -> float:
        """Seconds a request waits for its answer unless told otherwise."""
        return self._connection.timeout

    @property
    def local_address(self) -> str:
        """This end's ``"ip:port"``, as the agent names this client in its log."""
        return self._connection.local_address

    @property
    def closed(self) -> bool:
        """The connection is closed or lost."""
        return self._connection.closed

    async def close(self) -> None:
        """Close the connection; pending requests and streams fail."""
        await self._connection.close()

    # ----------------------------------------------------------- commands

    async def members(self) -> list[SerfMember]:
        """Every member the agent knows, itself included."""
        return parse_members(await self._connection.call("members"))

    async def members_filtered(
        self, tags: Mapping[str, str] | None = None, status: str = "", name: str = ""
    ) -> list[SerfMember]:
        """Members whose tags, status and name match the (Go RE2, anchored)
        regular expressions.  An invalid expression makes the agent close
        the connection without an answer (``SerfConnectionError``)."""
        body = {"Tags": dict(tags or {}), "Status": status, "Name": name}
        return parse_members(await self._connection.call("members-filtered", body))

    async def join(
        self, addresses: Sequence[str], *, replay: bool = False, timeout: float | None = None
    ) -> int:
        """Join the members at ``"host:port"`` addresses; how many answered."""
        body = await self._connection.call(
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
        await self._connection.call("leave", timeout=max(self.timeout, 15.0))

    async def force_leave(self, node: str, *, prune: bool = False) -> None:
        """Mark a failed node as left (``prune``: forget it at once)."""
        await self._connection.call("force-leave", {"Node": node, "Prune": prune})

    async def update_tags(
        self, tags: Mapping[str, str] | None = None, delete: Sequence[str] = ()
    ) -> None:
        """Set ``tags`` and delete the ``delete`` keys of the agent's tags."""
        await self._connection.call("tags", {"Tags": dict(tags or {}), "DeleteTags": list(delete)})

    async def user_event(self, name: str, payload: bytes = b"", *, coalesce: bool = True) -> None:
        """Send the user event ``name`` to every member (``coalesce``: Serf
        may deliver only the last of a burst of that name)."""
        await self._connection.call(
            "event", {"Name": name, "Payload": payload, "Coalesce": coalesce}
        )

    async def stats(self) -> dict[str, dict[str, str]]:
        """The agent's ``stats`` sections (``agent``, ``serf``, ``runtime``, ...)."""
        body = await self._connection.call("stats")
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
        error, response = await self._connection.exchange(
            command, body, timeout=timeout or max(self.timeout, 30.0)
        )
        if error in NO_BODY_ERRORS or response is None:
            raise agent_error(command, error or "no answer")
        return parse_key_response(error, response)

    async def respond(self, query_id: int, payload: bytes) -> None:
        """Answer the query event ``query_id`` received on this connection."""
        await self._connection.call("respond", {"ID": query_id, "Payload": payload})

    async def stop(self, seq: int) -> None:
        """Stop the stream or monitor started with ``seq`` (always succeeds)."""
        await self._connection.call("stop", {"Stop": seq})

    async def stream(self, event_filter: str = "*") -> RecordStream[StreamRecord]:
        """Subscribe to events: ``"*"``, or a comma-separated list such as
        ``"member-join,member-leave,user:deploy,query:ping"``."""
        return await self._connection.open_stream(
            "stream", {"Type": event_filter}, parse_record, gap=StreamGap, limit=STREAM_LIMIT
        )

    async def monitor(self, level: str = "INFO") -> RecordStream[str]:
        """The agent's log lines at ``level`` and above."""
        return await self._connection.open_stream("monitor", {"LogLevel": level}, parse_log_record)

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
        return await self._connection.open_stream(
            "query", body, parse_query_record, limit=STREAM_LIMIT
        )
