#!/usr/bin/env python3
"""Connections between two VMs of one host: aiocoloc over the shared ivshmem
pool against the same guests' TCP link, in one run.

Two QEMU guests (TCG, ``-smp 1`` each, one virtio-net link between them: a
QEMU socket netdev on the host's loopback) map one host pool, made for the run
with ``aiocoloc.cli.provision.create_host_pool`` (``/dev/shm/aiocoloc-bench-*``,
removed at the end, also on Ctrl-C, SIGTERM or a failure), through an
ivshmem-plain device each.  Both run the discovery sidecar (``--pool auto``)
with one cluster key (``AIOCOLOC_KEY_FILE``).  Guest A serves an aiocoloc echo
server (``upgrade="always"``) and a plain asyncio server on another port (the
baseline: the same link, no aiocoloc); guest B measures, on asyncio's loop
(``bench/_vm_guest.py`` is the guest side):

  stream   --size MiB one way in 256 KiB writes (write + await drain() each);
           the server counts and acks with the count once it has them all:
           MB/s from the first write to the ack; 3 times per path, the paths
           alternating, the median kept (TCP over the emulated link swings
           a lot from one run to the next)
  rr       ping-pong round trips of 64 B and 64 KiB (the server echoes):
           p50 and p99 of --rounds rounds, after 10 untimed ones, in 4
           blocks, the paths taking turns (p10 and p90 in the JSON too)
  set-up   from connect to the end of the first 64 B echo, that echo over
           shm both ways for aiocoloc (the upgrade included: sidecar lookup,
           handshake over the control connection, pipes in the pool) against
           a TCP connect + first echo: the median of a few connections,
           the paths alternating; and the very first connection of each
           (for aiocoloc it maps the pool through the ivshmem device)

The steady-state cells (stream, rr) use one connection per path; the aiocoloc
one is on shm in both directions before anything is timed, and is checked to
be on shm, on the host pool, at the end.  Under TCG both paths are slow
(guest Python runs ~15x slower than on the host, the NIC is emulated): compare
the ratio shm/TCP, measured in one run, never absolute numbers across runs.

Between the guests the doorbell is a message on aiocoloc's control connection
(TCP) by default; with ``--doorbells vfio`` the guests get the pool as
ivshmem-doorbell devices (q35, an emulated IOMMU, an ivshmem server on the
host), each sidecar owns its device through VFIO and grants it, and the
connection rings by interrupt.  The raw doorbell round trip alone, "TCP
message" vs "VFIO interrupt", is tests/test_qemu_doorbell.py's.

Where a guest fails, its console tail is printed and the exit status is 1;
every wait has a timeout.  Exit status 3 (and a line saying why) where QEMU
guests cannot run.  Progress goes to stderr.

Defaults: 500 rounds per ping-pong cell, 16 MiB per stream, 9 set-ups per
path (~45 s wall on a quiet 2-core host); --quick: 200, 4 MiB, 5 (~30 s).  The
guests' aiocoloc handshake timeout is raised to 20 s (AIOCOLOC_HANDSHAKE_TIMEOUT;
the default 2 s fails upgrades on a busy host); it is a limit, never timed.

Usage: bench/vms.py [--quick] [--rounds N] [--size MiB] [--timeout S] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.markup import escape

from aiocoloc.cli.provision import create_host_pool
from discovery.keys import Keyring
from tests.qemu import harness
from tests.qemu.l2hub import L2Hub

REPO = Path(__file__).resolve().parent.parent
#: Run as a module from the repository: run as a script, bench/discovery.py
#: would shadow the discovery package.
GUEST_SCRIPT = ["-m", "bench._vm_guest"]
POOL_SIZE, POOL_SIZE_QEMU = 16 << 20, "16M"
GUEST_MEMORY = "768M"
SHM_PORT, TCP_PORT = 18080, 18081
RR_SIZES = [64, 64 << 10]
WRITE = 256 << 10
#: Stream cells per path (the median is kept).
STREAM_REPEATS = 3
#: Seconds an aiocoloc connection may take to reach shm both ways in a guest.
UPGRADE_TIMEOUT = 30.0
#: aiocoloc's handshake timeout in the guests.
HANDSHAKE_TIMEOUT = 20.0
#: Seconds a guest may take to power off once its script has finished.
EXIT_TIMEOUT = 30.0
#: Seconds a guest that reported a failure may take to exit on its own.
FAILED_GRACE = 10.0
CONSOLE_TAIL = 40
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Settings:
    """How much to measure."""

    quick: bool
    rounds: int
    size_mib: float
    setups: int
    #: Seconds each guest script may run in all.
    deadline: float
    #: "messages" (bells on the control channel) or "vfio" (ivshmem interrupts).
    doorbells: str = "messages"

    @property
    def size(self) -> int:
        return int(self.size_mib * (1 << 20))


class GuestFailed(Exception):
    """A guest failed, timed out or reported no result; ``tails`` are the consoles' ends."""

    def __init__(self, message: str, tails: dict[str, str]) -> None:
        super().__init__(message)
        self.tails = tails


@dataclass
class Watched:
    """A guest, and what the host saw of it."""

    role: str
    guest: harness.Guest
    seen: int = 0  # console lines read so far
    #: Phase -> seconds from QEMU's start until its line reached the host.
    phases: dict[str, float] = field(default_factory=dict)
    reports: list[dict[str, Any]] = field(default_factory=list)
    status: int | None = None
    booted: bool = False

    def tail(self) -> str:
        return "\n".join(list(self.guest.lines(timeout=0))[-CONSOLE_TAIL:])

    def poll(self, progress: Progress) -> None:
        """Read the new console lines and, once QEMU has exited, the status."""
        exited = self.guest.process.poll() is not None
        if not self.booted and self.guest.boot_seconds is not None:
            self.booted = True
            progress(f"guest {self.role}: booted in {self.guest.boot_seconds:.1f} s")
        lines = list(self.guest.lines(timeout=0))
        for line in lines[self.seen :]:
            if not line.startswith("VMB {"):
                continue
            report: dict[str, Any] = json.loads(line[4:])
            self.reports.append(report)
            phase = report.get("phase", "?")
            self.phases[phase] = time.monotonic() - self.guest.started_at
            if phase == "failed":
                progress(f"guest {self.role}: [bold red]failed:[/] {escape(report['error'])}")
            elif phase != "result":
                progress(f"guest {self.role}: {phase}")
        self.seen = len(lines)
        if exited and self.status is None:
            self.status = self.guest.wait(EXIT_TIMEOUT)[0]

    def report(self, phase: str) -> dict[str, Any] | None:
        return next((r for r in self.reports if r.get("phase") == phase), None)


def _qemu_version() -> str:
    try:
        out = subprocess.run(
            ["qemu-system-x86_64", "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.splitlines()[0] if out else "?"


def follow(guests: list[Watched], timeout: float, progress: Progress) -> None:
    """Until both guests have powered off; ``GuestFailed`` when one fails
    (the other is stopped then) or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        for watched in guests:
            watched.poll(progress)
        failed = [w for w in guests if w.status not in (None, 0) or w.report("failed")]
        if failed:
            # A guest that reported its failure prints its sidecar's log on
            # the way out: give it a moment.
            grace = time.monotonic() + FAILED_GRACE
            while any(w.status is None for w in failed) and time.monotonic() < grace:
                time.sleep(0.1)
                for watched in failed:
                    watched.poll(progress)
            tails = {w.role: w.tail() for w in guests}
            for watched in guests:
                watched.guest.kill()
            why = ", ".join(
                f"guest {w.role} ({'exit status ' + str(w.status) if w.status else 'stopped'})"
                for w in failed
            )
            raise GuestFailed(f"{why} failed", tails)
        if all(w.status == 0 for w in guests):
            return
        if time.monotonic() > deadline:
            tails = {w.role: w.tail() for w in guests}
            for watched in guests:
                watched.guest.kill()
            raise GuestFailed(f"the guests ran {timeout:.0f} s without finishing", tails)
        time.sleep(0.1)


def run(settings: Settings, progress: Progress) -> dict[str, Any]:
    """Boot the two guests, measure, and return every number."""
    harness.prepare()  # QemuUnavailable where guests cannot run
    name = f"aiocoloc-bench-vms-{uuid.uuid4().hex[:10]}"
    pool_id, _ = create_host_pool(name, POOL_SIZE)
    guests: list[Watched] = []
    ivshmem_server: subprocess.Popen[bytes] | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="aiocoloc-bench-vms-") as tmp:
            key = Path(tmp) / "cluster.key"
            Keyring.generate().save(key)
            net = f"169.254.{random.randrange(1, 250)}"
            a_ip, b_ip = f"{net}.1", f"{net}.2"
            env = {
                "AIOCOLOC_KEY_FILE": str(key),
                "AIOCOLOC_DISCOVERY_API": "/run/discoveryd.sock",
                "AIOCOLOC_RUNTIME_DIR": "/run/aiocoloc",
                # The default (2 s) gives up on upgrades that a TCG guest on a
                # busy host needs longer for; only a limit, not timed.
                "AIOCOLOC_HANDSHAKE_TIMEOUT": str(HANDSHAKE_TIMEOUT),
            }
            common: dict[str, Any] = {
                "cwd": REPO,
                "shm": name,
                "size": POOL_SIZE_QEMU,
                "memory": GUEST_MEMORY,
                "env": env,
            }
            if settings.doorbells == "vfio":
                # The pool as ivshmem-doorbell devices, served by an ivshmem server;
                # each sidecar owns its guest's through VFIO and grants it.
                sock = Path(tmp) / "ivshmem.sock"
                command = [sys.executable, "-m", "aiocoloc.cli.ivshmem_server"]
                ivshmem_server = subprocess.Popen(
                    [*command, "--socket", str(sock), "--shm", name, "--size", str(POOL_SIZE)],
                    cwd=REPO,
                )
                started = time.monotonic()
                while not sock.exists():
                    if ivshmem_server.poll() is not None or time.monotonic() - started > 30:
                        raise GuestFailed("the ivshmem server did not start", {})
                    time.sleep(0.05)
                del common["shm"], common["size"]
                common["doorbell"] = str(sock)
                env["VM_DOORBELLS"] = "vfio"
            ports = {"shm_port": SHM_PORT, "tcp_port": TCP_PORT}
            server = {"ip": a_ip, "key": str(key), "deadline": settings.deadline, **ports}
            client = {
                **server,
                "ip": b_ip,
                "server_ip": a_ip,
                "rounds": settings.rounds,
                "size": settings.size,
                "write": WRITE,
                "rr_sizes": RR_SIZES,
                "setups": settings.setups,
                "stream_repeats": STREAM_REPEATS,
                "upgrade_timeout": UPGRADE_TIMEOUT,
            }
            python = [sys.executable, *GUEST_SCRIPT]
            with L2Hub() as hub:  # the guests' link, on the host's loopback
                for role, ip, cfg in (("a", a_ip, server), ("b", b_ip, client)):
                    progress(f"booting guest {role.upper()}")
                    command = [*python, "server" if role == "a" else "client", json.dumps(cfg)]
                    guest = harness.start_guest(
                        command, net=f"connect:{hub.port}", ip=f"{ip}/16", **common
                    )
                    guests.append(Watched(role, guest))
                follow(guests, settings.deadline + 2 * EXIT_TIMEOUT, progress)
    finally:
        for watched in guests:
            watched.guest.kill()
        if ivshmem_server is not None:
            ivshmem_server.terminate()
            ivshmem_server.wait(10)
        Path("/dev/shm", name).unlink(missing_ok=True)

    a, b = guests
    result = b.report("result")
    served = a.report("served")
    if result is None or served is None:
        raise GuestFailed("a guest exited without its report", {w.role: w.tail() for w in guests})
    return {
        "pool": {"name": name, "id": pool_id, "size": POOL_SIZE},
        "results": result["result"],
        "server": {k: v for k, v in served.items() if k not in ("phase", "t")},
        "guests": {
            w.role: {
                "boot_s": w.guest.boot_seconds,
                "total_s": w.guest.total_seconds,
                **{f"{phase}_s": t for phase, t in w.phases.items()},
            }
            for w in guests
        },
    }


# --- the report ---------------------------------------------------------------------------


#: (key in a path's results, label, unit): higher is better in MB/s, lower in times.
CELLS: list[tuple[str, str, str]] = [
    ("stream_mb_s", "stream one way, {size} in 256 KiB writes, median of 3", "MB/s"),
    ("rr_64.p50_us", "ping-pong 64 B p50", "us"),
    ("rr_64.p99_us", "ping-pong 64 B p99", "us"),
    ("rr_65536.p50_us", "ping-pong 64 KiB p50", "us"),
    ("rr_65536.p99_us", "ping-pong 64 KiB p99", "us"),
    ("setup_p50_ms", "set-up: connect -> first 64 B echo, median", "ms"),
    ("setup_first_ms", "set-up, first connection", "ms"),
]


def cell(row: dict[str, Any], key: str) -> float:
    value: Any = row
    for part in key.split("."):
        value = value[part]
    return float(value)


def ratios(results: dict[str, Any]) -> dict[str, float]:
    """shm / TCP for every cell."""
    return {key: cell(results["shm"], key) / cell(results["tcp"], key) for key, _, _ in CELLS}


def _mib(n: float) -> str:
    return f"{n:g} MiB"


def report(out: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 120))
    results, rel, env = out["results"], out["ratios"], out["environment"]
    table = Table(
        title="two QEMU guests of one host: aiocoloc over the ivshmem pool vs their TCP link"
        f" (doorbells: {out['doorbells']})",
        caption=f"QEMU {env['accel'].upper()} (emulated, no KVM), {env['guest_cpus']} vCPU per "
        f"guest on {env['host_cpus']} host cores: both paths are slow under emulation, the "
        "ratio shm/TCP (same guests, same run) is what counts; throughput: higher is better, "
        "times: lower",
    )
    for column, justify in (
        ("cell", "left"),
        ("unit", "left"),
        ("TCP (plain asyncio)", "right"),
        ("shm (aiocoloc)", "right"),
        ("shm/TCP", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for key, label, unit in CELLS:
        tcp, shm = cell(results["tcp"], key), cell(results["shm"], key)
        better = shm > tcp if unit == "MB/s" else shm < tcp
        table.add_row(
            label.format(size=_mib(out["settings"]["size_mib"])),
            unit,
            f"{tcp:,.1f}",
            f"{shm:,.1f}",
            f"[{'green' if better else 'red'}]{rel[key]:.2f}x[/]",
        )
    console.print(table)
    state = results["shm"]["state"]
    guests = out["guests"]
    console.print(
        "stream runs (MB/s): "
        + "; ".join(
            f"{path} {', '.join(f'{r:.1f}' for r in results[path]['stream_mb_s_runs'])} "
            f"({results[path]['stream_tcp_retrans']} TCP segments resent)"
            for path in ("tcp", "shm")
        ),
        highlight=False,
    )
    console.print(
        f"shm connection at the end: mode={state['mode']} rx_mode={state['rx_mode']} "
        f"doorbell={state.get('doorbell')} "
        f"pool={state['pool']} (host pool {out['pool']['id']}); rounds {out['settings']['rounds']} "
        f"per ping-pong cell, {out['settings']['setups']} set-ups per path.  Guests: "
        + ", ".join(
            f"{role} booted in {g['boot_s'] or 0:.1f} s, "
            f"its sidecar up at {g.get('sidecar_s', 0):.1f} s"
            for role, g in guests.items()
        )
        + f".  Raw doorbell round trips: tests/test_qemu_doorbell.py.  "
        f"Wall time {out['wall_s']:.0f} s.",
        highlight=False,
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer rounds and set-ups, a smaller stream"
    )
    parser.add_argument(
        "--rounds", type=int, help="round trips per ping-pong cell (default 500, quick 200)"
    )
    parser.add_argument(
        "--size", type=float, help="MiB streamed one way per stream cell (default 16, quick 4)"
    )
    parser.add_argument(
        "--timeout", type=float, help="seconds each guest may run (default 420, quick 150)"
    )
    parser.add_argument(
        "--doorbells",
        choices=("messages", "vfio"),
        default="messages",
        help="how the guests ring each other: control-channel messages (default), or "
        "ivshmem interrupts through VFIO (q35 + intel-iommu guests, an ivshmem server)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    settings = Settings(
        quick=args.quick,
        rounds=args.rounds or (200 if args.quick else 500),
        size_mib=args.size or (4.0 if args.quick else 16.0),
        setups=5 if args.quick else 9,
        deadline=args.timeout or (150.0 if args.quick else 420.0),
        doorbells=args.doorbells,
    )
    if settings.rounds < 1 or settings.size < WRITE:
        parser.error(f"--rounds at least 1, --size at least {WRITE >> 10} KiB")

    from rich.console import Console

    console = Console(stderr=True)
    began = time.monotonic()

    def progress(message: str) -> None:
        console.print(f"[dim]{time.monotonic() - began:6.1f} s[/] {message}", highlight=False)

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        out = run(settings, progress)
    except harness.QemuUnavailable as exc:
        console.print(f"QEMU guests cannot run here: {escape(str(exc))}")
        return 3
    except GuestFailed as exc:
        console.print(f"[bold red]{escape(str(exc))}[/]")
        for role, tail in exc.tails.items():
            console.print(f"--- guest {role}'s console ends:\n{escape(tail)}", highlight=False)
        return 1
    except KeyboardInterrupt:
        console.print("interrupted: the guests stopped, the pool removed")
        return 130
    out = {
        "benchmark": "vms",
        "settings": {
            **asdict(settings),
            "write": WRITE,
            "rr_sizes": RR_SIZES,
            "stream_repeats": STREAM_REPEATS,
        },
        **out,
        "ratios": ratios(out["results"]),
        "environment": {
            "accel": "tcg",
            "guest_cpus": 1,
            "guests": 2,
            "guest_memory": GUEST_MEMORY,
            "host_cpus": os.cpu_count(),
            "qemu": _qemu_version(),
            "link": "virtio-net on a QEMU socket netdev (host loopback)",
            "loop": "asyncio",
        },
        "doorbells": args.doorbells,
        "wall_s": time.monotonic() - began,
    }
    report(out)
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
