"""The member record every engine speaks, and its compact encoding.

A member is one ``aiocoloc-discoveryd`` (one per host, VM or container
group).  Its record says where it is (``addresses``), which shared-memory
pools it maps (``pools``: pool ids, the UUIDs the pools carry in their
headers) and where its aiocoloc servers take upgrade requests
(``endpoints``).  ``slots`` says, per pool, which member slot of the pool's
member table is the member's own (an opaque *slot tag* of at most
``MAX_SLOT`` bytes, written and read by ``discovery.daemon.slots``):
co-located members watch each other through it.  ``incarnation`` orders
versions of one member's record: only the member itself raises it (to
refute a suspicion, or to announce a change such as "now maps pool X"
after a migration).

The encoding (``Member.pack``/``Member.unpack``) is a msgpack array of ids,
not descriptions::

    [node, addresses, pools (sorted), endpoints, incarnation, slots]

``slots`` lines up with ``pools``: the slot tag (bin) of the pool at the
same index, or nil; an empty array when the member has none.

Versions (append-only: new fields go at the end, and a decoder ignores
trailing fields it does not know, so older decoders read newer records):

1. fields 0-4, node to incarnation;
2. field 5, ``slots`` (a record without it has none).
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import msgpack

__all__ = ["Member", "MemberError", "Status"]

#: Longest node name accepted (Serf's own limit is 128 bytes as well).
MAX_NODE = 128
#: Most pools and endpoints a record carries.
MAX_POOLS = 8
MAX_ENDPOINTS = 8
MAX_ADDRESSES = 8
#: Longest slot tag: 24 bytes keep eight of them, beside eight pool ids, in
#: Serf's 512 bytes of tags (``discovery.serf.tags``).
MAX_SLOT = 24

_NO_SLOTS: Mapping[str, bytes] = MappingProxyType({})


class MemberError(ValueError):
    """A member record that does not decode or does not make sense."""


class Status(enum.Enum):
    """Where a member stands, as this node sees it."""

    ALIVE = "alive"
    SUSPECT = "suspect"  # (SWIM) accused, may still refute
    FAILED = "failed"  # declared dead without saying goodbye
    LEFT = "left"  # said goodbye


@dataclass(frozen=True)
class Member:
    """One member of the cluster, as last heard of."""

    node: str
    addresses: tuple[str, ...]  # "ip:port" of its gossip endpoint first, then others
    pools: frozenset[str] = frozenset()  # pool ids it maps
    endpoints: tuple[str, ...] = ()  # control endpoints of its aiocoloc servers
    incarnation: int = 0
    status: Status = Status.ALIVE
    meta: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    # pool id (one of pools) -> its slot tag there; read-only once made
    slots: Mapping[str, bytes] = field(default_factory=lambda: _NO_SLOTS, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.node, str) or not 0 < len(self.node.encode()) <= MAX_NODE:
            raise MemberError(f"bad node name {self.node!r:.40}")
        if len(self.addresses) > MAX_ADDRESSES or not all(
            isinstance(a, str) for a in self.addresses
        ):
            raise MemberError(f"{self.node}: bad addresses")
        if len(self.pools) > MAX_POOLS or not all(isinstance(p, str) for p in self.pools):
            raise MemberError(f"{self.node}: bad pools")
        if len(self.endpoints) > MAX_ENDPOINTS or not all(
            isinstance(e, str) for e in self.endpoints
        ):
            raise MemberError(f"{self.node}: bad endpoints")
        if not isinstance(self.incarnation, int) or not 0 <= self.incarnation < 1 << 63:
            raise MemberError(f"{self.node}: bad incarnation {self.incarnation!r}")
        if not isinstance(self.slots, Mapping) or not all(
            pool in self.pools and isinstance(tag, bytes) and 0 < len(tag) <= MAX_SLOT
            for pool, tag in self.slots.items()
        ):
            raise MemberError(f"{self.node}: bad slots (a tag of 1-{MAX_SLOT} bytes per pool)")
        if not isinstance(self.slots, MappingProxyType):
            object.__setattr__(self, "slots", MappingProxyType(dict(self.slots)))

    @property
    def alive(self) -> bool:
        """Alive or only suspected: still counts as a member."""
        return self.status in (Status.ALIVE, Status.SUSPECT)

    @property
    def ips(self) -> frozenset[str]:
        """The IP addresses of ``addresses`` (normalised, ports dropped)."""
        return frozenset(ip for ip in (split_host(a)[0] for a in self.addresses) if ip)

    def shares_pool(self, other: Member) -> frozenset[str]:
        """The pools both map."""
        return self.pools & other.pools

    def with_status(self, status: Status) -> Member:
        return replace(self, status=status)

    def changed(
        self,
        incarnation: int,
        *,
        pools: frozenset[str] | None = None,
        endpoints: Sequence[str] | None = None,
        slots: Mapping[str, bytes] | None = None,
    ) -> Member:
        """This record at ``incarnation`` with what is given replaced (None:
        kept); the slots of pools it no longer maps go.  ``MemberError`` if
        the result is not a record."""
        pools = self.pools if pools is None else frozenset(pools)
        slots = self.slots if slots is None else slots
        return replace(
            self,
            pools=pools,
            endpoints=self.endpoints if endpoints is None else tuple(endpoints),
            slots={pool: tag for pool, tag in slots.items() if pool in pools},
            incarnation=incarnation,
        )

    def same_record(self, other: Member) -> bool:
        """Whether ``other`` says what this record says (incarnation and
        status aside)."""
        return (self.addresses, self.pools, self.endpoints, self.slots) == (
            other.addresses,
            other.pools,
            other.endpoints,
            other.slots,
        )

    def pack(self) -> bytes:
        """The compact encoding (status is not part of it: each node judges that)."""
        pools = sorted(self.pools)
        body: bytes = msgpack.packb(
            [
                self.node,
                list(self.addresses),
                pools,
                list(self.endpoints),
                self.incarnation,
                [self.slots.get(pool) for pool in pools] if self.slots else [],
            ],
            use_bin_type=True,
        )
        return body

    @classmethod
    def unpack(cls, data: bytes, status: Status = Status.ALIVE) -> Member:
        """Decode ``pack()``'s output; ``MemberError`` on anything else."""
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises several unrelated types
            raise MemberError(f"undecodable member record: {exc}") from None
        return cls.from_fields(raw, status)

    @classmethod
    def from_fields(cls, raw: Any, status: Status = Status.ALIVE) -> Member:
        """A member from the array ``pack()`` makes, already decoded."""
        if not isinstance(raw, list) or len(raw) < 5:
            raise MemberError(f"member record is not a record: {raw!r:.80}")
        node, addresses, pools, endpoints, incarnation = raw[:5]
        slots = raw[5] if len(raw) > 5 else []
        for name, value in (
            ("addresses", addresses),
            ("pools", pools),
            ("endpoints", endpoints),
            ("slots", slots),
        ):
            if not isinstance(value, list):
                raise MemberError(f"member record: bad {name}")
        if isinstance(incarnation, bool):
            raise MemberError("member record: bad incarnation")
        try:
            return cls(
                node=node,
                addresses=tuple(addresses),
                pools=frozenset(pools),
                endpoints=tuple(endpoints),
                incarnation=incarnation,
                status=status,
                slots=aligned_slots(pools, slots),
            )
        except TypeError as exc:  # unhashable pool ids, say
            raise MemberError(f"member record: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready mapping (the CLI's and the local API's shape; slot
        tags are the sidecars' business, not their clients')."""
        return {
            "node": self.node,
            "addresses": list(self.addresses),
            "pools": sorted(self.pools),
            "endpoints": list(self.endpoints),
            "incarnation": self.incarnation,
            "status": self.status.value,
        }

    @classmethod
    def from_json(cls, data: Any) -> Member:
        """The inverse of ``to_json``; ``MemberError`` on a bad mapping."""
        if not isinstance(data, dict):
            raise MemberError(f"member is not a mapping: {data!r:.80}")
        try:
            status = Status(data.get("status", "alive"))
        except ValueError:
            raise MemberError(f"bad status {data.get('status')!r:.40}") from None
        return cls.from_fields(
            [
                data.get("node"),
                data.get("addresses"),
                data.get("pools"),
                data.get("endpoints", []),
                data.get("incarnation", 0),
            ],
            status,
        )


def aligned_slots(pools: Sequence[Any], slots: Sequence[Any]) -> dict[Any, Any]:
    """The slots of an encoding that lines them up with its pools (nil: that
    pool has none; no slots at all: an empty array); ``MemberError`` if they
    do not line up.  Values are checked by ``Member``."""
    if slots and len(slots) != len(pools):
        raise MemberError(f"member record: {len(slots)} slots for {len(pools)} pools")
    return {pool: tag for pool, tag in zip(pools, slots, strict=False) if tag is not None}


def split_host(address: str) -> tuple[str, int]:
    """``("ip", port)`` of ``"ip:port"`` or ``"[v6]:port"``, the IP normalised
    (IPv4-mapped IPv6 as IPv4); ``("", 0)`` when it is neither."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return "", 0
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return "", 0
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), int(port)


def join_host(ip: str, port: int) -> str:
    """The inverse of ``split_host``: ``"[v6]:port"`` for IPv6."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
