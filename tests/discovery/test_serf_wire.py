"""Serf engine pieces that need no agent: the RPC messages, our tag codec,
the member table, and the RPC client against a scripted fake agent."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgpack
import pytest
import pytest_asyncio

from discovery.engine import EngineError
from discovery.member import MAX_SLOT, Member, MemberError, Status
from discovery.serf import SerfEngine
from discovery.serf.agent import SerfAgent, serf_profile
from discovery.serf.key_commands import ask
from discovery.serf.rpc import SerfRPC
from discovery.serf.streams import STREAM_LIMIT
from discovery.serf.tags import (
    TAG,
    TAG_LIMIT,
    TagsTooLarge,
    decode_tag,
    encode_tag,
    record_tags,
    serf_tags_size,
)
from discovery.serf.view import MemberTable, read_tag, serf_status
from discovery.serf.wire import (
    KeyResponse,
    MemberEvent,
    QueryEvent,
    SerfAgentError,
    SerfAuthError,
    SerfConnectionError,
    SerfError,
    SerfMember,
    SerfProtocolError,
    SerfTimeoutError,
    StreamGap,
    UserEvent,
    decode_addr,
    parse_key_response,
    parse_record,
)

POOL_A = str(uuid.UUID(int=1))
POOL_B = str(uuid.UUID(int=2))


def wire_member(
    name: str = "n1", addr: bytes = b"\x7f\x00\x00\x01", **extra: Any
) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "Name": name,
        "Addr": addr,
        "Port": 7946,
        "Tags": {},
        "Status": "alive",
        "ProtocolMin": 1,
        "ProtocolMax": 5,
        "ProtocolCur": 2,
        "DelegateMin": 2,
        "DelegateMax": 5,
        "DelegateCur": 4,
    }
    raw.update(extra)
    return raw


# --------------------------------------------------------------- messages


def test_addr_of_four_bytes() -> None:
    assert decode_addr(bytes([10, 1, 2, 3])) == "10.1.2.3"


def test_addr_of_sixteen_bytes() -> None:
    ip = ipaddress.IPv6Address("fd00::1:2")
    assert decode_addr(ip.packed) == "fd00::1:2"


def test_addr_ipv4_mapped_in_sixteen_bytes() -> None:
    # Go keeps IPv4 addresses as 16-byte slices in places: ::ffff:a.b.c.d
    mapped = ipaddress.IPv6Address("::ffff:127.0.0.9").packed
    assert len(mapped) == 16
    assert decode_addr(mapped) == "127.0.0.9"


def test_addr_sent_as_a_string() -> None:
    # An encoder without bin types sends raw bytes as str; the client decodes
    # with surrogateescape, and the bytes come back intact.
    text = bytes([127, 0, 0, 200]).decode("utf-8", "surrogateescape")
    assert decode_addr(text) == "127.0.0.200"


@pytest.mark.parametrize("raw", [b"", b"\x7f\x00\x01", bytes(8), None, 17])
def test_addr_of_another_size_is_refused(raw: Any) -> None:
    with pytest.raises(SerfProtocolError):
        decode_addr(raw)


def test_member_from_the_wire() -> None:
    member = SerfMember.from_wire(
        wire_member(
            addr=ipaddress.IPv6Address("::1").packed, Tags={"ac": "x"}, Status="leaving", Port=17
        )
    )
    assert member.name == "n1"
    assert member.addr == "::1"
    assert member.address == "[::1]:17"
    assert member.tags == {"ac": "x"}
    assert member.status == "leaving"
    assert member.protocol == (1, 5, 2)
    assert member.delegate == (2, 5, 4)


@pytest.mark.parametrize(
    "change", [{"Tags": {"a": 1}}, {"Port": "80"}, {"Name": b"n"}, {"Tags": ["a"]}]
)
def test_member_with_bad_fields_is_refused(change: dict[str, Any]) -> None:
    with pytest.raises(SerfProtocolError):
        SerfMember.from_wire(wire_member(**change))


def test_stream_records() -> None:
    event = parse_record(
        {"Event": "member-failed", "Members": [wire_member("a"), wire_member("b")]}
    )
    assert isinstance(event, MemberEvent)
    assert event.event == "member-failed"
    assert [m.name for m in event.members] == ["a", "b"]
    user = parse_record(
        {"Event": "user", "LTime": 3, "Name": "deploy", "Payload": b"\x00", "Coalesce": True}
    )
    assert user == UserEvent(3, "deploy", b"\x00", True)
    query = parse_record({"Event": "query", "ID": 9, "LTime": 4, "Name": "q", "Payload": None})
    assert query == QueryEvent(9, 4, "q", b"")
    with pytest.raises(SerfProtocolError):
        parse_record({"Event": "member-teleport", "Members": []})
    with pytest.raises(SerfProtocolError):
        parse_record(["member-join"])


# ------------------------------------------------------------------- tags


def test_tag_round_trip() -> None:
    slots = {POOL_A: bytes(range(22))}
    value = encode_tag(
        12345678901234, {POOL_A, "pool-not-a-uuid"}, ["@ctl-1", "10.0.0.1:9000"], slots
    )
    assert value.isascii() and "=" not in value
    record = decode_tag(value)
    assert record.incarnation == 12345678901234
    assert record.pools == {POOL_A, "pool-not-a-uuid"}
    assert record.endpoints == ("@ctl-1", "10.0.0.1:9000")
    assert record.slots == slots
    assert record.complete
    assert decode_tag(encode_tag(1, {POOL_A}, [])).slots == {}


def _tag_of(fields: list[Any]) -> str:
    return base64.urlsafe_b64encode(msgpack.packb(fields)).rstrip(b"=").decode()


def test_tags_of_older_and_newer_writers() -> None:
    pool = uuid.UUID(POOL_A).bytes
    older = decode_tag(_tag_of([1, 7, [pool], ["@e"]]))  # before slots: none, complete
    assert (older.pools, older.endpoints, older.slots, older.complete) == (
        {POOL_A},
        ("@e",),
        {},
        True,
    )
    newer = decode_tag(_tag_of([1, 7, [pool], ["@e"], [b"s" * 22], "a field to come", [1]]))
    assert newer.slots == {POOL_A: b"s" * 22} and newer.complete
    left_out = decode_tag(_tag_of([1, 7, [pool], ["@e"], None]))
    assert left_out.slots is None and not left_out.complete
    for bad in ([b"s" * 22, None], [b"s" * 25], ["text"], "x"):
        with pytest.raises(MemberError, match="slots"):
            decode_tag(_tag_of([1, 7, [pool], ["@e"], bad]))


def test_uuid_pools_take_sixteen_bytes() -> None:
    # A canonical UUID costs 18 bytes (bin8 header) rather than 37 as text.
    one = len(encode_tag(1, {POOL_A}, []))
    two = len(encode_tag(1, {POOL_A, POOL_B}, []))
    assert two - one in (24, 25)  # 18 bytes in base64
    upper = POOL_A.upper()  # not canonical: kept as the string it is
    assert decode_tag(encode_tag(1, {upper}, [])).pools == {upper}


@pytest.mark.parametrize("value", ["", "!!!", encode_tag(1, [], []) + "A", "kQ"])
def test_bad_tags_are_refused(value: str) -> None:
    with pytest.raises(MemberError):
        decode_tag(value)


def test_serf_tags_size_follows_the_old_msgpack_spec() -> None:
    # magic byte + fixmap + fixstr "ac" (3) + value: 1-byte header below 32
    # bytes, 3 bytes (raw16: Serf's encoder has no str8) from 32 on.
    assert serf_tags_size({}) == 2
    assert serf_tags_size({"ac": "x" * 31}) == 1 + 1 + 3 + 1 + 31
    assert serf_tags_size({"ac": "x" * 32}) == 1 + 1 + 3 + 3 + 32
    # 16 entries: a map16 header (3 bytes); keys k0..k9 take 3 bytes, k10..k15 4
    assert serf_tags_size({f"k{i}": "" for i in range(16)}) == 1 + 3 + 10 * (3 + 1) + 6 * (4 + 1)


def _record(pools: Any, endpoints: Any = (), slots: Any = None, incarnation: int = 1) -> Member:
    return Member(
        "n", ("127.0.0.1:1",), frozenset(pools), tuple(endpoints), incarnation, slots=slots or {}
    )


def test_worst_case_pools_and_slots_fit_and_endpoints_move_to_the_query() -> None:
    pools = {str(uuid.UUID(int=i + 1)) for i in range(8)}
    incarnation = (1 << 63) - 1
    small = record_tags(_record(pools, incarnation=incarnation))
    assert serf_tags_size(small) == 219  # the sizes the module docstring states
    widest = {pool: b"\xff" * MAX_SLOT for pool in pools}
    worst = record_tags(_record(pools, slots=widest, incarnation=incarnation))
    assert serf_tags_size(worst) == 496 <= TAG_LIMIT
    assert decode_tag(worst[TAG]).slots == widest
    sidecar = {pool: b"\x01" * 22 for pool in pools}  # what the sidecar advertises
    many = [f"@aiocoloc-ctl-{4194304 + i}-0123456789abcdef" for i in range(8)]
    tags = record_tags(_record(pools, many, sidecar, incarnation))
    assert serf_tags_size(tags) <= TAG_LIMIT
    record = decode_tag(tags[TAG])
    assert record.endpoints is None and record.slots == sidecar  # ask for the endpoints
    few = record_tags(_record(pools, many[:5], incarnation=incarnation))
    assert decode_tag(few[TAG]).endpoints == tuple(many[:5])
    assert serf_tags_size(few) <= TAG_LIMIT
    first = min(pools)
    one = record_tags(_record({first}, many[:5], {first: sidecar[first]}, incarnation))
    assert decode_tag(one[TAG]).complete  # with one pool, endpoints keep their room


def test_other_tags_count_against_the_limit() -> None:
    endpoints = ["@ctl-" + "x" * 40]
    slots = {POOL_A: b"s" * 22}
    assert decode_tag(record_tags(_record({POOL_A}, endpoints, slots))[TAG]).complete
    crowded = record_tags(_record({POOL_A}, endpoints, slots), {"role": "y" * 420})
    assert decode_tag(crowded[TAG]).endpoints is None
    assert decode_tag(crowded[TAG]).slots == slots
    packed = record_tags(_record({POOL_A}, endpoints, slots), {"role": "y" * 450})
    assert decode_tag(packed[TAG]).slots is None  # slots go to the query too
    with pytest.raises(TagsTooLarge, match="512"):
        record_tags(_record({POOL_A}, endpoints), {"role": "y" * 480})


def test_pools_that_cannot_fit_are_refused() -> None:
    with pytest.raises(TagsTooLarge, match="pool ids"):
        record_tags(_record({f"pool-{i}-" + "z" * 60 for i in range(8)}))


# ------------------------------------------------- agent and engine set-up


def test_profiles() -> None:
    assert serf_profile("host") == "local"  # ours: members on one machine
    assert [serf_profile(p) for p in ("local", "lan", "wan")] == ["local", "lan", "wan"]
    with pytest.raises(SerfError, match="unknown profile"):
        serf_profile("moon")


def test_agent_command_line() -> None:
    key = bytes(range(32))
    agent = SerfAgent(
        "n1",
        "127.0.0.1:7946",
        profile="host",
        encrypt_key=key,
        tags={"zz": "1", "ac": "abc"},
        advertise="10.0.0.1",
        snapshot="/var/lib/x/snap",
    )
    command = agent.command("127.0.0.1:7373", "/run/x/rpc.json")
    assert command[:2] == ["serf", "agent"]
    assert {
        "-node=n1",
        "-bind=127.0.0.1:7946",
        "-rpc-addr=127.0.0.1:7373",
        "-profile=local",
        "-advertise=10.0.0.1",
        "-encrypt=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        "-snapshot=/var/lib/x/snap",
        "-config-file=/run/x/rpc.json",
    } <= set(command)
    tags = [command[i + 1] for i, arg in enumerate(command) if arg == "-tag"]
    assert tags == ["ac=abc", "zz=1"]
    with pytest.raises(SerfError, match="16, 24 or 32"):
        SerfAgent("n1", "127.0.0.1:0", encrypt_key=b"short")


def test_engine_refuses_bad_settings_at_once() -> None:
    with pytest.raises(EngineError, match="unknown profile"):
        SerfEngine("n", "127.0.0.1:0", profile="moon")
    with pytest.raises(EngineError, match="bad bind"):
        SerfEngine("n", "nowhere")
    with pytest.raises(EngineError, match="bad node name"):
        SerfEngine("", "127.0.0.1:0")
    with pytest.raises(TagsTooLarge):
        SerfEngine("n", "127.0.0.1:0", pools=frozenset("p" * 70 + str(i) for i in range(8)))
    engine = SerfEngine("n", "127.0.0.1:7946", pools=frozenset({POOL_A}), endpoints=["@e"])
    assert engine.local() == Member(
        "n", ("127.0.0.1:7946",), frozenset({POOL_A}), ("@e",), engine.local().incarnation
    )
    assert engine.members() == [engine.local()]
    assert engine.agent is not None and engine.agent.profile == "lan"


# ------------------------------------------------------------ member table


def serf_member(name: str, status: str = "alive", **tag: Any) -> SerfMember:
    fields = {"incarnation": 1, "pools": {POOL_A}, "endpoints": ["@e"], **tag}
    value = encode_tag(fields["incarnation"], fields["pools"], fields["endpoints"])
    return SerfMember(name, "127.0.0.1", 7000, {TAG: value}, status)


def record_of(table: MemberTable, member: SerfMember, event: str | None = None) -> Member:
    tag = read_tag(member)
    status = serf_status(member, event)
    assert tag is not None and status is not None
    return table.record(member, tag, status, None)


def test_table_turns_changes_into_events() -> None:
    table = MemberTable(Member("me", ("127.0.0.1:1",)))
    first = record_of(table, serf_member("b"))
    event = table.apply(first)
    assert event is not None and event.kind == "join"
    assert event.member.pools == {POOL_A} and event.member.endpoints == ("@e",)
    assert event.member.addresses == ("127.0.0.1:7000",)
    assert table.apply(first) is None  # seen again (stream, then a resync): nothing new
    moved = record_of(table, serf_member("b", incarnation=2, pools={POOL_A, POOL_B}))
    update = table.apply(moved)
    assert update is not None and update.kind == "update"
    assert update.previous == first and update.member.pools == {POOL_A, POOL_B}
    stale = record_of(table, serf_member("b", incarnation=1))
    assert table.apply(stale, ordered=True) is None  # a late event of an older version
    left = table.apply(record_of(table, serf_member("b", "left", incarnation=2)))
    assert left is not None and left.kind == "leave" and left.member.status is Status.LEFT
    assert table.apply(record_of(table, serf_member("b", "left", incarnation=2))) is None
    back = table.apply(record_of(table, serf_member("b", incarnation=3)))
    assert back is not None and back.kind == "join"
    failed = table.apply(record_of(table, serf_member("b", incarnation=3), "member-failed"))
    assert failed is not None and failed.kind == "failed"
    assert [m.node for m in table.members()] == ["b", "me"]


def test_table_removals() -> None:
    table = MemberTable(Member("me", ("127.0.0.1:1",)))
    for name in ("b", "c", "d"):
        table.apply(record_of(table, serf_member(name)))
    table.apply(record_of(table, serf_member("d", "failed")))
    assert table.vanished({"b", "me"}) == ["c", "d"]
    gone = table.remove("c")
    assert gone is not None and gone.kind == "failed" and gone.member.node == "c"
    assert table.remove("d") is None  # already failed: nothing to tell
    untagged = table.remove("b", Status.LEFT)
    assert untagged is not None and untagged.kind == "leave"
    assert [m.node for m in table.members()] == ["me"]
    assert table.apply(record_of(table, serf_member("me"))) is None  # no events about us


def test_table_fills_in_what_the_tag_left_out() -> None:
    table = MemberTable(Member("me", ("127.0.0.1:1",)))
    slots = {POOL_A: b"s" * 22}
    full = Member("b", ("127.0.0.1:7000", "10.0.0.1:7000"), frozenset({POOL_A}), ("@e",), 5)
    full = full.changed(5, slots=slots)
    member = SerfMember("b", "127.0.0.1", 7000, {TAG: encode_tag(5, {POOL_A}, None, None)})
    tag = read_tag(member)
    assert tag is not None and not tag.complete
    assert table.record(member, tag, Status.ALIVE, None).slots == {}  # not known yet
    record = table.record(member, tag, Status.ALIVE, full)
    assert record == full  # the answer to the record query fills in
    table.apply(record)
    # This version seen again with no answer at hand: what its answer said stays.
    again = table.record(member, tag, Status.ALIVE, None)
    assert (again.endpoints, again.slots) == (("@e",), slots)


def test_leaving_is_still_a_member() -> None:
    assert serf_status(serf_member("b", "leaving")) is Status.ALIVE
    assert serf_status(serf_member("b", "none")) is None
    assert serf_status(serf_member("b"), "member-leave") is Status.LEFT


def test_key_responses() -> None:
    key = bytes(range(32))
    listed = parse_key_response(
        "1/3 nodes reported success",
        {
            "Messages": None,  # Go's nil map
            "Keys": {base64.b64encode(key).decode(): 1},
            "NumNodes": 3,
            "NumResp": 1,
            "NumErr": 0,
        },
    )
    assert (listed.keys, listed.messages, listed.nodes, listed.responses) == ({key: 1}, {}, 3, 1)
    refused = parse_key_response(
        "1/2 nodes reported failure",
        {"Messages": {"b": "Requested key is not in the keyring"}, "NumNodes": 2, "NumErr": 1},
    )
    assert refused.failures == 1 and refused.messages == {
        "b": "Requested key is not in the keyring"
    }
    for bad in ([], {"Keys": {"!!": 1}}, {"Keys": {"AAAA": "1"}}, {"Messages": {"b": 1}}):
        with pytest.raises(SerfProtocolError):
            parse_key_response("", bad)


# ---------------------------------------------- the client, on a fake agent

Script = Callable[[str, int, Any, Callable[..., Awaitable[None]]], Awaitable[None]]


class FakeAgent:
    """Speaks Serf's RPC framing; ``script`` decides the answers."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.address = ""
        self.peer = ""

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}"  # how Serf names the client in its log
        unpacker = msgpack.Unpacker(raw=False)
        bodies = {
            "handshake",
            "auth",
            "stream",
            "monitor",
            "query",
            "stop",
            "respond",
            "tags",
            "join",
            "members-filtered",
            "event",
            "force-leave",
        }

        async def send(*objects: Any) -> None:
            writer.write(b"".join(msgpack.packb(o, use_bin_type=True) for o in objects))
            await writer.drain()

        pending: list[Any] = []
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                unpacker.feed(data)
                pending.extend(unpacker)
                while pending:
                    header = pending[0]
                    needs_body = header["Command"] in bodies
                    if needs_body and len(pending) < 2:
                        break
                    body = pending[1] if needs_body else None
                    del pending[: 2 if needs_body else 1]
                    if header["Command"] == "handshake":
                        await send({"Seq": header["Seq"], "Error": ""})
                        continue
                    task = asyncio.create_task(
                        self.script(header["Command"], header["Seq"], body, send)
                    )
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest_asyncio.fixture
async def fake_agent() -> AsyncIterator[Callable[[Script], Awaitable[FakeAgent]]]:
    agents: list[FakeAgent] = []

    async def make(script: Script) -> FakeAgent:
        agent = FakeAgent(script)
        agents.append(agent)
        await agent.start()
        return agent

    yield make
    for agent in agents:
        await agent.close()


def ok(seq: int) -> dict[str, Any]:
    return {"Seq": seq, "Error": ""}


@pytest.mark.asyncio
async def test_late_answer_is_skipped_and_the_next_one_read(fake_agent: Any) -> None:
    async def script(command: str, seq: int, body: Any, send: Any) -> None:
        if command == "members":
            await asyncio.sleep(0.6)  # past the client's timeout
            await send(ok(seq), {"Members": [wire_member("late")]})
        elif command == "stats":
            await send(ok(seq), {"agent": {"name": "fake"}})
        elif command == "tags":
            await send(ok(seq))  # no body: the reader must not wait for one

    agent = await fake_agent(script)
    rpc = await SerfRPC.connect(agent.address, timeout=0.3)
    try:
        with pytest.raises(SerfTimeoutError):
            await rpc.members()
        await asyncio.sleep(0.5)  # the late answer arrives now, then:
        await rpc.update_tags({"a": "b"})
        assert (await rpc.stats())["agent"] == {"name": "fake"}
        assert not rpc.closed
    finally:
        await rpc.close()


@pytest.mark.asyncio
async def test_agent_errors_and_garbage(fake_agent: Any) -> None:
    async def script(command: str, seq: int, body: Any, send: Any) -> None:
        if command == "auth":
            await send({"Seq": seq, "Error": "Invalid authentication token"})
        elif command == "join":
            await send({"Seq": seq, "Error": "no route"}, {"Num": 0})
        elif command == "members":
            await send({"Seq": seq, "Error": "Authentication required"})  # header only
        elif command == "stats":
            await send(["not", "a", "header"])

    agent = await fake_agent(script)
    with pytest.raises(SerfAuthError, match="Invalid authentication token"):
        await SerfRPC.connect(agent.address, auth_key="wrong", timeout=2)
    rpc = await SerfRPC.connect(agent.address, timeout=2)
    try:
        with pytest.raises(SerfAgentError, match="no route") as refused:
            await rpc.join(["127.0.0.1:1"])
        assert refused.value.reason == "no route"
        with pytest.raises(SerfAuthError):
            await rpc.members()
        with pytest.raises(SerfProtocolError, match="header"):
            await rpc.stats()
        assert rpc.closed
        with pytest.raises(SerfProtocolError):
            await rpc.members()
    finally:
        await rpc.close()


@pytest.mark.asyncio
async def test_stream_overflow_is_a_gap(fake_agent: Any) -> None:
    extra = 6

    async def script(command: str, seq: int, body: Any, send: Any) -> None:
        if command == "stream":
            await send(ok(seq))
            event = {"Event": "member-join", "Members": [wire_member()]}
            for _ in range(STREAM_LIMIT + extra):
                await send(ok(seq), event)
            await asyncio.sleep(0.3)
            await send(ok(seq), {"Event": "member-leave", "Members": [wire_member()]})

    agent = await fake_agent(script)
    rpc = await SerfRPC.connect(agent.address, timeout=2)
    try:
        stream = await rpc.stream()
        async with asyncio.timeout(10):
            while stream.dropped < extra:
                await asyncio.sleep(0.01)
        records = [await stream.get(5) for _ in range(STREAM_LIMIT + 2)]
        assert all(isinstance(r, MemberEvent) for r in records[:STREAM_LIMIT])
        assert records[STREAM_LIMIT] == StreamGap(extra)
        last = records[STREAM_LIMIT + 1]
        assert isinstance(last, MemberEvent) and last.event == "member-leave"
    finally:
        await rpc.close()


@pytest.mark.asyncio
async def test_lost_connection_ends_streams_and_requests(fake_agent: Any) -> None:
    agent: FakeAgent | None = None

    async def script(command: str, seq: int, body: Any, send: Any) -> None:
        if command == "stream":
            await send(ok(seq))
        elif command == "members":
            assert agent is not None
            await agent.close()  # gone without an answer

    agent = await fake_agent(script)
    rpc = await SerfRPC.connect(agent.address, timeout=5)
    try:
        stream = await rpc.stream("member-join")
        async with asyncio.timeout(3):  # no hang: everything fails at once
            with pytest.raises(SerfConnectionError, match="closed"):
                await rpc.members()
            with pytest.raises(SerfConnectionError):
                await stream.get()
            with pytest.raises(SerfConnectionError):
                await rpc.stats()
    finally:
        await rpc.close()


@pytest.mark.asyncio
async def test_unreachable_agent() -> None:
    with pytest.raises(SerfConnectionError, match="cannot reach"):
        await SerfRPC.connect("127.0.0.1:1", timeout=2)
    with pytest.raises(SerfConnectionError, match="bad serf RPC address"):
        await SerfRPC.connect("localhost", timeout=2)


@pytest.mark.asyncio
async def test_engine_resyncs_when_the_agent_logs_dropped_events(fake_agent: Any) -> None:
    # Serf logs "Dropping event to <client>" when a client's 512-event buffer
    # is full; the engine watches its log stream for its own name and reads
    # the member list again at once.
    agent: FakeAgent | None = None
    tag = encode_tag(5, {POOL_A}, ["@y"])
    members = [wire_member("x", Tags={TAG: encode_tag(1, [], [])})]

    async def script(command: str, seq: int, body: Any, send: Any) -> None:
        assert agent is not None
        if command == "stats":
            await send(ok(seq), {"agent": {"name": "x"}})
        elif command == "members":
            await send(ok(seq), {"Members": members})
        elif command in ("tags", "stream", "stop"):
            await send(ok(seq))
        elif command == "monitor":
            await send(ok(seq))
            await asyncio.sleep(0.2)
            members.append(wire_member("y", Tags={TAG: tag}))  # an event that never came
            for client in ("127.0.0.1:1", agent.peer):
                line = (
                    f"2026/01/01 00:00:00 [WARN] agent.ipc: Dropping event to ipc.client: {client}"
                )
                await send(ok(seq), {"Log": line})

    agent = await fake_agent(script)
    engine = SerfEngine("x", "127.0.0.1:0", rpc=agent.address)
    engine.resync_interval = 600.0  # only the log can make it look again
    subscription = engine.subscribe()
    await engine.start()
    try:
        async with asyncio.timeout(10):
            event = await subscription.get()
        assert (event.kind, event.member.node, event.member.pools) == ("join", "y", {POOL_A})
        assert engine.stats()["gaps"] == 1  # the other client's drop is not ours
        assert engine.stats()["resyncs"] == 2
    finally:
        await engine.stop()


def test_a_key_command_some_member_did_not_answer_is_asked_again_once() -> None:
    def asking(*answers: KeyResponse) -> tuple[Callable[[], Awaitable[KeyResponse]], list[int]]:
        calls: list[int] = []

        async def command() -> KeyResponse:
            calls.append(1)
            return answers[len(calls) - 1]

        return command, calls

    lost = KeyResponse("2/3 nodes reported success", 3, 2, 0)
    full = KeyResponse("", 3, 3, 0)
    command, calls = asking(lost, full)
    assert asyncio.run(ask(command)) == full and len(calls) == 2
    command, calls = asking(lost, lost, full)
    assert asyncio.run(ask(command)) == lost and len(calls) == 2  # once, not until it works
    command, calls = asking(full)
    assert asyncio.run(ask(command)) == full and len(calls) == 1
    refused = KeyResponse("1/3 failed", 3, 3, 1, {"b": "no such key"})
    command, calls = asking(refused)
    assert asyncio.run(ask(command)) == refused and len(calls) == 1  # a refusal is an answer
