"""The spin policy and the ring's bounded busy-wait (``aiocoloc.notify.spin``)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from types import ModuleType

import pytest

from aiocoloc.notify.spin import AFTER_EMPTY, AFTER_WRITE, SpinConfig, SpinPolicy


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="max_ns"):
        SpinConfig(max_ns=-1)
    with pytest.raises(ValueError, match="misses_to_stop"):
        SpinConfig(misses_to_stop=0)
    with pytest.raises(ValueError, match="rearm_ns"):
        SpinConfig(max_ns=100_000, rearm_ns=50_000)
    with pytest.raises(ValueError, match="max_backoff"):
        SpinConfig(max_backoff=0)


def test_nothing_spins_on_one_cpu_or_with_a_zero_budget() -> None:
    assert not SpinPolicy(SpinConfig(), cpus=1).wants(AFTER_EMPTY)
    assert not SpinPolicy(SpinConfig(max_ns=0), cpus=8).wants(AFTER_WRITE)
    assert SpinPolicy(SpinConfig(), cpus=2).wants(AFTER_WRITE)


def test_usable_cpus_follows_the_affinity_mask() -> None:
    code = (
        "import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]});"
        "from aiocoloc.notify.spin import SpinConfig, SpinPolicy, usable_cpus;"
        "print(usable_cpus(), SpinPolicy(SpinConfig()).enabled)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "False"]


def test_each_trigger_stops_after_its_misses_and_restarts_on_a_quick_wake() -> None:
    policy = SpinPolicy(SpinConfig(max_ns=50_000, misses_to_stop=2, rearm_ns=50_000), cpus=2)
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


def test_a_trigger_restarts_on_slower_wakes_with_backoff() -> None:
    """Replies slower than a spin while both sides sleep may be quick once
    both spin; a peer that is simply slow must not keep us spinning."""
    policy = SpinPolicy(SpinConfig(max_ns=50_000, rearm_ns=150_000, max_backoff=4), cpus=2)

    def stop() -> None:
        policy.record(AFTER_WRITE, False)
        policy.record(AFTER_WRITE, False)
        assert not policy.wants(AFTER_WRITE)

    def wakes_to_restart() -> int:
        for n in range(1, 10):
            policy.woken_after(AFTER_WRITE, 120_000)  # slower than a spin, within rearm_ns
            if policy.wants(AFTER_WRITE):
                return n
        raise AssertionError("never restarted")

    stop()
    policy.woken_after(AFTER_WRITE, 200_000)  # beyond rearm_ns: no evidence at all
    assert not policy.wants(AFTER_WRITE)
    assert wakes_to_restart() == 1
    stop()  # restarted that way, it caught nothing: twice the evidence next time
    assert wakes_to_restart() == 2
    stop()
    assert wakes_to_restart() == 4
    stop()
    assert wakes_to_restart() == 4  # max_backoff
    policy.record(AFTER_WRITE, True)  # a catch forgives
    stop()
    assert wakes_to_restart() == 1


def test_spinning_right_after_a_ring_is_a_probe_with_backoff() -> None:
    policy = SpinPolicy(SpinConfig(max_ns=50_000, max_backoff=8), cpus=2)
    assert not policy.may_spin_after_ring(AFTER_WRITE)  # no wake-up seen yet: no evidence
    policy.woken_after(AFTER_WRITE, 90_000)  # replies slower than a spin: none either
    assert not policy.may_spin_after_ring(AFTER_WRITE)
    policy.woken_after(AFTER_WRITE, 40_000)  # a spin would have caught this one

    def rings_to_probe() -> int:
        for n in range(1, 20):
            if policy.may_spin_after_ring(AFTER_WRITE):
                return n
        raise AssertionError("never probed")

    assert rings_to_probe() == 1
    policy.probed(AFTER_WRITE, None)  # caught nothing
    assert rings_to_probe() == 2
    policy.probed(AFTER_WRITE, 45_000)  # caught, but no sooner than a wake-up (40 us)
    assert rings_to_probe() == 4
    policy.probed(AFTER_WRITE, None)
    assert rings_to_probe() == 8
    policy.probed(AFTER_WRITE, None)
    assert rings_to_probe() == 8  # max_backoff
    policy.probed(AFTER_WRITE, 10_000)  # caught sooner than a wake-up: probe every ring
    assert rings_to_probe() == 1
    policy.woken_after(AFTER_EMPTY, 10_000)
    assert not policy.may_spin_after_ring(AFTER_EMPTY)  # never for a writer we unblocked


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


def test_nobody_spins_while_several_readers_of_a_loop_are_busy() -> None:
    """A reader spins only when the loop's last reader to rest was itself:
    with several connections busy, a spin on one pipe holds up the others."""
    loop, other_loop = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        a, b = SpinPolicy(SpinConfig(), cpus=2), SpinPolicy(SpinConfig(), cpus=2)
        a.alone(loop)  # (the first rest on a loop whose id an old loop had may be crowded)
        assert a.alone(loop)  # one busy reader: it may spin
        assert not b.alone(loop)  # another rested in between: crowded
        assert not a.alone(loop)
        assert not b.alone(loop)
        assert b.alone(loop)  # b alone again (a went quiet)
        a.alone(other_loop)
        assert a.alone(other_loop) and not b.alone(other_loop)  # each loop apart
        assert b.alone(loop)
    finally:
        loop.close()
        other_loop.close()


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
