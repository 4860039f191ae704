"""``client`` mode: the agent that carries applications' plain TCP over MPTCP to a converter.

Two ways in, one way out (ARCHITECTURE.md, "client side"):

- **capture**: nftables (modes/client_agent.py renders the table) redirects the
  host's outgoing connections to the captured networks to a plain-TCP
  listener on 127.0.0.1 / ::1; the original destination is read back with
  ``SO_ORIGINAL_DST`` (IPv4) / ``IP6T_SO_ORIGINAL_DST`` (IPv6).
- **SOCKS5**: a listener for applications configured with a proxy; the
  sans-IO :class:`~mptcp_proxy.modes.socks5.Socks5Handshake` decides, domain
  names are resolved off the loop (a small thread pool, results come back
  through ``Reactor.call_soon_threadsafe``).

Either way the destination is reached through the converter: an MPTCP socket
(SO_MARK, TCP_NODELAY, optionally TCP_FASTOPEN_NO_COOKIE) sends the
:class:`~mptcp_proxy.modes.convert_client.ConvertClientHandshake` request,
followed by any application bytes already at hand, with a non-blocking
``sendto(MSG_FASTOPEN)``: with a TFO cookie (or no-cookie mode on both ends)
they ride in the SYN (RFC 8803 0-RTT). The converter's answer is read through
the handshake's ``feed()``; on acceptance the pair goes to the relay with the
converter's leftover bytes queued for the application. An extended Connect
(MP_CAPABLE listed) makes the converter report whether the server speaks
MPTCP; such servers are remembered and reached directly, with MPTCP, while
the memory lasts (RFC 8803 §5.1).

Design rules:
- One handshake deadline per connection, from accept to relay (SOCKS
  negotiation, name resolution, converter connect and answer together).
- A refusal reaches the application in its own terms: a RST for a captured
  connection (what the server's refusal would have looked like), the mapped
  SOCKS5 reply code then a close for SOCKS (HandshakeServer's ending: FIN,
  drain until the application's FIN or ``CLOSE_LINGER``). The log reason
  names the cause (``convert-error:96``, ``converter-refused``,
  ``resolve-failed``, ``socks5-error:7``, ``handshake-timeout``).
- The converter's Error makes the agent reset its converter connection
  (RFC 8803 §4.2.8). A Missing Cookie error carrying a cookie is retried once
  with it, and the cookie is kept for that converter.
- Kernel state (the nftables table) lives in the namespace the agent started
  in; it is removed when the agent stops accepting (new connections then go
  out uncaptured instead of being refused) and again, idempotently, at exit.
  One agent per table name per namespace (an abstract unix-socket lock).

Measured on Linux 6.18 (tests/e2e/test_client_agent_lab.py, two 20 Mbit/s
paths): the Connect TLV rides in the SYN (TCPI_OPT_SYN_DATA on our socket,
``tfo=yes``; TCPFastOpenPassive rises at the converter), both paths carry
data; but an MPTCP connection the converter accepted as a TFO child sends a
4 MB download in 8-14 s instead of 1.0 s (duplicate segments on the first
path; a kernel matter). ``--no-tfo`` trades the saved round trip for that.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass, field

from mptcp_proxy.config import Endpoint, RelayConfig, UpstreamMode
from mptcp_proxy.dataplane.connect import ConnectResult, Connector, PendingConnect
from mptcp_proxy.dataplane.reactor import EPOLLIN, EPOLLOUT, Reactor
from mptcp_proxy.dataplane.relay import LINGER_ABORT
from mptcp_proxy.dataplane.resolve import AsyncResolver, Lookup, Resolver, ResolverBusy
from mptcp_proxy.errors import ConfigError, KernelError
from mptcp_proxy.kernel import netns
from mptcp_proxy.kernel.nft import NftTable, check_name
from mptcp_proxy.kernel.privileges import Need, missing_capabilities, port_needs, require
from mptcp_proxy.kernel.sysctl import read_sysctl
from mptcp_proxy.modes.client_agent import (
    DEFAULT_MARK, DEFAULT_TABLE, MAX_MARK, TABLE_FAMILY, CaptureRules, CaptureSpec,
    refusal_reason, render_capture_table, socks_reply_for,
)
from mptcp_proxy.modes.convert_client import (
    DEFAULT_MPTCP_CACHE_TTL_S, MP_CAPABLE_SYN_OPTION, ConvertAccepted, ConvertClientHandshake,
    ConvertRefused, MptcpTargetCache, RefusedMissingCookie,
)
from mptcp_proxy.modes.socks5 import Socks5Error, Socks5Handshake, Socks5Reply
from mptcp_proxy.observe.sockinfo import SockInfoError, parse_sockaddr, tcp_info
from mptcp_proxy.server.base import Session, format_addr, open_listener, server_arguments
from mptcp_proxy.server.handshake import CLOSING, DONE, HandshakeServer, Handshaking
from mptcp_proxy.wire.convert import ConvertProtocolError

log = logging.getLogger("mptcp_proxy.client")

SO_ORIGINAL_DST = 80          # <linux/netfilter_ipv4.h>, level SOL_IP
IP6T_SO_ORIGINAL_DST = 80     # <linux/netfilter_ipv6/ip6_tables.h>, level SOL_IPV6
SOL_IPV6 = 41
SO_MARK = getattr(socket, "SO_MARK", 36)
TCP_FASTOPEN_NO_COOKIE = 34   # <linux/tcp.h>; missing from Python's socket module
TFO_SYSCTL = "net.ipv4.tcp_fastopen"
TFO_CLIENT_ENABLE = 0x1
SOCKADDR_IN_LEN = 16
SOCKADDR_IN6_LEN = 28

EARLY_READ = 16 << 10         # application bytes taken along at accept (SYN data and beyond)
READ_SIZE = 4096              # one read holds a whole Convert reply (<= 1020 bytes)
RESOLVER_THREADS = 4
LISTEN_PORT_TRIES = 16        # ephemeral port free on both 127.0.0.1 and ::1
LOCK_PREFIX = "\0mptcp-proxy-client-"

TFO_DATA_NOT_ACKED = 2        # tcpi_fastopen_client_fail (uapi linux/tcp.h)
TFO_ACKED, TFO_NOT_ACKED, TFO_NO = "yes", "not-acked", "no"   # the log line's tfo=

CAPTURE = "capture"
SOCKS5 = "socks5"

# Connection states, from accept to relay (then CLOSING, DONE: server/handshake.py).
_SOCKS, _RESOLVING, _DIRECT, _CONNECTING, _AWAITING = (
    "socks5", "resolving", "direct", "connecting", "awaiting-reply")

# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class AgentConfig:
    """``mptcp-proxy client``: capture and SOCKS5 in, MPTCP + Convert out."""

    converters: tuple[Endpoint, ...]
    """Converters, best first (``--converter``, or the SRV answer for ``auto``)."""
    capture: tuple[CaptureSpec, ...] = ()
    """Destination networks (and ports) whose connections are captured."""
    listen_port: int = 0
    """Port of the capture listeners on 127.0.0.1 and ::1 (0: pick a free one)."""
    socks5: Endpoint | None = None
    """Address of the SOCKS5 listener (None: no SOCKS5)."""
    mark: int = DEFAULT_MARK
    """fwmark on the agent's own sockets, so that capture never takes them."""
    tfo: bool = False
    """Offer the Convert request (and early application bytes) to the SYN (0-RTT).
    Off by default: multipath downloads on connections the converter accepted
    with SYN data run ~9x slower on Linux 6.18 (cli/client_cmd.DEFAULT_TFO)."""
    tfo_no_cookie: bool = False
    """Set TCP_FASTOPEN_NO_COOKIE: SYN data without a cookie (the converter must accept it)."""
    table: str = DEFAULT_TABLE
    """Name of the agent's nftables table (family inet)."""
    handshake_timeout: float = 10.0
    """From accept to relay: SOCKS5, name resolution, converter connect and answer."""
    direct: bool = True
    """Go straight to servers the converter reported MPTCP-capable (RFC 8803 §5.1)."""
    mptcp_cache_ttl: float = DEFAULT_MPTCP_CACHE_TTL_S
    """How long such a report is trusted (seconds)."""
    relay: RelayConfig = field(default_factory=RelayConfig)
    backlog: int = 1024
    drain_timeout: float = 10.0
    log_connections: bool = True
    dss_checksum: bool | None = None
    """Ask for DSS checksums on the MPTCP connections to converters and servers.
    None: on, unless ``tfo`` (with TCP Fast Open, checksums made multipath
    uploads wrong on Linux 6.18; see :attr:`mptcp_proxy.config.ServerSettings.dss_checksum`)."""

    def __post_init__(self) -> None:
        if not self.converters:
            raise ConfigError("--converter", "no converter address")
        if not self.capture and self.socks5 is None:
            raise ConfigError("--capture", "give --capture and/or --socks5: nothing to serve")
        if not 0 <= self.listen_port <= 65535:
            raise ConfigError("--listen-port", f"port {self.listen_port} out of range 0-65535")
        if not 0 < self.mark <= MAX_MARK:
            raise ConfigError("--mark", f"mark {self.mark:#x} out of range 1-{MAX_MARK:#x}")
        try:
            check_name(self.table)
        except KernelError as exc:
            raise ConfigError("--nft-table", str(exc)) from None
        if self.handshake_timeout <= 0:
            raise ConfigError("--handshake-timeout", "must be > 0")
        if self.mptcp_cache_ttl <= 0:
            raise ConfigError("--mptcp-cache-ttl", "must be > 0")
        if self.drain_timeout < 0:
            raise ConfigError("--drain-timeout", "must be >= 0")
        if self.tfo_no_cookie and not self.tfo:
            object.__setattr__(self, "tfo", True)   # asking for no-cookie TFO is asking for TFO
        if self.dss_checksum is None:
            object.__setattr__(self, "dss_checksum", not self.tfo)
        if self.socks5 is not None and self.socks5.port == self.listen_port != 0:
            raise ConfigError("--socks5", "same port as --listen-port")
        for endpoint in self.converters:
            if endpoint.port == 0:
                raise ConfigError("--converter", f"{endpoint}: port 0 is not connectable")


@dataclass
class AgentStats:
    captured: int = 0
    socks5: int = 0
    via_converter: int = 0
    direct: int = 0
    tfo_acked: int = 0
    """Converter connections whose SYN data the converter acknowledged (0-RTT)."""
    refusals: dict[int, int] = field(default_factory=dict)
    """Converter Error replies, by code."""
    cookie_retries: int = 0


# --------------------------------------------------------------------------
# Kernel helpers
# --------------------------------------------------------------------------

def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where a redirected connection was going (netfilter's conntrack original tuple)."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, SOCKADDR_IN6_LEN)
    else:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, SOCKADDR_IN_LEN)
    try:
        _, address = parse_sockaddr(raw)
    except SockInfoError:
        address = None
    if address is None:
        raise OSError(errno.EINVAL, "no original destination")
    return address


def _unmap(host: str) -> str:
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _sockaddr(target: tuple[str, int]) -> tuple[int, tuple]:
    host, port = target
    if ":" in host:
        return socket.AF_INET6, (host, port, 0, 0)
    return socket.AF_INET, (host, port)


def _namespace_lock(table: str) -> socket.socket:
    """One agent per table name per network namespace (abstract names are per netns)."""
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        lock.bind(LOCK_PREFIX + table)
    except OSError as exc:
        lock.close()
        if exc.errno == errno.EADDRINUSE:
            raise KernelError(f"another client agent with table {table} runs in this "
                              "network namespace") from None
        raise KernelError(f"cannot take the namespace lock: {exc.strerror}") from None
    return lock


def _tfo_outcome(sock: socket.socket) -> str:
    """``yes`` (SYN data acknowledged), ``not-acked`` (sent, dropped) or ``no``."""
    try:
        info = tcp_info(sock)
    except (OSError, SockInfoError):
        return TFO_NO
    if info.has_syn_data:
        return TFO_ACKED
    if info.fastopen_client_fail == TFO_DATA_NOT_ACKED:
        return TFO_NOT_ACKED
    return TFO_NO


def _abort_close(sock: socket.socket) -> None:
    """Close with a RST (RFC 8803 §4.2.8: the client resets on an Error)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ABORT)
    except OSError:
        pass
    sock.close()


class MarkedConnector(Connector):
    """A :class:`Connector` whose sockets carry the agent's fwmark (and TFO no-cookie)."""

    def __init__(self, reactor: Reactor, *, mark: int, tfo_no_cookie: bool,
                 timeout: float) -> None:
        # MPTCP always: the converter speaks it; direct targets were reported MPTCP.
        super().__init__(reactor, UpstreamMode.MPTCP, timeout=timeout)
        self.mark = mark
        self.tfo_no_cookie = tfo_no_cookie

    def _socket(self, family: int, mptcp: bool) -> socket.socket:
        sock = super()._socket(family, mptcp)
        try:
            # The kernel copies the mark to every subflow of an MPTCP socket
            # (measured), so joins are never captured either.
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            if self.tfo_no_cookie:
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, 1)
                except OSError:
                    pass  # then TFO needs a cookie first, as usual
        except BaseException:
            sock.close()
            raise
        return sock


# --------------------------------------------------------------------------
# One application connection between accept and relay
# --------------------------------------------------------------------------

class _Conn(Handshaking):
    """``sock`` is the application's socket; the converter's (or a direct
    target's) socket is ``conv``, outside the shared handshake bookkeeping."""

    __slots__ = ("kind", "target", "early", "socks", "connect", "conv", "conv_fd", "handshake",
                 "to_converter", "converter_tries", "converter_index", "cookie_retried",
                 "tried_direct", "last_error", "name", "lookup")

    def __init__(self, app: socket.socket, session: Session, kind: str, started: float) -> None:
        # No per-client limit here: every client counts under one key.
        super().__init__(app, session, None, started,
                         _SOCKS if kind == SOCKS5 else _CONNECTING)
        self.kind = kind
        self.target: tuple[str, int] | None = None
        self.early = b""                  # application bytes sent behind the Convert request
        self.socks: Socks5Handshake | None = None
        self.connect: PendingConnect | None = None
        self.conv: ConnectResult | None = None
        self.conv_fd = -1
        self.handshake: ConvertClientHandshake | None = None
        self.to_converter = b""           # request + early bytes not yet taken by the socket
        self.converter_tries = 0
        self.converter_index = 0
        self.cookie_retried = False
        self.tried_direct = False
        self.last_error = ""              # the last converter failure, for the final reason
        self.name: str | None = None      # SOCKS5 domain name, when one was given
        self.lookup: Lookup | None = None  # the name lookup in flight


# --------------------------------------------------------------------------
# The agent
# --------------------------------------------------------------------------

def agent_needs(config: AgentConfig, status: str | None = None) -> list[Need]:
    """What the client agent needs from the process, with why (kernel/privileges.py):
    CAP_NET_ADMIN for its nftables capture table (run by the nft program) and
    for SO_MARK on its own sockets (which CAP_NET_RAW also allows); and
    CAP_NET_BIND_SERVICE for listeners below port 1024."""
    needs = []
    if config.capture:
        needs.append(Need("CAP_NET_ADMIN", f"for its nftables capture table, inet "
                                           f"{config.table}, and SO_MARK on its own sockets",
                          children=True))
    elif missing_capabilities(["CAP_NET_ADMIN", "CAP_NET_RAW"], status) == \
            ["CAP_NET_ADMIN", "CAP_NET_RAW"]:
        needs.append(Need("CAP_NET_ADMIN", "for SO_MARK on its own sockets, so that "
                                           "capture tables never take them"))
    needs += port_needs(config.listen_port, "--listen-port")
    if config.socks5 is not None:
        needs += port_needs(config.socks5.port, "--socks5")
    return needs


class ClientAgent(HandshakeServer):
    """Capture + SOCKS5 listeners; each connection carried to a converter over MPTCP."""

    mode_name = "client"

    def __init__(self, config: AgentConfig, reactor: Reactor | None = None,
                 resolver: Resolver | None = None) -> None:
        super().__init__(**server_arguments(config), reactor=reactor)
        self.config = config
        self.connector = MarkedConnector(self.reactor, mark=config.mark,
                                         tfo_no_cookie=config.tfo_no_cookie,
                                         timeout=config.relay.connect_timeout)
        # Servers reached directly get SYN data only with a TFO cookie of theirs:
        # cookie-less SYN data is an arrangement with the converter, and an MPTCP
        # SYN whose data is not acknowledged falls back to TCP (measured on 6.18).
        self.direct_connector = MarkedConnector(self.reactor, mark=config.mark,
                                                tfo_no_cookie=False,
                                                timeout=config.relay.connect_timeout)
        self.direct_connector.out_of_resources = self.upstream_out_of_fds
        self.mptcp_targets = MptcpTargetCache(config.mptcp_cache_ttl)
        self.cookies: dict[tuple[str, int], bytes] = {}
        self.tfo_stripped: set[tuple[str, int]] = set()
        """Converters that did not acknowledge our SYN data: none sent to them since."""
        self.converters: list[tuple[int, tuple]] = []
        self.agent_stats = AgentStats()
        self.capture_port = 0
        self.socks_port: int | None = None
        self.table: NftTable | None = None
        self.tfo_client = True
        self.resolver = AsyncResolver(self.reactor, resolver, threads=RESOLVER_THREADS,
                                      name="client-resolve")
        self._preferred = 0
        self._lock: socket.socket | None = None
        self._netns_fd: int | None = None
        self._table_removed = False
        self._closed = False

    # -- start and stop -----------------------------------------------------
    def start(self) -> "ClientAgent":
        """Resolve converters, open listeners, install the capture table (this thread's netns).
        What the process needs is checked first (:func:`agent_needs`): nothing
        changes in a start that cannot succeed."""
        require("the client agent", agent_needs(self.config))
        self._netns_fd = netns.open_current()
        try:
            self._lock = _namespace_lock(self.config.table)
            self.hold_kernel_state()
            self.converters = self._resolve_converters()
            self._check_mark()
            self.tfo_client = _tfo_client_enabled()
            if not self.tfo_client:
                log.warning("%s lacks the client bit (0x1): the Convert request will follow "
                            "the handshake (one round trip more)", TFO_SYSCTL)
            if self.config.socks5 is not None:
                sock = open_listener(self.config.socks5, mptcp=False,
                                     backlog=self.config.backlog, key="--socks5")
                self.socks_port = sock.getsockname()[1]
                self.add_listener(sock)
            if self.config.capture:
                self._open_capture_listeners()
                self._install_table()
        except BaseException:
            self._close_everything()
            raise
        return self

    def _resolve_converters(self) -> list[tuple[int, tuple]]:
        found: list[tuple[int, tuple]] = []
        for endpoint in self.config.converters:
            try:
                infos = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise ConfigError("--converter",
                                  f"cannot resolve {endpoint.host!r}: {exc.strerror}") from None
            for family, _, _, _, sockaddr in infos:
                if family in (socket.AF_INET, socket.AF_INET6) and \
                        (family, sockaddr) not in found:
                    found.append((family, sockaddr))
        if not found:
            raise ConfigError("--converter", "no IPv4 or IPv6 address")
        return found

    def _check_mark(self) -> None:  # CAP_NET_ADMIN (or CAP_NET_RAW), see agent_needs
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.setsockopt(socket.SOL_SOCKET, SO_MARK, self.config.mark)
            except OSError as exc:
                raise KernelError(f"cannot set SO_MARK ({exc.strerror}): the agent needs "
                                  "CAP_NET_ADMIN") from None

    def _open_capture_listeners(self) -> None:
        versions = {spec.version for spec in self.config.capture}
        hosts = [h for v, h in ((4, "127.0.0.1"), (6, "::1")) if v in versions]
        if 6 in versions:
            _check_loopback6()
        port = self.config.listen_port
        for _ in range(1 if port else LISTEN_PORT_TRIES):
            socks: list[socket.socket] = []
            try:
                for host in hosts:
                    sock = open_listener(Endpoint(host, port), mptcp=False,
                                         backlog=self.config.backlog, key="--listen-port")
                    socks.append(sock)
                    port = sock.getsockname()[1]
            except ConfigError:
                for sock in socks:
                    sock.close()
                if self.config.listen_port:
                    raise
                port = 0  # the ephemeral port was taken on the other family: again
                continue
            for sock in socks:
                self.add_listener(sock)
            self.capture_port = port
            return
        raise ConfigError("--listen-port", "no port free on both 127.0.0.1 and ::1")

    def _install_table(self) -> None:
        converters = tuple((ipaddress.ip_address(sockaddr[0].split("%", 1)[0]), sockaddr[1])
                           for _, sockaddr in self.converters)
        rules = CaptureRules(self.config.capture, self.capture_port, self.config.mark,
                             converters)
        self.table = NftTable(TABLE_FAMILY, self.config.table,
                              render_capture_table(rules)).apply()

    def remove_table(self) -> None:
        """Stop capturing (idempotent): new connections go out as they would without us."""
        if self._table_removed:
            return
        self._table_removed = True
        if self.table is None:
            return
        try:
            with netns.in_netns(self._netns_fd):
                self.table.remove()
        except KernelError as exc:
            log.error("client: could not remove nftables table %s: %s", self.config.table, exc)

    def shutdown(self, drain: bool = True) -> None:
        self.remove_table()
        super().shutdown(drain)

    def _close_everything(self) -> None:
        if self._closed:  # the reactor's fds must not be closed twice
            return
        self._closed = True
        self.resolver.close()
        try:
            super()._close_everything()
        finally:
            self.remove_table()
            if self._lock is not None:
                self._lock.close()
                self._lock = None
            if self._netns_fd is not None:
                os.close(self._netns_fd)
                self._netns_fd = None

    def close(self) -> None:
        """Release everything when :meth:`serve_forever` never ran. Idempotent."""
        self._close_everything()

    # -- accepting ------------------------------------------------------------
    def handle_accept(self, sock: socket.socket, addr: tuple, session: Session) -> None:
        local = sock.getsockname()
        session.client = format_addr((_unmap(addr[0]), addr[1]))
        if self.socks_port is not None and local[1] == self.socks_port:
            self._accept_socks(sock, session)
        else:
            self._accept_captured(sock, local, session)

    def _accept_captured(self, sock: socket.socket, local: tuple, session: Session) -> None:
        session.extra = {"entry": CAPTURE}
        try:
            target = original_destination(sock)
        except OSError:
            self.reject(sock, session, "not-captured")
            return
        target = (_unmap(target[0]), target[1])
        if target[1] == local[1] and target[0] == _unmap(local[0]):
            # No redirect happened: someone dialled the listener itself.
            self.reject(sock, session, "not-captured")
            return
        self.agent_stats.captured += 1
        session.target = format_addr(target)
        conn = self._track(sock, session, CAPTURE)
        conn.target = target
        # Bytes the application already wrote travel with the Convert request
        # (in the SYN, with TFO); server-speaks-first protocols just send none.
        try:
            conn.early = sock.recv(EARLY_READ)
        except (BlockingIOError, InterruptedError):
            conn.early = b""
        except OSError:
            self.abort(conn, "client-reset")
            return
        self._open(conn)

    def _accept_socks(self, sock: socket.socket, session: Session) -> None:
        session.extra = {"entry": SOCKS5}
        self.agent_stats.socks5 += 1
        conn = self._track(sock, session, SOCKS5)
        conn.socks = Socks5Handshake()
        self.watch(conn, EPOLLIN)

    def _track(self, sock: socket.socket, session: Session, kind: str) -> _Conn:
        conn = _Conn(sock, session, kind, self.reactor.now)
        self.track(conn)
        conn.deadline = self.reactor.call_later(self.config.handshake_timeout,
                                                lambda: self._on_deadline(conn))
        return conn

    # -- SOCKS5 -----------------------------------------------------------------
    def on_handshake_event(self, conn: _Conn, events: int) -> None:  # type: ignore[override]
        # The application's socket is watched only while SOCKS5 talks and while closing.
        if conn.state == _SOCKS:
            self._read_socks(conn)
        elif conn.state == CLOSING:
            self.on_closing_event(conn)

    def _read_socks(self, conn: _Conn) -> None:
        assert conn.socks is not None  # SOCKS5 connections have a handshake
        try:
            data = conn.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort(conn, "client-reset")
            return
        if not data:
            self.abort(conn, "client-eof", reset=False)
            return
        # Fed a byte at a time up to the request: the method reply due for the
        # greeting is then out before a failure in the request of the same read
        # (Socks5Error.reply holds only the failure), and bytes pipelined behind
        # the request never count against the handshake's buffer limit.
        out = bytearray()
        request = None
        try:
            for i in range(len(data)):
                sent, request = conn.socks.feed(data[i:i + 1])
                out += sent
                if request is not None:
                    if i + 1 < len(data):
                        conn.socks.feed(data[i + 1:])  # kept in ``leftover``
                    break
        except Socks5Error as exc:
            reason = f"socks5-error:{exc.code}" if exc.code is not None else "socks5-bad-handshake"
            log.debug("conn=%d %s: %s", conn.session.id, reason, exc)
            self.close_with(conn, bytes(out) + exc.reply, reason)
            return
        if out and not self.send_small(conn, bytes(out)):
            return
        if request is None:
            return
        # Stop reading: bytes pipelined behind the request wait in the socket
        # for the relay; those already read are in ``leftover``.
        self.unwatch(conn)
        conn.early = conn.socks.leftover
        if request.is_domain:
            conn.name = str(request.host)
            conn.session.target = f"{conn.name}:{request.port}"
            self._resolve(conn, conn.name, request.port)
            return
        conn.target = (_unmap(str(request.host)), request.port)
        conn.session.target = format_addr(conn.target)
        conn.state = _CONNECTING
        self._open(conn)

    def _resolve(self, conn: _Conn, name: str, port: int) -> None:
        conn.state = _RESOLVING
        try:
            conn.lookup = self.resolver.resolve(
                name, port, lambda addresses, error: self._resolved(conn, addresses, error, port))
        except ResolverBusy:
            self._fail(conn, "resolver-busy", Socks5Reply.GENERAL_FAILURE)

    def _resolved(self, conn: _Conn, addresses: list[str] | None, error: BaseException | None,
                  port: int) -> None:
        conn.lookup = None
        if conn.state != _RESOLVING:
            return  # the deadline (or shutdown) came first
        try:
            if error is not None:
                raise error
            address = _unmap(addresses[0])  # type: ignore[index]
        except (OSError, UnicodeError, ValueError, IndexError, TypeError) as exc:
            log.debug("conn=%d cannot resolve %s: %s", conn.session.id, conn.name, exc)
            self._fail(conn, "resolve-failed", Socks5Reply.HOST_UNREACHABLE)
            return
        except Exception:  # a resolver bug must fail this connection, not the loop
            log.exception("conn=%d resolver failed for %s", conn.session.id, conn.name)
            self._fail(conn, "resolve-failed", Socks5Reply.HOST_UNREACHABLE)
            return
        conn.target = (address, port)
        conn.session.target = format_addr(conn.target)
        conn.session.extra["name"] = conn.name  # type: ignore[index]
        conn.state = _CONNECTING
        self._open(conn)

    # -- toward the target ------------------------------------------------------
    def _open(self, conn: _Conn) -> None:
        assert conn.target is not None  # known before opening
        if self.config.direct and not conn.tried_direct and \
                self.mptcp_targets.is_mptcp(conn.target, self.reactor.now):
            conn.tried_direct = True
            conn.state = _DIRECT
            family, sockaddr = _sockaddr(conn.target)
            pending = self.direct_connector.connect(
                family, sockaddr, lambda r: self._direct_done(conn, r),
                early_data=conn.early if self.config.tfo else b"")
            if pending is not None:
                conn.connect = pending
            return
        self._connect_converter(conn)

    def _direct_done(self, conn: _Conn, result: ConnectResult) -> None:
        conn.connect = None
        if conn.state != _DIRECT:  # pragma: no cover - cancelled attempts never call back
            if result.sock is not None:
                result.sock.close()
            return
        assert conn.target is not None
        if result.error is not None or result.sock is None:
            # RFC 8803 §5.1 is an optimisation: forget the target, go through the converter.
            self.mptcp_targets.forget(conn.target)
            log.debug("conn=%d direct connection to %s failed (%s): via the converter",
                      conn.session.id, conn.session.target,
                      result.error.reason if result.error else "?")
            self._connect_converter(conn)
            return
        if not result.mptcp:
            self.mptcp_targets.forget(conn.target)
        self.agent_stats.direct += 1
        conn.session.extra.update(via="direct", tfo=_tfo_outcome(result.sock))  # type: ignore[union-attr]
        self._relay(conn, result, conn.early[result.early_sent:], b"")

    def _connect_converter(self, conn: _Conn, retry_same: bool = False) -> None:
        if not retry_same:
            if conn.converter_tries >= len(self.converters):
                self._fail(conn, conn.last_error or "converter-unreachable",
                           Socks5Reply.GENERAL_FAILURE)
                return
            if conn.converter_tries == 0:
                conn.converter_index = self._preferred % len(self.converters)
            else:
                conn.converter_index = (conn.converter_index + 1) % len(self.converters)
            conn.converter_tries += 1
        family, sockaddr = self.converters[conn.converter_index]
        key = (sockaddr[0], sockaddr[1])
        assert conn.target is not None
        # Extended Connect (MP_CAPABLE listed): the converter must answer with the
        # server's SYN+ACK options, which tell whether it speaks MPTCP (§4.2.6, §5.1).
        conn.handshake = ConvertClientHandshake(conn.target, self.cookies.get(key),
                                                (MP_CAPABLE_SYN_OPTION,))
        data = conn.handshake.request_bytes() + conn.early
        conn.state = _CONNECTING
        # A converter seen dropping SYN data gets none: the bytes follow the handshake.
        syn_data = data if self.config.tfo and key not in self.tfo_stripped else b""
        pending = self.connector.connect(family, sockaddr,
                                         lambda r: self._converter_connected(conn, r, data),
                                         early_data=syn_data)
        if pending is not None:
            conn.connect = pending

    def _converter_connected(self, conn: _Conn, result: ConnectResult, data: bytes) -> None:
        conn.connect = None
        if conn.state != _CONNECTING:  # pragma: no cover - cancelled attempts never call back
            if result.sock is not None:
                result.sock.close()
            return
        if result.error is not None or result.sock is None:
            reason = result.error.reason if result.error is not None else "network"
            conn.last_error = f"converter-{reason}"
            log.debug("conn=%d converter %s: %s", conn.session.id,
                      format_addr(self.converters[conn.converter_index][1]), result.error)
            if conn.converter_tries < len(self.converters):
                self._preferred = (conn.converter_index + 1) % len(self.converters)
            self._connect_converter(conn)
            return
        conn.conv = result
        conn.conv_fd = result.sock.fileno()
        conn.to_converter = data[result.early_sent:]
        tfo = _tfo_outcome(result.sock)
        if tfo == TFO_ACKED:
            self.agent_stats.tfo_acked += 1
        elif tfo == TFO_NOT_ACKED:
            self._note_stripped(conn.converter_index, result)
        conn.session.extra.update(via="converter", tfo=tfo)  # type: ignore[union-attr]
        conn.state = _AWAITING
        self.reactor.register(conn.conv_fd, EPOLLIN | (EPOLLOUT if conn.to_converter else 0),
                              lambda ev: self._on_converter_event(conn, ev))
        if conn.to_converter:
            self._send_request(conn)

    def _note_stripped(self, index: int, result: ConnectResult) -> None:
        """The SYN carried data the SYN+ACK did not acknowledge (a middlebox strips it,
        or the converter takes no cookie-less SYN data): send none to it from now on,
        as RFC 8803 asks of clients.

        Measured on 6.18: an MPTCP connection whose SYN data is not acknowledged
        falls back to plain TCP, so each such connection runs on one path.
        """
        _, sockaddr = self.converters[index]
        key = (sockaddr[0], sockaddr[1])
        if key in self.tfo_stripped:
            return
        self.tfo_stripped.add(key)
        log.warning("converter %s did not acknowledge our SYN data%s: sending the Convert "
                    "request after the handshake from now on%s", format_addr(key),
                    "" if result.mptcp else " (and the connection fell back to TCP)",
                    "; is it running with --tfo-no-cookie?" if self.connector.tfo_no_cookie
                    else "")

    def _on_converter_event(self, conn: _Conn, events: int) -> None:
        if conn.state != _AWAITING:
            return
        if events & EPOLLOUT and conn.to_converter:
            self._send_request(conn)
            if conn.state != _AWAITING:
                return
        if events & ~EPOLLOUT:
            self._read_reply(conn)

    def _send_request(self, conn: _Conn) -> None:
        assert conn.conv is not None and conn.conv.sock is not None
        try:
            sent = conn.conv.sock.send(conn.to_converter)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            # The converter may have answered (an Error) and closed: read its answer.
            conn.to_converter = b""
            self.reactor.set_mask(conn.conv_fd, EPOLLIN)
            return
        conn.to_converter = conn.to_converter[sent:]
        self.reactor.set_mask(conn.conv_fd, EPOLLIN | (EPOLLOUT if conn.to_converter else 0))

    def _read_reply(self, conn: _Conn) -> None:
        assert conn.conv is not None and conn.conv.sock is not None
        assert conn.handshake is not None
        try:
            data = conn.conv.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            reset = exc.errno in (errno.ECONNRESET, errno.EPIPE)
            conn.last_error = "converter-reset" if reset else \
                f"converter-error:{errno.errorcode.get(exc.errno or 0, exc.errno)}"
            self._fail(conn, conn.last_error, Socks5Reply.GENERAL_FAILURE)
            return
        try:
            if data:
                accepted = conn.handshake.feed(data)
            else:
                conn.handshake.feed_eof()
                accepted = None
        except RefusedMissingCookie as refusal:
            if refusal.cookie is not None and not conn.cookie_retried:
                self._retry_with_cookie(conn, refusal.cookie)
                return
            self._refused(conn, refusal)
            return
        except ConvertRefused as refusal:
            self._refused(conn, refusal)
            return
        except ConvertProtocolError as exc:
            log.debug("conn=%d converter answer: %s", conn.session.id, exc)
            self._fail(conn, "converter-closed" if not data else "convert-bad-reply",
                       Socks5Reply.GENERAL_FAILURE)
            return
        if accepted is None:
            if not data:  # pragma: no cover - feed_eof raises before an answer
                self._fail(conn, "converter-closed", Socks5Reply.GENERAL_FAILURE)
            return
        self._accepted(conn, accepted)

    def _retry_with_cookie(self, conn: _Conn, cookie: bytes) -> None:
        family, sockaddr = self.converters[conn.converter_index]
        self.cookies[(sockaddr[0], sockaddr[1])] = cookie
        self.agent_stats.cookie_retries += 1
        conn.cookie_retried = True
        self._close_converter(conn)
        self._connect_converter(conn, retry_same=True)

    def _refused(self, conn: _Conn, refusal: ConvertRefused) -> None:
        code = int(refusal.code) if refusal.code is not None else 1
        self.agent_stats.refusals[code] = self.agent_stats.refusals.get(code, 0) + 1
        conn.session.extra["convert"] = f"error:{code}"  # type: ignore[index]
        log.debug("conn=%d %s", conn.session.id, refusal)
        self._fail(conn, refusal_reason(code), socks_reply_for(code))

    def _accepted(self, conn: _Conn, accepted: ConvertAccepted) -> None:
        assert conn.target is not None and conn.conv is not None
        if accepted.server_mptcp:
            self.mptcp_targets.remember(conn.target, self.reactor.now)
        mptcp = accepted.server_mptcp
        conn.session.extra.update(  # type: ignore[union-attr]
            convert="accepted", server_mptcp="-" if mptcp is None else ("yes" if mptcp else "no"))
        self._preferred = conn.converter_index
        self.agent_stats.via_converter += 1
        self.reactor.unregister(conn.conv_fd)
        rest, conn.to_converter = conn.to_converter, b""
        self._relay(conn, conn.conv, rest, accepted.leftover)

    def _relay(self, conn: _Conn, result: ConnectResult, to_upstream: bytes,
               to_client: bytes) -> None:
        assert result.sock is not None
        self.hand_to_relay(conn)  # the app fd is unwatched by now (SOCKS5) or never was
        conn.conv = None
        reply = b""
        if conn.kind == SOCKS5:
            assert conn.socks is not None
            reply = conn.socks.success(_bound(result.sock))
        # Application bytes that already left with the request count as relayed.
        self.start_relay(conn.sock, result, conn.session, initial_to_upstream=to_upstream,
                         initial_to_client=to_client, reply=reply,
                         sent_up=max(0, len(conn.early) - len(to_upstream)))

    # -- endings ------------------------------------------------------------------
    def _on_deadline(self, conn: _Conn) -> None:
        conn.deadline = None
        if conn.state in (CLOSING, DONE):
            return
        if conn.state == _SOCKS:
            # No request yet: there is nothing to answer (RFC 1928 replies follow a request).
            self.abort(conn, "handshake-timeout")
            return
        self._fail(conn, "handshake-timeout", Socks5Reply.GENERAL_FAILURE)

    def _fail(self, conn: _Conn, reason: str, rep: Socks5Reply) -> None:
        """Tell the application: a RST (capture) or a SOCKS5 reply, then close."""
        if conn.state in (CLOSING, DONE):
            return
        if conn.kind == SOCKS5:
            assert conn.socks is not None
            self.close_with(conn, conn.socks.failure(rep), reason)
        else:
            self.abort(conn, reason)

    def _close_converter(self, conn: _Conn) -> None:
        if conn.conv is not None and conn.conv.sock is not None:
            if conn.conv_fd >= 0:
                self.reactor.unregister(conn.conv_fd)
            _abort_close(conn.conv.sock)
        conn.conv = None
        conn.conv_fd = -1
        conn.to_converter = b""

    def cancel_work(self, conn: _Conn) -> None:  # type: ignore[override]
        """Before any ending: cancel the name lookup (it would hold a resolver
        thread for nobody) and the connect attempt, reset the converter connection."""
        for handle in (conn.lookup, conn.connect):
            if handle is not None:
                handle.cancel()
        conn.lookup = conn.connect = None
        self._close_converter(conn)


def _bound(sock: socket.socket) -> tuple[str, int] | None:
    """BND.ADDR/BND.PORT for the SOCKS5 reply: the agent's end toward the target."""
    try:
        host, port = sock.getsockname()[:2]
        return _unmap(host), port
    except (OSError, ValueError):
        return None


def _check_loopback6() -> None:
    """IPv6 redirects land on ::1: without it, IPv6 capture cannot work here."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        raise ConfigError("--capture", f"IPv6 networks are captured but ::1 is unusable "
                                       f"here ({exc.strerror})") from None


def _tfo_client_enabled() -> bool:
    try:
        return bool(int(read_sysctl(TFO_SYSCTL)) & TFO_CLIENT_ENABLE)
    except (KernelError, ValueError):
        return True  # unknown: assume the kernel default (client bit set)
