"""The embedded host-local registry of aiocoloc servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from aiocoloc.connect.registry import Record, Registry, default_directory
from aiocoloc.errors import RegistryError

from .conftest import open_fds


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "reg")


def test_publish_lookup_withdraw(registry: Registry) -> None:
    assert registry.lookup("127.0.0.1", 8080) == []  # no directory yet: nothing, no error
    path = registry.publish("127.0.0.1", 8080, "/run/ctl.sock", pool="abc")
    assert registry.directory.stat().st_mode & 0o777 == 0o700
    (record,) = registry.lookup("127.0.0.1", 8080)
    assert (record.control, record.pool, record.pid) == ("/run/ctl.sock", "abc", os.getpid())
    assert registry.lookup("127.0.0.1", 8081) == []
    assert registry.lookup("127.0.0.2", 8080) == []
    registry.withdraw(path)
    registry.withdraw(path)  # idempotent
    assert registry.lookup("127.0.0.1", 8080) == []


@pytest.mark.parametrize(
    ("published", "asked", "found"),
    [
        ("0.0.0.0", "127.0.0.5", True),
        ("::", "::1", True),
        ("", "127.0.0.1", True),
        ("127.0.0.1", "localhost", True),
        ("::1", "0:0:0:0:0:0:0:1", True),
        ("127.0.0.1", "127.0.0.2", False),
    ],
)
def test_address_matching(registry: Registry, published: str, asked: str, found: bool) -> None:
    registry.publish(published, 9000, "/ctl")
    assert bool(registry.lookup(asked, 9000)) == found


def _publisher(registry: Registry, port: int) -> subprocess.Popen[str]:
    """A process that published a record for 127.0.0.1:``port`` and sleeps."""
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[2]);"
        "from aiocoloc.connect.registry import Registry;"
        "Registry(sys.argv[1]).publish('127.0.0.1', int(sys.argv[3]), '/ctl');"
        "print('up', flush=True); time.sleep(60)"
    )
    root = str(Path(__file__).parent.parent)
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(registry.directory), root, str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdout.readline() == "up\n"
    return child


def test_records_of_dead_processes_are_ignored_and_removed(registry: Registry) -> None:
    child = _publisher(registry, 7000)
    assert [r.pid for r in registry.lookup("127.0.0.1", 7000)] == [child.pid]
    child.kill()
    child.wait()
    assert registry.lookup("127.0.0.1", 7000) == []
    assert list(registry.directory.glob("7000-*.json")) == []  # cleaned up


def _settle(registry: Registry) -> None:
    """Date the directory's last change two seconds back: its lookups are kept."""
    past = registry.directory.stat().st_mtime_ns - 2_000_000_000
    os.utime(registry.directory, ns=(past, past))


def test_an_unchanged_directory_is_not_scanned_again(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lookup is on every connection's set-up path: while the directory's
    entries stay the same, its answer is kept; a new record is seen at once."""
    registry.publish("127.0.0.1", 7010, "/first")
    _settle(registry)
    assert [r.control for r in registry.lookup("127.0.0.1", 7010)] == ["/first"]
    scans: list[int] = []
    scan = Registry._scan

    def counted(self: Registry, host: str, port: int) -> list[Record]:
        scans.append(port)
        return scan(self, host, port)

    monkeypatch.setattr(Registry, "_scan", counted)
    for _ in range(3):
        assert [r.control for r in registry.lookup("127.0.0.1", 7010)] == ["/first"]
    assert scans == []
    assert registry.lookup("127.0.0.1", 7011) == []  # another port: its own answer
    assert scans == [7011]
    second = registry.publish("127.0.0.1", 7010, "/second")
    assert sorted(r.control for r in registry.lookup("127.0.0.1", 7010)) == ["/first", "/second"]
    registry.withdraw(second)
    assert [r.control for r in registry.lookup("127.0.0.1", 7010)] == ["/first"]
    assert scans == [7011, 7010, 7010]


def test_a_kept_answer_drops_a_publisher_that_died(registry: Registry) -> None:
    """The directory does not change when a server is killed: the kept
    answer's liveness probe sees it, and the scan that follows removes it."""
    child = _publisher(registry, 7012)
    _settle(registry)
    assert [r.pid for r in registry.lookup("127.0.0.1", 7012)] == [child.pid]
    assert [r.pid for r in registry.lookup("127.0.0.1", 7012)] == [child.pid]  # kept
    child.kill()
    child.wait()
    assert registry.lookup("127.0.0.1", 7012) == []
    assert list(registry.directory.glob("7012-*.json")) == []


def test_a_kept_answer_compares_start_times_again(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between comparisons a probe shows only that the pid exists; the start
    time (another process under a reused pid) is compared once a second."""
    from aiocoloc.connect import registry as module

    registry.publish("127.0.0.1", 7013, "/ctl")
    _settle(registry)
    assert len(registry.lookup("127.0.0.1", 7013)) == 1
    monkeypatch.setattr(module, "_start_time", lambda pid: -1)  # the pid is another's now
    assert len(registry.lookup("127.0.0.1", 7013)) == 1  # within the second: probed only
    monkeypatch.setattr(module, "_RECHECK_NS", 0)
    assert registry.lookup("127.0.0.1", 7013) == []
    assert list(registry.directory.glob("7013-*.json")) == []  # removed as stale


def test_a_reused_pid_is_not_mistaken_for_the_publisher(registry: Registry) -> None:
    path = registry.publish("127.0.0.1", 7001, "/ctl")
    data = json.loads(path.read_text())
    data["start_time"] -= 1  # same pid, another process
    path.write_text(json.dumps(data))
    assert registry.lookup("127.0.0.1", 7001) == []


def test_publishing_sweeps_records_of_dead_processes_on_any_port(registry: Registry) -> None:
    """A lookup cleans only its own port: without a sweep, records of servers
    that were killed would pile up for ports nobody asks for again."""
    live = registry.publish("127.0.0.1", 7003, "/live")
    for stale in [registry.publish("127.0.0.1", port, "/dead") for port in (7004, 7005, 7006)]:
        data = json.loads(stale.read_text())
        data["start_time"] -= 1  # its process is gone (its pid now someone else's)
        stale.write_text(json.dumps(data))
    (registry.directory / "7007-1-odd.json").write_text("not json")  # not ours to judge
    assert registry.sweep() == 3
    fresh = registry.publish("127.0.0.1", 7008, "/fresh")
    assert sorted(p.name for p in registry.directory.iterdir()) == sorted(
        [live.name, fresh.name, "7007-1-odd.json"]
    )


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[1, 2]",
        '{"version": 99}',
        '{"version": 1, "host": "x"}',
        '{"version": 1, "host": "127.0.0.1", "port": "7002", "control": "/c", "pool": null, '
        '"pid": 1, "start_time": 1, "uid": 0}',
    ],
)
def test_stray_files_are_ignored(registry: Registry, content: str) -> None:
    registry.publish("127.0.0.1", 7002, "/good")
    (registry.directory / "7002-1-bad.json").write_text(content)
    assert [r.control for r in registry.lookup("127.0.0.1", 7002)] == ["/good"]


def good_record(**changes: object) -> str:
    """A record for 127.0.0.1:7002 of this live process, with ``changes``."""
    from aiocoloc.connect.registry import _start_time

    record: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 7002,
        "control": "/c",
        "pool": None,
        "pid": os.getpid(),
        "start_time": _start_time(os.getpid()),
        "uid": os.getuid(),
        "version": 1,
    }
    record.update(changes)
    return json.dumps(record)


def test_a_record_written_by_hand_is_read(registry: Registry) -> None:
    """(So that the cases below fail for the field they change.)"""
    registry.directory.mkdir(mode=0o700)
    (registry.directory / "7002-1-hand.json").write_text(good_record(control="/hand"))
    assert [r.control for r in registry.lookup("127.0.0.1", 7002)] == ["/hand"]


@pytest.mark.parametrize(
    "changes",
    [
        {"pool": 5},
        {"host": []},
        {"host": None},
        {"control": 7},
        {"port": True},
        {"port": 7002.0},
        {"port": 70000},
        {"pid": str(os.getpid())},
        {"pid": -1},
        {"start_time": None},
        {"uid": "0"},
        {"version": True},
        {"extra": 1},
    ],
)
def test_a_record_with_a_field_of_the_wrong_type_is_ignored(
    registry: Registry, changes: dict[str, object]
) -> None:
    """Such a record once killed the client's upgrade task (the connection
    stayed on TCP without a reason) or broke publishing."""
    registry.publish("127.0.0.1", 7002, "/good")
    (registry.directory / "7002-1-bad.json").write_text(
        good_record(**{"control": "/bad", **changes})
    )
    assert [r.control for r in registry.lookup("127.0.0.1", 7002)] == ["/good"]
    registry.publish("127.0.0.1", 7003, "/other")  # sweeps: reads every record
    assert (registry.directory / "7002-1-bad.json").exists()  # not ours to remove


def test_entries_that_are_not_small_regular_files_are_ignored(
    registry: Registry, tmp_path: Path
) -> None:
    """A FIFO named like a record once blocked the event loop forever on
    open; a deeply nested record made start_server raise RecursionError."""
    registry.publish("127.0.0.1", 7002, "/good")
    directory = registry.directory
    os.mkfifo(directory / "7002-1-fifo.json")
    (directory / "7002-1-deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (directory / "7002-1-nested.json").write_text("[" * 5000 + "]" * 5000)
    (directory / "7002-1-huge.json").write_text(good_record(control="/huge", pad="x" * 100_000))
    (directory / "7002-1-dir.json").mkdir()
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(good_record(control="/linked"))
    (directory / "7002-1-link.json").symlink_to(elsewhere)
    found: list[list[str]] = []

    def look() -> None:
        registry.publish("127.0.0.1", 7003, "/other")  # sweeps every record
        found.append([r.control for r in registry.lookup("127.0.0.1", 7002)])

    fds = open_fds()
    worker = threading.Thread(target=look, daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "the registry blocked on an entry"
    assert found == [["/good"]]
    assert open_fds() <= fds, sorted(open_fds() - fds)


def test_an_unsafe_directory_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(RegistryError, match="writable by others"):
        Registry(shared).lookup("127.0.0.1", 1)
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 65534, 65534)
    with pytest.raises(RegistryError, match="belongs to uid 65534"):
        Registry(foreign).publish("127.0.0.1", 1, "/c")
    plain = tmp_path / "file"
    plain.write_text("x")
    with pytest.raises(RegistryError, match="not a directory"):
        Registry(plain).lookup("127.0.0.1", 1)


def test_default_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AIOCOLOC_RUNTIME_DIR", str(tmp_path / "x"))
    assert default_directory() == tmp_path / "x"
    monkeypatch.delenv("AIOCOLOC_RUNTIME_DIR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_directory() == tmp_path / "aiocoloc"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_directory().name == f"aiocoloc-{os.getuid()}"


def test_a_record_changed_in_place_is_read_again(registry: Registry) -> None:
    """Lookups keep the records they parsed (by file and its times); a file
    rewritten in place, settled or not, is read again."""
    path = registry.publish("127.0.0.1", 7010, "/one")
    settled = os.stat(path).st_mtime_ns - 10_000_000_000
    os.utime(path, ns=(settled, settled))
    assert [r.control for r in registry.lookup("127.0.0.1", 7010)] == ["/one"]
    assert [r.control for r in registry.lookup("127.0.0.1", 7010)] == ["/one"]  # kept
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "control": "/two"}))  # same size, just now
    assert [r.control for r in registry.lookup("127.0.0.1", 7010)] == ["/two"]
    path.write_text(json.dumps({**data, "control": "/six"}))
    os.utime(path, ns=(settled + 1, settled + 1))  # settled, other times
    assert [r.control for r in registry.lookup("127.0.0.1", 7010)] == ["/six"]
    data["start_time"] -= 1  # the process is gone: no record, whatever was kept
    path.write_text(json.dumps({**data, "control": "/six"}))
    os.utime(path, ns=(settled + 2, settled + 2))
    assert registry.lookup("127.0.0.1", 7010) == []
    assert not path.exists()
