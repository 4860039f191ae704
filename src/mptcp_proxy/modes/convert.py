"""RFC 8803 converter handshake, sans-IO: bytes and events in, actions out.

This module contains no networking code. The server (``server/convert.py``)
reads the client's bytes, passes the time and the outcome of the upstream
connection in, and carries out the action it gets back. Everything the
converter decides (authorization, cookies, target policy, which error code, the
reply bytes) is decided here and unit-tested without a socket.

Design rules:
- One handshake per accepted connection, a state machine:
  ``READING`` (the Convert message, from the SYN data or after the handshake)
  -> ``CONNECTING`` (upstream) -> ``RELAYING``; any refusal -> ``CLOSING``.
  Every step is a ``state_*``-style method returning one action or ``None``
  ("need more bytes").
- One error path (:meth:`ConvertHandshake._refuse`): an Error TLV in the byte
  stream (RFC 8803 §4.2.8), then a normal close. The server rate-limits the
  replies with :class:`TokenBucket`; over the rate it closes without one.
- Idempotent (RFC 8803 §6.2: SYN data may be replayed): the action is a pure
  function of (settings, client address, time window, bytes). No state is
  kept across connections except what the server feeds in (pending counts).
- The clock is an input: ``wall_now`` (seconds since the epoch) only selects a
  cookie window.

Decisions on points the RFC leaves open (each tested in
``tests/unit/test_modes_convert.py``):

* Order of checks: client source network (32) -> decoding (0, 1, 2) -> cookie
  (3 / 32, only for messages carrying a Connect) -> target (1 for loopback,
  unspecified, multicast, broadcast in any spelling; 32 for policy refusals,
  including the proxy's own addresses: a hairpin) -> extended Connect options
  (33) -> connect upstream.
* Info alone is answered with Supported TCP Extensions and a close; Info with
  a Connect gets the Supported TCP Extensions TLV in the reply that also
  confirms the connection.
* A base Connect that succeeds is confirmed by a bare header (Total Length 1,
  see ``wire/convert.py``); an extended Connect by an Extended TCP Header TLV
  rebuilt from what the kernel negotiated with the server (TCP_INFO options,
  MPTCP or not); the raw SYN+ACK is not visible to a socket user, so
  timestamp values are zero and MP_CAPABLE is sent in its 4-byte form
  without the server's key.
* Handshake deadline with nothing received: close without a reply (the peer
  may not speak Convert at all); with a partial message: Malformed, echoing it.
* Cookies (RFC 8803 §4.2.7): HMAC-SHA256 over the client address and a time
  window, keyed by the operator's secret, 16 bytes; the current and the
  previous window are accepted. Stateless, so replays and restarts are fine.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections import OrderedDict
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import TypeAlias, Union

from mptcp_proxy.errors import ProtocolError
from mptcp_proxy.modes.policy import (
    ClientPolicy, IPAddress, TargetDecision, TargetPolicy, TargetVerdict, normalize,
)
from mptcp_proxy.wire.convert import (
    BASE_CONNECT_MESSAGE_LEN,
    HEADER_WORDS,
    MAGIC,
    VERSION,
    ConnectTlv,
    ConvertDecoder,
    ConvertErrorCode,
    ConvertMessage,
    ConvertProtocolError,
    ConvertSender,
    ErrorTlv,
    IncompleteConvertMessage,
    ExtendedTcpHeaderTlv,
    InfoTlv,
    SupportedTcpExtTlv,
    TcpOption,
    TcpOptionKind,
    decode_message,
    error_reply_for,
    remembered_base_connect,
)

# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------

COOKIE_LEN = 16
"""Bytes of HMAC-SHA256 kept as the cookie (a whole number of words)."""
MIN_COOKIE_SECRET_LEN = 16
DEFAULT_COOKIE_WINDOW_S = 3600
"""A cookie is valid for one to two windows."""
_COOKIE_CONTEXT = b"mptcp-proxy convert cookie v1\x00"

CONNECT_OPTION_KINDS: frozenset[int] = frozenset({
    TcpOptionKind.MSS, TcpOptionKind.WINDOW_SCALE, TcpOptionKind.SACK_PERMITTED,
    TcpOptionKind.TIMESTAMPS, TcpOptionKind.MPTCP, TcpOptionKind.FAST_OPEN,
})
"""Options an extended Connect may list: the kernel negotiates them toward the
server by itself (RFC 8803 §4.2.5). Anything else is refused with Error 33."""
REFUSED_OPTION_KINDS: frozenset[int] = frozenset({TcpOptionKind.TCP_AO})
"""Never accepted, whatever the configuration (RFC 8803 §4.2.5: TCP-AO)."""

MP_CAPABLE_V1 = 0x01
"""MP_CAPABLE subtype 0, version 1 (RFC 8684 §3.1): the first byte of its data."""
MP_CAPABLE_FLAG_A = 0x80   # checksum required
MP_CAPABLE_FLAG_H = 0x01   # HMAC-SHA256
TIMESTAMPS_DATA_LEN = 8

DEFAULT_NETWORK_RETRY_S = 5
"""Retry delay suggested with Network Failure (65)."""
DEFAULT_RESOURCE_RETRY_S = 0
"""Retry delay suggested with Resource Exceeded (64); 0 means "at least 30 s"."""

BARE_REPLY = bytes((VERSION, HEADER_WORDS)) + MAGIC.to_bytes(2, "big")
"""The reply confirming a base Connect: a header alone (``ConvertMessage(()).encode()``)."""
MEMO_SIZE = 4096
"""Entries kept by each policy memo of :class:`ConvertSettings` (cleared when full)."""


# --------------------------------------------------------------------------
# Cookies (RFC 8803 §4.2.7)
# --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CookieAuthority:
    """Issues and checks stateless cookies bound to a client address and a window."""

    secret: bytes = field(repr=False)
    window_s: int = DEFAULT_COOKIE_WINDOW_S

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) < MIN_COOKIE_SECRET_LEN:
            raise ValueError(f"a cookie secret has at least {MIN_COOKIE_SECRET_LEN} bytes")
        if isinstance(self.window_s, bool) or not isinstance(self.window_s, int) \
                or self.window_s < 1:
            raise ValueError("cookie window must be a positive number of seconds")

    def _mac(self, client: IPAddress, window: int) -> bytes:
        client = normalize(client)
        msg = (_COOKIE_CONTEXT + window.to_bytes(8, "big", signed=True)
               + bytes((client.version,)) + client.packed)
        return hmac.new(self.secret, msg, hashlib.sha256).digest()[:COOKIE_LEN]

    def window(self, wall_now: float) -> int:
        return int(wall_now // self.window_s)

    def issue(self, client: IPAddress, wall_now: float) -> bytes:
        return self._mac(client, self.window(wall_now))

    def valid(self, client: IPAddress, cookie: bytes, wall_now: float) -> bool:
        if len(cookie) != COOKIE_LEN:
            return False
        current = self.window(wall_now)
        return any(hmac.compare_digest(cookie, self._mac(client, w))
                   for w in (current, current - 1))


# --------------------------------------------------------------------------
# Rate limiting of error replies (PROTOCOLS.md: "Rate-limit errors")
# --------------------------------------------------------------------------

class TokenBucket:
    """Per-key token buckets with a bounded number of keys (least recently used go)."""

    def __init__(self, rate: float, burst: float, max_keys: int = 65536) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate > 0, burst >= 1 and max_keys >= 1 are required")
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[object, tuple[float, float]] = OrderedDict()

    def allow(self, key: object, now: float) -> bool:
        """Take one token for ``key`` at monotonic time ``now``; False when empty."""
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return allowed

    def __len__(self) -> int:
        return len(self._buckets)


# --------------------------------------------------------------------------
# What the server tells the handshake
# --------------------------------------------------------------------------

class UpstreamFailureKind(enum.Enum):
    REFUSED = "refused"          # RST from the server          -> 96
    UNREACHABLE = "unreachable"  # ICMP hard error               -> 97
    TIMEOUT = "timeout"          # no answer within the timeout  -> 65
    NETWORK = "network"          # any other network failure     -> 65
    RESOURCES = "resources"      # out of fds/memory here        -> 64


@dataclass(frozen=True, slots=True)
class UpstreamFailure:
    kind: UpstreamFailureKind
    icmp_code: int | None = None
    """ICMP code of the hard error, when known (Destination Unreachable)."""


@dataclass(frozen=True, slots=True)
class Negotiated:
    """What the kernel negotiated with the server (TCP_INFO, TCP_IS_MPTCP)."""

    mptcp: bool = False
    sack: bool = False
    timestamps: bool = False
    window_scale: int | None = None
    """The server's window scale shift (tcpi_snd_wscale), None if not negotiated."""
    mptcp_checksum: bool = False

    def syn_ack_options(self) -> tuple[TcpOption, ...]:
        """The SYN+ACK options these facts imply, in Linux's order (RFC 8803 §4.2.6)."""
        options: list[TcpOption] = []
        if self.sack:
            options.append(TcpOption(TcpOptionKind.SACK_PERMITTED))
        if self.timestamps:
            options.append(TcpOption(TcpOptionKind.TIMESTAMPS, bytes(TIMESTAMPS_DATA_LEN)))
        if self.window_scale is not None:
            options.append(TcpOption(TcpOptionKind.WINDOW_SCALE, bytes((self.window_scale,))))
        if self.mptcp:
            flags = MP_CAPABLE_FLAG_H | (MP_CAPABLE_FLAG_A if self.mptcp_checksum else 0)
            options.append(TcpOption(TcpOptionKind.MPTCP, bytes((MP_CAPABLE_V1, flags))))
        return tuple(options)


# --------------------------------------------------------------------------
# Actions (what the server must do next)
# --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class OpenUpstream:
    """Connect to the target; ``early_data`` (the bytes after the TLVs) may ride the SYN."""

    address: IPAddress
    port: int
    early_data: bytes
    requested_options: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class StartRelay:
    """Send ``reply`` to the client first, then relay both ways."""

    reply: bytes


@dataclass(frozen=True, slots=True)
class ReplyAndClose:
    """Write ``reply`` (unless rate-limited, for errors), then close with a FIN."""

    reply: bytes
    reason: str
    """Stable close reason for the log line (``info``, ``malformed``, ``target-denied`` ...)."""
    code: ConvertErrorCode | None = None
    """The Error code sent, None for an answer that is not an error."""
    detail: str = ""


@dataclass(frozen=True, slots=True)
class CloseQuietly:
    """Close with a FIN and say nothing (the peer never spoke)."""

    reason: str
    detail: str = ""


Action: TypeAlias = Union[OpenUpstream, StartRelay, ReplyAndClose, CloseQuietly]

BARE_START = StartRelay(BARE_REPLY)
"""Confirms every base Connect; immutable, so one serves all of them."""


class HandshakeState(enum.Enum):
    READING = "reading"
    CONNECTING = "connecting"
    RELAYING = "relaying"
    CLOSING = "closing"


# --------------------------------------------------------------------------
# Settings and the handshake
# --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ConvertSettings:
    """Everything the handshake decides with; the server builds it once (and on refresh)."""

    targets: TargetPolicy = field(default_factory=TargetPolicy)
    clients: ClientPolicy = field(default_factory=ClientPolicy)
    cookies: CookieAuthority | None = None
    """Require a Cookie TLV with every Connect (None: no cookies)."""
    supported_kinds: tuple[int, ...] = (TcpOptionKind.MPTCP,)
    """Listed in Supported TCP Extensions, answering Info (RFC 8803 §4.2.4)."""
    connect_option_kinds: frozenset[int] = CONNECT_OPTION_KINDS
    max_pending_per_client: int = 64
    """Handshakes one client address may have open at once; above: Error 64."""
    network_retry_s: int = DEFAULT_NETWORK_RETRY_S
    resource_retry_s: int = DEFAULT_RESOURCE_RETRY_S
    # Memos of the two policies' answers: settings are immutable (the server
    # replaces them to refresh its addresses, which starts empty memos), and
    # both policies are pure functions of the address, so a remembered answer
    # is the answer. Keyed by the address object's identity (each entry keeps
    # its object, so the id cannot be reused while remembered): hashing an
    # ipaddress object runs Python code, and the addresses handed in come
    # from memos of their own (the codec's for Connect addresses, the
    # server's for clients), so the same address is the same object. Another
    # object with the same value just costs one policy check.
    _targets_memo: dict[int, tuple[IPAddress, TargetDecision]] = field(
        default_factory=dict, init=False, repr=False, compare=False)
    _clients_memo: dict[int, tuple[IPAddress, bool]] = field(
        default_factory=dict, init=False, repr=False, compare=False)
    # Connect TLV (by identity, like the addresses: the codec hands out one
    # object per base-Connect message) -> what the policy makes of it.
    _plans_memo: dict[int, tuple[ConnectTlv, "_ConnectPlan"]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "supported_kinds", tuple(self.supported_kinds))
        object.__setattr__(self, "connect_option_kinds",
                           frozenset(self.connect_option_kinds) - REFUSED_OPTION_KINDS)
        SupportedTcpExtTlv(self.supported_kinds)  # validates the kinds
        if self.max_pending_per_client < 1:
            raise ValueError("max_pending_per_client must be >= 1")

    def check_target(self, address: IPAddress) -> TargetDecision:
        """``targets.check(address)``, remembered."""
        return _remembered(self._targets_memo, address, self.targets.check)

    def allows_client(self, address: IPAddress) -> bool:
        """``clients.allows(address)``, remembered."""
        return _remembered(self._clients_memo, address, self.clients.allows)

    def connect_plan(self, connect: ConnectTlv) -> "_ConnectPlan":
        """What the target policy and the option rules make of ``connect`` (a pure
        function of the two), remembered."""
        return _remembered(self._plans_memo, connect, self._plan)

    def _plan(self, connect: ConnectTlv) -> "_ConnectPlan":
        decision = self.check_target(connect.address)
        if decision.verdict is not TargetVerdict.ALLOWED:
            return _ConnectPlan(decision, (), None)
        options = connect.options
        refused = _refused_kinds(options, self.connect_option_kinds) if options else ()
        if refused:
            return _ConnectPlan(decision, refused, None)
        kinds = tuple(option.kind for option in options) if options else ()
        return _ConnectPlan(decision, (), OpenUpstream(connect.address, connect.port, b"", kinds))


@dataclass(frozen=True, slots=True)
class _ConnectPlan:
    """The policy's answer to one Connect TLV, whoever sends it."""

    decision: TargetDecision
    refused: tuple[int, ...]
    """Option kinds refused (Error 33), in the order the Connect lists them."""
    action: OpenUpstream | None
    """The connection to open, without early data (immutable: shared); None if refused."""


def _refused_kinds(options: tuple[TcpOption, ...], accepted: frozenset[int]) -> tuple[int, ...]:
    refused: list[int] = []
    for option in options:
        if option.kind not in accepted and option.kind not in refused:
            refused.append(option.kind)
    return tuple(refused)


def _remembered(memo: dict, key: object, compute):  # type: ignore[no-untyped-def]
    """``compute(key)``, memoized by the key object's identity (hashing an
    ipaddress object runs Python; the codec hands out the same object for the
    same address or Connect). Each entry keeps its key alive, so its id cannot
    be reused while remembered. Bounded: cleared when full."""
    entry = memo.get(id(key))
    if entry is not None and entry[0] is key:
        return entry[1]
    value = compute(key)
    if len(memo) >= MEMO_SIZE:
        memo.clear()
    memo[id(key)] = (key, value)
    return value


def open_quick(settings: ConvertSettings, client: IPAddress, data: bytes,
                pending_from_client: int = 0) -> OpenUpstream | None:
    """The usual 0-RTT connection decided without a :class:`ConvertHandshake`.

    ``data`` is the first read of a connection. When it starts with a
    base-Connect message the codec has decoded lately, no cookie is required,
    and client, target and pending count pass, this returns what
    ``ConvertHandshake(settings, client, t).start(pending_from_client)``
    followed by ``.receive(data)`` would (tested to be equal on every input);
    the connection is then in the handshake's CONNECTING state with outcome
    ``connect``, and is confirmed by the bare header (``BARE_REPLY``). None
    means: run the handshake, which decides everything else, refusals
    included. ``quick_handshake`` rebuilds the handshake when one is needed
    after all (the upstream connect failed)."""
    if settings.cookies is not None or type(data) is not bytes:
        return None
    message = remembered_base_connect(data)
    if message is None or pending_from_client >= settings.max_pending_per_client:
        return None
    if type(client) is not IPv4Address:
        client = normalize(client)
    if not settings.allows_client(client):
        return None
    action = settings.connect_plan(message.tlvs[0]).action
    if action is None:
        return None
    if len(data) > BASE_CONNECT_MESSAGE_LEN:
        return OpenUpstream(action.address, action.port, data[BASE_CONNECT_MESSAGE_LEN:],
                            action.requested_options)
    return action  # shared: immutable


def quick_handshake(settings: ConvertSettings, client: IPAddress, wall_now: float,
                    data: bytes) -> "ConvertHandshake":
    """The handshake of a connection :func:`open_quick` opened, in the state it
    left it (CONNECTING): the same pure decision, made again."""
    handshake = ConvertHandshake(settings, client, wall_now)
    action = handshake.receive(data)
    if type(action) is not OpenUpstream:  # pragma: no cover - same inputs, same answer
        raise RuntimeError(f"open_quick opened what the handshake refuses: {action!r}")
    return handshake


_DECODING_REASONS = {
    ConvertErrorCode.UNSUPPORTED_VERSION: "unsupported-version",
    ConvertErrorCode.MALFORMED_MESSAGE: "malformed",
    ConvertErrorCode.UNSUPPORTED_MESSAGE: "unsupported-message",
}


_READING = HandshakeState.READING
_CONNECTING = HandshakeState.CONNECTING
_CLIENT = ConvertSender.CLIENT


class ConvertHandshake:
    """The converter's side of one RFC 8803 connection."""

    __slots__ = ("settings", "client", "wall_now", "state", "decoder", "message", "connect",
                 "early_data", "target", "outcome", "_info", "_whole")

    def __init__(self, settings: ConvertSettings, client: IPAddress, wall_now: float) -> None:
        self.settings = settings
        self.client = client if type(client) is IPv4Address else normalize(client)
        self.wall_now = wall_now
        self.state = _READING
        self.decoder: ConvertDecoder | None = None
        """Buffers a message that spans reads (or broke a rule); none while the first
        read held a whole message, as it does with TCP Fast Open."""
        self._whole = b""  # the message, when it came whole in one read
        self.message: ConvertMessage | None = None
        self.connect: ConnectTlv | None = None
        """The message's Connect TLV, once it is decoded (None: none, or not yet)."""
        self.early_data = b""
        """Application bytes that followed the client's TLVs (once decoded)."""
        self.target: TargetDecision | None = None
        self.outcome = ""
        """``connect``, ``info``, ``connect+info``, ``error:CODE`` ... for the log line."""
        self._info = False  # the message carried an Info TLV

    # -- properties ---------------------------------------------------------
    @property
    def received(self) -> int:
        """Bytes of the Convert message buffered so far."""
        return len(self._received())

    def _received(self) -> bytes:
        """The Convert message bytes so far (what an error reply echoes)."""
        return self.decoder.received if self.decoder is not None else self._whole

    # -- events -------------------------------------------------------------
    def start(self, pending_from_client: int = 0) -> Action | None:
        """The connection was accepted; ``pending_from_client`` other handshakes of
        the same address are open. An action means: do not read, answer now."""
        if self.state is not _READING:
            self._expect(_READING)
        if not self.settings.allows_client(self.client):
            return self._refuse(ErrorTlv.not_authorized(), "client-not-allowed",
                                f"client {self.client} not in the allowed networks")
        if pending_from_client >= self.settings.max_pending_per_client:
            return self._refuse(ErrorTlv.resource_exceeded(self.settings.resource_retry_s),
                                "client-over-limit",
                                f"{pending_from_client} handshakes already open from "
                                f"{self.client}")
        return None

    def receive(self, data: bytes) -> Action | None:
        """Bytes from the client; None while the Convert message is incomplete."""
        if self.state is not _READING:
            self._expect(_READING)
        decoder = self.decoder
        message = None
        if decoder is None and type(data) is bytes:
            # The first read: usually the whole message (it rode in the SYN).
            # Decoded straight from it; anything else goes through a decoder.
            try:
                message, used = decode_message(data, _CLIENT)
            except (IncompleteConvertMessage, ConvertProtocolError):
                pass
            else:
                self._whole = data[:used]
                self.early_data = data[used:]
        if message is None:
            if decoder is None:
                decoder = self.decoder = ConvertDecoder(_CLIENT)
            try:
                message = decoder.feed(data)
            except ConvertProtocolError as error:
                return self._refuse_decoding(error)
            if message is None:
                return None
            self.early_data = decoder.leftover
        self.message = message
        tlvs = message.tlvs
        if len(tlvs) == 1 and type(tlvs[0]) is ConnectTlv:
            self.connect = tlvs[0]   # a Connect alone: nearly every message
        else:
            for tlv in tlvs:  # the codec guarantees one of each type at most
                if type(tlv) is ConnectTlv:
                    self.connect = tlv
                elif type(tlv) is InfoTlv:
                    self._info = True
        return self._decide(message)

    def receive_eof(self) -> Action:
        """The client closed its side before the message was complete."""
        self._expect(HandshakeState.READING)
        decoder = self.decoder
        if decoder is None or not decoder.received:
            return self._close_quietly("client-eof", "client closed before sending anything")
        try:
            decoder.feed_eof()
        except ConvertProtocolError as error:
            return self._refuse_decoding(error)
        return self._close_quietly("client-eof", "EOF")  # not reached: READING means unfinished

    def expire(self) -> Action:
        """The handshake deadline passed while reading (one deadline, not per read)."""
        self._expect(HandshakeState.READING)
        received = self._received()
        if not received:
            return self._close_quietly("handshake-timeout", "nothing received")
        error = ConvertProtocolError(
            f"handshake deadline passed after {len(received)} bytes of an unfinished message")
        return self._refuse(error_reply_for(error, received).tlvs[0],
                            "handshake-timeout", str(error))

    @property
    def wants_negotiated(self) -> bool:
        """The reply needs what was negotiated with the server (an extended Connect):
        without it, :meth:`upstream_connected` may be called with None."""
        connect = self.connect
        return connect is not None and bool(connect.options)

    def upstream_connected(self, negotiated: Negotiated | None) -> StartRelay:
        if self.state is not _CONNECTING:
            self._expect(_CONNECTING)
        assert self.connect is not None  # CONNECTING
        info = self._info
        extended = bool(self.connect.options)
        self.state = HandshakeState.RELAYING
        if not info and not extended:
            return BARE_START  # the common case: nothing to build
        tlvs = []
        if info:
            tlvs.append(SupportedTcpExtTlv(self.settings.supported_kinds))
        if extended:
            if negotiated is None:
                # Our own sequencing bug (see wants_negotiated), never peer input.
                raise RuntimeError("an extended Connect is answered from the negotiated options")
            tlvs.append(ExtendedTcpHeaderTlv(negotiated.syn_ack_options()))
        return StartRelay(ConvertMessage(tuple(tlvs)).encode())

    def upstream_failed(self, failure: UpstreamFailure) -> Action:
        self._expect(HandshakeState.CONNECTING)
        kind = failure.kind
        if kind is UpstreamFailureKind.REFUSED:
            tlv = ErrorTlv.connection_reset()
        elif kind is UpstreamFailureKind.UNREACHABLE and failure.icmp_code is not None:
            tlv = ErrorTlv.destination_unreachable(failure.icmp_code)
        elif kind is UpstreamFailureKind.RESOURCES:
            tlv = ErrorTlv.resource_exceeded(self.settings.resource_retry_s)
        else:
            tlv = ErrorTlv.network_failure(self.settings.network_retry_s)
        return self._refuse(tlv, f"upstream-{kind.value}", f"upstream {kind.value}")

    # -- decisions ------------------------------------------------------------
    def _decide(self, message: ConvertMessage) -> Action:
        connect = self.connect
        if connect is None:
            # Info alone (the codec guarantees Info or Connect): capabilities, then close.
            self.state = HandshakeState.CLOSING
            self.outcome = "info"
            reply = ConvertMessage((SupportedTcpExtTlv(self.settings.supported_kinds),))
            return ReplyAndClose(reply.encode(), "info")
        cookies = self.settings.cookies
        if cookies is not None:
            cookie = message.cookie
            if cookie is None:
                return self._refuse(
                    ErrorTlv.missing_cookie(cookies.issue(self.client, self.wall_now)),
                    "missing-cookie", "no Cookie TLV")
            if not cookies.valid(self.client, cookie.cookie, self.wall_now):
                return self._refuse(ErrorTlv.not_authorized(), "bad-cookie", "invalid cookie")
        plan = self.settings.connect_plan(connect)
        decision = plan.decision
        self.target = decision
        action = plan.action
        if action is not None:  # allowed, no option refused: the usual case
            self.state = _CONNECTING
            self.outcome = "connect+info" if self._info else "connect"
            early = self.early_data
            if early:
                return OpenUpstream(action.address, action.port, early,
                                    action.requested_options)
            return action  # shared: immutable
        if decision.verdict is TargetVerdict.FORBIDDEN:
            # RFC 8803 §4.2.5: loopback, multicast, broadcast targets are Malformed.
            error = ConvertProtocolError(
                f"Connect to {decision.reason.value} address {decision.address}")
            return self._refuse(error_reply_for(error, self._received()).tlvs[0],
                                "target-forbidden", str(error))
        if decision.verdict is TargetVerdict.DENIED:
            return self._refuse(ErrorTlv.not_authorized(), "target-denied",
                                f"target {connect.address} refused: {decision.reason.value}")
        refused = plan.refused
        assert refused  # the plan had no action: the target or an option was refused
        return self._refuse(ErrorTlv.unsupported_tcp_option(refused), "unsupported-option",
                            f"unsupported TCP options {list(refused)}")

    # -- the one error path -------------------------------------------------
    def _refuse_decoding(self, error: ProtocolError) -> Action:
        reason = _DECODING_REASONS.get(error.code, "malformed")
        return self._refuse(error_reply_for(error, self._received()).tlvs[0], reason, str(error))

    def _refuse(self, tlv: ErrorTlv, reason: str, detail: str) -> ReplyAndClose:
        self.state = HandshakeState.CLOSING
        code = ConvertErrorCode(tlv.code)
        self.outcome = f"error:{int(code)}"
        return ReplyAndClose(ConvertMessage((tlv,)).encode(), reason, code, detail)

    def _close_quietly(self, reason: str, detail: str) -> CloseQuietly:
        self.state = HandshakeState.CLOSING
        self.outcome = "none"
        return CloseQuietly(reason, detail)

    def _expect(self, state: HandshakeState) -> None:
        if self.state is not state:
            # Our own sequencing bug, never peer input.
            raise RuntimeError(f"handshake is {self.state.value}, not {state.value}")


__all__ = [
    "BARE_REPLY", "BARE_START", "COOKIE_LEN", "CONNECT_OPTION_KINDS", "REFUSED_OPTION_KINDS",
    "Action",
    "CloseQuietly", "ConvertHandshake", "ConvertSettings", "CookieAuthority", "HandshakeState",
    "Negotiated", "OpenUpstream", "ReplyAndClose", "StartRelay", "TokenBucket",
    "UpstreamFailure", "UpstreamFailureKind", "open_quick", "quick_handshake",
]
