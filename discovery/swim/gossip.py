"""Gossip: how queued broadcasts leave this member.

Every packet to a member (probes, acks, relayed pings) is filled up with
broadcasts from the queue (``broadcast.py``), and every gossip interval a
round sends what is still queued to a few random members, also to members
failed within ``gossip_to_the_dead_time`` so that a member failed by
mistake hears it and refutes.
"""

from __future__ import annotations

import asyncio
import random

from discovery.engine import EngineError
from discovery.member import Member
from discovery.profiles import Profile
from discovery.swim.messages import Alive, body_overhead, encode, pack_body
from discovery.swim.packet import MAX_PACKET, Sealer
from discovery.swim.state import Membership
from discovery.swim.transport import Transport

__all__ = ["Gossip"]

#: Room for a body's array header (a packet holds fewer than 65536 messages).
_BODY_HEADER = body_overhead(255)


class Gossip:
    """Sends packets over ``transport`` with the broadcasts of
    ``membership`` piggy-backed, and runs the gossip rounds."""

    def __init__(self, profile: Profile, sealer: Sealer, transport: Transport) -> None:
        self._profile = profile
        self._sealer = sealer
        self._transport = transport
        #: The table whose broadcasts go out; None until the engine starts.
        self.membership: Membership | None = None

    def send(self, address: str, messages: list[bytes]) -> None:
        """Send ``messages`` to ``address`` in one packet, filled up with
        queued broadcasts if it is a member's (an unauthenticated sender
        must not turn our small answers into large ones to a stranger)."""
        free = MAX_PACKET - self._sealer.overhead - _BODY_HEADER - sum(map(len, messages))
        if self.membership is not None and self.membership.knows_address(address):
            messages = messages + self.membership.queue.get(0, free, max_items=255 - len(messages))
        self._transport.send(address, pack_body(messages))

    def send_one(self, address: str, message: bytes) -> None:
        self.send(address, [message])

    def once(self) -> None:
        """One gossip round, now."""
        membership = self.membership
        if membership is None or not len(membership.queue):
            return
        candidates = membership.peers() + membership.recently_failed(
            self._profile.gossip_to_the_dead_time
        )
        targets = random.sample(candidates, min(self._profile.gossip_nodes, len(candidates)))
        free = MAX_PACKET - self._sealer.overhead - _BODY_HEADER
        for target in targets:
            messages = membership.queue.get(0, free)
            if not messages:
                break
            self._transport.send(target.address, pack_body(messages))

    async def run(self) -> None:
        """A gossip round every gossip interval."""
        while True:
            await asyncio.sleep(self._profile.gossip_interval)
            self.once()

    def check_fits(self, member: Member) -> None:
        """``EngineError`` unless ``member``'s record fits in a packet."""
        size = len(encode(Alive(member))) + self._sealer.overhead + _BODY_HEADER
        if size > MAX_PACKET:
            raise EngineError(
                f"the record of {member.node} takes {size} bytes; a packet holds {MAX_PACKET}"
            )
