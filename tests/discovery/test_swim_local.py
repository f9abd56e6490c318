"""Sixteen SWIM members as real processes with memberlist's ``local``
profile: a member paused (SIGSTOP) for 2 s is suspected but refutes, and
nobody is failed; a member killed with -9 is failed everywhere within the
profile's bound.

Why ``local`` for the pause: its probe interval is 1 s and its shortest
suspicion at 16 members is 3 * log10(16) * 1 s = 3.6 s, so a member cannot
be failed sooner than a failed probe (~1 s) plus 3.6 s after it stops
answering: 2 s of silence is well within the time it has to refute.  Under
``host`` the same pause is (rightly) a failure: ``test_swim_cluster``
shows it, and the refutation that brings the member back.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator

import pytest

from discovery.keys import Keyring
from discovery.profiles import PROFILES
from tests.discovery.swim_member import Cluster, Record

SIZE = 16
LOCAL = PROFILES["local"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    key_file = tmp_path_factory.mktemp("swim-key") / "keyring"
    Keyring.generate().save(key_file)
    cluster = Cluster(
        SIZE, tmp_path_factory.mktemp("swim-local"), profile="local", key_file=key_file
    )
    try:
        cluster.start()
        cluster.wait_converged({n: "alive" for n in cluster.names}, timeout=15)
        yield cluster
    finally:
        cluster.close()


def _event(kind: str, about: str, since: float) -> Callable[[Record], bool]:
    def match(record: Record) -> bool:
        return (
            record["type"] == "event"
            and record["kind"] == kind
            and record["member"]["node"] == about
            and record["time"] >= since
        )

    return match


def test_paused_member_is_suspected_refutes_and_nobody_fails(cluster: Cluster) -> None:
    assert LOCAL.probe_interval + LOCAL.suspicion_timeout(SIZE) > 2.0 + 2.0  # the margin
    paused = cluster.procs["m15"]
    accusers = [cluster.procs["m01"], cluster.procs["m02"]]
    before = paused.members()["m15"]["incarnation"]
    stopped = paused.signal(signal.SIGSTOP)
    try:
        # Two members probe it at once rather than when their turn comes,
        # so it is certainly suspected (and confirmed) while it is paused.
        marks = [len(accuser.records) for accuser in accusers]
        for accuser in accusers:
            accuser.send("probe m15")
        time.sleep(max(0.0, stopped + 2.0 - time.time()))
    finally:
        resumed = paused.signal(signal.SIGCONT)
    assert resumed - stopped < 2.3
    for accuser, mark in zip(accusers, marks, strict=True):
        answer = accuser.wait_for(lambda r: r["type"] in ("probe", "error"), 5, mark)
        assert answer == {"type": "probe", "node": "m15", "answered": False}
    suspected = sum(p.stats().get("suspected", 0) for p in cluster.live("m15"))
    assert suspected >= len(cluster.live("m15")) // 2  # the accusation had spread
    # It refutes with a higher incarnation, which reaches everyone ...
    deadline = time.monotonic() + 10
    for proc in cluster.live():
        while True:
            seen = proc.members()["m15"]
            if seen["status"] == "alive" and seen["incarnation"] > before:
                break
            assert time.monotonic() < deadline, (proc.node, seen)
            time.sleep(0.1)
    # ... and no suspicion may end in a failure any more: every one was of
    # the old incarnation.
    failed = [(p.node, r["member"]["node"]) for p in cluster.live() for r in p.events("failed")]
    assert failed == []
    assert paused.stats()["refuted"] >= 1
    print(f"\npaused 2 s (local): suspected at {suspected} members, refuted, nobody failed")


def test_kill9_is_failed_everywhere_within_the_bound(cluster: Cluster) -> None:
    bound = LOCAL.failure_detection_bound(SIZE)
    victim = cluster.procs["m14"]
    killed = victim.signal(signal.SIGKILL)
    others = cluster.live("m14")
    times = []
    for proc in others:
        record = proc.wait_for(_event("failed", "m14", killed), timeout=bound + 10)
        times.append(record["time"] - killed)
    times.sort()
    print(
        f"\nkill -9 at {SIZE} members (local): failed everywhere in {times[-1]:.2f} s "
        f"(first {times[0]:.2f} s, bound {bound:.2f} s)"
    )
    assert times[-1] <= bound
    others_failed = [
        r["member"]["node"] for p in others for r in p.events("failed") if r["time"] >= killed
    ]
    assert set(others_failed) == {"m14"}
