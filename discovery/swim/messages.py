"""The SWIM wire: every message kind, its fields, its codec and its checks,
in this one place.

A message is a msgpack array ``[kind, field, ...]``.  A packet's body is a
msgpack array of messages (a compound: probes carry piggy-backed
broadcasts), and ``pack_body`` builds it from messages encoded once, so a
broadcast is encoded when queued, not each time it is sent.  ``decode_body``
checks everything a peer could get wrong (types, ranges, lengths) and raises
``MessageError`` for a body that does not decode; a message kind it does not
know (a newer peer's) is skipped and counted, never an error.

Protocol versions (the byte after the magic in ``packet.py``):

1. First version: PING .. PUSH_PULL below; members' records are
   ``Member.pack()`` (append-only itself).  VIEW was added to it later
   without a new version: a member that does not know it skips it, as it
   skips every kind it does not know.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from discovery.member import MAX_NODE, Member, MemberError, Status, split_host

__all__ = [
    "MAX_PUSH_MEMBERS",
    "PROTOCOL_MIN",
    "PROTOCOL_VERSION",
    "VIEW_DIGEST_SIZE",
    "Ack",
    "Alive",
    "Dead",
    "IndirectPing",
    "Message",
    "MessageError",
    "MessageKind",
    "Nack",
    "Ping",
    "PushPull",
    "Suspect",
    "View",
    "body_overhead",
    "decode_body",
    "encode",
    "pack_body",
]

#: The version we speak, and the oldest we still understand.
PROTOCOL_VERSION = 1
PROTOCOL_MIN = 1

#: Most messages one body may hold (a UDP packet holds far fewer).
MAX_MESSAGES = 256
#: Most members one push/pull may carry.
MAX_PUSH_MEMBERS = 65536
#: Longest "ip:port" accepted.
MAX_ADDRESS = 64
_MAX_SEQ = (1 << 32) - 1
_MAX_INCARNATION = (1 << 63) - 1
#: Bytes of a view digest.
VIEW_DIGEST_SIZE = 8


class MessageError(ValueError):
    """A body or message that does not decode or breaks a rule."""


class MessageKind(enum.IntEnum):
    """What a message is.  Append only: the values are the protocol."""

    PING = 1  # are you alive?  [seq, target node, source node]
    INDIRECT_PING = 2  # probe target for me  [seq, target, target addr, source, nack]
    ACK = 3  # yes  [seq]
    NACK = 4  # the relay could not reach the target  [seq]
    SUSPECT = 5  # node may be dead  [node, incarnation, accuser]
    ALIVE = 6  # node's record  [Member.pack()]
    DEAD = 7  # node is dead (left if accuser == node)  [node, incarnation, accuser]
    PUSH_PULL = 8  # full state, over TCP only  [join, [[record, status], ...]]
    VIEW = 9  # digest of the live members the sender knows  [8 bytes]


#: Status codes in push/pull.  Append only, like the kinds.
_STATUS_CODES: dict[Status, int] = {
    Status.ALIVE: 0,
    Status.SUSPECT: 1,
    Status.FAILED: 2,
    Status.LEFT: 3,
}
_CODE_STATUS = {code: status for status, code in _STATUS_CODES.items()}


@dataclass(frozen=True)
class Ping:
    seq: int
    target: str  # the node meant: another node at a reused address does not answer
    source: str


@dataclass(frozen=True)
class IndirectPing:
    seq: int
    target: str
    target_addr: str
    source: str
    nack: bool  # answer NACK if the target does not answer in time


@dataclass(frozen=True)
class Ack:
    seq: int


@dataclass(frozen=True)
class Nack:
    seq: int


@dataclass(frozen=True)
class Suspect:
    node: str
    incarnation: int
    source: str


@dataclass(frozen=True)
class Alive:
    member: Member


@dataclass(frozen=True)
class Dead:
    node: str
    incarnation: int
    source: str

    @property
    def left(self) -> bool:
        """A member announcing its own death is leaving."""
        return self.node == self.source


@dataclass(frozen=True)
class PushPull:
    join: bool
    members: tuple[Member, ...]  # with the sender's view of their status


@dataclass(frozen=True)
class View:
    digest: bytes  # MemberTable.view_digest(): equal views, equal digests


Message = Ping | IndirectPing | Ack | Nack | Suspect | Alive | Dead | PushPull | View


# -- encoding ----------------------------------------------------------------


def _fields(message: Message) -> list[Any]:
    match message:
        case Ping(seq, target, source):
            return [MessageKind.PING, seq, target, source]
        case IndirectPing(seq, target, target_addr, source, nack):
            return [MessageKind.INDIRECT_PING, seq, target, target_addr, source, nack]
        case Ack(seq):
            return [MessageKind.ACK, seq]
        case Nack(seq):
            return [MessageKind.NACK, seq]
        case Suspect(node, incarnation, source):
            return [MessageKind.SUSPECT, node, incarnation, source]
        case Alive(member):
            return [MessageKind.ALIVE, member.pack()]
        case Dead(node, incarnation, source):
            return [MessageKind.DEAD, node, incarnation, source]
        case PushPull(join, members):
            return [
                MessageKind.PUSH_PULL,
                join,
                [[m.pack(), _STATUS_CODES[m.status]] for m in members],
            ]
        case View(digest):
            return [MessageKind.VIEW, digest]
    raise TypeError(f"not a message: {message!r:.80}")


def encode(message: Message) -> bytes:
    """One message's bytes (checked as a decoder would check them)."""
    _validate(message)
    data: bytes = msgpack.packb(_fields(message), use_bin_type=True)
    return data


def body_overhead(count: int) -> int:
    """Bytes the array header of a body of ``count`` messages takes."""
    return 1 if count < 16 else 3 if count < 1 << 16 else 5


def pack_body(encoded: Sequence[bytes]) -> bytes:
    """A body from messages already encoded (a msgpack array is its header
    followed by its items, so no re-encoding is needed)."""
    if not 0 < len(encoded) <= MAX_MESSAGES:
        raise ValueError(f"a body holds 1 to {MAX_MESSAGES} messages, not {len(encoded)}")
    header: bytes = msgpack.Packer().pack_array_header(len(encoded))
    return header + b"".join(encoded)


# -- decoding and checks -----------------------------------------------------


def decode_body(body: bytes) -> tuple[list[Message], int]:
    """The messages of a body, and how many of unknown kinds were skipped."""
    try:
        raw = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises many unrelated types
        raise MessageError(f"undecodable body: {exc}") from None
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_MESSAGES:
        raise MessageError("a body is an array of 1 to 256 messages")
    messages: list[Message] = []
    unknown = 0
    for item in raw:
        if not isinstance(item, list) or not item or type(item[0]) is not int:
            raise MessageError(f"not a message: {item!r:.60}")
        try:
            kind = MessageKind(item[0])
        except ValueError:
            unknown += 1  # a newer peer's message: not ours to judge
            continue
        messages.append(_decode(kind, item[1:]))
    return messages, unknown


def _decode(kind: MessageKind, f: list[Any]) -> Message:
    message: Message
    try:
        match kind:
            case MessageKind.PING:
                message = Ping(f[0], f[1], f[2])
            case MessageKind.INDIRECT_PING:
                message = IndirectPing(f[0], f[1], f[2], f[3], f[4])
            case MessageKind.ACK:
                message = Ack(f[0])
            case MessageKind.NACK:
                message = Nack(f[0])
            case MessageKind.SUSPECT:
                message = Suspect(f[0], f[1], f[2])
            case MessageKind.ALIVE:
                message = Alive(_record(f[0], Status.ALIVE))
            case MessageKind.DEAD:
                message = Dead(f[0], f[1], f[2])
            case MessageKind.PUSH_PULL:
                message = PushPull(f[0], _push_members(f[1]))
            case MessageKind.VIEW:
                message = View(f[0])
    except IndexError:
        raise MessageError(f"{kind.name}: too few fields") from None
    _validate(message)
    return message


def _record(data: Any, status: Status) -> Member:
    if not isinstance(data, bytes):
        raise MessageError("a member record is bytes")
    try:
        member = Member.unpack(data, status)
    except MemberError as exc:
        raise MessageError(str(exc)) from None
    if not member.addresses or not _is_address(member.addresses[0]):
        raise MessageError(f"{member.node}: record without a gossip address")
    return member


def _push_members(raw: Any) -> tuple[Member, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_PUSH_MEMBERS:
        raise MessageError("PUSH_PULL: bad member list")
    members = []
    for entry in raw:
        if not isinstance(entry, list) or len(entry) < 2 or type(entry[1]) is not int:
            raise MessageError("PUSH_PULL: bad member entry")
        status = _CODE_STATUS.get(entry[1])
        if status is None:
            raise MessageError(f"PUSH_PULL: unknown status {entry[1]}")
        members.append(_record(entry[0], status))
    return tuple(members)


def _validate(message: Message) -> None:
    match message:
        case Ping(seq, target, source):
            _seq(seq)
            _node(target)
            _node(source)
        case IndirectPing(seq, target, target_addr, source, nack):
            _seq(seq)
            _node(target)
            _node(source)
            if not isinstance(target_addr, str) or not _is_address(target_addr):
                raise MessageError(f"bad address {target_addr!r:.60}")
            if not isinstance(nack, bool):
                raise MessageError("INDIRECT_PING: nack is a boolean")
        case Ack(seq) | Nack(seq):
            _seq(seq)
        case Suspect(node, incarnation, source) | Dead(node, incarnation, source):
            _node(node)
            _node(source)
            if type(incarnation) is not int or not 0 <= incarnation <= _MAX_INCARNATION:
                raise MessageError(f"bad incarnation {incarnation!r:.30}")
        case Alive(member):
            if not isinstance(member, Member):
                raise MessageError("ALIVE carries a member")
        case PushPull(join, members):
            if not isinstance(join, bool):
                raise MessageError("PUSH_PULL: join is a boolean")
            if len(members) > MAX_PUSH_MEMBERS:
                raise MessageError("PUSH_PULL: too many members")
        case View(digest):
            if type(digest) is not bytes or len(digest) != VIEW_DIGEST_SIZE:
                raise MessageError(f"VIEW: a digest is {VIEW_DIGEST_SIZE} bytes")


def _seq(value: Any) -> None:
    if type(value) is not int or not 0 <= value <= _MAX_SEQ:
        raise MessageError(f"bad sequence number {value!r:.30}")


def _node(value: Any) -> None:
    if not isinstance(value, str) or not 0 < len(value.encode()) <= MAX_NODE:
        raise MessageError(f"bad node name {value!r:.40}")


def _is_address(value: str) -> bool:
    return len(value) <= MAX_ADDRESS and split_host(value)[1] > 0
