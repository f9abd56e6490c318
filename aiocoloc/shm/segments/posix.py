"""POSIX named shared memory segments (``/dev/shm/NAME``) via posix_ipc."""

from __future__ import annotations

import enum
import grp
import logging
import os
import stat
import time

import posix_ipc

from aiocoloc.errors import SegmentError
from aiocoloc.shm.segments.base import Segment

_log = logging.getLogger("aiocoloc.shm.segments.posix")


class UnlinkPolicy(enum.Enum):
    """When the name of a POSIX segment is removed from ``/dev/shm``.

    The memory itself lives on while anything maps it (QEMU included).
    """

    #: The process that created the name removes it when it closes the
    #: segment (the default for pools aiocoloc creates).
    ON_CLOSE = "on_close"
    #: Nobody here removes it: an operator provisions and removes the name
    #: (the default when attaching, and for the host side of ivshmem).
    NEVER = "never"


def _normalise(name: str) -> str:
    if not name or "/" in name.lstrip("/") or len(name) > 250:
        raise SegmentError(f"invalid POSIX shared memory name {name!r} (one path component)")
    return name if name.startswith("/") else "/" + name


class PosixShmSegment(Segment):
    """A POSIX shared memory object, created 0600 (0660 with a group)."""

    kind = "posix"

    def __init__(self, fd: int, size: int, name: str, unlink: UnlinkPolicy, created: bool) -> None:
        super().__init__(fd, size, f"posix:{name}")
        self.name = name
        self.unlink_policy = unlink
        self.created = created

    @classmethod
    def create(
        cls,
        name: str,
        size: int,
        *,
        group: str | int | None = None,
        unlink: UnlinkPolicy = UnlinkPolicy.ON_CLOSE,
    ) -> PosixShmSegment:
        """Create ``name`` exclusively with ``size`` zero bytes.

        Mode 0600, or 0660 and owned by ``group`` when one is given.
        """
        name = _normalise(name)
        if size <= 0:
            raise SegmentError(f"segment size must be positive, got {size}")
        gid = _group_id(group) if group is not None else None
        mode = 0o660 if gid is not None else 0o600
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=mode, size=size)
        except posix_ipc.ExistentialError:
            raise SegmentError(f"shared memory {name} already exists") from None
        except (PermissionError, posix_ipc.PermissionsError) as exc:
            raise SegmentError(f"cannot create shared memory {name}: {exc}") from None
        try:
            fd = os.dup(shm.fd)
        finally:
            shm.close_fd()
        try:
            if gid is not None:
                os.fchown(fd, -1, gid)
                os.fchmod(fd, mode)  # the umask must not narrow it
        except BaseException:
            os.close(fd)
            posix_ipc.unlink_shared_memory(name)
            raise
        _log.debug("created %s (%d bytes, mode %o)", name, size, mode)
        return cls(fd, size, name, unlink, created=True)

    @classmethod
    def attach(
        cls,
        name: str,
        *,
        min_size: int = 1,
        unlink: UnlinkPolicy = UnlinkPolicy.NEVER,
        wait: float = 0.0,
    ) -> PosixShmSegment:
        """Open an existing ``name`` read-write.  ``wait``: how long a segment
        smaller than ``min_size`` may take to grow, as one does between its
        creator's ``shm_open`` and ``ftruncate``."""
        name = _normalise(name)
        try:
            shm = posix_ipc.SharedMemory(name, 0)
        except posix_ipc.ExistentialError:
            raise SegmentError(f"no shared memory named {name}") from None
        except (PermissionError, posix_ipc.PermissionsError):
            raise SegmentError(_permission_message(name)) from None
        try:
            fd = os.dup(shm.fd)
        finally:
            shm.close_fd()
        deadline = time.monotonic() + wait
        while (size := os.fstat(fd).st_size) < min_size and time.monotonic() < deadline:
            time.sleep(0.001)
        if size < min_size:
            os.close(fd)
            raise SegmentError(f"shared memory {name} holds {size} bytes, need at least {min_size}")
        return cls(fd, size, name, unlink, created=False)

    def unlink(self) -> None:
        """Remove the name now (mappings stay valid).  Idempotent."""
        try:
            posix_ipc.unlink_shared_memory(self.name)
        except posix_ipc.ExistentialError:
            pass

    def _after_close(self) -> None:
        if self.created and self.unlink_policy is UnlinkPolicy.ON_CLOSE:
            self.unlink()

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "identity": self.identity, "size": self.size, "name": self.name}


def _group_id(group: str | int) -> int:
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise SegmentError(f"no such group {group!r}") from None


def _permission_message(name: str) -> str:
    path = "/dev/shm" + name
    try:
        st = os.stat(path)
    except OSError:
        return f"permission denied opening shared memory {name}"
    return (
        f"permission denied opening shared memory {name}: mode "
        f"{stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid} gid {st.st_gid}, "
        f"we are uid {os.geteuid()}"
    )
