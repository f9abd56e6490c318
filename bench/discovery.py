#!/usr/bin/env python3
"""Membership on loopback: the embedded SWIM engine vs HashiCorp Serf.

For each cluster size N (8, 16, 32, 64 by default) and each engine, N
``aiocoloc-discoveryd`` daemons run at the same ``--profile`` (default
``local``; Serf maps our ``host`` to its ``local``), each on a loopback
address of its own (127.x.y.z, gossip port 7946), and the bench follows
every daemon's view through its local API (a ``subscribe`` feed over a
``members()`` snapshot, every change stamped when it arrives).  In one run,
with k = --trials (2, or fewer if N is too small; 3 makes the run ~25% longer):

  join     N-k members start (all join the first) and wait until they agree
           on who is in; then the last k join the first, one at a time:
           seconds from spawning each until every member's API shows all
           alive, median of the k (and range); ``ready``: until the joiner
           serves its API, a part of that.  A broadcast that misses a member
           reaches it at the next push/pull (every 15 s at ``local``), so a
           join now and then takes that long, with either engine
  idle     payload bytes each member sends per second (UDP + TCP; IP and
           UDP/TCP headers not counted) over --idle-seconds of steady state,
           the mean over the members (and the busiest one's); CPU per member
           (daemon + agent) over the same time.  embedded: ``udp_out_bytes +
           tcp_out_bytes`` of ``engine_stats`` in the daemon's ``status``;
           serf: memberlist's own counters (``memberlist.udp.sent`` +
           ``memberlist.tcp.sent``), which each agent reports to the bench
           over statsd (Serf's RPC ``stats`` has no byte counts, and
           ``/proc/<pid>/io`` does not count ``sendto``)
  stop     one member is stopped (SIGSTOP) for 2 s, then continued: every
           ``failed`` event any daemon publishes about any member from then
           until the end of the cluster's run is a false failure (a killed
           member's after its kill excepted; a member that left but is seen
           ``failed`` counts); target 0
  kill -9  a member is killed outright (the daemon and, for Serf, its agent):
           seconds until every other member's API reports it ``failed``; k
           members one after the other, median (and range), next to the
           profile's ``failure_detection_bound(N)``
  leave    SIGTERM to a member (a graceful leave): seconds until every other
           member's API reports it ``left``; k members, median (and range)
Engines take turns at each N, the order alternating between sizes; compare
the two at the same N within a run (the machine is shared and noisy), never
absolute times across runs.  Targets: the embedded engine's join, detection
and leave no slower than Serf's (marked on the embedded row, with the ratio
to Serf); 0 false failures; at most 2 KB/s per idle member (the mean).

An extra row per engine, always at the ``host`` profile: two daemons map the
same POSIX pool (co-located), one is killed with SIGKILL, and the time until
the other's API reports it ``failed`` is measured (the pool watch; target
<= 0.5 s), --colocated-trials times.

Every measurement has a timeout and reports "timeout" rather than hanging;
every process, temporary file and /dev/shm pool of the run is removed at the
end, also on Ctrl-C, SIGTERM or a failure.  Progress goes to stderr.  Exit
status 3 (and a line saying why) when a daemon cannot start at all.

Usage: bench/discovery.py [--sizes 8,16,32,64] [--engines embedded,serf]
                          [--profile local] [--trials 2] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console
from rich.markup import escape

from bench._discovery_measure import NoDaemons, Settings, measure
from bench._discovery_report import report, targets
from bench._sidecars import DaemonError
from bench._sidecars_fleet import Fleet
from discovery.profiles import PROFILES

ENGINES = ["embedded", "serf"]
SIZES = [8, 16, 32, 64]
QUICK_SIZES = [8, 16]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", help="cluster sizes, e.g. 8,16 (default 8,16,32,64)")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--profile", default="local", choices=sorted(PROFILES))
    parser.add_argument(
        "--quick", action="store_true", help="N=8,16, one kill and one leave, shorter idle"
    )
    parser.add_argument(
        "--trials", type=int, help="joins, kills and leaves measured per cluster (default 2)"
    )
    parser.add_argument("--colocated-trials", type=int, help="(default 3)")
    parser.add_argument("--idle-seconds", type=float, help="(default 5)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the daemons' logs (the path is printed)"
    )
    parser.add_argument(
        "--log-level", default="info", help="the daemons' (debug: with Serf's agent output)"
    )
    return parser


def _engines_and_sizes(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[list[str], list[int]]:
    """The engines and cluster sizes asked for (a usage error if they cannot be run)."""
    engines = [e for e in args.engines.split(",") if e]
    if not engines or set(engines) - set(ENGINES):
        parser.error(f"--engines: a list of {', '.join(ENGINES)}")
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    else:
        sizes = QUICK_SIZES if args.quick else SIZES
    if any(n < 4 for n in sizes):
        parser.error("--sizes: at least 4 members (a seed, one stopped, one killed, one leaving)")
    return engines, sizes


def _settings(args: argparse.Namespace) -> Settings:
    """What --quick and the options ask for, the defaults filled in."""
    return Settings(
        profile=args.profile,
        trials=args.trials or (1 if args.quick else 2),
        colocated_trials=args.colocated_trials or (2 if args.quick else 3),
        idle_seconds=args.idle_seconds or (3.0 if args.quick else 5.0),
        idle_settle=1.0 if args.quick else 2.0,
        stop_settle=3.0,
    )


def _interrupted(signum: int, frame: object) -> None:
    # SIGTERM takes the path of Ctrl-C: every daemon stopped, every file removed.
    raise KeyboardInterrupt


def main() -> int:
    parser = _parser()
    args = parser.parse_args()
    engines, sizes = _engines_and_sizes(parser, args)
    settings = _settings(args)

    console = Console(stderr=True)
    began = time.monotonic()

    def progress(message: str) -> None:
        console.print(f"[dim]{time.monotonic() - began:6.1f} s[/] {message}", highlight=False)

    signal.signal(signal.SIGTERM, _interrupted)
    fleet = Fleet(args.log_level)
    try:
        results, colocated = asyncio.run(measure(fleet, engines, sizes, settings, progress))
    except NoDaemons as exc:
        console.print(f"no daemon can start here: {escape(str(exc))}")
        return 3
    except DaemonError as exc:
        console.print(f"[bold red]a daemon failed:[/] {escape(str(exc))}\n{escape(exc.log)}")
        return 1
    except KeyboardInterrupt:
        console.print("interrupted: every daemon stopped, every temporary file removed")
        return 130
    finally:
        fleet.close(keep_logs=args.keep_logs)
        if args.keep_logs:
            console.print(f"the daemons' logs are in {fleet.directory}")
    wall = time.monotonic() - began
    marks = targets(results, colocated)
    report(results, colocated, marks, settings.profile, wall)
    if args.json:
        print(
            json.dumps(
                {
                    "benchmark": "discovery",
                    "profile": settings.profile,
                    "sizes": sizes,
                    "engines": engines,
                    "settings": settings.__dict__,
                    "results": results,
                    "colocated": colocated,
                    "targets": marks,
                    "bytes_measured_by": {
                        "embedded": "status engine_stats udp_out_bytes + tcp_out_bytes",
                        "serf": "memberlist.udp.sent + memberlist.tcp.sent over statsd",
                    },
                    "wall_s": wall,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
