"""When to upgrade a connection to shared memory, and whom to share it with.

Both can be set for the whole process (``aiocoloc.configure`` or the
environment) and per call (``upgrade=`` / ``trust=`` keywords of
``aiocoloc.create_connection`` and friends).

``AIOCOLOC_MODE``
    ``auto`` (the default): upgrade once a connection has moved
    ``AUTO_UPGRADE_AFTER`` bytes, so short connections never pay for a
    handshake; ``always``: upgrade as soon as connected; ``never``: plain
    TCP; a number: upgrade after that many bytes.
``AIOCOLOC_TRUST``
    ``same-uid`` (the default): share memory only with processes of our own
    user (checked with ``SO_PEERCRED`` on the control socket);
    ``uids:1000,1001``: with processes of those users; ``never``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "AUTO_UPGRADE_AFTER",
    "Settings",
    "Trust",
    "Upgrade",
    "configure",
    "current",
    "parse_trust",
    "parse_upgrade",
]

#: Bytes a connection moves on TCP before ``auto`` upgrades it.
AUTO_UPGRADE_AFTER = 64 * 1024
#: The smallest pool a serving process may offer: its tables (room for 512
#: pipes) take 1.2 MB; this leaves 45 slices of 64 KiB.
MIN_POOL_SIZE = 4 << 20


@dataclass(frozen=True)
class Upgrade:
    """Upgrade after ``after`` bytes of traffic; never if ``after`` is None."""

    after: int | None

    @property
    def never(self) -> bool:
        return self.after is None


def parse_upgrade(value: str | int | Upgrade) -> Upgrade:
    """``"auto"``, ``"always"``, ``"never"``, or a byte count (int or digits)."""
    if isinstance(value, Upgrade):
        return value
    if isinstance(value, bool):
        raise ValueError(
            f"upgrade must be 'auto', 'always', 'never' or a byte count, not {value!r}"
        )
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"upgrade byte count must be >= 0, got {value}")
        return Upgrade(value)
    text = str(value).strip().lower()
    if text == "auto":
        return Upgrade(AUTO_UPGRADE_AFTER)
    if text == "always":
        return Upgrade(0)
    if text == "never":
        return Upgrade(None)
    if text.isdigit():
        return Upgrade(int(text))
    raise ValueError(f"upgrade must be 'auto', 'always', 'never' or a byte count, not {value!r}")


@dataclass(frozen=True)
class Trust:
    """Which peers may share memory with us, by user id."""

    uids: frozenset[int] | None = None  # None: our own uid only
    never: bool = False

    def allows(self, uid: int) -> bool:
        if self.never:
            return False
        if self.uids is None:
            return uid == os.getuid()
        return uid in self.uids

    def describe(self) -> str:
        if self.never:
            return "never"
        if self.uids is None:
            return "same-uid"
        return "uids:" + ",".join(map(str, sorted(self.uids)))


def parse_trust(value: str | Trust) -> Trust:
    """``"same-uid"``, ``"never"`` or ``"uids:1000,1001"``."""
    if isinstance(value, Trust):
        return value
    text = str(value).strip().lower()
    if text == "same-uid":
        return Trust()
    if text == "never":
        return Trust(never=True)
    if text.startswith("uids:"):
        try:
            uids = frozenset(int(part) for part in text[5:].split(",") if part.strip())
        except ValueError:
            raise ValueError(f"trust uids must be integers: {value!r}") from None
        if not uids:
            raise ValueError(f"trust needs at least one uid: {value!r}")
        return Trust(uids=uids)
    raise ValueError(f"trust must be 'same-uid', 'never' or 'uids:<n>,...', not {value!r}")


@dataclass(frozen=True)
class Settings:
    """Process-wide defaults of the connection API."""

    upgrade: Upgrade = field(default_factory=lambda: Upgrade(AUTO_UPGRADE_AFTER))
    trust: Trust = field(default_factory=Trust)
    #: Seconds a handshake may take before the connection stays on TCP.
    handshake_timeout: float = 2.0
    #: Size of the pool a serving process offers its clients (memfd: pages
    #: are only used as pipes fill them).
    pool_size: int = 64 << 20


def _from_environment() -> Settings:
    settings = Settings()
    mode = os.environ.get("AIOCOLOC_MODE")
    if mode:
        settings = replace(settings, upgrade=parse_upgrade(mode))
    trust = os.environ.get("AIOCOLOC_TRUST")
    if trust:
        settings = replace(settings, trust=parse_trust(trust))
    return settings


_settings: Settings | None = None


def current() -> Settings:
    """The settings in force (from the environment until ``configure``)."""
    global _settings
    if _settings is None:
        _settings = _from_environment()
    return _settings


def configure(**changes: Any) -> Settings:
    """Change process-wide settings: ``upgrade``, ``trust``,
    ``handshake_timeout``, ``pool_size``.  Returns the new settings."""
    global _settings
    unknown = set(changes) - {"upgrade", "trust", "handshake_timeout", "pool_size"}
    if unknown:
        raise TypeError(f"configure() got unknown settings: {', '.join(sorted(unknown))}")
    if "pool_size" in changes and not (
        isinstance(changes["pool_size"], int) and changes["pool_size"] >= MIN_POOL_SIZE
    ):
        raise ValueError(
            f"pool_size must be an int >= {MIN_POOL_SIZE}, got {changes['pool_size']!r}"
        )
    if "upgrade" in changes:
        changes["upgrade"] = parse_upgrade(changes["upgrade"])
    if "trust" in changes:
        changes["trust"] = parse_trust(changes["trust"])
    if "handshake_timeout" in changes and not changes["handshake_timeout"] > 0:
        raise ValueError(f"handshake_timeout must be > 0, got {changes['handshake_timeout']!r}")
    _settings = replace(current(), **changes)
    return _settings


def reset() -> None:
    """Forget ``configure`` changes (the environment is read again)."""
    global _settings
    _settings = None
