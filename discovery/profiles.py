"""Timing profiles of the SWIM engine: one frozen record of knobs, with
named presets for where the members are.

``local``, ``lan`` and ``wan`` carry HashiCorp memberlist's values, read
from ``config.go`` (``DefaultLocalConfig``, ``DefaultLANConfig``,
``DefaultWANConfig``) of github.com/hashicorp/memberlist at commit
1b4c746c0e53bce51547d38f14d4772f85da2708 (the newest snapshot we had).
The knobs memberlist leaves to Serf (reconnecting to failed members,
reaping, leave broadcast timeout) carry Serf's ``DefaultConfig`` values
(serf/config.go: ReconnectInterval 30 s, ReconnectTimeout and
TombstoneTimeout 24 h, BroadcastTimeout 5 s).

``host`` is ours, for the members of one physical host (containers, VMs
and processes talking over loopback or a host bridge): round trips are
tens of microseconds, so what a timeout must absorb is scheduling noise,
not the network.  It probes five times a second and gossips every 50 ms,
so that a member killed outright is failed everywhere within two seconds
at 16 members (``failure_detection_bound``: 1.8 s; about 1.1 s measured).  Its suspicion lasts
only 3 * log10(n) probe intervals (0.72 s at 16 members), so news must not
get lost: its retransmit multiplier is 4 (memberlist's LAN value, not its
local 2): copies cost little on one host, and a refutation that reaches
nobody turns a member starved of CPU for a moment, or one whose gossip
partners are partitioned away, into a false failure.

The formulas below are memberlist's (``util.go``: ``suspicionTimeout``,
``retransmitLimit``, ``pushPullScale``; ``state.go``: the number of
confirmations a suspicion waits for).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

__all__ = ["PROFILES", "Profile", "get_profile"]

# memberlist util.go: push/pull is not scaled below this many nodes.
_PUSH_PULL_SCALE_THRESHOLD = 32
_DAY = 24 * 3600.0


@dataclass(frozen=True)
class Profile:
    """The timing of one SWIM member (seconds, counts)."""

    name: str
    #: Time between probes of one member (scaled up by local health).
    probe_interval: float
    #: Wait for a direct ack before trying indirect and TCP probes.
    probe_timeout: float
    #: Members asked to probe on our behalf when a direct probe fails.
    indirect_checks: int
    #: A broadcast is sent retransmit_mult * ceil(log10(n + 1)) times.
    retransmit_mult: int
    #: Suspicion lasts suspicion_mult * max(1, log10(n)) * probe_interval at
    #: least (with enough independent confirmations) ...
    suspicion_mult: int
    #: ... and this many times that at most (no confirmations).
    suspicion_max_timeout_mult: int
    #: Lifeguard: health score ceiling; intervals scale by (score + 1).
    awareness_max_multiplier: int
    #: Time between gossip rounds (broadcasts not piggy-backed on probes).
    gossip_interval: float
    #: Members each gossip round sends to.
    gossip_nodes: int
    #: How long failed members are still gossiped to (so they can refute).
    gossip_to_the_dead_time: float
    #: Time between full state exchanges (TCP) with a random member.
    push_pull_interval: float
    #: Connect + exchange limit of a TCP push/pull or fallback probe.
    tcp_timeout: float
    #: Time between attempts to reach a failed member (heals partitions).
    reconnect_interval: float
    #: Failed members are forgotten after this long.
    reconnect_timeout: float
    #: Left members are forgotten after this long.
    tombstone_timeout: float
    #: How long ``leave()`` waits for its goodbye to be gossiped.
    leave_timeout: float

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name != "name" and not (isinstance(value, int | float) and value > 0):
                raise ValueError(f"profile {self.name!r}: {item.name} must be > 0, not {value!r}")
        if self.probe_timeout >= self.probe_interval:
            raise ValueError(f"profile {self.name!r}: probe_timeout must be < probe_interval")
        if self.suspicion_max_timeout_mult < 1:
            raise ValueError(f"profile {self.name!r}: suspicion_max_timeout_mult must be >= 1")

    # -- memberlist's formulas ---------------------------------------------

    def suspicion_timeout(self, n: int) -> float:
        """Shortest suspicion (enough confirmations) in a cluster of ``n``."""
        scale = max(1.0, math.log10(max(1.0, float(n))))
        # memberlist keeps millisecond precision of the scale.
        return self.suspicion_mult * math.floor(scale * 1000) / 1000 * self.probe_interval

    def suspicion_max_timeout(self, n: int) -> float:
        """Longest suspicion (no confirmation) in a cluster of ``n``."""
        return self.suspicion_max_timeout_mult * self.suspicion_timeout(n)

    def suspicion_confirmations(self, n: int) -> int:
        """Independent confirmations that drive a suspicion to its shortest:
        two short of the multiplier, none when the cluster (less the accuser
        and the accused) is too small to give them."""
        k = self.suspicion_mult - 2
        return 0 if n - 2 < k else max(0, k)

    def retransmit_limit(self, n: int) -> int:
        """Times a broadcast is sent in a cluster of ``n``."""
        return self.retransmit_mult * math.ceil(math.log10(n + 1))

    def push_pull_period(self, n: int) -> float:
        """Push/pull interval, stretched in clusters above 32 members."""
        if n <= _PUSH_PULL_SCALE_THRESHOLD:
            return self.push_pull_interval
        scale = math.ceil(math.log2(n) - math.log2(_PUSH_PULL_SCALE_THRESHOLD)) + 1
        return scale * self.push_pull_interval

    def view_settle_time(self, n: int) -> float:
        """How long two members' views may differ before a push/pull mends
        them (``swim/sync.py``): what gossip takes to spread a change to
        ``n`` members (log_gossip_nodes(n) rounds, plus its retransmits),
        and at least a probe interval, since views are compared as probes
        arrive."""
        rounds = math.ceil(math.log(max(n, 2)) / math.log(max(self.gossip_nodes, 2)))
        return max(self.probe_interval, (rounds + self.retransmit_limit(n)) * self.gossip_interval)

    # -- what a test may assert ----------------------------------------------

    def failure_detection_bound(self, n: int) -> float:
        """Time within which a member that stops answering (``kill -9``) is
        failed at every healthy member of a cluster of ``n``.

        Probing is time-slotted (``swim/probe.py``): some member probes it
        in the next slot (1 interval), that probe runs out (1 interval),
        and members probing it in the following slots, and out of turn as
        they hear of the suspicion, confirm it well inside the shortest
        suspicion time (3 intervals or more), which it then lasts.  Last,
        the dead message spreads: log_gossip_nodes(n) + 2 gossip rounds.
        Two more intervals absorb what a loaded host adds: probes sent late,
        views that disagree for a moment."""
        rounds = math.ceil(math.log(max(n, 2)) / math.log(max(self.gossip_nodes, 2))) + 2
        return 4 * self.probe_interval + self.suspicion_timeout(n) + rounds * self.gossip_interval

    def with_changes(self, **changes: Any) -> Profile:
        """A copy with some knobs changed (validated again)."""
        return replace(self, **changes)


_LAN = Profile(
    name="lan",
    probe_interval=1.0,
    probe_timeout=0.5,
    indirect_checks=3,
    retransmit_mult=4,
    suspicion_mult=4,
    suspicion_max_timeout_mult=6,
    awareness_max_multiplier=8,
    gossip_interval=0.2,
    gossip_nodes=3,
    gossip_to_the_dead_time=30.0,
    push_pull_interval=30.0,
    tcp_timeout=10.0,
    reconnect_interval=30.0,
    reconnect_timeout=_DAY,
    tombstone_timeout=_DAY,
    leave_timeout=5.0,
)

PROFILES: dict[str, Profile] = {
    "host": Profile(
        name="host",
        probe_interval=0.2,
        probe_timeout=0.1,
        indirect_checks=3,
        retransmit_mult=4,
        suspicion_mult=3,
        suspicion_max_timeout_mult=6,
        awareness_max_multiplier=8,
        gossip_interval=0.05,
        gossip_nodes=3,
        gossip_to_the_dead_time=5.0,
        push_pull_interval=5.0,
        tcp_timeout=1.0,
        reconnect_interval=2.0,
        reconnect_timeout=600.0,
        tombstone_timeout=600.0,
        leave_timeout=1.0,
    ),
    "local": replace(
        _LAN,
        name="local",
        tcp_timeout=1.0,
        indirect_checks=1,
        retransmit_mult=2,
        suspicion_mult=3,
        push_pull_interval=15.0,
        probe_timeout=0.2,
        probe_interval=1.0,
        gossip_interval=0.1,
        gossip_to_the_dead_time=15.0,
    ),
    "lan": _LAN,
    "wan": replace(
        _LAN,
        name="wan",
        tcp_timeout=30.0,
        suspicion_mult=6,
        push_pull_interval=60.0,
        probe_timeout=3.0,
        probe_interval=5.0,
        gossip_nodes=4,
        gossip_interval=0.5,
        gossip_to_the_dead_time=60.0,
    ),
}


def get_profile(profile: str | Profile) -> Profile:
    """``profile`` itself, or the preset of that name (``ValueError`` if none)."""
    if isinstance(profile, Profile):
        return profile
    try:
        return PROFILES[profile]
    except KeyError:
        raise ValueError(
            f"unknown profile {profile!r}; expected one of {sorted(PROFILES)}"
        ) from None
