"""Our member record in Serf tags.

Serf gives each member a tag map, gossiped with every state change, and
caps its encoding at 512 bytes (``memberlist.MetaMaxSize``).  The node name
and the gossip address are Serf's own; the rest of our record rides in one
tag, ``ac``: the URL-safe base64 (no padding) of a msgpack array, append-only
like ``Member.pack``::

    [FORMAT, incarnation, pools, endpoints | nil]

* ``pools``: a pool id that is a canonical UUID string (``str(uuid)``) as its
  16 raw bytes, any other id as its string;
* ``endpoints``: the control endpoints, or nil when they do not fit: the
  others then ask for the whole record with the ``aiocoloc-record`` query.

Worst case with 8 UUID pools and no endpoints: 157 bytes, 210 characters,
218 bytes of Serf's tag encoding; what is left of the 512 goes to endpoints
(about 220 bytes of them with 8 pools).  A record whose pools alone do not
fit (pool ids that are long non-UUID strings) is refused (``TagsTooLarge``).
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import msgpack

from discovery.engine import EngineError
from discovery.member import MemberError

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
#: Version of the tag's layout (first field).
FORMAT = 1


class TagsTooLarge(EngineError):
    """The record does not fit in Serf's 512 bytes of tags."""


@dataclass(frozen=True)
class TagRecord:
    """What the ``ac`` tag says; ``endpoints`` None: ask for the record."""

    incarnation: int
    pools: frozenset[str]
    endpoints: tuple[str, ...] | None

    @property
    def complete(self) -> bool:
        return self.endpoints is not None


def _pool_item(pool: str) -> bytes | str:
    try:
        parsed = uuid.UUID(pool)
    except ValueError:
        return pool
    return parsed.bytes if str(parsed) == pool else pool


def encode_tag(incarnation: int, pools: Iterable[str], endpoints: Sequence[str] | None) -> str:
    """The ``ac`` tag's value."""
    body = msgpack.packb(
        [
            FORMAT,
            incarnation,
            [_pool_item(p) for p in sorted(pools)],
            None if endpoints is None else list(endpoints),
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
    if not isinstance(incarnation, int) or isinstance(incarnation, bool) or incarnation < 0:
        raise MemberError(f"{TAG!r} tag: bad incarnation {incarnation!r:.30}")
    if not isinstance(pools, list) or not (endpoints is None or isinstance(endpoints, list)):
        raise MemberError(f"{TAG!r} tag: bad pools or endpoints")
    decoded: set[str] = set()
    for item in pools:
        if isinstance(item, bytes) and len(item) == 16:
            decoded.add(str(uuid.UUID(bytes=item)))
        elif isinstance(item, str):
            decoded.add(item)
        else:
            raise MemberError(f"{TAG!r} tag: bad pool id {item!r:.40}")
    if endpoints is not None and not all(isinstance(e, str) for e in endpoints):
        raise MemberError(f"{TAG!r} tag: bad endpoints")
    return TagRecord(
        incarnation, frozenset(decoded), None if endpoints is None else tuple(endpoints)
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


def record_tags(
    incarnation: int,
    pools: Iterable[str],
    endpoints: Sequence[str],
    others: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """``{TAG: value}`` for the record, its endpoints left out if they do not
    fit beside the agent's ``others`` tags; ``TagsTooLarge`` if even that
    does not fit."""
    rest = {k: v for k, v in (others or {}).items() if k != TAG}
    pools = sorted(pools)
    for listed in (endpoints, None):
        tags = {TAG: encode_tag(incarnation, pools, listed)}
        if serf_tags_size({**rest, **tags}) <= TAG_LIMIT:
            return tags
    size = serf_tags_size({**rest, **tags})
    raise TagsTooLarge(
        f"{len(pools)} pool ids take {size} bytes of Serf tags "
        f"(limit {TAG_LIMIT}, other tags: {sorted(rest)}): use UUID pool ids or fewer pools"
    )
