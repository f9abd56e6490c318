"""The sidecar's flags and config file: what they set, what wins, and a clear
error for every bad input (in-process, then through the real executable)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from discovery.client import default_api_path, runtime_dir
from discovery.daemon.config import DEFAULT_BIND, ConfigError, HostPort, parse_args
from discovery.daemon.pools import PoolSpec

DAEMON = str(Path(sys.executable).with_name("aiocoloc-discoveryd"))


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_args([])
    assert config.node == socket.gethostname()
    assert str(config.bind) == DEFAULT_BIND
    assert (config.engine, config.profile, config.log_level) == ("embedded", "lan", "info")
    assert config.join == () and config.pools == () and config.key_file is None
    assert config.api == default_api_path() == runtime_dir() / "discoveryd.sock"
    monkeypatch.setenv("AIOCOLOC_DISCOVERY_API", "/run/x/api.sock")
    assert parse_args([]).api == Path("/run/x/api.sock")


def test_runtime_dir_agrees_with_the_library(monkeypatch: pytest.MonkeyPatch) -> None:
    from aiocoloc.connect.registry import default_directory

    for env in ({"AIOCOLOC_RUNTIME_DIR": "/a"}, {"XDG_RUNTIME_DIR": "/run/user/7"}, {}):
        monkeypatch.delenv("AIOCOLOC_RUNTIME_DIR", raising=False)
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert runtime_dir() == default_directory()


def test_flags() -> None:
    config = parse_args(
        [
            "--node=n1",
            "--bind=127.0.0.2:7000",
            "--advertise=[::1]:7001",
            "--join=127.0.0.3:7000,seed.example:7946",
            "--join=127.0.0.4:7000",
            "--engine=SERF",
            "--profile=host",
            "--key-file=/k",
            "--pool=aiocoloc-a",
            "--pool=/aiocoloc-b",
            "--pool=/sys/bus/pci/devices/0000:00:04.0/resource2",
            "--pool=auto",
            "--api=/tmp/x.sock",
            "--log-level=DEBUG",
            "--serf-rpc=127.0.0.1:7373",
        ]
    )
    assert config.node == "n1"
    assert config.bind == HostPort("127.0.0.2", 7000)
    assert str(config.advertise) == "[::1]:7001"
    assert [str(j) for j in config.join] == [
        "127.0.0.3:7000",
        "seed.example:7946",
        "127.0.0.4:7000",
    ]
    assert (config.engine, config.profile, config.log_level) == ("serf", "host", "debug")
    assert config.pools == (
        PoolSpec("posix", "aiocoloc-a"),
        PoolSpec("posix", "aiocoloc-b"),
        PoolSpec("ivshmem", "/sys/bus/pci/devices/0000:00:04.0/resource2"),
        PoolSpec("auto", "auto"),
    )
    assert config.key_file == Path("/k") and config.api == Path("/tmp/x.sock")
    assert str(config.serf_rpc) == "127.0.0.1:7373"


def test_config_file_and_flags_over_it(tmp_path: Path) -> None:
    path = tmp_path / "d.toml"
    path.write_text(
        'node = "from-file"\nbind = "127.0.0.5:7100"\njoin = ["127.0.0.6:7100"]\n'
        'profile = "wan"\nkey_file = "/etc/k"\npool = ["p1", "p2"]\nlog-level = "warning"\n'
    )
    config = parse_args(["--config", str(path)])
    assert (config.node, str(config.bind), config.profile) == ("from-file", "127.0.0.5:7100", "wan")
    assert [s.text for s in config.pools] == ["p1", "p2"]
    assert config.key_file == Path("/etc/k") and config.config_file == path
    config = parse_args(["--config", str(path), "--node", "flag", "--pool", "p3"])
    assert config.node == "flag"
    assert [s.text for s in config.pools] == ["p3"]  # a repeatable flag replaces the list
    assert config.log_level == "warning"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--bind"], "expected one argument"),
        (["--bind=127.0.0.1"], "expected HOST:PORT"),
        (["--bind=127.0.0.1:99999"], "bad port '99999'"),
        (["--bind=127.0.0.1:http"], "bad port 'http'"),
        (["--bind=myhost:7946"], "'myhost' is not an IP address"),
        (["--bind=::1:7946"], "write an IPv6 address as [ADDRESS]:PORT"),
        (["--advertise=127.0.0.1:0"], "bad port '0'"),
        (["--join=127.0.0.1:7946,bad_host!:1"], "'bad_host!' is not a host name"),
        (["--join=127.0.0.1"], "expected HOST:PORT"),
        (["--engine=consul"], "engine: 'consul' is not one of embedded, serf"),
        (["--profile=fast"], "profile: 'fast' is not one of host, local, lan, wan"),
        (["--log-level=loud"], "log-level: 'loud' is not one of"),
        (["--node="], "node name '': 1 to 128 bytes"),
        (["--node=" + "n" * 129], "1 to 128 bytes"),
        (["--node=two words"], "no spaces or control characters"),
        (["--pool="], "pool: an empty entry in"),
        (["--join=127.0.0.1:1,"], "join: an empty entry in"),
        (["--pool=" + "p" * 251], "1 to 250 characters"),
        (["--pool=a", "--pool=/a"], "the same pool is named twice"),
        ([f"--pool=p{i}" for i in range(9)], "at most 8 pools"),
        (["--api=/" + "d" * 120], "a Unix socket path holds at most 107"),
        (["--serf-rpc=127.0.0.1:7373"], "only meaningful with --engine serf"),
    ],
)
def test_bad_flags(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_args(argv)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('node = "a"\nnode = "b"\n', "not valid TOML"),
        ("bind = 7946\n", "'bind' must be a string"),
        ("pool = [1, 2]\n", "'pool' must be a list of strings"),
        ('join = {a = "b"}\n', "'join' must be a string or a list of strings"),
        ('colour = "blue"\n', "unknown key 'colour'"),
        ('profile = "fast"\n', "profile: 'fast' is not one of"),
        (b"\xff\xfe = 1\n", "not"),
    ],
)
def test_bad_config_files(tmp_path: Path, text: str | bytes, message: str) -> None:
    path = tmp_path / "bad.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        parse_args(["--config", str(path)])
    assert message in str(caught.value) and str(path) in str(caught.value)


def test_missing_and_unreadable_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        parse_args(["--config", str(tmp_path / "absent.toml")])
    with pytest.raises(ConfigError, match="is a directory"):
        parse_args(["--config", str(tmp_path)])


def _run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DAEMON, *argv], capture_output=True, text=True, timeout=30, env=env or dict(os.environ)
    )


def _one_line_error(result: subprocess.CompletedProcess[str], code: int, words: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and words in errors[0], result.stderr


def test_the_executable_says_what_is_wrong(tmp_path: Path) -> None:
    """Bad flags exit 2; what cannot be used at start-up exits 1; each with
    one line on stderr and no traceback."""
    api = ["--api", str(tmp_path / "api.sock"), "--bind", "127.0.0.1:0"]
    _one_line_error(_run("--bogus"), 2, "unrecognized arguments: --bogus")
    _one_line_error(_run("--profile", "fast"), 2, "'fast' is not one of")
    _one_line_error(_run("--config", str(tmp_path / "none.toml")), 2, "no such file")
    _one_line_error(_run(*api, "--key-file", str(tmp_path / "none")), 1, "no such file")
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("not base64 at all!\n")
    _one_line_error(_run(*api, "--key-file", str(bad_key)), 1, "bad.key:1: not a base64 key")
    unreadable = tmp_path / "dir.key"
    unreadable.mkdir()
    _one_line_error(_run(*api, "--key-file", str(unreadable)), 1, "is a directory")
    _one_line_error(_run(*api, "--pool", "aiocoloc-no-such-pool"), 1, "no shared memory named")
    _one_line_error(
        _run(*api, "--pool", str(tmp_path / "bus/pci/devices/0000:00:09.0/resource2")),
        1,
        "no ivshmem device (PCI 1af4:1110) at 0000:00:09.0",
    )
    _one_line_error(_run(*api, "--pool", "/etc/passwd/x"), 1, "not an ivshmem device path")
    assert not (tmp_path / "api.sock").exists()  # nothing left behind


def test_api_socket_in_use(tmp_path: Path) -> None:
    """A second daemon on the same API socket refuses to start; a stale
    socket file (nobody listening) is not in the way."""
    path = tmp_path / "api.sock"
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(path))
        other.listen()
        result = _run("--api", str(path), "--bind", "127.0.0.1:0", "--key-file", "/nonexistent")
        # The key file is checked first: fix that, the socket is next.
        _one_line_error(result, 1, "key file")
        result = _run("--api", str(path), "--bind", "127.0.0.1:0", "--pool", "aiocoloc-none")
        _one_line_error(result, 1, "another aiocoloc-discoveryd answers on")
    # Closed without unlinking: a stale file, removed when the next daemon
    # starts (this one then stops at the missing pool).
    assert path.exists()
    result = _run("--api", str(path), "--bind", "127.0.0.1:0", "--pool", "aiocoloc-none")
    _one_line_error(result, 1, "no shared memory named")
    assert not path.exists()
    path.mkdir()
    result = _run("--api", str(path), "--bind", "127.0.0.1:0")
    _one_line_error(result, 1, "exists and is not a socket")
