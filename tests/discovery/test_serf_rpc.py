"""The RPC client against real ``serf agent`` processes (loopback only)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from discovery.member import split_host
from discovery.serf.agent import SerfAgent, SerfAgentStartError
from discovery.serf.rpc import RecordStream, SerfRPC
from discovery.serf.tags import TAG_LIMIT, serf_tags_size
from discovery.serf.wire import (
    MemberEvent,
    QueryEvent,
    SerfAgentError,
    SerfAuthError,
    SerfConnectionError,
    StreamRecord,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("no_stray_serf")]

#: Generous: the machine is shared and Serf coalesces member events ~1 s.
EVENT_DEADLINE = 20.0


@contextlib.asynccontextmanager
async def connected(agent: SerfAgent, **options: Any) -> AsyncIterator[SerfRPC]:
    rpc = await SerfRPC.connect(agent.rpc_address, auth_key=agent.rpc_auth, **options)
    try:
        yield rpc
    finally:
        await rpc.close()


async def member_event(stream: RecordStream[StreamRecord], kind: str, node: str) -> MemberEvent:
    """The first ``kind`` event about ``node`` on the stream."""
    async with asyncio.timeout(EVENT_DEADLINE):
        while True:
            record = await stream.get()
            if isinstance(record, MemberEvent) and record.event == kind:
                if any(m.name == node for m in record.members):
                    return record


async def test_handshake_members_and_stats(serf_agents: Any) -> None:
    agent = await serf_agents("solo", tags={"role": "db", "zone": "a"})
    async with connected(agent) as rpc:
        members = await rpc.members()
        assert [m.name for m in members] == ["solo"]
        (me,) = members
        assert me.addr == "127.0.0.1"  # 4 bytes on the wire, decoded
        assert me.port > 0 and me.address == f"127.0.0.1:{me.port}"
        assert me.status == "alive"
        assert me.tags == {"role": "db", "zone": "a"}
        assert me.protocol[0] <= me.protocol[2] <= me.protocol[1]
        stats = await rpc.stats()
        assert stats["agent"]["name"] == "solo"
        assert stats["serf"]["members"] == "1"
        filtered = await rpc.members_filtered(tags={"role": "d."}, status="alive", name="so.*")
        assert [m.name for m in filtered] == ["solo"]
        assert await rpc.members_filtered(tags={"role": "web"}) == []


async def test_tags_and_serf_size_limit(serf_agents: Any) -> None:
    agent = await serf_agents("tagged", tags={"old": "1"})
    async with connected(agent) as rpc:
        await rpc.update_tags({"new": "2"}, delete=["old"])
        (me,) = await rpc.members()
        assert me.tags == {"new": "2"}
        # Our size computation is Serf's: exactly the limit passes, one more
        # byte is refused by the agent itself.
        filler = "f" * (TAG_LIMIT - serf_tags_size({"new": "2", "big": ""}) - 2)
        exact = {"new": "2", "big": filler}
        assert serf_tags_size(exact) == TAG_LIMIT
        await rpc.update_tags(exact)
        with pytest.raises(SerfAgentError, match="exceeds limit"):
            await rpc.update_tags({"big": filler + "f"})
        (me,) = await rpc.members()
        assert me.tags == exact


async def test_join_and_stream_events(serf_agents: Any) -> None:
    first = await serf_agents("first")
    second = await serf_agents("second")
    async with connected(first) as rpc, connected(second) as other:
        stream = await rpc.stream("member-join,member-update,member-leave,member-failed")
        (me,) = await rpc.members()
        assert await other.join([me.address]) == 1
        joined = await member_event(stream, "member-join", "second")
        (seen,) = [m for m in joined.members if m.name == "second"]
        assert seen.status == "alive" and seen.addr == "127.0.0.1"
        assert {m.name for m in await rpc.members()} == {"first", "second"}
        await other.update_tags({"stage": "two"})
        updated = await member_event(stream, "member-update", "second")
        assert [m.tags for m in updated.members if m.name == "second"] == [{"stage": "two"}]
        await other.leave()  # the agent leaves, then shuts down
        left = await member_event(stream, "member-leave", "second")
        assert [m.status for m in left.members if m.name == "second"] == ["left"]
        await stream.close()
        assert not rpc.closed  # stop answered, the connection goes on
        assert [m.name for m in await rpc.members() if m.status == "alive"] == ["first"]


async def test_query_and_respond(serf_agents: Any) -> None:
    asker = await serf_agents("asker")
    answerer = await serf_agents("answerer")
    async with connected(asker) as ask, connected(answerer) as answer:
        (target,) = await answer.members()
        await ask.join([target.address])
        events = await answer.stream("query:ping")
        replies = await ask.query("ping", b"hello", filter_nodes=["answerer"], timeout=1.5)
        async with asyncio.timeout(EVENT_DEADLINE):
            query = await events.get()
        assert isinstance(query, QueryEvent)
        assert (query.name, query.payload) == ("ping", b"hello")
        await answer.respond(query.id, b"\x00pong\xff")
        got = [record async for record in replies]  # ends with the query's "done"
        assert [(r.kind, r.source, r.payload) for r in got] == [
            ("response", "answerer", b"\x00pong\xff")
        ]
        with pytest.raises(SerfAgentError, match="No pending queries"):
            await answer.respond(query.id + 1000, b"")


async def test_join_failure_is_an_agent_error(serf_agents: Any) -> None:
    agent = await serf_agents("lonely")
    async with connected(agent) as rpc:
        with pytest.raises(SerfAgentError) as refused:
            await rpc.join(["127.0.0.1:1"])
        assert refused.value.command == "join"


async def test_auth_key(serf_agents: Any, tmp_path: Path) -> None:
    agent = await serf_agents("guarded", rpc_auth="right-key", workdir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # the config file is gone once read
    with pytest.raises(SerfAuthError, match="Invalid authentication token"):
        await SerfRPC.connect(agent.rpc_address, auth_key="wrong-key", timeout=5)
    unauthenticated = await SerfRPC.connect(agent.rpc_address, timeout=5)
    try:
        with pytest.raises(SerfAuthError, match="Authentication required"):
            await unauthenticated.members()
    finally:
        await unauthenticated.close()
    async with connected(agent) as rpc:
        assert [m.name for m in await rpc.members()] == ["guarded"]


async def test_agent_gone(serf_agents: Any) -> None:
    agent = await serf_agents("doomed")
    rpc = await SerfRPC.connect(agent.rpc_address, auth_key=agent.rpc_auth, timeout=5)
    try:
        stream = await rpc.stream()
        agent.kill()
        async with asyncio.timeout(5):  # no hang: the stream ends, requests fail
            with pytest.raises(SerfConnectionError):
                await stream.get()
            with pytest.raises(SerfConnectionError):
                await rpc.members()
        assert rpc.closed
    finally:
        await rpc.close()
    assert await agent.wait(5)
    with pytest.raises(SerfConnectionError, match="cannot reach"):
        await SerfRPC.connect(agent.rpc_address, timeout=5)


async def test_invalid_filter_makes_serf_hang_up(serf_agents: Any) -> None:
    # Serf 0.9.4 closes the connection, without an answer, on a regular
    # expression it cannot compile.
    agent = await serf_agents("strict")
    async with connected(agent) as rpc:
        async with asyncio.timeout(5):
            with pytest.raises(SerfConnectionError):
                await rpc.members_filtered(name="((")


async def test_agent_start_failure_is_reported(serf_agents: Any) -> None:
    running = await serf_agents("holder")
    host, port = split_host(running.rpc_address)
    with pytest.raises(SerfAgentStartError, match="holder|address already in use"):
        await serf_agents("intruder", rpc_addr=f"{host}:{port}")
    with pytest.raises(SerfAgentStartError, match="exited"):
        await serf_agents("broken", bind="127.0.0.1:notaport")


async def test_agent_dies_with_its_parent(serf_binary: str) -> None:
    # A sidecar killed outright must not leave its agent running.
    script = (
        "import asyncio, sys\n"
        "from discovery.serf.agent import SerfAgent\n"
        "async def main():\n"
        f"    agent = SerfAgent('orphan', '127.0.0.1:0', profile='local', binary={serf_binary!r})\n"
        "    await agent.start()\n"
        "    print(agent.pid, flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE
    )
    keep = -1
    try:
        assert parent.stdout is not None
        async with asyncio.timeout(20):
            pid = int(await parent.stdout.readline())
        assert alive(pid)
        # Hold the agent's output pipe open too: it must not die of a broken
        # pipe at its next log line, only of its parent's death.
        keep = os.open(f"/proc/{pid}/fd/1", os.O_RDONLY | os.O_NONBLOCK)
    finally:
        parent.kill()
        await parent.wait()
    try:
        async with asyncio.timeout(10):
            while alive(pid):
                await asyncio.sleep(0.05)
    finally:
        if keep >= 0:
            os.close(keep)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """``pid`` runs (not gone, not a zombie waiting for its reaping)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False
