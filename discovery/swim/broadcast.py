"""Piggy-backed dissemination: the queue of messages still to gossip.

Every membership change (alive, suspect, dead) is queued here once,
already encoded, under the name of the member it is about; a newer message
about the same member replaces the older one, which is then never sent
again.  Each outgoing packet (probes, acks, gossip rounds) is filled with
the messages sent fewest times so far, largest first among equals so the
space is used well, newest first among those.  A message is retired after
``retransmit_mult * ceil(log10(n + 1))`` sends (memberlist ``queue.go``),
enough for epidemic spread to reach all ``n`` members with high
probability.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["BroadcastQueue"]

_log = logging.getLogger("discovery.swim.broadcast")


@dataclass
class _Broadcast:
    key: str
    payload: bytes
    order: int
    transmits: int = 0
    done: asyncio.Future[None] | None = None

    def finish(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(None)


class BroadcastQueue:
    """Messages to gossip, each sent a limited number of times."""

    def __init__(self, retransmit_limit: Callable[[], int]) -> None:
        self._limit = retransmit_limit
        self._items: dict[str, _Broadcast] = {}
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._items)

    def queue(self, key: str, payload: bytes, done: asyncio.Future[None] | None = None) -> None:
        """Gossip ``payload`` (about member ``key``), replacing any older
        message about it; ``done`` resolves once it is retired or replaced."""
        old = self._items.pop(key, None)
        if old is not None:
            old.finish()
        self._items[key] = _Broadcast(key, payload, next(self._order), done=done)

    def get(self, overhead: int, limit: int, max_items: int = 255) -> list[bytes]:
        """At most ``max_items`` messages for one packet with ``limit`` bytes
        free, each costing ``overhead`` bytes beyond its own length."""
        if not self._items or max_items <= 0:
            return []
        retire_at = max(1, self._limit())
        chosen: list[bytes] = []
        used = 0
        for item in sorted(
            self._items.values(), key=lambda b: (b.transmits, -len(b.payload), -b.order)
        ):
            cost = overhead + len(item.payload)
            if used + cost > limit:
                continue
            used += cost
            chosen.append(item.payload)
            item.transmits += 1
            if item.transmits >= retire_at:
                del self._items[item.key]
                item.finish()
            if limit - used <= overhead or len(chosen) >= max_items:
                break
        return chosen

    def drop_larger_than(self, limit: int) -> int:
        """Retire messages that can never fit a packet; how many there were."""
        too_big = [item for item in self._items.values() if len(item.payload) > limit]
        for item in too_big:
            _log.warning("dropping a %d-byte broadcast about %s", len(item.payload), item.key)
            del self._items[item.key]
            item.finish()
        return len(too_big)

    def clear(self) -> None:
        for item in self._items.values():
            item.finish()
        self._items.clear()
