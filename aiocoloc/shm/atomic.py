"""Atomic words in shared memory, compiled or (single-process only) pure Python."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from aiocoloc.ring import extensions_disabled

__all__ = ["SharedWords", "atomics_are_process_safe"]

if TYPE_CHECKING:
    from aiocoloc.shm._atomic_py import SharedWords
else:
    try:
        _impl = importlib.import_module(
            "aiocoloc.shm._atomic_py" if extensions_disabled() else "aiocoloc.shm._atomic"
        )
    except ImportError:
        _impl = importlib.import_module("aiocoloc.shm._atomic_py")
    SharedWords = _impl.SharedWords


def atomics_are_process_safe() -> bool:
    """True when compare-and-swap works across processes (the compiled module)."""
    return SharedWords.__module__ == "aiocoloc.shm._atomic"
