"""The embedded SWIM engine: a member of a gossip cluster over UDP (probes,
gossip) and TCP (push/pull state exchange, fallback probes).

The engine wires the parts together and runs the periodic work:

- ``Prober`` (``probe.py``): one probe a probe interval, in time slots
  that share the probes out evenly, Lifeguard-scaled;
- gossip rounds: every gossip interval, queued broadcasts go to a few
  random members (also to members failed within ``gossip_to_the_dead_time``,
  so a member failed by mistake hears it and refutes);
- push/pull: every push/pull interval a full state exchange over TCP with
  a random live member (anti-entropy: what gossip missed converges here);
- reconnect: every reconnect interval a push/pull with a random *failed*
  member, so two sides of a healed partition find each other again, and
  reaping of members failed or left long ago.

``Membership`` (``state.py``) holds the table and decides what each message
means; ``Transport`` (``transport.py``) owns the sockets and drops whatever
does not authenticate or decode.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from discovery.engine import Engine, EngineError
from discovery.events import Event
from discovery.keys import Keyring
from discovery.member import Member, MemberError, Status, join_host, split_host
from discovery.profiles import Profile, get_profile
from discovery.swim.awareness import Awareness
from discovery.swim.messages import (
    Ack,
    Alive,
    Dead,
    IndirectPing,
    Message,
    Nack,
    Ping,
    PushPull,
    Suspect,
    body_overhead,
    encode,
    pack_body,
)
from discovery.swim.packet import MAX_PACKET, Sealer
from discovery.swim.probe import Prober
from discovery.swim.state import Membership
from discovery.swim.transport import Transport

__all__ = ["SwimEngine"]

_log = logging.getLogger("discovery.swim.engine")

#: Room for a body's array header (a packet holds fewer than 65536 messages).
_BODY_HEADER = body_overhead(255)


class SwimEngine(Engine):
    """One member of a SWIM cluster (see the module docstring).

    ``bind`` is ``"ip:port"`` (port 0: any free port, the same for UDP and
    TCP; the real one is in ``local().addresses[0]`` after ``start()``).
    ``advertise`` is the ``"ip:port"`` others should use, if not ``bind``
    (required when binding a wildcard address)."""

    def __init__(
        self,
        node: str,
        bind: str,
        *,
        profile: str | Profile = "lan",
        keyring: Keyring | None = None,
        pools: frozenset[str] = frozenset(),
        endpoints: Sequence[str] = (),
        slots: Mapping[str, bytes] | None = None,
        advertise: str | None = None,
    ) -> None:
        super().__init__()
        host, sep, port = bind.rpartition(":")
        self._bind_host = host.strip("[]")
        if not sep or not port.isdigit() or not self._bind_host or int(port) > 65535:
            raise EngineError(f"bind must be 'ip:port', not {bind!r}")
        self._bind_port = int(port)
        if advertise is not None and split_host(advertise)[1] == 0:
            raise EngineError(f"advertise must be 'ip:port', not {advertise!r}")
        if advertise is None and self._bind_host in ("0.0.0.0", "::"):
            raise EngineError("binding a wildcard address needs an advertise address")
        self.profile = get_profile(profile)
        self.keyring = keyring
        self._advertise = advertise
        try:
            self._local = Member(
                node,
                (advertise or bind,),
                frozenset(pools),
                tuple(endpoints),
                incarnation=0,
                slots=slots or {},
            )
        except MemberError as exc:
            raise EngineError(str(exc)) from None
        self._counters: Counter[str] = Counter()
        self._sealer = Sealer(keyring)
        self._transport = Transport(
            self._sealer, self._counters, self._on_packet, self._on_stream, self.profile.tcp_timeout
        )
        self._awareness = Awareness(self.profile.awareness_max_multiplier)
        self._membership: Membership | None = None
        self._prober: Prober | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._state = "new"  # -> started -> stopped

    # -- life cycle ---------------------------------------------------------

    async def start(self) -> None:
        if self._state != "new":
            raise EngineError(f"engine already {self._state}")
        self._state = "started"
        try:
            port = await self._transport.start(self._bind_host, self._bind_port)
        except OSError as exc:
            self._state = "stopped"
            raise EngineError(f"cannot bind {self._bind_host}:{self._bind_port}: {exc}") from exc
        address = self._advertise or join_host(self._bind_host, port)
        local = replace(self._local, addresses=(address,))
        self._check_fits(local)
        self._membership = Membership(
            local,
            self.profile,
            self.events,
            self._awareness,
            self._counters,
            self._send_one,
            self._suspected,
        )
        self._prober = Prober(
            local.node,
            self.profile,
            self._membership,
            self._awareness,
            self._counters,
            self._send,
            self._transport.request,
        )
        for work in (
            self._prober.run(),
            self._gossip_rounds(),
            self._push_pull_rounds(),
            self._reconnect_rounds(),
        ):
            self._spawn(work)
        _log.info("%s started at %s (profile %s)", local.node, address, self.profile.name)
        self.events.publish(Event("join", local))

    async def join(self, addresses: Sequence[str]) -> int:
        membership = self._started()
        own = membership.local.addresses[0]
        targets = [a for a in dict.fromkeys(addresses) if a != own]
        results = await asyncio.gather(*(self._push_pull(a, join=True) for a in targets))
        answered = sum(results)
        if not answered:
            raise EngineError(f"no member answered at {', '.join(targets) or '(none)'}")
        return answered

    async def leave(self) -> None:
        membership = self._started()
        if membership.left:
            return
        goodbye = membership.leave()
        if membership.peers():
            self._gossip_once()  # do not wait for the next round
            try:
                await asyncio.wait_for(asyncio.shield(goodbye), self.profile.leave_timeout)
            except TimeoutError:
                _log.warning(
                    "leave: goodbye not fully gossiped in %.1f s", self.profile.leave_timeout
                )

    async def stop(self) -> None:
        if self._state == "stopped":
            return
        self._state = "stopped"
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._prober is not None:
            self._prober.close()
        if self._membership is not None:
            self._membership.close()
        await self._transport.close()
        self.events.close()

    # -- the local member -----------------------------------------------------

    def local(self) -> Member:
        return self._membership.local if self._membership is not None else self._local

    def members(self) -> list[Member]:
        return self._membership.members() if self._membership is not None else [self._local]

    async def update_local(
        self,
        *,
        pools: frozenset[str] | None = None,
        endpoints: Sequence[str] | None = None,
        slots: Mapping[str, bytes] | None = None,
    ) -> Member:
        membership = self._started()
        me = membership.local
        try:
            candidate = me.changed(
                me.incarnation + 1, pools=pools, endpoints=endpoints, slots=slots
            )
        except MemberError as exc:
            raise EngineError(str(exc)) from None
        self._check_fits(candidate)
        return membership.update_local(candidate)

    def stats(self) -> dict[str, int]:
        out = dict(self._counters)
        out["health_score"] = self._awareness.score
        if self._membership is not None:
            out["members_alive"] = self._membership.count()
            out["broadcast_queue"] = len(self._membership.queue)
        return out

    # -- diagnostics and fault injection ----------------------------------------

    async def probe(self, node: str) -> bool:
        """Probe ``node`` now, out of turn; True if it answered.  A failed
        probe accuses it as a scheduled one would."""
        membership = self._started()
        state = membership.get(node)
        if state is None or not state.member.alive or node == membership.local.node:
            raise EngineError(f"{node!r} is not another live member")
        assert self._prober is not None
        return await self._prober.probe(state)

    async def set_keyring(self, keyring: Keyring) -> None:
        """Seal with ``keyring.primary`` and open with all its keys from now
        on (key rotation, one step at a time on every member; this member
        only).  ``EngineError`` if the engine runs without a keyring."""
        try:
            self._sealer.rekey(keyring)
        except ValueError as exc:
            raise EngineError(str(exc)) from None
        self.keyring = keyring
        _log.info("keyring changed: %r", keyring)

    def partition(self, ips: Iterable[str]) -> None:
        """Drop all traffic to and from these IPs, as a network partition
        would (empty: heal).  For tests and drills."""
        self._transport.block(ips)

    # -- sending ----------------------------------------------------------------

    def _send(self, address: str, messages: list[bytes]) -> None:
        """Send ``messages`` to ``address`` in one packet, filled up with
        queued broadcasts if it is a member's (an unauthenticated sender
        must not turn our small answers into large ones to a stranger)."""
        free = MAX_PACKET - self._sealer.overhead - _BODY_HEADER - sum(map(len, messages))
        if self._membership is not None and self._membership.knows_address(address):
            messages = messages + self._membership.queue.get(0, free, max_items=255 - len(messages))
        self._transport.send(address, pack_body(messages))

    def _send_one(self, address: str, message: bytes) -> None:
        self._send(address, [message])

    def _suspected(self, node: str) -> None:
        if self._prober is not None:
            self._prober.suspected(node)

    def _gossip_once(self) -> None:
        membership = self._membership
        if membership is None or not len(membership.queue):
            return
        candidates = membership.peers() + membership.recently_failed(
            self.profile.gossip_to_the_dead_time
        )
        targets = random.sample(candidates, min(self.profile.gossip_nodes, len(candidates)))
        free = MAX_PACKET - self._sealer.overhead - _BODY_HEADER
        for target in targets:
            messages = membership.queue.get(0, free)
            if not messages:
                break
            self._transport.send(target.address, pack_body(messages))

    def _check_fits(self, member: Member) -> None:
        size = len(encode(Alive(member))) + self._sealer.overhead + _BODY_HEADER
        if size > MAX_PACKET:
            raise EngineError(
                f"the record of {member.node} takes {size} bytes; a packet holds {MAX_PACKET}"
            )

    # -- receiving --------------------------------------------------------------

    def _on_packet(self, messages: list[Message], source: str) -> None:
        membership, prober = self._membership, self._prober
        if membership is None or prober is None:
            return
        me = membership.local.node
        pings: list[Ping] = []
        for message in messages:
            match message:
                case Ping():
                    pings.append(message)
                case IndirectPing():
                    prober.relay(message, source)
                case Ack(seq):
                    prober.on_ack(seq)
                case Nack(seq):
                    prober.on_nack(seq)
                case Suspect():
                    membership.on_suspect(message)
                case Alive(member):
                    membership.on_alive(member)
                case Dead():
                    membership.on_dead(message)
                case PushPull():
                    self._counters["drop_misplaced"] += 1  # TCP only
        # Answer after the news is in: an accusation that rode with the ping
        # (the buddy system) is refuted in the ack itself.
        for ping in pings:
            if ping.target != me:
                self._counters["drop_misdirected"] += 1
                continue
            self._send(source, [encode(Ack(ping.seq))])

    async def _on_stream(self, messages: list[Message], peer: str) -> bytes | None:
        membership = self._membership
        if membership is None:
            return None
        for message in messages:
            match message:
                case Ping(seq, target, _) if target == membership.local.node:
                    return pack_body([encode(Ack(seq))])
                case PushPull(join, members):
                    self._counters["push_pull_served"] += 1
                    _log.debug("push/pull from %s (join=%s, %d members)", peer, join, len(members))
                    # Merge first: a refutation it provokes goes back at once.
                    membership.merge(members)
                    return pack_body([encode(PushPull(False, membership.snapshot()))])
        return None

    # -- periodic work ------------------------------------------------------------

    async def _push_pull(self, address: str, *, join: bool = False) -> bool:
        membership = self._started()
        body = pack_body([encode(PushPull(join, membership.snapshot()))])
        try:
            reply = await self._transport.request(address, body, self.profile.tcp_timeout)
        except (OSError, TimeoutError) as exc:
            self._counters["push_pull_failed"] += 1
            _log.debug("push/pull with %s: %s", address, exc or type(exc).__name__)
            return False
        for message in reply:
            if isinstance(message, PushPull):
                self._counters["push_pull"] += 1
                membership.merge(message.members)
                return True
        return False

    async def _gossip_rounds(self) -> None:
        while True:
            await asyncio.sleep(self.profile.gossip_interval)
            self._gossip_once()

    async def _push_pull_rounds(self) -> None:
        membership = self._started()
        period = self.profile.push_pull_period(membership.count())
        await asyncio.sleep(random.uniform(0, period))
        while True:
            alive = [s for s in membership.peers() if s.status is Status.ALIVE]
            if alive and not membership.left:
                await self._push_pull(random.choice(alive).address)
            await asyncio.sleep(self.profile.push_pull_period(membership.count()))

    async def _reconnect_rounds(self) -> None:
        membership = self._started()
        interval = self.profile.reconnect_interval
        while True:
            await asyncio.sleep(random.uniform(0.5 * interval, 1.5 * interval))
            for member in membership.reap():
                _log.info("forgot %s (%s)", member.node, member.status.value)
            failed = membership.failed()
            if failed and not membership.left:
                target = random.choice(failed)
                if await self._push_pull(target.address):
                    self._counters["reconnected"] += 1

    # -- helpers --------------------------------------------------------------------

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            _log.error("engine task failed", exc_info=task.exception())

    def _started(self) -> Membership:
        if self._membership is None or self._state != "started":
            raise EngineError(f"engine is {self._state}, not started")
        return self._membership
