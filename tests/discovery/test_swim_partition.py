"""A network partition between two groups of SWIM member processes, and
its healing.

The partition is injected inside each engine (``SwimEngine.partition``:
every UDP packet and TCP connection to or from the other group's IPs is
dropped), not with network namespaces: namespaces would work here (we are
root), but their veth pairs need addresses outside 127.0.0.0/8, and these
tests stay on loopback.  Each side must fail the other; after healing, full
convergence must come back, every member refuting the other side's verdict
with a higher incarnation: through gossip to the recently failed and the
periodic push/pull with failed members (reconnect) as the profile has it,
and through reconnect alone once gossip to the dead has stopped (a
partition longer than ``gossip_to_the_dead_time``, here 1 ms).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from discovery.keys import Keyring
from discovery.profiles import PROFILES
from tests.discovery.swim_member import Cluster

SIZE = 8
HOST = PROFILES["host"]


@pytest.fixture(params=["profile", "reconnect-only"])
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    key_file = tmp_path_factory.mktemp("swim-key") / "keyring"
    Keyring.generate().save(key_file)
    settings = ["gossip_to_the_dead_time=0.001"] if request.param == "reconnect-only" else []
    cluster = Cluster(
        SIZE,
        tmp_path_factory.mktemp("swim-part"),
        profile="host",
        key_file=key_file,
        settings=settings,
    )
    try:
        cluster.start()
        cluster.wait_converged({n: "alive" for n in cluster.names}, timeout=15)
        yield cluster
    finally:
        cluster.close()


def test_partition_fails_the_other_side_and_heals(cluster: Cluster) -> None:
    left, right = cluster.names[: SIZE // 2], cluster.names[SIZE // 2 :]
    ips = {name: cluster.address(name).rsplit(":", 1)[0] for name in cluster.names}
    started = time.time()
    for mine, theirs in ((left, right), (right, left)):
        for name in mine:
            reply = cluster.procs[name].ask(
                "partition " + " ".join(ips[n] for n in theirs), "partitioned"
            )
            assert reply["ips"] == [ips[n] for n in theirs]

    # Each side fails the whole other side, and only it.
    bound = HOST.failure_detection_bound(SIZE)
    expected = {**dict.fromkeys(left, "alive"), **dict.fromkeys(right, "failed")}
    split = cluster.wait_converged(
        expected, timeout=bound + 10, among=[cluster.procs[n] for n in left]
    )
    expected = {**dict.fromkeys(left, "failed"), **dict.fromkeys(right, "alive")}
    cluster.wait_converged(expected, timeout=bound + 10, among=[cluster.procs[n] for n in right])
    for mine, theirs in ((left, right), (right, left)):
        for name in mine:
            failed = {r["member"]["node"] for r in cluster.procs[name].events("failed")}
            assert failed == set(theirs), name
    assert all(cluster.procs[n].stats().get("drop_blocked", 0) > 0 for n in cluster.names)

    # Heal, everywhere at once as a network would: full convergence,
    # through push/pull with failed members.
    healed = time.time()
    marks = {name: len(cluster.procs[name].records) for name in cluster.names}
    for name in cluster.names:
        cluster.procs[name].send("heal")
    for name in cluster.names:
        reply = cluster.procs[name].wait_for(lambda r: r["type"] == "partitioned", 5, marks[name])
        assert reply["ips"] == []
    took = cluster.wait_converged(
        {n: "alive" for n in cluster.names}, timeout=3 * HOST.reconnect_interval + 15
    )
    flaps = []
    for mine, theirs in ((left, right), (right, left)):
        for name in mine:
            proc = cluster.procs[name]
            back = {r["member"]["node"] for r in proc.events("join") if r["time"] >= healed}
            assert back >= set(theirs), name
            flaps += [f"{name} saw {n} fail and come back" for n in sorted(back - set(theirs))]
    # Either end may count a reconnect: the asker when the answer came back,
    # the other when it served a member it held failed (an answer lost under
    # load leaves only that count; the view comparison then spreads it).
    reconnected = sum(
        cluster.procs[n].stats().get(stat, 0)
        for n in cluster.names
        for stat in ("reconnected", "reconnect_served")
    )
    if cluster.settings:  # reconnect was the only way back
        assert reconnected >= 1
    print(
        f"\npartition {SIZE // 2}+{SIZE // 2}: split seen in {healed - started:.2f} s "
        f"(left side {split:.2f} s after the cut), healed in {took:.2f} s, "
        f"{reconnected} reconnecting push/pulls; same-side flaps while healing: {flaps or 'none'}"
    )
