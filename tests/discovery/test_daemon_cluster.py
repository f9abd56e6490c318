"""Real ``aiocoloc-discoveryd`` processes (embedded engine, ``host`` profile)
on loopback addresses: finding each other, co-location through shared
pools, pools attached and detached as ``update``, servers' endpoints
advertised and withdrawn, bad requests survived, the address in use."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from discovery.client import SidecarClient
from tests.discovery.daemon_events import Recorder
from tests.discovery.daemon_harness import DAEMON, Cluster, Daemon, loopback_ips, wait_for
from tests.discovery.daemon_pools import posix_pool


@dataclass
class Three:
    """a and b map pool p1; c maps pool p2."""

    a: Daemon
    b: Daemon
    c: Daemon
    p1: tuple[str, str]  # (name, pool id)
    p2: tuple[str, str]


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Three]:
    directory = tmp_path_factory.mktemp("three")
    env = {**os.environ, "AIOCOLOC_RUNTIME_DIR": str(directory)}
    cluster = Cluster(directory, env)
    with ExitStack() as stack:
        stack.callback(cluster.finish)
        p1 = stack.enter_context(posix_pool())
        p2 = stack.enter_context(posix_pool())
        ip_a, ip_b, ip_c = loopback_ips(3)
        seed = f"{ip_a}:7946"
        a = cluster.start("a", ip_a, "--pool", p1[0])
        b = cluster.start("b", ip_b, "--pool", p1[0], "--join", seed)
        c = cluster.start("c", ip_c, "--pool", p2[0], "--join", seed)
        for daemon in (a, b, c):
            daemon.wait_ready()
        for daemon in (a, b, c):
            wait_for(
                lambda d=daemon: _alive(d) == {"a", "b", "c"},  # type: ignore[misc]
                10,
                f"{daemon.node} sees all three",
            )
        yield Three(a, b, c, p1, p2)


def _alive(daemon: Daemon) -> set[str]:
    reply = daemon.request("members")
    return {m["node"] for m in reply["result"]["members"] if m["status"] == "alive"}


@pytest.mark.asyncio
async def test_members_and_colocation(three: Three) -> None:
    async with three.a.client() as client:
        views = {v.member.node: v for v in await client.members()}
        assert set(views) == {"a", "b", "c"}
        assert views["a"].local and views["a"].member.pools == {three.p1[1]}
        assert views["b"].colocated and views["b"].shared_pools == {three.p1[1]}
        assert not views["c"].colocated and views["c"].member.pools == {three.p2[1]}
        assert views["b"].member.addresses[0] == three.b.address
        # Slot tags travel in their own field, never shown: endpoints are servers' only.
        assert all(v.member.endpoints == () for v in views.values())
        assert all("slots" not in m for m in three.a.request("members")["result"]["members"])

        answer = await client.colocated(three.b.address)
        assert (answer.colocated, answer.pool, answer.member and answer.member.node) == (
            True,
            three.p1[1],
            "b",
        )
        answer = await client.colocated(three.c.ip)
        assert (answer.colocated, answer.pool, answer.member and answer.member.node) == (
            False,
            None,
            "c",
        )
        assert (await client.colocated(three.a.ip)).local
        assert (await client.colocated("192.0.2.7:80")).member is None
    async with three.c.client() as client:
        assert not (await client.colocated(three.a.address)).colocated
    status = three.b.request("status")["result"]
    assert status["members"]["alive"] == 3 and status["joined"] is True
    wait_for(  # b watches a's slot in p1 (from its first scan after a's record)
        lambda: three.b.request("status")["result"]["watching"] == {"a": 1}, 5, "b watches a"
    )
    assert three.c.request("status")["result"]["watching"] == {}


@pytest.mark.asyncio
async def test_attach_and_detach_propagate_as_update(three: Three) -> None:
    name, pool_id = three.p1
    async with three.c.client() as c, three.a.client() as a:
        recorder = await Recorder.start(a)
        try:
            started = time.monotonic()
            info = await c.attach_pool(name)
            assert (info.id, info.source) == (pool_id, "api")
            arrived, event = await recorder.wait(
                lambda e: e.kind == "update" and e.member.node == "c" and pool_id in e.member.pools,
                5,
                "update of c with p1",
            )
            attach_seconds = arrived - started
            assert event.previous is not None and pool_id not in event.previous.pools
            assert (await a.colocated(three.c.ip)).pool == pool_id
            started = time.monotonic()
            await c.detach_pool(pool_id)
            arrived, _ = await recorder.wait(
                lambda e: (
                    e.kind == "update" and e.member.node == "c" and pool_id not in e.member.pools
                ),
                5,
                "update of c without p1",
            )
            detach_seconds = arrived - started
        finally:
            await recorder.close()
        assert not (await a.colocated(three.c.ip)).colocated
    print(
        f"update propagation: attach {attach_seconds * 1000:.0f} ms, detach {detach_seconds * 1000:.0f} ms"
    )
    # "within one probe interval" of the host profile (0.2 s), with slack for a busy machine.
    assert attach_seconds < 1.0 and detach_seconds < 1.0


_SERVER = """
import asyncio, sys
from discovery.client import SidecarClient
async def main():
    client = SidecarClient(sys.argv[1])
    print(await client.advertise([sys.argv[2]]), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
asyncio.run(main())
"""


@pytest.mark.asyncio
async def test_endpoints_advertised_and_withdrawn_with_their_process(three: Three) -> None:
    endpoint = f"tcp:{three.a.ip}:9000"
    async with three.b.client() as b:
        recorder = await Recorder.start(b)
        server = subprocess.Popen(
            [sys.executable, "-c", _SERVER, str(three.a.api), endpoint],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            assert json.loads(server.stdout.readline().replace("'", '"')) == [endpoint]
            await recorder.wait(
                lambda e: e.kind == "update" and e.member.endpoints == (endpoint,),
                5,
                "a's endpoint at b",
            )
            assert (await b.colocated(three.a.address)).endpoints == (endpoint,)
            server.kill()  # never withdrew: its exit does
            server.wait()
            await recorder.wait(
                lambda e: e.kind == "update" and e.member.node == "a" and not e.member.endpoints,
                5,
                "a's endpoint withdrawn at b",
            )
        finally:
            if server.poll() is None:
                server.kill()
            server.wait()
            assert server.stdin is not None and server.stdout is not None
            server.stdin.close()
            server.stdout.close()
            await recorder.close()
    async with three.a.client() as a:
        assert await a.advertise(["uds:@x"]) == ["uds:@x"]
        assert await a.withdraw(["uds:@x"]) == []


@pytest.mark.asyncio
async def test_bad_requests_and_the_daemon_lives_on(three: Three) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(three.c.api))
        lines = [
            b"{not json\n",
            b'{"op": "colocated", "address": "not-an-ip"}\n',
            b'{"op": "pools.detach", "name": "nope"}\n',
            b'{"op": "pools.attach", "name": "aiocoloc-no-such-pool"}\n',
            b'{"op": "advertise", "endpoints": [7]}\n',
            b'{"op": "status", "id": "last"}\n',
        ]
        sock.sendall(b"".join(lines))
        data = b""
        while data.count(b"\n") < len(lines):
            data += sock.recv(65536)
    replies = [json.loads(line) for line in data.splitlines()]
    assert [r["error"]["code"] for r in replies[:-1]] == [
        "bad-request",
        "bad-request",
        "not-found",
        "not-found",
        "bad-request",
    ]
    assert replies[-1]["id"] == "last" and replies[-1]["ok"]
    async with SidecarClient(three.c.api) as client:
        assert {v.member.node for v in await client.members()} == {"a", "b", "c"}
    assert three.c.proc.poll() is None


def test_gossip_address_in_use(three: Three, tmp_path: Path) -> None:
    result = subprocess.run(
        [DAEMON, "--bind", three.a.address, "--api", str(tmp_path / "x.sock"), "--profile", "host"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "error:" in line]
    assert f"cannot start the embedded engine on {three.a.address}" in line
    assert "in use" in line
    assert not (tmp_path / "x.sock").exists()
