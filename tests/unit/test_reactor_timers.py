"""Reactor timers: order, cancellation, and the heap not keeping cancelled entries.

Every relay arms an idle timer (300 s by default) and cancels it when the
connection closes; at thousands of connections per second a heap that only
drops cancelled entries when they come due would hold every one of them for
the whole timeout.
"""

from __future__ import annotations

import gc
import weakref

import pytest

from mptcp_proxy.dataplane.reactor import COMPACT_MIN, Reactor


@pytest.fixture
def reactor():
    r = Reactor()
    yield r
    r.close()


def run_for(reactor: Reactor, seconds: float) -> None:
    """Run the loop (and the timers due) for ``seconds``."""
    reactor.call_later(seconds, reactor.stop)
    reactor.run()


def test_cancelled_timers_do_not_pile_up(reactor):
    live = [reactor.call_later(300.0, lambda: None) for _ in range(10)]
    for _ in range(20 * COMPACT_MIN):
        reactor.call_later(300.0, lambda: None).cancel()
    # At most about as many dead entries as live ones, or COMPACT_MIN.
    assert reactor.timer_count <= len(live) + COMPACT_MIN
    assert reactor.timer_count >= len(live)


def test_live_timers_fire_in_order_after_compactions(reactor):
    fired: list[int] = []
    keep = []
    for i in range(3 * COMPACT_MIN):
        t = reactor.call_later(0.01 + i / 1_000_000, lambda i=i: fired.append(i))
        if i % 3:
            t.cancel()
        else:
            keep.append(i)
    run_for(reactor, 0.05)
    assert fired == keep
    assert reactor.timer_count == 0


def test_cancel_releases_what_the_callback_held(reactor):
    class Conn:
        pass

    conn = Conn()
    ref = weakref.ref(conn)
    reactor.call_later(300.0, lambda c=conn: c).cancel()
    del conn
    gc.collect()
    assert ref() is None


def test_cancel_after_firing_and_twice_is_harmless(reactor):
    fired = []
    t = reactor.call_later(0.01, lambda: fired.append(1))
    run_for(reactor, 0.02)
    assert fired == [1]
    t.cancel()
    t.cancel()
    # The count of dead entries stays right: a later compaction keeps live ones.
    later = [reactor.call_later(0.01, lambda: fired.append(2)) for _ in range(5)]
    for _ in range(3 * COMPACT_MIN):
        reactor.call_later(0.01, lambda: fired.append(3)).cancel()
    assert reactor.timer_count <= len(later) + COMPACT_MIN
    run_for(reactor, 0.03)
    assert fired == [1, 2, 2, 2, 2, 2]


def test_callbacks_may_cancel_timers_while_timers_run(reactor):
    """A compaction triggered from inside a callback (the run loop holds the heap)."""
    fired = []
    victims = [reactor.call_later(0.03, lambda: fired.append("victim"))
               for _ in range(2 * COMPACT_MIN)]
    survivor = reactor.call_later(0.03, lambda: fired.append("survivor"))

    def cancel_all() -> None:
        for t in victims:
            t.cancel()
        fired.append("cancelled")

    reactor.call_later(0.01, cancel_all)
    run_for(reactor, 0.05)
    assert fired == ["cancelled", "survivor"]
    assert survivor.cancelled is False
