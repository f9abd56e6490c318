"""Push/pull: full state exchanges over TCP, the anti-entropy under gossip.

Each side sends every record it holds and merges the other's
(``Membership.merge``), so what gossip missed converges here.  Every
push/pull interval (scaled with the cluster size) a member exchanges with
a random live member; every reconnect interval, with a random *failed*
one, so the two sides of a healed partition find each other again, and it
forgets the members failed or left long ago.  A join is a push/pull too.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter

from discovery.member import Status
from discovery.profiles import Profile
from discovery.swim.messages import PushPull, encode, pack_body
from discovery.swim.probe import Request
from discovery.swim.state import Membership

__all__ = ["StateSync"]

_log = logging.getLogger("discovery.swim.sync")


class StateSync:
    """Push/pull for ``membership``: asking, answering, and its rounds."""

    def __init__(
        self, profile: Profile, membership: Membership, stats: Counter[str], request: Request
    ) -> None:
        self._profile = profile
        self._membership = membership
        self._stats = stats
        self._request = request

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

    def serve(self, request: PushPull, peer: str) -> bytes:
        """The reply body to ``peer``'s push/pull: our state, its merged in."""
        self._stats["push_pull_served"] += 1
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
