"""Servers of several processes on one port (SO_REUSEPORT, or one listening
socket shared by workers as uvicorn's are): every connection upgrades about
as fast as with one process, and control endpoints that do not know a
connection let go of it at once."""

from __future__ import annotations

import asyncio
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

import aiocoloc
from aiocoloc.connect import endpoint
from aiocoloc.connect.colocation import local_pools

from .conftest import open_fds
from .test_connect import echo, info, recv_message, roundtrip, send_message, until, upgraded
from .test_transport import run

PEER = Path(__file__).with_name("reuse_port_peer.py")
#: Connect -> the client sends on shared memory.  One process takes a few
#: milliseconds; asking the endpoints in turn took up to the 1 s grace of
#: each process that did not accept the connection.  Generous: noisy machine.
UPGRADE_BOUND = 0.5


def spawn(loop_kind: str, where: str, fds: tuple[int, ...] = ()) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(PEER), loop_kind, where],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        pass_fds=fds,
    )


def start_servers(count: int, shared: bool) -> tuple[int, list[subprocess.Popen[str]]]:
    """``count`` server processes on one port, asyncio's and uvloop's loops
    in turn: each with its own socket (SO_REUSEPORT), or all ``shared`` one."""
    children: list[subprocess.Popen[str]] = []
    listener = socket.create_server(("127.0.0.1", 0)) if shared else None
    try:
        if listener is not None:
            port = listener.getsockname()[1]
            for index in range(count):
                kind = "uvloop" if index % 2 else "asyncio"
                children.append(spawn(kind, f"fd={listener.fileno()}", (listener.fileno(),)))
        else:
            children.append(spawn("asyncio", "0"))
            assert children[0].stdout is not None
            port = int(children[0].stdout.readline())
            for index in range(1, count):
                children.append(spawn("uvloop" if index % 2 else "asyncio", str(port)))
        for child in children:
            assert child.stdout is not None
            if child is not children[0] or shared:
                assert int(child.stdout.readline()) == port
    except BaseException:
        stop(children)
        raise
    finally:
        if listener is not None:
            listener.close()  # the workers have it
    return port, children


def stop(children: list[subprocess.Popen[str]]) -> list[str]:
    """Close their stdin (they stop serving) and return what they printed."""
    out = []
    for child in children:
        try:
            text, _ = child.communicate(timeout=10)
            out.extend(text.split())
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return out


async def sends_on_shm_or_falls_back(writer: asyncio.StreamWriter) -> None:
    await until(
        lambda: info(writer)["mode"] == "shm" or info(writer)["fallback_reason"] is not None,
        "the upgrade",
    )


@pytest.mark.parametrize(
    ("processes", "shared"),
    [(1, False), (2, False), (4, False), (8, False), (3, True)],
    ids=["1", "2", "4", "8", "3-workers-one-socket"],
)
def test_every_connection_to_a_multi_process_server_upgrades_quickly(
    processes: int, shared: bool
) -> None:
    connections = max(16, 4 * processes)  # 2 processes: all on one, 1 time in 30 000
    port, children = start_servers(processes, shared)
    times: list[float] = []

    async def scenario() -> None:
        baseline = asyncio.all_tasks()
        for _ in range(connections):
            started = time.monotonic()
            reader, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
            await sends_on_shm_or_falls_back(writer)
            times.append(time.monotonic() - started)
            assert info(writer)["mode"] == "shm", info(writer)
            await upgraded(writer)  # the server sends on shared memory too
            await roundtrip(reader, writer, 10_000)  # it reads this from shared memory
            writer.close()
            await writer.wait_closed()
        assert asyncio.all_tasks() == baseline

    fds = open_fds()
    try:
        run("asyncio", scenario, timeout=120)
    finally:
        printed = stop(children)
    local_pools().close_idle()  # the servers' pools linger for a next connection
    assert open_fds() <= fds, sorted(open_fds() - fds)
    median = statistics.median(times)
    print(f"\n{processes} server processes: median upgrade {median * 1000:.1f} ms")  # with -s
    assert max(times) < UPGRADE_BOUND, [round(t, 3) for t in times]
    # Each connection upgraded on the server side too, in the process that
    # accepted it.  SO_REUSEPORT spreads them by their 4-tuple (a shared
    # socket may well give them all to the process that wakes first).
    assert len(printed) == connections, printed
    assert {int(pid) for pid in printed} <= {child.pid for child in children}
    if processes > 1 and not shared:
        assert len(set(printed)) > 1, printed


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_client_that_hangs_up_is_let_go_at_once(
    monkeypatch: pytest.MonkeyPatch, loop_kind: str
) -> None:
    """A control endpoint that does not know a connection waits its grace
    for the server to accept it -- unless the client hangs up: it asked every
    endpoint at once and found its own."""
    monkeypatch.setattr(endpoint, "ACCEPT_GRACE", 30.0)

    async def scenario() -> None:
        baseline = asyncio.all_tasks()
        server = await aiocoloc.start_server(echo, "127.0.0.1", 0)
        async with server:
            assert server.control_address is not None
            loop = asyncio.get_running_loop()
            unknown = ["127.0.0.1", 1, "127.0.0.1", server.sockets[0].getsockname()[1]]

            async def ask() -> socket.socket:
                control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                control.setblocking(False)
                await loop.sock_connect(control, "\0" + server.control_address[1:])  # type: ignore[index]
                await send_message(control, {"op": "hello", "version": 1, "conn": unknown})
                return control

            def handshakes() -> int:
                return len(asyncio.all_tasks() - baseline)

            staying, leaving = await ask(), await ask()
            await until(lambda: handshakes() == 2, "both handshakes to start")
            leaving.close()
            hung_up = time.monotonic()
            await until(lambda: handshakes() == 1, "the endpoint to let go", timeout=5)
            assert time.monotonic() - hung_up < 0.5
            await asyncio.sleep(0.2)
            assert handshakes() == 1  # the one whose client stays still waits
            staying.shutdown(socket.SHUT_WR)  # a half-close is a hang-up too
            await until(lambda: handshakes() == 0, "the endpoint to let go", timeout=5)
            with pytest.raises(ConnectionError):
                await recv_message(staying)  # no answer owed to a client that left
            staying.close()

    fds = open_fds()
    run(loop_kind, scenario)
    local_pools().close_idle()
    assert open_fds() <= fds, sorted(open_fds() - fds)


def test_several_endpoints_the_first_agreement_wins_and_nothing_leaks() -> None:
    """Endpoints that do not know the connection are asked too (a second
    aiocoloc server advertises the port): the upgrade takes no longer and
    their control sockets are closed at once."""
    from aiocoloc.connect.registry import Registry

    async def scenario() -> None:
        baseline = asyncio.all_tasks()
        real = await aiocoloc.start_server(echo, "127.0.0.1", 0)
        others = [await aiocoloc.start_server(echo, "127.0.0.1", 0) for _ in range(3)]
        port = real.sockets[0].getsockname()[1]
        records = [
            Registry().publish("127.0.0.1", port, other.control_address)  # type: ignore[arg-type]
            for other in others
        ]
        try:
            for _ in range(5):
                started = time.monotonic()
                reader, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
                await sends_on_shm_or_falls_back(writer)
                assert info(writer)["mode"] == "shm", info(writer)
                assert time.monotonic() - started < UPGRADE_BOUND
                await roundtrip(reader, writer, 10_000)
                writer.close()
                await writer.wait_closed()
            # The other endpoints let go of their requests at once.
            await until(
                lambda: asyncio.all_tasks() == baseline,
                "every handshake task to end",
                timeout=0.5,
            )
        finally:
            for record in records:
                Registry().withdraw(record)
            for server in (real, *others):
                server.close()
                await server.wait_closed()

    fds = open_fds()
    run("asyncio", scenario)
    local_pools().close_idle()
    assert open_fds() <= fds, sorted(open_fds() - fds)
