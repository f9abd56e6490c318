"""The member table: every member we know, by name and by gossip address,
with its record, its status and since when.

The table answers questions (who is a member, who failed lately, what to
send in a push/pull) and forgets the long gone; what each message does to
it is the state machine's (``Membership``, ``state.py``).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from dataclasses import dataclass

from discovery.member import Member, Status
from discovery.profiles import Profile
from discovery.swim.messages import VIEW_DIGEST_SIZE

__all__ = ["MemberTable", "NodeState"]


@dataclass
class NodeState:
    """One member as we know it, and since when in this status (loop time)."""

    member: Member
    changed: float
    hinted: float = float("-inf")
    returned: float = float("-inf")  # when it last came back from failed or left

    @property
    def status(self) -> Status:
        return self.member.status

    @property
    def address(self) -> str:
        return self.member.addresses[0]


class MemberTable:
    """The members the local member ``local`` knows, itself included.

    Reading is public.  A subclass (``Membership``) changes the table in
    place and keeps its two indexes in step: ``_nodes`` (name ->
    ``NodeState``, the local member's under ``_me``) and ``_by_address``
    (gossip address -> name); it shares ``_profile`` and ``_loop``.
    """

    def __init__(self, local: Member, profile: Profile) -> None:
        self._me = local.node
        self._profile = profile
        self._loop = asyncio.get_running_loop()
        self._nodes: dict[str, NodeState] = {self._me: NodeState(local, self._loop.time())}
        self._by_address: dict[str, str] = {local.addresses[0]: self._me}

    # -- reading ----------------------------------------------------------

    @property
    def local(self) -> Member:
        return self._nodes[self._me].member

    def get(self, node: str) -> NodeState | None:
        return self._nodes.get(node)

    def knows_address(self, address: str) -> bool:
        """Whether ``address`` is the gossip address of a member we know
        (we gossip to, and probe for others, members only)."""
        return address in self._by_address

    def members(self) -> list[Member]:
        return [state.member for state in self._nodes.values()]

    def count(self) -> int:
        """Members alive or suspect, ourselves included (the ``n`` of the
        timing formulas)."""
        return sum(1 for state in self._nodes.values() if state.member.alive)

    def peers(self) -> list[NodeState]:
        """The others still members (alive or suspect)."""
        return [s for n, s in self._nodes.items() if n != self._me and s.member.alive]

    def recently_failed(self, within: float) -> list[NodeState]:
        now = self._loop.time()
        return [
            s
            for n, s in self._nodes.items()
            if n != self._me and s.status is Status.FAILED and now - s.changed <= within
        ]

    def failed(self) -> list[NodeState]:
        return [s for s in self._nodes.values() if s.status is Status.FAILED]

    def view_digest(self) -> bytes:
        """A digest of who we hold live (alive or suspect): members whose
        digests are equal most likely agree on who is a member."""
        digest = 0
        for name, state in self._nodes.items():
            if state.member.alive:
                digest ^= _name_hash(name)
        return digest.to_bytes(VIEW_DIGEST_SIZE, "big")

    def snapshot(self) -> tuple[Member, ...]:
        """Every record with its status, for a push/pull."""
        return tuple(state.member for state in self._nodes.values())

    # -- housekeeping -------------------------------------------------------

    def reap(self) -> list[Member]:
        """Forget members failed or left long enough ago; returns them."""
        now = self._loop.time()
        limits = {
            Status.FAILED: self._profile.reconnect_timeout,
            Status.LEFT: self._profile.tombstone_timeout,
        }
        gone = [
            name
            for name, state in self._nodes.items()
            if name != self._me
            and state.status in limits
            and now - state.changed > limits[state.status]
        ]
        reaped = [self._nodes.pop(name).member for name in gone]
        for member in reaped:
            self._by_address.pop(member.addresses[0], None)
        return reaped


@functools.lru_cache(maxsize=4096)
def _name_hash(name: str) -> int:
    # XOR of per-name hashes: order-free, and cheap to recompute per probe.
    digest = hashlib.blake2b(name.encode(), digest_size=VIEW_DIGEST_SIZE).digest()
    return int.from_bytes(digest, "big")
