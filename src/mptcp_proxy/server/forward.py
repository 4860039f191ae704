"""``forward`` mode: every accepted connection is relayed to one fixed target."""

from __future__ import annotations

import socket

from mptcp_proxy.config import ForwardConfig
from mptcp_proxy.dataplane.connect import Connector
from mptcp_proxy.dataplane.reactor import Reactor
from mptcp_proxy.server.base import ProxyServer, Session, server_arguments


class ForwardServer(ProxyServer):
    mode_name = "forward"

    def __init__(self, config: ForwardConfig, reactor: Reactor | None = None) -> None:
        super().__init__(**server_arguments(config), reactor=reactor)
        self.config = config
        # Resolved once at start: a name lookup per connection would put DNS on
        # the hot path; restart (or a future reload) picks up new addresses.
        self.target_family, self.target_sockaddr = config.target.resolve("--to")
        self.target_label = str(config.target)
        self.connector = Connector(self.reactor, config.upstream,
                                   timeout=config.relay.connect_timeout,
                                   tcp_only_ttl=config.tcp_only_ttl)

    def start(self, reuseport: bool = False) -> "ForwardServer":
        """Hold the kernel state, open the listener (in this thread's netns)."""
        self.hold_and_listen(self.config.listen, backlog=self.config.backlog,
                             reuseport=reuseport)
        return self

    def handle_accept(self, sock: socket.socket, addr: tuple, session: Session) -> None:
        session.target = self.target_label
        self.connect_and_relay(sock, session, self.target_family, self.target_sockaddr)
