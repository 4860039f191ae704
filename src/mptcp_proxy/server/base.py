"""What every proxy mode shares: listener, accept loop, limits, drain, close logs.

A mode subclasses :class:`ProxyServer` and implements ``handle_accept`` (the
handshake in front); it ends by calling ``start_relay`` or ``reject``. All
sockets are non-blocking and live on the server's one :class:`Reactor`.
"""

from __future__ import annotations

import errno
import itertools
import logging
import resource
import signal
import socket
import threading
from dataclasses import dataclass, field
from typing import Callable

from mptcp_proxy.config import Endpoint, RelayConfig
from mptcp_proxy.dataplane.connect import ConnectResult, Connector
from mptcp_proxy.dataplane.pipes import RESOURCE_ERRNOS
from mptcp_proxy.dataplane.reactor import EPOLLIN, Reactor, Timer
from mptcp_proxy.dataplane.relay import LINGER_ABORT, Relay, RelayEngine
from mptcp_proxy.errors import ConfigError, KernelError
from mptcp_proxy.kernel.checksum import CHECKSUM_SYSCTL, hold_dss_checksum
from mptcp_proxy.kernel.privileges import bind_denied_hint
from mptcp_proxy.kernel.sysctl import SharedSysctlBits
from mptcp_proxy.observe.sockinfo import IPPROTO_MPTCP, is_mptcp, subflows_and_checksum

log = logging.getLogger("mptcp_proxy.server")
conn_log = logging.getLogger("mptcp_proxy.conn")

ACCEPT_BATCH = 64          # accepts per readiness event, then yield to relays
ACCEPT_PAUSE = 0.1         # seconds to stop accepting after EMFILE/ENFILE
FD_RESERVE = 512           # fds kept free for pipes, upstream attempts and logs


@dataclass(slots=True)
class Session:
    """One client connection, from accept to close; becomes the close log line."""

    id: int
    client: str
    target: str
    client_mptcp: bool | None
    client_subflows: int
    upstream_requested_mptcp: bool
    upstream_mptcp: bool | None
    upstream_subflows: int
    extra: dict | None
    client_csum: bool | None = None
    upstream_csum: bool | None = None

    def side(self, mptcp: bool | None, requested: bool = True) -> str:
        if mptcp is None:
            return "-"
        if mptcp:
            return "mptcp"
        return "fallback" if requested else "tcp"


def new_session(sid: int, client: str, target: str = "-") -> Session:
    return Session(sid, client, target, None, 0, False, None, 0, None)


@dataclass
class ServerStats:
    accepted: int = 0
    relayed: int = 0
    rejected: int = 0
    closed: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    accept_pauses: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def count_reason(self, reason: str) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


def yes_no(flag: bool | None) -> str:
    """The log line's spelling of a flag that may be unknown."""
    return "-" if flag is None else ("yes" if flag else "no")


def format_addr(addr: tuple) -> str:
    host, port = addr[0], addr[1]
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def raise_fd_limit() -> int:
    """Raise the soft fd limit to the hard one; return the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def open_listener(endpoint: Endpoint, *, mptcp: bool = True, backlog: int = 4096,
                  reuseport: bool = False, transparent: bool = False,
                  key: str = "--listen") -> socket.socket:
    """A non-blocking listening socket, MPTCP when the kernel allows it."""
    family, sockaddr = endpoint.resolve(key)
    sock = None
    if mptcp:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM, IPPROTO_MPTCP)
        except OSError as exc:
            log.warning("MPTCP listener unavailable (%s); listening with plain TCP",
                        errno.errorcode.get(exc.errno or 0, exc.errno))
    if sock is None:
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if transparent:
            sock.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT (missing from socket)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        message = f"cannot listen on {endpoint}: {exc.strerror}"
        if exc.errno == errno.EACCES:
            hint = bind_denied_hint(endpoint.port)
            if hint:
                message += f" ({hint})"
        elif exc.errno == errno.EPERM and transparent:
            message += " (IP_TRANSPARENT needs CAP_NET_ADMIN: run as root)"
        raise ConfigError(key, message) from None
    sock.setblocking(False)
    return sock


def server_arguments(settings) -> dict:  # type: ignore[no-untyped-def]
    """:class:`ProxyServer`'s arguments from a mode's settings (a
    :class:`~mptcp_proxy.config.ServerSettings` or the agent's config)."""
    return {"relay_config": settings.relay, "drain_timeout": settings.drain_timeout,
            "log_connections": settings.log_connections,
            "dss_checksum": settings.dss_checksum}


class ProxyServer:
    """Accept loop, limits, relay engine and graceful stop for one mode."""

    mode_name = "proxy"

    def __init__(self, relay_config: RelayConfig, *, drain_timeout: float = 10.0,
                 log_connections: bool = True, dss_checksum: bool = True,
                 reactor: Reactor | None = None) -> None:
        self.relay_config = relay_config
        self.dss_checksum = dss_checksum
        # Namespace sysctls held while the server runs (DSS checksums, the
        # converter's TFO bits); released by restore_kernel() at the end.
        self.sysctls: list[SharedSysctlBits] = []
        self.reactor = reactor or Reactor()
        self.engine = RelayEngine(
            self.reactor, splice=relay_config.splice, pipe_size=relay_config.pipe_size,
            idle_timeout=relay_config.idle_timeout or None, observer=self)
        self.drain_timeout = drain_timeout
        self.log_connections = log_connections
        self.listeners: list[socket.socket] = []
        self.stats = ServerStats()
        self.open_sessions = 0
        self._ids = itertools.count(1)
        self._accept_paused = False
        self._resume_timer: Timer | None = None
        self._draining = False
        self._drain_timer: Timer | None = None
        self.started = threading.Event()
        # Upstream connects in flight for connect_and_relay: id -> (pending, sock, session).
        self._connecting: dict[int, tuple] = {}
        # Set by modes that connect upstream (connect_and_relay uses it).
        self._connector: Connector | None = None
        # Called with (session, reason, bytes_up, bytes_down, duration) at every close.
        self.session_listeners: list = []
        # Session id -> (bytes already sent upstream before the relay, length of
        # the mode's reply queued in front of it): the counts' corrections.
        self._corrections: dict[int, tuple[int, int]] = {}
        nofile = raise_fd_limit()
        self.max_connections = relay_config.max_connections or max(16, (nofile - FD_RESERVE) // 2)

    @property
    def connector(self) -> Connector | None:
        return self._connector

    @connector.setter
    def connector(self, connector: Connector | None) -> None:
        self._connector = connector
        if connector is not None:
            connector.out_of_resources = self.upstream_out_of_fds

    def upstream_out_of_fds(self) -> None:
        """No fd for an upstream socket: pause accepting as for EMFILE in
        accept(). Otherwise, with an odd number of fds free, accept() takes
        the last one every time, the upstream socket fails, and each waiting
        client is reset instead of waiting in the backlog."""
        if self._draining:
            return
        if self._accept_paused:
            # Paused at max_connections (no timer): the reject that follows
            # would resume at once; come back after the pause instead.
            if self._resume_timer is None:
                self._resume_timer = self.reactor.call_later(ACCEPT_PAUSE, self._resume_accept)
            return
        log.warning("upstream socket: out of file descriptors or memory; pausing accepts "
                    "for %.1fs", ACCEPT_PAUSE)
        self._pause_accept(ACCEPT_PAUSE)

    # -- lifecycle ----------------------------------------------------------
    def hold_kernel_state(self) -> None:
        """What every mode's start() does first, in the namespace it serves:
        DSS checksums for every MPTCP connection accepted or opened from now
        on (``net.mptcp.checksum_enabled`` is read at socket creation and at
        SYN time). A start that fails afterwards calls :meth:`restore_kernel`."""
        if self.dss_checksum and not any(h.key == CHECKSUM_SYSCTL for h in self.sysctls):
            holder = hold_dss_checksum()
            if holder is not None:
                self.sysctls.append(holder)

    def hold_and_listen(self, endpoint: Endpoint, *, backlog: int, reuseport: bool) -> None:
        """The usual start(): hold the kernel state, then listen on ``endpoint``
        (given back if the listener cannot open)."""
        self.hold_kernel_state()
        try:
            self.add_listener(open_listener(endpoint, backlog=backlog, reuseport=reuseport))
        except BaseException:
            self.restore_kernel()
            raise

    def restore_kernel(self) -> None:
        """Give back the sysctls held (idempotent; the last user of a shared
        value in the namespace restores it)."""
        while self.sysctls:
            try:
                self.sysctls.pop().release()
            except (KernelError, OSError) as exc:
                log.error("could not restore sysctls: %s", exc)

    def add_listener(self, sock: socket.socket) -> None:
        self.listeners.append(sock)
        self.reactor.register(sock.fileno(), EPOLLIN, lambda ev, s=sock: self._on_accept(s))

    def listen_addresses(self) -> list[tuple]:
        return [s.getsockname() for s in self.listeners]

    def serve_forever(self, install_signals: bool = True) -> None:
        """Run until stopped (SIGINT/SIGTERM when ``install_signals``)."""
        if install_signals and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.reactor.add_signal_handler(signum, self._on_signal)
        self.started.set()
        try:
            self.reactor.run()
        finally:
            self._close_everything()

    def _on_signal(self, signum: int) -> None:
        if self._draining:
            log.info("second signal: closing %d connections now", self.open_sessions)
            self._finish_drain()  # handshakes in progress too, not only relays
            return
        log.info("%s: stopping; draining %d connections (up to %.0fs)",
                 signal.Signals(signum).name, self.open_sessions, self.drain_timeout)
        self.shutdown()

    def shutdown(self, drain: bool = True) -> None:
        """Stop accepting; stop the loop once connections are done (or the drain timer)."""
        if self._draining:
            return
        self._draining = True
        for sock in self.listeners:
            self.reactor.unregister(sock.fileno())
            sock.close()
        self.listeners.clear()
        if not drain or self.open_sessions == 0:
            self._finish_drain()
        else:
            self._drain_timer = self.reactor.call_later(self.drain_timeout, self._finish_drain)

    def shutdown_threadsafe(self, drain: bool = False) -> None:
        self.reactor.call_soon_threadsafe(lambda: self.shutdown(drain=drain))

    def _finish_drain(self) -> None:
        self.engine.close_all()
        self.abort_pending()
        self.reactor.stop()

    def abort_pending(self) -> None:
        """Close connections still in their handshake (modes with handshakes of
        their own extend this). Pop before rejecting: the last reject may end
        the drain, which calls abort_pending again."""
        while self._connecting:
            _, (pending, sock, session) = self._connecting.popitem()
            pending.cancel()
            self.reject(sock, session, "shutdown")

    @property
    def connecting(self) -> int:
        """Upstream connects in flight (connect_and_relay)."""
        return len(self._connecting)

    def connect_and_relay(self, sock: socket.socket, session: Session, family: int,
                          sockaddr: tuple, *, source: tuple | None = None,
                          before_relay: Callable[[ConnectResult], None] | None = None) -> None:
        """Connect upstream with ``self.connector``; relay on success, reset the
        client on failure (as the server itself would have), log either way."""
        started = self.reactor.now

        def connected(result: ConnectResult) -> None:
            self._connecting.pop(session.id, None)
            if result.error is not None:
                self.reject(sock, session, f"upstream-{result.error.reason}",
                            duration=self.reactor.now - started)
                return
            if before_relay is not None:
                before_relay(result)
            self.start_relay(sock, result, session)

        pending = self.connector.connect(family, sockaddr, connected, source=source)
        if pending is not None:
            self._connecting[session.id] = (pending, sock, session)

    def _close_everything(self) -> None:
        for sock in self.listeners:
            self.reactor.unregister(sock.fileno())
            sock.close()
        self.listeners.clear()
        try:
            self.engine.close()
            self.reactor.close()
        finally:
            self.restore_kernel()

    # -- accepting ----------------------------------------------------------
    def _on_accept(self, listener: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            if self._accept_paused:   # a handler ran out of fds: stop this batch too
                return
            if self.open_sessions >= self.max_connections:
                self._pause_accept(None)
                return
            try:
                sock, addr = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in RESOURCE_ERRNOS:
                    log.warning("accept: %s; pausing accepts for %.1fs",
                                errno.errorcode.get(exc.errno or 0), ACCEPT_PAUSE)
                    self._pause_accept(ACCEPT_PAUSE)
                    return
                if exc.errno not in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    # Unknown: log it, never let one accept() stop the proxy.
                    log.warning("accept: %s", exc)
                continue  # the client gave up before we got to it
            try:
                sock.setblocking(False)
                # Accepted MPTCP sockets do not inherit it; without it a small write
                # after a reply waits ~40 ms for a delayed ACK (docs/KERNEL-FACTS.md).
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:  # reset before we saw it
                log.debug("accepted socket unusable: %s", exc)
                sock.close()
                continue
            self.stats.accepted += 1
            self.open_sessions += 1
            session = new_session(next(self._ids), format_addr(addr))
            try:
                self.handle_accept(sock, addr, session)
            except Exception:
                log.exception("handler failed for %s", session.client)
                self.reject(sock, session, "internal-error")

    def _pause_accept(self, delay: float | None) -> None:
        if self._accept_paused:
            return
        self._accept_paused = True
        self.stats.accept_pauses += 1
        for sock in self.listeners:
            self.reactor.set_mask(sock.fileno(), 0)
        if delay is not None:
            self._resume_timer = self.reactor.call_later(delay, self._resume_accept)

    def _resume_accept(self) -> None:
        self._resume_timer = None
        if not self._accept_paused or self._draining:
            return
        self._accept_paused = False
        for sock in self.listeners:
            self.reactor.set_mask(sock.fileno(), EPOLLIN)

    # -- to be provided by modes ----------------------------------------------
    def handle_accept(self, sock: socket.socket, addr: tuple, session: Session) -> None:
        raise NotImplementedError

    # -- endings --------------------------------------------------------------
    def start_relay(self, client: socket.socket, result: ConnectResult, session: Session,
                    initial_to_upstream: bytes = b"", initial_to_client: bytes = b"",
                    reply: bytes = b"", sent_up: int = 0) -> Relay:
        """Relay ``client`` and the connected upstream. ``reply`` (the mode's own
        protocol answer) goes to the client first; unlike ``initial_to_client``
        (bytes the upstream sent) it is not counted in ``bytes_down``.
        ``sent_up``: client bytes the mode already delivered upstream (in a
        TFO SYN, with a request); they count in ``bytes_up`` like relayed ones."""
        assert result.sock is not None  # callers only relay successful connects
        session.upstream_requested_mptcp = result.requested_mptcp
        session.upstream_mptcp = result.mptcp
        self.stats.relayed += 1
        if reply or sent_up:
            self._corrections[session.id] = (sent_up, len(reply))
            initial_to_client = reply + initial_to_client
        return self.engine.relay(client, result.sock, meta=session,
                                 probe_upstream_close=result.fell_back,
                                 initial_to_upstream=initial_to_upstream,
                                 initial_to_client=initial_to_client)

    def reject(self, sock: socket.socket, session: Session, reason: str,
               abort: bool = True, duration: float = 0.0) -> None:
        """Close a client connection that never reached the relay, and log it."""
        if session.client_mptcp is None:
            session.client_mptcp = _safe_is_mptcp(sock)
        if abort:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ABORT)
            except OSError:
                pass
        sock.close()
        self.stats.rejected += 1
        self._session_ended(session, reason, 0, 0, duration)

    def relay_first_eof(self, relay: Relay) -> None:
        self._sample_subflows(relay)

    def relay_closing(self, relay: Relay) -> None:
        self._sample_subflows(relay)

    def _sample_subflows(self, relay: Relay) -> None:
        """Subflow counts are live counts (MPTCP_INFO); the log keeps the most
        seen. The same read says whether the leg is DSS-checksummed."""
        session: Session = relay.meta  # type: ignore[assignment]
        if session.client_mptcp is None:
            session.client_mptcp = _safe_is_mptcp(relay.sa)
        count, csum = _subflows(relay.sa, session.client_mptcp)
        session.client_subflows = max(session.client_subflows, count)
        if csum is not None:
            session.client_csum = csum
        count, csum = _subflows(relay.sb, bool(session.upstream_mptcp))
        session.upstream_subflows = max(session.upstream_subflows, count)
        if csum is not None:
            session.upstream_csum = csum

    def relay_closed(self, relay: Relay) -> None:
        if self._corrections:
            sent_up, reply = self._corrections.pop(relay.meta.id, (0, 0))  # type: ignore[attr-defined]
            relay.ab.bytes += sent_up
            relay.ba.bytes = max(0, relay.ba.bytes - reply)
        self.stats.bytes_up += relay.bytes_up
        self.stats.bytes_down += relay.bytes_down
        self._session_ended(relay.meta, relay.reason, relay.bytes_up, relay.bytes_down,
                            relay.duration)

    def _session_ended(self, session: Session, reason: str, up: int, down: int,
                       duration: float) -> None:
        self.open_sessions -= 1
        self.stats.closed += 1
        self.stats.count_reason(reason.split(":", 1)[0])
        for listener in self.session_listeners:
            listener(session, reason, up, down, duration)
        if self.log_connections and conn_log.isEnabledFor(logging.INFO):
            conn_log.info(
                "conn=%d mode=%s client=%s target=%s client_side=%s client_subflows=%d "
                "client_csum=%s upstream_side=%s upstream_subflows=%d upstream_csum=%s "
                "bytes_up=%d bytes_down=%d duration=%.3fs reason=%s%s",
                session.id, self.mode_name, session.client, session.target,
                session.side(session.client_mptcp, requested=False), session.client_subflows,
                yes_no(session.client_csum),
                session.side(session.upstream_mptcp, session.upstream_requested_mptcp),
                session.upstream_subflows, yes_no(session.upstream_csum), up, down,
                duration, reason,
                "".join(f" {k}={v}" for k, v in (session.extra or {}).items()))
        if self._accept_paused and self._resume_timer is None and \
                self.open_sessions < self.max_connections:
            self._resume_accept()
        if self._draining and self.open_sessions == 0:
            if self._drain_timer is not None:
                self._drain_timer.cancel()
            self._finish_drain()


def drain_until_eof(sock: socket.socket, reads: int, size: int) -> bool:
    """Read and drop (after an error reply) so that closing sends a FIN, not a RST.

    True once the peer's FIN (or an error) arrived: close now. False while more
    may come: a level-triggered reader calls again when it is readable.
    """
    for _ in range(reads):
        try:
            data = sock.recv(size)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True
        if not data:
            return True
    return False


def client_error_reason(exc: OSError) -> str:
    """The close log's reason for a client socket error during a handshake."""
    # An MPTCP socket reset before we read reports ENOTCONN, not ECONNRESET.
    if exc.errno in (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ENOTCONN):
        return "client-reset"
    return f"client-error:{errno.errorcode.get(exc.errno or 0, exc.errno)}"


def _safe_is_mptcp(sock: socket.socket) -> bool:
    try:
        return is_mptcp(sock)
    except OSError:
        return False


def _subflows(sock: socket.socket, mptcp: bool | None) -> tuple[int, bool | None]:
    """(live subflows now, DSS checksum in use): (1, None) for TCP, fallback
    or a socket the kernel no longer answers for; MPTCP_INFO otherwise."""
    if not mptcp:
        return 1, None
    try:
        return subflows_and_checksum(sock)
    except OSError:
        return 1, None
