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
- A lookup's answer is kept while the directory does not change (records
  are renamed into place and removed, never rewritten): the next lookup of
  that address costs one ``lstat`` and a signal-0 probe of each publisher;
  start times are compared again every second (a reused pid).
- Anything unreadable in the directory is ignored (and logged at DEBUG): a
  lookup never fails or blocks because of a stray file -- not JSON, a field
  of the wrong type, too large or too deeply nested, a FIFO, a symbolic
  link -- it only finds fewer servers.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
import stat
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aiocoloc.errors import RegistryError

__all__ = ["Record", "Registry", "default_directory"]

_log = logging.getLogger("aiocoloc.connect.registry")
RECORD_VERSION = 1
#: A record is a few hundred bytes; anything larger is not one of ours.
MAX_RECORD_SIZE = 16 * 1024
_WILDCARDS = {"", "0.0.0.0", "::"}


def default_directory() -> Path:
    """Where this user's records live (see the module docstring)."""
    return _directory_for(os.environ.get("AIOCOLOC_RUNTIME_DIR"), os.environ.get("XDG_RUNTIME_DIR"))


@functools.lru_cache(maxsize=8)
def _directory_for(explicit: str | None, runtime: str | None) -> Path:
    # (Cached: every client connection's lookup starts here.)
    if explicit:
        return Path(explicit)
    if runtime:
        return Path(runtime) / "aiocoloc"
    return Path(tempfile.gettempdir()) / f"aiocoloc-{os.getuid()}"


#: Records already read, by file (path, inode, modification time, size):
#: one ``lstat`` instead of reading and parsing the file again.  Liveness
#: is checked again on every lookup.  Files changed within the last
#: ``_SETTLED_NS`` are not kept: file times are coarse (a kernel tick), so a
#: file rewritten in place within one could show the same key.
_parsed: dict[tuple[str, int, int, int], Record | None] = {}
_PARSED_MAX = 1024
_SETTLED_NS = 1_000_000_000


@dataclass(frozen=True)
class _Found:
    """A lookup's answer, kept while the directory's entries stay the same:
    publishing, withdrawing and removing all change the directory's
    modification time (records are renamed into place, never rewritten).
    Kept only once that time is ``_SETTLED_NS`` old, as for ``_parsed``."""

    directory: tuple[int, int, int]  # device, inode, modification time (ns)
    records: list[Record]
    checked_ns: int  # when each record's start time was last compared


#: Answers by (directory, host, port): a client's lookup is on every
#: connection's set-up path, and a directory that did not change needs no
#: scan.  Liveness is still checked on each use: a signal-0 probe shows the
#: pid exists; its start time is compared again once ``_RECHECK_NS`` passed.
_found: dict[tuple[str, str, int], _Found] = {}
_FOUND_MAX = 256
_RECHECK_NS = 1_000_000_000


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


def _read_record_file(path: str) -> bytes:
    """A record file's bytes; ``ValueError`` unless it is a regular file of
    at most ``MAX_RECORD_SIZE`` bytes.  Opened without blocking (a FIFO would
    block until a writer came) nor following a symbolic link."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        data = os.read(fd, MAX_RECORD_SIZE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_RECORD_SIZE:
        raise ValueError(f"larger than {MAX_RECORD_SIZE} bytes")
    return data


#: Each field of a record file and the types it may have.
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "host": str,
    "port": int,
    "control": str,
    "pool": (str, type(None)),
    "pid": int,
    "start_time": int,
    "uid": int,
    "version": int,
}


def _record(data: Any) -> Record | None:
    """The record ``data`` (parsed JSON) describes: None if it is of another
    version; ``ValueError`` if a field is missing, unknown or of the wrong
    type (a bool is not a number here)."""
    if not isinstance(data, dict):
        raise ValueError(f"a JSON {type(data).__name__}, not an object")
    if data.get("version") != RECORD_VERSION:
        return None
    if set(data) != _FIELDS.keys():
        raise ValueError(f"fields {sorted(data)}, not {sorted(_FIELDS)}")
    for name, kind in _FIELDS.items():
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(f"{name!r} is a {type(value).__name__}")
    if not 0 <= data["port"] <= 65535 or data["pid"] <= 0:
        raise ValueError(f"port {data['port']} or pid {data['pid']} out of range")
    return Record(**data)


def _alive(pid: int, start_time: int) -> bool:
    return _start_time(pid) == start_time


def _exists(pid: int) -> bool:
    """Whether a process ``pid`` exists (one system call; reuse of the pid
    by another process is what ``_alive`` tells)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's: it exists
    return True


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

    def _secure_directory(self, create: bool) -> os.stat_result | None:
        """Check (and with ``create``, make) the directory; returns its
        ``lstat``, None if absent."""
        try:
            if create:
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.lstat(self.directory)
        except FileNotFoundError:
            return None
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
        return st

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
            files = [e for e in entries if e.name.endswith(".json")]
        for entry in files:
            path = entry.path
            record = self._read(entry)
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
        st = self._secure_directory(create=False)
        if st is None:
            return []
        now = time.time_ns()
        key = (str(self.directory), host, port)
        directory = (st.st_dev, st.st_ino, st.st_mtime_ns)
        kept = _found.get(key)
        if kept is not None and kept.directory == directory:
            recheck = now - kept.checked_ns > _RECHECK_NS
            if all(
                _alive(r.pid, r.start_time) if recheck else _exists(r.pid) for r in kept.records
            ):
                if recheck:
                    _found[key] = _Found(directory, kept.records, now)
                return list(kept.records)
        _found.pop(key, None)  # (a process went away: the scan removes its record)
        found = self._scan(host, port)
        if now - st.st_mtime_ns > _SETTLED_NS:
            if len(_found) >= _FOUND_MAX:
                _found.clear()
            _found[key] = _Found(directory, found, now)
        return found

    def _scan(self, host: str, port: int) -> list[Record]:
        found = []
        prefix = f"{port}-"
        with os.scandir(self.directory) as entries:
            files = [
                entry
                for entry in entries
                if entry.name.startswith(prefix) and entry.name.endswith(".json")
            ]
        for entry in files:
            path = entry.path
            record = self._read(entry)
            if record is None or not record.matches(host, port):
                continue
            if not _alive(record.pid, record.start_time):
                _log.debug("removing stale record %s (pid %d is gone)", path, record.pid)
                _unlink(path)
                continue
            found.append(record)
        return found

    def _read(self, entry: os.DirEntry[str]) -> Record | None:
        path = entry.path
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            return None  # gone meanwhile
        key = (path, st.st_ino, st.st_mtime_ns, st.st_size)
        if key in _parsed:
            return _parsed[key]
        try:
            record = _record(json.loads(_read_record_file(path)))
        except (OSError, ValueError, RecursionError) as exc:  # ValueError: JSON's too
            _log.debug("ignoring unreadable registry entry %s: %s", path, exc)
            return None  # (not kept: it may be complete next time)
        if time.time_ns() - st.st_mtime_ns > _SETTLED_NS:
            if len(_parsed) >= _PARSED_MAX:
                _parsed.clear()
            _parsed[key] = record
        return record
