"""The sidecar's pools: naming, opening POSIX and ivshmem pools, probing,
re-probing, attach and detach; and who is co-located with whom."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from discovery.api_messages import ApiError
from discovery.daemon.colocation import locate, member_views, parse_address
from discovery.daemon.pools import (
    PoolOpenError,
    PoolSet,
    PoolSpec,
    PoolSpecError,
    open_pool,
    pool_info,
)
from discovery.daemon.slots import SlotTag, kernel_fingerprint, slot_tags
from discovery.member import MAX_SLOT, Member, Status
from tests.discovery.daemon_pools import fake_ivshmem, posix_pool


def test_specs() -> None:
    assert PoolSpec.parse(" /aiocoloc-a ") == PoolSpec("posix", "aiocoloc-a")
    assert PoolSpec.parse("auto") == PoolSpec("auto", "auto")
    assert PoolSpec.parse("/sys/x/resource2").kind == "ivshmem"
    for bad in ("", "/", "x" * 251, "a\0b"):
        with pytest.raises(PoolSpecError):
            PoolSpec.parse(bad)


def test_open_a_posix_pool() -> None:
    with posix_pool() as (name, pool_id):
        mapped = open_pool(PoolSpec.parse(name), "config")
        try:
            assert mapped.id == pool_id
            info = pool_info(mapped)
            assert (info.name, info.kind, info.source, info.members) == (name, "posix", "config", 1)
            assert mapped.still_there()
        finally:
            mapped.pool.close()
    assert not mapped.still_there()  # the name was removed
    with pytest.raises(PoolOpenError, match="no shared memory named /aiocoloc-none"):
        open_pool(PoolSpec.parse("aiocoloc-none"), "config")


def test_open_an_ivshmem_device(tmp_path: Path) -> None:
    bar, pool_id = fake_ivshmem(tmp_path)
    mapped = open_pool(PoolSpec.parse(str(bar)), "config")
    try:
        assert (mapped.id, mapped.kind) == (pool_id, "ivshmem")
    finally:
        mapped.pool.close()
    with pytest.raises(PoolOpenError, match="not an ivshmem device path"):
        open_pool(PoolSpec.parse(str(tmp_path / "elsewhere/resource2")), "config")


@pytest.mark.asyncio
async def test_probe_reprobe_attach_detach(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    changes: list[frozenset[str]] = []

    async def changed() -> None:
        changes.append(pools.ids())

    caplog.set_level(logging.INFO, "discovery")
    caplog.set_level(logging.INFO, "aiocoloc.shm.named_pools")
    pools = PoolSet(tmp_path, changed)
    with posix_pool() as (name, posix_id):
        try:
            await pools.open_configured((PoolSpec.parse("auto"), PoolSpec.parse(name)))
            assert pools.ids() == {posix_id}
            assert "auto: no ivshmem device (PCI 1af4:1110) under" in caplog.text
            # A device appears: SIGHUP's re-probe maps it.
            bar, ivshmem_id = fake_ivshmem(tmp_path)
            assert await pools.reprobe()
            assert pools.ids() == {posix_id, ivshmem_id}
            assert {m.id: m.source for m in pools.mapped()} == {
                posix_id: "config",
                ivshmem_id: "auto",
            }
            assert not await pools.reprobe()  # nothing new
            # The operator detaches a configured pool: a re-probe leaves it out.
            info = await pools.detach(name)
            assert info.id == posix_id and pools.ids() == {ivshmem_id}
            assert not await pools.reprobe()
            with pytest.raises(ApiError) as caught:
                await pools.detach(name)
            assert caught.value.code == "not-found"
            # ... until it is attached again, by name (or detached by id).
            assert (await pools.attach("/" + name)).id == posix_id
            with pytest.raises(ApiError) as caught:
                await pools.attach(name)
            assert caught.value.code == "conflict"
            with pytest.raises(ApiError) as caught:
                await pools.attach("aiocoloc-none")
            assert caught.value.code == "not-found"
            with pytest.raises(ApiError) as caught:
                await pools.attach("auto")
            assert caught.value.code == "bad-request"
            assert (await pools.detach(posix_id)).name == name
            # The device goes away: the re-probe unmaps it.
            shutil.rmtree(bar.parent)
            assert await pools.reprobe()
            assert pools.ids() == frozenset()
        finally:
            await pools.close()
    assert changes == [
        {posix_id, ivshmem_id},
        {ivshmem_id},
        {posix_id, ivshmem_id},
        {ivshmem_id},
        frozenset(),
    ]


@pytest.mark.asyncio
async def test_configured_pools_fail_as_a_whole(tmp_path: Path) -> None:
    async def changed() -> None:
        pass

    pools = PoolSet(tmp_path, changed)
    with posix_pool() as (name, _):
        with pytest.raises(PoolOpenError, match="aiocoloc-none"):
            await pools.open_configured((PoolSpec.parse(name), PoolSpec.parse("aiocoloc-none")))
        assert pools.ids() == frozenset()  # the first was left again


def test_slot_tags() -> None:
    import uuid

    fingerprint = kernel_fingerprint()
    tag = SlotTag(uuid.uuid4(), fingerprint)
    assert len(tag.encode()) == 22 <= MAX_SLOT and SlotTag.decode(tag.encode()) == tag
    assert SlotTag.decode(b"short") is None and SlotTag.decode(bytes(MAX_SLOT + 1)) is None
    member = Member("a", ("127.0.0.2:1",), frozenset({"p1", "p2"}), slots={"p1": tag.encode()})
    assert slot_tags(member) == {"p1": tag}
    assert len(fingerprint) == 6 and kernel_fingerprint() == fingerprint


ME = Member("me", ("127.0.0.2:7946",), frozenset({"p1", "p2"}))
PEER = Member("peer", ("127.0.0.3:7946", "10.0.0.3:7946"), frozenset({"p2"}), ("tcp:10.0.0.3:9",))
FAR = Member("far", ("127.0.0.4:7946",), frozenset({"p9"}))
DEAD = Member("dead", ("127.0.0.5:7946",), frozenset({"p1"}), status=Status.FAILED)


def test_who_is_colocated() -> None:
    members = [ME, PEER, FAR, DEAD]
    answer = locate("10.0.0.3:8080", ME, members)
    assert (answer.colocated, answer.pool, answer.member, answer.endpoints) == (
        True,
        "p2",
        PEER,
        ("tcp:10.0.0.3:9",),
    )
    assert not locate("127.0.0.4", ME, members).colocated  # another pool
    assert locate("127.0.0.4", ME, members).member == FAR
    assert not locate("127.0.0.5", ME, members).colocated  # shares p1 but failed
    assert locate("127.0.0.2:1", ME, members).local
    assert locate("127.0.0.99", ME, members).local  # loopback nobody claims: us
    nobody = locate("192.0.2.1", ME, members)
    assert (nobody.colocated, nobody.member) == (False, None)
    assert locate("[::ffff:10.0.0.3]:80", ME, members).member == PEER
    assert parse_address("::1") == ("::1", None) and parse_address("[::1]:5") == ("::1", 5)
    with pytest.raises(ApiError, match="not an IP address"):
        locate("example.com:80", ME, members)
    views = member_views(ME, [FAR, PEER, ME])
    assert [(v.member.node, v.local, v.colocated) for v in views] == [
        ("me", True, True),
        ("far", False, False),
        ("peer", False, True),
    ]
