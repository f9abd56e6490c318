"""One SWIM member as a real process, and the tests' remote control of it.

Run as a script, it starts a ``SwimEngine``, joins the given seeds and
prints JSON lines on stdout: ``ready`` once joined, one ``event`` per
membership event (with the wall-clock ``time`` it was published, so tests
measure detection times without pipe delays), and replies to commands read
from stdin, one a line:

    members | stats | probe NODE | update POOL,...
    starve BLOCK PERIOD COUNT   block the event loop BLOCK s every PERIOD s
    partition IP ...            drop traffic to/from these IPs; "heal" undoes
    leave                       leave gracefully and exit

SIGTERM also leaves gracefully; end of stdin (the test went away) stops
it.  The child asks the kernel to kill it if its parent dies.  Its log goes
to stderr (a file per member in the tests), at ``SWIM_MEMBER_LOG_LEVEL``
(default INFO; DEBUG traces every state change).

``MemberProcess`` and ``Cluster`` are the test side: they start these
processes, read their output in a thread, and wait on it by polling.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from discovery.keys import Keyring
from discovery.profiles import get_profile
from discovery.swim import SwimEngine

Record = dict[str, Any]


# -- the member process ----------------------------------------------------------


def _emit(record: Record) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


async def _run(args: argparse.Namespace) -> int:
    profile = get_profile(args.profile)
    if args.set:
        changes = {k: float(v) if "." in v else int(v) for k, v in (s.split("=") for s in args.set)}
        profile = profile.with_changes(name=f"{profile.name}*", **changes)
    keyring = Keyring.load(args.key_file) if args.key_file else None
    engine = SwimEngine(args.node, args.bind, profile=profile, keyring=keyring)
    subscription = engine.subscribe()
    await engine.start()
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, done.set)

    async def events() -> None:
        async for event in subscription:
            _emit({"type": "event", "time": time.time(), **event.to_json()})

    event_task = loop.create_task(events())
    seeds = [a for a in args.join if a]
    deadline = loop.time() + 15
    while seeds:
        try:
            await engine.join(seeds)
            break
        except Exception as exc:  # seeds still starting
            if loop.time() > deadline:
                raise
            logging.info("join: %s; retrying", exc)
            await asyncio.sleep(0.2)
    me = engine.local()
    _emit({"type": "ready", "time": time.time(), **me.to_json()})

    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def commands() -> None:
        while True:
            line = await reader.readline()
            if not line:
                done.set()
                return
            words = line.decode().split()
            if not words:
                continue
            try:
                if await _command(engine, words, loop):
                    done.set()
                    return
            except Exception as exc:
                _emit({"type": "error", "cmd": words[0], "error": repr(exc)})

    command_task = loop.create_task(commands())
    await done.wait()
    command_task.cancel()
    if not engine.local().status.value == "left":
        await engine.leave()
    await engine.stop()
    await event_task
    _emit({"type": "stopped", "time": time.time()})
    return 0


async def _command(engine: SwimEngine, words: list[str], loop: asyncio.AbstractEventLoop) -> bool:
    """Run one command; True to exit."""
    cmd, rest = words[0], words[1:]
    if cmd == "members":
        _emit({"type": "members", "members": [m.to_json() for m in engine.members()]})
    elif cmd == "stats":
        _emit({"type": "stats", "stats": engine.stats()})
    elif cmd == "probe":
        answered = await engine.probe(rest[0])
        _emit({"type": "probe", "node": rest[0], "answered": answered})
    elif cmd == "update":
        member = await engine.update_local(pools=frozenset(p for p in rest[0].split(",") if p))
        _emit({"type": "updated", **member.to_json()})
    elif cmd == "partition":
        engine.partition(rest)
        _emit({"type": "partitioned", "ips": rest})
    elif cmd == "heal":
        engine.partition(())
        _emit({"type": "partitioned", "ips": []})
    elif cmd == "starve":
        block, period, count = float(rest[0]), float(rest[1]), int(rest[2])

        def starve(left: int) -> None:
            time.sleep(block)  # the whole loop stops: no reads, no timers
            if left > 1:
                loop.call_later(max(0.0, period - block), starve, left - 1)
            else:
                _emit({"type": "starved", "time": time.time()})

        loop.call_soon(starve, count)
        _emit({"type": "starving", "time": time.time()})
    elif cmd == "leave":
        await engine.leave()
        return True
    else:
        _emit({"type": "error", "cmd": cmd, "error": "unknown command"})
    return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--node", required=True)
    parser.add_argument("--bind", required=True)
    parser.add_argument("--profile", default="host")
    parser.add_argument("--set", action="append", default=[], help="profile knob=value")
    parser.add_argument("--key-file")
    parser.add_argument("--join", action="append", default=[])
    parser.add_argument("--log-level", default=os.environ.get("SWIM_MEMBER_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format=f"%(asctime)s {args.node} %(name)s %(levelname)s %(message)s",
    )
    return asyncio.run(_run(args))


# -- the test side ---------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class MemberProcess:
    """A running ``swim_member.py`` and everything it printed."""

    def __init__(
        self,
        node: str,
        bind: str,
        *,
        profile: str = "host",
        key_file: Path | None = None,
        join: Iterable[str] = (),
        settings: Iterable[str] = (),
        log_dir: Path,
    ) -> None:
        self.node = node
        self.bind = bind
        self.ip = bind.rsplit(":", 1)[0]
        argv = [sys.executable, __file__, "--node", node, "--bind", bind, "--profile", profile]
        if key_file is not None:
            argv += ["--key-file", str(key_file)]
        for seed in join:
            argv += ["--join", seed]
        for setting in settings:
            argv += ["--set", setting]
        self._log = open(log_dir / f"{node}.log", "ab")  # closed in close()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            preexec_fn=_die_with_parent,
        )
        self.records: list[Record] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                record = json.loads(line)
            except ValueError:
                record = {"type": "garbage", "line": line.decode(errors="replace")}
            with self._changed:
                self.records.append(record)
                self._changed.notify_all()
        with self._changed:
            self.records.append({"type": "eof"})
            self._changed.notify_all()

    # -- waiting ------------------------------------------------------------

    def wait_for(
        self, predicate: Callable[[Record], bool], timeout: float, start: int = 0
    ) -> Record:
        """The first record from index ``start`` on that satisfies
        ``predicate``, waiting up to ``timeout`` s for it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            index = start
            while True:
                while index < len(self.records):
                    if predicate(self.records[index]):
                        return self.records[index]
                    index += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{self.node}: nothing matched in {timeout} s")
                self._changed.wait(remaining)

    def ready(self, timeout: float = 30) -> Record:
        return self.wait_for(lambda r: r["type"] in ("ready", "eof"), timeout)

    def events(self, kind: str | None = None, about: str | None = None) -> list[Record]:
        with self._changed:
            return [
                r
                for r in self.records
                if r["type"] == "event"
                and (kind is None or r["kind"] == kind)
                and (about is None or r["member"]["node"] == about)
            ]

    def ask(self, command: str, reply: str, timeout: float = 10) -> Record:
        """Send ``command`` and wait for its reply (a record of type ``reply``)."""
        with self._changed:
            start = len(self.records)
        self.send(command)
        return self.wait_for(lambda r: r["type"] in (reply, "error", "eof"), timeout, start)

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def members(self) -> dict[str, Record]:
        return {m["node"]: m for m in self.ask("members", "members")["members"]}

    def stats(self) -> dict[str, int]:
        stats: dict[str, int] = self.ask("stats", "stats")["stats"]
        return stats

    # -- ending ---------------------------------------------------------------

    def signal(self, signum: int) -> float:
        """Send ``signum``; returns the wall-clock time it was sent."""
        sent = time.time()
        os.kill(self.proc.pid, signum)
        return sent

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # works on a stopped process too
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self._reader.join(5)
        self._log.close()


def free_port(ips: Sequence[str]) -> int:
    """A port free for UDP and TCP on every one of ``ips``."""
    for _ in range(200):
        port = random.randrange(20000, 32000)
        try:
            for ip in ips:
                for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                    with socket.socket(socket.AF_INET, kind) as probe:
                        probe.bind((ip, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no common free port")


class Cluster:
    """``size`` member processes on 127.x.y.1 .. 127.x.y.size, one port."""

    def __init__(
        self,
        size: int,
        log_dir: Path,
        *,
        profile: str = "host",
        key_file: Path | None = None,
        settings: Iterable[str] = (),
    ) -> None:
        net = f"127.{random.randrange(64, 250)}.{random.randrange(1, 250)}"
        self.ips = [f"{net}.{i + 1}" for i in range(size)]
        self.port = free_port(self.ips)
        self.profile = profile
        self.key_file = key_file
        self.settings = list(settings)
        self.log_dir = log_dir
        self.names = [f"m{i:02d}" for i in range(size)]
        self.procs: dict[str, MemberProcess] = {}
        self.retired: list[MemberProcess] = []

    def address(self, name: str) -> str:
        return f"{self.ips[self.names.index(name)]}:{self.port}"

    def spawn(self, name: str, join: Iterable[str] = ()) -> MemberProcess:
        old = self.procs.pop(name, None)
        if old is not None:
            self.retired.append(old)
        proc = MemberProcess(
            name,
            self.address(name),
            profile=self.profile,
            key_file=self.key_file,
            join=join,
            settings=self.settings,
            log_dir=self.log_dir,
        )
        self.procs[name] = proc
        return proc

    def start(self, timeout: float = 40) -> None:
        seeds = [self.address(n) for n in self.names[:2]]
        self.spawn(self.names[0])
        for name in self.names[1:]:
            self.spawn(name, seeds)
        for proc in self.procs.values():
            record = proc.ready(timeout)
            assert record["type"] == "ready", f"{proc.node} did not start; see {self.log_dir}"

    def live(self, *excluding: str) -> list[MemberProcess]:
        return [p for n, p in self.procs.items() if n not in excluding and p.proc.poll() is None]

    def wait_converged(
        self, expected: dict[str, str], timeout: float, among: Iterable[MemberProcess] = ()
    ) -> float:
        """Poll until every member (of ``among``, default all live) sees
        each node of ``expected`` in that status; returns seconds taken."""
        started = time.monotonic()
        watchers = list(among) or self.live()
        pending = {p.node for p in watchers}
        last: dict[str, Any] = {}
        while pending:
            for proc in watchers:
                if proc.node in pending:
                    seen = {n: m["status"] for n, m in proc.members().items()}
                    last[proc.node] = {
                        n: seen.get(n) for n in expected if seen.get(n) != expected[n]
                    }
                    if not last[proc.node]:
                        pending.discard(proc.node)
            if pending and time.monotonic() - started > timeout:
                raise AssertionError(
                    f"no convergence in {timeout} s: {[(n, last[n]) for n in sorted(pending)]}"
                )
            if pending:
                time.sleep(0.1)
        return time.monotonic() - started

    def close(self) -> None:
        for proc in [*self.procs.values(), *self.retired]:
            proc.close()


if __name__ == "__main__":
    sys.exit(main())
