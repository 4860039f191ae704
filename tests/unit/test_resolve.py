"""AsyncResolver: results on the reactor thread, cancellation, the bound on lookups."""

from __future__ import annotations

import threading
import time

import pytest

from mptcp_proxy.dataplane.reactor import Reactor
from mptcp_proxy.dataplane.resolve import AsyncResolver, ResolverBusy


@pytest.fixture
def reactor():
    r = Reactor()
    loop = threading.Thread(target=r.run, daemon=True)
    loop.start()
    yield r
    r.call_soon_threadsafe(r.stop)
    loop.join(5)
    r.close()


def on_loop(reactor: Reactor, fn):
    """Run ``fn`` on the reactor's thread and return its result."""
    box: list = []
    done = threading.Event()

    def call() -> None:
        try:
            box.append(fn())
        except BaseException as exc:  # handed back to the test
            box.append(exc)
        done.set()
    reactor.call_soon_threadsafe(call)
    assert done.wait(5)
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def test_results_and_errors_arrive_on_the_reactor_thread(reactor):
    def resolver(host: str, port: int) -> list[str]:
        if host == "bad":
            raise OSError("no such name")
        return ["192.0.2.1"]
    res = AsyncResolver(reactor, resolver, threads=2)
    got: list = []
    done = threading.Event()

    def callback(addresses, error) -> None:
        got.append((addresses, type(error).__name__ if error else None,
                    threading.current_thread() is loop_thread))
        if len(got) == 2:
            done.set()
    loop_thread = on_loop(reactor, threading.current_thread)
    on_loop(reactor, lambda: res.resolve("good", 80, callback))
    on_loop(reactor, lambda: res.resolve("bad", 80, callback))
    assert done.wait(5)
    assert sorted(got, key=str) == sorted([(["192.0.2.1"], None, True),
                                           (None, "OSError", True)], key=str)
    time.sleep(0.05)
    assert on_loop(reactor, lambda: res.pending) == 0
    res.close()


def test_cancelled_lookups_free_their_place_and_never_call_back(reactor):
    release = threading.Event()
    started: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        started.append(host)
        release.wait(5)
        return ["192.0.2.1"]
    res = AsyncResolver(reactor, resolver, threads=1, max_pending=3)
    calls: list = []
    lookups = [on_loop(reactor, lambda i=i: res.resolve(f"n{i}", 80, lambda a, e: calls.append(a)))
               for i in range(3)]
    with pytest.raises(ResolverBusy):
        on_loop(reactor, lambda: res.resolve("n3", 80, lambda a, e: None))
    on_loop(reactor, lambda: [lk.cancel() for lk in lookups[1:]])  # queued: never run
    release.set()
    deadline = time.monotonic() + 5
    while on_loop(reactor, lambda: res.pending) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert on_loop(reactor, lambda: res.pending) == 0
    assert started == ["n0"] and calls == [["192.0.2.1"]]
    res.close()
