"""What a server holds: a pool takes as many upgraded connections as its pipe
table has room for (1024 by default; 64 in a small pool here), then the
server opens another, even when they all arrive at
once; with every pool it may open full, the others stay on TCP with
``pool exhausted`` and work; closed connections make room for new ones."""

from __future__ import annotations

import asyncio
import collections

import pytest

import aiocoloc
from aiocoloc.connect import colocation
from aiocoloc.shm import PoolConfig
from aiocoloc.transport import fallback

from .test_connect import echo, info, no_pools_in_use, roundtrip, until
from .test_transport import run

#: A serving pool made small for these tests: its pipe table holds 64 connections.
SMALL_POOL = PoolConfig(slice_size=16384, max_members=128, max_pipes=128)
CAPACITY = SMALL_POOL.max_pipes // 2
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def settled(streams: list[Streams]) -> bool:
    return all(
        info(w)["mode"] == "shm" or info(w)["fallback_reason"] is not None for _, w in streams
    )


def outcomes(streams: list[Streams]) -> collections.Counter[str]:
    return collections.Counter(
        "shm" if info(w)["mode"] == "shm" else str(info(w)["fallback_reason"]) for _, w in streams
    )


async def bursts(port: int) -> list[Streams]:
    """300 connections opened in bursts of 50, once each is on shm or fell back."""
    streams: list[Streams] = []
    for _ in range(6):
        streams += await asyncio.gather(
            *(aiocoloc.open_connection("127.0.0.1", port, upgrade="always") for _ in range(50))
        )
    await until(lambda: settled(streams), "every connection upgraded or fell back", 30)
    return streams


def test_the_default_pool_holds_1024_connections_and_2048_idle_ones_fit_64_mib() -> None:
    config = colocation.SERVING_POOL
    assert config.max_pipes // 2 == 1024
    assert (64 << 20) // (2 * config.slice_size) >= 2048  # an idle pipe keeps one slice


def test_a_server_opens_another_pool_when_one_is_full_even_under_a_burst(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(colocation, "SERVING_POOL", SMALL_POOL)

    async def scenario() -> None:
        server = await aiocoloc.start_server(echo, "127.0.0.1", 0, backlog=512)
        port = server.sockets[0].getsockname()[1]
        streams = await bursts(port)
        assert outcomes(streams) == {"shm": 300}
        pools = collections.Counter(info(w)["pool"] for _, w in streams)
        assert sorted(pools.values()) == [300 % CAPACITY] + [CAPACITY] * (300 // CAPACITY)
        await roundtrip(*streams[-1], 100_000)
        for _, writer in streams:
            writer.close()
            await writer.wait_closed()
        server.close()
        await server.wait_closed()
        await until(lambda: not colocation.local_pools().in_use(), "pools released")
        no_pools_in_use()

    run("asyncio", scenario, timeout=90)


def test_with_every_pool_full_connections_stay_on_tcp_and_closing_makes_room(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(colocation, "SERVING_POOL", SMALL_POOL)
    monkeypatch.setattr(colocation, "MAX_SERVING_POOLS", 1)

    async def scenario() -> None:
        server = await aiocoloc.start_server(echo, "127.0.0.1", 0, backlog=512)
        port = server.sockets[0].getsockname()[1]
        streams = await bursts(port)
        assert outcomes(streams) == {"shm": CAPACITY, fallback.POOL_EXHAUSTED: 300 - CAPACITY}
        left_out = [s for s in streams if info(s[1])["mode"] == "tcp"]
        await roundtrip(*left_out[0], 100_000)  # plain TCP, working
        # Closing some upgraded connections makes room for new ones.
        upgraded = [s for s in streams if info(s[1])["mode"] == "shm"]
        for _, writer in upgraded[:10]:
            writer.close()
            await writer.wait_closed()
        await asyncio.sleep(0.1)  # the server side closes its ends too
        more = [
            await aiocoloc.open_connection("127.0.0.1", port, upgrade="always") for _ in range(10)
        ]
        await until(lambda: settled(more), "the new connections upgraded", 10)
        assert outcomes(more) == {"shm": 10}
        await roundtrip(*more[0], 100_000)
        for _, writer in upgraded[10:] + left_out + more:
            writer.close()
            await writer.wait_closed()
        server.close()
        await server.wait_closed()
        await until(lambda: not colocation.local_pools().in_use(), "pools released")
        no_pools_in_use()

    run("asyncio", scenario, timeout=90)
