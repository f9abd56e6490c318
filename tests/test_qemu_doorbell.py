"""Doorbells between VMs: two QEMU (TCG) guests with ivshmem-doorbell devices on
one ivshmem server ping-pong through interrupts taken in user space by VFIO
(``IvshmemVfio``), and through 1-byte messages on TCP over their link, and
report both round trips.  Skipped, with the reason, where QEMU guests cannot
run.  ``IvshmemVfio``'s refusals are checked on a fake sysfs without QEMU."""

from __future__ import annotations

import contextlib
import json
import random
import signal
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from aiocoloc.notify.vfio import IvshmemVfio, VfioUnavailable

from .conftest import SHM_DIR
from .qemu import harness
from .qemu.l2hub import L2Hub

REPO = Path(__file__).resolve().parent.parent
GUEST = [sys.executable, "tests/qemu/guest_doorbell.py"]
SHM_SIZE = 1 << 20
ROUNDS = 1000
MAGIC = 0x1F5E_D00B  # what guest_doorbell.py writes beside its IVPosition
TCP_PORT = 7100


def _wait(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


@pytest.mark.qemu
@pytest.mark.timeout(600)
def test_doorbell_round_trip_between_guests_vs_tcp(tmp_path: Path) -> None:
    try:
        harness.prepare()
    except harness.QemuUnavailable as exc:
        pytest.skip(f"QEMU guests cannot run here: {exc}")
    started = time.monotonic()
    shm = f"aiocoloc-test-doorbell-{uuid.uuid4().hex[:12]}"
    sock = tmp_path / "ivshmem.sock"
    command = [sys.executable, "-m", "aiocoloc.cli.ivshmem_server", "--socket", str(sock)]
    server = subprocess.Popen(
        [*command, "--shm", shm, "--size", str(SHM_SIZE), "--remove-shm", "--verbose"],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    guests: list[harness.Guest] = []
    stack = contextlib.ExitStack()
    try:
        _wait(sock.exists, "the ivshmem server did not start")
        net = random.randrange(1, 255)
        addr = f"169.254.{net}.1"
        hub = stack.enter_context(L2Hub())  # the guests' link, on the host's loopback
        for role, host in (("a", 1), ("b", 2)):
            guests.append(
                harness.start_guest(
                    [*GUEST, role, addr, str(TCP_PORT), str(ROUNDS)],
                    cwd=REPO,
                    memory="512M",
                    doorbell=str(sock),
                    net=f"connect:{hub.port}",
                    ip=f"169.254.{net}.{host}/16",
                )
            )
        results = [guest.wait(300) for guest in guests]
        elapsed = time.monotonic() - started
        memory = (Path(SHM_DIR) / shm).read_bytes()[:128]
    finally:
        for guest in guests:
            guest.kill()
        stack.close()
        server.send_signal(signal.SIGTERM)
        try:
            server_log = server.communicate(timeout=10)[1]
        except subprocess.TimeoutExpired:
            server.kill()
            server_log = server.communicate()[1]
        (Path(SHM_DIR) / shm).unlink(missing_ok=True)
    for role, guest, (status, output) in zip("ab", guests, results, strict=True):
        print(
            f"guest {role}: boot {guest.boot_seconds or 0:.1f} s, done {guest.total_seconds or 0:.1f} s"
        )
        assert status == 0, f"guest {role}:\n{output[-3000:]}\nserver:\n{server_log}"
    assert server.returncode == 0, server_log
    assert not sock.exists()

    # Both guests left their IVPosition in BAR2, which is the server's shm.
    positions = [struct.unpack_from("<Q", memory, off)[0] for off in (0, 64)]
    assert all(word >> 32 == MAGIC for word in positions), positions
    assert len({word & 0xFFFF for word in positions}) == 2
    line = next(x for x in results[0][1].splitlines() if x.startswith("GUEST_RESULT "))
    result = json.loads(line.removeprefix("GUEST_RESULT "))
    print(f"{ROUNDS} round trips each, two TCG guests, {elapsed:.1f} s wall: {result}")
    assert "answered doorbells" in results[1][1] and f"{ROUNDS + 5} TCP messages" in results[1][1]
    for path in ("doorbell_us", "tcp_us"):
        p50, p99 = result[path]["p50"], result[path]["p99"]
        assert 0 < result[path]["min"] <= p50 <= p99 < 1_000_000, result


# --- refusals, on a fake sysfs ---------------------------------------------------------


def _fake_device(root: Path, *, vfio_driver: bool = False, bound: bool = False) -> Path:
    device = root / "sys" / "bus" / "pci" / "devices" / "0000:00:04.0"
    device.mkdir(parents=True)
    (device / "vendor").write_text("0x1af4\n")
    (device / "device").write_text("0x1110\n")
    (device / "driver_override").write_text("(null)\n")
    (root / "sys" / "bus" / "pci" / "drivers_probe").write_text("")
    driver = root / "sys" / "bus" / "pci" / "drivers" / "vfio-pci"
    if vfio_driver or bound:
        driver.mkdir(parents=True)
    if bound:
        (device / "driver").symlink_to(driver)
    return device


def _open(root: Path) -> IvshmemVfio:
    return IvshmemVfio.open(sysfs_root=root / "sys", dev_root=root / "dev")


def test_no_device(tmp_path: Path) -> None:
    with pytest.raises(VfioUnavailable, match=r"no ivshmem device \(PCI 1af4:1110\)"):
        _open(tmp_path)


def test_no_vfio_pci_module(tmp_path: Path) -> None:
    _fake_device(tmp_path)
    with pytest.raises(VfioUnavailable, match="vfio-pci module is not loaded"):
        _open(tmp_path)


def test_binds_an_unbound_device_to_vfio_pci(tmp_path: Path) -> None:
    device = _fake_device(tmp_path, vfio_driver=True)
    with pytest.raises(VfioUnavailable, match="vfio-pci did not take the device"):
        _open(tmp_path)  # a fake sysfs does not probe
    assert (device / "driver_override").read_text() == "vfio-pci"
    assert (tmp_path / "sys" / "bus" / "pci" / "drivers_probe").read_text() == device.name


def test_no_iommu_group(tmp_path: Path) -> None:
    _fake_device(tmp_path, bound=True)
    with pytest.raises(VfioUnavailable, match="no IOMMU group.*intel-iommu"):
        _open(tmp_path)


def test_no_vfio_container(tmp_path: Path) -> None:
    device = _fake_device(tmp_path, bound=True)
    group = tmp_path / "sys" / "kernel" / "iommu_groups" / "7"
    group.mkdir(parents=True)
    (device / "iommu_group").symlink_to(group)
    (tmp_path / "dev" / "vfio").mkdir(parents=True)
    (tmp_path / "dev" / "vfio" / "7").write_text("")
    with pytest.raises(VfioUnavailable, match="cannot open .*vfio/vfio") as raised:
        _open(tmp_path)
    assert isinstance(raised.value, OSError) and raised.value.errno == 2
