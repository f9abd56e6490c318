"""Throw-away QEMU guests (TCG) that run this project's code against an ivshmem pool.

The guest needs no disk image: it boots a Debian kernel with a tiny initramfs
that mounts the host's ``/`` read-only over 9p and switches into it, so it
runs the host's own Python and ``.venv``.  An ``ivshmem-plain`` device maps a
host POSIX shared memory file into the guest as PCI BAR2.

Always ``-accel tcg``: this host's ``/dev/kvm`` cannot boot stock kernels.
Everything is cached under ``~/.cache/aiocoloc-qemu`` (kernel, initramfs).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ["qemu-system-x86", "busybox-static", "cpio", "kmod"]
MODULES = ["virtio_pci", "9pnet_virtio", "9p"]
CACHE = Path(os.environ.get("AIOCOLOC_QEMU_CACHE", Path.home() / ".cache" / "aiocoloc-qemu"))

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in {modules}; do modprobe $m; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /newroot || {{ echo AIOCOLOC_GUEST_EXIT=98; poweroff -f; }}
mount -t tmpfs tmpfs /newroot/run
cp /stage2.sh /bin/busybox /newroot/run/
umount /proc /sys; mount --move /dev /newroot/dev
exec switch_root /newroot /run/stage2.sh
"""

# Stage 2 runs in the host's root filesystem.  Not busybox as the shell: with
# the host root shared, its /proc/self/exe would resolve to QEMU.
STAGE2 = """#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/run TMPDIR=/run PYTHONDONTWRITEBYTECODE=1
mount -t proc proc /proc; mount -t sysfs sys /sys; mkdir -p /dev/shm; mount -t tmpfs tmpfs /dev/shm
S=$(for kv in $(cat /proc/cmdline); do case "$kv" in guestscript=*) echo "${kv#*=}";; esac; done)
echo AIOCOLOC_GUEST_BEGIN; /bin/bash "$S"; echo "AIOCOLOC_GUEST_EXIT=$?"
/run/busybox poweroff -f
"""


class QemuUnavailable(Exception):
    """QEMU guests cannot run on this machine (the reason says why)."""


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)  # type: ignore[call-overload]


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


def ensure_initrd(version: str) -> Path:
    """The initramfs: static busybox, the 9p/virtio modules and the init scripts."""
    initrd = CACHE / f"initrd-{version}.cpio.gz"
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
        files = set()
        for module in MODULES:
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
        (t / "init").write_text(INIT.format(modules=" ".join(MODULES)))
        (t / "stage2.sh").write_text(STAGE2)
        (t / "init").chmod(0o755)
        (t / "stage2.sh").chmod(0o755)
        listing = _run(["find", "."], cwd=t).stdout
        cpio = subprocess.run(
            ["cpio", "-o", "-H", "newc"],
            input=listing.encode(),
            cwd=t,
            capture_output=True,
            check=True,
        ).stdout
        partial = initrd.with_suffix(".tmp")
        subprocess.run(["gzip", "-1"], input=cpio, stdout=partial.open("wb"), check=True)
        partial.rename(initrd)
    return initrd


@dataclass
class Guest:
    """A running guest; ``wait()`` returns its command's exit status and output."""

    process: subprocess.Popen[bytes]
    workdir: tempfile.TemporaryDirectory[str]

    def wait(self, timeout: float) -> tuple[int, str]:
        try:
            raw, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raw, _ = self.process.communicate()
            self.workdir.cleanup()
            return 124, raw.decode(errors="replace")
        self.workdir.cleanup()
        console = raw.decode(errors="replace").replace("\r", "")
        status = 99
        for line in console.splitlines():
            if line.startswith("AIOCOLOC_GUEST_EXIT="):
                status = int(line.split("=", 1)[1] or 99)
        body = console.split("AIOCOLOC_GUEST_BEGIN", 1)[-1]
        return status, body

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.workdir.cleanup()


def prepare() -> tuple[Path, Path]:
    """Everything a guest needs (installs and downloads on first use)."""
    ensure_packages()
    vmlinuz, version = ensure_kernel()
    return vmlinuz, ensure_initrd(version)


def start_guest(
    command: list[str], *, shm: str, size: str, cwd: str | os.PathLike[str], memory: str = "768M"
) -> Guest:
    """Boot a guest with an ivshmem-plain device backed by ``/dev/shm/<shm>``."""
    vmlinuz, initrd = prepare()
    workdir = tempfile.TemporaryDirectory(prefix="aiocoloc-qemu-")
    script = Path(workdir.name) / "cmd.sh"
    exports = [
        f"export {v}={shlex.quote(os.environ[v])}"
        for v in ("PATH", "VIRTUAL_ENV", "PYTHONPATH")
        if os.environ.get(v)
    ]
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
    args = [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-m",
        memory,
        "-smp",
        "1",
        "-nographic",
        "-nodefaults",
        "-no-reboot",
        "-serial",
        "stdio",
        "-nic",
        "none",
        "-kernel",
        str(vmlinuz),
        "-initrd",
        str(initrd),
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-object",
        f"memory-backend-file,id=ivmem,share=on,mem-path=/dev/shm/{shm.lstrip('/')},size={size}",
        "-device",
        "ivshmem-plain,memdev=ivmem",
        "-append",
        f"console=ttyS0 quiet panic=-1 guestscript={script}",
    ]
    process = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    return Guest(process, workdir)


if __name__ == "__main__":  # pragma: no cover - manual use: prepare the cache
    print(prepare(), file=sys.stderr)
