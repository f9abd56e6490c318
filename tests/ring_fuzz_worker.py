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
from typing import Any

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


class GuardedPipe:
    """A pipe entry and its slices; the last slice ends at a PROT_NONE page."""

    SLICE = 64
    SLICES = 8
    MAX = 4

    def __init__(self, ring: object) -> None:
        entry = ring.pipe_entry_size(self.MAX)  # type: ignore[attr-defined]
        data = (entry + 63) // 64 * 64
        size = data + self.SLICES * self.SLICE
        self.guarded = GuardedRing.__new__(GuardedRing)
        pages = (size + PAGE - 1) // PAGE + 2
        self.guarded.mapping = mmap.mmap(-1, pages * PAGE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.guarded.mapping))
        for page in (base, base + (pages - 1) * PAGE):
            if _libc.mprotect(ctypes.c_void_p(page), PAGE, 0) != 0:
                raise OSError(ctypes.get_errno(), "mprotect failed")
        start = (pages - 1) * PAGE - size
        start -= start % 64
        self.view = memoryview(self.guarded.mapping)[start : (pages - 1) * PAGE]
        self.entry_size = entry
        self.geometry = (0, data, self.SLICE, self.SLICES, self.MAX)


def apply_pipe_ops(ring: Any, ops: list[tuple[str, int, int]]) -> None:
    """Honest pipe operations interleaved with hostile writes."""
    expected = (*EXPECTED, ValueError, RuntimeError)
    pipe = GuardedPipe(ring)
    ring.format_pipe(pipe.view, 0, pipe.MAX, [0, 1])
    producer = ring.PipeProducer(pipe.view, *pipe.geometry)
    consumer = ring.PipeConsumer(pipe.view, *pipe.geometry)
    spare = list(range(2, pipe.SLICES))
    for op, a, b in ops:
        try:
            if op == "write":
                producer.write(bytes(a))
            elif op == "read":
                data = consumer.read(a)
                assert data is None or len(data) <= pipe.MAX * pipe.SLICE
            elif op == "readinto":
                consumer.readinto(bytearray(a))
            elif op == "peek":
                view = consumer.peek(a)
                if view is not None:
                    # Over slices that follow each other in memory: never more
                    # than the pipe holds (the guard pages catch any overrun).
                    assert len(view) <= pipe.MAX * pipe.SLICE
                    bytes(view)
                    view.release()
            elif op == "consume":
                consumer.consume(a)
            elif op == "free":
                producer.free()
                consumer.used()
            elif op == "grow" and spare:
                producer.resize(len(producer.slices), [spare.pop()])
            elif op == "shrink":
                _, dropped = producer.resize(max(1, len(producer.slices) - 1))
                spare += dropped
            elif op == "poke32":
                struct.pack_into("<I", pipe.view, min(a, pipe.entry_size - 4) & ~3, b & 0xFFFFFFFF)
            elif op == "poke64":
                struct.pack_into("<Q", pipe.view, min(a, pipe.entry_size - 8) & ~7, b)
            elif op == "forge":
                # A whole next layout, as a hostile producer would publish it.
                # a: bits 0-1 slice count (4 - a & 3), 2 wild indices, 3 any
                # start, 4+ indices.  (Bad counts are covered by unit tests.)
                layout = ring.LAYOUT
                seq = struct.unpack_from("<Q", pipe.view, layout["layout_seq_offset"])[0]
                slot_size = (layout["layout_slot_header"] + 4 * pipe.MAX + 7) // 8 * 8
                slot = layout["layout_slots_offset"] + ((seq + 1) & 1) * slot_size
                count = 4 - (a & 3)
                start = b if a & 8 else b % 64
                struct.pack_into("<QI", pipe.view, slot, start, count)
                for i in range(pipe.MAX):
                    index = (a >> (4 + i)) & 7
                    if a & 4:
                        index += 1_000_000  # far outside the region
                    struct.pack_into("<I", pipe.view, slot + 16 + 4 * i, index)
                struct.pack_into("<Q", pipe.view, layout["layout_seq_offset"], (seq + 1) % 2**64)
            elif op == "reattach":
                try:
                    fresh = ring.PipeConsumer(pipe.view, *pipe.geometry)
                except (RingAttachError, RingCorrupted):
                    continue
                fresh.read()
                fresh.release()
        except expected:
            pass
    producer.release()
    consumer.release()


def run_pipes(impl_name: str, examples: int) -> None:
    ring = importlib.import_module(impl_name)

    @settings(
        max_examples=examples, deadline=2000, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(
        ops=st.lists(
            st.one_of(
                st.tuples(
                    st.sampled_from(
                        [
                            "write",
                            "read",
                            "readinto",
                            "peek",
                            "consume",
                            "free",
                            "grow",
                            "shrink",
                            "reattach",
                        ]
                    ),
                    st.integers(0, 300),
                    st.just(0),
                ),
                st.tuples(st.just("poke32"), st.integers(0, 400), VALUES),
                st.tuples(st.just("poke64"), st.integers(0, 400), VALUES),
                st.tuples(st.just("forge"), st.integers(0, 2**10 - 1), VALUES),
            ),
            max_size=60,
        )
    )
    def property_(ops: list[tuple[str, int, int]]) -> None:
        apply_pipe_ops(ring, ops)

    property_()


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]))
    run_pipes(sys.argv[1], int(sys.argv[2]))
    print("fuzz ok")
