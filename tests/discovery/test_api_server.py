"""The local API socket and its client, without an engine: owner-only access,
bad requests answered and survived, subscriptions, and the client's
``SidecarUnavailable`` for every way the daemon can be missing."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from discovery.api_messages import MAX_LINE, ApiError, Request
from discovery.client import SidecarClient, SidecarUnavailable
from discovery.daemon.api import ApiServer, ApiStartError, Peer, peer_allowed
from discovery.events import Event, EventStream
from discovery.member import Member

NOBODY = 65534
A = Member("a", ("127.0.0.2:7946",), frozenset({"p1"}))


class Backend:
    """A handler that answers ``status`` and ``colocated``, fails on
    ``pools`` (a bug), and records who asked."""

    def __init__(self) -> None:
        self.events = EventStream()
        self.peers: list[Peer] = []

    async def handle(self, request: Request, peer: Peer) -> Any:
        self.peers.append(peer)
        if request.op == "status":
            return {"node": "test"}
        if request.op == "colocated":
            raise ApiError("not-found", f"nobody at {request.args['address']}")
        if request.op == "pools":
            raise RuntimeError("a bug in a handler")
        return {"members": []}


async def _serve(path: Path) -> tuple[ApiServer, Backend]:
    backend = Backend()
    server = ApiServer(path, backend.handle, backend.events.subscribe)
    await server.bind()
    await server.serve()
    return server, backend


async def _exchange(path: Path, *lines: bytes) -> list[dict[str, Any]]:
    reader, writer = await asyncio.open_unix_connection(str(path), limit=2 * MAX_LINE)
    try:
        for line in lines:
            writer.write(line)
        await writer.drain()
        out = []
        while raw := await asyncio.wait_for(reader.readline(), 5):
            out.append(json.loads(raw))
            if len(out) == len(lines):
                break
        return out
    finally:
        writer.close()


@pytest.mark.asyncio
async def test_socket_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "run" / "api.sock"
    server, backend = await _serve(path)
    try:
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        (reply,) = await _exchange(path, b'{"op": "status", "id": 1}\n')
        assert reply == {"id": 1, "ok": True, "result": {"node": "test"}}
        assert backend.peers[0] == Peer(os.getpid(), os.getuid(), os.getgid())
        with pytest.raises(ApiStartError, match="another aiocoloc-discoveryd answers"):
            await ApiServer(path, backend.handle, backend.events.subscribe).bind()
    finally:
        await server.close()
    assert not path.exists()


def test_peer_check() -> None:
    assert peer_allowed(Peer(1, 1000, 1000), uid=1000)
    assert not peer_allowed(Peer(1, 0, 0), uid=1000)  # root is another user too
    assert not peer_allowed(Peer(1, 1001, 1000), uid=1000)


def _python_for_nobody() -> str | None:
    """An interpreter another user may run (ours may live under /root)."""
    for candidate in ("/usr/bin/python3", shutil.which("python3") or ""):
        if candidate and os.access(candidate, os.X_OK) and not candidate.startswith("/root"):
            return candidate
    return None


_CHILD = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect("api.sock")  # relative: only the socket's own directory is searched
except PermissionError:
    print("EACCES"); sys.exit(0)
s.settimeout(5)  # the daemon speaks first to a stranger: refused, hung up
data = b""
while chunk := s.recv(4096):
    data += chunk
print(data.decode().strip() + "|EOF")
"""


@pytest.mark.asyncio
async def test_other_users_are_refused(tmp_path: Path) -> None:
    """A process of another user cannot connect (mode 0600); and if the mode
    is loosened, ``SO_PEERCRED`` still turns it away with ``forbidden``."""
    python = _python_for_nobody()
    if os.geteuid() != 0 or python is None:
        pytest.skip("needs root (to run a child as another user) and a system python")
    directory = tmp_path / "api"
    server, backend = await _serve(directory / "api.sock")
    try:
        directory.chmod(0o711)  # searchable by others, not listable

        async def child() -> str:
            result = await asyncio.to_thread(
                subprocess.run,
                [python, "-I", "-S", "-c", _CHILD],
                cwd=directory,
                user=NOBODY,
                group=NOBODY,
                extra_groups=[],
                capture_output=True,
                text=True,
                timeout=20,
            )
            assert result.returncode == 0, result.stderr
            return result.stdout.strip()

        assert await child() == "EACCES"
        (directory / "api.sock").chmod(0o666)
        out = await child()
        reply, end = out.split("|")
        assert end == "EOF"  # hung up on
        assert json.loads(reply)["error"]["code"] == "forbidden"
        assert backend.peers == []  # the handler never saw it
        (reply,) = await _exchange(directory / "api.sock", b'{"op": "status"}\n')
        assert reply["ok"]  # and the owner still gets through
    finally:
        await server.close()


@pytest.mark.asyncio
async def test_bad_requests_get_errors_and_the_server_lives_on(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    server, _ = await _serve(path)
    try:
        replies = await _exchange(
            path,
            b"garbage\n",
            b'{"op": "reboot", "id": 2}\n',
            b'{"op": "colocated", "id": 3}\n',
            b'{"op": "colocated", "address": "10.9.9.9", "id": 4}\n',
            b'{"op": "pools", "id": 5}\n',
            b'{"op": "members", "v": 2, "id": 6}\n',
            b'{"op": "status", "id": 7}\n',
        )
        codes = [r["error"]["code"] if not r["ok"] else "ok" for r in replies]
        assert codes == [
            "bad-request",
            "unknown-op",
            "bad-request",
            "not-found",
            "internal",
            "unsupported-version",
            "ok",
        ]
        assert [r["id"] for r in replies[1:]] == [2, 3, 4, 5, 6, 7]
        assert "nobody at 10.9.9.9" in replies[3]["error"]["message"]
        # A line beyond the limit cannot be framed: an error, then hung up.
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"x" * (MAX_LINE + 10) + b"\n")
        reply = json.loads(await asyncio.wait_for(reader.readline(), 5))
        assert reply["error"]["code"] == "bad-request"
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        (reply,) = await _exchange(path, b'{"op": "status"}\n')
        assert reply["ok"]
    finally:
        await server.close()


@pytest.mark.asyncio
async def test_subscription_and_client(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    server, backend = await _serve(path)
    client = SidecarClient(path, timeout=2)
    try:
        assert await client.status() == {"node": "test"}
        with pytest.raises(ApiError) as caught:
            await client.colocated("10.1.1.1")
        assert caught.value.code == "not-found"
        feed = await client.subscribe()
        backend.events.publish(Event("join", A))
        assert await asyncio.wait_for(feed.__anext__(), 5) == Event("join", A)
        assert len(backend.events._subscribers) == 1
        await feed.aclose()
        for _ in range(100):
            if not backend.events._subscribers:
                break
            await asyncio.sleep(0.01)
        assert not backend.events._subscribers  # the daemon let go of it
        # The daemon goes away: the feed's iterator says so.
        feed = await client.subscribe()
        await server.close()
        with pytest.raises(SidecarUnavailable):
            await asyncio.wait_for(feed.__anext__(), 5)
        with pytest.raises(SidecarUnavailable, match="No such file"):
            await client.status()
        # A new daemon on the same path: the client just connects again.
        server, backend = await _serve(path)
        assert await client.status() == {"node": "test"}
    finally:
        await client.close()
        await server.close()


@pytest.mark.asyncio
async def test_client_when_nobody_answers(tmp_path: Path) -> None:
    absent = SidecarClient(tmp_path / "absent.sock", timeout=1)
    with pytest.raises(SidecarUnavailable, match="no aiocoloc-discoveryd answers"):
        await absent.members()
    with pytest.raises(SidecarUnavailable):
        await absent.subscribe()
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))  # bound, never listening: connection refused
    with pytest.raises(SidecarUnavailable, match="Connection refused"):
        await SidecarClient(stale, timeout=1).pools()
    # A socket that accepts and never answers: bounded by the timeout.
    silent_path = tmp_path / "silent.sock"
    silent = await asyncio.start_unix_server(lambda r, w: None, str(silent_path))
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(SidecarUnavailable, match="did not answer within 0.3 s"):
            await SidecarClient(silent_path, timeout=0.3).status()
        assert loop.time() - started < 2
        with pytest.raises(SidecarUnavailable, match="did not answer"):
            await SidecarClient(silent_path, timeout=0.3).subscribe()
    finally:
        silent.close()
        await silent.wait_closed()
