"""Which pool member slot is which sidecar: slot tags in the member record.

A sidecar joins every pool it maps as a member; the pool's member table
gives each member a random id (``Pool.endpoint_id``, written in its entry)
and its pid.  To let co-located sidecars watch each other through the pool,
each advertises, for every pool it maps, a *slot tag*: that member id and a
fingerprint of its kernel and pid namespace (a peer with the same
fingerprint may watch the pid itself: ``pidfd_open``).

The member record (``discovery.member``) has no field for them yet, so the
tags ride in its ``endpoints`` list under a prefix no control endpoint uses
(``~s:``), and the sidecar strips them from every record it hands out
through its API: clients never see them.  A dedicated record field would be
cleaner (and leave the endpoint slots to servers); this module is the one
place that would change.
"""

from __future__ import annotations

import base64
import hashlib
import os
import uuid
from dataclasses import dataclass, replace

from discovery.member import Member

__all__ = ["SlotTag", "kernel_fingerprint", "public", "slot_tags"]

TAG_PREFIX = "~s:"


@dataclass(frozen=True)
class SlotTag:
    """A sidecar's member id in one pool, and its kernel fingerprint."""

    member_id: uuid.UUID
    fingerprint: str

    def encode(self) -> str:
        """``~s:<member id, base64url>@<fingerprint>`` (about 32 bytes)."""
        b64 = base64.urlsafe_b64encode(self.member_id.bytes).rstrip(b"=").decode()
        return f"{TAG_PREFIX}{b64}@{self.fingerprint}"

    @classmethod
    def decode(cls, text: str) -> SlotTag | None:
        """The tag ``text`` holds, or None if it is not one (or is mangled)."""
        if not text.startswith(TAG_PREFIX):
            return None
        b64, _, fingerprint = text[len(TAG_PREFIX) :].partition("@")
        try:
            raw = base64.urlsafe_b64decode(b64 + "==")
            return cls(uuid.UUID(bytes=raw), fingerprint) if len(raw) == 16 else None
        except ValueError:
            return None


def is_tag(endpoint: str) -> bool:
    return endpoint.startswith(TAG_PREFIX)


def slot_tags(member: Member) -> list[SlotTag]:
    """The slot tags ``member`` advertises."""
    return [tag for tag in map(SlotTag.decode, member.endpoints) if tag is not None]


def public(member: Member) -> Member:
    """``member`` as API clients see it: without slot tags."""
    if not any(map(is_tag, member.endpoints)):
        return member
    return replace(member, endpoints=tuple(e for e in member.endpoints if not is_tag(e)))


def kernel_fingerprint() -> str:
    """Equal for processes of one kernel boot and pid namespace (whose pids
    mean the same process); empty when it cannot be told."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            boot = f.read().strip()
        ns = os.stat("/proc/self/ns/pid")
    except OSError:
        return ""
    digest = hashlib.sha256(boot + f":{ns.st_dev}:{ns.st_ino}".encode()).digest()
    return base64.urlsafe_b64encode(digest[:6]).decode()
