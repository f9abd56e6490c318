"""The hot halves written in Cython's pure-Python mode (the transport's data
path, the spin policy, the hub's waking; ``aiocoloc.compiled``): compiled by
default, and their pure-Python source the reference that passes the same tests."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("env", "compiled"), [("1", False), ("", True), ("0", True)])
def test_environment_selects_the_compiled_modules_or_their_source(env: str, compiled: bool) -> None:
    """Every user gets the module ``aiocoloc.compiled.load`` picked: the
    transport's data path, the policy the transport spins with, the hub's bell."""
    code = (
        "import asyncio, sys, aiocoloc.transport as t\n"
        "from aiocoloc.notify import hub, spin, vfio_bells\n"
        "tr = t.SwitchableTransport(asyncio.new_event_loop(), asyncio.Protocol())\n"
        "for cls in (type(tr._core), spin.SpinPolicy, hub.HubBell):\n"
        "    m = sys.modules[cls.__module__]\n"
        "    print(m.COMPILED, m.__file__)\n"
        "print(vfio_bells.wake_listeners is sys.modules['aiocoloc.notify.waking'].wake_listeners)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "AIOCOLOC_NO_EXTENSIONS": env},
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout.split()
    assert len(out) == 7, out
    for flag, path in zip(out[0:6:2], out[1:6:2], strict=True):
        assert flag == str(compiled)
        assert path.endswith(".py") != compiled
    assert out[6] == "True"


def test_write_is_the_data_paths_own() -> None:
    """``transport.write`` is the data path's method itself: no Python call in
    between (what the compiled path saves on every write)."""
    from aiocoloc.transport import SwitchableTransport

    loop = asyncio.new_event_loop()
    try:
        transport = SwitchableTransport(loop, asyncio.Protocol())
        assert transport.write == transport._core.write
        assert repr(transport) == "<SwitchableTransport open tx=tcp rx=tcp>"
        transport.abort()
        assert transport.is_closing()
    finally:
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()


def test_the_reference_passes_the_transport_tests() -> None:
    """The pure-Python data path runs the transport's own suite and the write
    and life-cycle conformance tests, on both loops, every mode; the pure
    spin policy and hub bell their own tests."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_transport.py",
            "tests/conformance/test_writes.py",
            "tests/conformance/test_lifecycle.py",
            "tests/test_spin.py",
            # (Hubs between processes need the compiled atomics: these run in one.)
            "tests/test_hub.py::test_rings_coalesce_until_taken_wake_only_their_members_and_the_last_member_closes",
            "tests/test_hub.py::test_a_failing_member_costs_the_others_nothing",
        ],
        env={**os.environ, "AIOCOLOC_NO_EXTENSIONS": "1"},
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=110,
    )
    tail = "\n".join(result.stdout.splitlines()[-15:])
    assert result.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail, tail


class _KeepingReader(asyncio.StreamReader):
    """A StreamReader that keeps what it is fed (as a subclass may)."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds: set[type] = set()

    def feed_data(self, data: bytes) -> None:
        self.kinds.add(type(data))
        super().feed_data(data)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_streams_read_straight_from_the_pipe(loop_kind: str) -> None:
    """asyncio's own stream protocol is lent views of the pipe (it copies at
    once, one copy less); a protocol whose reader may keep what it gets is
    given bytes.  Both receive every byte, over runs of many slices."""
    import uvloop

    import aiocoloc

    from .test_connect import echo, upgraded

    payload = os.urandom(3 << 20)

    async def scenario() -> None:
        server = await aiocoloc.start_server(echo, "127.0.0.1", 0, upgrade="always")
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
            await upgraded(writer)
            assert writer.transport._core.lends  # type: ignore[attr-defined]
            writer.write(payload)
            assert await reader.readexactly(len(payload)) == payload
            writer.close()
            await writer.wait_closed()

            loop = asyncio.get_running_loop()
            keeping = _KeepingReader()
            transport, _ = await aiocoloc.create_connection(
                loop,
                lambda: asyncio.StreamReaderProtocol(keeping),
                "127.0.0.1",
                port,
                upgrade="always",
            )
            writer = asyncio.StreamWriter(transport, transport.get_protocol(), keeping, loop)  # type: ignore[arg-type]
            await upgraded(writer)
            assert not transport._core.lends  # type: ignore[attr-defined]
            writer.write(payload)
            assert await keeping.readexactly(len(payload)) == payload
            assert keeping.kinds == {bytes}
            writer.close()
            await writer.wait_closed()

    factory = uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(asyncio.wait_for(scenario(), 30))
