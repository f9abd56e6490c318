"""A sidecar's death, leave and reload as its peers see them: ``kill -9`` of
a co-located sidecar is ``failed`` at its peer within 0.5 s (through the
pool, before gossip); SIGTERM is ``leave``; SIGHUP re-probes the pools."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from discovery.keys import Keyring
from discovery.profiles import PROFILES
from tests.discovery.daemon_events import Recorder
from tests.discovery.daemon_harness import Cluster, Daemon, loopback_ips, wait_for
from tests.discovery.daemon_pools import fake_ivshmem, posix_pool


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path)
    try:
        yield cluster
    finally:
        cluster.finish()


def _sees(daemons: Cluster | list[Daemon], count: int) -> None:
    daemons = daemons.daemons if isinstance(daemons, Cluster) else daemons
    for daemon in daemons:
        daemon.wait_ready()
    for daemon in daemons:
        wait_for(
            lambda d=daemon: (
                sum(  # type: ignore[misc]
                    m["status"] == "alive" for m in d.request("members")["result"]["members"]
                )
                == count
            ),
            10,
            f"{daemon.node} sees {count} members",
        )


@pytest.mark.asyncio
async def test_kill_9_of_a_colocated_sidecar(cluster: Cluster) -> None:
    """x and y share a pool, z shares none.  Killing x: y's subscribers see
    ``failed`` within 0.5 s through the pool; z learns it by gossip, later;
    y does not say it twice when gossip catches up."""
    ip_x, ip_y, ip_z = loopback_ips(3)
    with posix_pool(lease=1.0) as (name, _):
        x = cluster.start("x", ip_x, "--pool", name)
        y = cluster.start("y", ip_y, "--pool", name, "--join", x.address)
        z = cluster.start("z", ip_z, "--join", x.address)
        _sees(cluster, 3)
        wait_for(lambda: y.request("status")["result"]["watching"] == {"x": 1}, 5, "y watches x")
        async with y.client() as y_client, z.client() as z_client:
            at_y = await Recorder.start(y_client)
            at_z = await Recorder.start(z_client)
            try:
                killed = time.monotonic()
                os.kill(x.pid, signal.SIGKILL)
                arrived, event = await at_y.wait(
                    lambda e: e.kind == "failed" and e.member.node == "x", 5, "x failed at y"
                )
                pool_seconds = arrived - killed
                assert event.member.status.value == "failed"
                bound = PROFILES["host"].failure_detection_bound(3)
                gossip_at, _ = await at_z.wait(
                    lambda e: e.kind == "failed" and e.member.node == "x",
                    bound + 3,
                    "x failed at z (gossip)",
                )
                gossip_seconds = gossip_at - killed
                # By now y's engine has failed x too: y said it once only.
                wait_for(
                    lambda: any(
                        m["node"] == "x" and m["status"] == "failed"
                        for m in y.request("members")["result"]["members"]
                    ),
                    5,
                    "x failed in y's member list",
                )
                assert at_y.kinds("x") == ["failed"]
            finally:
                await at_y.close()
                await at_z.close()
        assert "seen through the pool, before gossip" in y.log()
        x.finish()
    print(
        f"kill -9 known: through the pool {pool_seconds * 1000:.1f} ms, "
        f"by gossip {gossip_seconds * 1000:.0f} ms"
    )
    assert pool_seconds < 0.5


@pytest.mark.asyncio
async def test_a_stalled_heartbeat_then_revived(cluster: Cluster) -> None:
    """x stopped (SIGSTOP: alive, but its heartbeat stalls, as a paused VM's
    would): y declares it failed after three missed beats, through the pool,
    before gossip; x continued: y says ``join``."""
    ip_x, ip_y = loopback_ips(2)
    with posix_pool(lease=0.4) as (name, _):
        x = cluster.start("x", ip_x, "--pool", name)
        y = cluster.start("y", ip_y, "--pool", name, "--join", x.address)
        _sees(cluster, 2)
        wait_for(lambda: y.request("status")["result"]["watching"] == {"x": 1}, 5, "y watches x")
        async with y.client() as client:
            at_y = await Recorder.start(client)
            try:
                stopped = time.monotonic()
                x.signal(signal.SIGSTOP)
                try:
                    arrived, _ = await at_y.wait(
                        lambda e: e.kind == "failed" and e.member.node == "x", 5, "x failed at y"
                    )
                finally:
                    x.signal(signal.SIGCONT)
                stall_seconds = arrived - stopped
                await at_y.wait(lambda e: e.kind == "join" and e.member.node == "x", 10, "x back")
                wait_for(lambda: "x" in _alive_at(y), 5, "x alive at y again")
                assert at_y.kinds("x") == ["failed", "join"]
            finally:
                await at_y.close()
        assert "stalled for 0.3 s" in y.log()
    print(f"stalled heartbeat known through the pool in {stall_seconds * 1000:.0f} ms")
    # Three missed beats of a 0.4 s lease, plus a scan; gossip alone needs
    # seconds with two members (no one to confirm the suspicion).
    assert 0.25 < stall_seconds < 0.8


def _alive_at(daemon: Daemon) -> set[str]:
    members = daemon.request("members")["result"]["members"]
    return {m["node"] for m in members if m["status"] == "alive"}


@pytest.mark.asyncio
async def test_sigterm_is_a_leave(cluster: Cluster) -> None:
    """A co-located sidecar stopped with SIGTERM: its peer sees ``leave``,
    never ``failed`` (it leaves gossip before its pools), and it exits 0,
    its API socket removed."""
    ip_x, ip_y = loopback_ips(2)
    with posix_pool() as (name, pool_id):
        x = cluster.start("x", ip_x, "--pool", name)
        y = cluster.start("y", ip_y, "--pool", name, "--join", x.address)
        _sees(cluster, 2)
        wait_for(lambda: y.request("status")["result"]["watching"] == {"x": 1}, 5, "y watches x")
        async with y.client() as client:
            at_y = await Recorder.start(client)
            try:
                x.signal(signal.SIGTERM)
                await at_y.wait(lambda e: e.kind == "leave" and e.member.node == "x", 5, "x left")
                assert x.wait() == 0
                time.sleep(0.3)  # a late "failed" would have arrived by now
                assert at_y.kinds("x") == ["leave"]
            finally:
                await at_y.close()
        assert not x.api.exists()
        assert "left; bye" in x.log()
        # x left its pool slot: only y is a member of the pool now.
        (pool,) = y.request("pools")["result"]["pools"]
        assert (pool["id"], pool["members"]) == (pool_id, 1)
        y.signal(signal.SIGINT)
        assert y.wait() == 0


@pytest.mark.asyncio
async def test_sighup_reprobes_pools(cluster: Cluster, tmp_path: Path) -> None:
    """``--pool auto`` finds no ivshmem device and says so; a device appears,
    SIGHUP maps it and the peer sees ``update``; the device goes, SIGHUP
    unmaps it."""
    sysfs = tmp_path / "sys"
    sysfs.mkdir()
    ip_x, ip_y = loopback_ips(2)
    x = cluster.start("x", ip_x, "--pool", "auto", "--sysfs-root", str(sysfs))
    y = cluster.start("y", ip_y, "--join", x.address)
    _sees(cluster, 2)
    assert "auto: no ivshmem device (PCI 1af4:1110) under" in x.log()
    assert x.request("pools")["result"]["pools"] == []
    bar, pool_id = fake_ivshmem(sysfs)
    async with y.client() as client:
        at_y = await Recorder.start(client)
        try:
            x.signal(signal.SIGHUP)
            await at_y.wait(
                lambda e: e.kind == "update" and e.member.node == "x" and pool_id in e.member.pools,
                5,
                "x maps the new device",
            )
            (pool,) = x.request("pools")["result"]["pools"]
            assert (pool["id"], pool["name"], pool["kind"], pool["source"]) == (
                pool_id,
                str(bar),
                "ivshmem",
                "auto",
            )
            bar.unlink()
            x.signal(signal.SIGHUP)
            await at_y.wait(
                lambda e: e.kind == "update" and e.member.node == "x" and not e.member.pools,
                5,
                "x unmaps the vanished device",
            )
        finally:
            await at_y.close()
    assert x.request("pools")["result"]["pools"] == []
    assert "is gone; unmapping it" in x.log()


def test_key_file_and_reload(cluster: Cluster, tmp_path: Path) -> None:
    """Members with the same key file find each other, one with another key
    does not; SIGHUP reloads the key file and keeps the keys it has when the
    file went bad."""
    keys, other = tmp_path / "gossip.keys", tmp_path / "other.keys"
    Keyring.generate().save(keys)
    Keyring.generate().save(other)
    ip_x, ip_y, ip_z = loopback_ips(3)
    x = cluster.start("x", ip_x, "--key-file", str(keys))
    y = cluster.start("y", ip_y, "--key-file", str(keys), "--join", x.address)
    z = cluster.start("z", ip_z, "--key-file", str(other), "--join", x.address)
    z.wait_ready()
    _sees([x, y], 2)
    assert x.request("status")["result"]["encrypted"] is True
    wait_for(lambda: "join: no member answered" in z.log(), 10, "z cannot join")
    assert _alive_at(z) == {"z"} and "z" not in _alive_at(x)
    x.signal(signal.SIGHUP)
    wait_for(lambda: "key file unchanged" in x.log(), 5, "x reloaded its keys")
    keys.write_text("not a key\n")
    x.signal(signal.SIGHUP)
    wait_for(lambda: "keeping the keys we have" in x.log(), 5, "x kept its keys")
    assert "gossip.keys:1: not a base64 key" in x.log()
    assert _alive_at(x) == {"x", "y"}
