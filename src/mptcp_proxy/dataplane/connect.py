"""Non-blocking upstream connections: MPTCP first, TCP fallback, with a timeout.

The fallback-close trap (docs/KERNEL-FACTS.md): an outbound MPTCP socket that fell back
to TCP can, rarely, miss the server's FIN. The connector therefore (1) reports
whether the connection really is MPTCP (TCP_IS_MPTCP), (2) remembers targets that
fell back and uses plain TCP for them for ``tcp_only_ttl`` seconds in ``auto``
mode, and (3) tells the caller to arm the relay's close probe for fallen-back
sockets.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections import OrderedDict
from typing import Callable

from mptcp_proxy.config import UpstreamMode
from mptcp_proxy.dataplane.pipes import RESOURCE_ERRNOS
from mptcp_proxy.dataplane.reactor import EPOLLOUT, Reactor, Timer
from mptcp_proxy.errors import UpstreamError
from mptcp_proxy.observe.sockinfo import IPPROTO_MPTCP, is_mptcp

log = logging.getLogger(__name__)

REFUSED = "refused"
UNREACHABLE = "unreachable"
TIMEOUT = "timeout"
NETWORK = "network"
RESOURCES = "resources"

IP_TRANSPARENT = 19  # <linux/in.h>; missing from Python's socket module

_REASON_BY_ERRNO = {
    errno.ECONNREFUSED: REFUSED,
    errno.ECONNRESET: REFUSED,
    errno.EHOSTUNREACH: UNREACHABLE,
    errno.ENETUNREACH: UNREACHABLE,
    errno.EADDRNOTAVAIL: UNREACHABLE,
    errno.ETIMEDOUT: TIMEOUT,
}


def upstream_error(err: int, target: str) -> UpstreamError:
    if err in RESOURCE_ERRNOS:
        reason = RESOURCES
    else:
        reason = _REASON_BY_ERRNO.get(err, NETWORK)
    name = errno.errorcode.get(err, str(err))
    return UpstreamError(reason, f"connect to {target}: {name}", errno=err)


class TcpOnlyCache:
    """Targets that answered an MPTCP SYN without MPTCP, remembered for a while."""

    def __init__(self, ttl: float, max_entries: int = 65536) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._expiry: OrderedDict[tuple, float] = OrderedDict()

    def add(self, target: tuple, now: float) -> None:
        self._expiry[target] = now + self.ttl
        self._expiry.move_to_end(target)
        while len(self._expiry) > self.max_entries:
            self._expiry.popitem(last=False)

    def __contains__(self, item: tuple) -> bool:
        target, now = item
        expiry = self._expiry.get(target)
        if expiry is None:
            return False
        if expiry <= now:
            del self._expiry[target]
            return False
        return True

    def __len__(self) -> int:
        return len(self._expiry)


class ConnectResult:
    """What the caller learns about a finished connection attempt."""

    __slots__ = ("sock", "error", "requested_mptcp", "mptcp", "early_sent")

    def __init__(self, sock: socket.socket | None, error: UpstreamError | None,
                 requested_mptcp: bool, mptcp: bool, early_sent: int = 0) -> None:
        self.sock = sock
        self.error = error
        self.requested_mptcp = requested_mptcp
        self.mptcp = mptcp
        # Bytes of ``early_data`` already queued on the socket (in the SYN with
        # TCP Fast Open, or right behind it): the caller must not send them again.
        self.early_sent = early_sent

    @property
    def fell_back(self) -> bool:
        """Asked for MPTCP, got TCP: the relay must arm its close probe."""
        return self.requested_mptcp and not self.mptcp


ConnectCallback = Callable[[ConnectResult], None]


class PendingConnect:
    __slots__ = ("connector", "sock", "fd", "target", "callback", "timer",
                 "requested_mptcp", "label", "done", "early_sent")

    def __init__(self, connector: "Connector", sock: socket.socket, target: tuple,
                 callback: ConnectCallback, requested_mptcp: bool, label: str) -> None:
        self.connector = connector
        self.sock = sock
        self.fd = sock.fileno()
        self.target = target
        self.callback = callback
        self.requested_mptcp = requested_mptcp
        self.label = label
        self.timer: Timer | None = None
        self.done = False
        self.early_sent = 0

    def on_writable(self, _events: int) -> None:
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(upstream_error(err, self.label))
            return
        self._finish()

    def on_timeout(self) -> None:
        self.timer = None
        if not self.done:
            self._fail(UpstreamError(TIMEOUT, f"connect to {self.label}: timed out",
                                     errno=errno.ETIMEDOUT))

    def cancel(self) -> None:
        if not self.done:
            self._cleanup()
            self.sock.close()

    def _cleanup(self) -> None:
        self.done = True
        self.connector.reactor.unregister(self.fd)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _fail(self, error: UpstreamError) -> None:
        self._cleanup()
        self.sock.close()
        self.callback(ConnectResult(None, error, self.requested_mptcp, False))

    def _finish(self) -> None:
        self._cleanup()
        mptcp = self.requested_mptcp and is_mptcp(self.sock)
        if self.requested_mptcp and not mptcp:
            self.connector.note_fallback(self.target)
        self.callback(ConnectResult(self.sock, None, self.requested_mptcp, mptcp,
                                    self.early_sent))


class Connector:
    """Opens upstream connections on a reactor."""

    def __init__(self, reactor: Reactor, mode: UpstreamMode = UpstreamMode.AUTO, *,
                 timeout: float = 10.0, tcp_only_ttl: float = 600.0,
                 nodelay: bool = True, transparent: bool = False) -> None:
        self.reactor = reactor
        self.mode = mode
        self.timeout = timeout
        self.nodelay = nodelay
        # IP_TRANSPARENT on every upstream socket: ``source`` may then be a
        # foreign address (a transparent proxy keeping the client's address).
        self.transparent = transparent
        self.tcp_only = TcpOnlyCache(tcp_only_ttl)
        # Called when no socket can be made (EMFILE, ENFILE, ENOBUFS, ENOMEM):
        # the server stops accepting for a moment, as when accept() fails so.
        self.out_of_resources: Callable[[], None] | None = None
        self.mptcp_available = True
        self.fallbacks = 0

    def note_fallback(self, target: tuple) -> None:
        self.fallbacks += 1
        if self.mode is UpstreamMode.AUTO:
            self.tcp_only.add(target, self.reactor.now)

    def wants_mptcp(self, target: tuple) -> bool:
        if self.mode is UpstreamMode.TCP or not self.mptcp_available:
            return False
        if self.mode is UpstreamMode.AUTO and (target, self.reactor.now) in self.tcp_only:
            return False
        return True

    def connect(self, family: int, sockaddr: tuple, callback: ConnectCallback,
                source: tuple | None = None, early_data: bytes = b"") -> PendingConnect | None:
        """Start connecting; ``callback`` runs exactly once, possibly before this returns
        (then None is returned).

        ``early_data`` is offered to the SYN with TCP Fast Open (needs the client
        bit of net.ipv4.tcp_fastopen); ``ConnectResult.early_sent`` says how many
        of its bytes the socket took, the caller sends the rest after connecting.
        """
        label = _label(family, sockaddr)
        target = (sockaddr[0], sockaddr[1])
        want_mptcp = self.wants_mptcp(target)
        try:
            sock = self._socket(family, want_mptcp)
        except OSError as exc:
            if exc.errno in RESOURCE_ERRNOS and self.out_of_resources is not None:
                self.out_of_resources()
            callback(ConnectResult(None, upstream_error(exc.errno or 0, label), want_mptcp, False))
            return None
        if sock.proto != IPPROTO_MPTCP:
            want_mptcp = False
        try:
            if source is not None:
                sock.bind(source)
            sent, err = _fastopen(sock, sockaddr, early_data) if early_data else (0, None)
            if err is None:
                err = sock.connect_ex(sockaddr)
        except OSError as exc:
            sock.close()
            callback(ConnectResult(None, upstream_error(exc.errno or 0, label), want_mptcp, False))
            return None
        pending = PendingConnect(self, sock, target, callback, want_mptcp, label)
        pending.early_sent = sent
        if err not in (0, errno.EINPROGRESS):
            pending.done = True
            sock.close()
            callback(ConnectResult(None, upstream_error(err, label), want_mptcp, False))
            return None
        self.reactor.register(pending.fd, EPOLLOUT, pending.on_writable)
        pending.timer = self.reactor.call_later(self.timeout, pending.on_timeout)
        return pending

    def _socket(self, family: int, mptcp: bool) -> socket.socket:
        sock = None
        if mptcp:
            try:
                sock = socket.socket(family, socket.SOCK_STREAM, IPPROTO_MPTCP)
            except OSError as exc:
                if exc.errno in RESOURCE_ERRNOS:
                    raise
                # MPTCP disabled (net.mptcp.enabled=0) or unsupported: plain TCP.
                log.warning("cannot create MPTCP sockets (%s): connecting upstream with TCP",
                            errno.errorcode.get(exc.errno or 0, exc.errno))
                self.mptcp_available = False
        if sock is None:
            sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setblocking(False)
        if self.nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.transparent:
            try:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            except OSError:
                sock.close()
                raise
        return sock


def _fastopen(sock: socket.socket, sockaddr: tuple, data: bytes) -> tuple[int, int | None]:
    """Connect with ``data`` in the SYN (MSG_FASTOPEN, works on MPTCP sockets too).

    Returns (bytes queued, connect errno); errno None means TCP Fast Open is
    off here (client bit of net.ipv4.tcp_fastopen unset): use connect().
    Measured on 6.18, non-blocking: with a cached cookie every byte is queued
    and the SYN carries what fits; without one EINPROGRESS and nothing is
    queued (the SYN asks for a cookie).
    """
    try:
        return sock.sendto(data, socket.MSG_FASTOPEN, sockaddr), errno.EINPROGRESS
    except BlockingIOError:
        return 0, errno.EINPROGRESS
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOPROTOOPT):
            return 0, None
        return 0, exc.errno or errno.EIO


def _label(family: int, sockaddr: tuple) -> str:
    if family == socket.AF_INET6:
        return f"[{sockaddr[0]}]:{sockaddr[1]}"
    return f"{sockaddr[0]}:{sockaddr[1]}"
