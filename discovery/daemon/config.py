"""The sidecar's configuration: command-line flags over a TOML file over defaults.

Every setting is a flag (``--key-file PATH``) and a key of the same name in
the ``--config`` file (``key-file = "PATH"``; ``key_file`` works too).  A
flag given on the command line wins over the file; a repeatable flag
(``--pool``, ``--join``) given at all replaces the file's list.  Everything
is checked here, before anything starts, and every mistake is a
``ConfigError`` whose message says what is wrong and where.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from discovery.client import default_api_path
from discovery.daemon.pools import PoolSpec, PoolSpecError
from discovery.member import MAX_NODE, MAX_POOLS
from discovery.profiles import PROFILES as _PROFILES

__all__ = [
    "DEFAULT_BIND",
    "ENGINES",
    "LOG_LEVELS",
    "PROFILES",
    "Config",
    "ConfigError",
    "HostPort",
    "parse_args",
]

#: The gossip port Serf and memberlist use too.
DEFAULT_PORT = 7946
DEFAULT_BIND = f"0.0.0.0:{DEFAULT_PORT}"
ENGINES = ("embedded", "serf")
#: Timing profiles, fastest first (``discovery.profiles`` defines them).
PROFILES = tuple(_PROFILES)
LOG_LEVELS = ("debug", "info", "warning", "error")
#: Longest path of a Unix socket (sun_path is 108 bytes with its NUL).
MAX_SOCKET_PATH = 107


class ConfigError(ValueError):
    """A flag, a config file or a value in it that cannot be used."""


@dataclass(frozen=True)
class HostPort:
    """An IP address and a port (``"ip:port"``, ``"[v6]:port"``)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(
        cls, text: str, *, what: str, ip_only: bool = True, port_zero: bool = False
    ) -> HostPort:
        """Parse ``text``; ``ConfigError`` naming ``what`` on anything else."""
        host, sep, port = text.strip().rpartition(":")
        if not sep or not host:
            raise ConfigError(f"{what} {text!r}: expected HOST:PORT")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ConfigError(f"{what} {text!r}: write an IPv6 address as [ADDRESS]:PORT")
        if not port.isdigit() or not (0 if port_zero else 1) <= int(port) <= 65535:
            raise ConfigError(f"{what} {text!r}: bad port {port!r}")
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            if ip_only:
                raise ConfigError(f"{what} {text!r}: {host!r} is not an IP address") from None
            if not _hostname(host):
                raise ConfigError(f"{what} {text!r}: {host!r} is not a host name") from None
        return cls(host, int(port))


def _hostname(name: str) -> bool:
    labels = name.rstrip(".").split(".")
    return len(name) <= 253 and all(
        0 < len(label) <= 63 and label.replace("-", "").isalnum() and label[0] != "-"
        for label in labels
    )


@dataclass(frozen=True)
class Config:
    """Everything the sidecar runs with, checked."""

    node: str
    bind: HostPort
    advertise: HostPort | None = None
    join: tuple[HostPort, ...] = ()
    engine: str = "embedded"
    profile: str = "lan"
    key_file: Path | None = None
    pools: tuple[PoolSpec, ...] = ()
    api: Path = field(default_factory=default_api_path)
    log_level: str = "info"
    sysfs_root: Path = Path("/sys")
    serf_rpc: HostPort | None = None
    serf_rpc_auth_file: Path | None = None
    serf_binary: str = "serf"
    doorbells: str = "messages"
    config_file: Path | None = None

    @property
    def logging_level(self) -> int:
        level: int = getattr(logging, self.log_level.upper())
        return level


#: How processes of this node ring peers in other VMs (``--doorbells``).
DOORBELLS = ("messages", "vfio")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are ``ConfigError`` (the caller prints them)."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    """The flags (every default is None: "not given", the file or the
    built-in default applies)."""
    p = _Parser(
        prog="aiocoloc-discoveryd",
        description="The aiocoloc membership sidecar: gossip which nodes exist and which "
        "shared-memory pools each maps; answer the local API.",
        argument_default=None,
    )
    p.add_argument("--config", metavar="FILE", help="TOML file with the same keys as the flags")
    p.add_argument("--node", metavar="NAME", help="this member's name (default: the host name)")
    p.add_argument("--bind", metavar="HOST:PORT", help=f"gossip address (default {DEFAULT_BIND})")
    p.add_argument("--advertise", metavar="HOST:PORT", help="address others reach us at")
    p.add_argument(
        "--join",
        metavar="HOST:PORT[,HOST:PORT...]",
        action="append",
        help="members to join at start (repeatable)",
    )
    p.add_argument("--engine", help=f"membership engine: {'|'.join(ENGINES)} (default embedded)")
    p.add_argument("--profile", help=f"timing profile: {'|'.join(PROFILES)} (default lan)")
    p.add_argument("--key-file", metavar="PATH", help="keyring that authenticates gossip")
    p.add_argument(
        "--pool",
        metavar="SPEC",
        action="append",
        help="a pool to map: a POSIX shm name, an ivshmem device path (…/resource2), "
        "or 'auto' to probe ivshmem devices (repeatable)",
    )
    p.add_argument("--api", metavar="PATH", help=f"local API socket (default {default_api_path()})")
    p.add_argument("--log-level", help=f"{'|'.join(LOG_LEVELS)} (default info)")
    p.add_argument("--sysfs-root", metavar="PATH", help="where 'auto' looks for PCI devices (/sys)")
    p.add_argument("--serf-rpc", metavar="HOST:PORT", help="RPC address of a running Serf agent")
    p.add_argument("--serf-rpc-auth-file", metavar="PATH", help="file holding the Serf RPC token")
    p.add_argument("--serf-binary", metavar="PATH", help="Serf executable to start (serf)")
    p.add_argument(
        "--doorbells",
        help="messages|vfio: with vfio, ivshmem pools are opened through VFIO and their "
        "doorbell interrupts granted to local processes (default messages)",
    )
    return p


#: Keys a config file may hold, and whether the value may be a list.
_KEYS = {
    "node": False,
    "bind": False,
    "advertise": False,
    "join": True,
    "engine": False,
    "profile": False,
    "key-file": False,
    "pool": True,
    "api": False,
    "log-level": False,
    "sysfs-root": False,
    "serf-rpc": False,
    "serf-rpc-auth-file": False,
    "serf-binary": False,
    "doorbells": False,
}


def load_file(path: Path) -> dict[str, Any]:
    """The settings of a TOML config file, keys normalised to flag names."""
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path}: is a directory") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not UTF-8 text") from None
    settings: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("_", "-")
        if name not in _KEYS:
            raise ConfigError(
                f"config file {path}: unknown key {key!r} (known: {', '.join(sorted(_KEYS))})"
            )
        if _KEYS[name] and isinstance(value, list):
            if not all(isinstance(v, str) for v in value):
                raise ConfigError(f"config file {path}: {key!r} must be a list of strings")
        elif not isinstance(value, str):
            kind = "a string or a list of strings" if _KEYS[name] else "a string"
            raise ConfigError(f"config file {path}: {key!r} must be {kind}")
        settings[name] = value
    return settings


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """The configuration from ``argv`` (and the ``--config`` file it names)."""
    args = vars(build_parser().parse_args(argv))
    config_file = Path(args.pop("config")) if args.get("config") else None
    settings = load_file(config_file) if config_file is not None else {}
    for name, value in args.items():
        if value is not None:
            settings[name.replace("_", "-")] = value
    where = f" (in {config_file})" if config_file is not None else ""
    try:
        return _build(settings, config_file)
    except ConfigError as exc:
        raise ConfigError(f"{exc}{where}") from None


def _one_of(name: str, value: str, choices: Sequence[str]) -> str:
    if value.lower() not in choices:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(choices)}")
    return value.lower()


def _list(name: str, value: str | list[str]) -> list[str]:
    """A repeatable setting's items; each may itself be comma-separated."""
    items = [value] if isinstance(value, str) else value
    parts = [part.strip() for item in items for part in item.split(",")]
    if not all(parts):
        raise ConfigError(f"{name}: an empty entry in {value!r}")
    return parts


def _node(value: str) -> str:
    if not value or len(value.encode()) > MAX_NODE:
        raise ConfigError(f"node name {value!r:.60}: 1 to {MAX_NODE} bytes")
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ConfigError(f"node name {value!r:.60}: no spaces or control characters")
    return value


def _path(name: str, value: str) -> Path:
    if not value or "\0" in value:
        raise ConfigError(f"{name}: {value!r} is not a path")
    return Path(value).expanduser()


def _build(s: dict[str, Any], config_file: Path | None) -> Config:
    api = _path("api", s["api"]) if "api" in s else default_api_path()
    if len(str(api).encode()) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"api socket path {api} is {len(str(api).encode())} bytes; a Unix socket path "
            f"holds at most {MAX_SOCKET_PATH}"
        )
    specs = []
    for text in _list("pool", s.get("pool", [])):
        try:
            specs.append(PoolSpec.parse(text))
        except PoolSpecError as exc:
            raise ConfigError(f"pool: {exc}") from None
    if len({spec.text for spec in specs}) != len(specs):
        raise ConfigError("pool: the same pool is named twice")
    if sum(1 for spec in specs if spec.kind != "auto") > MAX_POOLS:
        raise ConfigError(f"pool: at most {MAX_POOLS} pools fit in a member record")
    engine = _one_of("engine", s.get("engine", "embedded"), ENGINES)
    serf_keys = [k for k in ("serf-rpc", "serf-rpc-auth-file", "serf-binary") if k in s]
    if serf_keys and engine != "serf":
        raise ConfigError(f"{serf_keys[0]}: only meaningful with --engine serf")
    return Config(
        node=_node(s["node"] if "node" in s else socket.gethostname()),
        bind=HostPort.parse(s.get("bind", DEFAULT_BIND), what="bind", port_zero=True),
        advertise=(HostPort.parse(s["advertise"], what="advertise") if "advertise" in s else None),
        join=tuple(
            HostPort.parse(item, what="join", ip_only=False)
            for item in _list("join", s.get("join", []))
        ),
        engine=engine,
        profile=_one_of("profile", s.get("profile", "lan"), PROFILES),
        key_file=_path("key-file", s["key-file"]) if "key-file" in s else None,
        pools=tuple(specs),
        api=api,
        log_level=_one_of("log-level", s.get("log-level", "info"), LOG_LEVELS),
        sysfs_root=_path("sysfs-root", s.get("sysfs-root", "/sys")),
        serf_rpc=HostPort.parse(s["serf-rpc"], what="serf-rpc") if "serf-rpc" in s else None,
        serf_rpc_auth_file=(
            _path("serf-rpc-auth-file", s["serf-rpc-auth-file"])
            if "serf-rpc-auth-file" in s
            else None
        ),
        serf_binary=s.get("serf-binary", "serf"),
        doorbells=_one_of("doorbells", s.get("doorbells", "messages"), DOORBELLS),
        config_file=config_file,
    )
