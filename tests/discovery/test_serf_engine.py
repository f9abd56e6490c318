"""``SerfEngine`` with real Serf agents on loopback (profile ``host``, which
is Serf's ``local``): membership events, full records, resynchronisation
after gaps, and attaching to an agent started separately."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import pytest_asyncio

from discovery.engine import EngineError
from discovery.events import Event
from discovery.keys import Keyring
from discovery.member import Member, Status, split_host
from discovery.serf import SerfEngine, SerfRPC, TagsTooLarge
from discovery.serf.agent import SerfAgent
from discovery.serf.tags import TAG, decode_tag
from discovery.serf.wire import SerfAuthError, is_header

pytestmark = pytest.mark.asyncio

#: Deadlines are generous (a shared 2-core machine; Serf coalesces member
#: events for a second): they bound a hang, the logic makes the test.
JOIN_DEADLINE = 20.0
FAIL_DEADLINE = 40.0  # local profile: 6-7 s at 3 members, coalescing included
TOKEN = "test-rpc-token"

POOL_1 = str(uuid.uuid4())
POOL_2 = str(uuid.uuid4())
EIGHT_POOLS = frozenset(str(uuid.uuid4()) for _ in range(8))

EngineFactory = Callable[..., Awaitable[SerfEngine]]


@pytest_asyncio.fixture
async def engines(serf_binary: str, no_stray_serf: None) -> AsyncIterator[EngineFactory]:
    """A factory of started engines (``join``: addresses to join; other
    keywords: the constructor's, or a tunable such as ``resync_interval``);
    all stopped at the end."""
    made: list[SerfEngine] = []
    temporary = set(Path(tempfile.gettempdir()).glob("aiocoloc-serf-*"))

    async def make(node: str, *, join: Iterable[str] = (), **options: Any) -> SerfEngine:
        tunables = {k: options.pop(k) for k in ("resync_interval", "query_timeout") if k in options}
        options.setdefault("profile", "host")
        engine = SerfEngine(
            node, options.pop("bind", "127.0.0.1:0"), serf_binary=serf_binary, **options
        )
        engine.reconnect_max = 0.5
        for key, value in tunables.items():
            setattr(engine, key, value)
        made.append(engine)
        await engine.start()
        if join:
            await engine.join(list(join))
        return engine

    try:
        yield make
    finally:
        for engine in made:
            with contextlib.suppress(Exception):
                await engine.stop()
    left = set(Path(tempfile.gettempdir()).glob("aiocoloc-serf-*")) - temporary
    assert not left, f"temporary directories left behind: {sorted(left)}"


class Watch:
    """Every event of one subscription, kept so that waiting for one event
    does not lose the others."""

    def __init__(self, engine: SerfEngine) -> None:
        self.subscription = engine.subscribe()
        self.seen: list[Event] = []
        self._taken = 0

    def _pull(self) -> None:
        while (event := self.subscription.get_nowait()) is not None:
            self.seen.append(event)

    async def next(
        self,
        kinds: str | tuple[str, ...],
        node: str,
        deadline: float = JOIN_DEADLINE,
        where: Callable[[Member], bool] = lambda m: True,
    ) -> Event:
        """The first event not taken yet of ``kinds`` about ``node``
        (matching ``where``); the events before it stay available."""
        kinds = (kinds,) if isinstance(kinds, str) else kinds

        def find() -> Event | None:
            for event in self.seen:
                if event.kind in kinds and event.member.node == node and where(event.member):
                    self.seen.remove(event)
                    return event
            return None

        async with asyncio.timeout(deadline):
            while True:
                self._pull()
                if (event := find()) is not None:
                    return event
                self.seen.append(await self.subscription.get())

    def pending(self) -> list[Event]:
        """The events received and not taken."""
        self._pull()
        return list(self.seen)


async def until(condition: Callable[[], bool], deadline: float = JOIN_DEADLINE) -> None:
    async with asyncio.timeout(deadline):
        while not condition():
            await asyncio.sleep(0.05)


def status_of(engine: SerfEngine, node: str) -> Status | None:
    return next((m.status for m in engine.members() if m.node == node), None)


def address(engine: SerfEngine) -> str:
    return engine.local().addresses[0]


# ------------------------------------------------------------------ events


async def test_join_update_and_leave(engines: EngineFactory) -> None:
    a = await engines("a", pools=frozenset({POOL_1}), endpoints=["@ctl-a"])
    b = await engines("b", pools=frozenset({POOL_1}), endpoints=["@ctl-b", "127.0.0.1:9100"])
    c = await engines("c", endpoints=["@ctl-c"])
    trio = (a, b, c)
    subs = {e.local().node: Watch(e) for e in trio}
    await b.join([address(a)])
    await c.join([address(a)])
    for viewer in trio:
        for other in trio:
            if other is not viewer:
                event = await subs[viewer.local().node].next("join", other.local().node)
                assert event.member == other.local()  # the whole record, from the tags
    assert [m.node for m in a.members()] == ["a", "b", "c"]
    assert a.local().addresses[0] != "127.0.0.1:0"  # the port the agent was given

    before = b.local()
    after = await b.update_local(pools=frozenset({POOL_1, POOL_2}))
    assert after.incarnation > before.incarnation
    for viewer in ("a", "c"):
        event = await subs[viewer].next("update", "b")
        assert event.member == after
        assert event.previous == before

    with pytest.raises(TagsTooLarge):
        await b.update_local(pools=frozenset(f"pool-{i}-" + "x" * 60 for i in range(8)))
    assert b.local() == after  # a refused update changes nothing

    await c.leave()
    assert c.local().status is Status.LEFT
    for viewer in ("a", "b"):
        event = await subs[viewer].next("leave", "c")
        assert event.member.status is Status.LEFT
        assert event.member.endpoints == ("@ctl-c",)
    assert status_of(a, "c") is Status.LEFT  # listed until Serf reaps it
    assert not [e for e in subs["a"].pending() if e.kind == "failed"]


async def test_failed_then_restarted_agent_joins_again(
    engines: EngineFactory, serf_agents: Any, tmp_path: Path
) -> None:
    a = await engines("a")
    b = await engines("b", join=[address(a)])
    agent_c = await serf_agents("c", rpc_auth=TOKEN, workdir=str(tmp_path))
    c = await engines("c", rpc=agent_c.rpc_address, rpc_auth=TOKEN, pools=frozenset({POOL_1}))
    subs = {"a": Watch(a), "b": Watch(b)}
    await c.join([address(a)])
    for viewer in ("a", "b"):
        await subs[viewer].next("join", "c")
    await until(lambda: status_of(c, "a") is Status.ALIVE and status_of(c, "b") is Status.ALIVE)

    loop = asyncio.get_running_loop()
    killed_at = loop.time()
    agent_c.kill()  # kill -9: no goodbye
    for viewer in ("a", "b"):
        event = await subs[viewer].next("failed", "c", FAIL_DEADLINE)
        assert event.member.status is Status.FAILED
    detected = loop.time() - killed_at
    assert detected < FAIL_DEADLINE

    # The same node comes back on the same addresses; the attached engine
    # reconnects by itself, puts its record back in the tags, and resyncs.
    restarted = await serf_agents(
        "c",
        bind=address(c),
        rpc_addr=agent_c.rpc_address,
        rpc_auth=TOKEN,
        workdir=str(tmp_path),
    )
    await restarted.join([address(a)])
    for viewer in ("a", "b"):
        event = await subs[viewer].next("join", "c")
        assert event.member.pools == {POOL_1}
    await until(lambda: status_of(c, "a") is Status.ALIVE and status_of(c, "b") is Status.ALIVE)
    assert c.stats()["reconnects"] >= 1


async def test_own_agent_is_restarted_after_a_crash(engines: EngineFactory) -> None:
    a = await engines("a")
    b = await engines("b", join=[address(a)])
    await until(lambda: status_of(b, "a") is Status.ALIVE and status_of(a, "b") is Status.ALIVE)
    assert a.agent is not None
    first_pid = a.agent.pid
    sub = Watch(b)
    a.agent.kill()
    await until(lambda: a.stats().get("agent_restarts", 0) >= 1)
    assert a.agent.pid != first_pid
    # The new agent rejoined the members last seen: updates flow again.
    await until(lambda: a.stats().get("connections", 0) >= 2)
    new = await a.update_local(pools=frozenset({POOL_2}))
    event = await sub.next(("update", "join"), "a", where=lambda m: m.pools == {POOL_2})
    assert event.member == new
    await until(lambda: status_of(a, "b") is Status.ALIVE)


async def test_encrypted_cluster(engines: EngineFactory) -> None:
    keyring = Keyring([os.urandom(32)])
    a = await engines("a", keyring=keyring)
    sub = Watch(a)
    b = await engines("b", keyring=keyring, join=[address(a)])
    await sub.next("join", "b")
    assert a.agent is not None
    rpc = await SerfRPC.connect(a.agent.rpc_address, auth_key=a.agent.rpc_auth)
    try:
        assert (await rpc.stats())["serf"]["encrypted"] == "true"
    finally:
        await rpc.close()
    outsider = await engines("c", keyring=Keyring([os.urandom(16)]))
    with pytest.raises(EngineError):
        await outsider.join([address(a)])
    plain = await engines("d")
    with pytest.raises(EngineError):
        await plain.join([address(b)])
    assert [m.node for m in a.members()] == ["a", "b"]


# -------------------------------------------------------------------- keys


def _all_alive(engines: Iterable[SerfEngine]) -> Callable[[], bool]:
    trio = list(engines)
    names = {e.local().node for e in trio}
    return lambda: all(
        {m.node for m in e.members() if m.status is Status.ALIVE} == names for e in trio
    )


async def test_keys_rotate_across_the_cluster(engines: EngineFactory) -> None:
    """Each member's key file goes through the three steps, member after
    member: the first to apply a step applies it everywhere (Serf's key
    commands), the others find it done.  An own agent restarted mid-way
    comes back with the keys in use; the old key removed, a member that
    has only it cannot get in."""
    old, new = os.urandom(32), os.urandom(16)
    a = await engines("a", keyring=Keyring([old]))
    b = await engines("b", keyring=Keyring([old]), join=[address(a)])
    c = await engines("c", keyring=Keyring([old]), join=[address(a)])
    await until(_all_alive((a, b, c)))
    sub = Watch(a)
    assert await a.installed_keys() == {old: 3}
    steps = [
        (Keyring([old, new]), {old: 3, new: 3}),
        (Keyring([new, old]), {old: 3, new: 3}),
        (Keyring([new]), {new: 3}),
    ]
    for number, (ring, installed) in enumerate(steps, 1):
        for engine in (a, b, c):
            await engine.set_keyring(ring)
        assert await c.installed_keys() == installed, f"step {number}"
        if number == 2:  # a's agent dies and restarts: new primary, old key too
            assert a.agent is not None and a.agent.encrypt_key == new
            a.agent.kill()
            await until(lambda: a.stats().get("connections", 0) >= 2)
            await until(_all_alive((a, b, c)))
            assert await a.installed_keys() == installed
    assert a.stats()["key_changes"] == 3
    # They still talk, with the new key alone.
    updated = await c.update_local(pools=frozenset({POOL_1}))
    event = await sub.next("update", "c", where=lambda m: m.pools == {POOL_1})
    assert event.member == updated
    outsider = await engines("d", keyring=Keyring([old]))
    with pytest.raises(EngineError):
        await outsider.join([address(b)])
    assert status_of(a, "d") is None


async def test_a_member_that_missed_the_rotation_is_cut_off(
    engines: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """c's agent dies (kill -9, not restarted) as a rotates the keys: a
    warns that c did not answer; the old key removed, c back with the old
    key alone cannot rejoin, and stays failed at a and b."""
    old, new = os.urandom(32), os.urandom(32)
    a = await engines("a", keyring=Keyring([old]))
    b = await engines("b", keyring=Keyring([old]), join=[address(a)])
    c = await engines("c", keyring=Keyring([old]), join=[address(a)])
    await until(_all_alive((a, b, c)))
    subs = {"a": Watch(a), "b": Watch(b)}
    assert c.agent is not None
    c.restart_agent = False
    c.agent.kill()
    for ring in (Keyring([old, new]), Keyring([new, old]), Keyring([new])):
        await a.set_keyring(ring)
    assert "a: install key: 2/3 nodes reported success (2 of 3 members answered)" in caplog.text
    assert await b.installed_keys() == {new: 2}
    for viewer in ("a", "b"):
        await subs[viewer].next("failed", "c", FAIL_DEADLINE)
    back = await engines("c", bind=address(c), keyring=Keyring([old]))
    with pytest.raises(EngineError):
        await back.join([address(a), address(b)])
    assert status_of(a, "c") is Status.FAILED and status_of(b, "c") is Status.FAILED
    assert not [e for w in subs.values() for e in w.pending() if e.member.node == "c"]


async def test_keys_need_an_encrypted_agent(engines: EngineFactory) -> None:
    plain = await engines("a")
    with pytest.raises(EngineError, match="without encryption"):
        await plain.set_keyring(Keyring([os.urandom(32)]))


# ------------------------------------------------------------ full records


async def test_endpoints_that_do_not_fit_come_by_query(engines: EngineFactory) -> None:
    endpoints = [f"@aiocoloc-ctl-{4194304 + i}-0123456789abcdef" for i in range(8)]
    slots = {pool: os.urandom(22) for pool in EIGHT_POOLS}  # as the sidecar's
    a = await engines("a")
    sub = Watch(a)
    b = await engines("b", pools=EIGHT_POOLS, endpoints=endpoints, slots=slots, join=[address(a)])
    event = await sub.next("join", "b")
    assert event.member == b.local() and event.member.slots == slots
    assert event.member.endpoints == tuple(endpoints)  # not in the tag: asked for
    assert a.stats()["records_fetched"] >= 1
    await until(lambda: b.stats().get("queries_answered", 0) >= 1)  # its respond() returns

    assert a.agent is not None  # what Serf itself carries: pools, no endpoints
    rpc = await SerfRPC.connect(a.agent.rpc_address, auth_key=a.agent.rpc_auth)
    try:
        (seen,) = [m for m in await rpc.members() if m.name == "b"]
    finally:
        await rpc.close()
    tag = decode_tag(seen.tags[TAG])
    assert tag.endpoints is None and tag.pools == EIGHT_POOLS and tag.slots == slots

    assert await a.fetch("b") == b.local()
    assert [m for m in a.members() if m.node == "b"] == [b.local()]

    reordered = await b.update_local(endpoints=endpoints[::-1])
    event = await sub.next("update", "b")
    assert event.member == reordered and event.previous is not None
    assert event.member.endpoints == tuple(endpoints[::-1])


# ------------------------------------------------------------------ resync


class RpcProxy:
    """A relay between an engine and its agent's RPC port.  ``cut()`` drops
    the connections and refuses new ones until ``restore()``; with
    ``drop_member_events`` it swallows member-event records, as Serf does
    when a client's 512-event buffer is full."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.accepting = True
        self.drop_member_events = False
        self.dropped = 0
        self.address = ""
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.accepting:
            writer.close()
            return
        host, port = split_host(self.target)
        up_reader, up_writer = await asyncio.open_connection(host, port)
        self._writers += [writer, up_writer]
        relays = [
            asyncio.create_task(self._copy(reader, up_writer)),
            asyncio.create_task(self._filter(up_reader, writer)),
        ]
        self._tasks.update(relays)
        with contextlib.suppress(Exception):
            await asyncio.wait(relays, return_when=asyncio.FIRST_COMPLETED)
        for task in relays:
            task.cancel()
        writer.close()
        up_writer.close()

    async def _copy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()

    async def _filter(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        unpacker = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape")

        def forward(*objects: Any) -> None:
            for obj in objects:
                writer.write(
                    msgpack.packb(obj, use_bin_type=True, unicode_errors="surrogateescape")
                )

        held: Any = None  # a header, until we know whether a body follows
        with contextlib.suppress(ConnectionError):
            while True:
                try:
                    async with asyncio.timeout(0.05 if held is not None else None):
                        data = await reader.read(65536)
                except TimeoutError:
                    forward(held)  # nothing followed: a bare header
                    held = None
                    continue
                if not data:
                    return
                unpacker.feed(data)
                for obj in unpacker:
                    if held is None:
                        held = obj
                    elif is_header(obj):
                        forward(held)
                        held = obj
                    else:
                        event = obj.get("Event", "") if isinstance(obj, dict) else ""
                        if self.drop_member_events and str(event).startswith("member-"):
                            self.dropped += 1
                        else:
                            forward(held, obj)
                        held = None
                await writer.drain()

    def cut(self) -> None:
        self.accepting = False
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    def restore(self) -> None:
        self.accepting = True

    async def close(self) -> None:
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest_asyncio.fixture
async def proxies() -> AsyncIterator[Callable[[str], Awaitable[RpcProxy]]]:
    made: list[RpcProxy] = []

    async def make(target: str) -> RpcProxy:
        proxy = RpcProxy(target)
        made.append(proxy)
        await proxy.start()
        return proxy

    yield make
    for proxy in made:
        await proxy.close()


async def attached_via_proxy(
    engines: EngineFactory,
    serf_agents: Any,
    proxies: Callable[[str], Awaitable[RpcProxy]],
    tmp_path: Path,
    join: str,
    **tunables: Any,
) -> tuple[SerfEngine, SerfAgent, RpcProxy]:
    agent = await serf_agents("x", rpc_auth=TOKEN, workdir=str(tmp_path))
    await agent.join([join])
    proxy = await proxies(agent.rpc_address)
    engine = await engines("x", rpc=proxy.address, rpc_auth=TOKEN, **tunables)
    return engine, agent, proxy


async def test_resync_after_a_connection_gap(
    engines: EngineFactory, serf_agents: Any, proxies: Any, tmp_path: Path
) -> None:
    a = await engines("a")
    b = await engines("b", join=[address(a)])
    x, _, proxy = await attached_via_proxy(
        engines, serf_agents, proxies, tmp_path, address(a), resync_interval=600.0
    )
    await until(lambda: status_of(x, "a") is Status.ALIVE and status_of(x, "b") is Status.ALIVE)
    sub = Watch(x)

    proxy.cut()  # the engine hears nothing while the cluster changes
    await b.leave()
    d = await engines("d", pools=frozenset({POOL_2}), join=[address(a)])
    await until(lambda: status_of(a, "b") is Status.LEFT and status_of(a, "d") is Status.ALIVE)
    assert status_of(x, "b") is Status.ALIVE and status_of(x, "d") is None  # stale meanwhile
    assert sub.pending() == []

    proxy.restore()
    left = await sub.next("leave", "b")
    assert left.member.status is Status.LEFT
    joined = await sub.next("join", "d")
    assert joined.member == d.local()
    assert x.stats()["reconnects"] >= 1


async def test_periodic_resync_recovers_dropped_events(
    engines: EngineFactory, serf_agents: Any, proxies: Any, tmp_path: Path
) -> None:
    a = await engines("a")
    b = await engines("b", pools=frozenset({POOL_1}), join=[address(a)])
    x, _, proxy = await attached_via_proxy(
        engines, serf_agents, proxies, tmp_path, address(a), resync_interval=1.0
    )
    await until(lambda: status_of(x, "a") is Status.ALIVE and status_of(x, "b") is Status.ALIVE)
    sub = Watch(x)
    proxy.drop_member_events = True  # the stream stays up, its events are lost

    updated = await b.update_local(pools=frozenset({POOL_1, POOL_2}))
    event = await sub.next("update", "b")
    assert event.member == updated
    await until(lambda: proxy.dropped >= 1)  # Serf did send it: it was lost
    assert x.stats()["resyncs"] >= 2


# ------------------------------------------------------------------ attach


async def test_attach_to_a_running_agent(
    engines: EngineFactory, serf_agents: Any, tmp_path: Path
) -> None:
    a = await engines("a")
    sub = Watch(a)
    agent = await serf_agents("x", rpc_auth=TOKEN, workdir=str(tmp_path))
    await agent.join([address(a)])
    assert a.agent is not None
    rpc = await SerfRPC.connect(a.agent.rpc_address, auth_key=a.agent.rpc_auth)
    try:
        async with asyncio.timeout(JOIN_DEADLINE):
            while "x" not in {m.name for m in await rpc.members()}:
                await asyncio.sleep(0.05)
    finally:
        await rpc.close()
    await a.resync()
    assert status_of(a, "x") is None  # a Serf member without our tag is not one of ours

    with pytest.raises(SerfAuthError):
        await engines("x", rpc=agent.rpc_address, rpc_auth="wrong")
    with pytest.raises(EngineError, match="is node 'x', not 'y'"):
        await engines("y", rpc=agent.rpc_address, rpc_auth=TOKEN)

    x = await engines(
        "x", rpc=agent.rpc_address, rpc_auth=TOKEN, pools=frozenset({POOL_1}), endpoints=["@x"]
    )
    assert x.agent is None
    event = await sub.next("join", "x")
    assert event.member == x.local()
    assert event.member.addresses[0] == x.local().addresses[0] != "127.0.0.1:0"
    await until(lambda: status_of(x, "a") is Status.ALIVE)

    await x.stop()  # detaching takes our record away; the agent stays
    event = await sub.next("leave", "x")
    assert event.member.pools == {POOL_1}
    assert agent.running
    assert status_of(a, "x") is None
