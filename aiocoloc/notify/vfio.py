"""Doorbells between VMs: ivshmem-doorbell interrupts in user space through VFIO.

A QEMU ``ivshmem-doorbell`` device (PCI 1af4:1110) connected to an ivshmem
server gives each VM a peer id (``IVPosition``) and lets it interrupt another
VM by writing ``(peer << 16) | vector`` to the Doorbell register.  The
interrupt arrives as MSI-X; VFIO (type1 IOMMU: the guest needs a vIOMMU,
``-machine q35 -device intel-iommu`` and ``intel_iommu=on``) routes each
vector to an eventfd that the event loop watches like any other doorbell.

``IvshmemVfio`` opens the device, maps BAR0 (registers) and BAR2 (the shared
memory), turns on Bus Master (an MSI-X message is a DMA write: without it the
device drops every interrupt) and hands out the eventfds.  ``segment()`` gives
BAR2 as a ``Segment`` so a ``Pool`` can live in it.

A ring to a peer that is not (yet) connected to the server is dropped without
error: protocols built on these doorbells ring again until the peer answers.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

from aiocoloc.errors import VfioUnavailable
from aiocoloc.notify.doorbell import new_eventfd
from aiocoloc.shm.segments.base import Segment
from aiocoloc.shm.segments.ivshmem import find_ivshmem_devices

__all__ = [
    "DOORBELL_REGISTER",
    "IVPOSITION_REGISTER",
    "IvshmemVfio",
    "VfioBarSegment",
    "VfioUnavailable",
]

_log = logging.getLogger("aiocoloc.notify.vfio")

# --- <linux/vfio.h>: ioctl numbers are _IO(';', 100 + n) ------------------------------
_VFIO_BASE = (ord(";") << 8) | 100
VFIO_GET_API_VERSION = _VFIO_BASE + 0  # container: returns VFIO_API_VERSION
VFIO_CHECK_EXTENSION = _VFIO_BASE + 1  # container: is this IOMMU type supported?
VFIO_SET_IOMMU = _VFIO_BASE + 2  # container: choose the IOMMU type
VFIO_GROUP_GET_STATUS = _VFIO_BASE + 3  # group: struct vfio_group_status
VFIO_GROUP_SET_CONTAINER = _VFIO_BASE + 4  # group: join a container (int fd)
VFIO_GROUP_GET_DEVICE_FD = _VFIO_BASE + 6  # group: device fd from a PCI address string
VFIO_DEVICE_GET_REGION_INFO = _VFIO_BASE + 8  # device: struct vfio_region_info
VFIO_DEVICE_GET_IRQ_INFO = _VFIO_BASE + 9  # device: struct vfio_irq_info
VFIO_DEVICE_SET_IRQS = _VFIO_BASE + 10  # device: struct vfio_irq_set + eventfds

VFIO_API_VERSION = 0
VFIO_TYPE1_IOMMU, VFIO_TYPE1v2_IOMMU = 1, 3
VFIO_GROUP_FLAGS_VIABLE = 1 << 0  # every device of the group is bound to vfio
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2  # data[] holds one eventfd per vector
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5  # the interrupt signals the eventfd
VFIO_PCI_BAR0_REGION, VFIO_PCI_BAR2_REGION = 0, 2
VFIO_PCI_CONFIG_REGION = 7
VFIO_PCI_MSIX_IRQ = 2

# struct vfio_group_status {u32 argsz, flags}
_GROUP_STATUS = struct.Struct("<II")
# struct vfio_region_info {u32 argsz, flags, index, cap_offset; u64 size, offset}
_REGION_INFO = struct.Struct("<IIIIQQ")
# struct vfio_irq_info {u32 argsz, flags, index, count}
_IRQ_INFO = struct.Struct("<IIII")
# struct vfio_irq_set {u32 argsz, flags, index, start, count} followed by s32 data[count]
_IRQ_SET = struct.Struct("<IIIII")

# --- PCI configuration space and the ivshmem registers ------------------------------
_PCI_COMMAND = 4  # u16 command register
_PCI_COMMAND_MEMORY = 1 << 1  # decode memory BARs
_PCI_COMMAND_MASTER = 1 << 2  # bus master: the device may write memory (MSI-X)
IVPOSITION_REGISTER = 8 // 4  # BAR0 register index (32-bit words): our peer id
DOORBELL_REGISTER = 12 // 4  # BAR0 register index: write (peer << 16) | vector


class VfioBarSegment(Segment):
    """BAR2 of an ivshmem device through a VFIO device descriptor.

    Same memory, same ``identity`` as ``IvshmemSegment`` (sysfs ``resource2``),
    but mapped at the region's offset in the VFIO device file.
    """

    kind = "ivshmem"

    def __init__(self, fd: int, size: int, offset: int, address: str) -> None:
        super().__init__(fd, size, f"ivshmem:{address}")
        self.offset = offset

    def map(self) -> mmap.mmap:
        """A shared read-write mapping of BAR2."""
        return mmap.mmap(
            self.fd,
            self.size,
            mmap.MAP_SHARED,
            mmap.PROT_READ | mmap.PROT_WRITE,
            offset=self.offset,
        )

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "identity": self.identity, "size": self.size}


class IvshmemVfio:
    """An ivshmem-doorbell device opened through VFIO.  Use ``IvshmemVfio.open``."""

    def __init__(
        self, address: str, fds: list[int], bar0: mmap.mmap, shm: mmap.mmap, shm_offset: int
    ) -> None:
        # fds: container, group, device, then one eventfd per MSI-X vector.
        self.address = address
        self._fds = fds
        self._device = fds[2]
        self._eventfds = fds[3:]
        self._bar0 = bar0
        # One 32-bit load or store per item: the registers take no other width.
        self._regs: memoryview | None = memoryview(bar0).cast("I")
        #: BAR2, the shared memory, mapped read-write.
        self.shm = shm
        self._shm_offset = shm_offset
        #: Where BAR0 sits in the device descriptor (for a process given a dup of it).
        self.bar0_offset = 0

    @classmethod
    def open(
        cls,
        *,
        address: str | None = None,
        index: int = 0,
        vectors: int | None = None,
        sysfs_root: str | os.PathLike[str] = "/sys",
        dev_root: str | os.PathLike[str] = "/dev",
    ) -> IvshmemVfio:
        """Open the ivshmem device at PCI ``address`` (or the ``index``-th found),
        binding it to vfio-pci when no driver has it, with ``vectors`` MSI-X
        vectors (default: all the device has) routed to eventfds."""
        device = _choose_device(Path(sysfs_root), address, index)
        group = _vfio_group(device, Path(sysfs_root), Path(dev_root))
        with contextlib.ExitStack() as undo, _as_unavailable(device.name):
            fds: list[int] = []
            undo.callback(_close_all, fds)
            fds.append(_open(Path(dev_root) / "vfio" / "vfio"))
            fds.append(_open(group))
            fds.append(_attach_device(fds[0], fds[1], device.name))
            bar0, bar0_offset = _region(fds[2], VFIO_PCI_BAR0_REGION)
            bar2, bar2_offset = _region(fds[2], VFIO_PCI_BAR2_REGION)
            _enable_bus_master(fds[2])
            available = _msix_count(fds[2])
            count = available if vectors is None else vectors
            if not 1 <= count <= available:
                raise VfioUnavailable(
                    errno.EINVAL,
                    f"{device.name}: {count} MSI-X vectors requested, the device has {available}",
                )
            fds.extend(new_eventfd() for _ in range(count))
            _route_msix(fds[2], fds[3:])
            regs = mmap.mmap(fds[2], bar0, offset=bar0_offset)
            undo.callback(regs.close)
            shm = mmap.mmap(fds[2], bar2, offset=bar2_offset)
            undo.pop_all()
        opened = cls(device.name, fds, regs, shm, bar2_offset)
        opened.bar0_offset = bar0_offset
        _log.debug(
            "%s: VFIO group %s, IVPosition %d, BAR2 %d bytes, %d vectors",
            device.name,
            group.name,
            opened.position,
            bar2,
            count,
        )
        return opened

    @property
    def position(self) -> int:
        """Our peer id on the ivshmem server (the IVPosition register)."""
        return self._registers()[IVPOSITION_REGISTER]

    @property
    def vectors(self) -> int:
        """How many MSI-X vectors reach an eventfd."""
        return len(self._eventfds)

    def listen_fd(self, vector: int = 0) -> int:
        """The non-blocking eventfd that ``vector``'s interrupts signal
        (owned by this object: ``loop.add_reader`` it, never close it)."""
        self._registers()
        return self._eventfds[vector]

    def drain(self, vector: int = 0) -> int:
        """Consume ``vector``'s pending interrupts: how many arrived (0 if none)."""
        try:
            return os.eventfd_read(self.listen_fd(vector))
        except BlockingIOError:
            return 0

    def ring(self, peer: int, vector: int = 0) -> None:
        """Interrupt ``vector`` of ``peer`` (dropped if no such peer is connected)."""
        if not 0 <= peer <= 0xFFFF or not 0 <= vector <= 0xFFFF:
            raise ValueError(f"peer {peer} and vector {vector} must fit in 16 bits")
        self._registers()[DOORBELL_REGISTER] = (peer << 16) | vector

    def regions(self) -> tuple[int, int, int, int]:
        """``(BAR0 offset, BAR0 size, BAR2 offset, BAR2 size)`` in the device
        descriptor: what another process given ``dup_device()`` maps."""
        self._registers()
        return self.bar0_offset, len(self._bar0), self._shm_offset, len(self.shm)

    def dup_device(self) -> int:
        """A new descriptor of the VFIO device (the caller owns it): mapping
        its regions reaches the same BARs from any process."""
        self._registers()
        return os.dup(self._device)

    def segment(self) -> VfioBarSegment:
        """BAR2 as a segment of its own (own descriptor; the caller closes it)."""
        self._registers()
        return VfioBarSegment(os.dup(self._device), len(self.shm), self._shm_offset, self.address)

    @property
    def closed(self) -> bool:
        return self._regs is None

    def close(self) -> None:
        """Unmap both BARs and close every descriptor.  Idempotent."""
        if self._regs is None:
            return
        self._regs.release()
        self._regs = None
        self._bar0.close()
        self.shm.close()
        # Closing the device disables MSI-X and resets it; the eventfds go last.
        for fd in (self._device, self._fds[1], self._fds[0], *self._eventfds):
            os.close(fd)
        self._fds = []

    def _registers(self) -> memoryview:
        if self._regs is None:
            raise ValueError(f"ivshmem device {self.address} is closed")
        return self._regs

    def __enter__(self) -> IvshmemVfio:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"position={self.position}"
        return f"<IvshmemVfio {self.address} {state}>"


def _choose_device(sysfs: Path, address: str | None, index: int) -> Path:
    devices = find_ivshmem_devices(sysfs)
    where = sysfs / "bus" / "pci" / "devices"
    if address is not None:
        devices = [d for d in devices if d.name == address]
        index = 0
    if not 0 <= index < len(devices):
        at = f" at {address}" if address is not None else f" #{index}"
        raise VfioUnavailable(errno.ENODEV, f"no ivshmem device (PCI 1af4:1110){at} under {where}")
    return devices[index]


def _vfio_group(device: Path, sysfs: Path, dev: Path) -> Path:
    """Bind ``device`` to vfio-pci if no driver has it; its /dev/vfio/N group."""
    driver = device / "driver"
    if not driver.exists():
        if not (sysfs / "bus" / "pci" / "drivers" / "vfio-pci").is_dir():
            raise VfioUnavailable(
                errno.ENOENT,
                f"{device.name}: the vfio-pci module is not loaded (modprobe vfio-pci)",
            )
        try:
            (device / "driver_override").write_text("vfio-pci")
            (sysfs / "bus" / "pci" / "drivers_probe").write_text(device.name)
        except OSError as exc:
            raise VfioUnavailable(
                exc.errno, f"{device.name}: cannot bind to vfio-pci: {exc.strerror}"
            ) from None
    if not driver.exists():
        raise VfioUnavailable(errno.ENODEV, f"{device.name}: vfio-pci did not take the device")
    if (bound := driver.resolve().name) != "vfio-pci":
        raise VfioUnavailable(errno.EBUSY, f"{device.name}: bound to {bound}, not vfio-pci")
    link = device / "iommu_group"
    if not link.exists():
        raise VfioUnavailable(
            errno.ENOENT,
            f"{device.name}: no IOMMU group (needs an IOMMU and intel_iommu=on; "
            "under QEMU: -machine q35 -device intel-iommu)",
        )
    group = dev / "vfio" / link.resolve().name
    # Without udev the node appears when devtmpfs catches up with the bind.
    for _ in range(100):
        if group.exists():
            return group
        time.sleep(0.01)
    raise VfioUnavailable(errno.ENOENT, f"{device.name}: {group} does not exist")


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise VfioUnavailable(exc.errno, f"cannot open {path}: {exc.strerror}") from None


def _attach_device(container: int, group: int, address: str) -> int:
    """Put ``group`` in ``container`` with a type1 IOMMU; the device's descriptor."""
    if fcntl.ioctl(container, VFIO_GET_API_VERSION) != VFIO_API_VERSION:
        raise VfioUnavailable(errno.EPROTO, "unknown VFIO API version")
    status = bytearray(_GROUP_STATUS.pack(_GROUP_STATUS.size, 0))
    fcntl.ioctl(group, VFIO_GROUP_GET_STATUS, status)
    if not _GROUP_STATUS.unpack(status)[1] & VFIO_GROUP_FLAGS_VIABLE:
        raise VfioUnavailable(
            errno.EBUSY, f"{address}: IOMMU group not viable (a device of it is not on vfio)"
        )
    fcntl.ioctl(group, VFIO_GROUP_SET_CONTAINER, struct.pack("<i", container))
    for iommu in (VFIO_TYPE1v2_IOMMU, VFIO_TYPE1_IOMMU):
        if fcntl.ioctl(container, VFIO_CHECK_EXTENSION, iommu) == 1:
            fcntl.ioctl(container, VFIO_SET_IOMMU, iommu)
            break
    else:
        raise VfioUnavailable(errno.ENOTSUP, "VFIO has no type1 IOMMU (vfio_iommu_type1 module)")
    # A mutable buffer makes ioctl return its int result: the new descriptor.
    return int(fcntl.ioctl(group, VFIO_GROUP_GET_DEVICE_FD, bytearray(address.encode() + b"\0")))


def _region(device: int, index: int) -> tuple[int, int]:
    """(size, offset in the device file) of VFIO region ``index``."""
    info = bytearray(_REGION_INFO.pack(_REGION_INFO.size, 0, index, 0, 0, 0))
    fcntl.ioctl(device, VFIO_DEVICE_GET_REGION_INFO, info)
    _, _, _, _, size, offset = _REGION_INFO.unpack(info)
    if size == 0:
        raise VfioUnavailable(errno.ENXIO, f"VFIO region {index} is empty")
    return size, offset


def _enable_bus_master(device: int) -> None:
    _, config = _region(device, VFIO_PCI_CONFIG_REGION)
    (command,) = struct.unpack("<H", os.pread(device, 2, config + _PCI_COMMAND))
    command |= _PCI_COMMAND_MEMORY | _PCI_COMMAND_MASTER
    os.pwrite(device, struct.pack("<H", command), config + _PCI_COMMAND)


def _msix_count(device: int) -> int:
    info = bytearray(_IRQ_INFO.pack(_IRQ_INFO.size, 0, VFIO_PCI_MSIX_IRQ, 0))
    fcntl.ioctl(device, VFIO_DEVICE_GET_IRQ_INFO, info)
    return int(_IRQ_INFO.unpack(info)[3])


def _route_msix(device: int, eventfds: list[int]) -> None:
    """Signal ``eventfds[i]`` on MSI-X vector ``i``."""
    flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER
    argsz = _IRQ_SET.size + 4 * len(eventfds)
    request = _IRQ_SET.pack(argsz, flags, VFIO_PCI_MSIX_IRQ, 0, len(eventfds))
    fcntl.ioctl(
        device, VFIO_DEVICE_SET_IRQS, request + struct.pack(f"<{len(eventfds)}i", *eventfds)
    )


@contextlib.contextmanager
def _as_unavailable(address: str) -> Iterator[None]:
    """Report a failed VFIO call as ``VfioUnavailable``, naming the device."""
    try:
        yield
    except VfioUnavailable:
        raise
    except OSError as exc:
        raise VfioUnavailable(exc.errno, f"{address}: VFIO set-up failed: {exc}") from exc


def _close_all(fds: list[int]) -> None:
    for fd in reversed(fds):
        os.close(fd)
