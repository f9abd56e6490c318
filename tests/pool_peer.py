"""A pool member in its own process, for the multi-process pool tests.

pool_peer.py join NAME SIZE LEASE         open_posix, report, wait for EOF on stdin
pool_peer.py hold-slices NAME PIPES       attach, create self-pipes, report, sleep
pool_peer.py hold-lock NAME               attach, take the allocator lock, report, sleep
pool_peer.py consume NAME                 report our slot, read "SLOT GENERATION" of a
                                          pipe on stdin, consume it to EOF, report sha256
pool_peer.py memfd FD                     attach a memfd pool from an inherited fd
pool_peer.py hostile-lock FD              attach a memfd pool, take the allocator lock and
                                          keep bumping its acquisition counter (defeating
                                          the take-over) until stdin closes; then leave
"""

from __future__ import annotations

import hashlib
import json
import select
import sys
import time

from aiocoloc.shm import MemfdSegment, PipeHandle, Pool, PoolConfig, PosixShmSegment
from aiocoloc.shm.atomic import SharedWords
from aiocoloc.shm.layout import H_LOCK_COUNT


def report(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def main(argv: list[str]) -> int:
    command = argv[0]
    if command == "join":
        name, size, lease = argv[1], int(argv[2]), float(argv[3])
        pool = Pool.open_posix(name, size, PoolConfig(lease=lease, slice_size=4096))
        report(id=str(pool.id), slot=pool.slot, created=pool.segment.created)  # type: ignore[attr-defined]
        sys.stdin.read()
        report(members=len(pool.members()))
        pool.close()
        return 0
    if command == "memfd":
        pool = Pool.attach(MemfdSegment.from_fd(int(argv[1])))
        report(id=str(pool.id), slot=pool.slot, members=len(pool.members()))
        sys.stdin.read()
        pool.close()
        return 0
    if command == "hostile-lock":
        pool = Pool.attach(MemfdSegment.from_fd(int(argv[1])))
        region = pool.segment.map()  # our own view, to poke the header as a hostile peer would
        words = SharedWords(region)
        with pool.locked():
            report(slot=pool.slot, locked=True)
            while not select.select([sys.stdin], [], [], 0.01)[0]:
                words.add64(H_LOCK_COUNT, 1)  # "a new acquisition": no take-over
        words.release()
        region.close()
        pool.close()
        return 0
    pool = Pool.attach(PosixShmSegment.attach(argv[1]))
    if command == "hold-slices":
        handles = [
            pool.create_pipe(pool.slot, pool.slot, min_slices=2) for _ in range(int(argv[2]))
        ]
        report(
            slot=pool.slot,
            pipes=[[h.slot, h.generation] for h in handles],
            used=pool.stats()["slices_used"],
        )
        time.sleep(600)
    elif command == "hold-lock":
        with pool.locked():
            report(slot=pool.slot, locked=True)
            time.sleep(600)
    elif command == "consume":
        report(slot=pool.slot)
        slot, generation = map(int, sys.stdin.readline().split())
        consumer = pool.pipe_consumer(PipeHandle(slot, generation))
        digest, total, idle = hashlib.sha256(), 0, 0
        while True:
            view = consumer.peek()
            if view is None:
                idle += 1
                time.sleep(0) if idle < 1000 else time.sleep(0.0005)
                continue
            if not len(view):
                view.release()
                break
            idle = 0
            digest.update(view)
            n = len(view)
            view.release()
            consumer.consume(n)
            total += n
        report(sha256=digest.hexdigest(), bytes=total, slices=consumer.slices)
        consumer.release()
        pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
