"""Runs inside a QEMU guest: joins the pool on the ivshmem device and moves
bytes through pipes the host set up for it.

    guest_member.py echo          copy every byte of the pipe we consume into
                                  the pipe we produce, until EOF
    guest_member.py source N SEED send N seeded bytes, read them back, verify
"""

from __future__ import annotations

import hashlib
import random
import sys
import time

from aiocoloc.shm import IvshmemSegment, Pool

DEADLINE = time.monotonic() + 240


def wait_for_pipes(pool: Pool) -> tuple[object, object]:
    """Our two pipes, as the host creates them once it sees us join."""
    while time.monotonic() < DEADLINE:
        infos = pool.pipes()
        incoming = [i for i in infos if i.consumer == pool.slot]
        outgoing = [i for i in infos if i.producer == pool.slot]
        if incoming and outgoing:
            return pool.pipe_consumer(incoming[0].handle), pool.pipe_producer(outgoing[0].handle)
        time.sleep(0.05)
    raise SystemExit("GUEST: no pipes arrived")


def pause(idle: int) -> None:
    time.sleep(0 if idle < 100 else 0.001)


def echo(consumer: object, producer: object) -> int:
    moved = idle = 0
    while time.monotonic() < DEADLINE:
        data = consumer.read(1 << 16)  # type: ignore[attr-defined]
        if data is None:
            idle += 1
            pause(idle)
            continue
        if not data:
            producer.close()  # type: ignore[attr-defined]
            return moved
        idle = 0
        view = memoryview(data)
        while view:
            n = producer.write(view)  # type: ignore[attr-defined]
            view = view[n:]
            if not n:
                pause(100)
        moved += len(data)
    raise SystemExit("GUEST: echo timed out")


def source(consumer: object, producer: object, total: int, seed: int) -> str:
    payload = random.Random(seed).randbytes(total)
    sent = 0
    back = hashlib.sha256()
    received = 0
    while time.monotonic() < DEADLINE:
        if sent < total:
            sent += producer.write(payload[sent : sent + 65536])  # type: ignore[attr-defined]
            if sent == total:
                producer.close()  # type: ignore[attr-defined]
        data = consumer.read()  # type: ignore[attr-defined]
        if data:
            back.update(data)
            received += len(data)
        elif data == b"":
            break
        elif sent == total:
            pause(100)
    if received != total or back.digest() != hashlib.sha256(payload).digest():
        raise SystemExit(f"GUEST: echo mismatch ({received} of {total} bytes)")
    return back.hexdigest()


def main() -> int:
    segment = IvshmemSegment.open()
    print(f"GUEST: {segment.identity} BAR2 of {segment.size} bytes", flush=True)
    pool = Pool.attach(segment, timeout=60)
    print(f"GUEST: joined pool {pool.id} as member {pool.slot}", flush=True)
    consumer, producer = wait_for_pipes(pool)
    if sys.argv[1] == "echo":
        moved = echo(consumer, producer)
        print(f"GUEST: echoed {moved} bytes", flush=True)
    else:
        digest = source(consumer, producer, int(sys.argv[2]), int(sys.argv[3]))
        print(f"GUEST: round trip ok {digest}", flush=True)
    consumer.release()  # type: ignore[attr-defined]
    producer.release()  # type: ignore[attr-defined]
    pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
