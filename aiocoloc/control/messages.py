"""Every control message, its fields and their types, in one place.

A control message is a msgpack map with an ``op`` (``aiocoloc.control.frames``
frames it).  ``decode`` turns a received map into one of the classes below,
checking every field; ``Message.fields()`` is what goes on the wire.  Nothing
else in aiocoloc reads or writes a raw control map.

The upgrade handshake (``aiocoloc.connect.handshake`` tells its order):

    hello  client -> server  version, conn (the TCP 4-tuple as the client sees
                             it), [pool, slot: a pool it maps already], [hub],
                             [auth: a challenge, between kernels],
                             [bell: (IVPosition, vector) of an ivshmem doorbell],
                             [proven: it proved that pool over that hub before]
    pool   server -> client  version, pool id            + the pool's memfd
    join   client -> server  slot (ours in the pool)
    pipes  server -> client  up, down (pipe handles), nonce, [hub],
                             [auth: the server's MAC], [bell],
                             [ready: proven taken, no proof follows]  + 0-1 fd
    proof  client -> server  nonce, [auth: the client's MAC]         + 0-3 fds
    ready  server -> client
    refuse either way        reason (a fallback reason), detail

The link an upgraded connection keeps (``aiocoloc.transport.switching``):

    switch      offset, to ("shm" | "tcp"): our stream goes on there from byte N
    switch-ack  offset
    bell        a doorbell ring (peers in different kernels)
    close       the sender closes; the link's loss that follows is no error

Versioning is append only: ``PROTOCOL_VERSION`` names the handshake in
``hello`` and ``pool``, and stays 1 while every change is an addition --
a new optional field (a peer that does not know it ignores it), or a new
operation sent only to a peer that showed it knows it (as ``hub``: offered
in ``hello``, used only when ``pipes`` answers it).  A field's meaning never
changes and no field is removed; an incompatible change takes version 2,
and peers of different versions stay on TCP (``VERSION_MISMATCH``).

History: 1 -- the handshake above; ``hello.pool``/``hello.slot`` (skip
``pool``/``join`` when the client maps the pool already) and
``hello.hub``/``pipes.hub`` (shared doorbells) and ``hello.auth``/
``pipes.auth``/``proof.auth`` (control channels between kernels,
authenticated with the cluster key) and ``hello.bell``/``pipes.bell``
(doorbells through ivshmem interrupts) and ``hello.proven``/``pipes.ready``
(no second round trip for a pool proved over a hub) were added within it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar

from aiocoloc.errors import ControlProtocolError, UnknownOperation, VersionMismatch

__all__ = [
    "MAC_SIZE",
    "NONCE_SIZE",
    "PROTOCOL_VERSION",
    "Bell",
    "Close",
    "Hello",
    "Join",
    "Message",
    "Pipes",
    "PoolOffer",
    "Proof",
    "Ready",
    "Refuse",
    "Switch",
    "SwitchAck",
    "decode",
]

PROTOCOL_VERSION = 1
NONCE_SIZE = 16
MAC_SIZE = 32  # HMAC-SHA256 (``aiocoloc.connect.cluster_auth``)
#: Longest hub token, pool id, refusal detail accepted.
MAX_TOKEN = 64
MAX_TEXT = 1024
_U32 = 1 << 32
_U64 = 1 << 64

Check = Callable[[Any], Any]
ConnKey = tuple[str, int, str, int]
PipeRef = tuple[int, int]  # (slot, generation) of a pipe in the pool's pipe table


class Message:
    """Base of every control message: ``OP`` and ``CHECKS`` (field -> check)."""

    OP: ClassVar[str]
    #: Field name -> a function that returns the decoded value or raises
    #: ``ValueError``/``TypeError``.  Fields with a default are optional.
    CHECKS: ClassVar[dict[str, Check]] = {}

    def fields(self) -> dict[str, Any]:
        """The map that goes on the wire (optional fields left out when None)."""
        out: dict[str, Any] = {"op": self.OP}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


# --- field checks -------------------------------------------------------------------------


def _int(low: int, high: int) -> Check:
    def check(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value < high:
            raise ValueError
        return value

    return check


def _text(limit: int) -> Check:
    def check(value: Any) -> str:
        if not isinstance(value, str) or len(value) > limit:
            raise ValueError
        return value

    return check


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError
    return value


def _nonce(value: Any) -> bytes:
    if not isinstance(value, bytes) or len(value) != NONCE_SIZE:
        raise ValueError
    return value


def _mac(value: Any) -> bytes:
    if not isinstance(value, bytes) or len(value) != MAC_SIZE:
        raise ValueError
    return value


def _bell(value: Any) -> tuple[int, int]:
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError
    u16 = _int(0, 1 << 16)
    return (u16(value[0]), u16(value[1]))


def _path(value: Any) -> str:
    if value not in ("shm", "tcp"):
        raise ValueError
    return str(value)


def _conn(value: Any) -> ConnKey:
    if not isinstance(value, list) or len(value) != 4:
        raise ValueError
    port = _int(0, 65536)
    return (_text(MAX_TEXT)(value[0]), port(value[1]), _text(MAX_TEXT)(value[2]), port(value[3]))


def _pipe(value: Any) -> PipeRef:
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError
    return (_int(0, _U32)(value[0]), _int(0, _U32)(value[1]))


# --- the handshake -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello(Message):
    OP = "hello"
    CHECKS = {
        "version": _int(0, _U32),
        "conn": _conn,
        "pool": _text(MAX_TOKEN),
        "slot": _int(0, _U32),
        "hub": _text(MAX_TOKEN),
        "auth": _nonce,
        "bell": _bell,
        "proven": _bool,
    }
    version: int
    conn: ConnKey
    pool: str | None = None
    slot: int | None = None
    hub: str | None = None
    auth: bytes | None = None  # the client's challenge: we talk across kernels
    bell: tuple[int, int] | None = None  # (IVPosition, vector): ring us through ivshmem
    #: True: we proved ``pool`` from ``slot`` over ``hub`` before; skip our proof.
    proven: bool | None = None


@dataclass(frozen=True, slots=True)
class PoolOffer(Message):
    OP = "pool"
    CHECKS = {"version": _int(0, _U32), "pool": _text(MAX_TOKEN)}
    version: int
    pool: str


@dataclass(frozen=True, slots=True)
class Join(Message):
    OP = "join"
    CHECKS = {"slot": _int(0, _U32)}
    slot: int


@dataclass(frozen=True, slots=True)
class Pipes(Message):
    OP = "pipes"
    CHECKS = {
        "up": _pipe,
        "down": _pipe,
        "nonce": _nonce,
        "hub": _bool,
        "auth": _mac,
        "bell": _bell,
        "ready": _bool,
    }
    up: PipeRef
    down: PipeRef
    nonce: bytes
    hub: bool | None = None  # None: no hub offer taken (a descriptor comes instead)
    auth: bytes | None = None  # the server's MAC, when hello had a challenge
    bell: tuple[int, int] | None = None  # the server's (IVPosition, vector), taking hello's
    #: True: ``hello.proven`` taken, no ``proof`` follows (settled once the
    #: client checked ``nonce``).
    ready: bool | None = None


@dataclass(frozen=True, slots=True)
class Proof(Message):
    OP = "proof"
    CHECKS = {"nonce": _nonce, "auth": _mac}
    nonce: bytes
    auth: bytes | None = None  # the client's MAC, across kernels


@dataclass(frozen=True, slots=True)
class Ready(Message):
    OP = "ready"


@dataclass(frozen=True, slots=True)
class Refuse(Message):
    OP = "refuse"
    CHECKS = {"reason": _text(MAX_TOKEN), "detail": _text(MAX_TEXT)}
    reason: str
    detail: str = ""


# --- the link of an upgraded connection ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Switch(Message):
    OP = "switch"
    CHECKS = {"offset": _int(0, _U64), "to": _path}
    offset: int
    to: str


@dataclass(frozen=True, slots=True)
class SwitchAck(Message):
    OP = "switch-ack"
    CHECKS = {"offset": _int(0, _U64)}
    offset: int


@dataclass(frozen=True, slots=True)
class Bell(Message):
    OP = "bell"


@dataclass(frozen=True, slots=True)
class Close(Message):
    OP = "close"


_BY_OP: dict[str, type[Message]] = {
    cls.OP: cls
    for cls in (Hello, PoolOffer, Join, Pipes, Proof, Ready, Refuse, Switch, SwitchAck, Bell, Close)
}
_VERSIONED = (Hello, PoolOffer)
_REQUIRED = {
    cls: [f.name for f in fields(cls) if f.default is MISSING]  # type: ignore[arg-type]
    for cls in _BY_OP.values()
}


def decode(raw: dict[str, Any]) -> Message:
    """The message ``raw`` (a decoded map) carries, every field checked.

    Raises ``UnknownOperation`` for an op this version does not know,
    ``VersionMismatch`` for a handshake of another protocol version, and
    ``ControlProtocolError`` naming the field for anything else wrong.
    Fields this version does not know are ignored (append-only)."""
    op = raw.get("op")
    cls = _BY_OP.get(op) if isinstance(op, str) else None
    if cls is None:
        raise UnknownOperation(f"unknown control operation {op!r:.40}")
    if cls in _VERSIONED and raw.get("version") != PROTOCOL_VERSION:
        raise VersionMismatch(
            f"peer speaks version {raw.get('version')!r:.20}, we speak {PROTOCOL_VERSION}"
        )
    values: dict[str, Any] = {}
    for name, check in cls.CHECKS.items():
        value = raw.get(name)
        if value is None:
            continue  # a missing required field fails below, by name
        try:
            values[name] = check(value)
        except (ValueError, TypeError):
            raise ControlProtocolError(f"{op!r}: bad {name!r}") from None
    for name in _REQUIRED[cls]:
        if name not in values:
            raise ControlProtocolError(f"{op!r}: missing {name!r}")
    return cls(**values)
