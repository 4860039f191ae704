"""What the modes with a handshake in front of the relay share (convert, socks5,
http-connect, and the client agent's SOCKS5 and captured connections).

Between accept and relay a client connection is a :class:`Handshaking`: its
socket, one deadline, and, when refused, the refusal being sent. The ending
is the same in every protocol (PROTOCOLS.md: errors travel in the stream,
then a close): send the reply, ``shutdown(SHUT_WR)``, read and drop what the
client still sends until its FIN (closing with unread data would send a RST),
at most ``CLOSE_LINGER`` seconds, then close and log. :class:`HandshakeServer`
implements that ending, the bookkeeping of handshakes in progress (per
client, for limits) and the abort at shutdown; a mode implements
``on_handshake_event`` for its own states and ``cancel_work`` for what it
started (an upstream connect, a name lookup, the agent's converter socket).
"""

from __future__ import annotations

import logging
import socket

from mptcp_proxy.dataplane.reactor import EPOLLIN, EPOLLOUT, Timer
from mptcp_proxy.modes.policy import IPAddress, normalize, parse_address
from mptcp_proxy.observe.addresses import local_addresses
from mptcp_proxy.server.base import ProxyServer, Session, client_error_reason, drain_until_eof

ADDRESS_REFRESH = 30.0        # seconds between re-reads of the proxy's own addresses
HINT_INTERVAL = 60.0          # seconds between two hints of one kind to the operator
CLOSE_LINGER = 2.0            # seconds to wait for the client's FIN after a reply
DRAIN_READS = 16              # reads per event while draining a refused client
READ_SIZE = 4096

log = logging.getLogger("mptcp_proxy.server")

CLOSING = "closing"
DONE = "done"


class Handshaking:
    """One client connection between accept and relay (or close)."""

    __slots__ = ("sock", "fd", "session", "key", "started", "state", "deadline", "out",
                 "shut", "linger", "reason", "watched")

    def __init__(self, sock: socket.socket, session: Session, key: object, started: float,
                 state: str) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.session = session
        self.key = key                 # the client, for the per-client count
        self.started = started
        self.state = state
        self.deadline: Timer | None = None
        self.out = b""
        self.shut = False
        self.linger: Timer | None = None
        self.reason = ""
        self.watched = False


class HandshakeServer(ProxyServer):
    """A ProxyServer whose connections go through a handshake before the relay."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.pending: dict[int, Handshaking] = {}
        self.pending_by_client: dict[object, int] = {}
        self._refresh_timer: Timer | None = None
        self._hinted: dict[str, float] = {}

    # -- advice for the operator -------------------------------------------------------
    def hint(self, kind: str, logger: logging.Logger, message: str) -> bool:
        """Log ``message`` (INFO, beside the connection lines) unless a hint of
        ``kind`` was logged less than ``HINT_INTERVAL`` seconds ago: a refusal
        the operator can fix is explained once, not once per connection."""
        now = self.reactor.now
        last = self._hinted.get(kind)
        if last is not None and now - last < HINT_INTERVAL:
            return False
        self._hinted[kind] = now
        logger.info("%s (said at most once a minute)", message)
        return True

    # -- to be provided by modes ----------------------------------------------------
    def on_handshake_event(self, conn: Handshaking, events: int) -> None:
        raise NotImplementedError

    def cancel_work(self, conn: Handshaking) -> None:
        """Cancel what the mode started for ``conn`` (connects, lookups)."""

    def own_addresses_changed(self, own: frozenset[IPAddress],
                              broadcast: frozenset[IPAddress]) -> None:
        """Give the mode's target policy a fresh view of the proxy's addresses."""
        raise NotImplementedError

    # -- the proxy's own addresses ------------------------------------------------------
    def refresh_own_addresses(self) -> None:
        """Read this namespace's addresses (and the listeners') now and every
        ``ADDRESS_REFRESH`` seconds: they come and go (DHCP, path changes), and a
        target that is one of them would loop back into the proxy."""
        self._refresh_timer = None
        if self._draining:
            return
        try:
            own, broadcast = local_addresses()
            for sockname in self.listen_addresses():
                address = normalize(parse_address(sockname[0]))
                if not address.is_unspecified:
                    own.add(address)
            self.own_addresses_changed(frozenset(own), frozenset(broadcast))
        except OSError as exc:
            log.warning("could not re-read local addresses: %s", exc)
        self._refresh_timer = self.reactor.call_later(ADDRESS_REFRESH, self.refresh_own_addresses)

    # -- bookkeeping ------------------------------------------------------------------
    def track(self, conn: Handshaking) -> int:
        """Count ``conn`` as pending; returns how many its client had before."""
        self.pending[conn.session.id] = conn
        before = self.pending_by_client.get(conn.key, 0)
        self.pending_by_client[conn.key] = before + 1
        return before

    def forget(self, conn: Handshaking) -> None:
        if self.pending.pop(conn.session.id, None) is None:
            return
        left = self.pending_by_client.get(conn.key, 1) - 1
        if left > 0:
            self.pending_by_client[conn.key] = left
        else:
            self.pending_by_client.pop(conn.key, None)

    def watch(self, conn: Handshaking, mask: int) -> None:
        if conn.watched:
            self.reactor.set_mask(conn.fd, mask)
        else:
            self.reactor.register(conn.fd, mask,
                                  lambda ev, c=conn: self.on_handshake_event(c, ev))
            conn.watched = True

    def unwatch(self, conn: Handshaking) -> None:
        if conn.watched:
            self.reactor.unregister(conn.fd)
            conn.watched = False

    def cancel_deadline(self, conn: Handshaking) -> None:
        if conn.deadline is not None:
            conn.deadline.cancel()
            conn.deadline = None

    def send_small(self, conn: Handshaking, data: bytes) -> bool:
        """Handshake replies are a few bytes on a fresh socket: they fit, or the peer is broken."""
        try:
            sent = conn.sock.send(data)
        except OSError:
            sent = -1
        if sent == len(data):
            return True
        self.abort(conn, "client-error")
        return False

    # -- endings --------------------------------------------------------------------
    def close_with(self, conn: Handshaking, reply: bytes, reason: str) -> None:
        """Send ``reply`` (may be empty), FIN, drain the client until its FIN, close."""
        self.cancel_deadline(conn)
        self.cancel_work(conn)
        conn.state = CLOSING
        conn.reason = reason
        conn.out = reply
        conn.linger = self.reactor.call_later(CLOSE_LINGER, lambda: self.finish(conn))
        # (Re-)arm read interest: the socket may be parked with none.
        self.watch(conn, EPOLLIN)
        self._flush(conn)

    def on_closing_event(self, conn: Handshaking) -> None:
        if conn.out:
            self._flush(conn)
        else:
            self._drain(conn)

    def _flush(self, conn: Handshaking) -> None:
        while conn.out:
            try:
                n = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                self.reactor.set_mask(conn.fd, EPOLLOUT)  # reading resumes once it is sent
                return
            except OSError as exc:
                conn.reason += f" ({client_error_reason(exc)})"
                self.finish(conn)
                return
            conn.out = conn.out[n:]
        if not conn.shut:
            conn.shut = True
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # already reset: the drain below ends it
        self.reactor.set_mask(conn.fd, EPOLLIN)
        self._drain(conn)

    def _drain(self, conn: Handshaking) -> None:
        if drain_until_eof(conn.sock, DRAIN_READS, READ_SIZE):
            self.finish(conn)

    def finish(self, conn: Handshaking) -> None:
        """Close after a reply (a FIN, not a RST) and log."""
        if conn.state == DONE:
            return
        conn.state = DONE
        self._end(conn)
        self.reject(conn.sock, conn.session, conn.reason, abort=False,
                    duration=self.reactor.now - conn.started)

    def abort(self, conn: Handshaking, reason: str, reset: bool = True) -> None:
        """Close at once without a reply (the client broke off, a deadline, shutdown)."""
        if conn.state == DONE:
            return
        conn.state = DONE
        conn.reason = reason
        self.cancel_work(conn)
        self._end(conn)
        self.reject(conn.sock, conn.session, reason, abort=reset,
                    duration=self.reactor.now - conn.started)

    def _end(self, conn: Handshaking) -> None:
        self.cancel_deadline(conn)
        if conn.linger is not None:
            conn.linger.cancel()
            conn.linger = None
        self.unwatch(conn)
        self.forget(conn)

    def hand_to_relay(self, conn: Handshaking) -> None:
        """``conn`` leaves the handshake for the relay, which takes its fd over."""
        if conn.deadline is not None:
            self.cancel_deadline(conn)
        self.forget(conn)
        conn.state = DONE
        conn.watched = False  # the relay's register() re-owns the fd (one epoll MOD)

    def abort_pending(self) -> None:
        super().abort_pending()
        for conn in list(self.pending.values()):
            self.abort(conn, "shutdown")
        if self._refresh_timer is not None:
            self._refresh_timer.cancel()
            self._refresh_timer = None
