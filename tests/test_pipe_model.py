"""Elastic pipes against a FIFO model, with random grows and shrinks while data
is in flight.  Slices a resize drops are scribbled over as soon as they are
handed back, as another pipe reusing them would: no unread byte may live there."""

from __future__ import annotations

import mmap
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from aiocoloc import _ring_py
from aiocoloc.errors import RingAttachError, RingCorrupted

from .conftest import FUZZ_SCALE, _ring_c

SLICE = 64
SLICES = 16
MAX_SLICES = 8


class PipeRegion:
    """An anonymous mapping holding one pipe entry and SLICES slices."""

    def __init__(self, impl: ModuleType, first: list[int], max_slices: int = MAX_SLICES) -> None:
        self.impl = impl
        self.entry = 0
        self.data = (impl.pipe_entry_size(max_slices) + 63) // 64 * 64
        self.region = mmap.mmap(-1, self.data + SLICES * SLICE)
        impl.format_pipe(self.region, self.entry, max_slices, first)
        self.geometry = (self.entry, self.data, SLICE, SLICES, max_slices)

    def producer(self) -> Any:
        return self.impl.PipeProducer(self.region, *self.geometry)

    def consumer(self) -> Any:
        return self.impl.PipeConsumer(self.region, *self.geometry)

    def scribble(self, index: int) -> None:
        start = self.data + index * SLICE
        self.region[start : start + SLICE] = b"\xee" * SLICE


class PipeAgainstModel(RuleBasedStateMachine):
    impl: ModuleType = _ring_py

    @initialize(first=st.integers(1, 3))
    def setup(self, first: int) -> None:
        self.free = list(range(SLICES))
        initial, self.free = self.free[:first], self.free[first:]
        self.pipe = PipeRegion(self.impl, initial)
        self.producer = self.pipe.producer()
        self.consumer = self.pipe.consumer()
        self.model = bytearray()
        self.dropped: list[int] = []
        self.counter = 0

    def payload(self, n: int) -> bytes:
        out = bytes((self.counter + i) % 251 for i in range(n))
        return out

    @rule(n=st.integers(0, 700))
    def write(self, n: int) -> None:
        room = self.producer.free()
        data = self.payload(n)
        written = self.producer.write(data)
        assert written == min(n, room)
        self.model += data[:written]
        self.counter += written

    @rule(n=st.integers(-1, 700))
    def read(self, n: int) -> None:
        got = self.consumer.read(n)
        if not self.model:
            assert got is None
            return
        k = len(self.model) if n < 0 else min(n, len(self.model))
        assert got == bytes(self.model[:k])
        del self.model[:k]

    @rule(n=st.integers(-1, 700), fraction=st.floats(0, 1))
    def peek_consume(self, n: int, fraction: float) -> None:
        view = self.consumer.peek(n)
        if not self.model:
            assert view is None
            return
        assert view is not None
        seen = bytes(view)
        view.release()
        # Contiguous in memory: up to a slice's end, or further over slices
        # that follow it in memory; never more than is readable.
        assert 0 < len(seen) <= len(self.model) or n == 0 == len(seen)
        if n >= 0:
            assert len(seen) <= n
        assert seen == bytes(self.model[: len(seen)])
        k = int(len(seen) * fraction)
        self.consumer.consume(k)
        del self.model[:k]

    @precondition(lambda self: hasattr(self, "producer"))
    @rule(keep=st.integers(0, MAX_SLICES), add=st.integers(0, 4))
    def resize(self, keep: int, add: int) -> None:
        if not self.producer.can_resize():
            with pytest.raises(RuntimeError, match="in flight"):
                self.producer.resize(len(self.producer.slices))
            return
        current = len(self.producer.slices)
        keep = min(keep, current)
        add = min(add, len(self.free), MAX_SLICES - keep)
        if keep + add == 0:
            with pytest.raises(ValueError):
                self.producer.resize(0)
            return
        if keep == 0 and self.producer.position % SLICE:
            with pytest.raises(ValueError, match="keep must be >= 1"):
                self.producer.resize(0, self.free[:add])
            return
        added, self.free = self.free[:add], self.free[add:]
        _, dropped = self.producer.resize(keep, added)
        assert len(dropped) == current - keep
        self.dropped += dropped
        self.reclaim()

    @rule()
    def reclaim(self) -> None:
        if self.dropped and self.producer.switch_complete():
            for index in self.dropped:
                self.pipe.scribble(index)  # as a new owner would
            self.free += self.dropped
            self.dropped = []

    @invariant()
    def accounting(self) -> None:
        if not hasattr(self, "model"):
            return
        assert self.consumer.used() == len(self.model)
        assert self.producer.used() == len(self.model)
        assert self.producer.free() >= 0
        in_pipe = set(self.producer.slices) | set(self.consumer.slices)
        assert not in_pipe & set(self.free), "a slice is both free and in the pipe"
        assert not set(self.dropped) & set(self.free)
        assert len(self.free) + len(self.dropped) + len(set(self.producer.slices)) <= SLICES

    def teardown(self) -> None:
        if hasattr(self, "pipe"):
            self.producer.release()
            self.consumer.release()
            self.pipe.region.close()


class TestPythonPipeModel(PipeAgainstModel.TestCase):  # type: ignore[name-defined]
    settings = settings(max_examples=150 * FUZZ_SCALE, stateful_step_count=80, deadline=None)


if _ring_c is not None:

    class CythonPipeAgainstModel(PipeAgainstModel):
        impl = _ring_c

    class TestCythonPipeModel(CythonPipeAgainstModel.TestCase):  # type: ignore[name-defined]
        settings = settings(max_examples=200 * FUZZ_SCALE, stateful_step_count=80, deadline=None)


# --- rules one at a time --------------------------------------------------------


def test_grow_takes_effect_at_a_slice_boundary(ring_impl: ModuleType) -> None:
    pipe = PipeRegion(ring_impl, [0])
    producer, consumer = pipe.producer(), pipe.consumer()
    assert producer.write(b"a" * 100) == SLICE  # one slice: full
    assert producer.capacity == SLICE
    switch, dropped = producer.resize(1, [1, 2])
    assert (switch, dropped) == (SLICE, [])
    assert producer.capacity == 3 * SLICE
    assert producer.free() == 0  # consumer has not passed the switch yet
    assert consumer.read(10) == b"a" * 10
    assert producer.free() == 10  # old limit until the consumer reaches the switch
    assert consumer.read() == b"a" * 54
    assert producer.free() == 3 * SLICE
    assert producer.write(b"b" * 200) == 3 * SLICE
    assert consumer.read() == b"b" * 3 * SLICE
    assert consumer.slices == [0, 1, 2]
    assert producer.can_resize()
    for end in (producer, consumer):
        end.release()
    pipe.region.close()


def test_a_view_spans_slices_that_follow_each_other_in_memory(ring_impl: ModuleType) -> None:
    """``peek`` lends one view over slices adjacent in memory (a 256 KiB read
    of a pipe of 16 KiB slices is one view, not sixteen), stops where the
    next slice lives elsewhere, and never runs into a pending layout."""
    pipe = PipeRegion(ring_impl, [3, 4, 5, 9, 10])
    producer, consumer = pipe.producer(), pipe.consumer()
    data = bytes(range(256)) + bytes(range(64))
    assert producer.write(data) == 5 * SLICE
    view = consumer.peek()
    assert bytes(view) == data[: 3 * SLICE]  # slices 3, 4, 5; slice 9 is elsewhere
    view.release()
    consumer.consume(SLICE + 10)  # from inside slice 4: to the end of slice 5
    view = consumer.peek()
    assert bytes(view) == data[SLICE + 10 : 3 * SLICE]
    view.release()
    assert len(consumer.peek(5)) == 5
    consumer.consume(2 * SLICE - 10)
    view = consumer.peek()
    assert bytes(view) == data[3 * SLICE :]  # slices 9, 10
    view.release()
    assert consumer.read() == data[3 * SLICE :]
    # Shrink to [9]: bytes up to the switch stay in the current layout, and a
    # view of them ends there even though the next slice in memory follows.
    producer.write(b"s" * (2 * SLICE))  # in slices 3 and 4 (positions 320..447)
    switch, _ = producer.resize(1)
    assert switch == consumer.position + 2 * SLICE
    assert producer.write(b"t" * 10) == 10  # after the switch: in the new layout
    view = consumer.peek()  # slice 5 follows slice 4 in memory, but not in the stream
    assert bytes(view) == b"s" * (2 * SLICE)
    view.release()
    assert consumer.read() == b"s" * (2 * SLICE) + b"t" * 10
    for end in (producer, consumer):
        end.release()
    pipe.region.close()


def test_shrink_frees_slices_once_the_consumer_passed(ring_impl: ModuleType) -> None:
    pipe = PipeRegion(ring_impl, [3, 4, 5])
    producer, consumer = pipe.producer(), pipe.consumer()
    producer.write(bytes(range(100)))
    switch, dropped = producer.resize(1)
    assert switch == SLICE  # the slice boundary below tail 100
    assert dropped == [5, 3]  # rotated: slice 4, which holds bytes 64..127, stays
    assert producer.free() == 2 * SLICE - 100  # min(head 0 + 3 slices, P 64 + 1 slice) - tail
    assert not producer.switch_complete()
    assert consumer.read(50) == bytes(range(50))
    assert not producer.switch_complete()  # head 50 < switch 64: bytes 50..63 live in slice 3
    assert consumer.read(14) == bytes(range(50, 64))
    assert producer.switch_complete()
    for index in dropped:
        pipe.scribble(index)  # another pipe takes them over
    assert consumer.read() == bytes(range(64, 100))
    producer.write(b"y" * 64)
    assert consumer.read() == b"y" * 64
    assert consumer.slices == producer.slices == [4]
    for end in (producer, consumer):
        end.release()
    pipe.region.close()


def test_idle_pipe_completes_its_switch_once_drained(ring_impl: ModuleType) -> None:
    pipe = PipeRegion(ring_impl, [0, 1, 2, 3])
    producer, consumer = pipe.producer(), pipe.consumer()
    producer.write(b"z" * 70)
    switch, dropped = producer.resize(1)
    assert switch == 64 and len(dropped) == 3
    assert not producer.switch_complete()
    assert consumer.read() == b"z" * 70  # drained: nothing more will be written
    assert producer.switch_complete()  # slices free now, with no further write
    assert producer.can_resize()  # the consumer took up the layout while reading
    for end in (producer, consumer):
        end.release()
    pipe.region.close()


def test_empty_pipe_switches_at_once(ring_impl: ModuleType) -> None:
    pipe = PipeRegion(ring_impl, [0, 1, 2, 3])
    producer, consumer = pipe.producer(), pipe.consumer()
    producer.write(b"z" * 70)
    assert consumer.read() == b"z" * 70
    switch, dropped = producer.resize(1)
    assert switch == 64
    assert len(dropped) == 3
    assert producer.switch_complete()  # nothing in flight: slices free now
    assert not producer.can_resize()  # until the consumer takes up the layout
    assert consumer.read() is None
    assert producer.can_resize()
    for end in (producer, consumer):
        end.release()
    pipe.region.close()


def test_resize_rejects_bad_requests(ring_impl: ModuleType) -> None:
    pipe = PipeRegion(ring_impl, [0, 1])
    producer, consumer = pipe.producer(), pipe.consumer()
    with pytest.raises(ValueError, match=r"keep must be in 0\.\.2"):
        producer.resize(3)
    with pytest.raises(ValueError, match=r"1\.\.8 slices"):
        producer.resize(0)
    with pytest.raises(ValueError, match="not in the pool"):
        producer.resize(1, [99])
    with pytest.raises(ValueError, match="twice"):
        producer.resize(2, [0])
    for end in (producer, consumer):
        end.release()
    pipe.region.close()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("count", 0, "has 0 slices"),
        ("count", MAX_SLICES + 1, "has 9 slices"),
        ("index", SLICES, "names slice 16 of 16"),
        ("seq", 5, "jumped from 1 to 5"),
        ("start", 0, "starts at 0, before layout 1 \\(at 64\\)"),
    ],
)
def test_consumer_rejects_hostile_layouts(
    ring_impl: ModuleType, field: str, value: int, message: str
) -> None:
    pipe = PipeRegion(ring_impl, [0, 1])
    producer, consumer = pipe.producer(), pipe.consumer()
    producer.write(b"q" * 70)
    producer.resize(2)  # layout 1 starts at 64
    consumer.read(70)  # ... and the consumer takes it up
    layout = ring_impl.LAYOUT
    slot0 = layout["layout_slots_offset"]
    region = pipe.region
    slot = slot0  # layout 2 goes in slot 0
    region[slot : slot + 8] = (80).to_bytes(8, "little")
    region[slot + 8 : slot + 12] = (1).to_bytes(4, "little")
    region[slot + 16 : slot + 20] = (1).to_bytes(4, "little")
    if field == "count":
        region[slot + 8 : slot + 12] = value.to_bytes(4, "little")
    elif field == "index":
        region[slot + 16 : slot + 20] = value.to_bytes(4, "little")
    elif field == "start":
        region[slot : slot + 8] = value.to_bytes(8, "little")
    seq = value if field == "seq" else 2
    off = layout["layout_seq_offset"]
    region[off : off + 8] = seq.to_bytes(8, "little")
    with pytest.raises(RingCorrupted, match=message):
        consumer.read()
    for end in (producer, consumer):
        end.release()
    region.close()


def test_pipe_geometry_is_checked(ring_impl: ModuleType) -> None:
    region = mmap.mmap(-1, 8192)
    with pytest.raises(ValueError, match="power of two"):
        ring_impl.PipeProducer(region, 0, 4096, 100, 4, 4)
    with pytest.raises(RingAttachError, match="do not fit"):
        ring_impl.PipeConsumer(region, 0, 4096, 1024, 8, 4)
    with pytest.raises(RingAttachError, match="64-byte aligned"):
        ring_impl.PipeConsumer(region, 8, 4096, 1024, 2, 4)
    region.close()


# --- differential: both implementations agree on pipes -----------------------------

PIPE_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 300)),
        st.tuples(st.just("read"), st.integers(-1, 300)),
        st.tuples(st.just("peek"), st.integers(-1, 100)),
        st.tuples(st.just("consume"), st.integers(0, 100)),
        st.tuples(st.just("resize"), st.integers(0, 12)),
        st.tuples(st.just("state"), st.just(0)),
    ),
    max_size=60,
)


def run_pipe_ops(impl: ModuleType, ops: list[tuple[str, int]]) -> list[Any]:
    pipe = PipeRegion(impl, [0, 1])
    producer, consumer = pipe.producer(), pipe.consumer()
    spare = list(range(2, SLICES))
    results: list[Any] = []
    for op, n in ops:
        try:
            if op == "write":
                results.append(producer.write(bytes(i % 256 for i in range(n))))
            elif op == "read":
                results.append(consumer.read(n))
            elif op == "peek":
                view = consumer.peek(n)
                results.append(None if view is None else bytes(view))
                if view is not None:
                    view.release()
            elif op == "consume":
                results.append(consumer.consume(n))
            elif op == "resize":
                keep, add = n % 4, n // 4
                added, spare = spare[:add], spare[add:]
                switch, dropped = producer.resize(keep, added)
                results.append((switch, dropped))
                spare += dropped
            else:
                results.append(
                    (
                        producer.free(),
                        consumer.used(),
                        producer.slices,
                        consumer.slices,
                        producer.switch_complete(),
                    )
                )
        except Exception as exc:
            results.append((type(exc), str(exc)))
    for end in (producer, consumer):
        end.release()
    pipe.region.close()
    return results


@pytest.mark.skipif(_ring_c is None, reason="Cython ring not built")
@settings(max_examples=300 * FUZZ_SCALE, deadline=None)
@given(ops=PIPE_OPS)
def test_pipe_implementations_agree(ops: list[tuple[str, int]]) -> None:
    assert run_pipe_ops(_ring_c, ops) == run_pipe_ops(_ring_py, ops)
