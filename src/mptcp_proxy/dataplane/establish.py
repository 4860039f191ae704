"""Release bytes written on a TCP Fast Open MPTCP socket before its handshake completed.

Measured on Linux 6.18 (tests/integration/test_establish.py): a listener with
TCP_FASTOPEN hands out the MPTCP socket as soon as the client's SYN with data
arrives, in SYN_RECV. Bytes written to it then are not sent before the
client's third ACK. Earlier 6.18 builds went further and kept them queued
after that ACK, until something else pushed the socket (another write, or
setting TCP_NODELAY or TCP_CORK; setting one while still in SYN_RECV does not
help), so a converter answering a 0-RTT request from a client more than a
fraction of a millisecond away waited forever. 6.18.44 sends them at the
third ACK by itself; the probe in the test records which way the running
kernel goes. The watcher stays because it costs one getsockopt per
TFO-accepted socket and tick and the product must work on either build.

:class:`EstablishWatcher` watches such sockets on one shared timer (a
getsockopt per socket and tick) and, once the handshake is complete, sets
TCP_NODELAY again, which pushes what is queued. Sockets leave the watch when
established, closed, or after ``give_up`` seconds (a spoofed SYN never
completes).
"""

from __future__ import annotations

import logging
import socket

from mptcp_proxy.dataplane.reactor import Reactor, Timer
from mptcp_proxy.observe.sockinfo import TCP_SYN_RECV, SockInfoError, tcp_state

log = logging.getLogger(__name__)

TICK = 0.001                 # seconds between checks: the added latency is at most this
FAST_FOR = 0.2               # seconds of 1-tick checks (round trips up to 200 ms)
SLOW_MAX = 0.05              # then the interval doubles up to this
MAX_CHECKS_PER_TICK = 256    # a SYN flood with data must not turn the loop into a poller
GIVE_UP = 30.0               # seconds: lost ACKs and SYN-ACK retransmits fit; spoofs do not


class _Watched:
    __slots__ = ("sock", "added", "deadline", "next_at", "interval")

    def __init__(self, sock: socket.socket, now: float, give_up: float, tick: float) -> None:
        self.sock = sock
        self.added = now
        self.deadline = now + give_up
        self.next_at = now + tick
        self.interval = tick


class EstablishWatcher:
    """Pushes queued bytes of TFO-accepted sockets once their handshake completes.

    Each socket is checked every tick for its first ``FAST_FOR`` seconds, then
    with a doubling interval; at most ``MAX_CHECKS_PER_TICK`` checks run per
    tick (the rest wait for the next), so spoofed SYNs cost bounded time.
    """

    def __init__(self, reactor: Reactor, tick: float = TICK, give_up: float = GIVE_UP) -> None:
        self.reactor = reactor
        self.tick = tick
        self.give_up = give_up
        self._watched: dict[int, _Watched] = {}
        self._timer: Timer | None = None
        self.pushed = 0
        """Sockets pushed after their handshake completed."""
        self.expired = 0
        """Sockets given up on (handshake never completed within ``give_up``)."""

    def __len__(self) -> int:
        return len(self._watched)

    def watch(self, sock: socket.socket) -> bool:
        """Watch ``sock`` if its handshake is still in progress; True if it is."""
        try:
            if tcp_state(sock) != TCP_SYN_RECV:
                return False
        except (OSError, SockInfoError):
            return False
        self.add(sock)
        return True

    def add(self, sock: socket.socket) -> None:
        """Watch ``sock``, known by the caller to be in SYN_RECV."""
        self._watched[sock.fileno()] = _Watched(sock, self.reactor.now, self.give_up, self.tick)
        if self._timer is None:
            self._timer = self.reactor.call_later(self.tick, self._check)

    def forget(self, sock: socket.socket) -> None:
        """Stop watching (call before closing ``sock``: its fd number may be reused)."""
        fd = sock.fileno()
        if fd >= 0:
            entry = self._watched.get(fd)
            if entry is not None and entry.sock is sock:
                del self._watched[fd]

    def close(self) -> None:
        self._watched.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        now = self.reactor.now
        checks = 0
        for fd, w in list(self._watched.items()):
            if w.next_at > now:
                continue
            if checks >= MAX_CHECKS_PER_TICK:
                break
            checks += 1
            sock = w.sock
            if sock.fileno() != fd:      # closed (and maybe reused) behind our back
                del self._watched[fd]
                continue
            try:
                state = tcp_state(sock)
            except (OSError, SockInfoError):
                del self._watched[fd]
                continue
            if state == TCP_SYN_RECV and now < w.deadline:
                if now - w.added >= FAST_FOR:
                    w.interval = min(w.interval * 2, SLOW_MAX)
                w.next_at = now + w.interval
                continue
            del self._watched[fd]
            if state == TCP_SYN_RECV:
                # (Pushing in SYN_RECV does not help: measured, see the module doc.)
                self.expired += 1
                log.debug("fd %d: handshake not completed in %.0fs", fd, self.give_up)
                continue
            self.pushed += 1
            try:
                # Past SYN_RECV the handshake is done (or the peer closed);
                # setting TCP_NODELAY pushes what is queued.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        if self._watched:
            self._timer = self.reactor.call_later(self.tick, self._check)
