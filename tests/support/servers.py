"""Small threaded test servers and a proxy runner for integration tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from tests.support.traffic import listener, recv_until_eof, send_all_and_shut


class HashServer:
    """Accepts connections; each one: read to EOF while sending ``reply``, then close
    (``mode="after-eof"``: the reply only once EOF was read).

    Records (sha256, count) of every received stream. ``reply_fn(i)`` gives the
    bytes to send on connection i (default: nothing).
    """

    def __init__(self, host: str = "127.0.0.1", mptcp: bool = False, reply_fn=None,
                 port: int = 0, mode: str = "exchange") -> None:
        self.sock = listener(host, port, mptcp=mptcp)
        self.addr = self.sock.getsockname()
        self.reply_fn = reply_fn or (lambda i: b"")
        self.mode = mode
        self.received: list[tuple[str, int]] = []
        self.peers: list[tuple] = []
        self.accepted_mptcp: list[bool] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._count = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve, name="hash-server", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, peer = self.sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            with self._lock:
                i = self._count
                self._count += 1
                self.peers.append(peer)
                self.accepted_mptcp.append(bool(conn.getsockopt(socket.SOL_TCP, 43)))
            threading.Thread(target=self._handle, args=(conn, i), daemon=True).start()

    def _handle(self, conn: socket.socket, i: int) -> None:
        conn.settimeout(60)
        try:
            reply = self.reply_fn(i)
            if self.mode == "send-close":       # send the reply, close, ignore input
                conn.sendall(reply)
                conn.close()
                return
            if self.mode == "after-eof":        # read to EOF, then reply: one way at a time
                result = recv_until_eof(conn)
                send_all_and_shut(conn, reply)
                with self._lock:
                    self.received.append(result)
                return
            sender = threading.Thread(target=send_all_and_shut, args=(conn, reply), daemon=True)
            sender.start()
            result = recv_until_eof(conn)
            sender.join(60)
            with self._lock:
                self.received.append(result)
        except OSError as exc:
            with self._lock:
                self.errors.append(exc)
        finally:
            conn.close()

    def wait_received(self, n: int, timeout: float = 10.0) -> list[tuple[str, int]]:
        """The first ``n`` received streams, once the handler threads recorded them."""
        deadline = time.monotonic() + timeout
        while len(self.received) < n:
            if self.errors:
                raise self.errors[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"server recorded {len(self.received)} of {n} streams")
            time.sleep(0.01)
        return self.received[:n]

    @property
    def count(self) -> int:
        return self._count

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        self._thread.join(2)


@dataclass
class ClosedSession:
    session: object
    reason: str
    up: int
    down: int
    duration: float


@dataclass
class ProxyRunner:
    """Runs a ProxyServer's loop in a thread (the caller may have entered a netns)."""

    server: object
    closed: list = field(default_factory=list)
    thread: threading.Thread | None = None
    netns: str | None = None   # run the loop in this namespace (upstream sockets live there)

    def _run(self) -> None:
        if self.netns is None:
            self.server.serve_forever(install_signals=False)
            return
        from mptcp_proxy.lab import netns
        with netns.enter(self.netns):
            self.server.serve_forever(install_signals=False)

    def start(self) -> "ProxyRunner":
        self.server.session_listeners.append(
            lambda s, r, u, d, t: self.closed.append(ClosedSession(s, r, u, d, t)))
        self.thread = threading.Thread(target=self._run, name="proxy", daemon=True)
        self.thread.start()
        self.server.started.wait(5)
        return self

    @property
    def addr(self) -> tuple:
        return self.server.listen_addresses()[0]

    def wait_closed(self, n: int, timeout: float = 10.0) -> list:
        deadline = time.monotonic() + timeout
        while len(self.closed) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.closed)} of {n} sessions closed")
            time.sleep(0.01)
        return self.closed

    def stop(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            self.server.shutdown_threadsafe(drain=False)
            self.thread.join(10)


@contextlib.contextmanager
def silent_upstream(lab) -> Iterator[tuple]:  # type: ignore[no-untyped-def]
    """The address of a server in ``lab`` that never answers a SYN: a listener
    whose accept queue is full (backlog 0, filled from the client node), so the
    kernel drops further SYNs and a proxy's connect times out."""
    with lab.server.enter():
        silent = listener(lab.server_addr, 0, backlog=0)
    fillers = []
    try:
        for _ in range(4):
            with lab.client.enter():
                s = socket.socket()
            s.setblocking(False)
            s.connect_ex(silent.getsockname())
            fillers.append(s)
        time.sleep(0.2)
        yield silent.getsockname()
    finally:
        for s in fillers:
            s.close()
        silent.close()
