"""Which pool member slot is which sidecar: the slot tags of member records.

A sidecar joins every pool it maps as a member; the pool's member table
gives each member a random id (``Pool.endpoint_id``, written in its entry)
and its pid.  To let co-located sidecars watch each other through the pool,
each advertises, for every pool it maps, a *slot tag* in its record's
``slots`` (pool id -> tag): that member id and a fingerprint of its kernel
and pid namespace (a peer with the same fingerprint may watch the pid
itself: ``pidfd_open``).

A tag is the 16 bytes of the member id, then the fingerprint's bytes (6,
or none when it cannot be told): 22 bytes, within ``MAX_SLOT``.  The API
never shows tags (``Member.to_json`` leaves them out).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass

from discovery.member import MAX_SLOT, Member

__all__ = ["FINGERPRINT_SIZE", "SlotTag", "kernel_fingerprint", "slot_tags"]

#: Bytes of a kernel fingerprint.
FINGERPRINT_SIZE = 6
_ID_SIZE = 16


@dataclass(frozen=True)
class SlotTag:
    """A sidecar's member id in one pool, and its kernel fingerprint."""

    member_id: uuid.UUID
    fingerprint: bytes

    def encode(self) -> bytes:
        """The member id's bytes, then the fingerprint's."""
        return self.member_id.bytes + self.fingerprint

    @classmethod
    def decode(cls, data: bytes) -> SlotTag | None:
        """The tag ``data`` holds, or None if it is not one."""
        if not _ID_SIZE <= len(data) <= MAX_SLOT:
            return None
        return cls(uuid.UUID(bytes=data[:_ID_SIZE]), data[_ID_SIZE:])


def slot_tags(member: Member) -> dict[str, SlotTag]:
    """The slot tags ``member`` advertises, by pool id."""
    tags = {pool: SlotTag.decode(data) for pool, data in member.slots.items()}
    return {pool: tag for pool, tag in tags.items() if tag is not None}


def kernel_fingerprint() -> bytes:
    """Equal for processes of one kernel boot and pid namespace (whose pids
    mean the same process); empty when it cannot be told."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            boot = f.read().strip()
        ns = os.stat("/proc/self/ns/pid")
    except OSError:
        return b""
    digest = hashlib.sha256(boot + f":{ns.st_dev}:{ns.st_ino}".encode()).digest()
    return digest[:FINGERPRINT_SIZE]
