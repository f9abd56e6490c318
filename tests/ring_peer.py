"""One end of the two-process ring test: sends a seeded random stream through
one ring while reading the other, then prints a JSON summary (sha256 of what
it sent and of what it received).  Run by tests/test_ring_processes.py."""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import random
import sys
import time

import posix_ipc


def chunk_sizes(rng: random.Random, total: int, largest: int) -> list[int]:
    """Log-uniform sizes from 1 B to ``largest``: small chunks are common too."""
    sizes: list[int] = []
    left = total
    top = largest.bit_length() - 1
    while left:
        n = min(left, largest, int(2 ** rng.uniform(0, top)))
        sizes.append(n)
        left -= n
    return sizes


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("shm")
    parser.add_argument("--send-offset", type=int, required=True)
    parser.add_argument("--recv-offset", type=int, required=True)
    parser.add_argument("--ring-bytes", type=int, required=True)
    parser.add_argument("--bytes", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--impl", choices=["cython", "python"], default="cython")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()

    if args.impl == "python":
        from aiocoloc import _ring_py as ring
    else:
        from aiocoloc import _ring as ring  # type: ignore[no-redef]

    shm = posix_ipc.SharedMemory(args.shm)
    region = mmap.mmap(shm.fd, shm.size)
    shm.close_fd()
    view = memoryview(region)
    producer = ring.RingProducer(view[args.send_offset : args.send_offset + args.ring_bytes])
    consumer = ring.RingConsumer(view[args.recv_offset : args.recv_offset + args.ring_bytes])

    rng = random.Random(args.seed)
    sizes = chunk_sizes(rng, args.bytes, 1 << 20)
    sent, received = hashlib.sha256(), hashlib.sha256()
    sent_bytes = received_bytes = 0
    pending = memoryview(b"")
    read_buf = bytearray(1 << 20)
    send_done = recv_done = False
    idle = 0
    deadline = time.monotonic() + args.timeout
    while not (send_done and recv_done):
        progress = False
        if not send_done:
            if not pending:
                if sizes:
                    chunk = rng.randbytes(sizes.pop())
                    sent.update(chunk)
                    pending = memoryview(chunk)
                else:
                    producer.close()
                    send_done = True
            if pending:
                n = producer.write(pending)
                pending = pending[n:]
                sent_bytes += n
                progress = n > 0
        if not recv_done:
            how = rng.randrange(3)
            want = int(2 ** rng.uniform(0, 21))
            if how == 0:
                data = consumer.read(want)
                got = None if data is None else len(data)
                if data:
                    received.update(data)
            elif how == 1:
                got = consumer.readinto(memoryview(read_buf)[: min(want, len(read_buf))])
                if got:
                    received.update(memoryview(read_buf)[:got])
            else:
                peeked = consumer.peek(want)
                got = None if peeked is None else len(peeked)
                if peeked is not None:
                    received.update(peeked)
                    peeked.release()
                    consumer.consume(got)
            if got == 0:
                recv_done = True
            elif got:
                received_bytes += got
                progress = True
        if progress:
            idle = 0
            continue
        # Bounded, adaptive wait: spin briefly, then yield, then sleep.
        idle += 1
        if idle > 64:
            if time.monotonic() > deadline:
                print(
                    json.dumps({"error": "timeout", "sent": sent_bytes, "received": received_bytes})
                )
                return 1
            if idle > 256:
                time.sleep(min(1e-3, 1e-6 * (idle - 256)))
            else:
                os.sched_yield()

    result = {
        "sent_sha256": sent.hexdigest(),
        "received_sha256": received.hexdigest(),
        "sent": sent_bytes,
        "received": received_bytes,
    }
    producer.release()
    consumer.release()
    view.release()
    region.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
