"""Our member record in Serf tags.

Serf gives each member a tag map, gossiped with every state change, and
caps its encoding at 512 bytes (``memberlist.MetaMaxSize``).  The node name
and the gossip address are Serf's own; the rest of our record rides in one
tag, ``ac``: the URL-safe base64 (no padding) of a msgpack array, append-only
like ``Member.pack`` (a decoder ignores fields it does not know)::

    [FORMAT, incarnation, pools, endpoints | nil, slots | nil]

* ``pools``: a pool id that is a canonical UUID string (``str(uuid)``) as its
  16 raw bytes, any other id as its string;
* ``endpoints``: the control endpoints, or nil when they do not fit;
* ``slots`` (since the second version of ``Member``; a tag without it has
  none): lined up with ``pools``, each pool's slot tag (bin) or nil; an
  empty array when there are none, nil when they do not fit.

What does not fit is left out in that order, endpoints first, and the
others then ask for the whole record with the ``aiocoloc-record`` query.
Worst case with 8 UUID pools, 8 slot tags of ``MAX_SLOT`` (24) bytes and no
endpoints: 366 bytes, 488 characters, 496 bytes of Serf's tag encoding
(158, 211 and 219 without slots), so an own agent's tag always carries its
slots.  With the sidecar's 22-byte slot tags, what is left goes to
endpoints: about 28 bytes of them with 8 pools, 320 with one.  A record
whose pools alone do not fit (pool ids that are long non-UUID strings, or
an attached agent's other tags) is refused (``TagsTooLarge``).
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import msgpack

from discovery.engine import EngineError
from discovery.member import MAX_SLOT, Member, MemberError, aligned_slots

__all__ = [
    "TAG",
    "TAG_LIMIT",
    "TagRecord",
    "TagsTooLarge",
    "decode_tag",
    "encode_tag",
    "record_tags",
    "serf_tags_size",
]

#: Our tag's key.
TAG = "ac"
#: Serf's limit on the encoded tags of a member (``memberlist.MetaMaxSize``).
TAG_LIMIT = 512
#: Version of the tag's layout (first field; appending fields keeps it).
FORMAT = 1
_NO_SLOTS: Mapping[str, bytes] = MappingProxyType({})


class TagsTooLarge(EngineError):
    """The record does not fit in Serf's 512 bytes of tags."""


@dataclass(frozen=True)
class TagRecord:
    """What the ``ac`` tag says; ``endpoints`` or ``slots`` None: left
    out, ask for the record."""

    incarnation: int
    pools: frozenset[str]
    endpoints: tuple[str, ...] | None
    slots: Mapping[str, bytes] | None = field(default_factory=lambda: _NO_SLOTS, hash=False)

    @property
    def complete(self) -> bool:
        return self.endpoints is not None and self.slots is not None


def _pool_item(pool: str) -> bytes | str:
    try:
        parsed = uuid.UUID(pool)
    except ValueError:
        return pool
    return parsed.bytes if str(parsed) == pool else pool


def encode_tag(
    incarnation: int,
    pools: Iterable[str],
    endpoints: Sequence[str] | None,
    slots: Mapping[str, bytes] | None = _NO_SLOTS,
) -> str:
    """The ``ac`` tag's value (``endpoints``, ``slots`` None: left out)."""
    ordered = sorted(pools)
    body = msgpack.packb(
        [
            FORMAT,
            incarnation,
            [_pool_item(p) for p in ordered],
            None if endpoints is None else list(endpoints),
            None if slots is None else [slots.get(p) for p in ordered] if slots else [],
        ],
        use_bin_type=True,
    )
    return base64.urlsafe_b64encode(body).rstrip(b"=").decode("ascii")


def decode_tag(value: str) -> TagRecord:
    """The record in an ``ac`` tag; ``MemberError`` if it is not one."""
    try:
        body = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        raw = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (binascii.Error, ValueError, msgpack.UnpackException) as exc:
        raise MemberError(f"undecodable {TAG!r} tag: {exc}") from None
    if not isinstance(raw, list) or len(raw) < 4 or raw[0] != FORMAT:
        raise MemberError(f"{TAG!r} tag of an unknown layout: {raw!r:.60}")
    _, incarnation, pools, endpoints = raw[:4]
    slots = raw[4] if len(raw) > 4 else []
    if not isinstance(incarnation, int) or isinstance(incarnation, bool) or incarnation < 0:
        raise MemberError(f"{TAG!r} tag: bad incarnation {incarnation!r:.30}")
    if not isinstance(pools, list) or not all(
        value is None or isinstance(value, list) for value in (endpoints, slots)
    ):
        raise MemberError(f"{TAG!r} tag: bad pools, endpoints or slots")
    decoded: list[str] = []
    for item in pools:
        if isinstance(item, bytes) and len(item) == 16:
            decoded.append(str(uuid.UUID(bytes=item)))
        elif isinstance(item, str):
            decoded.append(item)
        else:
            raise MemberError(f"{TAG!r} tag: bad pool id {item!r:.40}")
    if endpoints is not None and not all(isinstance(e, str) for e in endpoints):
        raise MemberError(f"{TAG!r} tag: bad endpoints")
    if slots is not None and not all(
        tag is None or (isinstance(tag, bytes) and 0 < len(tag) <= MAX_SLOT) for tag in slots
    ):
        raise MemberError(f"{TAG!r} tag: bad slots")
    return TagRecord(
        incarnation,
        frozenset(decoded),
        None if endpoints is None else tuple(endpoints),
        None if slots is None else MappingProxyType(aligned_slots(decoded, slots)),
    )


def _raw_size(text: str) -> int:
    """Bytes of a string in the msgpack spec Serf's encoder uses (the old
    one: raw 5/16/32 headers, no str8)."""
    n = len(text.encode("utf-8", "surrogateescape"))
    return n + (1 if n < 32 else 3 if n < 1 << 16 else 5)


def serf_tags_size(tags: Mapping[str, str]) -> int:
    """Length of Serf's encoding of ``tags``: a magic byte, then a msgpack
    map (``serf.encodeTags``)."""
    n = len(tags)
    header = 1 if n < 16 else 3 if n < 1 << 16 else 5
    return 1 + header + sum(_raw_size(k) + _raw_size(v) for k, v in tags.items())


def record_tags(record: Member, others: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{TAG: value}`` for ``record``, its endpoints, then its slots, left
    out if they do not fit beside the agent's ``others`` tags;
    ``TagsTooLarge`` if even its pools do not fit."""
    rest = {k: v for k, v in (others or {}).items() if k != TAG}
    for endpoints, slots in (
        (record.endpoints, record.slots),
        (None, record.slots),
        (None, None),
    ):
        tags = {TAG: encode_tag(record.incarnation, record.pools, endpoints, slots)}
        if serf_tags_size({**rest, **tags}) <= TAG_LIMIT:
            return tags
    size = serf_tags_size({**rest, **tags})
    raise TagsTooLarge(
        f"{len(record.pools)} pool ids take {size} bytes of Serf tags "
        f"(limit {TAG_LIMIT}, other tags: {sorted(rest)}): use UUID pool ids or fewer pools"
    )
