"""``SerfEngine``: the membership engine backed by a HashiCorp Serf agent.

The engine drives one agent over its RPC protocol: its own agent, started
on ``bind`` (``rpc=None``), or one already running at ``rpc``.  Our record
rides in the agent's tags (``discovery.serf.tags``); a member whose tag
cannot carry its endpoints (or slots) answers the ``aiocoloc-record`` query
with its whole ``Member.pack()``, so ``members()`` holds full records.

Keys: an own agent starts with ``-encrypt`` and the keyring's primary key,
and installs the other keys before it joins anyone.  ``set_keyring`` rotates
through Serf's key commands, which act on every member of the cluster: the
first sidecar to apply a step applies it everywhere, and the others then
find it done.  So it applies only what changed since the keyring it was
given last (a sidecar whose key file did not change never undoes another's
step).

Serf's event stream is a hint, not a ledger: the agent drops events when
the 512-event buffer of a client fills, and nothing flows while the
connection is down.  So the engine reads the member list again (a *resync*)
after every (re)connection, every ``resync_interval`` seconds, whenever its
own queue overflowed, and whenever the agent's log says it dropped events
for this connection; ``MemberTable`` turns the differences into the events
that were missed.  Events about the local member are not published.

Serf coalesces member events (a quiet second, three at most) before it
streams them, so events come about a second after the change; a resync may
publish a change first, and the late event then changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from discovery.engine import Engine, EngineError
from discovery.events import Event
from discovery.member import Member, MemberError, Status, join_host, split_host
from discovery.serf import key_commands
from discovery.serf.agent import SerfAgent, serf_profile
from discovery.serf.records import RECORD_QUERY, RecordFetcher, check_answerable
from discovery.serf.rpc import SerfRPC
from discovery.serf.tags import TAG, record_tags
from discovery.serf.view import MemberTable, read_tag, serf_status
from discovery.serf.wire import (
    MemberEvent,
    QueryEvent,
    SerfError,
    SerfMember,
    StreamGap,
)

if TYPE_CHECKING:
    from discovery.keys import Keyring
    from discovery.serf.rpc import RecordStream
    from discovery.serf.wire import StreamRecord

__all__ = ["RECORD_QUERY", "SerfEngine"]

_log = logging.getLogger("discovery.serf.engine")

#: What the engine subscribes to.
STREAM_FILTER = (
    "member-join,member-leave,member-failed,member-update,member-reap,query:" + RECORD_QUERY
)


class _AgentGone(SerfError):
    """Our own agent exited and is not to be restarted."""


class SerfEngine(Engine):
    """Membership through a Serf agent.

    ``rpc=None``: start an agent of our own bound to ``bind`` (gossip), RPC on
    a free loopback port with a random auth key (or ``rpc_auth``), profile
    ``profile`` (our ``host`` is Serf's ``local``), ``-encrypt`` with
    ``keyring.primary``, ``-advertise`` ``advertise``.  ``rpc="host:port"``:
    attach to a running agent (``rpc_auth``: its RPC auth key); ``bind``,
    ``profile``, ``keyring`` and ``advertise`` are then the agent's business,
    and the agent's node name must be ``node``.

    Tunables, set before ``start()``: ``resync_interval``, ``query_timeout``,
    ``request_timeout``, ``reconnect_max`` and ``restart_agent`` (an own agent
    that dies is started again and rejoins the members last seen alive)."""

    resync_interval = 30.0
    query_timeout = 2.0
    request_timeout = 10.0
    reconnect_max = 2.0
    restart_agent = True

    def __init__(
        self,
        node: str,
        bind: str,
        *,
        profile: str = "lan",
        keyring: Keyring | None = None,
        pools: frozenset[str] = frozenset(),
        endpoints: Sequence[str] = (),
        slots: Mapping[str, bytes] | None = None,
        advertise: str | None = None,
        rpc: str | None = None,
        rpc_auth: str | None = None,
        serf_binary: str = "serf",
    ) -> None:
        super().__init__()
        serf_profile(profile)  # a clear error now rather than at start()
        if rpc is None and not split_host(bind)[0]:
            raise EngineError(f"bad bind address {bind!r} (want ip:port)")
        try:
            local = Member(
                node=node,
                addresses=(advertise or bind,),
                pools=frozenset(pools),
                endpoints=tuple(endpoints),
                incarnation=time.time_ns() // 1_000_000,  # a restart outranks the run before
                slots=slots or {},
            )
        except MemberError as exc:
            raise EngineError(str(exc)) from None
        tags = record_tags(local)  # TagsTooLarge now
        self._table = MemberTable(local)
        self._keyring = keyring  # the keys last set (an attached agent's: as we were told)
        self.rpc_address = rpc
        self._rpc_auth = rpc_auth
        self._advertise = advertise
        self.agent: SerfAgent | None = None
        if rpc is None:
            self._rpc_auth = rpc_auth or secrets.token_urlsafe(24)
            self.agent = SerfAgent(
                node,
                bind,
                rpc_auth=self._rpc_auth,
                profile=profile,
                encrypt_key=keyring.primary if keyring is not None else None,
                tags=tags,
                advertise=advertise,
                binary=serf_binary,
            )
        self._rpc: SerfRPC | None = None
        self._stream: RecordStream[StreamRecord] | None = None
        self._resync_lock = asyncio.Lock()
        self._tags_lock = asyncio.Lock()  # tag writes in the order of the records
        self._keys_lock = asyncio.Lock()  # one rotation at a time
        self._tasks: list[asyncio.Task[None]] = []
        self._state = "new"  # -> running -> left -> stopped
        self._counters: Counter[str] = Counter()
        self._records = RecordFetcher(self._connected, self._settle, self._counters)
        check_answerable(local)

    # ---------------------------------------------------------- interface

    async def start(self) -> None:
        if self._state != "new":
            raise EngineError(f"engine {self.local().node!r} already started")
        self._state = "running"
        self._records.timeout = self.query_timeout
        try:
            if self.agent is not None:
                await self.agent.start()
                self.rpc_address = self.agent.rpc_address
            await self._connect()
        except BaseException:
            await self.stop()
            raise
        self._tasks = [
            asyncio.create_task(self._run(), name=f"serf-engine {self.local().node}"),
            asyncio.create_task(self._records.run(), name=f"serf-records {self.local().node}"),
        ]

    async def join(self, addresses: Sequence[str]) -> int:
        rpc = self._connected()
        count = await rpc.join(list(addresses), timeout=max(self.request_timeout, 30.0))
        if count < 1:
            raise EngineError(f"no member answered at {list(addresses)}")
        return count

    async def leave(self) -> None:
        if self._state != "running":
            return
        self._state = "left"
        if self.agent is not None:
            await self.agent.stop(leave=True)  # leave over RPC; the agent exits after it
        else:  # the agent is not ours to stop: our record goes, the others see us leave
            try:
                await self._connected().update_tags(delete=[TAG])
            except EngineError as exc:
                _log.warning("%s: leave failed: %s", self.local().node, exc)
        self._table.local = self._table.local.with_status(Status.LEFT)

    async def stop(self) -> None:
        if self._state == "stopped":
            return
        attached_running = self.agent is None and self._state == "running"
        self._state = "stopped"
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        rpc, self._rpc = self._rpc, None
        if rpc is not None:
            if attached_running and not rpc.closed:
                with contextlib.suppress(SerfError):
                    await rpc.update_tags(delete=[TAG])  # our record goes with us
            await rpc.close()
        if self.agent is not None:
            await self.agent.stop(leave=False)
        self.events.close()

    def local(self) -> Member:
        return self._table.local

    def members(self) -> list[Member]:
        return self._table.members()

    async def update_local(
        self,
        *,
        pools: frozenset[str] | None = None,
        endpoints: Sequence[str] | None = None,
        slots: Mapping[str, bytes] | None = None,
    ) -> Member:
        async with self._tags_lock:
            old = self.local()
            try:
                new = old.changed(
                    max(old.incarnation + 1, time.time_ns() // 1_000_000),
                    pools=pools,
                    endpoints=endpoints,
                    slots=slots,
                )
            except MemberError as exc:
                raise EngineError(str(exc)) from None
            others = await self._other_tags()
            tags = record_tags(new, others)
            check_answerable(new)
            rpc = self._rpc
            if rpc is not None and not rpc.closed:
                await rpc.update_tags(tags)
            # else: set on reconnection (_publish_local).
            self._table.local = new
            if self.agent is not None:
                self.agent.tags = dict(tags)  # a restarted agent starts with them
            return new

    async def set_keyring(self, keyring: Keyring) -> None:
        """Rotate to ``keyring`` (see the module docstring): install the keys
        it adds, make its primary the primary, remove the keys it drops, on
        every member.  Members that failed a step or did not answer are
        logged (a member that missed a key is cut off once the others stop
        using the keys it has).  ``EngineError`` if the agent runs without
        encryption or refused a step itself: the keys last set then stay the
        engine's, and setting ``keyring`` again retries (every step is
        idempotent)."""
        if self.agent is not None and self._keyring is None:
            raise EngineError(
                "the serf agent runs without encryption; restart with a key file to encrypt"
            )
        async with self._keys_lock:
            before = self._keyring.keys if self._keyring is not None else ()
            node = self.local().node
            if await key_commands.rotate(self._connected(), before, keyring, node):
                if self.agent is not None:
                    self.agent.encrypt_key = keyring.primary  # a restarted agent's -encrypt
            self._keyring = keyring
            self._counters["key_changes"] += 1
        _log.info("%s: keyring changed: %r", self.local().node, keyring)

    async def installed_keys(self) -> dict[bytes, int]:
        """Every key installed on some member, and on how many (Serf's
        ``list-keys``)."""
        answer = await self._connected().list_keys()
        if answer.error:
            _log.warning("%s: list-keys: %s %s", self.local().node, answer.error, answer.messages)
        return dict(answer.keys)

    async def _install_other_keys(self, rpc: SerfRPC) -> None:
        """A fresh own agent has the primary key only (``-encrypt``): the
        others go in before it joins anyone (so only to itself)."""
        if self._keyring is not None and len(self._keyring) >= 2:
            await key_commands.install_keys(rpc, self._keyring.keys[1:], self.local().node)

    def stats(self) -> dict[str, int]:
        out = dict(self._counters)
        out["published"] = self.events.published
        out["members"] = len(self._table.members())
        return out

    async def resync(self) -> int:
        """Read the agent's member list and publish what changed since the
        last look; how many events that made."""
        rpc = self._connected()
        async with self._resync_lock:
            snapshot = await rpc.members()
            self._counters["resyncs"] += 1
            before = self.events.published
            present = set()
            for member in snapshot:
                present.add(member.name)
                self._observe(member, None)
            for node in self._table.vanished(present):
                self._forget(node, Status.FAILED)
            return self.events.published - before

    async def fetch(self, node: str) -> Member:
        """``node``'s whole record, asked with the record query."""
        answers = await self._records.ask([node])
        if node not in answers:
            raise EngineError(f"{node!r} did not answer the {RECORD_QUERY!r} query")
        known = self._table.get(node)
        return answers[node].with_status(known.status if known is not None else Status.ALIVE)

    # --------------------------------------------------------- connection

    def _connected(self) -> SerfRPC:
        rpc = self._rpc
        if rpc is None or rpc.closed:
            raise EngineError(f"engine {self.local().node!r} is not connected to its serf agent")
        return rpc

    async def _connect(self) -> None:
        """(Re)connect: the agent (restarted if ours died), our tags, the
        event stream, then a resync."""
        rejoin: list[str] = []
        fresh_agent = self.agent is not None and not self._counters["connections"]
        if self.agent is not None and not self.agent.running:
            if self._counters["connections"]:
                if not self.restart_agent:
                    raise _AgentGone(f"serf agent of {self.local().node!r} exited")
                rejoin = [
                    m.addresses[0]
                    for m in self._table.members()
                    if m.alive and m.node != self.local().node
                ]
                await self.agent.start()
                self.rpc_address = self.agent.rpc_address
                self._counters["agent_restarts"] += 1
                fresh_agent = True
        assert self.rpc_address is not None
        rpc = await SerfRPC.connect(
            self.rpc_address, auth_key=self._rpc_auth, timeout=self.request_timeout
        )
        try:
            name = (await rpc.stats()).get("agent", {}).get("name")
            if name != self.local().node:
                raise EngineError(
                    f"serf agent at {self.rpc_address} is node {name!r}, not {self.local().node!r}"
                )
            self._stream = await rpc.stream(STREAM_FILTER)
            self._rpc = rpc
            await self._publish_local(rpc)
            if fresh_agent:
                await self._install_other_keys(rpc)
            if rejoin:
                with contextlib.suppress(SerfError):
                    await rpc.join(rejoin, timeout=self.request_timeout)
            self._counters["connections"] += 1
            await self.resync()
        except BaseException:
            self._rpc = None
            await rpc.close()
            raise

    async def _publish_local(self, rpc: SerfRPC) -> None:
        """Make the agent's view of us ours: address, and tag if it differs."""
        async with self._tags_lock:
            for member in await rpc.members():
                if member.name == self.local().node:
                    local = replace(self.local(), addresses=(member.address,))
                    self._table.local = local
                    self._pin_gossip_port(member.port)
                    tags = record_tags(local, member.tags)
                    if member.tags.get(TAG) != tags[TAG] and self._state == "running":
                        await rpc.update_tags(tags)
                    return

    def _pin_gossip_port(self, port: int) -> None:
        """An own agent bound to port 0 restarts on the port it was given:
        on another, the others would see two nodes claim our name, and
        Serf's conflict resolution would shut the newcomer down."""
        agent = self.agent
        if agent is None:
            return
        host, bound = split_host(agent.bind)
        advertised = split_host(self._advertise)[1] if self._advertise else 0
        if host and bound == 0 and not advertised:
            agent.bind = join_host(host, port)

    async def _other_tags(self) -> dict[str, str]:
        """The agent's tags other than ours (they count in the 512 bytes)."""
        rpc = self._rpc
        if rpc is None or rpc.closed or self.agent is not None:
            return {}
        for member in await rpc.members():
            if member.name == self.local().node:
                return {k: v for k, v in member.tags.items() if k != TAG}
        return {}

    async def _run(self) -> None:
        """Read the stream; on any loss, reconnect (backing off) and resync."""
        pause = 0.1
        while self._state == "running":
            try:
                if self._rpc is None or self._rpc.closed:
                    await self._connect()
                    self._counters["reconnects"] += 1
                    pause = 0.1
                await self._pump()
            except _AgentGone as exc:
                _log.error(
                    "%s: %s, not restarting it (restart_agent is off)", self.local().node, exc
                )
                return
            except (EngineError, OSError) as exc:
                if self._state != "running":
                    return
                if self._rpc is not None:
                    await self._rpc.close()
                self._rpc = None
                _log.warning("%s: serf agent connection lost: %s", self.local().node, exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, self.reconnect_max)

    async def _pump(self) -> None:
        rpc, stream = self._rpc, self._stream
        assert rpc is not None and stream is not None
        watcher = asyncio.create_task(self._watch_drops(rpc))
        loop = asyncio.get_running_loop()
        next_resync = loop.time() + self.resync_interval
        try:
            while True:
                try:
                    record = await stream.get(max(0.0, next_resync - loop.time()))
                except TimeoutError:
                    await self.resync()
                    next_resync = loop.time() + self.resync_interval
                    continue
                self._counters["records"] += 1
                if isinstance(record, MemberEvent):
                    for member in record.members:
                        if record.event == "member-reap":
                            self._forget(member.name, Status.FAILED)
                        else:
                            self._observe(member, record.event)
                elif isinstance(record, QueryEvent):
                    await self._answer(rpc, record)
                elif isinstance(record, StreamGap):
                    self._counters["gaps"] += 1
                    await self.resync()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _watch_drops(self, rpc: SerfRPC) -> None:
        """Resync at once when the agent logs dropping events for us."""
        try:
            sockname = rpc.local_address
            logs = await rpc.monitor("WARN")
            async for line in logs:
                if "Dropping event" in line and line.rstrip().endswith(" " + sockname):
                    self._counters["gaps"] += 1
                    await self.resync()
        except (SerfError, EngineError) as exc:
            _log.debug("%s: log watch ended: %s", self.local().node, exc)

    async def _answer(self, rpc: SerfRPC, query: QueryEvent) -> None:
        if query.name != RECORD_QUERY or self._state != "running":
            return
        try:
            await rpc.respond(query.id, self.local().pack())
            self._counters["queries_answered"] += 1
        except SerfError as exc:  # too large, or the deadline passed
            _log.warning("%s: cannot answer %r: %s", self.local().node, RECORD_QUERY, exc)

    # -------------------------------------------------------------- events

    def _publish(self, event: Event | None) -> None:
        if event is not None:
            self.events.publish(event)

    def _forget(self, node: str, status: Status) -> None:
        """``node`` is no member any more (reaped, vanished, untagged)."""
        self._records.forget(node)
        self._publish(self._table.remove(node, status))

    def _observe(self, member: SerfMember, event: str | None) -> None:
        """Fold one member as the agent sees it into the table; one whose
        tag leaves something out is published once its record is fetched."""
        if member.name == self.local().node:
            return
        status = serf_status(member, event)
        tag = read_tag(member)
        if tag is None or status is None:  # not (or no longer) one of ours
            self._forget(member.name, Status.LEFT)
            return
        full = self._records.known(member.name, tag.incarnation)
        if not tag.complete and status is Status.ALIVE and full is None:
            if self._records.want(member, status, tag.incarnation):
                return
        self._records.settled(member.name)
        self._settle(member, status, full, ordered=event is not None)

    def _settle(
        self, member: SerfMember, status: Status, full: Member | None, *, ordered: bool = True
    ) -> None:
        tag = read_tag(member)
        if tag is not None:
            record = self._table.record(member, tag, status, full)
            self._publish(self._table.apply(record, ordered=ordered))
