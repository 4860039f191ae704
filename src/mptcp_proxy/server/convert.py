"""``convert`` mode: an RFC 8803 Transport Converter on an MPTCP + TCP Fast Open listener.

The handshake logic lives in ``modes/convert.py`` (pure); this module owns the
sockets: it reads the Convert message (from the SYN data, or after the
handshake when the client had no TFO cookie or syncookies were on), carries out
the handshake's actions, connects upstream with the shared :class:`Connector`
(MPTCP first, the bytes after the TLVs offered to the server's SYN), and hands
the pair to the relay with the reply queued in front of the server's bytes.

Design rules:
- One deadline per handshake, from accept to a complete message (not per read).
- Errors travel in the stream, then ``shutdown(SHUT_WR)``; the client's
  remaining bytes are read and dropped until its FIN (or ``handshake.CLOSE_LINGER``), so
  the kernel sends a FIN, not the RST that closing a socket with unread data
  causes. Error replies are rate-limited per client; over the rate the
  connection is closed without one.
- Kernel changes (net.ipv4.tcp_fastopen bits) are recorded and restored when
  the loop ends, in the namespace that made them.
- Each connection's log line carries ``tfo=yes|no`` (SYN data was accepted on
  the client side: TCPI_OPT_SYN_DATA on the accepted socket, measured on 6.18 to
  show on MPTCP sockets too), ``convert=`` (connect, info, connect+info,
  error:CODE, none) and, once connected, ``upstream_tfo=yes|no``.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import socket
import time
from dataclasses import dataclass, field
from functools import partial

from mptcp_proxy.config_convert import ConvertConfig
from mptcp_proxy.dataplane.connect import (
    REFUSED, RESOURCES, TIMEOUT, UNREACHABLE, ConnectResult, Connector, PendingConnect,
)
from mptcp_proxy.dataplane.establish import EstablishWatcher
from mptcp_proxy.dataplane.reactor import EPOLLIN, Reactor
from mptcp_proxy.errors import KernelError, PrivilegeError, UpstreamError
from mptcp_proxy.kernel.checksum import checksum_enabled
from mptcp_proxy.kernel.privileges import can_create_in, can_write_sysctl
from mptcp_proxy.kernel.sysctl import SHARED_STATE_DIR, SharedSysctlBits, read_sysctl, sysctl_path
from mptcp_proxy.modes.convert import (
    BARE_START, Action, CloseQuietly, ConvertHandshake, ConvertSettings, CookieAuthority,
    Negotiated, OpenUpstream, ReplyAndClose, StartRelay, TokenBucket, UpstreamFailure,
    UpstreamFailureKind, open_quick, quick_handshake,
)
from mptcp_proxy.modes.policy import (
    ClientPolicy, IPAddress, TargetPolicy, allow_target_hint, explain_target, normalize,
    parse_address,
)
from mptcp_proxy.observe.sockinfo import (
    IPPROTO_MPTCP, TCPI_OPT_SACK, TCPI_OPT_SYN_DATA, TCPI_OPT_TIMESTAMPS, TCPI_OPT_WSCALE,
    TCP_SYN_RECV, SockInfoError, mptcp_info, tcp_options, tcp_state_and_option_bits,
)
from mptcp_proxy.server.base import Session, client_error_reason, open_listener, server_arguments
from mptcp_proxy.server.handshake import CLOSING, DONE, HandshakeServer, Handshaking
from mptcp_proxy.wire.convert import TcpOptionKind

log = logging.getLogger("mptcp_proxy.convert")

TCP_FASTOPEN = 23
TCP_FASTOPEN_NO_COOKIE = 34
TFO_SYSCTL = "net.ipv4.tcp_fastopen"
TFO_CLIENT_ENABLE = 0x1
TFO_SERVER_ENABLE = 0x2
TFO_SERVER_COOKIE_NOT_REQD = 0x200

READ_SIZE = 4096              # one read holds a whole Convert message (<= 1020 bytes)
MEMO_SIZE = 4096              # entries of each address memo (cleared when full)

# errno of a failed connect -> ICMP code of Destination Unreachable (RFC 792),
# for Error 97 (RFC 8803 §4.2.8). Linux folds several ICMP codes into one errno.
_ICMP_CODE_BY_ERRNO = {
    errno.ENETUNREACH: 0,     # net unreachable (or no route here)
    errno.EHOSTUNREACH: 1,    # host unreachable (also admin-prohibited 9, 10, 13)
}

_READING, _CONNECTING = "reading", "connecting"


@dataclass
class ConvertStats:
    """Converter counters (besides the base ServerStats)."""

    syn_data: int = 0
    """Connections whose SYN carried data (the Convert header, 0-RTT)."""
    no_syn_data: int = 0
    """Connections whose bytes came after the handshake."""
    errors: dict[int, int] = field(default_factory=dict)
    """Error replies decided, by Convert error code."""
    rate_limited: int = 0
    """Error replies not sent because the client was over its rate."""
    early_in_syn: int = 0
    """Upstream connections whose SYN carried the client's first bytes (TFO)."""
    early_accepted: int = 0
    """TFO connections accepted in SYN_RECV (watched by the EstablishWatcher)."""


class _Pending(Handshaking):
    """One client connection between accept and relay (or close)."""

    __slots__ = ("handshake", "client", "connect", "result", "quick", "early")

    def __init__(self, sock: socket.socket, session: Session,
                 handshake: ConvertHandshake | None, client: IPAddress, host: str,
                 started: float) -> None:
        # Handshaking's fields set here rather than through super().__init__:
        # one call less on every connection's path.
        self.sock = sock
        self.fd = sock.fileno()
        self.session = session
        self.key = host   # counted per client by the address as accept() spelled it
        self.started = started
        self.state = _READING
        self.deadline = None
        self.out = b""
        self.shut = False
        self.linger = None
        self.reason = ""
        self.watched = False
        # None while the connection goes the quick way (modes/convert.open_quick);
        # ``quick`` then holds what rebuilds it if needed: (settings, first read).
        self.handshake = handshake
        self.quick: tuple[ConvertSettings, bytes] | None = None
        self.client = client
        self.connect: PendingConnect | None = None
        self.result: ConnectResult | None = None
        self.early = b""   # the client's bytes after the Convert message


class ConvertServer(HandshakeServer):
    """The Transport Converter: accept, decode, check, connect, reply, relay."""

    mode_name = "convert"

    def __init__(self, config: ConvertConfig, reactor: Reactor | None = None) -> None:
        super().__init__(**server_arguments(config), reactor=reactor)
        self.config = config
        self.connector = Connector(self.reactor, config.upstream,
                                   timeout=config.relay.connect_timeout,
                                   tcp_only_ttl=config.tcp_only_ttl)
        self.error_limiter = TokenBucket(config.error_rate, config.error_burst)
        self.convert_stats = ConvertStats()
        self.establish = EstablishWatcher(self.reactor)
        self.settings = ConvertSettings()
        self.tfo_enabled = False
        self.pending: dict[int, _Pending] = {}
        # Open handshakes per client address, keyed by accept()'s spelling of it
        # (one listener: one spelling per address; a str hashes in C).
        self.pending_by_client: dict[str, int] = {}
        self._listen_mptcp = False
        # Per-connection conversions remembered (pure functions of their key):
        # accept()'s address text -> client address; (id of a Connect address,
        # port) -> (the address, family, sockaddr for connect(), target for the
        # log line).
        self._clients: dict[str, IPAddress] = {}
        self._targets: dict[tuple[int, int], tuple[IPAddress, int, tuple, str]] = {}

    # -- lifecycle ------------------------------------------------------------
    def start(self, reuseport: bool = False) -> "ConvertServer":
        """Set the sysctls, open the TFO listener, build the policy (in this thread's netns)."""
        if self.config.tfo_queue and (self.config.dss_checksum or checksum_enabled()):
            # Measured (README, "Data integrity"): 27 of 1,000 0-RTT uploads
            # through this converter arrived wrong with checksums on (their
            # first bytes replaced), 1 of 3,000 with them off.
            log.warning("convert: DSS checksums are %s in this namespace: with TCP Fast Open, "
                        "on Linux 6.18 some multipath uploads of 0-RTT connections arrive "
                        "wrong with them (README, 'Data integrity')",
                        "asked for" if self.config.dss_checksum else "on (set by another "
                        "process or the administrator)")
        if self.config.manage_sysctls:
            check_tfo_sysctl_rights(tfo_sysctl_bits(self.config))
        try:
            self.hold_kernel_state()
            if self.config.manage_sysctls:
                self._hold_tfo_bits(tfo_sysctl_bits(self.config))
            listener = open_listener(self.config.listen, backlog=self.config.backlog,
                                     reuseport=reuseport)
            try:
                self._enable_fastopen(listener)
            except BaseException:
                listener.close()
                raise
            self._listen_mptcp = listener.proto == IPPROTO_MPTCP
            self.add_listener(listener)
            self.settings = self._build_settings()
        except BaseException:
            self.restore_kernel()
            raise
        self.refresh_own_addresses()
        return self

    def _hold_tfo_bits(self, bits: int) -> None:
        if bits:
            holder = SharedSysctlBits(TFO_SYSCTL, bits)
            acquire_tfo_bits(holder)
            self.sysctls.append(holder)
            if holder.recovered:
                log.warning("%s: restored what a converter that died left set", TFO_SYSCTL)

    def _enable_fastopen(self, listener: socket.socket) -> None:
        if not self.config.tfo_queue:
            return
        try:
            listener.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN, self.config.tfo_queue)
        except OSError as exc:
            log.warning("TCP Fast Open unavailable on the listener (%s): the Convert "
                        "header will arrive after the handshake", exc.strerror)
            return
        self.tfo_enabled = True
        if not self.config.tfo_no_cookie:
            return
        try:
            # Scoped to this listener; the sysctl bit would open every listener
            # of the namespace to cookie-less SYN data.
            listener.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, 1)
        except OSError as exc:
            if not self.config.manage_sysctls:
                log.warning("TCP_FASTOPEN_NO_COOKIE refused (%s); clients need a TFO "
                            "cookie first", exc.strerror)
                return
            log.info("TCP_FASTOPEN_NO_COOKIE refused (%s); setting %s bit 0x200",
                     exc.strerror, TFO_SYSCTL)
            self._hold_tfo_bits(TFO_SERVER_COOKIE_NOT_REQD)

    def _build_settings(self) -> ConvertSettings:
        config = self.config
        cookies = None
        if config.cookie_secret is not None:
            cookies = CookieAuthority(config.cookie_secret, config.cookie_window)
        return ConvertSettings(
            # The proxy's own addresses: refresh_own_addresses(), right after.
            targets=TargetPolicy(config.allow_targets, config.deny_targets),
            clients=ClientPolicy(config.allow_clients),
            cookies=cookies,
            supported_kinds=supported_kinds(mptcp=self._listen_mptcp,
                                            tfo=config.upstream_tfo),
            max_pending_per_client=config.max_pending_per_client,
            network_retry_s=config.network_retry,
        )

    def own_addresses_changed(self, own, broadcast) -> None:  # type: ignore[no-untyped-def]
        # A new settings object: its policy memos start empty.
        self.settings = dataclasses.replace(
            self.settings, targets=self.settings.targets.with_local(own, broadcast))

    # -- accept and read ------------------------------------------------------------
    def handle_accept(self, sock: socket.socket, addr: tuple, session: Session) -> None:
        host = addr[0]
        client = self._clients.get(host)
        if client is None:
            client = normalize(parse_address(host))
            _remember(self._clients, host, client)
        try:  # TCPI_OPT_SYN_DATA: the client's SYN carried data the kernel accepted
            state, options = tcp_state_and_option_bits(sock)
        except (OSError, SockInfoError):
            state = options = 0
        syn_data = options & TCPI_OPT_SYN_DATA
        if syn_data:
            self.convert_stats.syn_data += 1
            if state == TCP_SYN_RECV and self._listen_mptcp:
                # Accepted on the SYN, before the client's third ACK: what we
                # write now would stay queued in the kernel (dataplane/establish.py).
                self.convert_stats.early_accepted += 1
                self.establish.add(sock)
        else:
            self.convert_stats.no_syn_data += 1
        session.extra = {"tfo": "yes" if syn_data else "no", "convert": "-"}
        p = _Pending(sock, session, None, client, host, self.reactor.now)
        open_from_client = self.track(p)
        data = None
        if syn_data:
            # 0-RTT: the message is in the receive queue already, usually whole,
            # and usually the base Connect seen many times: decided without a
            # handshake object when it can be (the same answer, tested).
            data = self._recv(p)
            if data:
                settings = self.settings
                action = open_quick(settings, client, data, open_from_client)
                if action is not None:
                    p.quick = (settings, data)
                    session.extra["convert"] = "connect"
                    self._open_upstream(p, action)
                    return
            elif p.state == DONE:
                return   # reset: aborted
        handshake = p.handshake = ConvertHandshake(self.settings, client, time.time())
        action = handshake.start(open_from_client)
        if action is not None:
            self._carry_out(p, action)
            return
        # With TFO the whole message is usually in the receive queue already:
        # read first, and only watch the socket (and arm the deadline) if the
        # handshake still waits for bytes. Saves two epoll_ctl per connection.
        if data is None:
            self._read_client(p)
        else:
            self._feed(p, data)
        if p.state == _READING:
            self.watch(p, EPOLLIN)
            p.deadline = self.reactor.call_later(self.config.handshake_timeout,
                                                 lambda: self._on_deadline(p))

    def on_handshake_event(self, p: _Pending, events: int) -> None:  # type: ignore[override]
        if p.state == _READING:
            self._read_client(p)
        elif p.state == _CONNECTING:
            # Parked socket reporting ERR/HUP (epoll ignores the empty mask for
            # those): stop watching; the relay or the reply sees the error later.
            self.unwatch(p)
        elif p.state == CLOSING:
            self.on_closing_event(p)

    def _recv(self, p: _Pending) -> bytes | None:
        """One read of the client: bytes, b"" at EOF, None when there is nothing
        yet or the read failed (then the connection is aborted: state DONE)."""
        try:
            return p.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            self._abort(p, client_error_reason(exc))
            return None

    def _read_client(self, p: _Pending) -> None:
        data = self._recv(p)
        if data is not None:
            self._feed(p, data)

    def _feed(self, p: _Pending, data: bytes) -> None:
        handshake = p.handshake
        assert handshake is not None  # reading: the handshake decides
        action = handshake.receive(data) if data else handshake.receive_eof()
        if type(action) is OpenUpstream:   # the usual answer, without the dispatch
            p.session.extra["convert"] = handshake.outcome  # type: ignore[index]
            self._open_upstream(p, action)
        elif action is not None:
            self._carry_out(p, action)

    def _on_deadline(self, p: _Pending) -> None:
        p.deadline = None
        if p.state == _READING:
            assert p.handshake is not None  # reading: the handshake decides
            self._carry_out(p, p.handshake.expire())

    # -- actions --------------------------------------------------------------
    def _carry_out(self, p: _Pending, action: Action) -> None:
        p.session.extra["convert"] = self._handshake(p).outcome or "-"  # type: ignore[index]
        if isinstance(action, OpenUpstream):
            self._open_upstream(p, action)
        elif isinstance(action, StartRelay):
            self._relay(p, action)
        elif isinstance(action, ReplyAndClose):
            if action.detail:
                log.debug("conn=%d %s: %s", p.session.id, action.reason, action.detail)
            if action.code is not None:
                self._refused(p, action)
            self._reply_and_close(p, action.reply, action)
        elif isinstance(action, CloseQuietly):
            self._reply_and_close(p, b"", action)
        else:  # pragma: no cover - the handshake returns only the types above
            raise TypeError(f"unknown action {action!r}")

    def _open_upstream(self, p: _Pending, action: OpenUpstream) -> None:
        if p.deadline is not None:
            self.cancel_deadline(p)
        # Not read again until the relay owns it: parked with no interest (the
        # relay's register() then costs one epoll_ctl MOD, not DEL + ADD).
        if p.watched:
            self.reactor.set_mask(p.fd, 0)
        p.state = _CONNECTING
        address, port = action.address, action.port
        # By the address object's identity (see ConvertSettings' memos).
        key = (id(address), port)
        entry = self._targets.get(key)
        if entry is None or entry[0] is not address:
            entry = (address, *upstream_target(address, port))
            _remember(self._targets, key, entry)
        _, family, sockaddr, p.session.target = entry
        p.early = action.early_data
        early = p.early if self.config.upstream_tfo else b""
        p.connect = self.connector.connect(family, sockaddr, partial(self._connected, p),
                                           early_data=early)

    def _connected(self, p: _Pending, result: ConnectResult) -> None:
        p.connect = None
        if p.state != _CONNECTING:  # pragma: no cover - cancelled attempts never call back
            if result.sock is not None:
                result.sock.close()
            return
        extra = p.session.extra
        if result.error is not None:
            p.session.upstream_requested_mptcp = result.requested_mptcp
            action = self._handshake(p).upstream_failed(upstream_failure(result.error))
            self._carry_out(p, action)
            return
        assert result.sock is not None  # success carries a socket
        handshake = p.handshake
        negotiated: Negotiated | None = None
        syn_data = False
        # TCP_INFO only when its answer is needed: the reply to an extended
        # Connect (never a quick one), or whether the server acked the bytes
        # our SYN carried (none queued: the SYN carried none).
        if result.early_sent or (handshake is not None and handshake.wants_negotiated):
            negotiated, syn_data = negotiated_options(result.sock, result.mptcp)
        extra["upstream_tfo"] = "yes" if syn_data else "no"  # type: ignore[index]
        if syn_data:
            self.convert_stats.early_in_syn += 1
        p.result = result
        # Straight to the relay: the outcome in the log fields is already "connect...".
        # A quick connection is a base Connect: confirmed by the bare header.
        self._relay(p, BARE_START if handshake is None
                    else handshake.upstream_connected(negotiated))

    def _relay(self, p: _Pending, action: StartRelay) -> None:
        result = p.result
        assert result is not None  # StartRelay follows a successful connect
        self.hand_to_relay(p)
        rest = p.early
        if result.early_sent:
            rest = rest[result.early_sent:]   # already delivered upstream in the SYN (TFO)
        self.start_relay(p.sock, result, p.session, initial_to_upstream=rest,
                         reply=action.reply, sent_up=result.early_sent)

    def _refused(self, p: _Pending, action: ReplyAndClose) -> None:
        """A refusal: the log line names the target the Connect asked for (not
        ``-``), and a refusal the operator can change is explained, once a minute."""
        handshake = p.handshake
        connect = handshake.connect if handshake is not None else None
        session = p.session
        if connect is not None and session.target == "-":
            session.target = upstream_target(connect.address, connect.port)[2]
        if action.reason == "client-not-allowed":
            self.hint("client", log, f"convert: refused client {p.client} (Error 32): not "
                                     "in the client networks this converter serves; --allow "
                                     "CIDR adds networks (--allow any serves everyone)")
            return
        decision = handshake.target if handshake is not None else None
        if decision is None or decision.allowed:
            return
        advice = allow_target_hint(decision)
        explanation = explain_target(decision, connect.address if connect else None,
                                     advice=False)
        self.hint(f"target:{decision.reason.value}", log,
                  f"convert: refused target {session.target} (Error {int(action.code or 0)}), "
                  f"which {explanation}" + (f": {advice}" if advice else ""))

    def _reply_and_close(self, p: _Pending, reply: bytes,
                         action: ReplyAndClose | CloseQuietly) -> None:
        code = getattr(action, "code", None)
        if code is not None:
            stats = self.convert_stats.errors
            stats[int(code)] = stats.get(int(code), 0) + 1
            if not self.error_limiter.allow(p.client, self.reactor.now):
                self.convert_stats.rate_limited += 1
                p.session.extra["reply"] = "rate-limited"  # type: ignore[index]
                reply = b""
        self.close_with(p, reply, action.reason)

    def _abort(self, p: _Pending, reason: str) -> None:
        """The client broke the connection: close at once, no reply."""
        if p.state != DONE and p.handshake is not None:  # (quick: "connect" already)
            p.session.extra["convert"] = p.handshake.outcome or "-"  # type: ignore[index]
        self.abort(p, reason)

    def _handshake(self, p: _Pending) -> ConvertHandshake:
        """``p``'s handshake; a quick connection's is rebuilt (the upstream
        connect failed: the handshake words the error)."""
        if p.handshake is None:
            assert p.quick is not None  # no handshake: opened the quick way
            settings, data = p.quick
            p.handshake = quick_handshake(settings, p.client, time.time(), data)
        return p.handshake

    def cancel_work(self, p: _Pending) -> None:  # type: ignore[override]
        if p.connect is not None:
            p.connect.cancel()
            p.connect = None

    def abort_pending(self) -> None:
        super().abort_pending()
        self.establish.close()


# --------------------------------------------------------------------------
# Kernel facts the handshake needs (read here, passed in as plain values)
# --------------------------------------------------------------------------

def tfo_sysctl_bits(config: ConvertConfig) -> int:
    """net.ipv4.tcp_fastopen bits the converter needs: the server bit for the
    listener, the client bit for SYN data toward servers."""
    bits = 0
    if config.tfo_queue:
        bits |= TFO_SERVER_ENABLE
    if config.upstream_tfo:
        bits |= TFO_CLIENT_ENABLE
    return bits


def _tfo_value(bits: int) -> int:
    """What net.ipv4.tcp_fastopen should be for ``bits``: the current value with them."""
    try:
        return int(read_sysctl(TFO_SYSCTL)) | bits
    except (KernelError, ValueError):
        return bits | TFO_CLIENT_ENABLE | TFO_SERVER_ENABLE


def tfo_advice(bits: int) -> str:
    """What to do when the converter may not manage the TFO sysctl itself."""
    return (f"run as root, or set {TFO_SYSCTL}={_tfo_value(bits)} yourself and pass "
            "--no-sysctl")


def check_tfo_sysctl_rights(bits: int) -> None:
    """Before anything changes: :class:`PrivilegeError` (one line: what is missing,
    why, what to do) unless this process may set ``bits`` of net.ipv4.tcp_fastopen
    and record itself as their user (kernel/sysctl.py, SharedSysctlBits)."""
    if not bits:
        return
    lacks = []
    if not can_write_sysctl(sysctl_path(TFO_SYSCTL)):
        lacks.append(f"CAP_NET_ADMIN (to write {TFO_SYSCTL})")
    if not can_create_in(SHARED_STATE_DIR):
        lacks.append(f"CAP_DAC_OVERRIDE (to record the sysctl's users in {SHARED_STATE_DIR})")
    if lacks:
        raise PrivilegeError(
            f"convert sets bits {bits:#x} of {TFO_SYSCTL} (TCP Fast Open: the Convert "
            f"request rides in the SYN) and needs {' and '.join(lacks)}: "
            f"{tfo_advice(bits)}; nothing was changed")


def acquire_tfo_bits(holder: SharedSysctlBits) -> None:
    """``holder.acquire()``, its failure saying what to do about it."""
    try:
        holder.acquire()
    except KernelError as exc:
        raise KernelError(f"{exc}: {tfo_advice(holder.bits)}", exc.errno) from None


def _remember(memo: dict, key: object, value: object) -> None:
    if len(memo) >= MEMO_SIZE:
        memo.clear()
    memo[key] = value


def negotiated_options(sock: socket.socket, mptcp: bool) -> tuple[Negotiated, bool]:
    """(what the kernel negotiated with the server, whether its SYN data was acked).

    Reads 8 bytes of TCP_INFO, not the whole struct: this runs per connection."""
    try:
        options, snd_wscale = tcp_options(sock)
    except (OSError, SockInfoError):
        return Negotiated(mptcp=mptcp), False
    checksum = False
    if mptcp:
        try:
            minfo = mptcp_info(sock)
        except (OSError, SockInfoError):
            minfo = None
        checksum = bool(minfo is not None and minfo.csum_enabled)
    negotiated = Negotiated(
        mptcp=mptcp, sack=bool(options & TCPI_OPT_SACK),
        timestamps=bool(options & TCPI_OPT_TIMESTAMPS),
        window_scale=snd_wscale if options & TCPI_OPT_WSCALE else None,
        mptcp_checksum=checksum)
    return negotiated, bool(options & TCPI_OPT_SYN_DATA)


def connect_target(address: IPAddress) -> tuple[int, str, str]:
    """(family, address text for connect(), the address as ``format_addr`` writes it)."""
    host = str(address)
    if address.version == 6:
        return socket.AF_INET6, host, f"[{host}]"
    return socket.AF_INET, host, host


def upstream_target(address: IPAddress, port: int) -> tuple[int, tuple, str]:
    """(family, sockaddr for connect(), ``host:port`` as ``format_addr`` writes it)."""
    family, host, label = connect_target(address)
    sockaddr = (host, port, 0, 0) if family == socket.AF_INET6 else (host, port)
    return family, sockaddr, f"{label}:{port}"


def upstream_failure(error: UpstreamError) -> UpstreamFailure:
    """The Connector's error as the handshake's failure kind (and ICMP code)."""
    if error.reason == REFUSED:
        return UpstreamFailure(UpstreamFailureKind.REFUSED)
    if error.reason == UNREACHABLE:
        icmp = error.icmp_code
        if icmp is None and error.errno is not None:
            icmp = _ICMP_CODE_BY_ERRNO.get(error.errno)
        if icmp is not None:
            return UpstreamFailure(UpstreamFailureKind.UNREACHABLE, icmp)
        return UpstreamFailure(UpstreamFailureKind.NETWORK)  # e.g. EADDRNOTAVAIL: local
    if error.reason == TIMEOUT:
        return UpstreamFailure(UpstreamFailureKind.TIMEOUT)
    if error.reason == RESOURCES:
        return UpstreamFailure(UpstreamFailureKind.RESOURCES)
    return UpstreamFailure(UpstreamFailureKind.NETWORK)


def supported_kinds(*, mptcp: bool, tfo: bool) -> tuple[int, ...]:
    """TCP extensions this converter can use toward servers (RFC 8803 §4.2.4)."""
    kinds = []
    for key, kind in (("net.ipv4.tcp_window_scaling", TcpOptionKind.WINDOW_SCALE),
                      ("net.ipv4.tcp_sack", TcpOptionKind.SACK_PERMITTED),
                      ("net.ipv4.tcp_timestamps", TcpOptionKind.TIMESTAMPS)):
        try:
            enabled = int(read_sysctl(key)) != 0
        except (KernelError, ValueError):
            enabled = False
        if enabled:
            kinds.append(int(kind))
    if mptcp:
        kinds.append(int(TcpOptionKind.MPTCP))
    if tfo:
        kinds.append(int(TcpOptionKind.FAST_OPEN))
    return tuple(kinds)
