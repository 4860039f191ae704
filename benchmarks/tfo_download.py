"""Reproduce a kernel issue: MPTCP downloads from a TFO-accepted connection, 2 paths.

    .venv/bin/python benchmarks/tfo_download.py

No proxy code involved: a server in a 2-path lab accepts MPTCP connections with
TCP Fast Open and sends 3 MiB; the client connects once normally and once with
data in the SYN. On Linux 6.18 the TFO case is ~10x slower, with the client's
MPTcpExt NoDSSInWindow and the server's MPTCPRetrans rising and path 0 carrying
the data several times. One path, or no TFO: normal. This is why the converter
offers --tfo-queue 0 and the client agent --no-tfo for download-heavy use.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from mptcp_proxy.lab import Lab, PathSpec  # noqa: E402

IPPROTO_MPTCP = 262
TCP_FASTOPEN_NO_COOKIE = 34
SIZE = 3 << 20
COUNTERS = ("MPTCPRetrans", "NoDSSInWindow", "DuplicateData")


def one(lab: Lab, tfo: bool, port: int) -> str:
    with lab.server.enter():
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 16)
    listener.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, 1)
    listener.bind((lab.server_addr, port))
    listener.listen()

    def serve() -> None:
        conn, _ = listener.accept()
        conn.recv(100)
        conn.sendall(b"y" * SIZE)
        conn.close()

    server = threading.Thread(target=serve)
    server.start()
    with lab.client.enter():
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
    client.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, 1)
    before = {**lab.client.netstat()["MPTcpExt"]}
    sbefore = {**lab.server.netstat()["MPTcpExt"]}
    rx0 = [lab.client.link_bytes(p.client_if)[1] for p in lab.paths]
    start = time.monotonic()
    if tfo:
        client.sendto(b"hello", socket.MSG_FASTOPEN, (lab.server_addr, port))
    else:
        client.connect((lab.server_addr, port))
        client.sendall(b"hello")
    got = 0
    while data := client.recv(1 << 16):
        got += len(data)
    elapsed = time.monotonic() - start
    server.join()
    client.close()
    listener.close()
    rx = [lab.client.link_bytes(p.client_if)[1] - b for p, b in zip(lab.paths, rx0)]
    after, safter = lab.client.netstat()["MPTcpExt"], lab.server.netstat()["MPTcpExt"]
    deltas = {k: after.get(k, 0) - before.get(k, 0) + safter.get(k, 0) - sbefore.get(k, 0)
              for k in COUNTERS}
    ok = "ok" if got == SIZE else f"SHORT {got}"
    return (f"paths={len(lab.paths)} tfo={'yes' if tfo else 'no '} {elapsed:5.2f} s ({ok}) "
            f"rx per path {rx} {deltas}")


def main() -> int:
    for paths in (1, 2):
        with Lab.create(paths=[PathSpec(rate_mbit=20)] * paths) as lab:
            for node in (lab.client, lab.server):
                node.sysctl("net.ipv4.tcp_fastopen", 3)
            for i, tfo in enumerate((False, True, False, True)):
                print(one(lab, tfo, 9000 + i), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
