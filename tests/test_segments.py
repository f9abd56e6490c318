"""Segment backends: create, attach, map, close, and every way they refuse."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import posix_ipc
import pytest

from aiocoloc.errors import SegmentError
from aiocoloc.shm.segments import (
    IvshmemSegment,
    MemfdSegment,
    PosixShmSegment,
    UnlinkPolicy,
    find_ivshmem_devices,
    receive_segment,
    send_segment,
)

from .conftest import SHM_PREFIX


def shm_name() -> str:
    return f"/{SHM_PREFIX}-test-{uuid.uuid4().hex[:12]}"


# --- memfd ------------------------------------------------------------------------


def test_memfd_create_map_and_share_over_unix_socket() -> None:
    segment = MemfdSegment.create(1 << 20)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        send_segment(a, segment, b"pool-42")
        received, tag = receive_segment(b)
        assert tag == b"pool-42"
        assert received.identity == segment.identity  # same inode, same memory
        assert received.size == 1 << 20
        mine, theirs = segment.map(), received.map()
        mine[100:105] = b"hello"
        assert theirs[100:105] == b"hello"
        mine.close()
        theirs.close()
        received.close()
    finally:
        segment.close()
        a.close()
        b.close()
    assert segment.closed
    segment.close()  # idempotent


def test_memfd_is_sealed_against_shrink_and_grow() -> None:
    segment = MemfdSegment.create(1 << 16)
    with pytest.raises(PermissionError):
        os.ftruncate(segment.fd, 4096)  # a peer trying to shrink it
    with pytest.raises(PermissionError):
        os.ftruncate(segment.fd, 1 << 20)
    assert os.fstat(segment.fd).st_size == 1 << 16
    segment.close()


def test_memfd_from_peer_must_be_sealed() -> None:
    fd = os.memfd_create("unsealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 4096)
    with pytest.raises(SegmentError, match="not sealed against shrinking"):
        MemfdSegment.from_fd(fd)
    with pytest.raises(OSError):
        os.fstat(fd)  # the refused descriptor was closed, not leaked


def test_memfd_from_peer_must_be_a_memfd() -> None:
    r, w = os.pipe()
    with pytest.raises(SegmentError, match="not a memfd"):
        MemfdSegment.from_fd(r)
    os.close(w)


def test_receive_segment_garbage_and_timeout() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.sendall(b"not a segment")
    with pytest.raises(SegmentError, match="did not send one memfd"):
        receive_segment(b)
    with pytest.raises(SegmentError, match="no memfd arrived within 0.1 s"):
        receive_segment(b, timeout=0.1)
    a.close()
    b.close()


def test_memfd_cannot_go_over_tcp() -> None:
    segment = MemfdSegment.create(4096)
    tcp = socket.socket()
    with pytest.raises(SegmentError, match="Unix socket"):
        send_segment(tcp, segment)
    tcp.close()
    segment.close()


def test_memfd_bad_size() -> None:
    with pytest.raises(SegmentError, match="positive"):
        MemfdSegment.create(0)


def test_memfd_leaves_nothing_after_kill_9() -> None:
    """A process holding a memfd pool with a pipe in use dies by SIGKILL:
    nothing is left named anywhere."""
    code = (
        "import os, time, sys; sys.path.insert(0, sys.argv[1]);"
        "from aiocoloc.shm import MemfdSegment, Pool;"
        "s = MemfdSegment.create(1 << 20); p = Pool.create(s);"
        "h = p.create_pipe(p.slot, p.slot); p.pipe_producer(h).write(b'live');"
        "print(os.getpid(), s.fd, flush=True); time.sleep(60)"
    )
    before = set(os.listdir("/dev/shm"))
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(Path(__file__).parent.parent)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    pid, fd = map(int, proc.stdout.readline().split())
    assert os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:aiocoloc-pool")
    proc.kill()
    proc.wait()
    assert set(os.listdir("/dev/shm")) == before


# --- POSIX shm -----------------------------------------------------------------------


def test_posix_create_attach_unlink_on_close() -> None:
    name = shm_name()
    created = PosixShmSegment.create(name, 8192)
    assert os.stat("/dev/shm" + name).st_mode & 0o777 == 0o600
    attached = PosixShmSegment.attach(name)
    assert attached.identity == created.identity == f"posix:{name}"
    m1, m2 = created.map(), attached.map()
    m1[:3] = b"abc"
    assert m2[:3] == b"abc"
    m1.close()
    m2.close()
    attached.close()
    assert os.path.exists("/dev/shm" + name)  # attachers never unlink by default
    created.close()
    assert not os.path.exists("/dev/shm" + name)


def test_posix_never_policy_keeps_the_name() -> None:
    name = shm_name()
    seg = PosixShmSegment.create(name, 4096, unlink=UnlinkPolicy.NEVER)
    seg.close()
    assert os.path.exists("/dev/shm" + name)
    again = PosixShmSegment.attach(name)
    again.unlink()
    again.close()
    assert not os.path.exists("/dev/shm" + name)


def test_posix_group_mode() -> None:
    name = shm_name()
    seg = PosixShmSegment.create(name, 4096, group=0)
    st = os.stat("/dev/shm" + name)
    assert st.st_mode & 0o777 == 0o660 and st.st_gid == 0
    seg.close()
    with pytest.raises(SegmentError, match="no such group"):
        PosixShmSegment.create(shm_name(), 4096, group="no-such-group-aiocoloc")


def test_posix_errors() -> None:
    name = shm_name()
    with pytest.raises(SegmentError, match=f"no shared memory named {name}"):
        PosixShmSegment.attach(name)
    seg = PosixShmSegment.create(name, 4096)
    with pytest.raises(SegmentError, match="already exists"):
        PosixShmSegment.create(name, 4096)
    with pytest.raises(SegmentError, match="holds 4096 bytes, need at least 8192"):
        PosixShmSegment.attach(name, min_size=8192)
    with pytest.raises(SegmentError, match="invalid POSIX shared memory name"):
        PosixShmSegment.create("a/b", 4096)
    with pytest.raises(SegmentError, match="positive"):
        PosixShmSegment.create(shm_name(), 0)
    seg.close()


def test_posix_attach_waits_for_its_creator_to_size_it() -> None:
    """Between a creator's shm_open and its ftruncate the segment holds 0
    bytes: a process that opens it then waits (CI once saw one of eight
    processes opening a new pool fail there), and gives up after ``wait``."""
    name = shm_name()
    raw = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=0)
    try:
        with pytest.raises(SegmentError, match="holds 0 bytes, need at least 4096"):
            PosixShmSegment.attach(name, min_size=4096, wait=0.05)
        sizer = threading.Timer(0.05, os.ftruncate, (raw.fd, 8192))
        sizer.start()
        started = time.monotonic()
        seg = PosixShmSegment.attach(name, min_size=4096, wait=5.0)
        assert seg.size == 8192 and time.monotonic() - started < 2.0
        sizer.join()
        seg.close()
    finally:
        raw.close_fd()
        raw.unlink()


def test_posix_permission_denied_names_the_mode() -> None:
    name = shm_name()
    seg = PosixShmSegment.create(name, 4096)  # 0600, owned by us (root)
    code = (
        "import os, sys; sys.path.insert(0, sys.argv[2]);"
        "from aiocoloc.shm.segments import PosixShmSegment; from aiocoloc.errors import SegmentError;"
        "os.setgid(65534); os.setuid(65534)\n"  # after the imports: site-packages is root's
        "try:\n    PosixShmSegment.attach(sys.argv[1])\n"
        "except SegmentError as e:\n    print(e)"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, name, str(Path(__file__).parent.parent)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "permission denied" in out.stdout, out.stderr
        assert "mode 0600" in out.stdout
    finally:
        seg.close()


# --- ivshmem (fake sysfs) ---------------------------------------------------------------


def fake_device(
    root: Path, address: str, size: int | None, vendor: str = "0x1af4", device: str = "0x1110"
) -> Path:
    d = root / "bus" / "pci" / "devices" / address
    d.mkdir(parents=True)
    (d / "vendor").write_text(vendor + "\n")
    (d / "device").write_text(device + "\n")
    if size is not None:
        with open(d / "resource2", "wb") as f:
            f.truncate(size)
    return d


def test_ivshmem_found_and_mapped(tmp_path: Path) -> None:
    fake_device(tmp_path, "0000:00:03.0", None, vendor="0x8086", device="0x100e")  # a NIC
    fake_device(tmp_path, "0000:00:04.0", 1 << 20)
    fake_device(tmp_path, "0000:00:05.0", 1 << 21)
    assert [d.name for d in find_ivshmem_devices(tmp_path)] == ["0000:00:04.0", "0000:00:05.0"]
    seg = IvshmemSegment.open(sysfs_root=tmp_path)
    assert seg.size == 1 << 20 and seg.identity == "ivshmem:0000:00:04.0"
    m = seg.map()
    m[:4] = b"bar2"
    m.close()
    seg.close()
    assert (tmp_path / "bus/pci/devices/0000:00:04.0/resource2").read_bytes()[:4] == b"bar2"
    second = IvshmemSegment.open(sysfs_root=tmp_path, address="0000:00:05.0")
    assert second.size == 1 << 21
    second.close()


def test_ivshmem_errors(tmp_path: Path) -> None:
    with pytest.raises(SegmentError, match="no ivshmem device"):
        IvshmemSegment.open(sysfs_root=tmp_path)
    fake_device(tmp_path, "0000:00:04.0", 3 * 4096)
    with pytest.raises(SegmentError, match="BAR2 size 12288 is not a power of two"):
        IvshmemSegment.open(sysfs_root=tmp_path)
    fake_device(tmp_path, "0000:00:06.0", None)
    with pytest.raises(SegmentError, match="no BAR2"):
        IvshmemSegment.open(sysfs_root=tmp_path, address="0000:00:06.0")
    with pytest.raises(SegmentError, match="at 0000:00:09.0"):
        IvshmemSegment.open(sysfs_root=tmp_path, address="0000:00:09.0")
    with pytest.raises(SegmentError, match="#5 requested, 2 present"):
        IvshmemSegment.open(sysfs_root=tmp_path, index=5)
