"""What every segment backend provides."""

from __future__ import annotations

import mmap
import os
from abc import ABC, abstractmethod

from aiocoloc.errors import SegmentError


class Segment(ABC):
    """A region of shared memory of fixed size that several parties can map.

    ``identity`` names the underlying memory (equal in every process that
    maps the same memory); ``map()`` returns a shared read-write mapping that
    the caller closes; ``close()`` drops this segment's descriptor (existing
    mappings stay valid).
    """

    kind: str = "segment"

    def __init__(self, fd: int, size: int, identity: str) -> None:
        self._fd: int | None = fd
        self.size = size
        self.identity = identity

    @property
    def fd(self) -> int:
        """The open descriptor (for passing to a peer)."""
        if self._fd is None:
            raise SegmentError(f"{self.identity}: segment is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd is None

    def map(self) -> mmap.mmap:
        """A shared read-write mapping of the whole segment."""
        try:
            return mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise SegmentError(f"{self.identity}: cannot map {self.size} bytes: {exc}") from exc

    def close(self) -> None:
        """Close the descriptor.  Idempotent."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        self._after_close()

    def _after_close(self) -> None:  # noqa: B027 - a hook, empty by default
        """Backend clean-up after the descriptor is closed."""

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<{type(self).__name__} {self.identity} size={self.size} {state}>"

    @abstractmethod
    def describe(self) -> dict[str, object]:
        """What a peer needs to know to find this segment (no descriptors)."""


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
