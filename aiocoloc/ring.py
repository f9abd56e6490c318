"""The shared-memory byte channels (rings and pipes), compiled or pure Python.

``AIOCOLOC_NO_EXTENSIONS=1`` selects the pure-Python reference; otherwise the
Cython core is used and the reference only stands in (with a warning in the
log) when the extension was not built.  Both have the same API and raise the
same exceptions with the same messages (``aiocoloc.errors``); both take their
layout numbers and attach checks from ``_ring_layout``, pipe geometry, the
layout-slot codec and resize planning from ``_ring_pipe_layout``, and the words
of their run-time errors from ``_ring_checks``.  A compiled core built with
other layout numbers refuses to import (``LayoutMismatch``): that is a stale
build to fix, not a missing one to stand in for.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType
from typing import TYPE_CHECKING

from aiocoloc.errors import LayoutMismatch, RingAttachError, RingClosed, RingCorrupted, RingError

__all__ = [
    "HEADER_SIZE",
    "IMPLEMENTATION",
    "LAYOUT",
    "LAYOUT_VERSION",
    "MIN_CAPACITY",
    "PipeConsumer",
    "PipeProducer",
    "RingAttachError",
    "RingClosed",
    "RingConsumer",
    "RingCorrupted",
    "RingError",
    "RingProducer",
    "format_pipe",
    "format_ring",
    "pipe_entry_size",
    "ring_size",
]

_log = logging.getLogger("aiocoloc.ring")


def extensions_disabled() -> bool:
    """True when ``AIOCOLOC_NO_EXTENSIONS`` asks for the pure-Python code."""
    return os.environ.get("AIOCOLOC_NO_EXTENSIONS", "") not in ("", "0")


def _select() -> ModuleType:
    if extensions_disabled():
        return importlib.import_module("aiocoloc._ring_py")
    try:
        return importlib.import_module("aiocoloc._ring")
    except LayoutMismatch:
        raise
    except ImportError as exc:
        _log.warning("Cython ring not built (%s); using the slow pure-Python ring", exc)
        return importlib.import_module("aiocoloc._ring_py")


if TYPE_CHECKING:
    from aiocoloc._ring_py import (
        HEADER_SIZE,
        IMPLEMENTATION,
        LAYOUT,
        LAYOUT_VERSION,
        MIN_CAPACITY,
        PipeConsumer,
        PipeProducer,
        RingConsumer,
        RingProducer,
        format_pipe,
        format_ring,
        pipe_entry_size,
        ring_size,
    )
else:
    _impl = _select()
    globals().update({name: getattr(_impl, name) for name in __all__ if hasattr(_impl, name)})
