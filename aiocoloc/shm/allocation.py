"""Dynamic proportional allocation of a pool's slices (MemPipe's idea).

Every pipe gets its minimum; what is left is shared in proportion to the
pipes' measured demand, no pipe above its maximum (water-filling: what a
capped pipe cannot take goes to the others, again in proportion).  Idle
pipes (no demand) fall back to their minimum.  Shares are whole slices and
never add up to more than the pool holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["NEWCOMER_SHARE", "demand_from", "proportional_targets", "shareable_slices"]

#: The fraction of a pool that demand-driven shares leave free, so that a new
#: pipe (a new connection) always finds its first slices: busy pipes took
#: every slice, and every later connection fell back with "pool exhausted".
#: They shrink toward their new targets as new pipes claim their minimums.
NEWCOMER_SHARE = 1 / 16


def shareable_slices(total: int) -> int:
    """The slices of a pool of ``total`` that pipes share by demand."""
    return total - int(total * NEWCOMER_SHARE)


#: A pipe blocked on a full pipe for a fraction f of the interval is judged
#: to want rate / (1 - f) (what it would have sent with room), capped here.
MAX_BLOCKED_BOOST = 4.0


def demand_from(bytes_per_second: float, blocked_fraction: float) -> float:
    """A pipe's demand from its accepted rate and the time it spent blocked."""
    blocked = min(max(blocked_fraction, 0.0), 1.0)
    boost = min(1.0 / max(1.0 - blocked, 1e-9), MAX_BLOCKED_BOOST)
    return max(bytes_per_second, 0.0) * boost


def proportional_targets(
    demands: Sequence[float], mins: Sequence[int], maxs: Sequence[int], total: int
) -> list[int]:
    """Whole-slice targets: ``mins`` first, the rest in proportion to ``demands``."""
    n = len(demands)
    if not len(mins) == len(maxs) == n:
        raise ValueError("demands, mins and maxs must have the same length")
    if any(lo < 0 or lo > hi for lo, hi in zip(mins, maxs, strict=True)):
        raise ValueError("need 0 <= min <= max for every pipe")
    targets = list(mins)
    left = total - sum(mins)
    if left < 0:
        # More minimums than slices (cannot happen with pools that allocate
        # minimums up front): keep what exists, give nothing more.
        return targets
    active = [i for i in range(n) if demands[i] > 0 and targets[i] < maxs[i]]
    shares = [0.0] * n
    while left > 0 and active:
        weight = sum(demands[i] for i in active)
        capped = [i for i in active if targets[i] + left * demands[i] / weight >= maxs[i]]
        if not capped:
            for i in active:
                shares[i] = left * demands[i] / weight
            break
        for i in capped:
            left -= maxs[i] - targets[i]
            targets[i] = maxs[i]
            active.remove(i)
    # Whole slices: floors first, then the largest remainders.
    floors = {i: math.floor(shares[i]) for i in range(n)}
    for i, whole in floors.items():
        targets[i] += whole
    spare = total - sum(targets)
    by_remainder = sorted(
        (i for i in range(n) if shares[i] - floors[i] > 0),
        key=lambda i: shares[i] - floors[i],
        reverse=True,
    )
    for i in by_remainder[: max(spare, 0)]:
        if targets[i] < maxs[i]:
            targets[i] += 1
    return targets
