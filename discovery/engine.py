"""The engine interface: what the sidecar needs from a membership engine.

Two engines implement it: ``discovery.swim`` (embedded SWIM with Lifeguard,
the default) and ``discovery.serf`` (a HashiCorp Serf agent driven over its
RPC protocol).  The sidecar (``discovery.daemon``) and its tests see only
this interface.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from discovery.events import EventStream, Subscription
from discovery.member import Member

if TYPE_CHECKING:
    from discovery.keys import Keyring

__all__ = ["Engine", "EngineError"]


class EngineError(RuntimeError):
    """An engine cannot do what was asked (bad configuration, agent gone, ...)."""


class Engine(abc.ABC):
    """A membership engine: one local member, the others as it learns them."""

    def __init__(self) -> None:
        self.events = EventStream()

    @abc.abstractmethod
    async def start(self) -> None:
        """Bind sockets / reach the agent; the local member becomes alive."""

    @abc.abstractmethod
    async def join(self, addresses: Sequence[str]) -> int:
        """Contact existing members at ``"host:port"`` addresses; returns how
        many answered.  ``EngineError`` if none did."""

    @abc.abstractmethod
    async def leave(self) -> None:
        """Leave gracefully: the others see ``leave``, not ``failed``."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Release everything (after ``leave`` or instead of it).  Idempotent."""

    @abc.abstractmethod
    def local(self) -> Member:
        """The local member's current record."""

    @abc.abstractmethod
    def members(self) -> list[Member]:
        """Every member known, the local one included, with its status as
        this node sees it (left and failed ones until they are reaped)."""

    @abc.abstractmethod
    async def update_local(
        self,
        *,
        pools: frozenset[str] | None = None,
        endpoints: Sequence[str] | None = None,
        slots: Mapping[str, bytes] | None = None,
    ) -> Member:
        """Change what the local member advertises (None: keep it; the
        slots of pools no longer mapped go) and announce it (the others see
        ``update``); returns the new record."""

    async def set_keyring(self, keyring: Keyring) -> None:
        """Use ``keyring`` from now on: its primary key encrypts, all its
        keys decrypt (one step of a key rotation).  ``EngineError`` if the
        engine cannot (this default: it needs a restart for new keys)."""
        raise EngineError(
            f"the {type(self).__name__} cannot change keys while running; "
            "restart it to use new keys"
        )

    def subscribe(self) -> Subscription:
        """A subscription to this engine's events."""
        return self.events.subscribe()

    def stats(self) -> dict[str, int]:
        """Counters (packets, bytes, drops, ...) for logs and the benchmark."""
        return {}
