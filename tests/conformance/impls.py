"""The implementations under test, and a connected pair for each.

A test class is a behaviour mixin plus one of these: ``run`` runs a
scenario on the implementation's loop, ``connect`` builds a connected pair
of transports, ``create_server``/``create_connection``/``start_server``/
``open_connection`` are the entry points a user would call.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import uvloop

import aiocoloc

from ..transport_pair import Pair, Recorder, make_pair, tcp_socket_pair

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
Factory = Callable[[], asyncio.BaseProtocol]


class Conn:
    """A connected pair: ``client``/``server`` transports and their protocols."""

    def __init__(
        self,
        client: Any,
        client_protocol: Any,
        server: Any,
        server_protocol: Any,
        pair: Pair | None = None,
        switch_midway: bool = False,
    ) -> None:
        self.client, self.client_protocol = client, client_protocol
        self.server, self.server_protocol = server, server_protocol
        self._pair = pair
        self._switch_midway = switch_midway

    async def midway(self) -> None:
        """The "switched" implementation moves both directions to shared
        memory here (tests call it after some traffic); the others do nothing."""
        if not self._switch_midway:
            return
        for t in (self.client, self.server):
            if not t.is_closing() and not t.tx_finished:
                t.switch_tx("shm")
        await asyncio.sleep(0.01)  # the acknowledgements come back

    async def aclose(self) -> None:
        """Abort what is left; over shared memory, check the pipes were given back."""
        for t in (self.client, self.server):
            t.abort()
        for _ in range(5):
            await asyncio.sleep(0)
        if self._pair is not None and self._pair.pool is not None:
            pool = self._pair.pool
            assert pool.stats()["slices_used"] == 0, "the connection's pipes were not given back"
            pool.close()


#: README, "Differences from asyncio/uvloop": after abort(), uvloop's transport
#: still counts the bytes it dropped in get_write_buffer_size(); what our pipe
#: could not take is dropped and no longer counted (0, as asyncio says).
ABORT_EMPTIES_BUFFER = "abort-empties-buffer"
#: README: over shared memory the TCP socket (and the control channel) stay
#: watched while the protocol paused reading, so a peer's reset or death is
#: reported at once; the loop's transport notices it only when reading again.
NOTICES_RESET_WHILE_PAUSED = "notices-reset-while-paused"
#: README: writes dropped after close over shared memory are counted and
#: warned about as asyncio does, on the "aiocoloc.transport" logger.
WARNS_ON_OWN_LOGGER = "warns-on-own-logger"


class Impl:
    """An implementation of the transport contract on one loop.  As is, the
    loop's own TCP transport: the reference the tests' expectations follow."""

    LOOP: ClassVar[str]
    #: aiocoloc's mode: "tcp", "shm" or "switched" (None for the reference).
    MODE: ClassVar[str | None] = None
    #: Documented differences (README, "Differences from asyncio/uvloop").
    DIFFERENCES: ClassVar[frozenset[str]] = frozenset()

    @property
    def uvloop(self) -> bool:
        return self.LOOP == "uvloop"

    @property
    def default_limits(self) -> tuple[int, int]:
        """A new transport's (low, high) write buffer limits: uvloop's low
        mark is 16 bytes (FLOW_CONTROL_HIGH_WATER // 4, missing "* 1024")."""
        return (16, 64 * 1024) if self.uvloop else (16 * 1024, 64 * 1024)

    def differs(self, name: str) -> bool:
        """True if this implementation has the documented difference ``name``."""
        return name in self.DIFFERENCES

    def run(self, scenario: Callable[[], Awaitable[Any]], timeout: float = 20) -> Any:
        with asyncio.Runner(loop_factory=LOOPS[self.LOOP]) as runner:
            return runner.run(asyncio.wait_for(scenario(), timeout))

    async def connect(self, client: Factory = Recorder, server: Factory = Recorder) -> Conn:
        """A connected pair over loopback TCP; both ``connection_made`` done."""
        loop = asyncio.get_running_loop()
        csock, ssock = tcp_socket_pair()
        ct, cp = await loop.connect_accepted_socket(client, sock=csock)
        st, sp = await loop.connect_accepted_socket(server, sock=ssock)
        await asyncio.sleep(0)
        return Conn(ct, cp, st, sp)

    async def create_server(self, factory: Factory, *args: Any, **kw: Any) -> Any:
        return await asyncio.get_running_loop().create_server(factory, *args, **kw)

    async def create_connection(self, factory: Factory, *args: Any, **kw: Any) -> Any:
        return await asyncio.get_running_loop().create_connection(factory, *args, **kw)

    async def start_server(self, cb: Any, *args: Any, **kw: Any) -> Any:
        return await asyncio.start_server(cb, *args, **kw)

    async def open_connection(self, *args: Any, **kw: Any) -> Any:
        return await asyncio.open_connection(*args, **kw)


class AsyncioTCP(Impl):
    LOOP = "asyncio"


class UvloopTCP(Impl):
    LOOP = "uvloop"


class Coloc(Impl):
    """aiocoloc's ``SwitchableTransport`` (pairs from ``transport_pair``) and
    its drop-in entry points, on ``LOOP``."""

    MODE = "tcp"
    #: The entry points' upgrade policy per mode: never leave TCP, upgrade at
    #: once, or the default (after some traffic: mid-connection).
    UPGRADE: ClassVar[dict[str, str]] = {"tcp": "never", "shm": "always", "switched": "auto"}

    async def connect(self, client: Factory = Recorder, server: Factory = Recorder) -> Conn:
        pair = await make_pair(client, server, shm=self.MODE != "tcp")
        await asyncio.sleep(0)
        if self.MODE == "shm":
            pair.client.switch_tx("shm")
            pair.server.switch_tx("shm")
            await asyncio.sleep(0.01)
        return Conn(
            pair.client,
            pair.client_protocol,
            pair.server,
            pair.server_protocol,
            pair,
            switch_midway=self.MODE == "switched",
        )

    async def create_server(self, factory: Factory, *args: Any, **kw: Any) -> Any:
        loop = asyncio.get_running_loop()
        kw.setdefault("upgrade", self.UPGRADE[str(self.MODE)])
        return await aiocoloc.create_server(loop, factory, *args, **kw)

    async def create_connection(self, factory: Factory, *args: Any, **kw: Any) -> Any:
        loop = asyncio.get_running_loop()
        kw.setdefault("upgrade", self.UPGRADE[str(self.MODE)])
        return await aiocoloc.create_connection(loop, factory, *args, **kw)

    async def start_server(self, cb: Any, *args: Any, **kw: Any) -> Any:
        kw.setdefault("upgrade", self.UPGRADE[str(self.MODE)])
        return await aiocoloc.start_server(cb, *args, **kw)

    async def open_connection(self, *args: Any, **kw: Any) -> Any:
        kw.setdefault("upgrade", self.UPGRADE[str(self.MODE)])
        return await aiocoloc.open_connection(*args, **kw)


class ColocAsyncioTCP(Coloc):
    LOOP = "asyncio"


class ColocAsyncioSHM(Coloc):
    LOOP, MODE = "asyncio", "shm"
    DIFFERENCES = frozenset({NOTICES_RESET_WHILE_PAUSED, WARNS_ON_OWN_LOGGER})


class ColocAsyncioSwitched(Coloc):
    LOOP, MODE = "asyncio", "switched"
    DIFFERENCES = frozenset({NOTICES_RESET_WHILE_PAUSED, WARNS_ON_OWN_LOGGER})


class ColocUvloopTCP(Coloc):
    LOOP = "uvloop"


class ColocUvloopSHM(Coloc):
    LOOP, MODE = "uvloop", "shm"
    DIFFERENCES = frozenset({ABORT_EMPTIES_BUFFER, NOTICES_RESET_WHILE_PAUSED})


class ColocUvloopSwitched(Coloc):
    LOOP, MODE = "uvloop", "switched"
    DIFFERENCES = frozenset({ABORT_EMPTIES_BUFFER, NOTICES_RESET_WHILE_PAUSED})


def reset(transport: Any) -> None:
    """Close ``transport`` with a TCP reset (SO_LINGER 0), as a crashed peer does."""
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    transport.abort()


__all__ = [
    "ABORT_EMPTIES_BUFFER",
    "LOOPS",
    "NOTICES_RESET_WHILE_PAUSED",
    "WARNS_ON_OWN_LOGGER",
    "AsyncioTCP",
    "ColocAsyncioSHM",
    "ColocAsyncioSwitched",
    "ColocAsyncioTCP",
    "ColocUvloopSHM",
    "ColocUvloopSwitched",
    "ColocUvloopTCP",
    "Conn",
    "Impl",
    "Recorder",
    "UvloopTCP",
    "reset",
]
