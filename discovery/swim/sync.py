"""Push/pull: full state exchanges over TCP, the anti-entropy under gossip.

Each side sends every record it holds and merges the other's
(``Membership.merge``), so what gossip missed converges here.  Every
push/pull interval (scaled with the cluster size) a member exchanges with
a random live member; every reconnect interval, with a random *failed*
one, so the two sides of a healed partition find each other again, and it
forgets the members failed or left long ago.  A join is a push/pull too.

Views are also compared on every probe, between the periodic exchanges.
Gossip reaches every member only with high probability: with memberlist's
``local`` values a change is sent about four times by each member that
holds it, and at 64 members about one join or leave in two misses someone,
who would learn it only at the next push/pull (15-30 s later).  So every
probe carries the prober's view digest (``MemberTable.view_digest``); a
member whose view has differed from its probers' for longer than gossip
takes to settle (``Profile.view_settle_time``) push/pulls with the latest
of them at once, at most once per settle time.  Converged views cost the
digest's few bytes and nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

from discovery.member import Status, split_host
from discovery.profiles import Profile
from discovery.swim.messages import PushPull, encode, pack_body
from discovery.swim.probe import Request
from discovery.swim.state import Membership

__all__ = ["StateSync"]

_log = logging.getLogger("discovery.swim.sync")


class StateSync:
    """Push/pull for ``membership``: asking, answering, and its rounds."""

    def __init__(
        self,
        profile: Profile,
        membership: Membership,
        stats: Counter[str],
        request: Request,
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
    ) -> None:
        self._profile = profile
        self._membership = membership
        self._stats = stats
        self._request = request
        self._spawn = spawn
        self._loop = asyncio.get_running_loop()
        self._differs_since: float | None = None
        self._last_mend = float("-inf")

    async def exchange(self, address: str, *, join: bool = False) -> bool:
        """Push/pull with the member at ``address``; True if it answered."""
        membership = self._membership
        body = pack_body([encode(PushPull(join, membership.snapshot()))])
        try:
            reply = await self._request(address, body, self._profile.tcp_timeout)
        except (OSError, TimeoutError) as exc:
            self._stats["push_pull_failed"] += 1
            _log.debug("push/pull with %s: %s", address, exc or type(exc).__name__)
            return False
        for message in reply:
            if isinstance(message, PushPull):
                self._stats["push_pull"] += 1
                membership.merge(message.members)
                return True
        return False

    def compare(self, view: bytes, address: str) -> None:
        """The prober at ``address`` holds ``view``: mend our views with a
        push/pull when they have differed for too long (module docstring)."""
        membership = self._membership
        if view == membership.view_digest():
            self._differs_since = None
            return
        self._stats["view_differs"] += 1
        now = self._loop.time()
        if self._differs_since is None:
            self._differs_since = now
            return
        settle = self._profile.view_settle_time(membership.count())
        if now - self._differs_since < settle or now - self._last_mend < settle:
            return
        if membership.left:
            return
        self._differs_since = None
        self._last_mend = now
        self._stats["view_mends"] += 1
        _log.debug("views differ for %.1f s: push/pull with %s", settle, address)
        self._spawn(self.exchange(address))

    def serve(self, request: PushPull, peer: str) -> bytes:
        """The reply body to ``peer``'s push/pull: our state, its merged in."""
        self._stats["push_pull_served"] += 1
        host = split_host(peer)[0]
        if any(split_host(s.address)[0] == host for s in self._membership.failed()):
            # A member we hold failed reaching out: its reconnect, counted
            # here too, since its answer (and count) may be lost.
            self._stats["reconnect_served"] += 1
        _log.debug(
            "push/pull from %s (join=%s, %d members)", peer, request.join, len(request.members)
        )
        # Merge first: a refutation it provokes goes back at once.
        self._membership.merge(request.members)
        return pack_body([encode(PushPull(False, self._membership.snapshot()))])

    async def run(self) -> None:
        """A push/pull with a random live member every push/pull period."""
        membership = self._membership
        period = self._profile.push_pull_period(membership.count())
        await asyncio.sleep(random.uniform(0, period))
        while True:
            alive = [s for s in membership.peers() if s.status is Status.ALIVE]
            if alive and not membership.left:
                await self.exchange(random.choice(alive).address)
            await asyncio.sleep(self._profile.push_pull_period(membership.count()))

    async def reconnect(self) -> None:
        """Every reconnect interval (jittered), forget the long gone and
        push/pull with a random failed member."""
        membership = self._membership
        interval = self._profile.reconnect_interval
        while True:
            await asyncio.sleep(random.uniform(0.5 * interval, 1.5 * interval))
            for member in membership.reap():
                _log.info("forgot %s (%s)", member.node, member.status.value)
            failed = membership.failed()
            if failed and not membership.left:
                target = random.choice(failed)
                if await self.exchange(target.address):
                    self._stats["reconnected"] += 1
