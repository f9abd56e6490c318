"""Hostile-peer fuzzing of one ring implementation, run in a child process so
that a crash (a read or write outside the mapping) fails the test instead of
killing the test runner.

The ring sits in an anonymous mapping whose last page is PROT_NONE, directly
after the ring's last data byte, so any overrun faults at once.  Hypothesis
interleaves honest operations with arbitrary writes into the shared header;
every operation must either work or raise RingCorrupted (or the documented
RingClosed/ValueError/RingAttachError) -- nothing else, and never crash.
"""

from __future__ import annotations

import ctypes
import importlib
import mmap
import struct
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiocoloc.errors import RingAttachError, RingClosed, RingCorrupted

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

EXPECTED = (RingCorrupted, RingClosed)


class GuardedRing:
    """A ring whose data area ends exactly at a PROT_NONE page."""

    def __init__(self, ring: object, capacity: int) -> None:
        size = ring.ring_size(capacity)  # type: ignore[attr-defined]
        pages = (size + PAGE - 1) // PAGE + 2
        self.mapping = mmap.mmap(-1, pages * PAGE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.mapping))
        guard = base + (pages - 1) * PAGE
        if _libc.mprotect(ctypes.c_void_p(guard), PAGE, 0) != 0:
            raise OSError(ctypes.get_errno(), "mprotect failed")
        if _libc.mprotect(ctypes.c_void_p(base), PAGE, 0) != 0:
            raise OSError(ctypes.get_errno(), "mprotect failed")
        start = (pages - 1) * PAGE - size
        self.view = memoryview(self.mapping)[start : start + size]


VALUES = st.one_of(
    st.integers(0, 2**64 - 1),
    st.sampled_from([0, 1, 15, 16, 17, 63, 64, 65, 2**32, 2**63, 2**64 - 1]),
    st.integers(0, 300),
)


def operations(layout: dict[str, object]) -> st.SearchStrategy[list[tuple[str, int, int]]]:
    fields = [
        layout["tail_offset"],
        layout["head_offset"],
        layout["capacity_offset"],
        layout["magic_offset"],
        layout["version_offset"],
        layout["producer_closed_offset"],
        layout["consumer_closed_offset"],
    ]
    return st.lists(
        st.one_of(
            st.tuples(
                st.sampled_from(
                    ["write", "read", "readinto", "peek", "consume", "free", "eof", "sleep", "wait"]
                ),
                st.integers(0, 300),
                st.just(0),
            ),
            st.tuples(st.just("poke64"), st.sampled_from(fields), VALUES),
            st.tuples(st.just("poke8"), st.integers(0, 255), st.integers(0, 255)),
            st.tuples(st.just("reattach"), st.just(0), st.just(0)),
        ),
        max_size=60,
    )


def run(impl_name: str, examples: int) -> None:
    ring = importlib.import_module(impl_name)

    @settings(
        max_examples=examples, deadline=2000, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(capacity=st.sampled_from([16, 64, 1024]), ops=operations(ring.LAYOUT))
    def property_(capacity: int, ops: list[tuple[str, int, int]]) -> None:
        guarded = GuardedRing(ring, capacity)
        ring.format_ring(guarded.view, capacity)
        producer = ring.RingProducer(guarded.view)
        consumer = ring.RingConsumer(guarded.view)
        for op, a, b in ops:
            try:
                if op == "write":
                    assert 0 <= producer.write(bytes(a)) <= capacity
                elif op == "read":
                    data = consumer.read(a)
                    assert data is None or len(data) <= min(a, capacity)
                elif op == "readinto":
                    got = consumer.readinto(bytearray(a))
                    assert got is None or 0 <= got <= a
                elif op == "peek":
                    view = consumer.peek(a)
                    if view is not None:
                        assert len(view) <= capacity
                        bytes(view)  # touch every byte of it
                        view.release()
                elif op == "consume":
                    try:
                        consumer.consume(a)
                    except ValueError:
                        pass
                elif op == "free":
                    assert 0 <= producer.free() <= capacity
                    assert 0 <= consumer.used() <= capacity
                elif op == "eof":
                    consumer.at_eof()
                elif op == "sleep":
                    consumer.prepare_sleep()
                    producer.wake_needed()
                elif op == "wait":
                    producer.prepare_wait(min(a, capacity) or 1)
                    consumer.wake_needed()
                elif op == "poke64":
                    struct.pack_into("<Q", guarded.view, a & ~7, b)
                elif op == "poke8":
                    guarded.view[a] = b
                else:  # a fresh end attaches to whatever the header holds now
                    try:
                        fresh = ring.RingConsumer(guarded.view)
                    except (RingAttachError, RingCorrupted):
                        continue
                    data = fresh.read()
                    assert data is None or len(data) <= capacity
                    fresh.release()
            except EXPECTED:
                pass
        producer.release()
        consumer.release()

    property_()


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]))
    print("fuzz ok")
