"""A hostile or broken control endpoint, driven by hypothesis: whatever it
sends (well-formed frames with nonsense in them, descriptors of every kind,
raw garbage, silence, a hang-up), the client's connection stays on TCP with a
reason, moves its bytes intact, never hangs, and leaks nothing."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import aiocoloc
from aiocoloc.connect import policy
from aiocoloc.connect.colocation import local_pools
from aiocoloc.control import encode_frame
from aiocoloc.shm import MemfdSegment
from aiocoloc.transport import fallback

from .conftest import FUZZ_SCALE, open_fds
from .test_connect import FakeControl, fell_back, recv_message, roundtrip
from .test_transport import run

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.binary(max_size=40),
    st.text(max_size=20),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=8)
ops = st.sampled_from(
    ["pool", "pipes", "ready", "refuse", "hello", "join", "proof", "switch", "bell", "x"]
)
frames = st.builds(
    lambda op, fields, version: {**fields, "op": op, **({"version": version} if version else {})},
    ops,
    st.dictionaries(
        st.sampled_from(
            ["pool", "up", "down", "nonce", "reason", "slot", "detail", "hub", "ready"]
        ),
        values,
        max_size=4,
    ),
    st.sampled_from([None, 1, 2]),
)
fd_kinds = st.lists(st.sampled_from(["pipe", "memfd", "eventfd", "unsealed"]), max_size=3)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("frame"), frames, fd_kinds),
        st.tuples(st.just("raw"), st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("read")),
        st.tuples(st.just("sleep"), st.floats(min_value=0, max_value=0.05)),
        st.tuples(st.just("close")),
    ),
    max_size=6,
)


def _descriptor(kind: str, keep: list[int]) -> int:
    if kind == "pipe":
        r, w = os.pipe()
        keep += [r, w]
        return r
    if kind == "eventfd":
        fd = os.eventfd(0)
        keep.append(fd)
        return fd
    if kind == "unsealed":
        fd = os.memfd_create("not-sealed")
        os.ftruncate(fd, 1 << 20)
        keep.append(fd)
        return fd
    segment = MemfdSegment.create(1 << 20)  # sealed, but no pool in it
    fd = os.dup(segment.fd)
    segment.close()
    keep.append(fd)
    return fd


async def _play(script: list[Any], sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    keep: list[int] = []
    try:
        for step in script:
            if step[0] == "frame":
                frame = encode_frame(step[1])
                fds = [_descriptor(kind, keep) for kind in step[2]]
                if fds:
                    socket.send_fds(sock, [frame], fds)
                else:
                    await loop.sock_sendall(sock, frame)
            elif step[0] == "raw":
                await loop.sock_sendall(sock, step[1])
            elif step[0] == "read":
                await recv_message(sock)
            elif step[0] == "sleep":
                await asyncio.sleep(step[1])
            else:
                return
        await asyncio.sleep(3600)
    except (ConnectionError, OSError):
        pass
    finally:
        for fd in keep:
            os.close(fd)


@settings(max_examples=60 * FUZZ_SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=steps, warm=st.booleans())
@example(script=[("frame", {"op": "pipes"}, ["pipe"])], warm=False)  # fds with the wrong message
@example(script=[("frame", {"op": "pool", "version": 1, "pool": "p"}, ["memfd"])], warm=False)
@example(script=[("frame", {"op": "pool", "version": 1, "pool": "p"}, ["unsealed"])], warm=False)
@example(
    script=[("frame", {"op": "pool", "version": 1, "pool": "p"}, ["memfd", "pipe"])], warm=False
)
@example(script=[("read",), ("raw", b"\xff\xff\xff\xff")], warm=False)  # a frame too long
@example(script=[("read",), ("close",)], warm=False)
@example(script=[], warm=False)  # silence
# An advertised pool we have open: the client offers it in its hello.
@example(
    script=[("read",), ("frame", {"op": "pipes", "up": [0, 1], "down": [1, 1]}, ["eventfd"])],
    warm=True,
)
@example(script=[("read",), ("frame", {"op": "pipes", "nonce": b"x" * 16}, [])], warm=True)
# Settled at "pipes" (ready) although we proved nothing over our hub.
@example(
    script=[
        ("read",),
        (
            "frame",
            {
                "op": "pipes",
                "up": [0, 1],
                "down": [1, 1],
                "nonce": b"x" * 16,
                "hub": True,
                "ready": True,
            },
            [],
        ),
    ],
    warm=True,
)
# Our hub offer taken (or asked for) by an endpoint that then fails us.
@example(
    script=[("read",), ("frame", {"op": "pipes", "up": [0, 1], "down": [1, 1], "hub": True}, [])],
    warm=True,
)
@example(
    script=[("read",), ("frame", {"op": "pipes", "hub": False}, ["eventfd"])],
    warm=True,
)
@example(
    script=[("read",), ("frame", {"op": "pipes", "nonce": b"x" * 16, "hub": False}, [])],
    warm=True,
)
@example(
    script=[("read",), ("frame", {"op": "pool", "version": 1, "pool": "p"}, ["memfd"])], warm=True
)
def test_any_control_endpoint_leaves_a_working_tcp_connection(
    script: list[Any], warm: bool
) -> None:
    policy.reset()
    aiocoloc.configure(upgrade="always", handshake_timeout=0.3)

    async def behave(sock: socket.socket) -> None:
        await _play(script, sock)

    async def scenario() -> None:
        pool = local_pools().serving(policy.MIN_POOL_SIZE) if warm else None
        fake = FakeControl(behave, pool=str(pool.id) if pool is not None else None)
        port = await fake.start()
        try:
            reader, writer = await aiocoloc.open_connection("127.0.0.1", port)
            await roundtrip(reader, writer, 20_000)
            reason = await fell_back(writer)
            assert reason in fallback.REASONS
            assert writer.transport.get_extra_info("aiocoloc")["mode"] == "tcp"
            await roundtrip(reader, writer, 50_000)
            writer.close()
            await writer.wait_closed()
        finally:
            await fake.close()
        if pool is not None:
            assert pool.stats()["pipes"] == 0  # nothing created in it stays behind
            local_pools().release(pool)
        assert local_pools().in_use() == {}
        local_pools().close_idle()

    fds = open_fds()
    run("asyncio", scenario, timeout=10)
    assert open_fds() <= fds, sorted(open_fds() - fds)
