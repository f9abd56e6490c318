"""Failure detection: probing one member a probe interval, and probing on
others' behalf.

Who probes whom: time-slotted round robin.  Slots are the wall clock cut
into probe intervals; every member orders the live members by name, and in
slot t the member at position j probes the one at j + 1 + (t mod (n - 1)).
That is a permutation: while views agree, each member is probed by exactly
one other in every slot, by a different one in each (memberlist's shuffled
rounds probe a member about once an interval too, but with a long tail:
measured, 0.5% of the time nobody probes it for 4 intervals).  So a dead
member is probed within an interval and confirmed dead in the next ones.
Members whose views or clocks disagree simply collide now and then, which
costs a probe, not correctness; a member slowed by its health score (below)
probes in every (score + 1)-th slot.

A probe of member T (memberlist ``probeNode``, with Lifeguard):

1. PING T (with a SUSPECT of T piggy-backed if T is already suspect: the
   buddy system, so that T learns of the accusation at once and refutes);
   wait ``probe_timeout`` for the ACK.
2. Otherwise ask ``indirect_checks`` random members to PING T for us
   (INDIRECT_PING; they forward T's ACK, or NACK if T did not answer them
   in their own ``probe_timeout``), and at the same time PING T over TCP
   (UDP may be what is broken).  Wait until the probe interval is over.
3. No answer: accuse T (SUSPECT), unless the evidence says that *we* are
   the slow one.

A member that hears of a suspicion it did not raise probes the suspect
out of turn, with a probability that makes about 4(k + 1) such probes
cluster-wide whatever its size (k: the confirmations a suspicion waits
for).  The confirmations then do not depend on the slots alone (which
views that disagree, or sick members skipping slots, can leave empty), and
the suspect hears of the accusation sooner (each probe carries it, as
above).

Lifeguard's local health awareness decides the last point: each helper
that did not even NACK in time is a point against our own health; so is
any of our own deadlines that we overslept by more than a probe timeout
(our event loop was blocked or starved: the acks may be sitting unread in
our socket).  An overslept probe accuses nobody.  The score stretches the
probe interval and timeout (``awareness.py``); each successful probe
lowers it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from discovery.member import Status
from discovery.profiles import Profile
from discovery.swim.awareness import Awareness
from discovery.swim.messages import (
    Ack,
    IndirectPing,
    Message,
    Nack,
    Ping,
    Suspect,
    View,
    encode,
    pack_body,
)
from discovery.swim.state import Membership
from discovery.swim.table import NodeState

__all__ = ["Prober"]

_log = logging.getLogger("discovery.swim.probe")

#: Sends encoded messages to "ip:port" (broadcasts are piggy-backed).
Send = Callable[[str, list[bytes]], None]
#: One TCP request/reply: address, body, timeout -> reply messages.
Request = Callable[[str, bytes, float], Awaitable[list[Message]]]


@dataclass
class _Waiter:
    acked: asyncio.Future[None]
    nacks: int = 0
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


class Prober:
    """Probes the members of ``membership`` in turn, and relays for others."""

    def __init__(
        self,
        me: str,
        profile: Profile,
        membership: Membership,
        awareness: Awareness,
        stats: Counter[str],
        send: Send,
        request: Request,
        view: Callable[[], bytes],
    ) -> None:
        self._me = me
        self._profile = profile
        self._membership = membership
        self._awareness = awareness
        self._stats = stats
        self._send = send
        self._request = request
        self._view = view
        self._loop = asyncio.get_running_loop()
        self._waiters: dict[int, _Waiter] = {}
        self._seq = random.randrange(1 << 31)
        self._out_of_turn: dict[str, asyncio.Task[None]] = {}

    # -- answers ------------------------------------------------------------

    def on_ack(self, seq: int) -> None:
        waiter = self._waiters.get(seq)
        if waiter is not None and not waiter.acked.done():
            waiter.acked.set_result(None)

    def on_nack(self, seq: int) -> None:
        waiter = self._waiters.get(seq)
        if waiter is not None:
            waiter.nacks += 1

    def relay(self, request: IndirectPing, requester: str) -> None:
        """Ping ``request.target`` for ``requester``; forward its ACK, or
        NACK when it stays silent for a probe timeout (if asked to)."""
        known = self._membership.get(request.target)
        if known is None or known.address != request.target_addr:
            # We probe members only, at the address we know them by: never
            # a stranger's idea of where to send packets.
            self._stats["relay_refused"] += 1
            if request.nack:
                self._send(requester, [encode(Nack(request.seq))])
            return
        seq = self._next_seq()
        waiter = _Waiter(self._loop.create_future())
        self._waiters[seq] = waiter
        self._stats["relayed"] += 1

        def answered(_: asyncio.Future[None]) -> None:
            self._send(requester, [encode(Ack(request.seq))])

        def expired() -> None:
            self._waiters.pop(seq, None)
            if not waiter.acked.done():
                waiter.acked.cancel()
                if request.nack:
                    self._send(requester, [encode(Nack(request.seq))])

        waiter.acked.add_done_callback(lambda f: None if f.cancelled() else answered(f))
        waiter.timer = self._loop.call_later(self._profile.probe_timeout, expired)
        self._send(request.target_addr, [encode(Ping(seq, request.target, self._me))])

    def suspected(self, node: str) -> None:
        """A suspicion of ``node`` that we did not raise has begun: maybe
        probe it now (see the module docstring)."""
        n = self._membership.count()
        k = self._profile.suspicion_confirmations(n)
        chance = min(1.0, 4 * (k + 1) / max(n - 2, 1))
        if node in self._out_of_turn or self._membership.left or random.random() >= chance:
            return
        task = self._loop.create_task(self._probe_out_of_turn(node))
        self._out_of_turn[node] = task
        task.add_done_callback(lambda _: self._out_of_turn.pop(node, None))

    async def _probe_out_of_turn(self, node: str) -> None:
        # Spread over half an interval: n probes at once would be a burst.
        await asyncio.sleep(random.uniform(0, self._profile.probe_interval / 2))
        state = self._membership.get(node)
        if state is None or state.status is not Status.SUSPECT or self._membership.left:
            return
        self._stats["probes_out_of_turn"] += 1
        try:
            await self.probe(state)
        except Exception:
            self._stats["probe_error"] += 1
            _log.exception("probing %s out of turn", node)

    def close(self) -> None:
        for task in self._out_of_turn.values():
            task.cancel()
        self._out_of_turn.clear()
        for waiter in self._waiters.values():
            if waiter.timer is not None:
                waiter.timer.cancel()
            waiter.acked.cancel()
        self._waiters.clear()

    # -- probing ------------------------------------------------------------

    async def run(self) -> None:
        """Probe this slot's member each (health-scaled) probe interval."""
        base = self._profile.probe_interval
        while True:
            every = self._awareness.score + 1
            now = time.time()
            slot = math.floor(now / base) + 1
            slot += -slot % every  # a sick member probes in fewer slots
            await asyncio.sleep(max(0.0, slot * base - now))
            target = self.target_for_slot(slot)
            if target is None or self._membership.left:
                continue
            try:
                await self.probe(target)
            except Exception:  # a bug in one probe must not end probing
                self._stats["probe_error"] += 1
                _log.exception("probing %s", target.member.node)

    async def probe(self, target: NodeState) -> bool:
        """Probe ``target`` once; True if it answered.  A failed probe
        accuses it (SUSPECT) unless we overslept our own deadlines."""
        profile, loop = self._profile, self._loop
        member = target.member
        interval = self._awareness.scale(profile.probe_interval)
        timeout = self._awareness.scale(profile.probe_timeout)
        seq = self._next_seq()
        waiter = _Waiter(loop.create_future())
        self._waiters[seq] = waiter
        start = loop.time()
        deadline = start + interval
        self._stats["probes"] += 1
        _log.debug("probing %s (interval %.2f s, timeout %.2f s)", member.node, interval, timeout)
        messages = [encode(Ping(seq, member.node, self._me))]
        if target.status is not Status.ALIVE:
            messages.append(encode(Suspect(member.node, member.incarnation, self._me)))
        messages.append(encode(View(self._view())))  # the probed member compares (sync.py)
        tcp: asyncio.Task[bool] | None = None
        try:
            self._send(target.address, messages)
            if await self._until(waiter.acked, start + timeout):
                self._awareness.apply(-1)
                return True
            overslept = self._overslept(start + timeout, timeout)

            relays = self._relays(member.node)
            request = IndirectPing(seq, member.node, target.address, self._me, True)
            for relay in relays:
                self._send(relay.address, [encode(request)])
            sent = loop.time()
            tcp = loop.create_task(self._tcp_ping(target.address, member.node, deadline))
            acked = await self._until(waiter.acked, deadline)
            overslept |= self._overslept(deadline, timeout)
            if not acked and await tcp:
                self._stats["probe_tcp_only"] += 1
                _log.warning("%s answers over TCP but not UDP", member.node)
                return True
            if acked:
                self._awareness.apply(-1)
                return True
            self._stats["probe_failed"] += 1
            if overslept:
                # Our loop was blocked past our own deadlines: the silence
                # is as likely ours as theirs.
                self._stats["probe_overslept"] += 1
                self._awareness.apply(1)
                _log.info("not accusing %s: this member was too slow to tell", member.node)
                return False
            _log.info("%s did not answer a probe", member.node)
            self._membership.on_suspect(Suspect(member.node, member.incarnation, self._me))
            # Relays have a probe timeout to NACK; allow as much again for
            # the trip (past the interval if need be) before their silence
            # counts against our own health.
            await asyncio.sleep(max(0.0, sent + 2 * timeout - loop.time()))
            missed = len(relays) - waiter.nacks if relays else 1
            self._awareness.apply(max(missed, 0))
            return False
        finally:
            self._waiters.pop(seq, None)
            if tcp is not None and not tcp.done():
                tcp.cancel()

    async def _tcp_ping(self, address: str, node: str, deadline: float) -> bool:
        remaining = deadline - self._loop.time()
        if remaining <= 0:
            return False
        body = pack_body([encode(Ping(self._next_seq(), node, self._me))])
        try:
            reply = await self._request(address, body, remaining)
        except (OSError, TimeoutError):
            return False
        return any(isinstance(message, Ack) for message in reply)

    async def _until(self, future: asyncio.Future[None], when: float) -> bool:
        if not future.done():
            remaining = when - self._loop.time()
            if remaining > 0:
                await asyncio.wait([future], timeout=remaining)
            else:
                await asyncio.sleep(0)  # one pass for whatever is already readable
        return future.done() and not future.cancelled()

    def _overslept(self, due: float, tolerance: float) -> bool:
        late = self._loop.time() - due
        if late > tolerance:
            _log.debug("probe deadline overslept by %.3f s", late)
            return True
        return False

    def _relays(self, target: str) -> list[NodeState]:
        candidates = [
            s
            for s in self._membership.peers()
            if s.status is Status.ALIVE and s.member.node != target
        ]
        return random.sample(candidates, min(self._profile.indirect_checks, len(candidates)))

    def target_for_slot(self, slot: int) -> NodeState | None:
        """The member we probe in ``slot`` (see the module docstring)."""
        names = sorted([s.member.node for s in self._membership.peers()] + [self._me])
        n = len(names)
        if n < 2:
            return None
        shift = 1 + slot % (n - 1)
        return self._membership.get(names[(names.index(self._me) + shift) % n])

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq
