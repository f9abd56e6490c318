"""Throw-away QEMU guests (TCG) that run this project's code against an ivshmem pool.

The guest needs no disk image: it boots a Debian kernel with a tiny initramfs
that mounts the host's ``/`` read-only over 9p and switches into it, so it
runs the host's own Python and ``.venv``.  Optional devices:

* ``ivshmem-plain``: a host POSIX shared memory file mapped as PCI BAR2;
* a virtio-net NIC whose wire is a QEMU socket netdev on the host's loopback
  (guest-to-guest L2; :class:`tests.qemu.l2hub.L2Hub` joins three or more);
* ``ivshmem-doorbell``: memory and interrupts from an ivshmem server, taken
  in guest user space through VFIO (q35 + emulated intel-iommu).

Always ``-accel tcg``: this host's ``/dev/kvm`` cannot boot stock kernels.
Everything is cached under ``~/.cache/aiocoloc-qemu`` (kernel, initramfs).
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

PACKAGES = ["qemu-system-x86", "busybox-static", "cpio", "kmod"]
#: Loaded by init on every boot.
MODULES = ["virtio_pci", "9pnet_virtio", "9p", "virtio_net"]
#: Loaded only when the kernel command line has ``vfio=1`` (doorbell guests).
VFIO_MODULES = ["vfio_pci", "vfio_iommu_type1"]
CACHE = Path(os.environ.get("AIOCOLOC_QEMU_CACHE", Path.home() / ".cache" / "aiocoloc-qemu"))
BEGIN, EXIT = "AIOCOLOC_GUEST_BEGIN", "AIOCOLOC_GUEST_EXIT="

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in {modules}; do modprobe $m; done
grep -q ' vfio=1' /proc/cmdline && for m in {vfio_modules}; do modprobe $m; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /newroot || {{ echo AIOCOLOC_GUEST_EXIT=98; poweroff -f; }}
mount -t tmpfs tmpfs /newroot/run
cp /stage2.sh /bin/busybox /newroot/run/
umount /proc /sys; mount --move /dev /newroot/dev
exec switch_root /newroot /run/stage2.sh
"""

# Stage 2 runs in the host's root filesystem.  Not busybox as the shell: with
# the host root shared, its /proc/self/exe would resolve to QEMU.  The address
# is set with the host's own `ip` binary.
STAGE2 = """#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/run TMPDIR=/run PYTHONDONTWRITEBYTECODE=1
mount -t proc proc /proc; mount -t sysfs sys /sys; mkdir -p /dev/shm; mount -t tmpfs tmpfs /dev/shm
arg() { for kv in $(cat /proc/cmdline); do case "$kv" in "$1"=*) echo "${kv#*=}";; esac; done; }
S=$(arg guestscript); IP=$(arg guestip)
ip link set lo up
if [ -n "$IP" ]; then ip link set eth0 up && ip addr add "$IP" dev eth0 || echo "AIOCOLOC_GUEST: cannot set $IP on eth0"; fi
echo AIOCOLOC_GUEST_BEGIN; /bin/bash "$S"; echo "AIOCOLOC_GUEST_EXIT=$?"
/run/busybox poweroff -f
"""


class QemuUnavailable(Exception):
    """QEMU guests cannot run on this machine (the reason says why)."""


def _run(
    cmd: list[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, check=True, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


def ensure_packages() -> None:
    """Install QEMU and the initramfs tools with apt-get when missing."""
    missing = [
        p
        for p in PACKAGES
        if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0
    ]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise QemuUnavailable(f"packages {missing} are missing and cannot be installed here")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        _run(["apt-get", "update", "-qq"], env=env, timeout=600)
        _run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
            env=env,
            timeout=1200,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise QemuUnavailable(f"apt-get could not install {missing}: {exc}") from None


def ensure_kernel() -> tuple[Path, str]:
    """A Debian kernel unpacked (not installed) in the cache: (vmlinuz, version)."""
    root = CACHE / "kernel"
    ready = CACHE / "kernel.ok"
    if not ready.exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        depends = subprocess.run(
            ["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True
        ).stdout
        if "Depends: linux-image-" not in depends:
            _run(["apt-get", "update", "-qq"], timeout=600)
            depends = _run(["apt-cache", "depends", "linux-image-amd64"]).stdout
        package = next(
            (
                line.split()[-1]
                for line in depends.splitlines()
                if line.strip().startswith("Depends: linux-image-")
            ),
            None,
        )
        if package is None:
            raise QemuUnavailable("no Debian kernel package (linux-image-amd64) is known to apt")
        download = root / "download"
        download.mkdir()
        download.chmod(0o777)  # apt's sandbox user writes here
        try:
            _run(
                ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", package],
                cwd=download,
                timeout=900,
            )
        except subprocess.CalledProcessError as exc:
            raise QemuUnavailable(f"cannot download {package}: {exc.stderr.strip()}") from None
        deb = next(download.glob("*.deb"))
        _run(["dpkg-deb", "-x", str(deb), str(root / "root")])
        shutil.rmtree(download)
        ready.touch()
    vmlinuz = sorted((root / "root" / "boot").glob("vmlinuz-*"))[0]
    version = vmlinuz.name.removeprefix("vmlinuz-")
    if not (root / "root" / "lib" / "modules" / version / "modules.dep").exists():
        _run(["depmod", "-b", str(root / "root"), version])
    return vmlinuz, version


def ensure_vmlinux(vmlinuz: Path, version: str) -> Path:
    """The kernel to boot: its uncompressed ELF when the kernel supports PVH, else ``vmlinuz``.

    QEMU boots a PVH ELF directly; under TCG that skips ~3 s of decompressing
    the bzImage in the guest (about a third of a guest's boot).
    """
    config = vmlinuz.with_name(f"config-{version}")
    if not config.exists() or "CONFIG_PVH=y" not in config.read_text():
        return vmlinuz
    elf = CACHE / f"vmlinux-{version}"
    if elf.exists():
        return elf
    image = vmlinuz.read_bytes()
    start = image.find(b"\xfd7zXZ\x00")  # Debian compresses its kernels with xz
    if start < 0:
        return vmlinuz
    try:
        payload = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(image[start:])
    except lzma.LZMAError:
        return vmlinuz
    if not payload.startswith(b"\x7fELF"):
        return vmlinuz
    partial = elf.with_name(f"{elf.name}.{os.getpid()}.tmp")
    partial.write_bytes(payload)
    partial.rename(elf)
    return elf


def _init_scripts() -> dict[str, str]:
    init = INIT.format(modules=" ".join(MODULES), vfio_modules=" ".join(VFIO_MODULES))
    return {"init": init, "stage2.sh": STAGE2}


def ensure_initrd(version: str) -> Path:
    """The initramfs: static busybox, the virtio/9p/net/vfio modules and the init scripts.

    Its file name carries a short hash of the modules and scripts, so a cached
    initramfs built from another list (say, without virtio_net) is never reused.
    """
    scripts = _init_scripts()
    digest = hashlib.sha256(
        "\0".join([*MODULES, *VFIO_MODULES, *scripts.values()]).encode()
    ).hexdigest()[:10]
    initrd = CACHE / f"initrd-{version}-{digest}.cpio.gz"
    if initrd.exists():
        return initrd
    kroot = CACHE / "kernel" / "root"
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        for d in ("bin", "proc", "sys", "dev", "newroot"):
            (t / d).mkdir()
        shutil.copy("/bin/busybox", t / "bin" / "busybox")
        moddir = t / "lib" / "modules" / version
        moddir.mkdir(parents=True)
        files: set[str] = set()
        for module in (*MODULES, *VFIO_MODULES):
            out = _run(
                ["modprobe", "-d", str(kroot), "-S", version, "--show-depends", module]
            ).stdout
            files.update(line.split()[1] for line in out.splitlines() if line.startswith("insmod"))
        marker = f"/lib/modules/{version}/"
        for f in files:
            rel = f.split(marker, 1)[1]
            (moddir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, moddir / rel)
        for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
            shutil.copy(kroot / "lib" / "modules" / version / name, moddir / name)
        _run(["depmod", "-b", str(t), version])
        for name, text in scripts.items():
            (t / name).write_text(text)
            (t / name).chmod(0o755)
        listing = _run(["find", "."], cwd=t).stdout
        cpio = subprocess.run(
            ["cpio", "-o", "-H", "newc"],
            input=listing.encode(),
            cwd=t,
            capture_output=True,
            check=True,
        ).stdout
        # A per-process temporary name: concurrent test processes may build at once.
        partial = initrd.with_name(f"{initrd.name}.{os.getpid()}.tmp")
        with partial.open("wb") as out_file:
            subprocess.run(["gzip", "-1"], input=cpio, stdout=out_file, check=True)
        partial.rename(initrd)
    return initrd


class Guest:
    """A running guest.

    A thread reads the serial console as it arrives, so a test can wait on the
    guest while it runs: ``wait_for("LISTENING", 60)`` blocks until a console
    line contains the text (and returns that line), ``lines()`` iterates over
    the console lines so far and as they come.  ``wait()`` returns the
    command's exit status and its output once the guest powers off.
    """

    def __init__(self, process: subprocess.Popen[bytes], workdir: tempfile.TemporaryDirectory[str]):
        self.process = process
        self.workdir = workdir
        #: ``time.monotonic()`` when QEMU was started.
        self.started_at = time.monotonic()
        #: Seconds from start until the command began (stage 2 reached), once it has.
        self.boot_seconds: float | None = None
        #: Seconds from start until the console closed (QEMU exited), once it has.
        self.total_seconds: float | None = None
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read_console, daemon=True)
        self._reader.start()

    def _read_console(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n").replace("\r", "")
            with self._changed:
                if self.boot_seconds is None and BEGIN in line:
                    self.boot_seconds = time.monotonic() - self.started_at
                self._lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self.total_seconds = time.monotonic() - self.started_at
            self._eof = True
            self._changed.notify_all()

    def lines(self, timeout: float | None = None) -> Iterator[str]:
        """The console lines so far, then each new one until the guest's console closes.

        Stops early (without raising) when ``timeout`` seconds pass with no new line.
        """
        index = 0
        while True:
            with self._changed:
                if index == len(self._lines) and not self._eof:
                    self._changed.wait(timeout)
                if index == len(self._lines):
                    return
                batch = self._lines[index:]
            index += len(batch)
            yield from batch

    def wait_for(self, text: str, timeout: float) -> str:
        """Block until a console line contains ``text``; return that line.

        Raises ``TimeoutError`` (with the console's tail) when the guest exits
        or ``timeout`` seconds pass first.
        """
        deadline = time.monotonic() + timeout
        index = 0
        with self._changed:
            while True:
                for line in self._lines[index:]:
                    if text in line:
                        return line
                index = len(self._lines)
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    tail = "\n".join(self._lines[-40:])
                    why = "exited" if self._eof else f"ran {timeout:g} s"
                    raise TimeoutError(f"guest {why} without printing {text!r}:\n{tail}")
                self._changed.wait(left)

    def wait(self, timeout: float) -> tuple[int, str]:
        """Wait for power-off: (command's exit status or 124 on timeout, its output)."""
        try:
            self.process.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        self.kill()
        status = 124 if timed_out else 99
        if not timed_out:
            for line in self._lines:
                if match := re.match(rf"{EXIT}(\d+)", line):
                    status = int(match[1])
        return status, "\n".join(self._lines).split(BEGIN, 1)[-1]

    def kill(self) -> None:
        """Stop the guest now and release its files (harmless once it has exited)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._reader.join()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.workdir.cleanup()


def prepare() -> tuple[Path, Path]:
    """Everything a guest needs (installs and downloads on first use): (kernel, initrd)."""
    ensure_packages()
    vmlinuz, version = ensure_kernel()
    return ensure_vmlinux(vmlinuz, version), ensure_initrd(version)


def _net_args(net: str | None, ip: str | None) -> list[str]:
    if net is None:
        return ["-nic", "none"]
    mode, _, port = net.partition(":")
    if mode not in ("listen", "connect") or not port.isdigit():
        raise ValueError(f"net must be 'listen:PORT' or 'connect:PORT', not {net!r}")
    # Every QEMU process would give its first NIC the same default MAC, and
    # guests on one segment with one MAC get duplicate IPv6 link-local
    # addresses and each other's unicast frames: derive a distinct, locally
    # administered MAC from the guest's IPv4 address (or pick one at random).
    octets = [int(b) for b in ip.split("/")[0].split(".")] if ip else list(os.urandom(4))
    mac = ":".join(f"{b:02x}" for b in [0x52, 0x54, *octets])
    # Loopback only: the wire is one TCP connection between QEMU processes (or the hub).
    return [
        "-netdev",
        f"socket,id=n0,{mode}=127.0.0.1:{port}",
        "-device",
        f"virtio-net-pci,netdev=n0,mac={mac}",
    ]


def start_guest(
    command: list[str],
    *,
    cwd: str | os.PathLike[str],
    shm: str | None = None,
    size: str = "4M",
    memory: str = "768M",
    net: str | None = None,
    ip: str | None = None,
    doorbell: str | None = None,
    env: dict[str, str] | None = None,
) -> Guest:
    """Boot a guest (``-smp 1``) that runs ``command`` in ``cwd``; it powers off when done.

    shm: ``/dev/shm/<shm>`` as an ivshmem-plain device (``size``, a power of two).
    net: ``"listen:PORT"`` or ``"connect:PORT"``: a virtio-net NIC (eth0) on a
    QEMU socket netdev at 127.0.0.1:PORT (with an ``L2Hub``: ``connect:hub.port``).
    ip: ``"169.254.X.Y/16"`` set on eth0 before the command runs.
    doorbell: an ivshmem server's Unix socket: an ivshmem-doorbell device (one
    vector) on q35 with intel-iommu, and the vfio modules loaded in the guest.
    env: extra variables exported to the command.
    """
    kernel, initrd = prepare()
    workdir = tempfile.TemporaryDirectory(prefix="aiocoloc-qemu-")
    script = Path(workdir.name) / "cmd.sh"
    inherited = {
        v: os.environ[v] for v in ("PATH", "VIRTUAL_ENV", "PYTHONPATH") if os.environ.get(v)
    }
    exports = [f"export {k}={shlex.quote(v)}" for k, v in {**inherited, **(env or {})}.items()]
    script.write_text(
        "\n".join(
            [
                *exports,
                f"cd {shlex.quote(str(Path(cwd).resolve()))} || exit 97",
                shlex.join(command),
                "",
            ]
        )
    )
    # mitigations=off: a throw-away guest gains nothing from them, and they cost under TCG.
    append = f"console=ttyS0 quiet panic=-1 mitigations=off guestscript={script}"
    # The machine and the IOMMU come first: the IOMMU must exist before the
    # PCI devices it translates for.
    args = ["qemu-system-x86_64", "-accel", "tcg"]
    if doorbell is not None:
        args += ["-machine", "q35", "-device", "intel-iommu"]
        append += " intel_iommu=on vfio=1"
    args += [
        "-m",
        memory,
        "-smp",
        "1",
        "-nographic",
        "-nodefaults",
        "-no-reboot",
        "-serial",
        "stdio",
        *_net_args(net, ip),
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
    ]
    if shm is not None:
        args += [
            "-object",
            f"memory-backend-file,id=ivmem,share=on,mem-path=/dev/shm/{shm.lstrip('/')},size={size}",
            "-device",
            "ivshmem-plain,memdev=ivmem",
        ]
    if doorbell is not None:
        args += [
            "-chardev",
            f"socket,path={doorbell},id=ivsrv",
            "-device",
            "ivshmem-doorbell,chardev=ivsrv,vectors=1",
        ]
    if ip is not None:
        append += f" guestip={ip}"
    process = subprocess.Popen(
        [*args, "-append", append],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    return Guest(process, workdir)


if __name__ == "__main__":  # pragma: no cover - manual use: prepare the cache
    print(prepare(), file=sys.stderr)
