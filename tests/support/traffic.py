"""Test helpers: deterministic payloads, hashing senders/receivers, sockets."""

from __future__ import annotations

import hashlib
import os
import socket
import threading

IPPROTO_MPTCP = 262
CHUNK = 256 << 10


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic pseudo-random bytes (fast: repeated 1 MiB block + seed)."""
    block = hashlib.sha256(f"mptcp-proxy-{seed}".encode()).digest() * (1 << 15)  # 1 MiB
    reps, rest = divmod(size, len(block))
    return block * reps + block[:rest]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def send_all_and_shut(sock: socket.socket, data: bytes, shut: bool = True) -> None:
    view = memoryview(data)
    while view:
        n = sock.send(view[:CHUNK])
        view = view[n:]
    if shut:
        sock.shutdown(socket.SHUT_WR)


def recv_until_eof(sock: socket.socket) -> tuple[str, int]:
    """Read to EOF; return (sha256 hex, byte count)."""
    h = hashlib.sha256()
    total = 0
    while True:
        data = sock.recv(CHUNK)
        if not data:
            return h.hexdigest(), total
        h.update(data)
        total += len(data)


def listener(host: str = "127.0.0.1", port: int = 0, mptcp: bool = False,
             backlog: int = 1024) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM, IPPROTO_MPTCP if mptcp else 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(backlog)
    return s


def connect(addr: tuple, mptcp: bool = False, timeout: float = 10.0,
            source: str | None = None) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM, IPPROTO_MPTCP if mptcp else 0)
    s.settimeout(timeout)
    if source:
        s.bind((source, 0))
    s.connect(addr)
    return s


def is_mptcp(sock: socket.socket) -> bool:
    try:
        return bool(sock.getsockopt(socket.SOL_TCP, 43))
    except OSError:
        return False


class Thread(threading.Thread):
    """A thread that re-raises its exception (and returns its value) on join."""

    def __init__(self, target, *args, name: str = "test-thread") -> None:
        super().__init__(name=name, daemon=True)
        self._target_fn = target
        self._args = args
        self.result = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._target_fn(*self._args)
        except BaseException as exc:  # re-raised in join_result
            self.error = exc

    def join_result(self, timeout: float = 60.0):
        self.join(timeout)
        if self.is_alive():
            raise TimeoutError(f"{self.name} did not finish in {timeout}s")
        if self.error is not None:
            raise self.error
        return self.result


def urandom_payload(size: int) -> bytes:
    return os.urandom(size)
