"""RFC 8803 client side, sans-IO: the request a client sends, the converter's answer.

This module contains no networking code. The blocking and asyncio library
(:mod:`mptcp_proxy.convert_client`) and the client agent's epoll reactor drive
the same :class:`ConvertClientHandshake` with the bytes they read and write.

Design rules (each one is tested in ``tests/unit/test_modes_convert_client.py``):

1. One handshake per connection: :meth:`ConvertClientHandshake.request_bytes`
   is the Convert message that opens the byte stream (it rides in the SYN
   with TCP Fast Open, RFC 8803 §3), then every byte read from the converter
   goes to :meth:`~ConvertClientHandshake.feed` until it returns a
   :class:`ConvertAccepted`.
2. Peer input ends in exactly one of: ``None`` (need more),
   :class:`ConvertAccepted`, :class:`ConvertRefused` (the converter answered
   with an Error TLV, RFC 8803 §4.2.8: reset the connection) or a
   :class:`~mptcp_proxy.wire.convert.ConvertProtocolError` (the converter's
   answer breaks RFC 8803). A failed handshake raises the same error again on
   every later call.
3. :attr:`ConvertClientHandshake.wanted` says how many bytes may be read
   without reading past the converter's message, so a blocking caller can
   leave the application bytes that follow it in the socket. Feeding more is
   fine too: the surplus comes back as :attr:`ConvertAccepted.leftover`.
4. No clock: :class:`MptcpTargetCache` takes ``now`` from its caller.

Decisions on what the RFC leaves open:

* An Error TLV wins over anything else in the same message.
* A reply to a Connect without an Extended TCP Header TLV leaves
  :attr:`ConvertAccepted.server_mptcp` ``None`` (unknown), even after an
  extended Connect (RFC 8803 §4.2.6 says the converter MUST return one; a
  client cannot do better than "unknown" when it does not).
* A reply to Info without a Supported TCP Extensions TLV gives
  ``supported=None``.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NoReturn, TypeAlias, Union

from mptcp_proxy.errors import ProtocolError
from mptcp_proxy.wire.convert import (
    HEADER_LEN,
    RESOURCE_EXCEEDED_DEFAULT_RETRY_S,
    WORD,
    ConnectTlv,
    ConvertDecoder,
    ConvertErrorCode,
    ConvertMessage,
    ConvertProtocolError,
    ConvertSender,
    CookieTlv,
    ErrorTlv,
    ExtendedTcpHeaderTlv,
    InfoTlv,
    TcpOption,
    TcpOptionKind,
    encode_message,
)

IPAddress: TypeAlias = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
TargetLike: TypeAlias = tuple[Union[str, IPAddress], int]
TargetKey: TypeAlias = tuple[IPAddress, int]

_TOTAL_LENGTH_OFFSET = 1

MP_CAPABLE_SYN_OPTION = TcpOption(TcpOptionKind.MPTCP, bytes((0x01, 0x01)))
"""The MP_CAPABLE option of an MPTCPv1 SYN (RFC 8684 §3.1): subtype 0, version 1,
flag H (HMAC-SHA256). Listing it in an extended Connect asks the converter to
report whether the server answered MP_CAPABLE (RFC 8803 §4.2.6, §5.1)."""

DEFAULT_MPTCP_CACHE_TTL_S = 600.0
"""How long a "this server speaks MPTCP" answer is trusted."""
DEFAULT_MPTCP_CACHE_ENTRIES = 4096


def target_key(target: TargetLike) -> TargetKey:
    """``(address, port)`` with the address parsed; IPv4-mapped IPv6 becomes IPv4.

    Raises ``ValueError``/``TypeError`` for something that is not an IP
    literal and a port (local misuse: the Convert protocol carries addresses,
    never names).
    """
    if not isinstance(target, tuple) or len(target) != 2:
        raise TypeError(f"a target is an (address, port) tuple, not {target!r}")
    host, port = target
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 0xFFFF:
        raise ValueError(f"target port must be 1..65535, not {port!r}")
    if isinstance(host, str):
        address: IPAddress = ipaddress.ip_address(host.split("%", 1)[0])
    elif isinstance(host, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        address = host
    else:
        raise TypeError(f"target address must be an IP literal, not {host!r}")
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address, port


# --------------------------------------------------------------------------
# The converter's answer
# --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ConvertAccepted:
    """The converter accepted: what its message said, and the bytes that followed it."""

    extended_header: ExtendedTcpHeaderTlv | None
    """The server's SYN+ACK options (RFC 8803 §4.2.6), when the converter sent them."""
    server_mptcp: bool | None
    """True if the server answered MP_CAPABLE, False if the converter showed its
    SYN+ACK without it, None if the converter did not say."""
    supported: tuple[int, ...] | None
    """TCP option kinds the converter supports (answer to Info, RFC 8803 §4.2.4)."""
    leftover: bytes
    """Application bytes received after the converter's message."""
    message: ConvertMessage
    """The whole decoded message."""


class ConvertRefused(ProtocolError):
    """The converter answered with an Error TLV (RFC 8803 §4.2.8); the client resets.

    ``code`` is the :class:`ConvertErrorCode` (a plain int for codes outside the
    registry) and ``error`` the TLV. :func:`refusal_for` picks the subclass
    named after the code, so callers can ``except RefusedMissingCookie``.
    """

    code: ConvertErrorCode | int

    def __init__(self, error: ErrorTlv, message: str | None = None) -> None:
        if not isinstance(error, ErrorTlv):
            raise TypeError("ConvertRefused needs the ErrorTlv the converter sent")
        self.error = error
        name = (error.code.name if isinstance(error.code, ConvertErrorCode)
                else f"unregistered error {error.code}")
        detail = _refusal_detail(error)
        super().__init__(message or f"converter refused: {name} ({int(error.code)})"
                         + (f": {detail}" if detail else ""), error.code)

    @property
    def retry_delay_s(self) -> int | None:
        """Seconds to wait before retrying (Resource Exceeded, Network Failure).

        A Resource Exceeded delay of 0 means at least 30 s (RFC 8803 §4.2.8).
        """
        delay = self.error.retry_delay_s
        if delay == 0 and self.code == ConvertErrorCode.RESOURCE_EXCEEDED:
            return RESOURCE_EXCEEDED_DEFAULT_RETRY_S
        return delay

    @property
    def cookie(self) -> bytes | None:
        """The cookie to retry with (Missing Cookie); None if absent or empty."""
        cookie = self.error.cookie
        return cookie or None

    @property
    def supported_versions(self) -> tuple[int, ...] | None:
        return self.error.supported_versions

    @property
    def refused_option_kinds(self) -> tuple[int, ...] | None:
        return self.error.refused_option_kinds

    @property
    def icmp_code(self) -> int | None:
        return self.error.icmp_code

    @property
    def echo(self) -> bytes | None:
        return self.error.echo


def _refusal_detail(error: ErrorTlv) -> str:
    if error.supported_versions is not None:
        return f"converter speaks versions {list(error.supported_versions)}"
    if error.refused_option_kinds is not None:
        return f"refused TCP option kinds {list(error.refused_option_kinds)}"
    if error.retry_delay_s is not None:
        return f"retry in {error.retry_delay_s} s"
    if error.icmp_code is not None:
        return f"ICMP code {error.icmp_code}"
    if error.cookie is not None:
        return f"retry with the {len(error.cookie)}-byte cookie it sent"
    return ""


class RefusedUnsupportedVersion(ConvertRefused):
    """Error 0: the converter does not speak our version; see :attr:`supported_versions`."""


class RefusedMalformedMessage(ConvertRefused):
    """Error 1: the converter found our message malformed; :attr:`echo` holds it."""


class RefusedUnsupportedMessage(ConvertRefused):
    """Error 2: the converter does not know a TLV we sent; :attr:`echo` holds the message."""


class RefusedMissingCookie(ConvertRefused):
    """Error 3: retry with :attr:`cookie` in a Cookie TLV."""


class RefusedNotAuthorized(ConvertRefused):
    """Error 32: policy refusal, bad cookie, or a request on the converter's external side."""


class RefusedUnsupportedTcpOption(ConvertRefused):
    """Error 33: the converter will not ask for :attr:`refused_option_kinds`."""


class RefusedResourceExceeded(ConvertRefused):
    """Error 64: the converter is overloaded; wait :attr:`retry_delay_s`."""


class RefusedNetworkFailure(ConvertRefused):
    """Error 65: the converter could not reach the network; wait :attr:`retry_delay_s`."""


class RefusedConnectionReset(ConvertRefused):
    """Error 96: the server answered the converter's SYN with a RST."""


class RefusedDestinationUnreachable(ConvertRefused):
    """Error 97: an ICMP hard error; :attr:`icmp_code` says which."""


REFUSALS: dict[ConvertErrorCode, type[ConvertRefused]] = {
    ConvertErrorCode.UNSUPPORTED_VERSION: RefusedUnsupportedVersion,
    ConvertErrorCode.MALFORMED_MESSAGE: RefusedMalformedMessage,
    ConvertErrorCode.UNSUPPORTED_MESSAGE: RefusedUnsupportedMessage,
    ConvertErrorCode.MISSING_COOKIE: RefusedMissingCookie,
    ConvertErrorCode.NOT_AUTHORIZED: RefusedNotAuthorized,
    ConvertErrorCode.UNSUPPORTED_TCP_OPTION: RefusedUnsupportedTcpOption,
    ConvertErrorCode.RESOURCE_EXCEEDED: RefusedResourceExceeded,
    ConvertErrorCode.NETWORK_FAILURE: RefusedNetworkFailure,
    ConvertErrorCode.CONNECTION_RESET: RefusedConnectionReset,
    ConvertErrorCode.DESTINATION_UNREACHABLE: RefusedDestinationUnreachable,
}


def refusal_for(error: ErrorTlv) -> ConvertRefused:
    """The typed refusal for ``error`` (plain :class:`ConvertRefused` for unknown codes)."""
    known = error.known_code
    cls = REFUSALS.get(known, ConvertRefused) if known is not None else ConvertRefused
    return cls(error)


# --------------------------------------------------------------------------
# The handshake
# --------------------------------------------------------------------------

class ClientState(enum.Enum):
    AWAIT_REPLY = "await-reply"
    ACCEPTED = "accepted"
    FAILED = "failed"


class ConvertClientHandshake:
    """The client's half of RFC 8803: one request out, one answer in.

    ``target`` is the ``(ip, port)`` the converter should connect to (a
    Connect TLV, RFC 8803 §4.2.5), or None to ask for the converter's
    capabilities (an Info TLV, §4.2.3). ``cookie`` adds a Cookie TLV (§4.2.7);
    ``extended_options`` make the Connect "extended" (for example
    :data:`MP_CAPABLE_SYN_OPTION`).
    """

    def __init__(self, target: TargetLike | None = None, cookie: bytes | None = None,
                 extended_options: Iterable[TcpOption] = ()) -> None:
        options = tuple(extended_options)
        tlvs: list[InfoTlv | ConnectTlv | CookieTlv] = []
        if target is None:
            if options:
                raise ValueError("TCP options ride in a Connect TLV: give a target")
            self._target: TargetKey | None = None
            tlvs.append(InfoTlv())
        else:
            self._target = target_key(target)
            tlvs.append(ConnectTlv(self._target[1], self._target[0], options))
        if cookie is not None:
            tlvs.append(CookieTlv(cookie))
        self._request = ConvertMessage(tuple(tlvs))
        self._request_bytes = encode_message(self._request, ConvertSender.CLIENT)
        self._decoder = ConvertDecoder(ConvertSender.CONVERTER)
        self._state = ClientState.AWAIT_REPLY
        self._received = 0
        self._total_len: int | None = None  # known once Total Length arrived
        self._result: ConvertAccepted | None = None
        self._error: ProtocolError | None = None

    # -- facts --------------------------------------------------------------
    @property
    def target(self) -> TargetKey | None:
        return self._target

    @property
    def request(self) -> ConvertMessage:
        return self._request

    @property
    def state(self) -> ClientState:
        return self._state

    @property
    def result(self) -> ConvertAccepted | None:
        return self._result

    @property
    def error(self) -> ProtocolError | None:
        return self._error

    def request_bytes(self) -> bytes:
        """The Convert message that opens the stream; application bytes follow it."""
        return self._request_bytes

    @property
    def wanted(self) -> int:
        """Bytes that may be read without passing the converter's message; 0 when finished."""
        if self._state is not ClientState.AWAIT_REPLY:
            return 0
        if self._total_len is None:
            return max(1, HEADER_LEN - self._received)
        return self._total_len - self._received

    # -- events -------------------------------------------------------------
    def feed(self, data: bytes | bytearray | memoryview) -> ConvertAccepted | None:
        """Bytes from the converter. None: need more. Raises on refusal or bad input."""
        if self._error is not None:
            raise self._error
        if self._state is ClientState.ACCEPTED:
            raise RuntimeError("the handshake is complete; read result.leftover")
        data = bytes(data)
        if not data:
            return None
        self._note_header(data)
        try:
            message = self._decoder.feed(data)
        except ConvertProtocolError as error:
            self._fail(error)
        if message is None:
            return None
        error_tlv = message.error
        if error_tlv is not None:
            self._fail(refusal_for(error_tlv))
        extended = message.extended_tcp_header
        supported = message.supported_tcp_ext
        self._result = ConvertAccepted(
            extended_header=extended,
            server_mptcp=None if extended is None else extended.mptcp_capable,
            supported=None if supported is None else supported.kinds,
            leftover=self._decoder.leftover,
            message=message,
        )
        self._state = ClientState.ACCEPTED
        return self._result

    def feed_eof(self) -> None:
        """The converter closed: fine after its answer, Malformed before."""
        if self._error is not None:
            raise self._error
        if self._state is ClientState.ACCEPTED:
            return
        try:
            self._decoder.feed_eof()
        except ConvertProtocolError as error:
            self._fail(error)

    # -- internals ----------------------------------------------------------
    def _note_header(self, data: bytes) -> None:
        before = self._received
        self._received += len(data)
        if self._total_len is None and before <= _TOTAL_LENGTH_OFFSET < self._received:
            # RFC 8803 §4.1: Total Length counts 32-bit words, header included.
            self._total_len = data[_TOTAL_LENGTH_OFFSET - before] * WORD

    def _fail(self, error: ProtocolError) -> NoReturn:
        self._error = error
        self._state = ClientState.FAILED
        raise error


# --------------------------------------------------------------------------
# "Go direct next time" (RFC 8803 §5.1)
# --------------------------------------------------------------------------

class MptcpTargetCache:
    """Targets whose server answered MP_CAPABLE, each trusted for ``ttl`` seconds.

    ``now`` is any monotonic clock reading in seconds, passed by the caller.
    At most ``max_entries`` targets are kept; the least recently confirmed go
    first. Not thread-safe: a caller sharing one between threads holds a lock.
    """

    def __init__(self, ttl: float = DEFAULT_MPTCP_CACHE_TTL_S,
                 max_entries: int = DEFAULT_MPTCP_CACHE_ENTRIES) -> None:
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0:
            raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be a positive int, not {max_entries!r}")
        self.ttl = float(ttl)
        self.max_entries = max_entries
        self._expires: dict[TargetKey, float] = {}

    def remember(self, target: TargetLike, now: float) -> None:
        """``target``'s server speaks MPTCP, as seen at ``now``."""
        key = target_key(target)
        self._expires.pop(key, None)  # re-insert: dict order is confirmation order
        self._expires[key] = now + self.ttl
        while len(self._expires) > self.max_entries:
            del self._expires[next(iter(self._expires))]

    def is_mptcp(self, target: TargetLike, now: float) -> bool:
        """True while ``target`` was seen MPTCP-capable less than ``ttl`` seconds ago."""
        key = target_key(target)
        expires = self._expires.get(key)
        if expires is None:
            return False
        if now >= expires:
            del self._expires[key]
            return False
        return True

    def forget(self, target: TargetLike) -> None:
        """Drop ``target`` (a direct connection fell back to TCP or failed)."""
        self._expires.pop(target_key(target), None)

    def clear(self) -> None:
        self._expires.clear()

    def __len__(self) -> int:
        return len(self._expires)


__all__ = [
    "DEFAULT_MPTCP_CACHE_TTL_S", "MP_CAPABLE_SYN_OPTION", "REFUSALS", "ClientState",
    "ConvertAccepted", "ConvertClientHandshake", "ConvertRefused", "MptcpTargetCache",
    "RefusedConnectionReset", "RefusedDestinationUnreachable", "RefusedMalformedMessage",
    "RefusedMissingCookie", "RefusedNetworkFailure", "RefusedNotAuthorized",
    "RefusedResourceExceeded", "RefusedUnsupportedMessage", "RefusedUnsupportedTcpOption",
    "RefusedUnsupportedVersion", "refusal_for", "target_key",
]
