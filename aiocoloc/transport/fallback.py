"""Why a connection stays on TCP: reasons, counters, and logging them once.

Every reason keeps the connection working on TCP.  It is shown in
``transport.get_extra_info("aiocoloc")["fallback_reason"]`` (with details in
``"fallback_detail"``), counted in ``stats()``, and logged at INFO the first
time it happens for a destination (DEBUG afterwards, so a busy client does
not flood its log).
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any

__all__ = [
    "ADDRESS_TRANSLATED",
    "CONTROL_BUSY",
    "DISABLED",
    "NOT_AIOCOLOC",
    "NOT_COLOCATED",
    "NOT_TRUSTED",
    "NO_CLUSTER_KEY",
    "NO_REGISTRY_ENTRY",
    "POOL_EXHAUSTED",
    "POOL_NOT_MAPPABLE",
    "PROOF_FAILED",
    "PROTOCOL_ERROR",
    "REASONS",
    "TIMED_OUT",
    "UNKNOWN_CONNECTION",
    "VERSION_MISMATCH",
    "record",
    "record_upgrade",
    "stats",
]

_log = logging.getLogger("aiocoloc.transport.fallback")

DISABLED = "disabled"  # AIOCOLOC_MODE=never, or upgrade="never"
NO_REGISTRY_ENTRY = "no registry entry"  # nobody advertises the destination as aiocoloc
NOT_AIOCOLOC = "peer not aiocoloc"  # the advertised control endpoint does not answer
CONTROL_BUSY = "control endpoint busy"  # its accept queue stayed full (swamped, or not accepting)
UNKNOWN_CONNECTION = "connection unknown to peer"  # the server has no such TCP connection
POOL_NOT_MAPPABLE = "pool not mappable"
PROOF_FAILED = "proof failed"  # the nonce written through the pool did not come back
VERSION_MISMATCH = "version mismatch"
POOL_EXHAUSTED = "pool exhausted"
NOT_TRUSTED = "peer not trusted"
TIMED_OUT = "upgrade timed out"
PROTOCOL_ERROR = "handshake protocol error"  # garbage, or a peer that hung up mid-way
NOT_COLOCATED = "not co-located"  # the discovery sidecar says the peer shares no pool with us
ADDRESS_TRANSLATED = "address translated"  # a NAT between the kernels: 4-tuples cannot match
NO_CLUSTER_KEY = "no cluster key"  # a control channel between kernels needs $AIOCOLOC_KEY_FILE
REASONS = (
    DISABLED,
    NO_REGISTRY_ENTRY,
    NOT_AIOCOLOC,
    CONTROL_BUSY,
    UNKNOWN_CONNECTION,
    POOL_NOT_MAPPABLE,
    PROOF_FAILED,
    VERSION_MISMATCH,
    POOL_EXHAUSTED,
    NOT_TRUSTED,
    TIMED_OUT,
    PROTOCOL_ERROR,
    NOT_COLOCATED,
    ADDRESS_TRANSLATED,
    NO_CLUSTER_KEY,  # (append only: peers send reasons in refusals)
)

_lock = threading.Lock()
_fallbacks: collections.Counter[str] = collections.Counter()
_upgrades = 0
_logged: set[tuple[str, str]] = set()


def record(transport: Any, reason: str, detail: str | None = None, *, where: str = "") -> None:
    """Note that ``transport`` stays on TCP for ``reason``."""
    with _lock:
        _fallbacks[reason] += 1
        first = (reason, where) not in _logged
        if first:
            _logged.add((reason, where))
    transport.note_fallback(reason, detail)
    level = logging.INFO if first else logging.DEBUG
    _log.log(
        level,
        "staying on TCP with %s: %s%s",
        where or "peer",
        reason,
        f" ({detail})" if detail else "",
    )


def record_upgrade() -> None:
    global _upgrades
    with _lock:
        _upgrades += 1


def stats() -> dict[str, Any]:
    """Upgrades and fallbacks (by reason) since the process started."""
    with _lock:
        return {"upgrades": _upgrades, "fallbacks": dict(_fallbacks)}
