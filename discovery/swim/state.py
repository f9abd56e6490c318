"""The member table's state machine: what alive, suspect and dead messages
do to it (the table itself, and what it answers, is ``table.py``).

Every member's record carries an incarnation that only the member itself
raises.  A message about a member is news only if its incarnation is
higher than the one we hold (or, for suspect and dead, at least as high:
an accusation of the current incarnation is news).  Transitions::

    (unknown) --alive--> ALIVE <--alive (higher)-- SUSPECT, FAILED, LEFT
    ALIVE --suspect--> SUSPECT --timeout--> FAILED
    ALIVE/SUSPECT --dead--> FAILED, or LEFT when the member said it itself

An accusation of the local member is refuted: it re-announces itself alive
with an incarnation above the accusation's, and counts the accusation
against its own health (Lifeguard).  A restarted member learns its old
incarnation the same way, from a push/pull that shows it failed or left.

News is gossiped on (``BroadcastQueue``) and published as events: ``join``
(new, or back from failed/left), ``update`` (the record changed),
``failed``, ``leave``.  After memberlist's ``state.go`` (``aliveNode``,
``suspectNode``, ``deadNode``, ``mergeState``), with two changes: a failed
or left member may come back under a new address only with a higher
incarnation (so a ``join`` always orders after the ``failed`` it follows),
a member that announces itself with a stale incarnation is told at
once that it is dead there, so it refutes without waiting for a push/pull,
a member that accuses one already failed or left is told the verdict, so
it does not wait out a suspicion nobody is left to confirm, and a
refutation goes straight to the members as well as by gossip.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import replace

from discovery.events import Event, EventStream
from discovery.member import Member, Status
from discovery.profiles import Profile
from discovery.swim.awareness import Awareness
from discovery.swim.broadcast import BroadcastQueue
from discovery.swim.messages import Alive, Dead, Suspect, encode
from discovery.swim.suspicion import Suspicion
from discovery.swim.table import MemberTable, NodeState

__all__ = ["Membership"]

_log = logging.getLogger("discovery.swim.state")

_GONE = (Status.FAILED, Status.LEFT)
#: Members a refutation is sent to directly, besides being gossiped.
REFUTE_DIRECT = 128


class Membership(MemberTable):
    """The member table of the local member ``local``, and what the
    messages about its members do to it."""

    def __init__(
        self,
        local: Member,
        profile: Profile,
        events: EventStream,
        awareness: Awareness,
        stats: Counter[str],
        send: Callable[[str, bytes], None],
        suspected: Callable[[str], None] = lambda node: None,
    ) -> None:
        super().__init__(local, profile)
        self._suspected = suspected  # a suspicion we did not raise has begun
        self._events = events
        self._awareness = awareness
        self._stats = stats
        self._send = send  # one encoded message, straight to "ip:port"
        self._suspicions: dict[str, Suspicion] = {}
        self.queue = BroadcastQueue(lambda: profile.retransmit_limit(self.count()))
        self.left = False
        self._goodbye: asyncio.Future[None] | None = None

    # -- the local member ---------------------------------------------------

    def announce(self) -> None:
        """Gossip the local record (at start, and after changing it)."""
        self.queue.queue(self._me, encode(Alive(self.local)))

    def update_local(self, member: Member) -> Member:
        """Make ``member`` (the local record changed, at a higher
        incarnation) the local record and announce it."""
        previous = self.local
        if member.node != previous.node or member.incarnation <= previous.incarnation:
            raise ValueError(f"{member.node} at {member.incarnation} does not follow our record")
        member = member.with_status(previous.status)
        self._nodes[self._me].member = member
        self.announce()
        if not previous.same_record(member):
            self._events.publish(Event("update", member, previous))
        return member

    def leave(self) -> asyncio.Future[None]:
        """Mark ourselves left and gossip the goodbye; the future resolves
        once it has been sent often enough."""
        self._goodbye = self._loop.create_future()
        self.left = True
        me = self.local
        self.on_dead(Dead(me.node, me.incarnation, me.node))
        return self._goodbye

    def _refute(self, accused: int, accuser: str | None = None) -> None:
        me = self.local
        incarnation = max(me.incarnation + 1, accused + 1)
        self._nodes[self._me].member = replace(me, incarnation=incarnation)
        self._awareness.apply(1)  # being accused is evidence we are slow
        self._stats["refuted"] += 1
        _log.info("refuting an accusation at incarnation %d with %d", accused, incarnation)
        self.announce()
        # Every member that heard the accusation runs a suspicion timer, and
        # we cannot know which did: gossip alone leaves one now and then
        # uninformed until its timer fails us.  A refutation is rare, so it
        # also goes straight to the members (the accuser first, up to
        # REFUTE_DIRECT of them).
        alive = encode(Alive(self.local))
        peers = self.peers()
        random.shuffle(peers)
        peers.sort(key=lambda s: s.member.node != accuser)
        for state in peers[:REFUTE_DIRECT]:
            self._send(state.address, alive)

    # -- messages -----------------------------------------------------------

    def on_alive(self, member: Member) -> None:
        node = member.node
        if node == self._me:
            me = self.local
            if self.left or member.incarnation < me.incarnation:
                return
            if member.incarnation == me.incarnation and member.same_record(me):
                return
            self._refute(member.incarnation)  # another version of us is about
            return
        member = member.with_status(Status.ALIVE)
        now = self._loop.time()
        state = self._nodes.get(node)
        if state is None:
            self._nodes[node] = NodeState(member, now)
            self._by_address[member.addresses[0]] = node
            self.queue.queue(node, encode(Alive(member)))
            _log.info("%s joined (incarnation %d)", node, member.incarnation)
            self._events.publish(Event("join", member))
            return
        old = state.member
        if old.status in _GONE:
            if member.incarnation <= old.incarnation:
                self._hint(state, member)
                return
        elif member.addresses[:1] != old.addresses[:1]:
            self._stats["conflict"] += 1
            _log.warning(
                "%s claims %s but is alive at %s", node, member.addresses[0], state.address
            )
            return
        elif member.incarnation <= old.incarnation:
            return
        _log.debug(
            "%s alive at incarnation %d (was %s at %d)",
            node,
            member.incarnation,
            old.status.value,
            old.incarnation,
        )
        self._cancel_suspicion(node)
        if old.status in _GONE:
            state.returned = now
        if member.addresses[0] != old.addresses[0]:
            self._by_address.pop(old.addresses[0], None)
            self._by_address[member.addresses[0]] = node
        state.member = member
        if old.status is not Status.ALIVE:
            state.changed = now
        self.queue.queue(node, encode(Alive(member)))
        if old.status in _GONE:
            _log.info("%s is back (incarnation %d)", node, member.incarnation)
            self._events.publish(Event("join", member))
        elif not old.same_record(member):
            self._events.publish(Event("update", member, old.with_status(Status.ALIVE)))

    def on_suspect(self, message: Suspect, *, tell: bool | None = None) -> None:
        """``tell``: send the accusation to the accused too (default: when
        we are the accuser), so that it can refute in time however the
        gossip goes."""
        node = message.node
        state = self._nodes.get(node)
        if state is None or message.incarnation < state.member.incarnation:
            return
        suspicion = self._suspicions.get(node)
        if suspicion is not None:
            if suspicion.confirm(message.source):
                self.queue.queue(node, encode(message))  # let others count it too
            return
        if state.status is not Status.ALIVE:
            if state.status in _GONE and message.source != self._me:
                self._tell_verdict(state, message)
            return
        if node == self._me:
            if not self.left:
                self._refute(message.incarnation, message.source)
            return
        self.queue.queue(node, encode(message))
        changed = self._loop.time()
        state.member = replace(state.member, incarnation=message.incarnation, status=Status.SUSPECT)
        state.changed = changed
        n = self.count()
        self._stats["suspected"] += 1
        _log.info("suspecting %s (accused by %s)", node, message.source)
        self._suspicions[node] = Suspicion(
            message.source,
            self._profile.suspicion_confirmations(n),
            self._profile.suspicion_timeout(n),
            self._profile.suspicion_max_timeout(n),
            functools.partial(self._suspicion_expired, node, changed),
            self._loop,
        )
        if tell if tell is not None else message.source == self._me:
            self._send(state.address, encode(message))
        if message.source != self._me:
            self._suspected(node)

    def _suspicion_expired(self, node: str, changed: float, confirmations: int) -> None:
        self._suspicions.pop(node, None)
        state = self._nodes.get(node)
        if state is None or state.status is not Status.SUSPECT or state.changed != changed:
            return
        _log.info("%s failed: suspicion ran out (%d confirmations)", node, confirmations)
        self.on_dead(Dead(node, state.member.incarnation, self._me))

    def on_dead(self, message: Dead) -> None:
        node = message.node
        state = self._nodes.get(node)
        if state is None or message.incarnation < state.member.incarnation:
            return
        if (
            not message.left
            and node != self._me
            and state.member.alive
            and self._cut_off(message.source)
        ):
            # Declared by a member we hold failed, or held failed until just
            # now: a verdict from the far side of a partition that is
            # healing (or from the dead).  It may be stale, so it only opens
            # a suspicion, which the accused can refute, as a push/pull's
            # verdicts do (or confirms one).
            self._stats["dead_as_suspect"] += 1
            self.on_suspect(Suspect(node, message.incarnation, message.source), tell=True)
            return
        self._cancel_suspicion(node)
        if state.status in _GONE:
            return
        if node == self._me:
            if not self.left:
                self._refute(message.incarnation, message.source)
                return
            self.queue.queue(node, encode(message), self._goodbye)
        else:
            self.queue.queue(node, encode(message))
        status = Status.LEFT if message.left else Status.FAILED
        state.member = replace(state.member, incarnation=message.incarnation, status=status)
        state.changed = self._loop.time()
        self._stats["left" if message.left else "failed"] += 1
        _log.info("%s %s", node, "left" if message.left else "failed")
        self._events.publish(Event("leave" if message.left else "failed", state.member))

    def _cut_off(self, judge: str) -> bool:
        """Whether ``judge`` is, or was within the longest suspicion, a
        member we hold failed or left (its verdicts may predate a heal)."""
        state = self._nodes.get(judge)
        if state is None or judge == self._me:
            return False
        if state.status in _GONE:
            return True
        window = self._profile.suspicion_max_timeout(self.count())
        return self._loop.time() - state.returned < window

    def merge(self, members: Iterable[Member]) -> None:
        """Fold in another member's full state (push/pull).  Its failed
        verdicts become our suspicions: the accused may still refute."""
        for member in members:
            if member.status is Status.ALIVE:
                self.on_alive(member)
            elif member.status is Status.LEFT:
                self.on_dead(Dead(member.node, member.incarnation, member.node))
            else:
                if member.status is Status.SUSPECT and member.node not in self._nodes:
                    self.on_alive(member)  # learn the record, then the doubt
                self.on_suspect(Suspect(member.node, member.incarnation, self._me))

    # -- housekeeping ---------------------------------------------------------

    def _hint(self, state: NodeState, claim: Member) -> None:
        """Tell a member announcing a stale incarnation that it is dead to
        us, at most once a probe interval, so it refutes."""
        now = self._loop.time()
        if now - state.hinted < self._profile.probe_interval:
            return
        state.hinted = now
        self._stats["hints"] += 1
        old = state.member
        self._send(claim.addresses[0], encode(Dead(old.node, old.incarnation, self._me)))

    def _tell_verdict(self, state: NodeState, accusation: Suspect) -> None:
        """Answer an accusation of a member we hold failed or left with our
        verdict, straight to the accuser.  A member that missed the
        verdict's gossip and then accuses alone would otherwise wait out
        its longest suspicion: the members that could confirm it have
        already moved on."""
        accuser = self._nodes.get(accusation.source)
        old = state.member
        if accuser is None or accusation.incarnation > old.incarnation:
            return  # a stranger, or news of a later incarnation than our verdict's
        self._stats["verdicts_told"] += 1
        judge = old.node if old.status is Status.LEFT else self._me
        self._send(accuser.address, encode(Dead(old.node, old.incarnation, judge)))

    def _cancel_suspicion(self, node: str) -> None:
        suspicion = self._suspicions.pop(node, None)
        if suspicion is not None:
            suspicion.cancel()

    def close(self) -> None:
        for suspicion in self._suspicions.values():
            suspicion.cancel()
        self._suspicions.clear()
        self.queue.clear()
