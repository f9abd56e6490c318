"""The embedded host-local registry: which local servers speak aiocoloc.

Servers of one kernel publish a record for each address they listen on --
``(host, port) -> control endpoint, pool`` -- as a small JSON file in a
per-user runtime directory; a client looks its destination up there before
it asks for shared memory.  No daemon is needed, so a bare ``make demo``
works.  (The discovery sidecar takes precedence when one runs; later issue.)

- Directory: ``$AIOCOLOC_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/aiocoloc``,
  else ``/tmp/aiocoloc-<uid>``; created 0700 and refused if another user owns
  it or others may write to it (a record points a client at a control socket:
  only its own user may plant one).
- Records are written atomically (temporary file, then rename) and carry the
  publisher's pid and process start time: a record whose process is gone, or
  whose pid now names another process, is ignored and removed.
- Anything unreadable in the directory is ignored: a lookup never fails
  because of a stray file, it only finds fewer servers.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import stat
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aiocoloc.errors import AiocolocError

__all__ = ["Record", "Registry", "RegistryError", "default_directory"]

_log = logging.getLogger("aiocoloc.registry")
RECORD_VERSION = 1
_WILDCARDS = {"", "0.0.0.0", "::"}


class RegistryError(AiocolocError):
    """The registry directory cannot be used safely."""


def default_directory() -> Path:
    """Where this user's records live (see the module docstring)."""
    explicit = os.environ.get("AIOCOLOC_RUNTIME_DIR")
    if explicit:
        return Path(explicit)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "aiocoloc"
    return Path(tempfile.gettempdir()) / f"aiocoloc-{os.getuid()}"


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (None if it is gone)."""
    try:
        fields = _read_small(f"/proc/{pid}/stat").rsplit(b")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _read_small(path: str) -> bytes:
    """A small file's bytes, with the fewest calls (lookups are on the
    connection set-up path)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 65536)
    finally:
        os.close(fd)


def _alive(pid: int, start_time: int) -> bool:
    return _start_time(pid) == start_time


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@dataclass(frozen=True)
class Record:
    """One listening address of a local aiocoloc server."""

    host: str
    port: int
    control: str  # path of the server's control socket
    pool: str | None  # pool UUID the server offers, if any
    pid: int
    start_time: int
    uid: int
    version: int = RECORD_VERSION

    def matches(self, host: str, port: int) -> bool:
        """True if a connection to ``(host, port)`` reaches this listener."""
        if port != self.port:
            return False
        if self.host in _WILDCARDS:
            return True
        return _same_address(self.host, host)


def _same_address(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return {a, b} <= {"localhost", "127.0.0.1", "::1"}


class Registry:
    """Publish and look up records in one directory."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_directory()

    def _secure_directory(self, create: bool) -> bool:
        """Check (and with ``create``, make) the directory; False if absent."""
        try:
            if create:
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.lstat(self.directory)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(st.st_mode):
            raise RegistryError(f"registry {self.directory} is not a directory")
        if st.st_uid != os.getuid():
            raise RegistryError(
                f"registry {self.directory} belongs to uid {st.st_uid}, not to us ({os.getuid()})"
            )
        if st.st_mode & 0o022:
            raise RegistryError(
                f"registry {self.directory} is writable by others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); refusing to trust it"
            )
        return True

    def publish(self, host: str, port: int, control: str, pool: str | None = None) -> Path:
        """Record that this process serves aiocoloc on ``(host, port)``; returns
        the record's path (pass it to ``withdraw``)."""
        self._secure_directory(create=True)
        self.sweep()
        pid = os.getpid()
        start = _start_time(pid)
        assert start is not None
        record = Record(
            host=host,
            port=port,
            control=control,
            pool=pool,
            pid=pid,
            start_time=start,
            uid=os.getuid(),
        )
        path = self.directory / f"{port}-{pid}-{uuid.uuid4().hex[:8]}.json"
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(record), f)
            os.rename(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _log.debug("published %s:%d -> %s", host, port, control)
        return path

    def sweep(self) -> int:
        """Remove the records of processes that are gone, whatever their port
        (a lookup only cleans its own port's); returns how many went."""
        removed = 0
        with os.scandir(self.directory) as entries:
            paths = [e.path for e in entries if e.name.endswith(".json")]
        for path in paths:
            record = self._read(path)
            if record is not None and not _alive(record.pid, record.start_time):
                _unlink(path)
                removed += 1
        if removed:
            _log.debug("removed %d stale records from %s", removed, self.directory)
        return removed

    def withdraw(self, path: Path) -> None:
        """Remove a record this process published.  Idempotent."""
        path.unlink(missing_ok=True)

    def lookup(self, host: str, port: int) -> list[Record]:
        """Live records for ``(host, port)``; stale ones are removed on the way."""
        if not self._secure_directory(create=False):
            return []
        found = []
        prefix = f"{port}-"
        with os.scandir(self.directory) as entries:
            paths = [
                entry.path
                for entry in entries
                if entry.name.startswith(prefix) and entry.name.endswith(".json")
            ]
        for path in paths:
            record = self._read(path)
            if record is None or not record.matches(host, port):
                continue
            if not _alive(record.pid, record.start_time):
                _log.debug("removing stale record %s (pid %d is gone)", path, record.pid)
                _unlink(path)
                continue
            found.append(record)
        return found

    def _read(self, path: str) -> Record | None:
        try:
            data: Any = json.loads(_read_small(path))
            if data.get("version") != RECORD_VERSION:
                return None
            record = Record(**data)
            if not (
                isinstance(record.port, int)
                and isinstance(record.pid, int)
                and isinstance(record.start_time, int)
                and isinstance(record.control, str)
            ):
                return None
            return record
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            _log.debug("ignoring unreadable registry entry %s: %s", path, exc)
            return None
