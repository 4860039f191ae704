"""What the lab tests of in-process proxies share (the converter's in
``convert_env.py``, the SOCKS5 and HTTP CONNECT proxies' in
``tests/integration/test_app_proxy.py``): a lab with a TCP and an MPTCP hash
server, proxies started per test in the proxy ns, client sockets in the client
ns, a well-behaved client kept mid-transfer while a bad one is served, and the
``conn_log`` fixture with its log-line search.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from mptcp_proxy.config import Endpoint, RelayConfig
from mptcp_proxy.lab import Lab, PathSpec
from mptcp_proxy.lab.traffic import read_exact  # noqa: F401  (tests import it from here)
from mptcp_proxy.modes.policy import parse_networks
from tests.support.servers import HashServer, ProxyRunner
from tests.support.traffic import IPPROTO_MPTCP, sha256

SERVER_PORT = 9000
MPTCP_SERVER_PORT = 9001


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.01)


@pytest.fixture
def conn_log(caplog):
    caplog.set_level(logging.INFO, logger="mptcp_proxy.conn")
    return caplog


def log_lines(caplog, *needles: str, timeout: float = 5.0) -> list[str]:
    """The connection log lines containing every needle (waits for the server thread)."""
    def find():
        return [r.getMessage() for r in list(caplog.records)
                if r.name == "mptcp_proxy.conn" and all(n in r.getMessage() for n in needles)]
    return wait_for(find, timeout, f"log line with {needles}")


@dataclass
class LabEnv:
    """A lab with a TCP and an MPTCP hash server, and proxies started per test."""

    lab: Lab
    tcp_server: HashServer
    mptcp_server: HashServer
    runners: list[ProxyRunner] = field(default_factory=list)

    @property
    def server_addr(self) -> str:
        return self.lab.server_addr

    @property
    def proxy_addr(self) -> str:
        return self.lab.paths[0].proxy_addr

    def defaults(self, kw: dict) -> dict:
        """``kw`` with the settings every test proxy has unless told otherwise:
        an ephemeral port on the first path, the lab's networks allowed as targets."""
        k = self.lab.server_addr.split(".")[1]
        kw.setdefault("listen", Endpoint(self.proxy_addr, 0))
        kw.setdefault("allow_targets", parse_networks([f"10.{k}.0.0/16", "fd00::/8"], "t"))
        kw.setdefault("relay", RelayConfig(connect_timeout=3))
        return kw

    def run(self, make_server: Callable[[], object]) -> ProxyRunner:
        """Start the server ``make_server()`` makes in the proxy ns; stopped by ``stop()``."""
        with self.lab.proxy.enter():
            server = make_server()
        runner = ProxyRunner(server, netns=self.lab.proxy.ns).start()
        self.runners.append(runner)
        return runner

    def client(self, mptcp: bool = True, timeout: float = 10.0, *,
               v6: bool = False) -> socket.socket:
        family = socket.AF_INET6 if v6 else socket.AF_INET
        with self.lab.client.enter():
            sock = socket.socket(family, socket.SOCK_STREAM, IPPROTO_MPTCP if mptcp else 0)
        sock.settimeout(timeout)
        return sock

    def stop_all(self) -> None:
        for runner in self.runners:
            runner.stop()
        self.runners.clear()


@contextlib.contextmanager
def lab_env(make_env: Callable[[Lab, HashServer, HashServer], LabEnv], down: bytes, *,
            paths: int = 1, tcp_host: str | None = None) -> Iterator[LabEnv]:
    """A lab of ``paths`` paths whose two hash servers send ``down`` on every
    connection, and the environment ``make_env`` makes of it; all torn down after.
    The TCP server listens on ``tcp_host`` (default: the lab's server address)."""
    with Lab.create(paths=[PathSpec() for _ in range(paths)]) as lab:
        with lab.server.enter():
            tcp = HashServer(tcp_host or lab.server_addr, mptcp=False, port=SERVER_PORT,
                             reply_fn=lambda i: down)
            mp = HashServer(lab.server_addr, mptcp=True, port=MPTCP_SERVER_PORT,
                            reply_fn=lambda i: down)
        e = make_env(lab, tcp, mp)
        try:
            yield e
        finally:
            e.stop_all()
            tcp.close()
            mp.close()


def relay_rest(sock: socket.socket, up: bytes, leftover: bytes = b"", *,
               replied: threading.Event | None = None,
               hold: threading.Event | None = None) -> bytes:
    """After a proxy handshake: set ``replied``, wait for ``hold``, then send ``up``
    and a FIN while reading to EOF; returns ``leftover`` + every byte read."""
    if replied is not None:
        replied.set()
    if hold is not None:
        assert hold.wait(20), "the bad client never finished"
    sender = threading.Thread(target=lambda: (sock.sendall(up),
                                              sock.shutdown(socket.SHUT_WR)))
    sender.start()
    down = leftover + recv_all(sock)
    sender.join(20)
    return down


class GoodClientBase:
    """A well-behaved client whose connection is open and relaying while a bad one
    is served: started first, it finishes its upload only after ``check()``.

    A subclass's ``transfer(*args)`` makes the connection, passing ``replied`` and
    ``hold`` to ``relay_rest``; its ``check()`` verifies what ``finish()`` returns.
    """

    def __init__(self, env: LabEnv, up: bytes, *args) -> None:
        self.env = env
        self.up = up
        self.replied = threading.Event()
        self.hold = threading.Event()
        self.result = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=args, daemon=True)
        self.thread.start()
        if not self.replied.wait(10):
            self.hold.set()
            raise AssertionError(f"good client got no reply: {self.error!r}")

    def transfer(self, *args):
        raise NotImplementedError

    def _run(self, *args) -> None:
        try:
            self.result = self.transfer(*args)
        except BaseException as exc:  # re-raised in finish()
            self.error = exc
            self.replied.set()

    def finish(self):
        """Let it finish; its ``transfer``'s result (None if it never ended)."""
        self.hold.set()
        self.thread.join(30)
        if self.error is not None:
            raise self.error
        return self.result

    def wait_uploaded(self) -> None:
        """Until the TCP server has received the upload whole."""
        want = (sha256(self.up), len(self.up))
        wait_for(lambda: want in self.env.tcp_server.received, 10, "server got good bytes")
