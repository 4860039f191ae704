"""RFC 8803 (0-RTT TCP Convert Protocol) codec: bytes in, frozen dataclasses out, and back.

This module contains no networking code. It never touches a socket, a clock, a
logger or the file system; the converter mode (``modes/``) and the client agent
drive it with the bytes they read and write.

Design rules (each one is tested in ``tests/unit/test_wire_convert.py``):

1. Peer input can only make the decoder raise :class:`IncompleteConvertMessage`
   (a :class:`~mptcp_proxy.errors.NeedMoreData`: "not enough bytes yet") or a
   :class:`ConvertProtocolError` (a :class:`~mptcp_proxy.errors.ProtocolError`
   whose ``code`` is the :class:`ConvertErrorCode` to answer with). Nothing
   else: no ``IndexError``, ``struct.error`` or ``ValueError`` escapes, and no
   ``assert`` guards peer input.
2. Local misuse (building a dataclass that cannot be encoded) raises
   ``TypeError``/``ValueError`` at construction time. Every dataclass validates
   itself, so anything that exists can be encoded.
3. Decoding is prefix-monotone: the bytes are checked in stream order, and the
   first rule a prefix breaks is the error, whatever follows. A stream fed one
   byte at a time therefore gives the same message, the same error code and
   the same leftover application bytes as the whole stream at once, and a
   prefix that can still become valid is always "need more", never an error.
4. The dataclasses hold exactly what travels on the wire. Where zero padding
   cannot be told apart from content (an opaque cookie, an Error value), the
   field must already be a whole number of words and the padding is part of
   it; the ``ErrorTlv`` builders pad for you. Fields the RFC names Zero or
   Unassigned are written as zero and ignored on receipt, so they are the only
   bytes a decode/encode round trip can change.
5. Names follow the IANA registries of RFC 8803 §8.2; comments cite the
   section a rule comes from.

Decisions on points the RFC leaves open (documented here once, tested each):

* Total Length 0 is Malformed (RFC 8803 §4.1: 0 is invalid).
* Total Length 1 (a bare header) is valid from the converter: it is how a
  converter acknowledges a Connect that needs no TLV in return (the Tessares
  reference client accepts exactly that). From a client it is Malformed,
  because a client message must carry a Connect or an Info TLV: without one it
  asks for nothing (RFC 8803 §4.2.2, §4.2.3, §4.2.5).
* Total Length larger than the data is "need more"; a stream that ends first
  is Malformed (:meth:`ConvertDecoder.feed_eof`).
* Version other than 1 (including the reserved 0) is Unsupported Version,
  decided from the first byte alone: the rest of the header is only defined for
  version 1, so the magic is not checked for other versions.
* A wrong Magic Number means the peer does not speak Convert at all. It raises
  :class:`NotConvertMessage`, a Malformed error, so the converter may either
  answer Malformed or simply close.
* A TLV of Length 0, or one that runs past Total Length, is Malformed.
  TLV framing is checked before the TLV type.
* Type 0, unassigned types and private-use types (192-255) are Unsupported
  Message; private types can be allowed per decoder (``private_types``).
* A registered TLV sent in the wrong direction (Connect, Info or Cookie from
  the converter; Error, Supported TCP Extensions or Extended TCP Header from
  the client) is Unsupported Message.
* A repeated TLV type is Malformed (RFC 8803 §4.2.1).
* Connect: Length below 5 words, port 0, EOL or NOP among the options, an
  option length below 2 or past the TLV, or more than 3 bytes of zero padding
  are Malformed. IPv4 targets travel IPv4-mapped and decode to ``IPv4Address``.
  Loopback, multicast, broadcast and unspecified targets are not rejected by
  the decoder (that would be policy); :func:`check_connect_target` raises the
  Malformed error RFC 8803 §4.2.5 asks for, for the converter to call.
* Extended TCP Header carries the server's SYN+ACK options, so NOP is allowed
  there; EOL may only start the final zero padding.
* Supported TCP Extensions: kinds 0 (EOL), 1 (NOP) and 2 (MSS) are never
  listed, kinds are not repeated, padding is under one word.
* Info Length must be 1; Cookie must not be empty.
* Error values are opaque on receipt (the client resets whatever they hold);
  the typed accessors of :class:`ErrorTlv` interpret them per code. Error
  codes outside the registry are kept as plain ints.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import ClassVar, TypeAlias, TypeVar, Union

from mptcp_proxy.errors import NeedMoreData, ProtocolError

# --------------------------------------------------------------------------
# Constants (RFC 8803 §4.1, §4.2.1, §8.2)
# --------------------------------------------------------------------------

VERSION = 1
"""The only Convert version this codec speaks (RFC 8803 §8.2.1)."""
RESERVED_VERSION = 0
SUPPORTED_VERSIONS: tuple[int, ...] = (VERSION,)
MAGIC = 0x2263
"""Magic Number of the fixed header: 8803 in decimal (RFC 8803 §4.1)."""

WORD = 4
"""Total Length and TLV Length count 32-bit words."""
HEADER_LEN = 4
HEADER_WORDS = HEADER_LEN // WORD
MAX_TOTAL_WORDS = 0xFF
"""Total Length is 8 bits wide."""
MAX_MESSAGE_LEN = MAX_TOTAL_WORDS * WORD
"""1020 bytes: the largest Convert message, header included."""
MAX_TLV_LEN = MAX_MESSAGE_LEN - HEADER_LEN
"""The largest TLV that still fits in a message next to the header."""
TLV_HEADER_LEN = 2
"""Type (8 bits) and Length (8 bits) of the generic TLV (RFC 8803 §4.2.1)."""
TLV_FIXED_LEN = 4
"""Type, Length and the 16-bit field that opens Info, Supported TCP
Extensions, Extended TCP Header and Cookie TLVs."""

CONNECT_BASE_WORDS = 5
"""A Connect TLV without TCP options: Type, Length, Port, 128-bit address."""
CONNECT_FIXED_LEN = CONNECT_BASE_WORDS * WORD
IPV6_ADDRESS_LEN = 16
INFO_WORDS = 1
ERROR_FIXED_LEN = 3
"""Type, Length and Error Code precede the Error value."""
MAX_ERROR_VALUE_LEN = MAX_TLV_LEN - ERROR_FIXED_LEN
"""1013 bytes: the longest Error value of an Error TLV alone in a message."""

PRIVATE_TLV_TYPES = range(192, 256)
"""TLV types reserved for private use (RFC 8803 §8.2.2)."""
RESERVED_TLV_TYPE = 0

MAX_UINT8 = 0xFF
MAX_PORT = 0xFFFF
TCP_OPTION_HEADER_LEN = 2
MAX_TCP_OPTION_DATA = MAX_UINT8 - TCP_OPTION_HEADER_LEN

RESOURCE_EXCEEDED_DEFAULT_RETRY_S = 30
"""A Resource Exceeded error with a retry delay of 0 means: wait at least this long."""

_HEADER = struct.Struct("!BBH")
_VERSION_OFFSET = 0
_TOTAL_LENGTH_OFFSET = 1
_TLV_HEADER = struct.Struct("!BB")
_UINT16 = struct.Struct("!H")
_ZERO16 = bytes(_UINT16.size)
_ZERO_BYTE = b"\x00"


class ConvertTlvType(enum.IntEnum):
    """The "Convert TLVs" registry (RFC 8803 §8.2.2)."""

    INFO = 1
    CONNECT = 10
    EXTENDED_TCP_HDR = 20
    SUPPORTED_TCP_EXT = 21
    COOKIE = 22
    ERROR = 30


class ConvertErrorCode(enum.IntEnum):
    """The "Convert Errors" registry (RFC 8803 §4.2.8, §8.2.3).

    Ranges: 0-31 message validation, 32-63 client side, 64-95 converter side,
    96-127 server side.
    """

    UNSUPPORTED_VERSION = 0
    MALFORMED_MESSAGE = 1
    UNSUPPORTED_MESSAGE = 2
    MISSING_COOKIE = 3
    NOT_AUTHORIZED = 32
    UNSUPPORTED_TCP_OPTION = 33
    RESOURCE_EXCEEDED = 64
    NETWORK_FAILURE = 65
    CONNECTION_RESET = 96
    DESTINATION_UNREACHABLE = 97


class TcpOptionKind(enum.IntEnum):
    """TCP option kinds the Convert protocol refers to (IANA "TCP Option Kind Numbers")."""

    EOL = 0
    NOP = 1
    MSS = 2
    WINDOW_SCALE = 3
    SACK_PERMITTED = 4
    SACK = 5
    TIMESTAMPS = 8
    TCP_AO = 29
    MPTCP = 30
    FAST_OPEN = 34


class ConvertSender(enum.Enum):
    """Who wrote the message being decoded: each side sends its own TLVs."""

    CLIENT = "client"
    CONVERTER = "converter"


# RFC 8803 §4.2.2: the client asks (Info, Connect, Cookie); the converter
# answers (Supported TCP Extensions, Extended TCP Header, Error).
TLV_TYPES_BY_SENDER: dict[ConvertSender, frozenset[ConvertTlvType]] = {
    ConvertSender.CLIENT: frozenset(
        {ConvertTlvType.INFO, ConvertTlvType.CONNECT, ConvertTlvType.COOKIE}),
    ConvertSender.CONVERTER: frozenset(
        {ConvertTlvType.SUPPORTED_TCP_EXT, ConvertTlvType.EXTENDED_TCP_HDR,
         ConvertTlvType.ERROR}),
}

# Kinds a Supported TCP Extensions TLV never lists: EOL is the padding, NOP and
# MSS are not extensions a converter converts.
UNLISTED_TCP_OPTION_KINDS = frozenset(
    {TcpOptionKind.EOL, TcpOptionKind.NOP, TcpOptionKind.MSS})

IPAddress: TypeAlias = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

_TLV_TYPES = frozenset(ConvertTlvType)
_ERROR_CODES = frozenset(ConvertErrorCode)


# --------------------------------------------------------------------------
# Errors raised on peer input
# --------------------------------------------------------------------------

class ConvertProtocolError(ProtocolError):
    """The peer broke RFC 8803; ``code`` is the Convert error code to answer with."""

    code: ConvertErrorCode

    def __init__(self, message: str,
                 code: ConvertErrorCode = ConvertErrorCode.MALFORMED_MESSAGE) -> None:
        super().__init__(message, ConvertErrorCode(code))


class UnsupportedConvertVersion(ConvertProtocolError):
    """The header's Version is not one we speak; answer with the supported list."""

    def __init__(self, version: int) -> None:
        super().__init__(f"Convert version {version} is not supported "
                         f"(supported: {list(SUPPORTED_VERSIONS)})",
                         ConvertErrorCode.UNSUPPORTED_VERSION)
        self.version = version
        self.supported = SUPPORTED_VERSIONS


class NotConvertMessage(ConvertProtocolError):
    """The Magic Number is wrong: the peer does not speak Convert at all.

    Carries Malformed Message as its code; a converter may answer with it or
    just close.
    """

    def __init__(self, magic: int) -> None:
        super().__init__(f"magic number {magic:#06x} is not {MAGIC:#06x}: "
                         "not a Convert message")
        self.magic = magic


class IncompleteConvertMessage(NeedMoreData):
    """More bytes are needed; ``needed`` is the buffer length worth retrying at."""

    def __init__(self, needed: int) -> None:
        super().__init__(f"need at least {needed} bytes")
        self.needed = needed


def _malformed(message: str) -> ConvertProtocolError:
    return ConvertProtocolError(message, ConvertErrorCode.MALFORMED_MESSAGE)


def _unsupported(message: str) -> ConvertProtocolError:
    return ConvertProtocolError(message, ConvertErrorCode.UNSUPPORTED_MESSAGE)


# --------------------------------------------------------------------------
# Local validation helpers (misuse by our own code, not peer input)
# --------------------------------------------------------------------------

def _require_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high}, not {value}")


def _require_bytes(name: str, value: object) -> None:
    if not isinstance(value, bytes):
        raise TypeError(f"{name} must be bytes, not {type(value).__name__}")


def _require_fits(name: str, tlv_len: int) -> None:
    if tlv_len > MAX_TLV_LEN:
        raise ValueError(f"{name} would be {tlv_len} bytes; a TLV is at most "
                         f"{MAX_TLV_LEN} bytes next to the Convert header")


def _padding(length: int) -> int:
    """Zero bytes that bring ``length`` to a whole number of words."""
    return -length % WORD


def _tlv(tlv_type: int, body: bytes) -> bytes:
    """Frame ``body`` (everything after Type and Length) as a padded TLV (RFC 8803 §4.2.1)."""
    padded = body + bytes(_padding(TLV_HEADER_LEN + len(body)))
    words = (TLV_HEADER_LEN + len(padded)) // WORD
    return _TLV_HEADER.pack(tlv_type, words) + padded


# --------------------------------------------------------------------------
# TCP options inside Connect and Extended TCP Header TLVs
# --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TcpOption:
    """One TCP option: kind, then (except NOP) a length byte and ``data``.

    EOL is not an option here: it is the zero padding that ends a list.
    """

    kind: int
    data: bytes = b""

    def __post_init__(self) -> None:
        _require_int("TCP option kind", self.kind, TcpOptionKind.NOP, MAX_UINT8)
        _require_bytes("TCP option data", self.data)
        if self.kind == TcpOptionKind.NOP and self.data:
            raise ValueError("NOP is a single byte and carries no data")
        if len(self.data) > MAX_TCP_OPTION_DATA:
            raise ValueError(f"TCP option data is at most {MAX_TCP_OPTION_DATA} bytes")

    def encode(self) -> bytes:
        if self.kind == TcpOptionKind.NOP:
            return bytes((self.kind,))
        return bytes((self.kind, TCP_OPTION_HEADER_LEN + len(self.data))) + self.data


def _encode_options(options: tuple[TcpOption, ...]) -> bytes:
    return b"".join(option.encode() for option in options)


def _normalize_options(owner: object, options: object, *, allow_nop: bool) -> None:
    if isinstance(options, (str, bytes)) or not isinstance(options, Iterable):
        raise TypeError("options must be a tuple of TcpOption")
    normalized = tuple(options)
    for option in normalized:
        if not isinstance(option, TcpOption):
            raise TypeError(f"options must hold TcpOption, not {type(option).__name__}")
        if option.kind == TcpOptionKind.NOP and not allow_nop:
            raise ValueError("a Connect TLV carries no NOP (RFC 8803 §4.2.5)")
    object.__setattr__(owner, "options", normalized)


def _decode_options(area: bytes, *, allow_nop: bool, where: str) -> tuple[TcpOption, ...]:
    """Parse a zero-padded TCP option list (RFC 8803 §4.2.5, §4.2.6)."""
    options: list[TcpOption] = []
    pos = 0
    end = len(area)
    while pos < end:
        kind = area[pos]
        if kind == TcpOptionKind.EOL:
            # Only the final padding may be zero: under one word, all zero.
            tail = area[pos:]
            if len(tail) >= WORD or any(tail):
                raise _malformed(f"{where}: EOL at option offset {pos} is not final padding")
            break
        if kind == TcpOptionKind.NOP:
            if not allow_nop:
                raise _malformed(f"{where}: NOP at option offset {pos} (RFC 8803 §4.2.5)")
            options.append(TcpOption(kind))
            pos += 1
            continue
        if pos + TCP_OPTION_HEADER_LEN > end:
            raise _malformed(f"{where}: option kind {kind} has no length byte")
        length = area[pos + 1]
        if length < TCP_OPTION_HEADER_LEN or pos + length > end:
            raise _malformed(f"{where}: option kind {kind} has bad length {length}")
        options.append(TcpOption(kind, bytes(area[pos + TCP_OPTION_HEADER_LEN:pos + length])))
        pos += length
    return tuple(options)


# --------------------------------------------------------------------------
# TLVs (RFC 8803 §4.2)
# --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class InfoTlv:
    """Client asks for the converter's capabilities (RFC 8803 §4.2.3): Zero(16)."""

    TYPE: ClassVar[ConvertTlvType] = ConvertTlvType.INFO

    @property
    def tlv_type(self) -> int:
        return self.TYPE

    def encode(self) -> bytes:
        return _tlv(self.TYPE, _ZERO16)


_V4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"   # ::ffff:0:0/96 (RFC 4291 §2.5.5.2)


@dataclass(frozen=True, slots=True)
class ConnectTlv:
    """Where the converter should connect, and which TCP options to ask for (RFC 8803 §4.2.5).

    ``address`` is an ``IPv4Address`` or ``IPv6Address``; an IPv4-mapped IPv6
    address is stored as the ``IPv4Address`` it maps (that is how it decodes).
    Options make it an "extended Connect"; EOL and NOP are not allowed.
    """

    TYPE: ClassVar[ConvertTlvType] = ConvertTlvType.CONNECT

    port: int
    address: IPAddress
    options: tuple[TcpOption, ...] = ()

    def __post_init__(self) -> None:
        # Port 0 cannot be connected to; the codec refuses it both ways.
        _require_int("Connect port", self.port, 1, MAX_PORT)
        if isinstance(self.address, ipaddress.IPv6Address):
            if self.address.ipv4_mapped is not None:
                object.__setattr__(self, "address", self.address.ipv4_mapped)
        elif not isinstance(self.address, ipaddress.IPv4Address):
            raise TypeError("Connect address must be an IPv4Address or IPv6Address")
        _normalize_options(self, self.options, allow_nop=False)
        _require_fits("Connect TLV", CONNECT_FIXED_LEN + len(_encode_options(self.options)))

    @property
    def tlv_type(self) -> int:
        return self.TYPE

    @property
    def extended(self) -> bool:
        """True for an "extended Connect" (one carrying TCP options)."""
        return bool(self.options)

    @property
    def address_bytes(self) -> bytes:
        """The 128-bit wire form: IPv4 as IPv4-mapped IPv6 (RFC 8803 §4.2.5)."""
        if isinstance(self.address, ipaddress.IPv4Address):
            return _V4_MAPPED_PREFIX + self.address.packed
        return self.address.packed

    def encode(self) -> bytes:
        body = (_UINT16.pack(self.port) + self.address_bytes
                + _encode_options(self.options))
        return _tlv(self.TYPE, body)


@dataclass(frozen=True, slots=True)
class ExtendedTcpHeaderTlv:
    """The TCP options of the server's SYN+ACK, returned to the client (RFC 8803 §4.2.6).

    Unassigned(16), then the options; NOP is allowed (it is what servers send).
    """

    TYPE: ClassVar[ConvertTlvType] = ConvertTlvType.EXTENDED_TCP_HDR

    options: tuple[TcpOption, ...] = ()

    def __post_init__(self) -> None:
        _normalize_options(self, self.options, allow_nop=True)
        _require_fits("Extended TCP Header TLV",
                      TLV_FIXED_LEN + len(_encode_options(self.options)))

    @property
    def tlv_type(self) -> int:
        return self.TYPE

    @property
    def mptcp_capable(self) -> bool:
        """The server answered with an MPTCP option: it speaks MPTCP itself."""
        return any(option.kind == TcpOptionKind.MPTCP for option in self.options)

    def encode(self) -> bytes:
        return _tlv(self.TYPE, _ZERO16 + _encode_options(self.options))


@dataclass(frozen=True, slots=True)
class SupportedTcpExtTlv:
    """The TCP option kinds the converter supports, answering Info (RFC 8803 §4.2.4).

    Unassigned(16), then one byte per kind, zero padded. Kinds 0, 1 and 2 are
    never listed, nor any kind twice.
    """

    TYPE: ClassVar[ConvertTlvType] = ConvertTlvType.SUPPORTED_TCP_EXT

    kinds: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.kinds, (str, bytes)) or not isinstance(self.kinds, Iterable):
            raise TypeError("kinds must be a tuple of ints")
        kinds = tuple(self.kinds)
        for kind in kinds:
            _require_int("supported kind", kind, 0, MAX_UINT8)
            if kind in UNLISTED_TCP_OPTION_KINDS:
                raise ValueError(f"kind {kind} is never listed as a supported extension")
        if len(set(kinds)) != len(kinds):
            raise ValueError("a supported kind is listed twice")
        object.__setattr__(self, "kinds", kinds)
        _require_fits("Supported TCP Extensions TLV", TLV_FIXED_LEN + len(kinds))

    @property
    def tlv_type(self) -> int:
        return self.TYPE

    def encode(self) -> bytes:
        return _tlv(self.TYPE, _ZERO16 + bytes(self.kinds))


@dataclass(frozen=True, slots=True)
class CookieTlv:
    """An opaque anti-spoofing cookie, like a TFO cookie (RFC 8803 §4.2.7).

    Zero(16), then the cookie. Padding cannot be told apart from cookie bytes,
    so the cookie is a non-empty whole number of words: what the client echoes
    is then byte for byte what the converter issued.
    """

    TYPE: ClassVar[ConvertTlvType] = ConvertTlvType.COOKIE

    cookie: bytes

    def __post_init__(self) -> None:
        _check_cookie(self.cookie)

    @property
    def tlv_type(self) -> int:
        return self.TYPE

    def encode(self) -> bytes:
        return _tlv(self.TYPE, _ZERO16 + self.cookie)


def _check_cookie(cookie: object) -> None:
    if not isinstance(cookie, bytes):
        raise TypeError(f"cookie must be bytes, not {type(cookie).__name__}")
    if not cookie or len(cookie) % WORD:
        raise ValueError(f"a cookie is a non-empty multiple of {WORD} bytes, not {len(cookie)}")
    _require_fits("Cookie TLV", TLV_FIXED_LEN + len(cookie))


def _error_value_padding(length: int) -> int:
    return _padding(ERROR_FIXED_LEN + length)


@dataclass(frozen=True, slots=True)
class ErrorTlv:
    """The converter reports a failure; the client resets (RFC 8803 §4.2.8).

    ``value`` is the wire value, padding included: ``3 + len(value)`` is a
    whole number of words (so ``len(value) % 4 == 1``). Use the builders
    (:meth:`malformed`, :meth:`resource_exceeded`, ...) which pad for you, and
    the accessors (:attr:`retry_delay_s`, ...) which read a value per code.
    ``code`` is a :class:`ConvertErrorCode` when registered, else a plain int.
    """

    TYPE: ClassVar[ConvertTlvType] = ConvertTlvType.ERROR

    code: int
    value: bytes = _ZERO_BYTE

    def __post_init__(self) -> None:
        _require_int("error code", self.code, 0, MAX_UINT8)
        _require_bytes("error value", self.value)
        if not self.value or _error_value_padding(len(self.value)):
            raise ValueError("an Error value fills whole words: len(value) % 4 == 1 "
                             "(use ErrorTlv.padded() or a builder)")
        if len(self.value) > MAX_ERROR_VALUE_LEN:
            raise ValueError(f"an Error value is at most {MAX_ERROR_VALUE_LEN} bytes")
        if self.code in _ERROR_CODES:
            object.__setattr__(self, "code", ConvertErrorCode(self.code))

    @property
    def tlv_type(self) -> int:
        return self.TYPE

    def encode(self) -> bytes:
        words = (ERROR_FIXED_LEN + len(self.value)) // WORD
        return _TLV_HEADER.pack(self.TYPE, words) + bytes((self.code,)) + self.value

    # -- builders -----------------------------------------------------------

    @classmethod
    def padded(cls, code: int, value: bytes = b"") -> ErrorTlv:
        """An Error TLV whose ``value`` is zero padded to whole words."""
        _require_bytes("error value", value)
        return cls(code, value + bytes(_error_value_padding(len(value))))

    @classmethod
    def unsupported_version(cls, versions: Iterable[int] = SUPPORTED_VERSIONS) -> ErrorTlv:
        """Code 0: the value lists the versions we speak, one byte each."""
        listed = tuple(versions)
        if not listed:
            raise ValueError("list at least one supported version")
        for version in listed:
            _require_int("supported version", version, RESERVED_VERSION + 1, MAX_UINT8)
        return cls.padded(ConvertErrorCode.UNSUPPORTED_VERSION, bytes(listed))

    @classmethod
    def malformed(cls, echo: bytes = b"") -> ErrorTlv:
        """Code 1: echo of the offending message, cut to what fits a message."""
        return cls.padded(ConvertErrorCode.MALFORMED_MESSAGE, bytes(echo[:MAX_ERROR_VALUE_LEN]))

    @classmethod
    def unsupported_message(cls, echo: bytes = b"") -> ErrorTlv:
        """Code 2: echo of the message holding the unknown TLV, cut to fit."""
        return cls.padded(ConvertErrorCode.UNSUPPORTED_MESSAGE,
                          bytes(echo[:MAX_ERROR_VALUE_LEN]))

    @classmethod
    def missing_cookie(cls, cookie: bytes) -> ErrorTlv:
        """Code 3: a zero byte, then the cookie the client should retry with."""
        _check_cookie(cookie)  # the client sends it back in a Cookie TLV
        return cls(ConvertErrorCode.MISSING_COOKIE, _ZERO_BYTE + cookie)

    @classmethod
    def not_authorized(cls) -> ErrorTlv:
        """Code 32: policy refusal, bad cookie, external-side request."""
        return cls(ConvertErrorCode.NOT_AUTHORIZED)

    @classmethod
    def unsupported_tcp_option(cls, kinds: Iterable[int]) -> ErrorTlv:
        """Code 33: the refused option kinds, one byte each."""
        refused = tuple(kinds)
        if not refused:
            raise ValueError("list at least one refused option kind")
        for kind in refused:
            _require_int("refused option kind", kind, TcpOptionKind.NOP, MAX_UINT8)
        return cls.padded(ConvertErrorCode.UNSUPPORTED_TCP_OPTION, bytes(refused))

    @classmethod
    def resource_exceeded(cls, retry_s: int = 0) -> ErrorTlv:
        """Code 64: retry after ``retry_s`` seconds (0: at least 30 s)."""
        _require_int("retry delay", retry_s, 0, MAX_UINT8)
        return cls(ConvertErrorCode.RESOURCE_EXCEEDED, bytes((retry_s,)))

    @classmethod
    def network_failure(cls, retry_s: int = 0) -> ErrorTlv:
        """Code 65: retry after ``retry_s`` seconds."""
        _require_int("retry delay", retry_s, 0, MAX_UINT8)
        return cls(ConvertErrorCode.NETWORK_FAILURE, bytes((retry_s,)))

    @classmethod
    def connection_reset(cls) -> ErrorTlv:
        """Code 96: the server answered with a RST."""
        return cls(ConvertErrorCode.CONNECTION_RESET)

    @classmethod
    def destination_unreachable(cls, icmp_code: int) -> ErrorTlv:
        """Code 97: the ICMP code of the hard error."""
        _require_int("ICMP code", icmp_code, 0, MAX_UINT8)
        return cls(ConvertErrorCode.DESTINATION_UNREACHABLE, bytes((icmp_code,)))

    # -- accessors (None when the code does not carry that value) -------------

    @property
    def known_code(self) -> ConvertErrorCode | None:
        return self.code if isinstance(self.code, ConvertErrorCode) else None

    @property
    def supported_versions(self) -> tuple[int, ...] | None:
        if self.code != ConvertErrorCode.UNSUPPORTED_VERSION:
            return None
        return tuple(self.value.rstrip(_ZERO_BYTE))  # version 0 is reserved: zeros pad

    @property
    def echo(self) -> bytes | None:
        """The echoed message (trailing zero padding included)."""
        if self.code not in (ConvertErrorCode.MALFORMED_MESSAGE,
                             ConvertErrorCode.UNSUPPORTED_MESSAGE):
            return None
        return self.value

    @property
    def cookie(self) -> bytes | None:
        if self.code != ConvertErrorCode.MISSING_COOKIE:
            return None
        return self.value[1:]

    @property
    def refused_option_kinds(self) -> tuple[int, ...] | None:
        if self.code != ConvertErrorCode.UNSUPPORTED_TCP_OPTION:
            return None
        return tuple(self.value.rstrip(_ZERO_BYTE))  # kind 0 is never refused: zeros pad

    @property
    def retry_delay_s(self) -> int | None:
        if self.code not in (ConvertErrorCode.RESOURCE_EXCEEDED,
                             ConvertErrorCode.NETWORK_FAILURE):
            return None
        return self.value[0]

    @property
    def icmp_code(self) -> int | None:
        if self.code != ConvertErrorCode.DESTINATION_UNREACHABLE:
            return None
        return self.value[0]


@dataclass(frozen=True, slots=True)
class PrivateTlv:
    """A private-use TLV (type 192-255), decoded only when the decoder allows its type.

    ``value`` is everything after Type and Length, padding included, so
    ``len(value) % 4 == 2``.
    """

    type: int
    value: bytes = bytes(TLV_FIXED_LEN - TLV_HEADER_LEN)

    def __post_init__(self) -> None:
        _require_int("private TLV type", self.type, PRIVATE_TLV_TYPES.start,
                     PRIVATE_TLV_TYPES.stop - 1)
        _require_bytes("private TLV value", self.value)
        if _padding(TLV_HEADER_LEN + len(self.value)):
            raise ValueError("a private TLV value fills whole words: len(value) % 4 == 2")
        _require_fits("private TLV", TLV_HEADER_LEN + len(self.value))

    @property
    def tlv_type(self) -> int:
        return self.type

    def encode(self) -> bytes:
        return _tlv(self.type, self.value)


ConvertTlv: TypeAlias = Union[InfoTlv, ConnectTlv, ExtendedTcpHeaderTlv, SupportedTcpExtTlv,
                              CookieTlv, ErrorTlv, PrivateTlv]
TLV_CLASSES: tuple[type, ...] = (InfoTlv, ConnectTlv, ExtendedTcpHeaderTlv, SupportedTcpExtTlv,
                                 CookieTlv, ErrorTlv, PrivateTlv)
_TlvT = TypeVar("_TlvT", InfoTlv, ConnectTlv, ExtendedTcpHeaderTlv, SupportedTcpExtTlv,
                CookieTlv, ErrorTlv, PrivateTlv)


def encode_tlv(tlv: ConvertTlv) -> bytes:
    """One TLV, framed and padded (RFC 8803 §4.2.1)."""
    if not isinstance(tlv, TLV_CLASSES):
        raise TypeError(f"not a Convert TLV: {type(tlv).__name__}")
    return tlv.encode()


# --------------------------------------------------------------------------
# Messages (RFC 8803 §4)
# --------------------------------------------------------------------------

def _sender_violation(tlv_types: Iterable[int], sender: ConvertSender) -> str | None:
    """Why this set of TLV types cannot come from ``sender``, or None."""
    allowed = TLV_TYPES_BY_SENDER[sender]
    types = set(tlv_types)
    for tlv_type in sorted(types):
        if tlv_type in _TLV_TYPES and tlv_type not in allowed:
            return f"{ConvertTlvType(tlv_type).name} TLV is not sent by the {sender.value}"
    if (sender is ConvertSender.CLIENT
            and not types & {ConvertTlvType.CONNECT, ConvertTlvType.INFO}):
        return "a client message carries a Connect or an Info TLV"
    return None


@dataclass(frozen=True, slots=True)
class ConvertMessage:
    """A Convert message: the fixed header and its TLVs, each type at most once.

    Construction checks the type rule and that the message fits Total Length;
    direction rules are checked by :func:`check_sender` (and by the decoder).
    """

    tlvs: tuple[ConvertTlv, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.tlvs, (str, bytes)) or not isinstance(self.tlvs, Iterable):
            raise TypeError("tlvs must be a tuple of Convert TLVs")
        tlvs = tuple(self.tlvs)
        seen: set[int] = set()
        length = HEADER_LEN
        for tlv in tlvs:
            if not isinstance(tlv, TLV_CLASSES):
                raise TypeError(f"not a Convert TLV: {type(tlv).__name__}")
            if tlv.tlv_type in seen:
                raise ValueError(f"TLV type {tlv.tlv_type} appears twice (RFC 8803 §4.2.1)")
            seen.add(tlv.tlv_type)
            length += len(tlv.encode())
        if length > MAX_MESSAGE_LEN:
            raise ValueError(f"message of {length} bytes exceeds {MAX_MESSAGE_LEN}")
        object.__setattr__(self, "tlvs", tlvs)

    @property
    def total_words(self) -> int:
        return HEADER_WORDS + sum(len(tlv.encode()) for tlv in self.tlvs) // WORD

    def find(self, tlv_type: int) -> ConvertTlv | None:
        """The TLV of this type (private types included), or None."""
        for tlv in self.tlvs:
            if tlv.tlv_type == tlv_type:
                return tlv
        return None

    def get(self, tlv_class: type[_TlvT]) -> _TlvT | None:
        """The TLV of this class, or None (the first one for PrivateTlv)."""
        for tlv in self.tlvs:
            if isinstance(tlv, tlv_class):
                return tlv
        return None

    @property
    def info(self) -> InfoTlv | None:
        return self.get(InfoTlv)

    @property
    def connect(self) -> ConnectTlv | None:
        return self.get(ConnectTlv)

    @property
    def extended_tcp_header(self) -> ExtendedTcpHeaderTlv | None:
        return self.get(ExtendedTcpHeaderTlv)

    @property
    def supported_tcp_ext(self) -> SupportedTcpExtTlv | None:
        return self.get(SupportedTcpExtTlv)

    @property
    def cookie(self) -> CookieTlv | None:
        return self.get(CookieTlv)

    @property
    def error(self) -> ErrorTlv | None:
        return self.get(ErrorTlv)

    def encode(self) -> bytes:
        body = b"".join(tlv.encode() for tlv in self.tlvs)
        return _HEADER.pack(VERSION, HEADER_WORDS + len(body) // WORD, MAGIC) + body


def check_sender(message: ConvertMessage, sender: ConvertSender) -> None:
    """Raise ``ValueError`` if ``sender`` may not send ``message`` (local check)."""
    violation = _sender_violation((tlv.tlv_type for tlv in message.tlvs), sender)
    if violation is not None:
        raise ValueError(violation)


def encode_message(message: ConvertMessage, sender: ConvertSender | None = None) -> bytes:
    """Header, TLVs, padding and Total Length (RFC 8803 §4.1).

    With ``sender``, first check that this side may send these TLVs.
    """
    if not isinstance(message, ConvertMessage):
        raise TypeError(f"not a ConvertMessage: {type(message).__name__}")
    if sender is not None:
        check_sender(message, sender)
    return message.encode()


# --------------------------------------------------------------------------
# Decoding (every check raises ConvertProtocolError with its code)
# --------------------------------------------------------------------------

def _decode_info(tlv: bytes) -> InfoTlv:
    # RFC 8803 §4.2.3: Length is 1; the Zero field is ignored on receipt.
    if len(tlv) != INFO_WORDS * WORD:
        raise _malformed(f"Info TLV is {len(tlv) // WORD} words, not {INFO_WORDS}")
    return InfoTlv()


def _decode_connect(tlv: bytes) -> ConnectTlv:
    # RFC 8803 §4.2.5: Port(16), address(128), then optional TCP options.
    if len(tlv) < CONNECT_FIXED_LEN:
        raise _malformed(f"Connect TLV is {len(tlv) // WORD} words, "
                         f"at least {CONNECT_BASE_WORDS} needed")
    (port,) = _UINT16.unpack_from(tlv, TLV_HEADER_LEN)
    if port == 0:
        raise _malformed("Connect to port 0")
    address_start = TLV_HEADER_LEN + _UINT16.size
    options = _decode_options(tlv[CONNECT_FIXED_LEN:], allow_nop=False, where="Connect")
    return _decoded_connect(port, tlv[address_start:address_start + IPV6_ADDRESS_LEN], options)


# Decoded values are built without ``__post_init__``: the decoder has checked
# every rule it enforces (and more), and re-checking costs most of the decoding
# time (the message re-encodes each TLV to measure it, the Connect TLV re-encodes
# its options and parses its address twice). Only decoded fields reach these.

_V4_MAPPED_PREFIX_LEN = len(_V4_MAPPED_PREFIX)
_ADDRESS_MEMO_SIZE = 1024
# 16 wire bytes -> the (immutable) address they decode to. Connections keep going
# to the same few targets; a remembered address also lets the converter's own
# memos (keyed by address) match by identity.
_ADDRESSES: dict[bytes, IPAddress] = {}


def _decode_address(wire: bytes) -> IPAddress:
    """The 128-bit Connect address; IPv4-mapped decodes to IPv4 (as in ``ConnectTlv``)."""
    address = _ADDRESSES.get(wire)
    if address is None:
        if wire[:_V4_MAPPED_PREFIX_LEN] == _V4_MAPPED_PREFIX:
            address = ipaddress.IPv4Address(wire[_V4_MAPPED_PREFIX_LEN:])
        else:
            address = ipaddress.IPv6Address(wire)
        if len(_ADDRESSES) >= _ADDRESS_MEMO_SIZE:
            _ADDRESSES.clear()
        _ADDRESSES[wire] = address
    return address


def _decoded_connect(port: int, address: bytes, options: tuple[TcpOption, ...]) -> ConnectTlv:
    """``address``: the 16 bytes of the wire form (``bytes``)."""
    tlv = object.__new__(ConnectTlv)
    object.__setattr__(tlv, "port", port)
    object.__setattr__(tlv, "address", _decode_address(address))
    object.__setattr__(tlv, "options", options)
    return tlv


def _decoded_message(tlvs: tuple[ConvertTlv, ...]) -> ConvertMessage:
    message = object.__new__(ConvertMessage)
    object.__setattr__(message, "tlvs", tlvs)
    return message


def _decode_extended_tcp_header(tlv: bytes) -> ExtendedTcpHeaderTlv:
    # RFC 8803 §4.2.6: Unassigned(16), ignored on receipt; then SYN+ACK options.
    return ExtendedTcpHeaderTlv(
        _decode_options(tlv[TLV_FIXED_LEN:], allow_nop=True, where="Extended TCP Header"))


def _decode_supported_tcp_ext(tlv: bytes) -> SupportedTcpExtTlv:
    # RFC 8803 §4.2.4: Unassigned(16), ignored on receipt; one byte per kind.
    listed = bytes(tlv[TLV_FIXED_LEN:])
    kinds = listed.rstrip(_ZERO_BYTE)
    if len(listed) - len(kinds) >= WORD:
        raise _malformed("Supported TCP Extensions TLV has a whole word of padding")
    seen: set[int] = set()
    for kind in kinds:
        if kind in UNLISTED_TCP_OPTION_KINDS:
            raise _malformed(f"Supported TCP Extensions lists kind {kind}")
        if kind in seen:
            raise _malformed(f"Supported TCP Extensions lists kind {kind} twice")
        seen.add(kind)
    return SupportedTcpExtTlv(tuple(kinds))


def _decode_cookie(tlv: bytes) -> CookieTlv:
    # RFC 8803 §4.2.7: Zero(16), ignored on receipt; then an opaque cookie.
    cookie = bytes(tlv[TLV_FIXED_LEN:])
    if not cookie:
        raise _malformed("Cookie TLV carries no cookie")
    return CookieTlv(cookie)


def _decode_error(tlv: bytes) -> ErrorTlv:
    # RFC 8803 §4.2.8: Error Code(8), then a value opaque on receipt.
    return ErrorTlv(tlv[TLV_HEADER_LEN], bytes(tlv[ERROR_FIXED_LEN:]))


_TLV_DECODERS = {
    ConvertTlvType.INFO: _decode_info,
    ConvertTlvType.CONNECT: _decode_connect,
    ConvertTlvType.EXTENDED_TCP_HDR: _decode_extended_tcp_header,
    ConvertTlvType.SUPPORTED_TCP_EXT: _decode_supported_tcp_ext,
    ConvertTlvType.COOKIE: _decode_cookie,
    ConvertTlvType.ERROR: _decode_error,
}


_NO_PRIVATE_TYPES: frozenset[int] = frozenset()


def _private_type_set(private_types: Collection[int]) -> frozenset[int]:
    if private_types is _NO_PRIVATE_TYPES or private_types == ():
        return _NO_PRIVATE_TYPES  # the usual case: nothing to check
    allowed = frozenset(private_types)
    for tlv_type in allowed:
        _require_int("private TLV type", tlv_type, PRIVATE_TLV_TYPES.start,
                     PRIVATE_TLV_TYPES.stop - 1)
    return allowed


def _check_tlv_type(tlv_type: int, offset: int, sender: ConvertSender,
                    private_types: frozenset[int]) -> None:
    if tlv_type in private_types:
        return
    if tlv_type == RESERVED_TLV_TYPE:
        raise _unsupported(f"TLV at offset {offset} has the reserved type 0")
    if tlv_type not in _TLV_TYPES:
        raise _unsupported(f"TLV at offset {offset} has unsupported type {tlv_type}")
    if tlv_type not in TLV_TYPES_BY_SENDER[sender]:
        raise _unsupported(f"{ConvertTlvType(tlv_type).name} TLV at offset {offset} "
                           f"is not sent by the {sender.value}")


# The common client message: header (Total Length 6) and a base Connect TLV.
_BASE_CONNECT_MESSAGE_LEN = HEADER_LEN + CONNECT_FIXED_LEN
_BASE_CONNECT_PREFIX = (_HEADER.pack(VERSION, _BASE_CONNECT_MESSAGE_LEN // WORD, MAGIC)
                        + _TLV_HEADER.pack(ConvertTlvType.CONNECT, CONNECT_BASE_WORDS))
_BASE_CONNECT_PREFIX_LEN = len(_BASE_CONNECT_PREFIX)
_BASE_CONNECT_PORT = _BASE_CONNECT_PREFIX_LEN
_BASE_CONNECT_ADDRESS = _BASE_CONNECT_PORT + _UINT16.size
_BYTE_STRINGS = (bytes, bytearray)  # indexed as bytes (a memoryview may have another format)
_MESSAGE_MEMO_SIZE = 1024
# The 24 bytes of a base-Connect message -> its (immutable) decoded message.
_BASE_CONNECT_MESSAGES: dict[bytes, ConvertMessage] = {}


def decode_message(data: bytes | bytearray | memoryview, sender: ConvertSender, *,
                   private_types: Collection[int] = ()) -> tuple[ConvertMessage, int]:
    """Decode the Convert message at the start of ``data``.

    Returns the message and the number of bytes it took (``Total Length * 4``);
    whatever follows is application data. Raises
    :class:`IncompleteConvertMessage` while the bytes so far could still become
    a valid message, :class:`ConvertProtocolError` (with the code to answer
    with) at the first rule they break. ``sender`` is who wrote the bytes;
    ``private_types`` lists the private-use TLV types to accept.
    """
    # Empty (the usual case) needs no checking; anything else is validated
    # first, whatever the bytes.
    allowed_private = _private_type_set(private_types) if private_types else _NO_PRIVATE_TYPES
    # Fast path: the message nearly every connection opens with, a header and
    # one base Connect TLV (RFC 8803 §4.2.5, 24 bytes). Its first 6 bytes are
    # fixed, so the rules the general path checks reduce to "port is not 0";
    # anything else (errors included) goes the general way. Tested to give the
    # same result as the general path on every input. Decoded messages are
    # immutable and a pure function of their 24 bytes: the ones seen lately
    # are remembered (clients keep asking for the same few targets).
    if (sender is ConvertSender.CLIENT and type(data) in _BYTE_STRINGS
            and len(data) >= _BASE_CONNECT_MESSAGE_LEN):
        key = bytes(data[:_BASE_CONNECT_MESSAGE_LEN])
        message = _BASE_CONNECT_MESSAGES.get(key)
        if message is not None:
            return message, _BASE_CONNECT_MESSAGE_LEN
        if key[:_BASE_CONNECT_PREFIX_LEN] == _BASE_CONNECT_PREFIX:
            port = (key[_BASE_CONNECT_PORT] << 8) | key[_BASE_CONNECT_PORT + 1]
            if port:
                message = _decoded_message((_decoded_connect(
                    port, key[_BASE_CONNECT_ADDRESS:_BASE_CONNECT_MESSAGE_LEN], ()),))
                if len(_BASE_CONNECT_MESSAGES) >= _MESSAGE_MEMO_SIZE:
                    _BASE_CONNECT_MESSAGES.clear()
                _BASE_CONNECT_MESSAGES[key] = message
                return message, _BASE_CONNECT_MESSAGE_LEN
    if not isinstance(sender, ConvertSender):
        raise TypeError("sender must be a ConvertSender")
    # A message never exceeds MAX_MESSAGE_LEN.
    return _decode_message_general(bytes(data[:MAX_MESSAGE_LEN]), sender, allowed_private)


def remembered_base_connect(data: bytes) -> ConvertMessage | None:
    """The decoded message if ``data`` starts with a base-Connect message that
    :func:`decode_message` has decoded lately (it is then 24 bytes long and
    the rest of ``data`` is application data); None otherwise, which says
    nothing about the bytes: decode them."""
    return _BASE_CONNECT_MESSAGES.get(
        data if len(data) == _BASE_CONNECT_MESSAGE_LEN else data[:_BASE_CONNECT_MESSAGE_LEN])


BASE_CONNECT_MESSAGE_LEN = _BASE_CONNECT_MESSAGE_LEN
"""Bytes of a message made of the header and one base Connect TLV."""


def _decode_message_general(buf: bytes, sender: ConvertSender,
                            allowed_private: frozenset[int]) -> tuple[ConvertMessage, int]:
    """:func:`decode_message` for any message (``buf`` at most one message long)."""
    have = len(buf)

    # RFC 8803 §4.1 fixed header, checked byte by byte in stream order.
    if have < 1:
        raise IncompleteConvertMessage(1)
    if buf[_VERSION_OFFSET] != VERSION:
        raise UnsupportedConvertVersion(buf[_VERSION_OFFSET])
    if have <= _TOTAL_LENGTH_OFFSET:
        raise IncompleteConvertMessage(_TOTAL_LENGTH_OFFSET + 1)
    total_words = buf[_TOTAL_LENGTH_OFFSET]
    if total_words == 0:
        raise _malformed("Total Length 0")
    if have < HEADER_LEN:
        raise IncompleteConvertMessage(HEADER_LEN)
    _, _, magic = _HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise NotConvertMessage(magic)

    # RFC 8803 §4.2.1 TLVs, until Total Length is used up.
    total_len = total_words * WORD
    tlvs: list[ConvertTlv] = []
    seen: set[int] = set()
    pos = HEADER_LEN
    while pos < total_len:
        if have < pos + TLV_HEADER_LEN:
            raise IncompleteConvertMessage(pos + TLV_HEADER_LEN)
        tlv_type, tlv_words = _TLV_HEADER.unpack_from(buf, pos)
        if tlv_words == 0:
            raise _malformed(f"TLV at offset {pos} has Length 0")
        end = pos + tlv_words * WORD
        if end > total_len:
            raise _malformed(f"TLV at offset {pos} runs {end - total_len} bytes "
                             "past Total Length")
        _check_tlv_type(tlv_type, pos, sender, allowed_private)
        if tlv_type in seen:
            raise _malformed(f"TLV type {tlv_type} appears twice")
        seen.add(tlv_type)
        if have < end:
            raise IncompleteConvertMessage(end)
        tlv_bytes = buf[pos:end]
        if tlv_type in allowed_private:
            tlvs.append(PrivateTlv(tlv_type, tlv_bytes[TLV_HEADER_LEN:]))
        else:
            tlvs.append(_TLV_DECODERS[ConvertTlvType(tlv_type)](tlv_bytes))
        pos = end

    violation = _sender_violation(seen, sender)
    if violation is not None:
        raise _malformed(violation)
    return _decoded_message(tuple(tlvs)), total_len


class ConvertDecoder:
    """Feed it a stream one segment at a time; it yields the Convert message once.

    ``feed()`` returns ``None`` while more bytes are needed and the message
    when it is complete; :attr:`leftover` then holds the application data that
    followed it. A protocol error is raised from ``feed()`` (and again on any
    later call). Call :meth:`feed_eof` when the peer closes: an unfinished
    message is Malformed. While unfinished, the decoder holds at most one
    message (1020 bytes) plus the last segment.
    """

    __slots__ = ("_sender", "_private_types", "_buffer", "_needed", "_message", "_leftover",
                 "_error")

    def __init__(self, sender: ConvertSender, *, private_types: Collection[int] = ()) -> None:
        if not isinstance(sender, ConvertSender):
            raise TypeError("sender must be a ConvertSender")
        self._sender = sender
        self._private_types = _private_type_set(private_types)
        self._buffer = bytearray()
        self._needed = 1
        self._message: ConvertMessage | None = None
        self._leftover = b""
        self._error: ConvertProtocolError | None = None

    @property
    def sender(self) -> ConvertSender:
        return self._sender

    @property
    def done(self) -> bool:
        return self._message is not None

    @property
    def message(self) -> ConvertMessage | None:
        return self._message

    @property
    def leftover(self) -> bytes:
        """Application data received after the message (empty until done)."""
        return self._leftover

    @property
    def received(self) -> bytes:
        """The message bytes received so far (what an error reply echoes)."""
        return bytes(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> ConvertMessage | None:
        if self._error is not None:
            raise self._error
        if self._message is not None:
            raise RuntimeError("the Convert message is complete; read .leftover")
        self._buffer += data
        if len(self._buffer) < self._needed:
            return None
        try:
            message, consumed = decode_message(self._buffer, self._sender,
                                               private_types=self._private_types)
        except IncompleteConvertMessage as incomplete:
            self._needed = incomplete.needed
            return None
        except ConvertProtocolError as error:
            self._error = error
            raise
        self._message = message
        if len(self._buffer) > consumed:
            self._leftover = bytes(self._buffer[consumed:])
            del self._buffer[consumed:]
        return message

    def feed_eof(self) -> None:
        """The peer closed its side: fine after a message, Malformed before."""
        if self._error is not None:
            raise self._error
        if self._message is not None:
            return
        self._error = _malformed(f"stream ended after {len(self._buffer)} bytes, "
                                 "before the Convert message was complete")
        raise self._error

    def error_reply(self, error: ProtocolError) -> ConvertMessage:
        """The Error message answering ``error``, echoing what was received."""
        return error_reply_for(error, self.received)


def error_reply_for(error: ProtocolError, received: bytes) -> ConvertMessage:
    """The converter's answer to a decoding error (RFC 8803 §4.2.8).

    Unsupported Version lists our versions; Malformed and Unsupported Message
    echo the received message (up to its Total Length, cut to fit). Other codes
    need data only the caller has: build them with the ``ErrorTlv`` helpers.
    """
    code = error.code
    if code == ConvertErrorCode.UNSUPPORTED_VERSION:
        return ConvertMessage((ErrorTlv.unsupported_version(),))
    if code in (ConvertErrorCode.MALFORMED_MESSAGE, ConvertErrorCode.UNSUPPORTED_MESSAGE):
        extent = len(received)
        if (extent > _TOTAL_LENGTH_OFFSET and received[_VERSION_OFFSET] == VERSION
                and received[_TOTAL_LENGTH_OFFSET]):
            extent = min(extent, received[_TOTAL_LENGTH_OFFSET] * WORD)
        echo = bytes(received[:min(extent, MAX_ERROR_VALUE_LEN)])
        return ConvertMessage((ErrorTlv.padded(code, echo),))
    raise ValueError(f"no automatic reply for error code {code!r}")


# --------------------------------------------------------------------------
# Connect targets the converter must refuse (RFC 8803 §4.2.5)
# --------------------------------------------------------------------------

class ForbiddenTarget(enum.Enum):
    """Why a Connect target can never be a valid destination."""

    UNSPECIFIED = "unspecified"
    LOOPBACK = "loopback"
    MULTICAST = "multicast"
    BROADCAST = "broadcast"


_LIMITED_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
# RFC 1122 §3.2.1.3: 0.0.0.0/8 is "this network", never a destination; Linux
# even turns a connect to 0.0.0.0 into one to the local host.
_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")


def classify_connect_target(address: IPAddress) -> ForbiddenTarget | None:
    """Which forbidden kind ``address`` is, in any spelling, or None.

    IPv4-mapped IPv6 forms (``::ffff:127.0.0.1``) are judged as the IPv4
    address they map. Policy (the proxy's own addresses, private ranges,
    subnet broadcasts) is not decided here.
    """
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is not None:
            address = mapped
    if isinstance(address, ipaddress.IPv4Address):
        if address in _THIS_NETWORK:
            return ForbiddenTarget.UNSPECIFIED
        if address.is_loopback:
            return ForbiddenTarget.LOOPBACK
        if address == _LIMITED_BROADCAST:
            return ForbiddenTarget.BROADCAST
        if address.is_multicast:
            return ForbiddenTarget.MULTICAST
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.is_unspecified:
            return ForbiddenTarget.UNSPECIFIED
        if address.is_loopback:
            return ForbiddenTarget.LOOPBACK
        if address.is_multicast:
            return ForbiddenTarget.MULTICAST
        return None
    raise TypeError("address must be an IPv4Address or IPv6Address")


def check_connect_target(address: IPAddress) -> None:
    """Raise Malformed Message for a loopback, multicast, broadcast or unspecified target.

    RFC 8803 §4.2.5 makes such a Connect a Malformed Message; the converter
    calls this after decoding, before its own policy.
    """
    forbidden = classify_connect_target(address)
    if forbidden is not None:
        raise _malformed(f"Connect to {forbidden.value} address {address}")


__all__ = [
    "BASE_CONNECT_MESSAGE_LEN", "CONNECT_BASE_WORDS", "HEADER_LEN", "MAGIC",
    "MAX_ERROR_VALUE_LEN", "MAX_MESSAGE_LEN",
    "MAX_TOTAL_WORDS", "PRIVATE_TLV_TYPES", "RESOURCE_EXCEEDED_DEFAULT_RETRY_S",
    "SUPPORTED_VERSIONS", "TLV_TYPES_BY_SENDER", "UNLISTED_TCP_OPTION_KINDS", "VERSION", "WORD",
    "ConnectTlv", "ConvertDecoder", "ConvertErrorCode", "ConvertMessage",
    "ConvertProtocolError", "ConvertSender", "ConvertTlv", "ConvertTlvType", "CookieTlv",
    "ErrorTlv", "ExtendedTcpHeaderTlv", "ForbiddenTarget", "IncompleteConvertMessage",
    "InfoTlv", "NotConvertMessage", "PrivateTlv", "SupportedTcpExtTlv", "TcpOption",
    "TcpOptionKind", "UnsupportedConvertVersion", "check_connect_target", "check_sender",
    "classify_connect_target", "decode_message", "encode_message", "encode_tlv",
    "error_reply_for", "remembered_base_connect",
]
