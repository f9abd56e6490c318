"""The library and a real sidecar: a client that cannot see a server in its
host registry finds it through ``aiocoloc-discoveryd`` and upgrades; with
the sidecar killed, live connections go on and new ones use the registry
(or stay on TCP with the reason); a restarted sidecar is used again."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import aiocoloc
from aiocoloc.connect import sidecar
from aiocoloc.transport import fallback

from ..test_connect import fell_back, info, roundtrip, upgraded
from ..test_transport import run
from .daemon_harness import Daemon, loopback_ips, wait_for

PEER = Path(__file__).parents[1] / "connect_peer.py"


def advertised(daemon: Daemon) -> list[str]:
    """The endpoints the daemon's own member advertises."""
    members = daemon.request("members")["result"]["members"]
    local = [m for m in members if m.get("local")]
    return list(local[0]["endpoints"]) if local else []


@pytest.fixture
def server_registry(tmp_path: Path) -> Path:
    """A registry directory of the server's own: the test's client cannot
    find the server there, only through the sidecar."""
    directory = tmp_path / "server-registry"
    directory.mkdir(mode=0o700)
    return directory


@pytest.mark.timeout(120)
def test_a_client_finds_a_server_through_the_sidecar_and_survives_its_restart(
    tmp_path: Path, server_registry: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = tmp_path / "discoveryd.sock"
    monkeypatch.setenv("AIOCOLOC_DISCOVERY_API", str(api))
    monkeypatch.setattr(sidecar, "RETRY_AFTER", 0.2)
    (ip,) = loopback_ips(1)
    daemon = Daemon(tmp_path, "node-a", ip, api=api, env=dict(os.environ))
    server_env = {**os.environ, "AIOCOLOC_RUNTIME_DIR": str(server_registry)}
    server = subprocess.Popen(
        [sys.executable, str(PEER), "server", "asyncio"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=server_env,
    )
    restarted: Daemon | None = None
    try:
        daemon.wait_ready()
        assert server.stdout is not None
        port = int(server.stdout.readline())
        wait_for(lambda: any(f":{port}=" in e for e in advertised(daemon)), 10, "the advert")

        async def scenario() -> None:
            nonlocal restarted
            # 1. Only the sidecar knows the server: the connection upgrades.
            reader, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
            await upgraded(writer)
            await roundtrip(reader, writer, 1 << 20)

            # 2. The sidecar dies: the live connection goes on over shm ...
            daemon.proc.kill()
            daemon.proc.wait()
            await roundtrip(reader, writer, 1 << 20)
            assert info(writer)["mode"] == "shm"
            # ... a new one that only the sidecar could help stays on TCP, with the reason ...
            r2, w2 = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
            assert await fell_back(w2) == fallback.NO_REGISTRY_ENTRY
            await roundtrip(r2, w2, 100_000)
            w2.close()
            await w2.wait_closed()
            # ... and one that shares the server's registry upgrades without it.
            monkeypatch.setenv("AIOCOLOC_RUNTIME_DIR", str(server_registry))
            r3, w3 = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
            await upgraded(w3)
            await roundtrip(r3, w3, 100_000)
            w3.close()
            await w3.wait_closed()
            monkeypatch.undo()
            monkeypatch.setenv("AIOCOLOC_DISCOVERY_API", str(api))
            monkeypatch.setattr(sidecar, "RETRY_AFTER", 0.2)

            # 3. A restarted sidecar learns the server's endpoint again and is used.
            restarted = Daemon(tmp_path, "node-a2", ip, api=api, env=dict(os.environ))
            await asyncio.to_thread(restarted.wait_ready)
            await asyncio.to_thread(
                wait_for,
                lambda: any(f":{port}=" in e for e in advertised(restarted)),  # type: ignore[union-attr]
                10,
                "the endpoint advertised again",
            )
            await asyncio.sleep(0.3)  # (past the lookup's back-off)
            r4, w4 = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
            await upgraded(w4)
            await roundtrip(r4, w4, 100_000)
            for w in (w4, writer):
                w.close()
                await w.wait_closed()

        run("asyncio", scenario, timeout=90)
        assert server.stdin is not None
        server.stdin.close()
        server.wait(10)
        server_lines = [json.loads(line) for line in server.stdout if line.strip()]
        # (The server reports a connection upgraded when it sees it so: the
        # long-lived first one at least; short ones may close before it looks.)
        assert {"upgraded": True} in server_lines
    finally:
        for proc in (server,):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        daemon.finish()
        if restarted is not None:
            restarted.finish()


def test_a_sidecar_that_says_not_colocated_gives_that_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer address the sidecar places on a member sharing no pool with
    us: TCP, reason "not co-located"."""
    api = tmp_path / "discoveryd.sock"
    monkeypatch.setenv("AIOCOLOC_DISCOVERY_API", str(api))
    a_ip, b_ip = loopback_ips(2)
    a = Daemon(tmp_path, "node-a", a_ip, api=api, env=dict(os.environ))
    b = Daemon(tmp_path, "node-b", b_ip, "--join", f"{a_ip}:7946")
    try:
        a.wait_ready()
        b.wait_ready()
        wait_for(lambda: len(a.request("members")["result"]["members"]) == 2, 15, "the join")

        async def scenario() -> None:
            # A plain asyncio server on b's address: b's member, no pool shared.
            async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                while data := await reader.read(65536):
                    writer.write(data)
                writer.close()

            server = await asyncio.start_server(echo, b_ip, 0)
            port = server.sockets[0].getsockname()[1]
            async with server:
                reader, writer = await aiocoloc.open_connection(b_ip, port, upgrade="always")
                assert await fell_back(writer) == fallback.NOT_COLOCATED
                assert "node-b" in info(writer)["fallback_detail"]
                await roundtrip(reader, writer, 100_000)
                writer.close()
                await writer.wait_closed()

        run("asyncio", scenario)
    finally:
        a.finish()
        b.finish()
