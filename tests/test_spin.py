"""The spin policy and the ring's bounded busy-wait (``aiocoloc.spin``)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from types import ModuleType

import pytest

from aiocoloc.spin import AFTER_EMPTY, AFTER_WRITE, SpinConfig, SpinPolicy


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="max_ns"):
        SpinConfig(max_ns=-1)
    with pytest.raises(ValueError, match="misses_to_stop"):
        SpinConfig(misses_to_stop=0)


def test_nothing_spins_on_one_cpu_or_with_a_zero_budget() -> None:
    assert not SpinPolicy(SpinConfig(), cpus=1).wants(AFTER_EMPTY)
    assert not SpinPolicy(SpinConfig(max_ns=0), cpus=8).wants(AFTER_WRITE)
    assert SpinPolicy(SpinConfig(), cpus=2).wants(AFTER_WRITE)


def test_usable_cpus_follows_the_affinity_mask() -> None:
    code = (
        "import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]});"
        "from aiocoloc.spin import SpinConfig, SpinPolicy, usable_cpus;"
        "print(usable_cpus(), SpinPolicy(SpinConfig()).enabled)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "False"]


def test_each_trigger_stops_after_its_misses_and_restarts_on_a_quick_wake() -> None:
    policy = SpinPolicy(SpinConfig(max_ns=50_000, misses_to_stop=2), cpus=2)
    policy.record(AFTER_EMPTY, False)
    assert policy.wants(AFTER_EMPTY)
    policy.record(AFTER_EMPTY, False)
    assert not policy.wants(AFTER_EMPTY)
    assert policy.wants(AFTER_WRITE)  # the other trigger is unaffected
    policy.woken_after(AFTER_EMPTY, 80_000)  # a spin would not have caught it
    assert not policy.wants(AFTER_EMPTY)
    policy.woken_after(AFTER_EMPTY, 30_000)  # it would have
    assert policy.wants(AFTER_EMPTY)
    policy.record(AFTER_WRITE, False)
    policy.record(AFTER_WRITE, True)  # a hit resets the count
    policy.record(AFTER_WRITE, False)
    assert policy.wants(AFTER_WRITE)
    assert (policy.spins, policy.hits) == (5, 1)


def test_one_spinner_per_event_loop() -> None:
    one, other = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        a, b = SpinPolicy(SpinConfig(), cpus=2), SpinPolicy(SpinConfig(), cpus=2)
        assert a.claim(one)
        assert not b.claim(one)
        assert b.claim(other)
        a.release(one)
        assert b.claim(one)
        b.release(one)
        b.release(other)
    finally:
        one.close()
        other.close()


def _ring(ring_impl: ModuleType) -> tuple[object, object]:
    buffer = bytearray(ring_impl.ring_size(4096))
    ring_impl.format_ring(buffer)
    return ring_impl.RingProducer(buffer), ring_impl.RingConsumer(buffer)


def test_spin_times_out_when_nothing_comes(ring_impl: ModuleType) -> None:
    _, consumer = _ring(ring_impl)
    start = time.monotonic_ns()
    assert consumer.spin_until_readable(2_000_000) is False  # type: ignore[attr-defined]
    elapsed = time.monotonic_ns() - start
    assert 2_000_000 <= elapsed < 200_000_000, elapsed


def test_spin_returns_as_soon_as_data_or_eof_arrives(ring_impl: ModuleType) -> None:
    producer, consumer = _ring(ring_impl)
    writer = threading.Timer(0.02, producer.write, (b"reply",))  # type: ignore[attr-defined]
    writer.start()
    start = time.monotonic()
    assert consumer.spin_until_readable(5_000_000_000) is True  # type: ignore[attr-defined]
    assert time.monotonic() - start < 2.0
    writer.join()
    assert consumer.read() == b"reply"  # type: ignore[attr-defined]
    assert consumer.spin_until_readable(1000) is False  # type: ignore[attr-defined]
    producer.close()  # type: ignore[attr-defined]
    assert consumer.spin_until_readable(5_000_000_000) is True  # type: ignore[attr-defined]
    assert consumer.read() == b""  # type: ignore[attr-defined]


def test_spin_refuses_a_released_end(ring_impl: ModuleType) -> None:
    _, consumer = _ring(ring_impl)
    consumer.release()  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        consumer.spin_until_readable(1000)  # type: ignore[attr-defined]
