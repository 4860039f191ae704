"""``socks5`` and ``http-connect`` modes: explicit application proxies on an MPTCP listener.

An application configured with a proxy (SOCKS5, RFC 1928; HTTP CONNECT,
RFC 9110 §9.3.6) names its target in a handshake of its own; the host's
kernel carries the connection to us over MPTCP (mptcpize, or an MPTCP-aware
client), and we connect onward, MPTCP first. The handshakes are sans-IO
(``modes/socks5.py``, ``modes/http_connect.py`` behind ``modes/app_proxy.py``);
this module owns the sockets.

Design rules:
- One deadline per handshake, from accept to a complete request.
- The target is checked after resolution (the address actually connected to,
  in every spelling: DNS rebinding, PROTOCOLS.md "Target policy"), and its
  port against ``--allow-port``.
- Bytes the client sent after its request (before our reply) are kept and
  relayed after the reply, never dropped.
- Refusals travel in the stream (SOCKS REP, HTTP status), then FIN; the
  client's remaining bytes are drained until its FIN (or ``CLOSE_LINGER``) so
  that the close is a FIN, not a RST.
- The close log's reason names the cause: ``socks5-error:7``, ``http-error:405``,
  ``refused:target-not-allowed``, ``refused:timeout``, ``handshake-timeout``;
  its ``target=`` names the target asked for as soon as the request named one
  (also when the request was then refused). HTTP refusals say why in a
  one-line body; refusals the operator can change (private targets, clients,
  ports) are explained in the log once a minute per kind.
"""

from __future__ import annotations

import errno
import logging
import socket
from typing import Callable

from mptcp_proxy.config_app_proxy import AppProxyConfig
from mptcp_proxy.dataplane.connect import (
    REFUSED, RESOURCES, TIMEOUT, UNREACHABLE, ConnectResult, Connector, PendingConnect,
)
from mptcp_proxy.dataplane.reactor import EPOLLIN, Reactor
from mptcp_proxy.dataplane.resolve import AsyncResolver, Lookup, Resolver, ResolverBusy
from mptcp_proxy.errors import UpstreamError
from mptcp_proxy.modes.app_proxy import (
    HTTP_CONNECT, AppHandshake, HandshakeError, Refusal, error_reason, refusal_why,
)
from mptcp_proxy.modes.request import ConnectRequest
from mptcp_proxy.modes.policy import (
    ClientPolicy, IPAddress, TargetPolicy, allow_target_hint, explain_target, normalize,
    parse_address,
)
from mptcp_proxy.server.base import (
    Session, client_error_reason, format_addr, server_arguments,
)
from mptcp_proxy.server.handshake import CLOSING, HandshakeServer, Handshaking

log = logging.getLogger("mptcp_proxy.app_proxy")

READ_SIZE = 4096

_HANDSHAKE, _RESOLVING, _CONNECTING = "handshake", "resolving", "connecting"


class _Conn(Handshaking):
    """One client connection between accept and relay (or close)."""

    __slots__ = ("handshake", "client", "allowed", "lookup", "connect", "request",
                 "alternatives", "address")

    def __init__(self, sock: socket.socket, session: Session, handshake: AppHandshake,
                 client: IPAddress, started: float) -> None:
        super().__init__(sock, session, client, started, _HANDSHAKE)
        self.handshake = handshake
        self.client = client
        self.allowed = False                      # inside --allow (decided at accept)
        self.lookup: Lookup | None = None
        self.connect: PendingConnect | None = None
        self.request: ConnectRequest | None = None
        self.alternatives: list[IPAddress] = []   # a name's other allowed addresses
        self.address: IPAddress | None = None     # the target address decided on


class AppProxyServer(HandshakeServer):
    """SOCKS5 or HTTP CONNECT in front, MPTCP-first connect behind."""

    def __init__(self, config: AppProxyConfig, reactor: Reactor | None = None,
                 resolver: Resolver | None = None) -> None:
        super().__init__(**server_arguments(config), reactor=reactor)
        self.config = config
        self.mode_name = config.protocol
        self.connector = Connector(self.reactor, config.upstream,
                                   timeout=config.relay.connect_timeout,
                                   tcp_only_ttl=config.tcp_only_ttl)
        self.resolver = AsyncResolver(self.reactor, resolver, name=f"{config.protocol}-resolve")
        self.clients = ClientPolicy(config.allow_clients)
        self.targets = TargetPolicy(config.allow_targets, config.deny_targets)
        self.authenticator: Callable[[str, str], bool] | None = \
            config.credentials.check if config.credentials is not None else None

    # -- lifecycle ------------------------------------------------------------
    def start(self, reuseport: bool = False) -> "AppProxyServer":
        """Hold the kernel state, open the listener and read the proxy's own
        addresses (this thread's netns)."""
        self.hold_and_listen(self.config.listen, backlog=self.config.backlog,
                             reuseport=reuseport)
        self.refresh_own_addresses()
        return self

    def own_addresses_changed(self, own, broadcast) -> None:  # type: ignore[no-untyped-def]
        self.targets = self.targets.with_local(own, broadcast)

    def _close_everything(self) -> None:
        self.resolver.close()
        super()._close_everything()

    # -- handshake --------------------------------------------------------------
    def handle_accept(self, sock: socket.socket, addr: tuple, session: Session) -> None:
        client = normalize(parse_address(addr[0]))
        # A client outside --allow never has its credentials checked: the
        # answers would tell it which password is right. It is refused after
        # the request, in the protocol's terms (REP 2, 403).
        allowed = self.clients.allows(client)
        conn = _Conn(sock, session,
                     AppHandshake(self.config.protocol, self.authenticator if allowed else None),
                     client, self.reactor.now)
        conn.allowed = allowed
        if self.pending_by_client.get(client, 0) >= self.config.max_pending_per_client:
            # Before any byte of the handshake: the protocols have no answer here.
            self.reject(sock, session, "too-many-pending")
            return
        self.track(conn)
        self.watch(conn, EPOLLIN)
        conn.deadline = self.reactor.call_later(self.config.handshake_timeout,
                                                lambda: self._on_deadline(conn))

    def on_handshake_event(self, conn: _Conn, events: int) -> None:  # type: ignore[override]
        if conn.state == _HANDSHAKE:
            self._read(conn)
        elif conn.state == CLOSING:
            self.on_closing_event(conn)
        else:
            # Parked while resolving or connecting: only ERR/HUP wake us (epoll
            # reports them whatever the mask): the client is gone, so is the
            # reason to look its target up or connect to it.
            self.abort(conn, "client-reset")

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.abort(conn, client_error_reason(exc))
            return
        if not data:
            self.abort(conn, "client-eof", reset=False)
            return
        try:
            out, request = conn.handshake.feed(data)
        except HandshakeError as exc:
            reason = error_reason(self.config.protocol, exc)
            log.debug("conn=%d %s: %s", conn.session.id, reason, exc)
            requested = conn.handshake.requested
            if requested is not None and conn.session.target == "-":
                conn.session.target = _host_port(*requested)   # validated: LDH name or address
            self.close_with(conn, exc.reply, reason)
            return
        if out and not self.send_small(conn, out):
            return
        if request is not None:
            self._requested(conn, request)

    def _on_deadline(self, conn: _Conn) -> None:
        conn.deadline = None
        if conn.state == _HANDSHAKE:
            # Still talking: the deadline ends it without a word.
            self.abort(conn, "handshake-timeout", reset=False)
        elif conn.state == _RESOLVING:
            # The request was complete: it gets its answer (REP 6, 504).
            self._refuse(conn, Refusal.TIMEOUT, "resolve-timeout")

    # -- deciding and connecting ---------------------------------------------------
    def _requested(self, conn: _Conn, request: ConnectRequest) -> None:
        conn.request = request
        # Stop reading: bytes behind the request wait in the socket for the relay.
        self.reactor.set_mask(conn.fd, 0)
        session = conn.session
        if request.username is not None:
            session.extra = {"user": request.username}
        session.target = _host_port(request.host, request.port)
        if not conn.allowed:
            self.hint("client", log,
                      f"{self.config.protocol}: refused client {conn.client}: "
                      "not in the client networks this proxy serves; --allow CIDR adds "
                      "networks (--allow any serves everyone)")
            self._refuse(conn, Refusal.CLIENT_NOT_ALLOWED)
            return
        if request.port not in self.config.allow_ports:
            self.hint("port", log,
                      f"{self.config.protocol}: refused target {session.target}: port "
                      f"{request.port} is not in --allow-port {self.config.allow_ports}")
            self._refuse(conn, Refusal.PORT_NOT_ALLOWED)
            return
        if request.is_domain:
            try:
                conn.lookup = self.resolver.resolve(
                    str(request.host), request.port,
                    lambda addresses, error: self._resolved(conn, addresses, error))
            except ResolverBusy:
                self._refuse(conn, Refusal.RESOURCES, "resolver-busy")
                return
            conn.state = _RESOLVING
            return
        self._connect(conn, normalize(request.host))  # type: ignore[arg-type]

    def _resolved(self, conn: _Conn, addresses: list[str] | None,
                  error: BaseException | None) -> None:
        conn.lookup = None
        if conn.state != _RESOLVING:
            return
        parsed: list[IPAddress] = []
        for text in addresses or ():
            try:
                address = normalize(parse_address(text.split("%", 1)[0]))
            except ValueError:
                continue
            if address not in parsed:
                parsed.append(address)
        if not parsed:
            log.debug("conn=%d cannot resolve %s: %s", conn.session.id,
                      conn.request.host if conn.request else "?", error)
            self._refuse(conn, Refusal.RESOLVE_FAILED)
            return
        extra = conn.session.extra if conn.session.extra is not None else {}
        extra["name"] = conn.session.target
        conn.session.extra = extra
        # Every address is checked (DNS rebinding); the allowed ones are tried
        # in the resolver's order until one answers.
        allowed = [a for a in parsed if self.targets.check(a).allowed]
        first = allowed[0] if allowed else parsed[0]   # refused by _connect's check
        conn.alternatives = allowed[1:]
        self._connect(conn, first)

    def _connect(self, conn: _Conn, address: IPAddress) -> None:
        assert conn.request is not None  # set by _requested
        conn.session.target = format_addr((str(address), conn.request.port))
        conn.address = address
        decision = self.targets.check(address)
        if not decision.allowed:
            log.debug("conn=%d target %s refused: %s", conn.session.id, address,
                      decision.reason.value)
            explanation = explain_target(decision, address)
            label = self._label(conn)
            advice = allow_target_hint(decision)
            self.hint(f"target:{decision.reason.value}", log,
                      f"{self.config.protocol}: refused target {label}, which "
                      + (f"{explain_target(decision, address, advice=False)}: {advice}"
                         if advice else explanation))
            self._refuse(conn, Refusal.TARGET_NOT_ALLOWED,
                         why=refusal_why(Refusal.TARGET_NOT_ALLOWED, label, explanation))
            return
        assert conn.request is not None  # set by _requested
        conn.state = _CONNECTING
        if address.version == 6:
            family, sockaddr = socket.AF_INET6, (str(address), conn.request.port, 0, 0)
        else:
            family, sockaddr = socket.AF_INET, (str(address), conn.request.port)
        conn.connect = self.connector.connect(family, sockaddr,
                                              lambda result: self._connected(conn, result))

    def _connected(self, conn: _Conn, result: ConnectResult) -> None:
        conn.connect = None
        if conn.state != _CONNECTING:  # pragma: no cover - cancelled attempts never call back
            if result.sock is not None:
                result.sock.close()
            return
        if result.error is not None:
            if conn.alternatives:
                log.debug("conn=%d %s: %s; trying the next address", conn.session.id,
                          conn.session.target, result.error.reason)
                extra = conn.session.extra if conn.session.extra is not None else {}
                extra["tried"] = extra.get("tried", 0) + 1
                conn.session.extra = extra
                self._connect(conn, conn.alternatives.pop(0))
                return
            conn.session.upstream_requested_mptcp = result.requested_mptcp
            self._refuse(conn, refusal_for(result.error), f"upstream-{result.error.reason}")
            return
        assert result.sock is not None  # success carries a socket
        try:
            bound = result.sock.getsockname()[:2]
        except OSError:
            bound = None
        reply = conn.handshake.success(bound)
        self.hand_to_relay(conn)
        self.start_relay(conn.sock, result, conn.session,
                         initial_to_upstream=conn.handshake.leftover, reply=reply)

    # -- refusing ----------------------------------------------------------------------
    def _refuse(self, conn: _Conn, refusal: Refusal, reason: str | None = None,
                why: str = "") -> None:
        if not why and self.config.protocol == HTTP_CONNECT:
            why = refusal_why(refusal, self._label(conn), resolving=conn.state == _RESOLVING)
        reply, code = conn.handshake.refuse(refusal, why)
        log.debug("conn=%d refused (%s): %d", conn.session.id, refusal.value, code)
        self.close_with(conn, reply, reason or f"refused:{refusal.value}")

    @staticmethod
    def _label(conn: _Conn) -> str:
        """The target for people: ``host:port`` as asked, with the address a
        name resolved to (``example.org:443 (192.0.2.7)``)."""
        request = conn.request
        if request is None:
            return conn.session.target
        label = _host_port(request.host, request.port)
        if request.is_domain and conn.address is not None:
            label += f" ({conn.address})"
        return label

    def cancel_work(self, conn: _Conn) -> None:  # type: ignore[override]
        for handle in (conn.lookup, conn.connect):
            if handle is not None:
                handle.cancel()
        conn.lookup = conn.connect = None


def _host_port(host: object, port: int) -> str:
    """``host:port`` (``[v6]:port``) of a request's target: an address object or a
    name the handshake validated (LDH labels), so safe to log and to answer with."""
    if isinstance(host, str):
        return f"{host}:{port}"
    return format_addr((str(host), port))


def refusal_for(error: UpstreamError) -> Refusal:
    """The Connector's failure as the protocols' refusal kind."""
    if error.reason == REFUSED:
        return Refusal.REFUSED
    if error.reason == UNREACHABLE:
        if error.errno == errno.ENETUNREACH:
            return Refusal.NETWORK_UNREACHABLE
        return Refusal.HOST_UNREACHABLE
    if error.reason == TIMEOUT:
        return Refusal.TIMEOUT
    if error.reason == RESOURCES:
        return Refusal.RESOURCES
    return Refusal.NETWORK
