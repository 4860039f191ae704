"""Benchmark-only: the least work a Transport Converter can do per connection.

    python benchmarks/_floor_convert.py --listen 0.0.0.0:7103 --to HOST:PORT

Used by ``benchmarks/convert.py`` as scenario (c0). It runs on the same data
plane as every mode (ProxyServer, Connector, relay) and does what no
converter can avoid on this kernel: an MPTCP listener with TCP Fast Open;
one TCP_INFO read at accept, to hand a socket accepted before the client's
third ACK to the EstablishWatcher (without it the reply would never leave
once the client is further away than the server: ``dataplane/establish.py``);
one read of the client's Convert message; an upstream connect; the 4-byte
confirmation queued in front of the server's bytes (``start_relay(reply=)``,
as the real converter does); the relay. It does not decode the message (the
target is fixed), check policy, count pending handshakes, keep handshake
state or log, so (c0)/(f) is the ceiling any converter built on this data
plane can reach on the machine: it separates the converter's own code from
the kernel's work for the message and the reply. Not a product: it answers
every client with success whatever it sent.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from mptcp_proxy.config import Endpoint, RelayConfig, UpstreamMode  # noqa: E402
from mptcp_proxy.dataplane.connect import ConnectResult, Connector  # noqa: E402
from mptcp_proxy.dataplane.establish import EstablishWatcher  # noqa: E402
from mptcp_proxy.modes.convert import BARE_REPLY  # noqa: E402
from mptcp_proxy.server.base import ProxyServer, Session, open_listener  # noqa: E402

TCP_FASTOPEN = 23
TCP_FASTOPEN_NO_COOKIE = 34
READ_SIZE = 4096


class FloorConverter(ProxyServer):
    mode_name = "floor-convert"

    def __init__(self, listen: Endpoint, target: Endpoint) -> None:
        super().__init__(RelayConfig(), log_connections=False)
        self.connector = Connector(self.reactor, UpstreamMode.TCP)
        self.establish = EstablishWatcher(self.reactor)
        self.family, self.sockaddr = target.resolve("--to")
        listener = open_listener(listen)
        listener.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN, 4096)
        listener.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, 1)
        self.add_listener(listener)

    def handle_accept(self, sock: socket.socket, addr: tuple, session: Session) -> None:
        self.establish.watch(sock)   # one TCP_INFO read; watched if still in SYN_RECV
        try:
            data = sock.recv(READ_SIZE)   # the Convert message, not looked at
        except OSError:
            data = b""
        if not data:  # (c0) clients always send it in the SYN: nothing to wait for
            self.reject(sock, session, "no-syn-data")
            return

        def connected(result: ConnectResult) -> None:
            if result.error is not None:
                self.reject(sock, session, f"upstream-{result.error.reason}")
                return
            self.start_relay(sock, result, session, reply=BARE_REPLY)

        self.connector.connect(self.family, self.sockaddr, connected)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, type=Endpoint.parse)
    ap.add_argument("--to", required=True, type=Endpoint.parse)
    args = ap.parse_args()
    FloorConverter(args.listen, args.to).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
