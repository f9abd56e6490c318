"""Ring behaviour one rule at a time, on both implementations."""

from __future__ import annotations

import mmap
import os
import struct
import subprocess
import sys
from types import ModuleType

import pytest

from aiocoloc.errors import RingAttachError, RingClosed, RingCorrupted

from .test_ring_model import make_ring


def ends(impl: ModuleType, region: mmap.mmap) -> tuple[object, object]:
    return impl.RingProducer(region), impl.RingConsumer(region)


# --- attaching -------------------------------------------------------------


def test_attach_too_small(ring_impl: ModuleType) -> None:
    region = mmap.mmap(-1, 4096)
    with pytest.raises(RingAttachError, match="too small: 100 bytes"):
        ring_impl.RingProducer(memoryview(region)[:100])
    with pytest.raises(RingAttachError, match="too small: 100 bytes"):
        ring_impl.format_ring(memoryview(region)[:100])
    region.close()


def test_attach_capacity_larger_than_buffer(ring_impl: ModuleType) -> None:
    region = make_ring(ring_impl, 2048)
    view = memoryview(region)[: ring_impl.HEADER_SIZE + 1024]
    with pytest.raises(
        RingAttachError, match="header says capacity 2048 but the buffer holds only 1024"
    ):
        ring_impl.RingConsumer(view)
    view.release()
    region.close()


def test_attach_unformatted_wrong_magic(ring_impl: ModuleType) -> None:
    region = mmap.mmap(-1, 4096)
    with pytest.raises(RingAttachError, match=r"not a ring: magic is b'\\x00"):
        ring_impl.RingConsumer(region)
    region[:8] = b"NOTARING"
    with pytest.raises(RingAttachError, match="magic is b'NOTARING', expected b'ACOLRING'"):
        ring_impl.RingProducer(region)
    region.close()


def test_attach_wrong_version(ring_impl: ModuleType) -> None:
    region = make_ring(ring_impl, 1024)
    struct.pack_into("<I", region, ring_impl.LAYOUT["version_offset"], 7)
    with pytest.raises(RingAttachError, match="layout version 7 is not supported"):
        ring_impl.RingProducer(region)
    region.close()


def test_attach_bad_capacity_in_header(ring_impl: ModuleType) -> None:
    region = make_ring(ring_impl, 1024)
    struct.pack_into("<Q", region, ring_impl.LAYOUT["capacity_offset"], 1000)
    with pytest.raises(RingAttachError, match="capacity 1000 is not a power of two"):
        ring_impl.RingConsumer(region)
    region.close()


def test_attach_unaligned(ring_impl: ModuleType) -> None:
    region = make_ring(ring_impl, 1024)
    view = memoryview(region)[3:]
    with pytest.raises(
        RingAttachError, match=r"unaligned: address 0x[0-9a-f]+ is not a multiple of 8"
    ):
        ring_impl.RingProducer(view)
    with pytest.raises(RingAttachError, match="unaligned"):
        ring_impl.format_ring(view)
    view.release()
    region.close()


def test_attach_read_only(ring_impl: ModuleType) -> None:
    region = make_ring(ring_impl, 1024)
    frozen = bytes(region)
    with pytest.raises(RingAttachError, match="must be writable"):
        ring_impl.RingConsumer(frozen)
    with pytest.raises(RingAttachError, match="must be writable"):
        ring_impl.RingProducer(memoryview(region).toreadonly())
    region.close()


def test_attach_not_a_buffer(ring_impl: ModuleType) -> None:
    with pytest.raises(RingAttachError, match="buffer protocol, not int"):
        ring_impl.RingProducer(42)


def test_attach_positions_invalid(ring_impl: ModuleType) -> None:
    region = make_ring(ring_impl, 1024)
    struct.pack_into("<Q", region, ring_impl.LAYOUT["tail_offset"], 5000)
    with pytest.raises(RingCorrupted, match="positions invalid at attach: head 0, tail 5000"):
        ring_impl.RingConsumer(region)
    region.close()


@pytest.mark.parametrize("capacity", [0, 8, 100, 1023])
def test_format_rejects_bad_capacity(ring_impl: ModuleType, capacity: int) -> None:
    region = mmap.mmap(-1, 8192)
    with pytest.raises(ValueError, match="power of two"):
        ring_impl.format_ring(region, capacity)
    with pytest.raises(ValueError, match="power of two"):
        ring_impl.ring_size(capacity)
    region.close()


def test_format_picks_largest_power_of_two(ring_impl: ModuleType) -> None:
    region = mmap.mmap(-1, 3 * 4096)
    assert ring_impl.format_ring(region) == 8192
    assert ring_impl.RingProducer(region).capacity == 8192
    assert ring_impl.ring_size(8192) == 8192 + ring_impl.HEADER_SIZE
    with pytest.raises(RingAttachError, match="cannot hold"):
        ring_impl.format_ring(region, 16384)
    region.close()


# --- data ------------------------------------------------------------------


def test_wrapping_write_is_split_not_dropped(ring_impl: ModuleType) -> None:
    region = make_ring(ring_impl, 64)
    producer, consumer = ends(ring_impl, region)
    assert producer.write(b"a" * 50) == 50
    assert consumer.read(40) == b"a" * 40
    payload = bytes(range(60))
    assert producer.write(payload) == 54  # 10 used: 54 free, crossing the end
    assert consumer.read() == b"a" * 10 + payload[:54]
    producer.release(), consumer.release()
    region.close()


def test_readinto_memoryview_and_partial(ring_impl: ModuleType) -> None:
    region = make_ring(ring_impl, 64)
    producer, consumer = ends(ring_impl, region)
    producer.write(b"0123456789")
    buf = bytearray(4)
    assert consumer.readinto(memoryview(buf)) == 4
    assert buf == b"0123"
    assert consumer.readinto(bytearray(100)) == 6
    assert consumer.readinto(bytearray(10)) is None
    producer.write(b"x")
    with pytest.raises(BufferError):
        consumer.readinto(b"immutable")
    assert consumer.read() == b"x"  # nothing consumed by the failed call
    producer.release(), consumer.release()
    region.close()


def test_eof_after_close_drains_first(ring_impl: ModuleType) -> None:
    region = make_ring(ring_impl, 64)
    producer, consumer = ends(ring_impl, region)
    producer.write(b"tail")
    producer.close()
    producer.close()  # idempotent
    assert consumer.peer_closed
    assert not consumer.at_eof()
    assert consumer.read() == b"tail"
    assert consumer.at_eof()
    assert consumer.read() == b""
    assert consumer.readinto(bytearray(8)) == 0
    view = consumer.peek()
    assert view is not None and len(view) == 0
    view.release()
    with pytest.raises(RingClosed, match="after its producer closed"):
        producer.write(b"more")
    producer.release(), consumer.release()
    region.close()


def test_consumer_close_breaks_writes(ring_impl: ModuleType) -> None:
    region = make_ring(ring_impl, 64)
    producer, consumer = ends(ring_impl, region)
    consumer.close()
    assert producer.peer_closed
    with pytest.raises(RingClosed, match="consumer has closed"):
        producer.write(b"x")
    with pytest.raises(BrokenPipeError):  # RingClosed is a BrokenPipeError
        producer.write_all(b"x")
    producer.release(), consumer.release()
    region.close()


def test_peek_is_zero_copy_and_survives_release(ring_impl: ModuleType) -> None:
    region = make_ring(ring_impl, 64)
    producer, consumer = ends(ring_impl, region)
    producer.write(b"abcdef")
    view = consumer.peek(3)
    assert view is not None and bytes(view) == b"abc"
    region[ring_impl.HEADER_SIZE] = ord("Z")  # the view shows the ring's memory
    assert bytes(view) == b"Zbc"
    consumer.consume(2)
    assert consumer.read() == b"cdef"
    consumer.release()
    assert bytes(view) == b"Zbc"  # still valid: it holds its own export
    with pytest.raises(BufferError):
        region.close()  # cannot unmap while a view is out
    view.release()
    producer.release()
    region.close()


def test_release_unpins_mapping_and_blocks_use(ring_impl: ModuleType) -> None:
    region = make_ring(ring_impl, 64)
    producer, consumer = ends(ring_impl, region)
    with pytest.raises(BufferError):
        region.close()
    producer.release()
    consumer.release()
    assert producer.released and consumer.released
    with pytest.raises(ValueError, match="released"):
        producer.write(b"x")
    with pytest.raises(ValueError, match="released"):
        consumer.read()
    region.close()


def test_context_manager_closes_and_releases(ring_impl: ModuleType) -> None:
    region = make_ring(ring_impl, 64)
    with ring_impl.RingProducer(region) as producer:
        producer.write(b"hi")
    assert producer.released
    with ring_impl.RingConsumer(region) as consumer:
        assert consumer.read() == b"hi"
        assert consumer.at_eof()
    region.close()


# --- sleep / wake flags ------------------------------------------------------


def test_consumer_sleep_and_producer_wake(ring_impl: ModuleType) -> None:
    region = make_ring(ring_impl, 64)
    producer, consumer = ends(ring_impl, region)
    assert not producer.wake_needed()
    assert consumer.prepare_sleep()  # empty: go to sleep
    producer.write(b"x")
    assert producer.wake_needed()  # consumer sleeps: ring once
    assert not producer.wake_needed()
    assert not consumer.prepare_sleep()  # data is there: don't sleep
    assert not producer.wake_needed()
    consumer.read()
    assert consumer.prepare_sleep()
    consumer.cancel_sleep()
    assert not producer.wake_needed()
    producer.close()
    assert not consumer.prepare_sleep()  # EOF: don't sleep
    producer.release(), consumer.release()
    region.close()


def test_producer_wait_and_consumer_wake(ring_impl: ModuleType) -> None:
    region = make_ring(ring_impl, 16)
    producer, consumer = ends(ring_impl, region)
    producer.write(b"x" * 16)
    assert not consumer.wake_needed()
    assert producer.prepare_wait(4)  # full: wait
    consumer.read(2)
    assert consumer.wake_needed()
    assert not consumer.wake_needed()
    assert producer.prepare_wait(4)  # 2 free, 4 needed: still wait
    consumer.read(2)
    assert consumer.wake_needed()
    assert not producer.prepare_wait(4)
    producer.prepare_wait(16)
    producer.cancel_wait()
    assert not consumer.wake_needed()
    consumer.close()
    assert not producer.prepare_wait(16)  # nothing to wait for: writes will fail
    producer.release(), consumer.release()
    region.close()


# --- corruption: the peer moves positions ------------------------------------


def test_consumer_detects_tail_beyond_capacity_and_stays_poisoned(ring_impl: ModuleType) -> None:
    region = make_ring(ring_impl, 64)
    producer, consumer = ends(ring_impl, region)
    producer.write(b"abc")
    struct.pack_into("<Q", region, ring_impl.LAYOUT["tail_offset"], 10_000)
    with pytest.raises(RingCorrupted, match="more than capacity 64 ahead"):
        consumer.read()
    assert consumer.corrupted
    struct.pack_into("<Q", region, ring_impl.LAYOUT["tail_offset"], 3)  # even if repaired
    with pytest.raises(RingCorrupted, match="already saw"):
        consumer.read()
    producer.release(), consumer.release()
    region.close()


def test_consumer_detects_tail_going_backwards(ring_impl: ModuleType) -> None:
    region = make_ring(ring_impl, 64)
    producer, consumer = ends(ring_impl, region)
    producer.write(b"abcdef")
    assert consumer.read(2) == b"ab"
    struct.pack_into("<Q", region, ring_impl.LAYOUT["tail_offset"], 4)
    with pytest.raises(RingCorrupted, match="tail moved backwards: 4 < 6"):
        consumer.used()
    producer.release(), consumer.release()
    region.close()


def test_producer_detects_bad_head(ring_impl: ModuleType) -> None:
    region = make_ring(ring_impl, 64)
    producer, consumer = ends(ring_impl, region)
    producer.write(b"abcdef")
    struct.pack_into("<Q", region, ring_impl.LAYOUT["head_offset"], 50)
    producer.write(b"x")  # room by the cached head: the shared one is not read
    with pytest.raises(RingCorrupted, match="head 50 is past the producer tail 7"):
        producer.write(b"y" * 60)  # needs more room: reads the head, rejects it
    other = make_ring(ring_impl, 64)
    p2, c2 = ends(ring_impl, other)
    p2.write(b"abcdef")
    c2.read(4)
    p2.free()
    struct.pack_into("<Q", other, ring_impl.LAYOUT["head_offset"], 1)
    with pytest.raises(RingCorrupted, match="head moved backwards: 1 < 4"):
        p2.free()
    for end in (producer, consumer, p2, c2):
        end.release()
    region.close()
    other.close()


def test_own_position_in_shared_memory_is_never_trusted(ring_impl: ModuleType) -> None:
    region = make_ring(ring_impl, 64)
    producer, consumer = ends(ring_impl, region)
    producer.write(b"abc")
    # The peer scribbles over *our* published position: we keep our own copy.
    struct.pack_into("<Q", region, ring_impl.LAYOUT["head_offset"], 2)
    assert consumer.read() == b"abc"
    assert consumer.position == 3
    producer.release(), consumer.release()
    region.close()


# --- selection ---------------------------------------------------------------


@pytest.mark.parametrize(("env", "expected"), [("1", "python"), ("", "cython"), ("0", "cython")])
def test_environment_selects_implementation(env: str, expected: str) -> None:
    code = "import aiocoloc.ring as r; print(r.IMPLEMENTATION, r.RingProducer.__module__)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "AIOCOLOC_NO_EXTENSIONS": env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out[0] == expected
    assert out[1] == ("aiocoloc._ring_py" if expected == "python" else "aiocoloc._ring")
