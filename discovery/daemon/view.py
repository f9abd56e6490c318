"""The membership as the sidecar serves it: the engine's, plus what the pool
watch saw first.

The engine's events are relayed to the sidecar's own stream (the one API
subscribers read), except updates that change only what clients never see
(slot tags: ``discovery.daemon.slots``).  When the pool watch sees a
co-located peer die before gossip does, the view publishes ``failed`` at
once and shows the member as failed until the engine agrees; the engine's
own ``failed`` (or ``leave``) for it is then not repeated, and news from the
dead member's old life is dropped.  A newer record from it (a restart, or a
refutation: the watch was wrong) comes out as ``join``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from discovery.engine import Engine
from discovery.events import Event, EventStream, Subscription
from discovery.member import Member, Status

__all__ = ["MembershipView"]

_log = logging.getLogger("discovery.daemon.view")


def _same_public(a: Member, b: Member) -> bool:
    """Whether two records of a member differ only in what clients never see."""
    return (a.addresses, a.pools, a.endpoints, a.status) == (
        b.addresses,
        b.pools,
        b.endpoints,
        b.status,
    )


class MembershipView:
    """The engine's membership with the pool watch's verdicts laid over it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.events = EventStream()
        # Members the pool watch declared failed while the engine still had
        # them alive: node -> the record declared failed.
        self._failed: dict[str, Member] = {}
        self._subscription: Subscription | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Relay the engine's events from now on."""
        self._subscription = self.engine.subscribe()
        self._task = asyncio.get_running_loop().create_task(self._relay(self._subscription))

    async def stop(self) -> None:
        """Stop relaying; end every subscriber's stream."""
        if self._subscription is not None:
            self._subscription.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.events.close()

    def subscribe(self) -> Subscription:
        return self.events.subscribe()

    # -- reading ---------------------------------------------------------------------

    def local(self) -> Member:
        """Our own record."""
        return self.engine.local()

    def members(self) -> list[Member]:
        """Every member, as clients see them (watch verdicts included)."""
        out = []
        for member in self.engine.members():
            if member.node in self._failed and member.alive:
                member = member.with_status(Status.FAILED)
            out.append(member)
        return out

    def watchable(self) -> list[Member]:
        """Remote members still alive for all we know: the ones the pool
        watch looks after."""
        local = self.engine.local().node
        return [
            m
            for m in self.engine.members()
            if m.alive and m.node != local and m.node not in self._failed
        ]

    # -- changing ----------------------------------------------------------------------

    def declare_failed(self, member: Member, reason: str) -> None:
        """The pool watch saw ``member`` die: publish ``failed`` now."""
        node = member.node
        current = next((m for m in self.engine.members() if m.node == node), None)
        if node in self._failed or current is None or not current.alive:
            return  # said already, or the engine knows
        if current.incarnation != member.incarnation:
            return  # the member moved on since the watch looked
        self._failed[node] = current
        _log.warning("member %s failed: %s (seen through the pool, before gossip)", node, reason)
        self.events.publish(Event("failed", current.with_status(Status.FAILED)))

    def declared_failed(self, node: str) -> bool:
        """Whether the pool watch's verdict on ``node`` still stands."""
        return node in self._failed

    def revive(self, member: Member, reason: str) -> None:
        """The pool watch sees a member it declared failed live again:
        ``join`` (with its current record)."""
        if self._failed.pop(member.node, None) is None:
            return
        current = next((m for m in self.engine.members() if m.node == member.node), member)
        _log.warning("member %s is back: %s", member.node, reason)
        self.events.publish(Event("join", current.with_status(Status.ALIVE)))

    async def _relay(self, subscription: Subscription) -> None:
        async for event in subscription:
            try:
                self._relay_one(event)
            except Exception:  # a bad record must not end the relay
                _log.exception("cannot relay %s event of %s", event.kind, event.member.node)

    def _relay_one(self, event: Event) -> None:
        node = event.member.node
        declared = self._failed.get(node)
        if declared is not None:
            if event.kind in ("failed", "leave"):
                del self._failed[node]  # the engine caught up: said already
                return
            if event.kind == "join" or (
                event.kind == "update" and event.member.incarnation > declared.incarnation
            ):
                del self._failed[node]
                self.events.publish(Event("join", event.member))
                return
            if event.kind == "update":
                return  # news of the dead member's old life
        if (
            event.kind == "update"
            and event.previous is not None
            and _same_public(event.member, event.previous)
        ):
            return  # only its slot tags changed
        self.events.publish(event)
