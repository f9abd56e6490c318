"""Runs inside a QEMU guest: TCP echo over the guest-to-guest link (stdlib only,
so it starts fast under TCG), and optionally a marker written into ivshmem BAR2.

    guest_net_echo.py server ADDR PORT CLIENTS   echo CLIENTS connections, then exit
    guest_net_echo.py client ADDR PORT NBYTES SEED
                                                 send NBYTES seeded bytes, check the echo
    ... --marker OFFSET TEXT                     first write TEXT at OFFSET of BAR2

Clients retry connecting until the server listens, so all guests may boot at once.
"""

from __future__ import annotations

import glob
import hashlib
import mmap
import os
import random
import socket
import sys
import threading
import time

DEADLINE = time.monotonic() + 180
CHUNK = 1 << 16


def write_marker(offset: int, text: str) -> None:
    """Write ``text`` into the ivshmem-plain BAR2 (PCI 1af4:1110) at ``offset``."""
    for dev in sorted(glob.glob("/sys/bus/pci/devices/*")):
        with open(f"{dev}/vendor") as v, open(f"{dev}/device") as d:
            if (v.read().strip(), d.read().strip()) != ("0x1af4", "0x1110"):
                continue
        fd = os.open(f"{dev}/resource2", os.O_RDWR | os.O_SYNC)
        try:
            with mmap.mmap(fd, os.fstat(fd).st_size) as bar:
                bar[offset : offset + len(text)] = text.encode()
        finally:
            os.close(fd)
        print(f"GUEST: marker at {offset} in {os.path.basename(dev)}", flush=True)
        return
    raise SystemExit("GUEST: no ivshmem-plain device")


def echo_one(conn: socket.socket, totals: list[int]) -> None:
    with conn:
        moved = 0
        while data := conn.recv(CHUNK):
            conn.sendall(data)
            moved += len(data)
        totals.append(moved)


def server(addr: str, port: int, clients: int) -> None:
    with socket.create_server((addr, port)) as listener:
        listener.settimeout(max(1.0, DEADLINE - time.monotonic()))
        print("GUEST: LISTENING", flush=True)
        totals: list[int] = []
        threads = []
        for _ in range(clients):
            conn, peer = listener.accept()
            conn.settimeout(max(1.0, DEADLINE - time.monotonic()))
            print(f"GUEST: accepted {peer[0]}:{peer[1]}", flush=True)
            t = threading.Thread(target=echo_one, args=(conn, totals))
            t.start()
            threads.append(t)
        for t in threads:
            t.join()
    if len(totals) != clients:
        raise SystemExit(f"GUEST: only {len(totals)} of {clients} echoes finished")
    print(f"GUEST: served {clients} clients, {sum(totals)} bytes", flush=True)


def connect(addr: str, port: int) -> socket.socket:
    while True:
        try:
            return socket.create_connection((addr, port), timeout=5)
        except OSError:
            if time.monotonic() > DEADLINE:
                raise
            time.sleep(0.2)


def client(addr: str, port: int, nbytes: int, seed: int) -> None:
    payload = random.Random(seed).randbytes(nbytes)
    with connect(addr, port) as sock:
        sock.settimeout(max(1.0, DEADLINE - time.monotonic()))
        local = sock.getsockname()

        # Send on a thread while reading here: the echo comes back as we send,
        # and neither side's buffers hold a whole MiB.
        def send() -> None:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        digest, received = hashlib.sha256(), 0
        while data := sock.recv(CHUNK):
            digest.update(data)
            received += len(data)
        sender.join()
    if digest.digest() != hashlib.sha256(payload).digest():
        raise SystemExit(f"GUEST: echo mismatch after {received} of {nbytes} bytes")
    print(
        f"GUEST: echo ok {received} bytes from {local[0]} sha256={digest.hexdigest()}", flush=True
    )


def main(argv: list[str]) -> None:
    if "--marker" in argv:
        i = argv.index("--marker")
        write_marker(int(argv[i + 1]), argv[i + 2])
        del argv[i : i + 3]
    role, addr, port, *rest = argv
    if role == "server":
        server(addr, int(port), int(rest[0]))
    else:
        client(addr, int(port), int(rest[0]), int(rest[1]))


if __name__ == "__main__":
    main(sys.argv[1:])
