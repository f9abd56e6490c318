"""The ``aiocoloc`` CLI against real sidecars: members and pools as tables
and as JSON, attach and detach, and a clear error when no sidecar runs."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.discovery.daemon_harness import Cluster, cli, loopback_ips, wait_for
from tests.discovery.daemon_pools import posix_pool


def test_no_sidecar(tmp_path: Path) -> None:
    for argv in (["members"], ["pools", "--json"], ["pools", "attach", "x"], ["status"]):
        result = cli(*argv, "--api", str(tmp_path / "none.sock"))
        assert result.returncode == 1
        assert result.stdout == ""
        assert result.stderr.splitlines() == [
            f"aiocoloc: the sidecar is not running: no aiocoloc-discoveryd answers on "
            f"{tmp_path / 'none.sock'} (No such file or directory)"
        ]


def test_default_socket(tmp_path: Path) -> None:
    env = {**os.environ, "AIOCOLOC_RUNTIME_DIR": str(tmp_path)}
    result = cli("members", env=env)
    assert result.returncode == 1 and str(tmp_path / "discoveryd.sock") in result.stderr


def test_bad_command_lines() -> None:
    for argv in ([], ["dance"], ["pools", "attach"], ["members", "--timeout", "-1"]):
        result = cli(*argv)
        assert result.returncode == 2, argv
        assert "Traceback" not in result.stderr and "usage: aiocoloc" in result.stderr


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Cluster, str, str]]:
    """Two sidecars that joined each other, one mapping a POSIX pool; the
    second finds its API socket by itself (in ``$AIOCOLOC_RUNTIME_DIR``)."""
    cluster = Cluster(tmp_path)
    ip_a, ip_b = loopback_ips(2)
    default_api = Path(os.environ["AIOCOLOC_RUNTIME_DIR"]) / "discoveryd.sock"
    with posix_pool() as (name, pool_id):
        try:
            a = cluster.start("cli-a", ip_a, "--pool", name)
            b = cluster.start("cli-b", ip_b, "--join", f"{ip_a}:7946", api=default_api)
            a.wait_ready()
            b.wait_ready()
            yield cluster, name, pool_id
        finally:
            cluster.finish()


def test_members_and_pools(pair: tuple[Cluster, str, str]) -> None:
    cluster, name, pool_id = pair
    a, b = cluster.daemons

    def members_json() -> list[dict[str, object]]:
        result = cli("members", "--api", str(a.api), "--json")
        assert result.returncode == 0, result.stderr
        members: list[dict[str, object]] = json.loads(result.stdout)
        return members

    wait_for(lambda: len(members_json()) == 2, 10, "both members seen through the CLI")
    members = {m["node"]: m for m in members_json()}
    assert members["cli-a"]["pools"] == [pool_id] and members["cli-a"]["colocated"] is True
    assert members["cli-b"]["status"] == "alive" and members["cli-b"]["colocated"] is False
    assert members["cli-b"]["addresses"][0] == b.address  # type: ignore[index]
    for key in ("node", "addresses", "pools", "status", "colocated"):
        assert all(key in m for m in members.values())

    table = cli("members", "--api", str(a.api))
    assert table.returncode == 0
    assert "cli-a *" in table.stdout and "cli-b" in table.stdout and "this node" in table.stdout

    pools = cli("pools", "--api", str(a.api), "--json")
    assert json.loads(pools.stdout)[0] | {"members": 0} == {
        "name": name,
        "id": pool_id,
        "kind": "posix",
        "size": 1 << 18,
        "members": 0,
        "source": "config",
    }
    assert pool_id in cli("pools", "--api", str(a.api)).stdout
    assert cli("pools", "--api", str(b.api)).stdout.strip() == "no pools mapped"

    # The operator's migration hook, through the CLI; the other side sees it.
    attached = cli("pools", "attach", name, "--api", str(b.api))
    assert attached.returncode == 0, attached.stderr
    assert attached.stdout.strip() == f"attached pool {name} ({pool_id})"
    wait_for(
        lambda: {m["node"]: m["colocated"] for m in members_json()}["cli-b"] is True,
        5,
        "cli-b co-located at cli-a after attaching",
    )
    again = cli("pools", "attach", name, "--api", str(b.api))
    assert (
        again.returncode == 1
        and again.stderr.startswith("aiocoloc: pool")
        and "(conflict)" in again.stderr
    )
    detached = cli("pools", "detach", pool_id, "--api", str(b.api), "--json")
    assert json.loads(detached.stdout)["id"] == pool_id
    unknown = cli("pools", "detach", "nope", "--api", str(b.api))
    assert unknown.returncode == 1 and "no pool 'nope' is mapped (not-found)" in unknown.stderr

    colocated = cli("colocated", b.ip, "--api", str(a.api), "--json")
    assert json.loads(colocated.stdout)["member"]["node"] == "cli-b"
    status = json.loads(cli("status", "--json").stdout)  # the default socket: b's
    assert (status["node"], status["profile"], status["engine"]) == ("cli-b", "host", "embedded")


def test_pools_create_formats_a_host_pool_once_and_refuses_bad_sizes() -> None:
    from aiocoloc.shm import Pool, PosixShmSegment

    from .conftest import SHM_PREFIX

    name = f"{SHM_PREFIX}-cli-{os.getpid()}"
    path = Path("/dev/shm") / name
    try:
        first = cli("pools", "create", name, "--size", "4M", "--slice-size", "16K", "--lease", "30")
        assert first.returncode == 0, first.stderr
        assert "created" in first.stdout and path.stat().st_size == 4 << 20
        pool = Pool.attach(PosixShmSegment.attach(name))
        try:
            assert str(pool.id) in first.stdout and pool.geometry.slice_size == 16384
            assert pool.lease == 30.0
        finally:
            pool.close()
        again = cli("pools", "create", name, "--size", "4M")
        assert again.returncode == 0 and "already formatted" in again.stdout
        assert str(pool.id) in again.stdout  # the same pool: nothing re-formatted
    finally:
        path.unlink(missing_ok=True)
    for args in (["--size", "3M"], ["--size", "lots"], ["--size", "0"], ["--lease", "0.1"]):
        bad = cli("pools", "create", f"{name}-bad", *args)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
        assert bad.stderr.startswith(f"aiocoloc: pool {name}-bad: ")
        assert not (Path("/dev/shm") / f"{name}-bad").exists()
