"""Runs inside a QEMU guest with an ivshmem-doorbell device: ping-pong with the
other guest through doorbell interrupts (``IvshmemVfio``), then through 1-byte
messages on a TCP connection over the guest link, and report the round trips.

    guest_doorbell.py a|b ADDR PORT ROUNDS

Guest ``a`` drives: it listens on ADDR:PORT and prints one line
``GUEST_RESULT {json}`` with p50/p99 round trips in microseconds.  Guest ``b``
answers: it connects to ADDR:PORT once the doorbell rounds are over.

BAR2 layout (8-byte words): each guest writes ``MAGIC << 32 | IVPosition`` in
its slot; ``a`` writes a round's number in PING and rings, ``b`` copies it to
PONG and rings back.  The numbers make a duplicate or late ring harmless, and a
ring that got lost (rings to a peer not yet listening are dropped) is repeated
by a watchdog.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable

from aiocoloc.notify.vfio import IvshmemVfio

MAGIC = 0x1F5E_D00B
SLOT = {"a": 0, "b": 8}  # word index of each guest's position: separate cache lines
PING, PONG = 16, 24
DONE = (1 << 63) - 1
WARMUP = 5
DEADLINE = time.monotonic() + 240

Accepted = asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]]


class Bell:
    """Our doorbell vector as an asyncio event (the eventfd is drained on each wake)."""

    def __init__(self, device: IvshmemVfio) -> None:
        self.device = device
        self.event = asyncio.Event()
        self.wakeups = 0
        asyncio.get_running_loop().add_reader(device.listen_fd(), self._rung)

    def _rung(self) -> None:
        self.wakeups += self.device.drain()
        self.event.set()

    async def until(self, words: memoryview, index: int, value: int) -> None:
        """Sleep on the doorbell until ``words[index] == value`` (checked after every wake)."""
        while words[index] != value:
            await self.event.wait()
            self.event.clear()

    async def wake(self) -> None:
        """Sleep until rung."""
        await self.event.wait()
        self.event.clear()

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.device.listen_fd())


async def peer_position(words: memoryview, role: str) -> int:
    other = "b" if role == "a" else "a"
    while (words[SLOT[other]] >> 32) != MAGIC:
        if time.monotonic() > DEADLINE:
            raise TimeoutError("the other guest never wrote its position")
        await asyncio.sleep(0.01)
    return int(words[SLOT[other]] & 0xFFFF)


async def with_watchdog(
    work: Awaitable[None], progress: Callable[[], int], nudge: Callable[[], None]
) -> None:
    """Run ``work``; whenever ``progress()`` stands still for 0.5 s, ``nudge()``."""
    task = asyncio.ensure_future(work)
    last = -1
    while not task.done():
        await asyncio.wait([task], timeout=0.5)
        if not task.done() and progress() == last:
            nudge()
        last = progress()
        if time.monotonic() > DEADLINE:
            task.cancel()
    await task


def summary(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)

    def micros(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000, 1)

    return {"p50": micros(0.5), "p99": micros(0.99), "min": micros(0.0)}


async def drive(
    device: IvshmemVfio, words: memoryview, peer: int, bell: Bell, rounds: int
) -> tuple[list[int], int]:
    """Guest a: ``rounds`` doorbell round trips after a warm-up; (samples, re-rings)."""
    samples: list[int] = []
    current = [0]
    rerings = [0]

    def nudge() -> None:
        rerings[0] += 1
        device.ring(peer)

    async def rounds_loop() -> None:
        for n in [*range(1, WARMUP + rounds + 1), DONE]:
            current[0] = n
            words[PING] = n
            started = time.perf_counter_ns()
            device.ring(peer)
            await bell.until(words, PONG, n)
            if WARMUP < n <= WARMUP + rounds:
                samples.append(time.perf_counter_ns() - started)

    await with_watchdog(rounds_loop(), lambda: current[0], nudge)
    return samples, rerings[0]


async def answer(device: IvshmemVfio, words: memoryview, peer: int, bell: Bell) -> None:
    """Guest b: copy PING to PONG and ring back, until PING says DONE.

    Every wake is answered, a repeated one too: a's watchdog re-rings when a
    ring got lost either way."""
    while True:
        await bell.wake()
        seq = words[PING]
        if seq:
            words[PONG] = seq
            device.ring(peer)
        if seq == DONE:
            return


async def tcp_drive(accepted: Accepted, rounds: int) -> list[int]:
    """1-byte round trips on the connection b makes; the samples (ns)."""
    reader, writer = await accepted
    samples = []
    for n in range(WARMUP + rounds):
        started = time.perf_counter_ns()
        writer.write(b"x")
        await reader.readexactly(1)
        if n >= WARMUP:
            samples.append(time.perf_counter_ns() - started)
    writer.close()
    return samples


async def tcp_answer(addr: str, port: int) -> int:
    """Connect to a (retrying until it listens) and echo until EOF; bytes echoed."""
    while True:
        try:
            reader, writer = await asyncio.open_connection(addr, port)
            break
        except OSError:
            if time.monotonic() > DEADLINE:
                raise
            await asyncio.sleep(0.1)
    answered = 0
    while byte := await reader.read(1):
        writer.write(byte)
        answered += 1
    writer.close()
    return answered


def publish_position(device: IvshmemVfio, words: memoryview, role: str) -> None:
    """Write our IVPosition into our slot, checking that the ``Segment`` a Pool
    would attach to maps the same BAR2."""
    words[SLOT[role]] = MAGIC << 32 | device.position
    at = 8 * SLOT[role]
    with device.segment() as segment, segment.map() as view:
        assert int.from_bytes(view[at : at + 8], "little") == words[SLOT[role]]


async def run_a(addr: str, port: int, rounds: int) -> dict[str, object]:
    """Drive both ping-pongs; the result line's fields."""
    loop = asyncio.get_running_loop()
    accepted: Accepted = loop.create_future()

    def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not accepted.done():
            accepted.set_result((reader, writer))

    # Listen before anything else: b connects once the doorbell rounds are over.
    server = await asyncio.start_server(on_connection, addr, port)
    with IvshmemVfio.open() as device:
        words = memoryview(device.shm).cast("Q")
        publish_position(device, words, "a")
        peer = await peer_position(words, "a")
        print(f"GUEST: {device.address} position {device.position}, peer {peer}", flush=True)
        bell = Bell(device)
        try:
            doorbell, rerings = await drive(device, words, peer, bell, rounds)
        finally:
            bell.close()
            words.release()
    left = max(1.0, DEADLINE - time.monotonic())
    tcp = await asyncio.wait_for(tcp_drive(accepted, rounds), left)
    server.close()
    return {
        "rounds": rounds,
        "doorbell_us": summary(doorbell),
        "tcp_us": summary(tcp),
        "rerings": rerings,
    }


async def run_b(addr: str, port: int) -> None:
    """Answer both ping-pongs."""
    with IvshmemVfio.open() as device:
        words = memoryview(device.shm).cast("Q")
        publish_position(device, words, "b")
        peer = await peer_position(words, "b")
        print(f"GUEST: {device.address} position {device.position}, peer {peer}", flush=True)
        bell = Bell(device)
        try:
            await answer(device, words, peer, bell)
        finally:
            bell.close()
            words.release()
        wakeups = bell.wakeups
    answered = await tcp_answer(addr, port)
    print(f"GUEST: answered doorbells ({wakeups} wake-ups) and {answered} TCP messages", flush=True)


if __name__ == "__main__":
    role, addr, port, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if role == "a":
        print("GUEST_RESULT " + json.dumps(asyncio.run(run_a(addr, port, rounds))), flush=True)
    else:
        asyncio.run(run_b(addr, port))
