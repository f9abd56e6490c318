"""Two real processes stream random data through two rings in POSIX shared
memory, both directions at once, and agree on every byte (sha256)."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import uuid
from pathlib import Path

import posix_ipc
import pytest

from aiocoloc import _ring_py

from .conftest import SHM_PREFIX, _ring_c

PEER = Path(__file__).with_name("ring_peer.py")
RING_CAPACITY = 1 << 20
RING_BYTES = _ring_py.ring_size(RING_CAPACITY)
SECOND_RING = (RING_BYTES + 4095) // 4096 * 4096  # page-aligned second ring


def run_pair(nbytes: int, impl_a: str, impl_b: str, timeout: float = 240.0) -> None:
    name = f"/{SHM_PREFIX}-test-{uuid.uuid4().hex[:12]}"
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=2 * SECOND_RING)
    try:
        region = mmap.mmap(shm.fd, shm.size)
        shm.close_fd()
        _ring_py.format_ring(memoryview(region)[:RING_BYTES], RING_CAPACITY)
        _ring_py.format_ring(
            memoryview(region)[SECOND_RING : SECOND_RING + RING_BYTES], RING_CAPACITY
        )
        region.close()

        def spawn(send: int, recv: int, seed: int, impl: str) -> subprocess.Popen[str]:
            return subprocess.Popen(
                [
                    sys.executable,
                    str(PEER),
                    name,
                    "--send-offset",
                    str(send),
                    "--recv-offset",
                    str(recv),
                    "--ring-bytes",
                    str(RING_BYTES),
                    "--bytes",
                    str(nbytes),
                    "--seed",
                    str(seed),
                    "--impl",
                    impl,
                    "--timeout",
                    str(timeout - 10),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )

        seed = int.from_bytes(os.urandom(4), "little")
        a = spawn(0, SECOND_RING, seed, impl_a)
        b = spawn(SECOND_RING, 0, seed + 1, impl_b)
        try:
            out_a, _ = a.communicate(timeout=timeout)
            out_b, _ = b.communicate(timeout=timeout)
        finally:
            for proc in (a, b):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        assert a.returncode == 0 and b.returncode == 0, (out_a, out_b)
        res_a, res_b = json.loads(out_a), json.loads(out_b)
        assert res_a["sent"] == res_b["received"] == nbytes
        assert res_b["sent"] == res_a["received"] == nbytes
        assert res_a["sent_sha256"] == res_b["received_sha256"]
        assert res_b["sent_sha256"] == res_a["received_sha256"]
    finally:
        shm.unlink()


@pytest.mark.skipif(_ring_c is None, reason="Cython ring not built")
@pytest.mark.timeout(300)
def test_256_mib_both_directions_cython() -> None:
    run_pair(256 << 20, "cython", "cython")


@pytest.mark.timeout(300)
def test_both_directions_python_reference() -> None:
    run_pair(32 << 20, "python", "python")


@pytest.mark.skipif(_ring_c is None, reason="Cython ring not built")
@pytest.mark.timeout(300)
def test_cython_and_python_ends_interoperate() -> None:
    run_pair(16 << 20, "cython", "python")
