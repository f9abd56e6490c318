"""The embedded SWIM engine: a member of a gossip cluster over UDP (probes,
gossip) and TCP (push/pull state exchange, fallback probes).

The engine wires the parts together, routes what arrives to them, and
runs their periodic work:

- ``Prober`` (``probe.py``): one probe a probe interval, in time slots
  that share the probes out evenly, Lifeguard-scaled;
- ``Gossip`` (``gossip.py``): queued broadcasts ride on every packet to a
  member, and every gossip interval go to a few random members (also to
  members failed lately, so a member failed by mistake hears it and refutes);
- ``StateSync`` (``sync.py``): every push/pull interval a full state
  exchange over TCP with a random live member (anti-entropy: what gossip
  missed converges here), and every reconnect interval one with a random
  *failed* member, so two sides of a healed partition find each other
  again, and reaping of members failed or left long ago.

``Membership`` (``state.py``, over the ``MemberTable`` of ``table.py``)
holds the table and decides what each message means; ``Transport``
(``transport.py``) owns the sockets and drops whatever does not
authenticate or decode.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from discovery.engine import Engine, EngineError
from discovery.events import Event
from discovery.keys import Keyring
from discovery.member import Member, MemberError, join_host, split_host
from discovery.profiles import Profile, get_profile
from discovery.swim.awareness import Awareness
from discovery.swim.gossip import Gossip
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
    View,
    encode,
    pack_body,
)
from discovery.swim.packet import Sealer
from discovery.swim.probe import Prober
from discovery.swim.state import Membership
from discovery.swim.sync import StateSync
from discovery.swim.transport import Transport

__all__ = ["SwimEngine"]

_log = logging.getLogger("discovery.swim.engine")


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
        self._gossip = Gossip(self.profile, self._sealer, self._transport)
        self._membership: Membership | None = None
        self._prober: Prober | None = None
        self._sync: StateSync | None = None
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
        self._gossip.check_fits(local)
        self._membership = Membership(
            local,
            self.profile,
            self.events,
            self._awareness,
            self._counters,
            self._gossip.send_one,
            self._suspected,
        )
        self._gossip.membership = self._membership
        self._prober = Prober(
            local.node,
            self.profile,
            self._membership,
            self._awareness,
            self._counters,
            self._gossip.send,
            self._transport.request,
            self._membership.view_digest,
        )
        self._sync = StateSync(
            self.profile, self._membership, self._counters, self._transport.request, self._spawn
        )
        for work in (
            self._prober.run(),
            self._gossip.run(),
            self._sync.run(),
            self._sync.reconnect(),
        ):
            self._spawn(work)
        _log.info("%s started at %s (profile %s)", local.node, address, self.profile.name)
        self.events.publish(Event("join", local))

    async def join(self, addresses: Sequence[str]) -> int:
        membership = self._started()
        own = membership.local.addresses[0]
        targets = [a for a in dict.fromkeys(addresses) if a != own]
        results = await asyncio.gather(*(self._join_via(a) for a in targets))
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
            self._gossip.once()  # do not wait for the next round
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
        self._gossip.check_fits(candidate)
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

    # -- receiving --------------------------------------------------------------

    def _on_packet(self, messages: list[Message], source: str) -> None:
        membership, prober = self._membership, self._prober
        if membership is None or prober is None:
            return
        me = membership.local.node
        pings: list[Ping] = []
        view: bytes | None = None
        for message in messages:
            match message:
                case Ping():
                    pings.append(message)
                case View(digest):
                    view = digest
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
            self._gossip.send(source, [encode(Ack(ping.seq))])
        if view is not None and pings and self._sync is not None:
            self._sync.compare(view, source)

    async def _on_stream(self, messages: list[Message], peer: str) -> bytes | None:
        membership, sync = self._membership, self._sync
        if membership is None or sync is None:
            return None
        for message in messages:
            match message:
                case Ping(seq, target, _) if target == membership.local.node:
                    return pack_body([encode(Ack(seq))])
                case PushPull():
                    return sync.serve(message, peer)
        return None

    # -- helpers --------------------------------------------------------------------

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task in self._tasks:  # (stop() clears the list itself)
            self._tasks.remove(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error("engine task failed", exc_info=task.exception())

    async def _join_via(self, address: str) -> bool:
        # gather() starts this a loop pass after join() checked: a stop()
        # in between must still fail the join.
        self._started()
        assert self._sync is not None
        return await self._sync.exchange(address, join=True)

    def _suspected(self, node: str) -> None:
        if self._prober is not None:
            self._prober.suspected(node)

    def _started(self) -> Membership:
        if self._membership is None or self._state != "started":
            raise EngineError(f"engine is {self._state}, not started")
        return self._membership
