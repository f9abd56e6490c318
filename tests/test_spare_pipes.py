"""Pipes made ahead: a resting hub keeps its next connection's pipes
(``aiocoloc.connect.spare_pipes``), and gives them back when it closes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

import aiocoloc
from aiocoloc.connect import handshake
from aiocoloc.connect.colocation import local_pools
from aiocoloc.connect.spare_pipes import SparePipes
from aiocoloc.notify import hub
from aiocoloc.notify.hub import Hub
from aiocoloc.shm import Pool

from .conftest import open_fds
from .test_connect import echo, roundtrip, until, upgraded
from .test_hub import _proved_once
from .test_transport import LOOPS, run


@pytest.fixture(params=list(LOOPS))
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=[60.0])
def lingering(request: pytest.FixtureRequest) -> Iterator[None]:
    """Hubs rest ``param`` seconds; none is left open after the test, nor
    any descriptor."""
    before = open_fds()
    aiocoloc.configure(hub_linger=request.param)
    yield
    hub.close_resting_hubs()
    local_pools().close_idle()
    assert open_fds() <= before, sorted(open_fds() - before)


@pytest.fixture
def pipes_made(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the handshakes that made their own pipes (the client's slot each)."""
    made: list[int] = []
    original = handshake._make_pipes

    async def counted(agreement: Any, hello: Any, pool: Pool) -> tuple[int, bool]:
        result = await original(agreement, hello, pool)
        made.append(result[0])
        return result

    monkeypatch.setattr(handshake, "_make_pipes", counted)
    return made


async def _close(*connections: Any) -> None:
    for _, writer in connections:
        writer.close()
        await writer.wait_closed()


async def _spare_made(theirs: Hub) -> SparePipes:
    await until(lambda: theirs.resting and theirs.spare is not None, "the resting hub's pipes")
    spare = theirs.spare
    assert isinstance(spare, SparePipes)
    return spare


async def _connect(server: Any) -> Any:
    port = server.sockets[0].getsockname()[1]
    streams = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
    await upgraded(streams[1])
    await roundtrip(*streams, 100_000)
    return streams


def test_the_next_connection_over_a_resting_hub_takes_its_pipes(
    loop_kind: str, lingering: None, pipes_made: list[int]
) -> None:
    """The first connection makes its pipes; a hub keeps a pair only while it
    rests; the next connection takes that pair instead of making its own;
    closing the server gives the pair back."""

    async def scenario() -> None:
        server = await aiocoloc.start_server(echo, "127.0.0.1", 0)
        async with server:
            first, _, theirs, pool = await _proved_once(server)
            assert pipes_made == [pool.slot] and theirs.spare is None  # not while busy
            await _close(first)
            spare = await _spare_made(theirs)
            assert (spare.pool, spare.client) == (pool, pool.slot)
            await until(lambda: pool.stats()["pipes"] == 2, "only the pair to stay")
            second = await _connect(server)
            assert pipes_made == [pool.slot] and theirs.spare is None  # taken, not made
            assert {p.handle for p in pool.pipes()} == {spare.receive, spare.send}
            await _close(second)
            await _spare_made(theirs)  # the next pair
            assert pipes_made == [pool.slot]
        assert theirs.closed and theirs.spare is None  # given back with the endpoint
        await until(lambda: pool.closed or pool.stats()["pipes"] == 0, "the pair to go")

    run(loop_kind, scenario)


def test_a_pair_whose_pipes_are_gone_is_not_used(
    loop_kind: str, lingering: None, pipes_made: list[int]
) -> None:
    """(As when the client's slot was reclaimed meanwhile.)"""

    async def scenario() -> None:
        server = await aiocoloc.start_server(echo, "127.0.0.1", 0)
        async with server:
            first, _, theirs, pool = await _proved_once(server)
            await _close(first)
            spare = await _spare_made(theirs)
            pool.destroy_pipe(spare.send)
            second = await _connect(server)
            assert pipes_made == [pool.slot, pool.slot]  # it made its own
            await until(lambda: pool.stats()["pipes"] == 2, "the stale pair to go")
            await _close(second)

    run(loop_kind, scenario)


def test_no_pair_is_made_in_a_pool_more_than_half_full(
    loop_kind: str, lingering: None, pipes_made: list[int]
) -> None:
    async def scenario() -> None:
        server = await aiocoloc.start_server(echo, "127.0.0.1", 0)
        async with server:
            first, _, theirs, pool = await _proved_once(server)
            most = pool.geometry.max_slices_per_pipe
            filler = []
            while 2 * pool.free_slice_count() >= pool.geometry.slice_count:
                filler.append(pool.create_pipe(pool.slot, pool.slot, initial=most, max_slices=most))
            try:
                await _close(first)
                await until(lambda: theirs.resting, "the hub to rest")
                await asyncio.sleep(0.05)
                assert theirs.spare is None
                second = await _connect(server)  # the handshake makes its own
                assert pipes_made == [pool.slot, pool.slot]
                await _close(second)
            finally:
                for handle in filler:
                    pool.destroy_pipe(handle)

    run(loop_kind, scenario)


@pytest.mark.parametrize("lingering", [0.2], indirect=True)
def test_the_pair_goes_when_the_hub_closes_after_its_linger(
    loop_kind: str, lingering: None
) -> None:

    async def scenario() -> None:
        server = await aiocoloc.start_server(echo, "127.0.0.1", 0)
        async with server:
            first, ours, theirs, pool = await _proved_once(server)
            await _close(first)
            await _spare_made(theirs)
            await until(lambda: theirs.closed and ours.closed, "both hubs to close")
            assert theirs.spare is None
            assert pool.stats()["pipes"] == 0

    run(loop_kind, scenario)
