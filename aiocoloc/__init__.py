"""aiocoloc: asyncio connections over shared memory when co-located, TCP otherwise."""

from __future__ import annotations

from aiocoloc.errors import (
    AiocolocError,
    RingAttachError,
    RingClosed,
    RingCorrupted,
    RingError,
)

__all__ = [
    "AiocolocError",
    "RingAttachError",
    "RingClosed",
    "RingCorrupted",
    "RingError",
]

__version__ = "0.1.0"
