"""``SerfEngine``: the membership engine backed by a HashiCorp Serf agent.

The engine drives one agent over its RPC protocol: its own agent, started
on ``bind`` (``rpc=None``), or one already running at ``rpc``.  Our record
rides in the agent's tags (``discovery.serf.tags``, kept there by
``discovery.serf.local_record``); a member whose tag cannot carry its
endpoints (or slots) answers the ``aiocoloc-record`` query with its whole
``Member.pack()``, so ``members()`` holds full records
(``discovery.serf.records``).

The engine keeps one connection to the agent up, reconnecting with a
back-off (and restarting an own agent that died); on each connection it
follows the event stream and resyncs with the member list after every gap
(``discovery.serf.sync``), folding what it learns into its view of the
members (``discovery.serf.view``).  Keys are rotated with Serf's key
commands (``discovery.serf.key_commands``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from discovery.engine import Engine, EngineError
from discovery.member import Member, MemberError, split_host
from discovery.serf.agent import SerfAgent, serf_profile
from discovery.serf.key_commands import ClusterKeys
from discovery.serf.local_record import LocalRecord
from discovery.serf.records import check_answerable
from discovery.serf.rpc import SerfRPC
from discovery.serf.sync import MemberSync
from discovery.serf.tags import record_tags
from discovery.serf.view import MemberTable, MemberView
from discovery.serf.wire import SerfError

if TYPE_CHECKING:
    from discovery.keys import Keyring
    from discovery.serf.streams import RecordStream
    from discovery.serf.wire import StreamRecord

__all__ = ["SerfEngine"]

_log = logging.getLogger("discovery.serf.engine")


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
        self.rpc_address = rpc
        self._rpc_auth = rpc_auth
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
        self._tasks: list[asyncio.Task[None]] = []
        self._state = "new"  # -> running -> left -> stopped
        self._counters: Counter[str] = Counter()
        table = MemberTable(local)
        self._local = LocalRecord(table, self.agent, self._connection, self._running)
        self._view = MemberView(table, self.events, self._connected, self._counters)
        self._sync = MemberSync(
            self._view, self._counters, local=self.local, answering=self._running
        )
        self._keys = ClusterKeys(keyring, self.agent, node, self._connected)
        check_answerable(local)

    # ---------------------------------------------------------- interface

    async def start(self) -> None:
        if self._state != "new":
            raise EngineError(f"engine {self.local().node!r} already started")
        self._state = "running"
        self._view.records.timeout = self.query_timeout
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
            asyncio.create_task(self._view.records.run(), name=f"serf-records {self.local().node}"),
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
                await self._local.withdraw(self._connected())
            except EngineError as exc:
                _log.warning("%s: leave failed: %s", self.local().node, exc)
        self._local.mark_left()

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
                    await self._local.withdraw(rpc)  # our record goes with us
            await rpc.close()
        if self.agent is not None:
            await self.agent.stop(leave=False)
        self.events.close()

    def local(self) -> Member:
        return self._local.member

    def members(self) -> list[Member]:
        return self._view.table.members()

    async def update_local(
        self,
        *,
        pools: frozenset[str] | None = None,
        endpoints: Sequence[str] | None = None,
        slots: Mapping[str, bytes] | None = None,
    ) -> Member:
        return await self._local.update(pools=pools, endpoints=endpoints, slots=slots)

    async def set_keyring(self, keyring: Keyring) -> None:
        """Rotate to ``keyring`` on every member (``ClusterKeys.rotate_to``);
        ``EngineError`` if the agent runs without encryption or refused a
        step itself, and setting ``keyring`` again retries."""
        await self._keys.rotate_to(keyring)
        self._counters["key_changes"] += 1
        _log.info("%s: keyring changed: %r", self.local().node, keyring)

    async def installed_keys(self) -> dict[bytes, int]:
        """Every key installed on some member, and on how many (Serf's
        ``list-keys``)."""
        return await self._keys.installed()

    def stats(self) -> dict[str, int]:
        out = dict(self._counters)
        out["published"] = self.events.published
        out["members"] = len(self.members())
        return out

    async def resync(self) -> int:
        """Read the agent's member list and publish what changed since the
        last look; how many events that made."""
        return await self._sync.resync(self._connected())

    async def fetch(self, node: str) -> Member:
        """``node``'s whole record, asked with the record query."""
        return await self._view.fetch(node)

    # --------------------------------------------------------- connection

    def _running(self) -> bool:
        return self._state == "running"

    def _connection(self) -> SerfRPC | None:
        """The RPC connection to the agent; None while there is none."""
        rpc = self._rpc
        return rpc if rpc is not None and not rpc.closed else None

    def _connected(self) -> SerfRPC:
        """The RPC connection to the agent; ``EngineError`` while there is none."""
        rpc = self._connection()
        if rpc is None:
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
                    for m in self.members()
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
            self._stream = await self._sync.subscribe(rpc)
            self._rpc = rpc
            await self._local.publish(rpc)
            if fresh_agent:
                await self._keys.install_others(rpc)
            if rejoin:
                with contextlib.suppress(SerfError):
                    await rpc.join(rejoin, timeout=self.request_timeout)
            self._counters["connections"] += 1
            await self.resync()
        except BaseException:
            self._rpc = None
            await rpc.close()
            raise

    async def _run(self) -> None:
        """Follow the event stream; on any loss, reconnect (backing off)."""
        pause = 0.1
        while self._state == "running":
            try:
                if self._rpc is None or self._rpc.closed:
                    await self._connect()
                    self._counters["reconnects"] += 1
                    pause = 0.1
                rpc, stream = self._rpc, self._stream
                assert rpc is not None and stream is not None
                await self._sync.follow(rpc, stream, self.resync_interval)
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
