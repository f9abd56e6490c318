"""VMs of one host, for real: three QEMU guests on one guest link (an L2 hub
on the host's loopback), two of them mapping the host's pool through an
ivshmem device.  Each guest runs the discovery sidecar (``--pool auto``)
and an aiocoloc process.  A client in guest B connects by IP to the server
in guest A: the connection reaches shared memory on the ivshmem pool and an
8 MiB echo matches by sha256; then B writes garbage over the whole pool:
a clear error or TCP, no crash.  Guest C has no pool: its connection to the
same server stays on TCP with the reason.  Skipped, with the reason, where
QEMU guests cannot run."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aiocoloc.cli.provision import create_host_pool
from aiocoloc.transport import fallback
from discovery.keys import Keyring

from .conftest import SHM_PREFIX
from .qemu import harness
from .qemu.l2hub import L2Hub

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parent.parent
NODE = "tests/qemu/guest_vm_node.py"
POOL_SIZE, POOL_SIZE_QEMU = 16 << 20, "16M"
PORT = 18080


@pytest.fixture(scope="module")
def qemu_ready() -> None:
    try:
        harness.prepare()
    except harness.QemuUnavailable as exc:
        pytest.skip(f"QEMU guests cannot run here: {exc}")


@pytest.fixture
def host_pool() -> Iterator[tuple[str, str]]:
    """The host's pool, as an operator makes it: ``(name, pool id)``."""
    name = f"{SHM_PREFIX}-vms-{uuid.uuid4().hex[:10]}"
    pool_id, _ = create_host_pool(name, POOL_SIZE)
    try:
        yield name, pool_id
    finally:
        Path("/dev/shm", name).unlink(missing_ok=True)


def finish(guests: dict[str, harness.Guest]) -> dict[str, list[dict[str, Any]]]:
    """Each guest's ``NODE`` results once it powered off (all killed at the end
    whatever happens); a guest whose command failed fails the test with its
    console."""
    outcome = {}
    try:
        for role, guest in guests.items():
            status, output = guest.wait(420)
            assert status == 0, f"guest {role} exited with {status}:\n{output[-4000:]}"
            outcome[role] = [
                json.loads(line[5:]) for line in output.splitlines() if line.startswith("NODE {")
            ]
    finally:
        for guest in guests.values():
            guest.kill()
    return outcome


def test_guests_sharing_an_ivshmem_pool_upgrade_and_a_guest_without_it_stays_on_tcp(
    qemu_ready: None, host_pool: tuple[str, str], tmp_path: Path
) -> None:
    name, pool_id = host_pool
    key = tmp_path / "cluster.key"
    Keyring.generate().save(key)
    net = f"169.254.{random.randrange(1, 250)}"
    a_ip, b_ip, c_ip = f"{net}.1", f"{net}.2", f"{net}.3"
    python = [sys.executable, NODE]
    with L2Hub() as hub:
        link = f"connect:{hub.port}"
        common: dict[str, Any] = {"cwd": REPO, "net": link, "memory": "768M"}
        pool: dict[str, Any] = {"shm": name, "size": POOL_SIZE_QEMU}
        guests = {
            "a": harness.start_guest(
                [*python, "server", a_ip, str(PORT), "3", str(key)],
                ip=f"{a_ip}/16",
                **common,
                **pool,
            ),
            "b": harness.start_guest(
                [*python, "client", b_ip, a_ip, str(PORT), str(key), "shm", "200", "scribble"],
                ip=f"{b_ip}/16",
                **common,
                **pool,
            ),
            "c": harness.start_guest(
                [*python, "client", c_ip, a_ip, str(PORT), str(key), "tcp", "200"],
                ip=f"{c_ip}/16",
                **common,
            ),
        }
        outcome = finish(guests)
    b, scribbled = outcome["b"]
    assert b["mode"] == "shm" and b["rx_mode"] == "shm", b
    assert b["pool"] == pool_id  # the host's pool, through each guest's ivshmem device
    assert b["sha_match"] and b["bytes"] == 8 << 20
    assert b["doorbell"] == "message"  # (no doorbell device: bells ride the control channel)
    (c,) = outcome["c"]
    assert c["mode"] == "tcp" and c["reason"] == fallback.NOT_COLOCATED, c
    assert "shares no pool" in c["detail"]
    assert c["sha_match"]
    # Guest B scribbled over the whole pool under its live connection: that
    # connection ended with a clear error (or went on), nothing crashed (guest
    # A served on and exited 0), and a new connection works.
    old = scribbled["old_connection"]
    assert old == "still working" or any(w in old for w in ("shared-memory", "pipe", "pool")), old
    assert scribbled["new_works"], scribbled
    served = [r for r in outcome["a"] if r.get("served")]
    assert len(served) == 3 and "tcp" in {r["mode"] for r in served}, outcome["a"]
    print(
        f"\nVMs (TCG): shm echo {b['echo_mb_s']} MB/s, ping p50 {b['ping_p50_us']} us, "
        f"upgrade {b['upgrade_s']} s; TCP echo {c['echo_mb_s']} MB/s, "
        f"ping p50 {c['ping_p50_us']} us; boots "
        + ", ".join(f"{r} {g.boot_seconds or 0:.1f} s" for r, g in guests.items())
    )


def test_guests_ring_each_other_through_ivshmem_interrupts(
    qemu_ready: None, host_pool: tuple[str, str], tmp_path: Path
) -> None:
    """Both guests get the pool from an ivshmem server as ivshmem-doorbell
    devices; each sidecar owns its device through VFIO (``--doorbells vfio``)
    and grants it to the aiocoloc process, whose connection then rings the
    other guest by interrupt instead of a control message."""
    name, pool_id = host_pool
    key = tmp_path / "cluster.key"
    Keyring.generate().save(key)
    sock = tmp_path / "ivshmem.sock"
    ivshmem_server = [sys.executable, "-m", "aiocoloc.cli.ivshmem_server", "--socket", str(sock)]
    server = subprocess.Popen(
        [*ivshmem_server, "--shm", name, "--size", str(POOL_SIZE)],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    net = f"169.254.{random.randrange(1, 250)}"
    a_ip, b_ip = f"{net}.1", f"{net}.2"
    python = [sys.executable, NODE]
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert server.poll() is None, server.communicate()[1]
            assert time.monotonic() < deadline, "the ivshmem server did not start"
            time.sleep(0.05)
        with L2Hub() as hub:
            common: dict[str, Any] = {
                "cwd": REPO,
                "net": f"connect:{hub.port}",
                "doorbell": str(sock),
                "env": {"VM_DOORBELLS": "vfio"},
            }
            guests = {
                "a": harness.start_guest(
                    [*python, "server", a_ip, str(PORT), "1", str(key)], ip=f"{a_ip}/16", **common
                ),
                "b": harness.start_guest(
                    [*python, "client", b_ip, a_ip, str(PORT), str(key), "shm", "200"],
                    ip=f"{b_ip}/16",
                    **common,
                ),
            }
            outcome = finish(guests)
    finally:
        server.terminate()
        server.wait(10)
    (b,) = outcome["b"]
    assert b["mode"] == "shm" and b["rx_mode"] == "shm" and b["pool"] == pool_id, b
    assert b["doorbell"] == "vfio", b
    assert b["sha_match"]
    (a,) = [r for r in outcome["a"] if r.get("served")]
    assert a["doorbell"] == "vfio" and a["mode"] == "shm", a
    print(
        f"\nVMs with doorbell interrupts (TCG): shm echo {b['echo_mb_s']} MB/s, "
        f"ping p50 {b['ping_p50_us']} us, upgrade {b['upgrade_s']} s"
    )
