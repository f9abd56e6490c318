"""The ring against a bytearray FIFO model, and the two implementations against
each other, with random operation sequences that cross the wrap point."""

from __future__ import annotations

import mmap
import os
import struct
import subprocess
import sys
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from aiocoloc import _ring_layout, _ring_py
from aiocoloc.errors import LayoutMismatch, RingClosed

from .conftest import FUZZ_SCALE, _ring_c

CAPACITIES = st.sampled_from([16, 32, 64, 256, 4096])


def make_ring(impl: ModuleType, capacity: int, start: int = 0) -> mmap.mmap:
    """A formatted ring of ``capacity`` in an anonymous mapping, positions at ``start``."""
    region = mmap.mmap(-1, impl.HEADER_SIZE + capacity)
    impl.format_ring(region, capacity)
    struct.pack_into("<Q", region, impl.LAYOUT["tail_offset"], start)
    struct.pack_into("<Q", region, impl.LAYOUT["head_offset"], start)
    return region


class RingAgainstModel(RuleBasedStateMachine):
    impl: ModuleType = _ring_py

    @initialize(capacity=CAPACITIES, start=st.sampled_from([0, 7, 2**32 - 3, 2**62]))
    def setup(self, capacity: int, start: int) -> None:
        self.capacity = capacity
        self.region = make_ring(self.impl, capacity, start)
        self.producer = self.impl.RingProducer(self.region)
        self.consumer = self.impl.RingConsumer(self.region)
        self.model = bytearray()
        self.eof = False
        self.start = start
        self.counter = 0

    def payload(self, n: int) -> bytes:
        out = bytes((self.counter + i) % 251 for i in range(n))
        self.counter += n
        return out

    @precondition(lambda self: not self.eof)
    @rule(n=st.integers(0, 600), kind=st.sampled_from([bytes, bytearray, memoryview]))
    def write(self, n: int, kind: type) -> None:
        data = self.payload(n)
        written = self.producer.write(kind(data))
        expected = min(n, self.capacity - len(self.model))
        assert written == expected
        self.model += data[:written]
        self.counter -= n - written

    @precondition(lambda self: not self.eof)
    @rule(n=st.integers(0, 600))
    def write_all(self, n: int) -> None:
        data = self.payload(n)
        if n > self.capacity:
            with pytest.raises(ValueError):
                self.producer.write_all(data)
            self.counter -= n
            return
        fits = n <= self.capacity - len(self.model)
        assert self.producer.write_all(data) == fits
        if fits:
            self.model += data
        else:
            self.counter -= n

    @rule(n=st.integers(-1, 600))
    def read(self, n: int) -> None:
        got = self.consumer.read(n)
        if not self.model:
            assert got == (b"" if self.eof else None)
            return
        k = len(self.model) if n < 0 else min(n, len(self.model))
        assert got == bytes(self.model[:k])
        del self.model[:k]

    @rule(size=st.integers(0, 600))
    def readinto(self, size: int) -> None:
        buf = bytearray(size)
        got = self.consumer.readinto(buf)
        if not self.model:
            assert got == (0 if self.eof else None)
            return
        k = min(size, len(self.model))
        assert got == k
        assert buf[:k] == self.model[:k]
        del self.model[:k]

    @rule(n=st.integers(-1, 600), fraction=st.floats(0, 1))
    def peek_consume(self, n: int, fraction: float) -> None:
        view = self.consumer.peek(n)
        if not self.model:
            if self.eof:
                assert view is not None and len(view) == 0
            else:
                assert view is None
            return
        assert view is not None
        head = self.consumer.position
        until_wrap = self.capacity - (head % self.capacity)
        expected = min(len(self.model), until_wrap)
        if n >= 0:
            expected = min(expected, n)
        assert len(view) == expected
        assert bytes(view) == bytes(self.model[:expected])
        k = int(expected * fraction)
        view.release()
        self.consumer.consume(k)
        del self.model[:k]

    @rule(extra=st.integers(1, 10))
    def consume_too_much(self, extra: int) -> None:
        with pytest.raises(ValueError):
            self.consumer.consume(len(self.model) + extra)

    @precondition(lambda self: not self.eof)
    @rule()
    def close_producer(self) -> None:
        self.producer.close()
        self.eof = True
        with pytest.raises(RingClosed):
            self.producer.write(b"x")

    @invariant()
    def accounting(self) -> None:
        if not hasattr(self, "model"):
            return
        assert self.consumer.used() == len(self.model)
        assert self.producer.used() == len(self.model)
        assert self.producer.free() == self.capacity - len(self.model)
        assert self.consumer.free() == self.capacity - len(self.model)
        assert self.producer.position - self.consumer.position == len(self.model)
        assert self.consumer.at_eof() == (self.eof and not self.model)

    def teardown(self) -> None:
        if hasattr(self, "region"):
            self.producer.release()
            self.consumer.release()
            self.region.close()


class TestPythonRingModel(RingAgainstModel.TestCase):  # type: ignore[name-defined]
    settings = settings(max_examples=150 * FUZZ_SCALE, stateful_step_count=60, deadline=None)


if _ring_c is not None:

    class CythonRingAgainstModel(RingAgainstModel):
        impl = _ring_c

    class TestCythonRingModel(CythonRingAgainstModel.TestCase):  # type: ignore[name-defined]
        settings = settings(max_examples=150 * FUZZ_SCALE, stateful_step_count=60, deadline=None)


# --- differential: the same operations give the same results on both --------

OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 300)),
        st.tuples(st.just("write_all"), st.integers(0, 300)),
        st.tuples(st.just("read"), st.integers(-1, 300)),
        st.tuples(st.just("readinto"), st.integers(0, 300)),
        st.tuples(st.just("peek"), st.integers(-1, 300)),
        st.tuples(st.just("consume"), st.integers(0, 300)),
        st.tuples(st.just("close"), st.just(0)),
        st.tuples(st.just("free"), st.just(0)),
    ),
    max_size=80,
)


def run_operations(impl: ModuleType, capacity: int, ops: list[tuple[str, int]]) -> list[Any]:
    region = make_ring(impl, capacity)
    producer, consumer = impl.RingProducer(region), impl.RingConsumer(region)
    results: list[Any] = []
    counter = 0
    for op, n in ops:
        try:
            if op in ("write", "write_all"):
                data = bytes((counter + i) % 256 for i in range(n))
                counter += n
                results.append(getattr(producer, op)(data))
            elif op == "read":
                results.append(consumer.read(n))
            elif op == "readinto":
                buf = bytearray(n)
                results.append((consumer.readinto(buf), bytes(buf)))
            elif op == "peek":
                view = consumer.peek(n)
                results.append(None if view is None else bytes(view))
                if view is not None:
                    view.release()
            elif op == "consume":
                results.append(consumer.consume(n))
            elif op == "close":
                results.append(producer.close())
            else:
                results.append((producer.free(), consumer.used(), consumer.at_eof()))
        except Exception as exc:
            results.append((type(exc), str(exc)))
    producer.release()
    consumer.release()
    region.close()
    return results


@pytest.mark.skipif(_ring_c is None, reason="Cython ring not built")
@settings(max_examples=300 * FUZZ_SCALE, deadline=None)
@given(capacity=CAPACITIES, ops=OPERATIONS)
def test_implementations_agree(capacity: int, ops: list[tuple[str, int]]) -> None:
    assert run_operations(_ring_c, capacity, ops) == run_operations(_ring_py, capacity, ops)


def test_layouts_agree() -> None:
    assert _ring_c is not None, "the Cython ring must be built for the test suite"
    assert _ring_c.LAYOUT == _ring_py.LAYOUT
    assert _ring_c.HEADER_SIZE == _ring_py.HEADER_SIZE


def test_layout_check_names_every_disagreement() -> None:
    doctored = {**_ring_layout.LAYOUT, "tail_offset": 72, "spare_offset": 8}
    del doctored["head_offset"]
    with pytest.raises(ImportError) as raised:
        _ring_layout.check_compiled_layout(doctored, "aiocoloc._ring")
    assert isinstance(raised.value, LayoutMismatch)
    message = str(raised.value)
    assert (
        "aiocoloc._ring disagrees with the shared ring layout (make _ring.pxd match, then rebuild)"
        in message
    )
    assert "tail_offset: aiocoloc._ring has 72, aiocoloc._ring_layout has 64" in message
    assert "head_offset: aiocoloc._ring has nothing, aiocoloc._ring_layout has 128" in message
    assert "spare_offset: aiocoloc._ring has 8, aiocoloc._ring_layout has nothing" in message
    assert "version" not in message
    _ring_layout.check_compiled_layout(dict(_ring_layout.LAYOUT), "aiocoloc._ring")


@pytest.mark.skipif(_ring_c is None, reason="Cython ring not built")
def test_compiled_ring_refuses_to_load_with_another_layout() -> None:
    """The load-time check runs when the extension loads, and ring.py does
    not stand the reference in for a stale build."""
    # The package's __init__ imports the ring: stand in an empty package so
    # that the shared layout can be doctored before the extension loads.
    code = (
        "import importlib.util, sys, types\n"
        "package = types.ModuleType('aiocoloc')\n"
        "package.__path__ = importlib.util.find_spec('aiocoloc').submodule_search_locations\n"
        "sys.modules['aiocoloc'] = package\n"
        "from aiocoloc import _ring_layout; _ring_layout.LAYOUT['tail_offset'] = 80\n"
        "try:\n    import aiocoloc.ring\nexcept ImportError as exc:\n"
        "    print(type(exc).__name__, exc)\nelse:\n    print('imported')"
    )
    env = {k: v for k, v in os.environ.items() if k != "AIOCOLOC_NO_EXTENSIONS"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith("LayoutMismatch aiocoloc._ring disagrees"), out
    assert "tail_offset: aiocoloc._ring has 64, aiocoloc._ring_layout has 80" in out
