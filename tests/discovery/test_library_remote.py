"""Connections between two nodes that share a pool but not a kernel's
registry: the upgrade between kernels (``aiocoloc.connect.remote_handshake``),
played on this host by two sidecars ("node A", "node B") that both map one
POSIX pool, as two VMs map one ivshmem region.  The server runs in its own
process on node A's address, with node A's sidecar; the client here asks
node B's.  Nothing can use the registry or an abstract socket: the control
channel is TCP, authenticated with the cluster key, and the pool is proven
both ways.  Every refusal is a test: wrong key, no key, a forged nonce, a
pool claimed but not mapped, an address translation."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import aiocoloc
from aiocoloc.connect import remote_handshake, rendezvous, sidecar
from aiocoloc.connect.colocation import local_pools
from aiocoloc.control.messages import Pipes
from aiocoloc.shm import Pool, PoolConfig, PosixShmSegment
from aiocoloc.transport import fallback
from discovery.keys import Keyring

from ..conftest import SHM_PREFIX
from ..test_connect import fell_back, info, upgraded
from ..test_transport import run
from .daemon_harness import Daemon, loopback_ips, wait_for

PEER = Path(__file__).parents[1] / "connect_peer.py"
POOL = PoolConfig(slice_size=65536, max_members=16, max_pipes=64, max_slices_per_pipe=256)

pytestmark = pytest.mark.timeout(120)


@dataclass
class Nodes:
    pool: Pool
    a_ip: str
    b_ip: str
    key: Path
    port: int  # the server's, on node A
    server: subprocess.Popen[str]


@pytest.fixture
def nodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Nodes]:
    name = f"{SHM_PREFIX}-remote-{uuid.uuid4().hex[:10]}"
    pool = Pool.create(PosixShmSegment.create(f"/{name}", 16 << 20), POOL)
    key = tmp_path / "cluster.key"
    Keyring.generate().save(key)
    a_ip, b_ip = loopback_ips(2)
    common = ("--pool", name, "--key-file", str(key))
    a = Daemon(tmp_path, "node-a", a_ip, *common)
    b = Daemon(tmp_path, "node-b", b_ip, *common, "--join", f"{a_ip}:7946")
    server: subprocess.Popen[str] | None = None
    try:
        a.wait_ready()
        b.wait_ready()
        wait_for(lambda: len(b.request("members")["result"]["members"]) == 2, 15, "the join")
        registry = tmp_path / "server-registry"
        registry.mkdir(mode=0o700)
        server_env = {
            **os.environ,
            "AIOCOLOC_RUNTIME_DIR": str(registry),  # not the client's
            "AIOCOLOC_DISCOVERY_API": str(a.api),
            "AIOCOLOC_KEY_FILE": str(key),
            "PEER_HOST": a_ip,
        }
        server = subprocess.Popen(
            [sys.executable, str(PEER), "server", "asyncio"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=server_env,
        )
        assert server.stdout is not None
        port = int(server.stdout.readline())

        def advertised_at_b() -> bool:
            answer = b.request("colocated", address=f"{a_ip}:{port}")["result"]
            return any("=tcp:" in e for e in answer["endpoints"])

        wait_for(advertised_at_b, 15, "the server's TCP control endpoint, seen from node B")
        monkeypatch.setenv("AIOCOLOC_DISCOVERY_API", str(b.api))
        monkeypatch.setenv("AIOCOLOC_KEY_FILE", str(key))
        monkeypatch.setattr(sidecar, "RETRY_AFTER", 0.2)
        yield Nodes(pool, a_ip, b_ip, key, port, server)
    finally:
        if server is not None:
            if server.stdin is not None:
                server.stdin.close()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        a.finish()
        b.finish()
        local_pools().close_idle()
        pool.close()


async def _echo_both_ways(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """8 MiB through the echo server, checked by sha256 both ways."""
    payload = os.urandom(8 << 20)
    sent = hashlib.sha256(payload)

    async def pump() -> None:
        for offset in range(0, len(payload), 1 << 20):
            writer.write(payload[offset : offset + (1 << 20)])
            await writer.drain()

    pumping = asyncio.ensure_future(pump())
    back = hashlib.sha256(await reader.readexactly(len(payload)))
    await pumping
    assert back.hexdigest() == sent.hexdigest()


async def _open(nodes: Nodes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await aiocoloc.open_connection(nodes.a_ip, nodes.port, upgrade="always")


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    await writer.wait_closed()


def test_a_connection_between_nodes_upgrades_through_the_shared_pool(nodes: Nodes) -> None:
    async def scenario() -> None:
        reader, writer = await _open(nodes)
        await upgraded(writer)
        state = info(writer)
        assert state["pool"] == str(nodes.pool.id)  # the host pool both nodes map
        await _echo_both_ways(reader, writer)
        assert info(writer)["mode"] == "shm"
        await _close(writer)

    run("asyncio", scenario, timeout=90)


def test_a_wrong_cluster_key_stays_on_tcp(
    nodes: Nodes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "other.key"
    Keyring.generate().save(other)
    monkeypatch.setenv("AIOCOLOC_KEY_FILE", str(other))

    async def scenario() -> None:
        reader, writer = await _open(nodes)
        assert await fell_back(writer) == fallback.NOT_TRUSTED
        assert "cluster key" in info(writer)["fallback_detail"]
        writer.write(b"still TCP")
        assert await reader.readexactly(9) == b"still TCP"
        await _close(writer)

    run("asyncio", scenario)


def test_no_cluster_key_stays_on_tcp_with_the_reason(
    nodes: Nodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AIOCOLOC_KEY_FILE")

    async def scenario() -> None:
        _, writer = await _open(nodes)
        assert await fell_back(writer) == fallback.NO_CLUSTER_KEY
        await _close(writer)

    run("asyncio", scenario)


def test_a_forged_nonce_is_refused(nodes: Nodes, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that sends another nonce than the one it wrote in the pool."""
    honest = remote_handshake.write_nonce

    def forge(pool: Pool, handle: object, nonce: bytes) -> None:
        honest(pool, handle, os.urandom(len(nonce)))  # type: ignore[arg-type]

    monkeypatch.setattr(remote_handshake, "write_nonce", forge)

    async def scenario() -> None:
        reader, writer = await _open(nodes)
        assert await fell_back(writer) == fallback.PROOF_FAILED
        assert "nonce" in info(writer)["fallback_detail"]
        writer.write(b"x" * 70_000)
        assert await reader.readexactly(70_000) == b"x" * 70_000
        await _close(writer)
        stats = nodes.pool.stats()
        assert stats["pipes"] == 0, stats  # the refused pipes were given back

    run("asyncio", scenario)


def test_a_pool_claimed_but_not_mapped_is_refused(
    nodes: Nodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that names the shared pool but does not map it: it cannot
    read the server's nonce, so it pretends it did (it copies the one in
    ``pipes``), and its own nonce goes where the server cannot see it."""
    pretend: list[bytes] = []
    real_expect = remote_handshake.expect

    def seeing(message: Any, fds: list[int], kind: Any, nfds: int) -> Any:
        got = real_expect(message, fds, kind, nfds)
        if isinstance(got, Pipes):
            pretend.append(got.nonce)
        return got

    monkeypatch.setattr(remote_handshake, "expect", seeing)
    monkeypatch.setattr(remote_handshake, "read_nonce", lambda pool, handle: pretend.pop())
    monkeypatch.setattr(remote_handshake, "write_nonce", lambda pool, handle, nonce: None)

    async def scenario() -> None:
        reader, writer = await _open(nodes)
        assert await fell_back(writer) == fallback.PROOF_FAILED
        assert "nonce" in info(writer)["fallback_detail"]
        writer.write(b"y" * 1000)
        assert await reader.readexactly(1000) == b"y" * 1000
        await _close(writer)

    run("asyncio", scenario)


def test_an_address_translation_is_refused_never_matched(
    nodes: Nodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control connection arrives from another address than the one the
    client's TCP connection has (what a NAT between two VMs does)."""
    translated = nodes.b_ip

    async def from_elsewhere(host: str, port: int, budget: float) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((translated, 0))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        return sock

    monkeypatch.setattr(rendezvous, "connect_tcp_control", from_elsewhere)

    async def scenario() -> None:
        # The client's own connection comes from 127.0.0.1: not node B's address.
        _, writer = await aiocoloc.open_connection(
            nodes.a_ip, nodes.port, upgrade="always", local_addr=("127.0.0.1", 0)
        )
        assert await fell_back(writer) == fallback.ADDRESS_TRANSLATED
        assert translated in info(writer)["fallback_detail"]
        await _close(writer)

    run("asyncio", scenario)


def test_a_pool_scribbled_by_the_other_node_ends_in_a_clear_error_or_tcp(nodes: Nodes) -> None:
    """The other node writes garbage over the whole shared region under a
    live upgraded connection: the connection ends with a clear error (or
    goes on), nothing crashes, and a new connection stays on TCP with the
    reason while the pool is unusable."""
    region = PosixShmSegment.attach(nodes.pool.segment.name)
    mapping = region.map()

    async def scenario() -> None:
        reader, writer = await _open(nodes)
        await upgraded(writer)
        await _echo_both_ways(reader, writer)
        mapping[:] = os.urandom(len(mapping))  # everything: header, tables, rings
        try:
            for _ in range(20):
                writer.write(os.urandom(100_000))
                await writer.drain()
                await asyncio.wait_for(reader.read(1 << 20), 2)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            cause = reader.exception() or exc  # what the transport reported
            print(f"\nscribbled pool: the connection ended with {cause!r}")
            assert any(word in str(cause) for word in ("shared-memory", "pipe", "pool")), cause
        except TimeoutError:
            pass  # bytes lost in garbage are not silently delivered: the stream just stops
        writer.close()
        # The server process is still there and serves: a new connection works on TCP.
        r2, w2 = await _open(nodes)
        assert await fell_back(w2) in fallback.REASONS
        w2.write(b"after the scribble")
        assert await r2.readexactly(18) == b"after the scribble"
        await _close(w2)

    try:
        run("asyncio", scenario, timeout=60)
        assert nodes.server.poll() is None, "the server process died"
    finally:
        mapping.close()
        region.close()
