"""When to upgrade a connection to shared memory, and whom to share it with.

Every setting can be set for the whole process (``aiocoloc.configure`` or
the environment); ``upgrade`` and ``trust`` also per call (``upgrade=`` /
``trust=`` keywords of ``aiocoloc.create_connection`` and friends).

``AIOCOLOC_MODE`` / ``upgrade``
    ``auto`` (the default): upgrade once a connection has moved
    ``AUTO_UPGRADE_AFTER`` bytes, so short connections never pay for a
    handshake; ``always``: upgrade as soon as connected; ``never``: plain
    TCP; a number (ASCII digits): upgrade after that many bytes.
``AIOCOLOC_TRUST`` / ``trust``
    ``same-uid`` (the default): share memory only with processes of our own
    user (checked with ``SO_PEERCRED`` on the control socket);
    ``uids:1000,1001``: with processes of those users; ``never``.
``AIOCOLOC_HANDSHAKE_TIMEOUT`` / ``handshake_timeout``
    Seconds (finite, > 0) before an upgrade gives up and the connection
    stays on TCP; 2.0 by default.
``AIOCOLOC_POOL_SIZE`` / ``pool_size``
    Bytes (ASCII digits, at least ``MIN_POOL_SIZE``) of the pool a serving
    process offers; 64 MiB by default.
``AIOCOLOC_HUB_LINGER`` / ``hub_linger``
    Seconds (finite, >= 0) the doorbells shared by the connections between
    two event loops (a hub, ``aiocoloc.notify.hub``) stay open after the
    last of those connections closed, for the next one; 5.0 by default, 0
    closes them with the last connection.

A ``handshake_timeout``, ``pool_size`` or ``hub_linger`` that is not a number is a
``TypeError`` (``True`` is not a number here), any other bad value a
``ValueError``, each naming the setting.  A bad
environment variable is a ``ValueError`` naming it and its value, raised by
the first call that needs the settings (and every one after it, until the
variable is fixed): a typo must not silently change how a deployment runs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "AUTO_UPGRADE_AFTER",
    "SERVER_WATCH",
    "UPGRADE_WATCH",
    "Settings",
    "Trust",
    "Upgrade",
    "check_handshake_timeout",
    "check_hub_linger",
    "check_pool_size",
    "configure",
    "current",
    "parse_trust",
    "parse_upgrade",
]

#: While a connection's upgrade runs, a writer that never yields to the event
#: loop is paused once it kept the loop from running this long (seconds):
#: each step of the handshake needs the loop (``SwitchableTransport.watch_loop``).
UPGRADE_WATCH = 0.0005
#: A server's connections, which a client may ask to upgrade at any time: the
#: first step (accepting on the control socket) waits at most this long.
SERVER_WATCH = 0.004
#: Bytes a connection moves on TCP before ``auto`` upgrades it.
AUTO_UPGRADE_AFTER = 64 * 1024
#: The smallest pool a serving process may offer: its tables (room for 2048
#: pipes) take 4.7 MB; this leaves about 200 slices of 16 KiB.
MIN_POOL_SIZE = 8 << 20


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
    if text.isascii() and text.isdigit():  # isdigit() alone takes full-width digits
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
        parts = [part.strip() for part in text[5:].split(",") if part.strip()]
        if not all(part.isascii() and part.isdigit() for part in parts):
            raise ValueError(f"trust uids must be integers: {value!r}")
        uids = frozenset(int(part) for part in parts)
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
    #: Seconds a hub outlives its last connection (a next one joins it).
    hub_linger: float = 5.0


def check_handshake_timeout(value: float) -> float:
    """``value`` if it is a finite number of seconds > 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"handshake_timeout must be a number of seconds, not {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"handshake_timeout must be finite and > 0, got {value!r}")
    return float(value)


def check_pool_size(value: int) -> int:
    """``value`` if it is an int (not a bool) >= ``MIN_POOL_SIZE``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"pool_size must be an int (bytes), not {value!r}")
    if value < MIN_POOL_SIZE:
        raise ValueError(f"pool_size must be an int >= {MIN_POOL_SIZE}, got {value!r}")
    return value


def check_hub_linger(value: float) -> float:
    """``value`` if it is a finite number of seconds >= 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"hub_linger must be a number of seconds, not {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"hub_linger must be finite and >= 0, got {value!r}")
    return float(value)


def _number(text: str, name: str) -> float:
    try:
        if not text.isascii():  # float() takes other scripts' digits
            raise ValueError
        return float(text)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, not {text!r}") from None


def _linger(text: str) -> float:
    return check_hub_linger(_number(text, "hub_linger"))


def _seconds(text: str) -> float:
    return check_handshake_timeout(_number(text, "handshake_timeout"))


def _bytes(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"pool_size must be a byte count, not {text!r}")
    return check_pool_size(int(text))


#: Environment variable -> (setting, parser of its text).
_ENVIRONMENT: dict[str, tuple[str, Callable[[str], Any]]] = {
    "AIOCOLOC_MODE": ("upgrade", parse_upgrade),
    "AIOCOLOC_TRUST": ("trust", parse_trust),
    "AIOCOLOC_HANDSHAKE_TIMEOUT": ("handshake_timeout", _seconds),
    "AIOCOLOC_POOL_SIZE": ("pool_size", _bytes),
    "AIOCOLOC_HUB_LINGER": ("hub_linger", _linger),
}

#: Setting -> its check (and normalisation) for ``configure``.
_CHECKS: dict[str, Callable[[Any], Any]] = {
    "upgrade": parse_upgrade,
    "trust": parse_trust,
    "handshake_timeout": check_handshake_timeout,
    "pool_size": check_pool_size,
    "hub_linger": check_hub_linger,
}


def _from_environment() -> Settings:
    changes = {}
    for variable, (name, parse) in _ENVIRONMENT.items():
        text = os.environ.get(variable)
        if not text:
            continue
        try:
            changes[name] = parse(text.strip())
        except ValueError as exc:
            raise ValueError(f"{variable}={text!r}: {exc}") from None
    return replace(Settings(), **changes)


_settings: Settings | None = None


def current() -> Settings:
    """The settings in force (from the environment until ``configure``)."""
    global _settings
    if _settings is None:
        _settings = _from_environment()
    return _settings


def configure(**changes: Any) -> Settings:
    """Change process-wide settings: ``upgrade``, ``trust``,
    ``handshake_timeout``, ``pool_size``, ``hub_linger``.  Returns the new settings."""
    global _settings
    unknown = set(changes) - _CHECKS.keys()
    if unknown:
        raise TypeError(f"configure() got unknown settings: {', '.join(sorted(unknown))}")
    checked = {name: _CHECKS[name](value) for name, value in changes.items()}
    _settings = replace(current(), **checked)
    return _settings


def reset() -> None:
    """Forget ``configure`` changes (the environment is read again)."""
    global _settings
    _settings = None
