"""The local API's wire format: every message, its codec and its validation.

The sidecar (``aiocoloc-discoveryd``) answers on a Unix socket, owner-only.
Messages are JSON objects, one per line (UTF-8, ``\\n``-terminated, at most
``MAX_LINE`` bytes), so an operator can talk to it with
``socat - UNIX-CONNECT:$sock``::

    -> {"op": "colocated", "address": "10.0.0.7:8080", "id": 3}
    <- {"id": 3, "ok": true, "result": {"colocated": true, "pool": "…", …}}
    -> {"op": "pools.attach", "name": "nope"}
    <- {"id": null, "ok": false, "error": {"code": "not-found", "message": "…"}}

A request is ``{"op": OP, ...its arguments..., "id": ANY?, "v": INT?}``;
``id`` (a string, an integer or null) is echoed in the reply, ``v`` is the
API version the client speaks (default 1; a daemon refuses a newer one).
After ``subscribe`` the daemon also writes ``{"event": EVENT}`` lines on
that connection as membership changes, ``EVENT`` being ``Event.to_json()``.

Operations (``OPS``: name -> arguments):

==============  ==========================  ===================================
op              arguments                   result
==============  ==========================  ===================================
status          --                          node, engine, profile, counts, ...
members         --                          ``{"members": [MEMBER_VIEW, ...]}``
colocated       address: "ip[:port]"        COLOCATION
subscribe       --                          ``{"subscribed": true}``, then events
pools           --                          ``{"pools": [POOL, ...]}``
pools.attach    name: spec                  ``{"pool": POOL}``
pools.detach    name: spec or pool id       ``{"pool": POOL}``
advertise       endpoints: [str, ...]       ``{"endpoints": [str, ...]}`` (all)
withdraw        endpoints: [str, ...]       ``{"endpoints": [str, ...]}`` (all)
==============  ==========================  ===================================

Version history -- append only, the numbers are the protocol:

- 1: the operations above.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from discovery.events import KINDS, Event
from discovery.member import Member, MemberError

__all__ = [
    "API_VERSION",
    "ERROR_CODES",
    "MAX_ENDPOINT",
    "MAX_LINE",
    "OPS",
    "ApiError",
    "Colocation",
    "MemberView",
    "PoolInfo",
    "Reply",
    "Request",
    "decode_event",
    "decode_request",
    "decode_server_line",
    "encode_error",
    "encode_event",
    "encode_request",
    "encode_result",
]

#: The API version this module speaks.
API_VERSION: Final = 1
#: Longest line either side accepts, newline included.
MAX_LINE: Final = 64 * 1024
#: Longest endpoint string a client may advertise.
MAX_ENDPOINT: Final = 200

#: Error codes a reply may carry.
ERROR_CODES: Final = frozenset(
    {
        "bad-request",  # not JSON, not an object, a bad argument
        "unknown-op",
        "unsupported-version",
        "not-found",  # no such pool / member
        "conflict",  # already attached, already advertised by someone else
        "limit",  # too many pools or endpoints for a member record
        "failed",  # the operation was valid but did not succeed
        "forbidden",  # a peer of another user
        "internal",  # a bug in the daemon: it is logged there
    }
)

# Each operation's arguments: name -> (type check, what to say when it fails).
_STR = (lambda v: isinstance(v, str) and 0 < len(v) <= 1024, "a non-empty string")
_ENDPOINTS = (
    lambda v: (
        isinstance(v, list) and all(isinstance(e, str) and 0 < len(e) <= MAX_ENDPOINT for e in v)
    ),
    f"a list of non-empty strings of at most {MAX_ENDPOINT} characters",
)
OPS: Final[Mapping[str, Mapping[str, tuple[Any, str]]]] = {
    "status": {},
    "members": {},
    "colocated": {"address": _STR},
    "subscribe": {},
    "pools": {},
    "pools.attach": {"name": _STR},
    "pools.detach": {"name": _STR},
    "advertise": {"endpoints": _ENDPOINTS},
    "withdraw": {"endpoints": _ENDPOINTS},
}
_ENVELOPE = frozenset({"op", "id", "v"})


class ApiError(Exception):
    """An error reply: raised by the daemon's handlers, and by the client
    when the daemon answers with one."""

    def __init__(self, code: str, message: str, request_id: object = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code  # a newer daemon may send codes not in ERROR_CODES
        self.message = message
        self.request_id = request_id


@dataclass(frozen=True)
class Request:
    """One decoded, validated request."""

    op: str
    args: Mapping[str, Any]
    id: str | int | None = None


@dataclass(frozen=True)
class Reply:
    """One decoded reply: ``result`` when ``ok``, else ``error``."""

    id: object
    ok: bool
    result: Any = None
    error: ApiError | None = None


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def _loads(line: bytes) -> Any:
    if len(line) > MAX_LINE:
        raise ApiError("bad-request", f"line longer than {MAX_LINE} bytes")
    try:
        return json.loads(line)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ApiError("bad-request", f"not JSON: {exc}") from None


# -- requests ---------------------------------------------------------------------


def encode_request(op: str, request_id: str | int | None = None, **args: Any) -> bytes:
    """One request line."""
    return _dumps({"v": API_VERSION, "id": request_id, "op": op, **args})


def decode_request(line: bytes) -> Request:
    """The request on ``line``; ``ApiError`` (carrying the id when one was
    readable) when it is not a valid request of this version."""
    raw = _loads(line)
    if not isinstance(raw, dict):
        raise ApiError("bad-request", "a request is a JSON object")
    request_id = raw.get("id")
    if isinstance(request_id, bool) or not isinstance(request_id, str | int | None):
        raise ApiError("bad-request", "'id' must be a string, an integer or null")
    version = raw.get("v", API_VERSION)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ApiError("bad-request", "'v' must be an integer", request_id)
    if version > API_VERSION or version < 1:
        raise ApiError(
            "unsupported-version",
            f"this daemon speaks API version {API_VERSION}, not {version}",
            request_id,
        )
    op = raw.get("op")
    if not isinstance(op, str):
        raise ApiError("bad-request", "'op' is missing or not a string", request_id)
    if op not in OPS:
        raise ApiError(
            "unknown-op", f"unknown op {op!r:.60}; known: {', '.join(sorted(OPS))}", request_id
        )
    spec = OPS[op]
    args = {k: v for k, v in raw.items() if k not in _ENVELOPE}
    unknown = sorted(set(args) - set(spec))
    if unknown:
        raise ApiError("bad-request", f"{op}: unknown argument {unknown[0]!r:.60}", request_id)
    for name, (check, what) in spec.items():
        if name not in args:
            raise ApiError("bad-request", f"{op}: missing argument {name!r}", request_id)
        if not check(args[name]):
            raise ApiError("bad-request", f"{op}: {name!r} must be {what}", request_id)
    return Request(op, args, request_id)


# -- replies and events (daemon -> client) ----------------------------------------


def encode_result(request_id: object, result: object) -> bytes:
    """A success reply."""
    return _dumps({"id": request_id, "ok": True, "result": result})


def encode_error(error: ApiError) -> bytes:
    """An error reply."""
    return _dumps(
        {
            "id": error.request_id,
            "ok": False,
            "error": {"code": error.code, "message": error.message},
        }
    )


def encode_event(event: Event) -> bytes:
    """An event line of a subscription."""
    return _dumps({"event": event.to_json()})


def decode_event(raw: Any) -> Event:
    """The ``Event`` of an event line's ``"event"`` value; ``ApiError``
    (``bad-request``) when it is not one."""
    if not isinstance(raw, dict) or raw.get("kind") not in KINDS:
        raise ApiError("bad-request", f"not an event: {raw!r:.80}")
    try:
        previous = raw.get("previous")
        return Event(
            raw["kind"],
            Member.from_json(raw.get("member")),
            None if previous is None else Member.from_json(previous),
        )
    except MemberError as exc:
        raise ApiError("bad-request", f"bad member in event: {exc}") from None


def decode_server_line(line: bytes) -> Reply | Event:
    """A line the daemon wrote: a reply or (on a subscription) an event."""
    raw = _loads(line)
    if not isinstance(raw, dict):
        raise ApiError("bad-request", "a reply is a JSON object")
    if "event" in raw:
        return decode_event(raw["event"])
    ok = raw.get("ok")
    if ok is True:
        return Reply(raw.get("id"), True, raw.get("result"))
    error = raw.get("error")
    if ok is False and isinstance(error, dict):
        return Reply(
            raw.get("id"),
            False,
            error=ApiError(str(error.get("code")), str(error.get("message")), raw.get("id")),
        )
    raise ApiError("bad-request", f"not a reply: {raw!r:.80}")


# -- result shapes ------------------------------------------------------------------


def _str_list(raw: Any, what: str) -> list[str]:
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise ApiError("bad-request", f"{what} is not a list of strings")
    return raw


@dataclass(frozen=True)
class MemberView:
    """A member as the local node sees it: its record, whether it is us, and
    the pools it shares with us (``colocated`` when it is alive and shares
    one)."""

    member: Member
    local: bool
    shared_pools: frozenset[str]

    @property
    def colocated(self) -> bool:
        return self.local or (self.member.alive and bool(self.shared_pools))

    def to_json(self) -> dict[str, Any]:
        return {
            **self.member.to_json(),
            "local": self.local,
            "colocated": self.colocated,
            "shared_pools": sorted(self.shared_pools),
        }

    @classmethod
    def from_json(cls, raw: Any) -> MemberView:
        try:
            member = Member.from_json(raw)
        except MemberError as exc:
            raise ApiError("bad-request", f"bad member: {exc}") from None
        return cls(
            member,
            raw.get("local") is True,
            frozenset(_str_list(raw.get("shared_pools", []), "shared_pools")),
        )


@dataclass(frozen=True)
class Colocation:
    """The answer to "is this address co-located with me, through which pool".

    ``member`` is the member the address belongs to (None if no member
    has it); ``pool`` the pool to use (the first of ``pools`` shared, by id
    order); ``endpoints`` that member's advertised control endpoints."""

    colocated: bool
    pool: str | None
    pools: frozenset[str]
    member: Member | None
    endpoints: tuple[str, ...]
    local: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "colocated": self.colocated,
            "pool": self.pool,
            "pools": sorted(self.pools),
            "member": None if self.member is None else self.member.to_json(),
            "endpoints": list(self.endpoints),
            "local": self.local,
        }

    @classmethod
    def from_json(cls, raw: Any) -> Colocation:
        if not isinstance(raw, dict):
            raise ApiError("bad-request", "a colocation answer is an object")
        pool = raw.get("pool")
        if pool is not None and not isinstance(pool, str):
            raise ApiError("bad-request", "'pool' is not a string")
        try:
            member = None if raw.get("member") is None else Member.from_json(raw["member"])
        except MemberError as exc:
            raise ApiError("bad-request", f"bad member: {exc}") from None
        return cls(
            raw.get("colocated") is True,
            pool,
            frozenset(_str_list(raw.get("pools", []), "pools")),
            member,
            tuple(_str_list(raw.get("endpoints", []), "endpoints")),
            raw.get("local") is True,
        )


@dataclass(frozen=True)
class PoolInfo:
    """A pool the sidecar maps.

    ``name`` is how it was named (a POSIX shm name or a device path),
    ``kind`` its backend (``posix``/``ivshmem``), ``source`` why it is
    mapped (``config``, ``auto`` or ``api``), ``members`` how many members
    its table lists right now."""

    name: str
    id: str
    kind: str
    size: int
    members: int
    source: str

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "id": self.id,
            "kind": self.kind,
            "size": self.size,
            "members": self.members,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, raw: Any) -> PoolInfo:
        if not isinstance(raw, dict):
            raise ApiError("bad-request", "a pool is an object")
        name, pool_id, kind, source = (raw.get(k) for k in ("name", "id", "kind", "source"))
        size, members = raw.get("size"), raw.get("members")
        if not (
            isinstance(name, str)
            and isinstance(pool_id, str)
            and isinstance(kind, str)
            and isinstance(source, str)
            and isinstance(size, int)
            and isinstance(members, int)
            and not isinstance(size, bool)
            and not isinstance(members, bool)
        ):
            raise ApiError("bad-request", f"bad pool: {raw!r:.80}")
        return cls(name, pool_id, kind, size, members, source)
