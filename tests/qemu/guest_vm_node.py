"""Runs inside a QEMU guest: one node of tests/test_qemu_vms.py.

Starts the discovery sidecar of this guest (``--pool auto``: the guest's
ivshmem device, if it has one; ``--doorbells $VM_DOORBELLS``), then plays a role with the aiocoloc library,
and prints one JSON line per result (prefixed ``NODE``):

    guest_vm_node.py server IP PORT CLIENTS KEY
        an echo server on IP:PORT; reports each connection's final state
        when it closes; exits after CLIENTS connections
    guest_vm_node.py client IP SERVER_IP PORT KEY shm|tcp [ROUNDS]
        joins the server's sidecar, connects to SERVER_IP:PORT and expects
        the connection on shared memory (8 MiB echo checked by sha256, and
        ROUNDS 64-byte ping-pongs timed) or on TCP with a reason
    guest_vm_node.py client ... shm ROUNDS scribble
        then writes garbage over the whole pool under the live connection,
        and reports what became of it and of a new connection
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiocoloc
from discovery.client import SidecarClient

API = "/run/discoveryd.sock"
GOSSIP_PORT = 7946
DEADLINE = time.monotonic() + 240


def report(**fields: Any) -> None:
    print("NODE " + json.dumps(fields), flush=True)


def start_sidecar(node: str, ip: str, key: str, join: str | None) -> subprocess.Popen[bytes]:
    daemon = str(Path(sys.executable).with_name("aiocoloc-discoveryd"))
    argv = [daemon, "--node", node, "--bind", f"{ip}:{GOSSIP_PORT}", "--profile", "host"]
    argv += ["--pool", "auto", "--key-file", key, "--api", API]
    argv += ["--doorbells", os.environ.get("VM_DOORBELLS", "messages")]
    if join:
        argv += ["--join", f"{join}:{GOSSIP_PORT}"]
    log = open(f"/run/{node}.log", "wb")  # the daemon's, for its life
    return subprocess.Popen(argv, stdout=log, stderr=log)


async def until(check: Any, what: str, timeout: float) -> Any:
    deadline = min(DEADLINE, time.monotonic() + timeout)
    while True:
        try:
            result = await check()
            if result:
                return result
        except (OSError, Exception):  # the sidecar not up yet, say
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"NODE timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def sidecar_ready() -> bool:
    async with SidecarClient(API, timeout=2) as client:
        await client.status()
    return True


def state(writer: asyncio.StreamWriter) -> dict[str, Any]:
    info: dict[str, Any] = writer.transport.get_extra_info("aiocoloc")
    return info


async def serve(ip: str, port: int, clients: int) -> None:
    finished: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen: dict[str, Any] = {}
        try:
            while data := await reader.read(1 << 20):
                writer.write(data)
                await writer.drain()
                seen = dict(state(writer))
        except ConnectionError as exc:
            seen["error"] = repr(exc)
        info = {**seen, **{k: v for k, v in state(writer).items() if v is not None}}
        writer.close()
        await finished.put(info)

    server = await aiocoloc.start_server(echo, ip, port, upgrade="always")
    report(listening=port)
    async with server:
        for _ in range(clients):
            info = await finished.get()
            report(
                served=True,
                mode=info.get("mode"),
                pool=info.get("pool"),
                doorbell=info.get("doorbell"),
                reason=info.get("fallback_reason"),
            )


async def ping_pong(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rounds: int
) -> float:
    """p50 round trip of 64-byte messages, in microseconds."""
    times = []
    message = b"p" * 64
    for _ in range(rounds):
        started = time.perf_counter()
        writer.write(message)
        await reader.readexactly(len(message))
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


async def connect(
    server_ip: str, port: int, expect: str, rounds: int, scribble: bool = False
) -> None:
    async def advertised() -> bool:
        async with SidecarClient(API, timeout=2) as client:
            answer = await client.colocated(f"{server_ip}:{port}")
        if expect == "tcp":  # the server's member is known, whatever it shares
            return answer.member is not None and bool(answer.endpoints)
        return any("=tcp:" in e for e in answer.endpoints)

    await until(advertised, "the server's advertised endpoints", 120)
    started = time.monotonic()
    reader, writer = await aiocoloc.open_connection(server_ip, port, upgrade="always")
    connected = time.monotonic()

    async def settled() -> bool:
        info = state(writer)
        if expect == "shm":
            return bool(info["mode"] == "shm" and info["rx_mode"] == "shm")
        return info["fallback_reason"] is not None

    await until(settled, f"the connection on {expect}", 60)
    upgraded = time.monotonic()
    size = 8 << 20 if expect == "shm" else 1 << 20
    payload = os.urandom(size)

    async def pump() -> None:
        for offset in range(0, size, 1 << 20):
            writer.write(payload[offset : offset + (1 << 20)])
            await writer.drain()

    pumping = asyncio.ensure_future(pump())
    t0 = time.monotonic()
    echoed = await reader.readexactly(size)
    await pumping
    moved = time.monotonic() - t0
    p50 = await ping_pong(reader, writer, rounds) if rounds else None
    info = state(writer)
    report(
        mode=info["mode"],
        rx_mode=info["rx_mode"],
        pool=info["pool"],
        doorbell=info["doorbell"],
        reason=info["fallback_reason"],
        detail=info["fallback_detail"],
        sha_match=hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest(),
        bytes=size,
        connect_s=round(connected - started, 4),
        upgrade_s=round(upgraded - started, 4),
        echo_mb_s=round(2 * size / moved / 1e6, 2),
        ping_p50_us=None if p50 is None else round(p50, 1),
    )
    if scribble:
        await scribble_pool(reader, writer, server_ip, port)
    writer.close()
    try:
        await writer.wait_closed()
    except ConnectionError:
        if not scribble:  # (after a scribble the pipe's failure was reported above)
            raise


async def scribble_pool(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server_ip: str, port: int
) -> None:
    """Garbage over the whole pool (BAR2) under the live connection, as a
    broken or hostile guest would write it; then what became of the
    connection, and of a new one to the same server."""
    from aiocoloc.shm import IvshmemSegment

    segment = IvshmemSegment.open()
    region = segment.map()
    region[:] = os.urandom(len(region))
    region.close()
    segment.close()
    outcome = "still working"
    try:
        for _ in range(5):
            writer.write(b"s" * 65536)
            await asyncio.wait_for(reader.readexactly(65536), 10)
    except (ConnectionError, asyncio.IncompleteReadError) as exc:
        outcome = repr(reader.exception() or exc)
    except TimeoutError:
        outcome = "stalled"
    r2, w2 = await aiocoloc.open_connection(server_ip, port, upgrade="always")

    async def settled() -> bool:
        return bool(state(w2)["fallback_reason"] or state(w2)["rx_mode"] == "shm")

    await until(settled, "the new connection settling", 30)
    w2.write(b"n" * 65536)
    echoed = await asyncio.wait_for(r2.readexactly(65536), 30)
    report(
        scribbled=True,
        old_connection=outcome,
        new_mode=state(w2)["mode"],
        new_reason=state(w2)["fallback_reason"],
        new_works=echoed == b"n" * 65536,
    )
    w2.close()


async def main(argv: list[str]) -> None:
    role = argv[0]
    if role == "server":
        ip, port, clients, key = argv[1], int(argv[2]), int(argv[3]), argv[4]
        join = None
    else:
        ip, server_ip, port, key, expect = argv[1], argv[2], int(argv[3]), argv[4], argv[5]
        rounds = int(argv[6]) if len(argv) > 6 else 0
        scribble = argv[7:] == ["scribble"]
        join = server_ip
    os.environ.update(
        AIOCOLOC_KEY_FILE=key, AIOCOLOC_DISCOVERY_API=API, AIOCOLOC_RUNTIME_DIR="/run/aiocoloc"
    )
    sidecar = start_sidecar(f"vm-{ip.rsplit('.', 1)[1]}", ip, key, join)
    try:
        await until(sidecar_ready, "the sidecar", 120)
        if role == "server":
            await serve(ip, port, clients)
        else:
            await connect(server_ip, port, expect, rounds, scribble)
    finally:
        sidecar.terminate()
        try:
            sidecar.wait(10)
        except subprocess.TimeoutExpired:
            sidecar.kill()
        if sidecar.returncode not in (0, -15):
            print(Path(f"/run/vm-{ip.rsplit('.', 1)[1]}.log").read_text()[-3000:], flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
