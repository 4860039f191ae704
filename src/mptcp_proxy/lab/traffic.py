"""Traffic for labs: a hashing sink server and timed, verified uploads.

Used by the demo and by the multipath tests, so both prove the same things the
same way: every byte is hashed on both ends, and multipath is shown with the
kernel's evidence (per-path link counters and the MPTCP subflow count), never
assumed. MPTCP falls back to TCP silently; these numbers notice.
"""

from __future__ import annotations

import hashlib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from mptcp_proxy.errors import LabError
from mptcp_proxy.lab.topology import Lab, Node
from mptcp_proxy.observe.sockinfo import IPPROTO_MPTCP, is_mptcp, mptcp_info, subflows

CHUNK = 128 << 10
_REPLY = struct.Struct("!32sQ")  # sha256 digest, byte count


def pattern(seed: int = 0) -> bytes:
    """A deterministic CHUNK of bytes (not compressible by accident, not random)."""
    block = hashlib.sha256(f"mptcp-proxy-lab-{seed}".encode()).digest()
    return block * (CHUNK // len(block))


def serve_each(sock: socket.socket, handle: Callable[[socket.socket], None],
               name: str = "lab-conn", threads: list | None = None) -> threading.Thread:
    """Accept on ``sock`` until it is closed, each connection handled by
    ``handle(conn)`` in a daemon thread of its own (added to ``threads`` when
    given). Returns the accepting thread, started; threads inherit the
    caller's network namespace."""
    def accept_loop() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            t = threading.Thread(target=handle, args=(conn,), name=name, daemon=True)
            t.start()
            if threads is not None:
                threads.append(t)

    acceptor = threading.Thread(target=accept_loop, name=f"{name}-accept", daemon=True)
    acceptor.start()
    return acceptor


class SinkServer:
    """Reads each connection to EOF, then answers with (sha256, count) and closes."""

    def __init__(self, node: Node, host: str, port: int = 0, mptcp: bool = False) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with node.enter():
            self.sock = socket.socket(family, socket.SOCK_STREAM, IPPROTO_MPTCP if mptcp else 0)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(128)
        self.addr = self.sock.getsockname()[:2]
        self.results: list[tuple[str, int, bool]] = []  # (sha256, bytes, peer used MPTCP)
        self._stop = False
        self._thread = threading.Thread(target=self._serve, name="lab-sink", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(120)
        digest = hashlib.sha256()
        total = 0
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        try:
            peer_mptcp = is_mptcp(conn)
            while True:
                n = conn.recv_into(buf)
                if not n:
                    break
                digest.update(view[:n])
                total += n
            self.results.append((digest.hexdigest(), total, peer_mptcp))
            conn.sendall(_REPLY.pack(digest.digest(), total))
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        self._thread.join(2)


@dataclass
class PathSample:
    """Per-path throughput over one sampling interval."""

    t: float
    mbit: list[float]

    @property
    def total(self) -> float:
        return sum(self.mbit)


@dataclass
class TransferResult:
    sent: int
    seconds: float
    verified: bool              # the sink's sha256 and count equal ours
    mptcp: bool                 # the client socket was MPTCP (no fallback)
    subflows: int               # live subflows seen at the end (MPTCP_INFO)
    max_subflows: int           # most subflows seen while sending
    path_bytes: list[int]       # tx bytes per client path interface during the transfer
    subflow_bytes: dict[str, int] = field(default_factory=dict)  # local addr -> bytes_acked
    samples: list[PathSample] = field(default_factory=list)

    @property
    def mbit(self) -> float:
        return self.sent * 8 / self.seconds / 1e6 if self.seconds else 0.0

    def paths_used(self, min_share: float = 0.05) -> int:
        """Paths that carried at least ``min_share`` of the bytes (link counters)."""
        total = sum(self.path_bytes) or 1
        return sum(1 for b in self.path_bytes if b / total >= min_share)


def _path_tx(lab: Lab) -> list[int]:
    return [lab.client.link_bytes(p.client_if)[0] for p in lab.paths]


def timed_upload(lab: Lab, dest: tuple[str, int], seconds: float, *, mptcp: bool = True,
                 seed: int = 0, interval: float = 0.5,
                 on_sample: Callable[[PathSample], None] | None = None,
                 during: Callable[[float], None] | None = None) -> TransferResult:
    """Upload from the lab client to ``dest`` for ``seconds``; verify and measure.

    ``on_sample`` gets per-path throughput every ``interval``; ``during(elapsed)``
    is called at the same pace (a test takes a path down from there).
    """
    family = socket.AF_INET6 if ":" in dest[0] else socket.AF_INET
    with lab.client.enter():
        sock = socket.socket(family, socket.SOCK_STREAM, IPPROTO_MPTCP if mptcp else 0)
    sock.settimeout(30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data = memoryview(pattern(seed))
    digest = hashlib.sha256()
    sent = 0
    samples: list[PathSample] = []
    max_subflows = 0
    before = _path_tx(lab)
    try:
        sock.connect(dest)
        was_mptcp = is_mptcp(sock)
        start = last = time.monotonic()
        last_tx = before
        offset = 0
        while True:
            now = time.monotonic()
            if now - last >= interval:
                tx = _path_tx(lab)
                sample = PathSample(now - start, [(b - a) * 8 / (now - last) / 1e6
                                                  for a, b in zip(last_tx, tx)])
                samples.append(sample)
                last, last_tx = now, tx
                info = mptcp_info(sock) if was_mptcp else None
                if info is not None:
                    max_subflows = max(max_subflows, info.subflows_total or info.subflows + 1)
                if on_sample:
                    on_sample(sample)
                if during:
                    during(now - start)
            if now - start >= seconds:
                break
            chunk = data[offset:]
            n = sock.send(chunk)
            digest.update(chunk[:n])
            sent += n
            offset = (offset + n) % len(data)
        info = mptcp_info(sock) if was_mptcp else None
        live = (info.subflows_total or info.subflows + 1) if info is not None else 1
        max_subflows = max(max_subflows, live)
        per_subflow = {}
        if was_mptcp:
            for sf in subflows(sock):
                per_subflow[f"{sf.local[0]}->{sf.remote[0]}"] = sf.bytes_acked or 0
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while len(reply) < _REPLY.size:
            more = sock.recv(_REPLY.size - len(reply))
            if not more:
                break
            reply += more
        elapsed = time.monotonic() - start
    finally:
        sock.close()
    after = _path_tx(lab)
    verified = False
    if len(reply) == _REPLY.size:
        their_digest, their_count = _REPLY.unpack(reply)
        verified = their_digest == digest.digest() and their_count == sent
    return TransferResult(
        sent=sent, seconds=elapsed, verified=verified, mptcp=was_mptcp, subflows=live,
        max_subflows=max_subflows, path_bytes=[b - a for a, b in zip(before, after)],
        subflow_bytes=per_subflow, samples=samples)


def set_client_subflows(lab: Lab, n: int) -> None:
    """Limit the client's extra subflows (0: one path only, the initial subflow)."""
    lab.client.run(["ip", "mptcp", "limits", "set", "subflows", str(n),
                    "add_addr_accepted", "8"])


def proxy_handshake(sock: socket.socket, protocol: str, target: tuple[str, int]) -> None:
    """Ask a SOCKS5 (``socks5``, no authentication) or HTTP CONNECT
    (``http-connect``) proxy on connected ``sock`` for IPv4 ``target``; return
    once it answered success, the socket positioned at the target's first
    byte. :class:`LabError` (with the answer) when it refused or closed."""
    if protocol == "socks5":
        sock.sendall(b"\x05\x01\x00\x05\x01\x00\x01" + socket.inet_aton(target[0])
                     + target[1].to_bytes(2, "big"))
        answer = read_exact(sock, 12)
        if answer[:2] != b"\x05\x00" or answer[2:4] != b"\x05\x00":
            raise LabError(f"SOCKS5 proxy refused {target}: {answer!r}")
        return
    if protocol != "http-connect":
        raise LabError(f"no handshake for {protocol!r}")
    host = f"{target[0]}:{target[1]}"
    sock.sendall(f"CONNECT {host} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):   # byte by byte: never read past the head
        chunk = sock.recv(1)
        if not chunk:
            raise LabError(f"HTTP CONNECT proxy closed before answering: {head!r}")
        head += chunk
    if not head.startswith(b"HTTP/1.1 200"):
        raise LabError(f"HTTP CONNECT proxy refused {host}: {head[:60]!r}")


def read_exact(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes, or fewer if the peer closes first."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data
