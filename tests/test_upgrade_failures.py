"""Every failure of an upgrade is a fallback with a reason: never a dead
upgrade task that leaves ``fallback_reason`` at None, never a busy loop,
never a blocked event loop -- and nothing leaks."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import aiocoloc
from aiocoloc.connect import api as connect
from aiocoloc.connect import endpoint
from aiocoloc.connect.colocation import local_pools
from aiocoloc.connect.handshake import peer_uid
from aiocoloc.connect.registry import Registry
from aiocoloc.connect.rendezvous import connect_control
from aiocoloc.errors import HandshakeFailed
from aiocoloc.transport import fallback

from .conftest import open_fds
from .test_connect import echo, fell_back, info, no_pools_in_use, roundtrip, until, upgraded
from .test_transport import run

EMFILE_PEER = Path(__file__).with_name("emfile_peer.py")


@pytest.fixture(autouse=True)
def no_fd_leak() -> Iterator[None]:
    before = open_fds()
    yield
    local_pools().close_idle()  # pools lingering for a next connection
    assert open_fds() <= before, sorted(open_fds() - before)


async def tasks_end(baseline: set[asyncio.Task[Any]]) -> None:
    """Every task started since ``baseline`` (upgrades, handshakes) ends."""
    await until(lambda: asyncio.all_tasks() == baseline, "the upgrade's tasks to end")


# --- the client's upgrade driver ----------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [{"pool": 5}, {"host": []}, {"control": 7}, {"port": "x"}],
    ids=["pool", "host", "control", "port"],
)
def test_a_record_of_the_wrong_shape_is_no_registry_entry(changes: dict[str, Any]) -> None:
    """Such a record once killed the upgrade task: the connection stayed on
    TCP with ``fallback_reason`` None."""
    from aiocoloc.connect.registry import _start_time

    async def scenario() -> None:
        baseline = asyncio.all_tasks()
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        record = {
            "host": "127.0.0.1",
            "port": port,
            "control": "@aiocoloc-nobody",
            "pool": None,
            "pid": os.getpid(),
            "start_time": _start_time(os.getpid()),
            "uid": os.getuid(),
            "version": 1,
            **changes,
        }
        directory = Registry().directory
        directory.mkdir(mode=0o700, exist_ok=True)
        (directory / f"{port}-1-bad.json").write_text(json.dumps(record))
        async with server:
            reader, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
            assert await fell_back(writer) == fallback.NO_REGISTRY_ENTRY
            await roundtrip(reader, writer, 10_000)
            writer.close()
            await writer.wait_closed()
        await tasks_end(baseline)

    run("asyncio", scenario)


def test_a_registry_out_of_descriptors_is_no_registry_entry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def lookup(self: Registry, host: str, port: int) -> list[Any]:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(Registry, "lookup", lookup)

    async def scenario() -> None:
        baseline = asyncio.all_tasks()
        server = await aiocoloc.start_server(echo, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
            assert await fell_back(writer) == fallback.NO_REGISTRY_ENTRY
            assert "Too many open files" in info(writer)["fallback_detail"]
            await roundtrip(reader, writer, 10_000)
            writer.close()
            await writer.wait_closed()
        await tasks_end(baseline)

    run("asyncio", scenario)


@pytest.mark.parametrize("where", ["agree", "lookup"])
def test_anything_unexpected_is_a_protocol_error(
    monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError(f"a bug in {where}")

    async def broken_agree(*args: Any) -> Any:
        broken()

    if where == "agree":
        monkeypatch.setattr(connect, "agree", broken_agree)
    else:
        monkeypatch.setattr(Registry, "lookup", broken)

    async def scenario() -> None:
        baseline = asyncio.all_tasks()
        server = await aiocoloc.start_server(echo, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
            assert await fell_back(writer) == fallback.PROTOCOL_ERROR
            assert f"a bug in {where}" in info(writer)["fallback_detail"]
            await roundtrip(reader, writer, 10_000)
            writer.close()
            await writer.wait_closed()
        await tasks_end(baseline)

    run("asyncio", scenario)
    no_pools_in_use()


# --- a full accept queue on the control socket ---------------------------------------------


def _full_listener(address: str) -> tuple[socket.socket, list[socket.socket]]:
    """A control socket that never accepts, with its accept queue full."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + address[1:])
    listener.listen(0)  # the kernel queues one connection
    queued = []
    for _ in range(3):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect("\0" + address[1:])
        except BlockingIOError:
            sock.close()
            continue
        queued.append(sock)
    assert len(queued) == 1
    return listener, queued


def test_a_full_accept_queue_is_retried_then_reported_busy() -> None:
    """A connect to a full accept queue once "succeeded" on a socket that was
    not connected, and the handshake then said "peer not trusted: uid -1"."""
    address = f"@aiocoloc-test-full-{os.getpid()}"

    async def scenario() -> None:
        listener, queued = _full_listener(address)
        try:
            started = time.monotonic()
            with pytest.raises(HandshakeFailed) as failed:
                await connect_control(address, budget=0.2)
            assert failed.value.reason == fallback.CONTROL_BUSY
            assert 0.1 < time.monotonic() - started < 1.0
        finally:
            for sock in (listener, *queued):
                sock.close()

    run("asyncio", scenario)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_full_accept_queue_that_drains_is_joined(loop_kind: str) -> None:
    address = f"@aiocoloc-test-drains-{os.getpid()}"

    async def scenario() -> None:
        listener, queued = _full_listener(address)
        accepted: list[socket.socket] = []

        def drain() -> None:
            listener.setblocking(False)
            while True:
                try:
                    accepted.append(listener.accept()[0])
                except BlockingIOError:
                    return

        asyncio.get_running_loop().call_later(0.05, drain)
        try:
            sock = await connect_control(address, budget=1.0)
            assert sock.getpeername() == b"\0" + address[1:].encode()
            assert peer_uid(sock) == os.getuid()  # not -1: connected
            sock.close()
        finally:
            for s in (listener, *queued, *accepted):
                s.close()

    run(loop_kind, scenario)


def test_a_thousand_connections_at_once_each_end_upgraded_or_with_a_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a small accept queue on the control socket, so that it fills."""
    monkeypatch.setattr(endpoint, "CONTROL_BACKLOG", 8)

    async def scenario() -> None:
        baseline = asyncio.all_tasks()
        server = await aiocoloc.start_server(echo, "127.0.0.1", 0, backlog=2048)
        async with server:
            port = server.sockets[0].getsockname()[1]
            streams = await asyncio.gather(
                *(
                    aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
                    for _ in range(1000)
                )
            )
            writers = [writer for _, writer in streams]

            def settled() -> bool:
                return all(
                    info(w)["mode"] == "shm" or info(w)["fallback_reason"] is not None
                    for w in writers
                )

            await until(settled, "every connection to upgrade or fall back", timeout=60)
            reasons = [info(w)["fallback_reason"] for w in writers if info(w)["mode"] == "tcp"]
            assert fallback.NOT_TRUSTED not in reasons, reasons
            assert set(reasons) <= set(fallback.REASONS)
            assert len(reasons) < len(writers)  # some did upgrade
            await asyncio.gather(*(roundtrip(*pair, 1000) for pair in streams[:50]))
            for writer in writers:
                writer.close()
            await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
        await tasks_end(baseline)

    run("asyncio", scenario, timeout=120)


# --- a server out of descriptors --------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_control_endpoint_out_of_descriptors_backs_off_then_serves_again(
    tmp_path: Path,
) -> None:
    """The endpoint's accept handler once logged and returned while its
    socket stayed readable: 100% CPU and millions of log lines."""
    log = tmp_path / "server.log"
    with log.open("w") as stderr:  # a file: a pipe nobody reads would block a flood
        child = subprocess.Popen(
            [sys.executable, str(EMFILE_PEER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    assert child.stdin is not None and child.stdout is not None

    async def command(text: str, answer: str) -> None:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(text + "\n")
        child.stdin.flush()
        line = await asyncio.get_running_loop().run_in_executor(None, child.stdout.readline)
        assert line.strip() == answer

    async def scenario() -> None:
        assert child.stdout is not None
        baseline = asyncio.all_tasks()
        port = int(child.stdout.readline())
        aiocoloc.configure(handshake_timeout=10)  # the server stays out of descriptors 1 s
        reader, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade=1000)
        await roundtrip(reader, writer, 100)  # accepted, below the upgrade's traffic goal
        await command("fill", "full")
        cpu = _cpu_seconds(child.pid)
        await roundtrip(reader, writer, 1000)  # the upgrade starts: the server cannot accept
        await asyncio.sleep(1.0)
        assert _cpu_seconds(child.pid) - cpu < 0.3  # not spinning
        assert info(writer)["mode"] == "tcp" and info(writer)["fallback_reason"] is None
        await command("free", "freed")
        await upgraded(writer)  # it serves again
        await roundtrip(reader, writer, 100_000)
        writer.close()
        await writer.wait_closed()
        await tasks_end(baseline)

    try:
        run("asyncio", scenario)
    finally:
        try:
            child.communicate(timeout=10)  # closes its stdin: it stops
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
    lines = log.read_text().splitlines()
    assert sum("cannot accept" in line for line in lines) == 1, lines[:5]
    assert len(lines) < 10, lines[:10]
