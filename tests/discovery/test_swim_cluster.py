"""Sixteen SWIM members as real processes on 127.x.y.1-16 (host profile,
AES-GCM keyring): convergence, updates, kill -9, SIGTERM, restart, a member
paused past its failure, and a CPU-starved member.

The tests share one cluster and run in file order; each names the members
it acts on, and the later ones only look at events after their own start.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from discovery.keys import Keyring
from discovery.profiles import PROFILES
from tests.discovery.swim_member import Cluster, MemberProcess, Record

SIZE = 16
HOST = PROFILES["host"]
BOUND = HOST.failure_detection_bound(SIZE)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    key_file = tmp_path_factory.mktemp("swim-key") / "keyring"
    Keyring.generate().save(key_file)
    cluster = Cluster(SIZE, tmp_path_factory.mktemp("swim-host"), profile="host", key_file=key_file)
    try:
        started = time.monotonic()
        cluster.start()
        print(f"\n{SIZE} members started in {time.monotonic() - started:.2f} s")
        yield cluster
    finally:
        cluster.close()
    for proc in cluster.procs.values():
        assert proc.proc.poll() is not None  # nothing left running


def _event(kind: str, about: str, since: float = 0.0) -> Callable[[Record], bool]:
    def match(record: Record) -> bool:
        return (
            record["type"] == "event"
            and record["kind"] == kind
            and record["member"]["node"] == about
            and record["time"] >= since
        )

    return match


def _failed_others(procs: list[MemberProcess], since: float, spared: set[str]) -> list[str]:
    return [
        f"{p.node} failed {r['member']['node']}"
        for p in procs
        for r in p.events("failed")
        if r["time"] >= since and r["member"]["node"] not in spared
    ]


def test_sixteen_members_converge(cluster: Cluster) -> None:
    took = cluster.wait_converged({n: "alive" for n in cluster.names}, timeout=15)
    print(f"converged {took:.2f} s after the last member was ready")
    for proc in cluster.live():
        joined = {r["member"]["node"] for r in proc.events("join")}
        assert joined == set(cluster.names), proc.node  # one join event per member, itself too


def test_idle_traffic(cluster: Cluster) -> None:
    time.sleep(1.0)  # let the join broadcasts retire
    procs = cluster.live()
    before = [p.stats() for p in procs]
    started = time.monotonic()
    time.sleep(3.0)
    after = [p.stats() for p in procs]
    seconds = time.monotonic() - started
    rates = [
        (a.get("udp_out_bytes", 0) + a.get("tcp_out_bytes", 0))
        - (b.get("udp_out_bytes", 0) + b.get("tcp_out_bytes", 0))
        for a, b in zip(after, before, strict=True)
    ]
    mean = sum(rates) / len(rates) / seconds
    print(f"idle traffic: {mean:.0f} B/s sent per member (max {max(rates) / seconds:.0f})")
    # 5 probes/s of ~100 B plus acks and a push/pull every 5 s: about 1 KB/s.
    assert 100 < mean < 5000
    assert all(a.get("drop_auth", 0) == 0 for a in after)


def test_update_reaches_everyone(cluster: Cluster) -> None:
    proc = cluster.procs["m03"]
    updated = proc.ask("update pool-a,pool-b", "updated")
    assert updated["pools"] == ["pool-a", "pool-b"] and updated["incarnation"] >= 1
    for other in cluster.live("m03"):
        record = other.wait_for(_event("update", "m03"), timeout=5)
        assert record["member"]["pools"] == ["pool-a", "pool-b"]
        assert record["previous"]["pools"] == []
        assert record["member"]["incarnation"] == updated["incarnation"]


def test_kill9_is_failed_everywhere_within_the_bound(cluster: Cluster) -> None:
    victim = cluster.procs["m15"]
    killed = victim.signal(signal.SIGKILL)
    others = cluster.live("m15")
    times = []
    for proc in others:
        record = proc.wait_for(_event("failed", "m15", killed), timeout=BOUND + 10)
        times.append(record["time"] - killed)
    times.sort()
    print(
        f"kill -9 at {SIZE} members (host): failed everywhere in {times[-1]:.2f} s "
        f"(first {times[0]:.2f} s, bound {BOUND:.2f} s)"
    )
    assert times[-1] <= BOUND
    assert not _failed_others(others, killed, {"m15"})


def test_sigterm_is_a_leave(cluster: Cluster) -> None:
    proc = cluster.procs["m14"]
    sent = proc.signal(signal.SIGTERM)
    assert proc.proc.wait(10) == 0
    others = cluster.live("m14", "m15")
    for other in others:
        other.wait_for(_event("leave", "m14", sent), timeout=5)
    assert not [p.node for p in others if p.events("failed", "m14")]
    assert any(r["kind"] == "leave" for r in proc.events(about="m14"))  # said its goodbye


def test_restart_rejoins_with_a_higher_incarnation(cluster: Cluster) -> None:
    others = cluster.live("m14", "m15")
    old = {
        "m15": others[0].events("failed", "m15")[-1]["member"]["incarnation"],
        "m14": others[0].events("leave", "m14")[-1]["member"]["incarnation"],
    }
    restarted = time.time()
    seeds = [cluster.address("m00"), cluster.address("m01")]
    for name in old:
        cluster.spawn(name, seeds).ready(20)
    for other in others:
        for name, incarnation in old.items():
            record = other.wait_for(_event("join", name, restarted), timeout=10)
            assert record["member"]["incarnation"] > incarnation, (other.node, name)
    cluster.wait_converged({n: "alive" for n in cluster.names}, timeout=10)


def test_paused_past_its_bound_is_failed_then_refutes(cluster: Cluster) -> None:
    """SIGSTOP longer than the host profile's bound: failed (as it should
    be), and back with a higher incarnation the moment it resumes."""
    proc = cluster.procs["m12"]
    incarnation = proc.members()["m12"]["incarnation"]
    stopped = proc.signal(signal.SIGSTOP)
    others = cluster.live("m12")
    try:
        for other in others:
            other.wait_for(_event("failed", "m12", stopped), timeout=BOUND + 10)
        paused = time.time() - stopped
    finally:
        resumed = proc.signal(signal.SIGCONT)
    for other in others:
        record = other.wait_for(_event("join", "m12", resumed), timeout=10)
        assert record["member"]["incarnation"] > incarnation
    print(f"paused {paused:.2f} s: failed everywhere, back {time.time() - resumed:.2f} s later")
    assert proc.stats()["refuted"] >= 1
    assert not _failed_others(cluster.live(), stopped, {"m12"})


def test_starved_member_fails_no_one_else(cluster: Cluster) -> None:
    """m13's event loop is blocked 1 s at a time, five times; whatever the
    others conclude about m13, nobody else may be failed (Lifeguard: a slow
    member's failed probes are its own problem)."""
    proc = cluster.procs["m13"]
    started = time.time()
    assert proc.ask("starve 1.0 1.3 5", "starving")["type"] == "starving"
    proc.wait_for(lambda r: r["type"] == "starved", timeout=20)
    time.sleep(HOST.suspicion_max_timeout(SIZE) / 2)  # accusations made while starved play out
    everyone = cluster.live()
    assert not _failed_others(everyone, started, {"m13"})
    stats = proc.stats()
    failed_m13 = sum(1 for p in everyone for r in p.events("failed", "m13") if r["time"] >= started)
    print(
        f"starved member: refuted {stats.get('refuted', 0)} accusations, "
        f"overslept {stats.get('probe_overslept', 0)} probes, failed {failed_m13} times by others"
    )
    assert stats.get("refuted", 0) >= 1  # it was accused while starved, and answered
    cluster.wait_converged(
        {n: "alive" for n in cluster.names}, timeout=HOST.failure_detection_bound(SIZE) + 10
    )


def test_logs_are_clean(cluster: Cluster) -> None:
    text = "\n".join(p.read_text() for p in Path(cluster.log_dir).glob("*.log"))
    assert "Traceback" not in text
    assert " ERROR " not in text
