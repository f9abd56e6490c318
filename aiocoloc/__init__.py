"""aiocoloc: asyncio connections over shared memory when co-located, TCP otherwise.

Drop-in entry points (asyncio's signatures): ``open_connection``,
``start_server``, ``create_connection(loop, ...)``, ``create_server(loop, ...)``;
``install()`` routes every loop's ``create_connection``/``create_server``
through aiocoloc.  ``configure()`` sets the upgrade and trust policy,
``stats()`` counts upgrades and fallbacks.
"""

from __future__ import annotations

from aiocoloc.connect.api import (
    Server,
    create_connection,
    create_server,
    open_connection,
    start_server,
)
from aiocoloc.connect.install import install, installed, uninstall
from aiocoloc.connect.policy import configure
from aiocoloc.errors import (
    AiocolocError,
    LayoutMismatch,
    PoolBusy,
    PoolCorrupted,
    PoolError,
    PoolExhausted,
    RingAttachError,
    RingClosed,
    RingCorrupted,
    RingError,
    SegmentError,
)
from aiocoloc.transport import SwitchableTransport
from aiocoloc.transport.fallback import stats

__all__ = [
    "AiocolocError",
    "LayoutMismatch",
    "PoolBusy",
    "PoolCorrupted",
    "PoolError",
    "PoolExhausted",
    "RingAttachError",
    "RingClosed",
    "RingCorrupted",
    "RingError",
    "SegmentError",
    "Server",
    "SwitchableTransport",
    "configure",
    "create_connection",
    "create_server",
    "install",
    "installed",
    "open_connection",
    "start_server",
    "stats",
    "uninstall",
]

__version__ = "0.1.0"
