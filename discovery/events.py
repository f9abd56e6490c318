"""The event stream: what changed in the membership, delivered to every
subscriber in order.

Engines ``publish`` events; each subscriber has its own bounded queue, so a
slow subscriber never stalls the engine or the others.  A subscriber that
falls ``QUEUE_LIMIT`` events behind loses its oldest events and is told so
(``Event.kind == "resync"``): it should read the member list again, as a
Serf client does after its agent drops events.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from discovery.member import Member

__all__ = ["KINDS", "Event", "EventStream", "Subscription"]

_log = logging.getLogger("discovery.events")

EventKind = Literal["join", "leave", "failed", "update", "resync"]
KINDS: tuple[EventKind, ...] = ("join", "leave", "failed", "update", "resync")
#: Events a subscriber may fall behind before it loses the oldest.
QUEUE_LIMIT = 4096


@dataclass(frozen=True)
class Event:
    """``kind`` happened to ``member`` (its record as of the event).

    ``update``: the record changed while the member stayed a member (pools,
    endpoints, slots, addresses); ``previous`` is the record before.  ``resync``:
    events were lost; ``member`` is the local node."""

    kind: EventKind
    member: Member
    previous: Member | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"kind": self.kind, "member": self.member.to_json()}
        if self.previous is not None:
            out["previous"] = self.previous.to_json()
        return out


class Subscription:
    """One subscriber's queue; iterate it, ``close()`` it when done."""

    def __init__(self, stream: EventStream, limit: int) -> None:
        self._stream = stream
        self._limit = limit
        self._events: collections.deque[Event] = collections.deque()
        self._wakeup = asyncio.Event()
        self.dropped = 0
        self.closed = False

    def _put(self, event: Event) -> None:
        if len(self._events) >= self._limit:
            self._events.popleft()
            self.dropped += 1
            if not self._events or self._events[0].kind != "resync":
                self._events.appendleft(Event("resync", event.member))
        self._events.append(event)
        self._wakeup.set()

    def get_nowait(self) -> Event | None:
        """The next event if one is queued."""
        return self._events.popleft() if self._events else None

    async def get(self) -> Event:
        """The next event (waits); ``EOFError`` once closed and drained."""
        while not self._events:
            if self.closed:
                raise EOFError("subscription closed")
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._events.popleft()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            try:
                yield await self.get()
            except EOFError:
                return

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._stream._subscribers.discard(self)
            self._wakeup.set()


class EventStream:
    """Fans events out to subscribers."""

    def __init__(self, limit: int = QUEUE_LIMIT) -> None:
        self._subscribers: set[Subscription] = set()
        self._limit = limit
        self.published = 0

    def subscribe(self) -> Subscription:
        subscription = Subscription(self, self._limit)
        self._subscribers.add(subscription)
        return subscription

    def publish(self, event: Event) -> None:
        self.published += 1
        _log.debug("%s %s", event.kind, event.member.node)
        for subscription in list(self._subscribers):
            subscription._put(event)

    def close(self) -> None:
        for subscription in list(self._subscribers):
            subscription.close()
