"""Review: shutdown while upstream connects are pending must close each session once."""

from __future__ import annotations

import socket
import time

from mptcp_proxy.config import Endpoint, ForwardConfig, RelayConfig, UpstreamMode
from mptcp_proxy.server.forward import ForwardServer
from tests.support.servers import ProxyRunner


def _silent_target():
    """A TCP listener whose accept queue is full: further SYNs are dropped (connect hangs)."""
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.bind(("127.0.0.1", 0))
    lst.listen(0)
    fillers = []
    for _ in range(2):
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        c.setblocking(False)
        c.connect_ex(lst.getsockname())
        fillers.append(c)
    time.sleep(0.2)
    return lst, fillers


def test_shutdown_with_pending_connects_closes_each_session_once():
    lst, fillers = _silent_target()
    config = ForwardConfig(listen=Endpoint("127.0.0.1", 0),
                           target=Endpoint(*lst.getsockname()),
                           upstream=UpstreamMode.TCP,
                           relay=RelayConfig(connect_timeout=30.0))
    server = ForwardServer(config).start()
    proxy = ProxyRunner(server).start()
    clients = []
    try:
        for _ in range(3):
            clients.append(socket.create_connection(proxy.addr))
        deadline = time.monotonic() + 5
        while server.connecting < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.connecting == 3
        proxy.stop()
        assert not proxy.thread.is_alive()
        ids = [c.session.id for c in proxy.closed]
        assert sorted(ids) == sorted(set(ids)), f"sessions closed twice: {ids}"
        assert server.stats.closed == 3 and server.open_sessions == 0
    finally:
        for s in clients + fillers + [lst]:
            s.close()
