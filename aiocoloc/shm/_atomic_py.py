"""Pure-Python stand-in for ``_atomic`` (same API).

Python cannot issue a compare-and-swap on shared memory: this reference
serialises operations with a lock *within one process* only.  Pools whose
members are in different processes need the compiled ``_atomic``; the pool
refuses to share itself across processes without it.
"""

from __future__ import annotations

import threading
from typing import Any

IMPLEMENTATION = "python"
_lock = threading.Lock()


class SharedWords:
    """Atomic 32- and 64-bit words of a writable buffer, by byte offset."""

    def __init__(self, buffer: Any) -> None:
        view = memoryview(buffer)
        if view.readonly:
            raise BufferError("Object is not writable.")
        self._view: memoryview | None = view.cast("B")

    def release(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None

    def _slice(self, offset: int, width: int) -> memoryview:
        if self._view is None:
            raise ValueError("shared words released")
        if offset < 0 or offset + width > len(self._view) or offset % width:
            raise IndexError(
                f"word at {offset} (width {width}) is outside or unaligned "
                f"in a buffer of {len(self._view)} bytes"
            )
        return self._view[offset : offset + width]

    def _get(self, offset: int, width: int) -> int:
        return int.from_bytes(self._slice(offset, width), "little")

    def _set(self, offset: int, width: int, value: int) -> None:
        self._slice(offset, width)[:] = value.to_bytes(width, "little")

    def _words(self, offset: int, count: int, stride: int) -> list[int]:
        if stride < 4 or stride % 4:
            raise ValueError(f"stride {stride} is not a positive multiple of 4")
        self._slice(offset, 4)
        self._slice(offset + (count - 1) * stride, 4)
        assert self._view is not None
        with self._view[offset : offset + (count - 1) * stride + 4] as raw:
            if stride == 4:
                return raw.cast("I").tolist()
            return [int.from_bytes(raw[i : i + 4], "little") for i in range(0, len(raw), stride)]

    def find32(
        self, offset: int, count: int, stride: int, value: int, limit: int = -1
    ) -> list[int]:
        """Indices ``i < count`` of the 32-bit words at ``offset + i * stride``
        equal to ``value``: the first ``limit`` of them, or all (-1)."""
        if count <= 0 or limit == 0:
            return []
        found = [i for i, word in enumerate(self._words(offset, count, stride)) if word == value]
        return found if limit < 0 else found[:limit]

    def count32(self, offset: int, count: int, stride: int, value: int) -> int:
        """How many of the 32-bit words at ``offset + i * stride`` (``i < count``)
        equal ``value``."""
        if count <= 0:
            return 0
        return self._words(offset, count, stride).count(value)

    def load64(self, offset: int) -> int:
        return self._get(offset, 8)

    def store64(self, offset: int, value: int) -> None:
        self._set(offset, 8, value)

    def cas64(self, offset: int, expected: int, desired: int) -> bool:
        with _lock:
            if self._get(offset, 8) != expected:
                return False
            self._set(offset, 8, desired)
            return True

    def add64(self, offset: int, delta: int) -> int:
        with _lock:
            old = self._get(offset, 8)
            self._set(offset, 8, (old + delta) % (1 << 64))
            return old

    def load32(self, offset: int) -> int:
        return self._get(offset, 4)

    def store32(self, offset: int, value: int) -> None:
        self._set(offset, 4, value)

    def cas32(self, offset: int, expected: int, desired: int) -> bool:
        with _lock:
            if self._get(offset, 4) != expected:
                return False
            self._set(offset, 4, desired)
            return True
