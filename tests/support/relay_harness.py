"""A relay engine on its own reactor thread, fed with real loopback socket pairs."""

from __future__ import annotations

import fcntl
import socket
import struct
import sys
import termios
import threading
import time

from mptcp_proxy.dataplane.reactor import Reactor
from mptcp_proxy.dataplane.relay import Relay, RelayEngine

from tests.support.traffic import connect, listener


class RelayHarness:
    """``pair()`` gives (client, server, relay): client <-> [relay] <-> server."""

    def __init__(self, *, splice: bool, client_mptcp: bool = True,
                 server_mptcp: bool = False, **engine_kw) -> None:
        self.reactor = Reactor()
        self.engine = RelayEngine(self.reactor, splice=splice, observer=self, **engine_kw)
        self.client_mptcp = client_mptcp
        self.server_mptcp = server_mptcp
        self.closed: list[Relay] = []
        self._closed_cv = threading.Condition()
        self.front = listener(mptcp=client_mptcp)
        self.back = listener(mptcp=server_mptcp)
        self._thread = threading.Thread(target=self.reactor.run, name="reactor", daemon=True)
        self._thread.start()
        self._mine: list[socket.socket] = []

    # observer protocol
    def relay_closing(self, relay: Relay) -> None:
        pass

    def relay_first_eof(self, relay: Relay) -> None:
        pass

    def relay_closed(self, relay: Relay) -> None:
        with self._closed_cv:
            self.closed.append(relay)
            self._closed_cv.notify_all()

    def run_in_loop(self, fn, timeout: float = 10.0):
        done = threading.Event()
        box: list = []

        def call() -> None:
            try:
                box.append(fn())
            finally:
                done.set()

        self.reactor.call_soon_threadsafe(call)
        if not done.wait(timeout):
            raise TimeoutError("reactor did not run the call")
        return box[0] if box else None

    def pair(self, initial_to_upstream: bytes = b"", initial_to_client: bytes = b"",
             probe: bool = False, server_first: bytes = b"", server_reset: bool = False):
        """``server_first``: bytes the server sent that wait at the proxy when the
        relay starts; ``server_reset``: the server reset the connection by then."""
        client = connect(self.front.getsockname(), mptcp=self.client_mptcp)
        proxy_a, _ = self.front.accept()
        proxy_b = connect(self.back.getsockname(), mptcp=self.server_mptcp)
        server, _ = self.back.accept()
        for s in (proxy_a, proxy_b):
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.settimeout(30)
        server.settimeout(30)
        self._mine += [client, server]
        if server_first:
            server.sendall(server_first)
            _wait_queued(proxy_b, len(server_first))
        if server_reset:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            server.close()
            deadline = time.monotonic() + 5
            # (Not SO_ERROR: reading it would clear the reset the relay must see.)
            while _tcp_state(proxy_b) != TCP_CLOSE and time.monotonic() < deadline:
                time.sleep(0.005)
        relay = self.run_in_loop(lambda: self.engine.relay(
            proxy_a, proxy_b, initial_to_upstream=initial_to_upstream,
            initial_to_client=initial_to_client, probe_upstream_close=probe))
        return client, server, relay

    def wait_closed(self, relay: Relay, timeout: float = 10.0) -> Relay:
        deadline = time.monotonic() + timeout
        with self._closed_cv:
            while relay not in self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"relay not closed after {timeout}s")
                self._closed_cv.wait(left)
        return relay

    def close(self) -> None:
        def stop() -> None:
            self.engine.close()
            self.reactor.stop()
        self.reactor.call_soon_threadsafe(stop)
        self._thread.join(10)
        self.reactor.close()
        for s in self._mine + [self.front, self.back]:
            s.close()


TCP_CLOSE = 7


def _tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_TCP, socket.TCP_INFO, 8)[0]


def _wait_queued(sock: socket.socket, size: int, timeout: float = 5.0) -> None:
    """Until ``size`` bytes wait in ``sock``'s receive queue (FIONREAD)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queued = int.from_bytes(fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4),
                                sys.byteorder)
        if queued >= size:
            return
        time.sleep(0.002)
    raise TimeoutError(f"{size} bytes never arrived at the proxy")
