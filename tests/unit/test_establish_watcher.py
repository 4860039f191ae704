"""EstablishWatcher's schedule, without sockets: bounded checks per tick, backoff, give-up."""

from __future__ import annotations

import socket

import pytest

from mptcp_proxy.dataplane import establish
from mptcp_proxy.dataplane.establish import EstablishWatcher
from mptcp_proxy.observe.sockinfo import TCP_ESTABLISHED, TCP_SYN_RECV


@pytest.fixture(autouse=True)
def fake_tcp_state(monkeypatch):
    """The watcher reads the state with observe.sockinfo.tcp_state (a getsockopt
    on the fd); these sockets have none."""
    monkeypatch.setattr(establish, "tcp_state", lambda sock: sock.read_state())


class FakeReactor:
    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list = []

    def call_later(self, delay, callback):
        timer = type("T", (), {"cancel": lambda self: None})()
        self.timers.append((self.now + delay, callback))
        return timer

    def run_until(self, t: float) -> None:
        while self.timers:
            self.timers.sort(key=lambda x: x[0])
            when, callback = self.timers[0]
            if when > t:
                return
            self.timers.pop(0)
            self.now = when
            callback()


class FakeSock:
    def __init__(self, fd: int, state: int = TCP_SYN_RECV) -> None:
        self.fd = fd
        self.state = state
        self.checks = 0
        self.pushes = 0

    def fileno(self) -> int:
        return self.fd

    def read_state(self) -> int:
        self.checks += 1
        return self.state

    def setsockopt(self, level, name, value):
        assert name == socket.TCP_NODELAY
        self.pushes += 1


def test_checks_per_tick_are_bounded_and_slow_down_after_the_fast_period():
    reactor = FakeReactor()
    watcher = EstablishWatcher(reactor)  # type: ignore[arg-type]
    socks = [FakeSock(100 + i) for i in range(1000)]
    for s in socks:
        watcher.add(s)  # type: ignore[arg-type]
    reactor.run_until(0.0015)                       # the first tick
    assert sum(s.checks for s in socks) == establish.MAX_CHECKS_PER_TICK
    reactor.run_until(establish.FAST_FOR)
    fast = sum(s.checks for s in socks)
    assert fast <= establish.MAX_CHECKS_PER_TICK * 201
    reactor.run_until(establish.FAST_FOR + 1.0)     # one second of backed-off checks
    slow = sum(s.checks for s in socks) - fast
    # Intervals doubling to 50 ms: about 20-30 checks a socket per second, not 1000.
    assert slow <= 1000 * 40, slow
    socks[7].state = TCP_ESTABLISHED
    reactor.run_until(establish.FAST_FOR + 1.2)
    assert socks[7].pushes == 1 and watcher.pushed == 1
    reactor.run_until(establish.GIVE_UP + 1)
    assert len(watcher) == 0 and watcher.expired == 999
    assert sum(s.pushes for s in socks) == 1        # SYN_RECV sockets are never pushed


def test_established_at_the_first_check_is_pushed_within_a_tick():
    reactor = FakeReactor()
    watcher = EstablishWatcher(reactor)  # type: ignore[arg-type]
    s = FakeSock(5, TCP_ESTABLISHED)
    watcher.add(s)  # type: ignore[arg-type]
    reactor.run_until(0.0011)
    assert s.pushes == 1 and len(watcher) == 0
