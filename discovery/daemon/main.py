"""``aiocoloc-discoveryd``: the entry point.

Exit status: 0 after a graceful leave (SIGTERM, SIGINT), 2 for a bad flag or
config file, 1 when the sidecar cannot start (key file, pool, address or API
socket in use).  Errors are one line on stderr, never a traceback.  SIGHUP
re-probes the pools and reloads the key file.  Under systemd
(``Type=notify``) it reports ``READY=1`` once it serves its API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence

from discovery.daemon.config import Config, ConfigError, parse_args
from discovery.daemon.service import Sidecar, StartupError

__all__ = ["main"]

_log = logging.getLogger("discovery.daemon")
PROG = "aiocoloc-discoveryd"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sidecar until it is told to stop; returns the exit status."""
    try:
        config = parse_args(argv)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.logging_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return asyncio.run(_run(config))
    except StartupError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1


async def _run(config: Config) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads: set[asyncio.Task[None]] = set()
    sidecar = Sidecar(config)

    def reload() -> None:
        if sidecar.engine is None:
            _log.info("SIGHUP before start-up finished: ignored")
            return
        task = loop.create_task(sidecar.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    await sidecar.start()
    _notify_systemd("READY=1")
    await stop.wait()
    _notify_systemd("STOPPING=1")
    for task in list(reloads):
        task.cancel()
    await sidecar.stop()
    _log.info("left; bye")
    return 0


def _notify_systemd(state: str) -> None:
    """Tell systemd (``$NOTIFY_SOCKET``) how we are, if it asked."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    address = "\0" + path[1:] if path.startswith("@") else path
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(state.encode(), address)


if __name__ == "__main__":
    sys.exit(main())
