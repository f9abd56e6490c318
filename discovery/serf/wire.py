"""What travels on a Serf agent's RPC connection, and its errors.

Serf's RPC protocol ("IPC version 1", ``cmd/serf/command/agent/ipc.go``) is
msgpack on one TCP connection, with no framing of its own:

* a request is a header map ``{"Command": str, "Seq": int}``, then a body map
  for the commands that take arguments;
* a response is a header map ``{"Seq": int, "Error": str}``, then a body map
  for the commands that return something (``_BODY_COMMANDS``).  Nothing on
  the wire says whether a body follows: the reader must know the command
  its ``Seq`` answers.  Some errors come without a body whatever the
  command (``NO_BODY_ERRORS``);
* ``stream``, ``monitor`` and ``query`` answer a header first, then keep
  sending header + record pairs under the same ``Seq`` (an event stream until
  ``stop``, a query until its ``done`` record);
* the key commands (``install-key``, ``use-key``, ``remove-key``: body
  ``{"Key": base64}``; ``list-keys``: no body) act on every member through an
  internal query, and always answer a body (``KeyResponse``), also with an
  error that only says some members failed or did not answer.

Field names are Go's, case and all.  Strings arrive as msgpack ``str``,
byte slices (``Addr``, ``Payload``) as ``bin``.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from discovery.engine import EngineError
from discovery.member import join_host

__all__ = [
    "NO_BODY_ERRORS",
    "KeyResponse",
    "MemberEvent",
    "QueryEvent",
    "QueryRecord",
    "SerfAgentError",
    "SerfAuthError",
    "SerfConnectionError",
    "SerfError",
    "SerfMember",
    "SerfProtocolError",
    "SerfTimeoutError",
    "StreamGap",
    "StreamRecord",
    "UserEvent",
    "decode_addr",
    "has_body",
    "parse_key_response",
    "parse_log_record",
    "parse_record",
]

#: The only protocol version Serf speaks (``MinIPCVersion == MaxIPCVersion``).
IPC_VERSION = 1

# Errors the agent sends as a bare header, whatever the command was.
AUTH_REQUIRED = "Authentication required"
INVALID_AUTH = "Invalid authentication token"
HANDSHAKE_REQUIRED = "Handshake required"
UNSUPPORTED_COMMAND = "Unsupported command"
NO_BODY_ERRORS = frozenset({AUTH_REQUIRED, HANDSHAKE_REQUIRED, UNSUPPORTED_COMMAND})

#: Commands whose (first) response header is followed by a body, errors
#: other than ``NO_BODY_ERRORS`` included (the agent always sends it).
_BODY_COMMANDS = frozenset(
    {
        "join",
        "members",
        "members-filtered",
        "stats",
        "get-coordinate",
        "install-key",
        "use-key",
        "remove-key",
        "list-keys",
    }
)

#: Serf's member statuses (``serf.MemberStatus.String()``).
MemberStatus = Literal["none", "alive", "leaving", "left", "failed"]
MEMBER_EVENTS = frozenset(
    {"member-join", "member-leave", "member-failed", "member-update", "member-reap"}
)


# ----------------------------------------------------------------- errors


class SerfError(EngineError):
    """Anything that went wrong talking to a Serf agent."""


class SerfConnectionError(SerfError):
    """The agent cannot be reached, or the connection to it was lost."""


class SerfTimeoutError(SerfConnectionError):
    """The agent did not answer in time (the connection is closed then)."""


class SerfProtocolError(SerfError):
    """The agent sent something this client cannot read (the connection is
    closed then: with no framing, nothing after it can be trusted)."""


class SerfAgentError(SerfError):
    """The agent refused a request; ``reason`` is its error string."""

    def __init__(self, command: str, reason: str) -> None:
        super().__init__(f"serf agent refused {command!r}: {reason}")
        self.command = command
        self.reason = reason


class SerfAuthError(SerfAgentError):
    """Wrong RPC auth key, or none given to an agent that wants one."""


def agent_error(command: str, reason: str) -> SerfAgentError:
    """The exception for the agent's error string ``reason``."""
    if reason in (AUTH_REQUIRED, INVALID_AUTH):
        return SerfAuthError(command, reason)
    return SerfAgentError(command, reason)


def has_body(command: str, error: str) -> bool:
    """Whether the first response to ``command`` carries a body."""
    return command in _BODY_COMMANDS and error not in NO_BODY_ERRORS


def is_header(obj: Any) -> bool:
    """A response header; bodies never have exactly these keys."""
    return isinstance(obj, dict) and obj.keys() == {"Seq", "Error"}


# ---------------------------------------------------------------- members


def decode_addr(raw: Any) -> str:
    """A Go ``net.IP`` (4 or 16 bytes) as text; IPv4-mapped IPv6 as IPv4."""
    if isinstance(raw, str):  # a str-typed Addr decoded with surrogateescape
        raw = raw.encode("utf-8", "surrogateescape")
    if not isinstance(raw, bytes | bytearray):
        raise SerfProtocolError(f"member Addr is not bytes: {raw!r:.40}")
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(bytes(raw)))
    if len(raw) == 16:
        ip = ipaddress.IPv6Address(bytes(raw))
        return str(ip.ipv4_mapped) if ip.ipv4_mapped is not None else str(ip)
    raise SerfProtocolError(f"member Addr of {len(raw)} bytes (want 4 or 16)")


def _str(raw: Mapping[str, Any], key: str) -> str:
    value = raw.get(key, "")
    if not isinstance(value, str):
        raise SerfProtocolError(f"{key} is not a string: {value!r:.40}")
    return value


def _int(raw: Mapping[str, Any], key: str) -> int:
    value = raw.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool):
        raise SerfProtocolError(f"{key} is not an integer: {value!r:.40}")
    return value


def _bytes(raw: Mapping[str, Any], key: str) -> bytes:
    value = raw.get(key)
    if value is None:
        return b""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if not isinstance(value, bytes):
        raise SerfProtocolError(f"{key} is not bytes: {value!r:.40}")
    return value


@dataclass(frozen=True)
class SerfMember:
    """One member as the agent describes it (``agent.Member``)."""

    name: str
    addr: str  # the IP, normalised
    port: int
    tags: Mapping[str, str] = field(default_factory=dict, hash=False)
    status: MemberStatus | str = "alive"
    protocol: tuple[int, int, int] = (0, 0, 0)  # memberlist min, max, current
    delegate: tuple[int, int, int] = (0, 0, 0)  # serf min, max, current

    @property
    def address(self) -> str:
        """``"ip:port"`` of its gossip endpoint."""
        return join_host(self.addr, self.port)

    @classmethod
    def from_wire(cls, raw: Any) -> SerfMember:
        if not isinstance(raw, dict):
            raise SerfProtocolError(f"member is not a map: {raw!r:.60}")
        tags = raw.get("Tags") or {}
        if not isinstance(tags, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in tags.items()
        ):
            raise SerfProtocolError(f"member Tags is not a string map: {tags!r:.60}")
        return cls(
            name=_str(raw, "Name"),
            addr=decode_addr(raw.get("Addr")),
            port=_int(raw, "Port"),
            tags=tags,
            status=_str(raw, "Status"),
            protocol=(_int(raw, "ProtocolMin"), _int(raw, "ProtocolMax"), _int(raw, "ProtocolCur")),
            delegate=(_int(raw, "DelegateMin"), _int(raw, "DelegateMax"), _int(raw, "DelegateCur")),
        )


def parse_members(body: Any) -> list[SerfMember]:
    """The body of ``members`` / ``members-filtered``."""
    if not isinstance(body, dict) or not isinstance(body.get("Members") or [], list):
        raise SerfProtocolError(f"members body is not a member list: {body!r:.60}")
    return [SerfMember.from_wire(m) for m in body.get("Members") or []]


# --------------------------------------------------------- stream records


@dataclass(frozen=True)
class MemberEvent:
    """``member-join``, ``-leave``, ``-failed``, ``-update`` or ``-reap``."""

    event: str
    members: tuple[SerfMember, ...]


@dataclass(frozen=True)
class UserEvent:
    """A user event (``serf event``)."""

    ltime: int
    name: str
    payload: bytes
    coalesce: bool


@dataclass(frozen=True)
class QueryEvent:
    """A query this client may answer with ``respond(id, ...)`` (on the same
    connection, before the query's deadline)."""

    id: int
    ltime: int
    name: str
    payload: bytes


@dataclass(frozen=True)
class StreamGap:
    """``dropped`` records were lost here because the consumer fell behind."""

    dropped: int


StreamRecord = MemberEvent | UserEvent | QueryEvent | StreamGap


def parse_record(body: Any) -> MemberEvent | UserEvent | QueryEvent:
    """One record of an event stream."""
    if not isinstance(body, dict):
        raise SerfProtocolError(f"stream record is not a map: {body!r:.60}")
    event = _str(body, "Event")
    if event in MEMBER_EVENTS:
        members = body.get("Members") or []
        if not isinstance(members, list):
            raise SerfProtocolError("member event without a member list")
        return MemberEvent(event, tuple(SerfMember.from_wire(m) for m in members))
    if event == "user":
        return UserEvent(
            _int(body, "LTime"),
            _str(body, "Name"),
            _bytes(body, "Payload"),
            bool(body.get("Coalesce")),
        )
    if event == "query":
        return QueryEvent(
            _int(body, "ID"), _int(body, "LTime"), _str(body, "Name"), _bytes(body, "Payload")
        )
    raise SerfProtocolError(f"unknown stream event {event!r:.40}")


@dataclass(frozen=True)
class QueryRecord:
    """An ``ack`` or a ``response`` from node ``source`` to our query."""

    kind: Literal["ack", "response"]
    source: str
    payload: bytes = b""


def parse_query_record(body: Any) -> QueryRecord | None:
    """One record of a query's response stream; None for ``done``."""
    if not isinstance(body, dict):
        raise SerfProtocolError(f"query record is not a map: {body!r:.60}")
    kind = _str(body, "Type")
    if kind == "done":
        return None
    if kind == "ack":
        return QueryRecord("ack", _str(body, "From"))
    if kind == "response":
        return QueryRecord("response", _str(body, "From"), _bytes(body, "Payload"))
    raise SerfProtocolError(f"unknown query record type {kind!r:.40}")


def parse_log_record(body: Any) -> str:
    """One line of a ``monitor`` stream."""
    if not isinstance(body, dict) or not isinstance(body.get("Log"), str):
        raise SerfProtocolError(f"log record {body!r:.60}")
    line: str = body["Log"]
    return line


# ------------------------------------------------------------------- keys


@dataclass(frozen=True)
class KeyResponse:
    """The answer to a key command (``keyResponse`` in Serf's ``ipc.go``).

    ``nodes``: the members the command went to (the live ones), of which
    ``responses`` answered and ``failures`` failed; ``messages``: what the
    failed ones said, by node name; ``keys`` (``list-keys``): every key
    installed somewhere and on how many members; ``error``: the agent's
    error string, empty when every member answered and none failed."""

    error: str
    nodes: int
    responses: int
    failures: int
    messages: Mapping[str, str] = field(default_factory=dict, hash=False)
    keys: Mapping[bytes, int] = field(default_factory=dict, hash=False)


def parse_key_response(error: str, body: Any) -> KeyResponse:
    """A key command's answer from its header's error and its body."""
    if not isinstance(body, dict):
        raise SerfProtocolError(f"key response is not a map: {body!r:.60}")
    messages = body.get("Messages") or {}
    keys = body.get("Keys") or {}
    if not isinstance(messages, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in messages.items()
    ):
        raise SerfProtocolError(f"key response Messages is not a string map: {messages!r:.60}")
    if not isinstance(keys, dict) or not all(
        isinstance(k, str) and isinstance(v, int) for k, v in keys.items()
    ):
        raise SerfProtocolError(f"key response Keys is not a count map: {keys!r:.60}")
    try:
        counts = {base64.b64decode(k, validate=True): v for k, v in keys.items()}
    except (binascii.Error, ValueError):
        raise SerfProtocolError("key response Keys holds a key that is not base64") from None
    return KeyResponse(
        error,
        _int(body, "NumNodes"),
        _int(body, "NumResp"),
        _int(body, "NumErr"),
        messages,
        counts,
    )
