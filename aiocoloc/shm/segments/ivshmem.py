"""The guest side of a QEMU ivshmem device: BAR2 of PCI 1af4:1110."""

from __future__ import annotations

import os
from pathlib import Path

from aiocoloc.errors import SegmentError
from aiocoloc.shm.segments.base import Segment, is_power_of_two

IVSHMEM_VENDOR = "0x1af4"
IVSHMEM_DEVICE = "0x1110"


def find_ivshmem_devices(sysfs_root: str | os.PathLike[str] = "/sys") -> list[Path]:
    """PCI device directories of every ivshmem device, sorted by address."""
    devices = Path(sysfs_root) / "bus" / "pci" / "devices"
    found = []
    try:
        entries = sorted(devices.iterdir())
    except FileNotFoundError:
        return []
    for entry in entries:
        try:
            vendor = (entry / "vendor").read_text().strip()
            device = (entry / "device").read_text().strip()
        except OSError:
            continue
        if vendor == IVSHMEM_VENDOR and device == IVSHMEM_DEVICE:
            found.append(entry)
    return found


class IvshmemSegment(Segment):
    """BAR2 of an ivshmem device, mapped from sysfs ``resource2``."""

    kind = "ivshmem"

    def __init__(self, fd: int, size: int, device: Path) -> None:
        super().__init__(fd, size, f"ivshmem:{device.name}")
        self.device = device

    @classmethod
    def open(
        cls,
        *,
        sysfs_root: str | os.PathLike[str] = "/sys",
        address: str | None = None,
        index: int = 0,
    ) -> IvshmemSegment:
        """Open the ivshmem device at PCI ``address`` (e.g. ``0000:00:04.0``),
        or the ``index``-th one found."""
        devices = find_ivshmem_devices(sysfs_root)
        where = Path(sysfs_root) / "bus" / "pci" / "devices"
        if address is not None:
            chosen = [d for d in devices if d.name == address]
            if not chosen:
                raise SegmentError(f"no ivshmem device (PCI 1af4:1110) at {address} under {where}")
            device = chosen[0]
        else:
            if not devices:
                raise SegmentError(f"no ivshmem device (PCI 1af4:1110) under {where}")
            if not 0 <= index < len(devices):
                raise SegmentError(f"ivshmem device #{index} requested, {len(devices)} present")
            device = devices[index]
        bar = device / "resource2"
        try:
            fd = os.open(bar, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SegmentError(f"{device.name}: no BAR2 ({bar} is missing)") from None
        except PermissionError:
            raise SegmentError(
                f"{device.name}: permission denied opening {bar} (root only)"
            ) from None
        size = os.fstat(fd).st_size
        if not is_power_of_two(size):
            os.close(fd)
            raise SegmentError(f"{device.name}: BAR2 size {size} is not a power of two")
        return cls(fd, size, device)

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "identity": self.identity, "size": self.size}
