"""Review: bytes carried in the converter's SYN to the server (upstream TFO) count in bytes_up."""

from __future__ import annotations

import socket

from tests.support.convert_env import (  # noqa: F401  (env is a fixture)
    DOWN, TCP_FASTOPEN, env, read_reply, request, tfo_send,
)
from tests.support.lab_env import recv_all
from tests.support.servers import HashServer
from tests.support.traffic import payload, sha256


def test_bytes_up_counts_the_bytes_in_the_upstream_syn(env):  # noqa: F811
    env.lab.server.sysctl("net.ipv4.tcp_fastopen", 3)
    with env.lab.server.enter():
        tfo_server = HashServer(env.server_addr, mptcp=True, port=9101,
                                reply_fn=lambda i: DOWN)
    tfo_server.sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN, 16)
    try:
        runner = env.start(tfo_no_cookie=True)
        ups = [payload(20_000, 60 + i) for i in range(2)]
        for up in ups:
            with env.client() as sock:
                tfo_send(sock, request(env.server_addr, 9101) + up, runner.addr)
                _, leftover = read_reply(sock)
                sock.shutdown(socket.SHUT_WR)
                assert leftover + recv_all(sock) == DOWN
        assert tfo_server.wait_received(2) == [(sha256(u), len(u)) for u in ups]
        sessions = sorted(runner.wait_closed(2), key=lambda c: c.session.id)
        assert [c.session.extra["upstream_tfo"] for c in sessions] == ["no", "yes"]
        assert [c.up for c in sessions] == [len(u) for u in ups]
    finally:
        tfo_server.close()
