"""DNS message codec (RFC 1035 §4): bytes in, frozen dataclasses out, and back.

Enough DNS to find a converter by SRV (RFC 2782, RFC 8803 §10.1 service
``convert``) and resolve its host: queries, answers with compressed names,
SRV, A, AAAA (RFC 3596), CNAME, NS, PTR, MX, SOA and the EDNS OPT
pseudo-record (RFC 6891). Other types keep their RDATA as bytes. No sockets,
no clock: :mod:`mptcp_proxy.discovery` does the I/O.

Design rules (each one is tested in ``tests/unit/test_wire_dns.py``):

1. Peer input can only make :func:`decode_message` raise
   :class:`DnsFormatError` (a :class:`~mptcp_proxy.errors.ProtocolError`
   whose code is FORMERR). No ``IndexError``/``struct.error`` escapes.
2. Strict: the four counts must match the records present, a known type's
   RDATA must fill its RDLENGTH exactly, and nothing may follow the last
   record.
3. Names are tuples of raw labels (:class:`DnsName`), so every wire name
   round-trips exactly; text forms escape what is not a plain hostname
   character (RFC 4343 §2.1 style ``\\.`` and ``\\DDD``).
4. Compression pointers (RFC 1035 §4.1.4) are followed only backwards: a
   pointer must land before the start of the label run that holds it (and
   after the header). Every jump moves strictly left, so a walk always ends;
   every pointer a real encoder writes satisfies this.
5. Labels starting with 0b01/0b10 (RFC 6891 §5 extended/obsolete label
   types) are malformed.
6. The encoder compresses owner names and the names inside NS, CNAME, PTR,
   MX and SOA RDATA, never an SRV target (RFC 2782: "name compression is not
   to be used for this field"); the decoder accepts compressed SRV targets
   all the same.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass
from typing import TypeAlias, Union

from mptcp_proxy.errors import ProtocolError

HEADER_LEN = 12
MAX_LABEL_LEN = 63
MAX_NAME_WIRE_LEN = 255
"""RFC 1035 §2.3.4: labels, length bytes and the root byte, at most 255."""
MAX_MESSAGE_LEN = 0xFFFF
MAX_POINTER_OFFSET = 0x3FFF
POINTER_MASK = 0xC0
LABEL_TYPE_MASK = 0xC0
MAX_UINT16 = 0xFFFF
MAX_UINT32 = 0xFFFFFFFF
MAX_RDATA_LEN = 0xFFFF
DEFAULT_EDNS_UDP_SIZE = 1232
"""The DNS Flag Day 2020 payload size: avoids IP fragmentation on most paths."""

_HEADER = struct.Struct("!HHHHHH")
_QUESTION_TAIL = struct.Struct("!HH")
_RR_TAIL = struct.Struct("!HHIH")
_SRV_FIXED = struct.Struct("!HHH")
_MX_FIXED = struct.Struct("!H")
_SOA_TAIL = struct.Struct("!IIIII")
_IPV4_LEN = 4
_IPV6_LEN = 16

# Header flag bits (RFC 1035 §4.1.1; AD/CD from RFC 4035 share the Z field).
_QR = 0x8000
_OPCODE_SHIFT = 11
_OPCODE_MASK = 0xF
_AA = 0x0400
_TC = 0x0200
_RD = 0x0100
_RA = 0x0080
_Z_SHIFT = 4
_Z_MASK = 0x7
_RCODE_MASK = 0xF


class DnsType(enum.IntEnum):
    """Resource record types this codec knows by name (IANA "Resource Record (RR) TYPEs")."""

    A = 1
    NS = 2
    CNAME = 5
    SOA = 6
    PTR = 12
    MX = 15
    TXT = 16
    AAAA = 28
    SRV = 33
    OPT = 41
    ANY = 255


class DnsClass(enum.IntEnum):
    IN = 1
    ANY = 255


class DnsOpcode(enum.IntEnum):
    QUERY = 0


class DnsRcode(enum.IntEnum):
    """RFC 1035 §4.1.1 response codes."""

    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5


class DnsFormatError(ProtocolError):
    """A DNS message breaks RFC 1035; ``offset`` is where decoding stopped."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        where = f" (offset {offset})" if offset is not None else ""
        super().__init__(message + where, DnsRcode.FORMERR)
        self.offset = offset


def _require_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high}, not {value}")


def _require_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, not {type(value).__name__}")


# --------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------

_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_*")


@dataclass(frozen=True, slots=True)
class DnsName:
    """A domain name as its raw labels, root excluded (``()`` is the root).

    Equality is exact (case-sensitive, as on the wire); :attr:`key` is the
    case-insensitive form names are compared by (RFC 4343).
    """

    labels: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.labels, (str, bytes)):
            raise TypeError("labels must be a tuple of bytes")
        labels = tuple(self.labels)
        for label in labels:
            if not isinstance(label, bytes):
                raise TypeError(f"a label is bytes, not {type(label).__name__}")
            if not 1 <= len(label) <= MAX_LABEL_LEN:
                raise ValueError(f"a label is 1..{MAX_LABEL_LEN} bytes, not {len(label)}")
        object.__setattr__(self, "labels", labels)
        if self.wire_length > MAX_NAME_WIRE_LEN:
            raise ValueError(f"name is {self.wire_length} bytes on the wire, "
                             f"at most {MAX_NAME_WIRE_LEN}")

    @classmethod
    def from_text(cls, text: str) -> DnsName:
        """Parse ``_convert._tcp.example.com`` (trailing dot optional; ``\\.``
        and ``\\DDD`` escapes allowed). Non-ASCII labels are IDNA-encoded."""
        if not isinstance(text, str):
            raise TypeError("name text must be a str")
        if text in ("", "."):
            return cls(())
        labels: list[bytes] = []
        current = bytearray()
        unicode_label = False
        i = 0
        while i < len(text):
            ch = text[i]
            if ch == "\\":
                digits = text[i + 1:i + 4]
                if len(digits) == 3 and all(d in "0123456789" for d in digits):
                    if int(digits) > 0xFF:
                        raise ValueError(f"escape \\{digits} is not a byte")
                    current.append(int(digits))
                    i += 4
                    continue
                if i + 1 >= len(text):
                    raise ValueError("name ends with a lone backslash")
                ch = text[i + 1]
                i += 1
            elif ch == ".":
                if not current:
                    raise ValueError(f"empty label in {text!r}")
                labels.append(_finish_label(current, unicode_label))
                current, unicode_label = bytearray(), False
                i += 1
                continue
            unicode_label = unicode_label or not ch.isascii()
            current += ch.encode("utf-8")
            i += 1
        if current:
            labels.append(_finish_label(current, unicode_label))
        elif not text.endswith("."):
            raise ValueError(f"empty label in {text!r}")
        return cls(tuple(labels))

    @property
    def wire_length(self) -> int:
        return sum(1 + len(label) for label in self.labels) + 1

    @property
    def key(self) -> tuple[bytes, ...]:
        """Case-insensitive comparison key (ASCII letters folded, RFC 4343)."""
        return tuple(label.lower() for label in self.labels)

    def matches(self, other: DnsName) -> bool:
        return self.key == other.key

    @property
    def is_root(self) -> bool:
        return not self.labels

    def child(self, *labels: str) -> DnsName:
        """``name.child("_convert", "_tcp")`` is ``_convert._tcp.name``."""
        return DnsName(tuple(label.encode("ascii") for label in labels) + self.labels)

    def to_text(self) -> str:
        """Presentation form without the trailing dot ("." for the root)."""
        if not self.labels:
            return "."
        return ".".join(_label_text(label) for label in self.labels)

    def __str__(self) -> str:
        return self.to_text()


def _finish_label(raw: bytearray, unicode_label: bool) -> bytes:
    if not unicode_label:
        return bytes(raw)
    return raw.decode("utf-8").encode("idna")  # UnicodeError is a ValueError


def _label_text(label: bytes) -> str:
    out = []
    for byte in label:
        if byte in _PLAIN:
            out.append(chr(byte))
        elif byte in (0x2E, 0x5C):  # "." and "\"
            out.append("\\" + chr(byte))
        else:
            out.append(f"\\{byte:03d}")
    return "".join(out)


ROOT = DnsName(())


# --------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SrvData:
    """SRV RDATA (RFC 2782): lower priority first, weight shares within a priority."""

    priority: int
    weight: int
    port: int
    target: DnsName

    def __post_init__(self) -> None:
        _require_int("SRV priority", self.priority, 0, MAX_UINT16)
        _require_int("SRV weight", self.weight, 0, MAX_UINT16)
        _require_int("SRV port", self.port, 0, MAX_UINT16)
        if not isinstance(self.target, DnsName):
            raise TypeError("SRV target must be a DnsName")

    @property
    def unavailable(self) -> bool:
        """Target "." means the service is decidedly not offered (RFC 2782)."""
        return self.target.is_root


@dataclass(frozen=True, slots=True)
class MxData:
    preference: int
    exchange: DnsName

    def __post_init__(self) -> None:
        _require_int("MX preference", self.preference, 0, MAX_UINT16)
        if not isinstance(self.exchange, DnsName):
            raise TypeError("MX exchange must be a DnsName")


@dataclass(frozen=True, slots=True)
class SoaData:
    mname: DnsName
    rname: DnsName
    serial: int
    refresh: int
    retry: int
    expire: int
    minimum: int

    def __post_init__(self) -> None:
        if not isinstance(self.mname, DnsName) or not isinstance(self.rname, DnsName):
            raise TypeError("SOA names must be DnsName")
        for name in ("serial", "refresh", "retry", "expire", "minimum"):
            _require_int(f"SOA {name}", getattr(self, name), 0, MAX_UINT32)


RData: TypeAlias = Union[ipaddress.IPv4Address, ipaddress.IPv6Address, SrvData, MxData,
                         SoaData, DnsName, bytes]
"""A: IPv4Address; AAAA: IPv6Address; SRV, MX, SOA: their dataclass; NS, CNAME,
PTR: the DnsName; anything else (OPT, TXT, ...): raw bytes."""

_NAME_RDATA_TYPES = frozenset({DnsType.NS, DnsType.CNAME, DnsType.PTR})


def _check_rdata(rtype: int, data: object) -> None:
    expected: type | tuple[type, ...]
    if rtype == DnsType.A:
        expected = ipaddress.IPv4Address
    elif rtype == DnsType.AAAA:
        expected = ipaddress.IPv6Address
    elif rtype == DnsType.SRV:
        expected = SrvData
    elif rtype == DnsType.MX:
        expected = MxData
    elif rtype == DnsType.SOA:
        expected = SoaData
    elif rtype in _NAME_RDATA_TYPES:
        expected = DnsName
    else:
        expected = bytes
    if not isinstance(data, expected):
        raise TypeError(f"RDATA of type {rtype} must be {getattr(expected, '__name__', expected)}, "
                        f"not {type(data).__name__}")
    if isinstance(data, bytes) and len(data) > MAX_RDATA_LEN:
        raise ValueError("RDATA is at most 65535 bytes")


@dataclass(frozen=True, slots=True)
class Question:
    name: DnsName
    qtype: int
    qclass: int = DnsClass.IN

    def __post_init__(self) -> None:
        if not isinstance(self.name, DnsName):
            raise TypeError("question name must be a DnsName")
        _require_int("QTYPE", self.qtype, 0, MAX_UINT16)
        _require_int("QCLASS", self.qclass, 0, MAX_UINT16)
        _known(self, "qtype", DnsType)
        _known(self, "qclass", DnsClass)

    def matches(self, other: Question) -> bool:
        """Same question, names compared case-insensitively."""
        return (self.name.matches(other.name) and self.qtype == other.qtype
                and self.qclass == other.qclass)


@dataclass(frozen=True, slots=True)
class ResourceRecord:
    name: DnsName
    rtype: int
    rclass: int
    ttl: int
    data: RData

    def __post_init__(self) -> None:
        if not isinstance(self.name, DnsName):
            raise TypeError("record name must be a DnsName")
        _require_int("TYPE", self.rtype, 0, MAX_UINT16)
        _require_int("CLASS", self.rclass, 0, MAX_UINT16)
        _require_int("TTL", self.ttl, 0, MAX_UINT32)
        _known(self, "rtype", DnsType)
        if self.rtype != DnsType.OPT:  # OPT's CLASS is a payload size, not a class
            _known(self, "rclass", DnsClass)
        _check_rdata(self.rtype, self.data)


def _known(owner: object, field: str, enum_type: type[enum.IntEnum]) -> None:
    value = getattr(owner, field)
    try:
        object.__setattr__(owner, field, enum_type(value))
    except ValueError:
        object.__setattr__(owner, field, int(value))


@dataclass(frozen=True, slots=True)
class DnsHeader:
    """RFC 1035 §4.1.1 without the counts (they follow from the sections)."""

    id: int
    qr: bool = False
    opcode: int = DnsOpcode.QUERY
    aa: bool = False
    tc: bool = False
    rd: bool = True
    ra: bool = False
    z: int = 0
    """The three bits after RA: Z, AD and CD (RFC 4035 §3.2)."""
    rcode: int = DnsRcode.NOERROR

    def __post_init__(self) -> None:
        _require_int("DNS id", self.id, 0, MAX_UINT16)
        _require_int("opcode", self.opcode, 0, _OPCODE_MASK)
        _require_int("Z bits", self.z, 0, _Z_MASK)
        _require_int("RCODE", self.rcode, 0, _RCODE_MASK)
        for flag in ("qr", "aa", "tc", "rd", "ra"):
            _require_bool(flag, getattr(self, flag))
        _known(self, "opcode", DnsOpcode)
        _known(self, "rcode", DnsRcode)

    @property
    def flags(self) -> int:
        return ((_QR if self.qr else 0) | (self.opcode << _OPCODE_SHIFT)
                | (_AA if self.aa else 0) | (_TC if self.tc else 0)
                | (_RD if self.rd else 0) | (_RA if self.ra else 0)
                | (self.z << _Z_SHIFT) | self.rcode)

    @classmethod
    def from_flags(cls, id: int, flags: int) -> DnsHeader:
        return cls(id=id, qr=bool(flags & _QR), opcode=(flags >> _OPCODE_SHIFT) & _OPCODE_MASK,
                   aa=bool(flags & _AA), tc=bool(flags & _TC), rd=bool(flags & _RD),
                   ra=bool(flags & _RA), z=(flags >> _Z_SHIFT) & _Z_MASK,
                   rcode=flags & _RCODE_MASK)


def _tuple_of(owner: object, field: str, cls: type) -> None:
    value = getattr(owner, field)
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{field} must be a tuple of {cls.__name__}")
    items = tuple(value)
    for item in items:
        if not isinstance(item, cls):
            raise TypeError(f"{field} must hold {cls.__name__}, not {type(item).__name__}")
    if len(items) > MAX_UINT16:
        raise ValueError(f"at most {MAX_UINT16} entries in {field}")
    object.__setattr__(owner, field, items)


@dataclass(frozen=True, slots=True)
class DnsMessage:
    header: DnsHeader
    questions: tuple[Question, ...] = ()
    answers: tuple[ResourceRecord, ...] = ()
    authorities: tuple[ResourceRecord, ...] = ()
    additionals: tuple[ResourceRecord, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.header, DnsHeader):
            raise TypeError("header must be a DnsHeader")
        _tuple_of(self, "questions", Question)
        for section in ("answers", "authorities", "additionals"):
            _tuple_of(self, section, ResourceRecord)

    @property
    def question(self) -> Question | None:
        return self.questions[0] if self.questions else None

    @property
    def opt(self) -> ResourceRecord | None:
        """The EDNS OPT pseudo-record, if any (RFC 6891 §6.1.1)."""
        for record in self.additionals:
            if record.rtype == DnsType.OPT:
                return record
        return None


# --------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------

class _Writer:
    def __init__(self, compress: bool) -> None:
        self.buf = bytearray()
        self.compress = compress
        self.offsets: dict[tuple[bytes, ...], int] = {}

    def name(self, name: DnsName, compress: bool = True) -> None:
        labels = name.labels
        for i in range(len(labels)):
            suffix = labels[i:]
            if self.compress and compress:
                offset = self.offsets.get(suffix)
                if offset is not None:
                    self.buf += struct.pack("!H", 0xC000 | offset)
                    return
            if len(self.buf) <= MAX_POINTER_OFFSET:
                self.offsets.setdefault(suffix, len(self.buf))
            self.buf.append(len(labels[i]))
            self.buf += labels[i]
        self.buf.append(0)

    def rdata(self, rtype: int, data: RData) -> None:
        if isinstance(data, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            self.buf += data.packed
        elif isinstance(data, SrvData):
            self.buf += _SRV_FIXED.pack(data.priority, data.weight, data.port)
            self.name(data.target, compress=False)  # RFC 2782
        elif isinstance(data, MxData):
            self.buf += _MX_FIXED.pack(data.preference)
            self.name(data.exchange)
        elif isinstance(data, SoaData):
            self.name(data.mname)
            self.name(data.rname)
            self.buf += _SOA_TAIL.pack(data.serial, data.refresh, data.retry, data.expire,
                                       data.minimum)
        elif isinstance(data, DnsName):
            self.name(data)
        else:
            self.buf += data

    def record(self, record: ResourceRecord) -> None:
        self.name(record.name)
        tail_at = len(self.buf)
        self.buf += bytes(_RR_TAIL.size)
        self.rdata(record.rtype, record.data)
        rdlength = len(self.buf) - tail_at - _RR_TAIL.size
        if rdlength > MAX_RDATA_LEN:
            raise ValueError(f"RDATA of {rdlength} bytes does not fit RDLENGTH")
        _RR_TAIL.pack_into(self.buf, tail_at, record.rtype, record.rclass, record.ttl, rdlength)


def encode_message(message: DnsMessage, *, compress: bool = True) -> bytes:
    """The wire form of ``message``; names compressed unless ``compress`` is False."""
    if not isinstance(message, DnsMessage):
        raise TypeError(f"not a DnsMessage: {type(message).__name__}")
    writer = _Writer(compress)
    writer.buf += _HEADER.pack(message.header.id, message.header.flags, len(message.questions),
                               len(message.answers), len(message.authorities),
                               len(message.additionals))
    for question in message.questions:
        writer.name(question.name)
        writer.buf += _QUESTION_TAIL.pack(question.qtype, question.qclass)
    for section in (message.answers, message.authorities, message.additionals):
        for record in section:
            writer.record(record)
    if len(writer.buf) > MAX_MESSAGE_LEN:
        raise ValueError(f"DNS message of {len(writer.buf)} bytes exceeds {MAX_MESSAGE_LEN}")
    return bytes(writer.buf)


def opt_record(udp_payload_size: int = DEFAULT_EDNS_UDP_SIZE) -> ResourceRecord:
    """An EDNS(0) OPT pseudo-record advertising ``udp_payload_size`` (RFC 6891 §6.1.2)."""
    _require_int("EDNS UDP payload size", udp_payload_size, 512, MAX_UINT16)
    return ResourceRecord(ROOT, DnsType.OPT, udp_payload_size, 0, b"")


def build_query(name: DnsName | str, qtype: int, *, id: int, rd: bool = True,
                qclass: int = DnsClass.IN, edns_udp_size: int | None = None) -> bytes:
    """A standard query for ``name``/``qtype``; with ``edns_udp_size``, an OPT record too."""
    if isinstance(name, str):
        name = DnsName.from_text(name)
    additionals = () if edns_udp_size is None else (opt_record(edns_udp_size),)
    return encode_message(DnsMessage(DnsHeader(id=id, rd=rd), (Question(name, qtype, qclass),),
                                     additionals=additionals))


def build_srv_query(name: DnsName | str, *, id: int,
                    edns_udp_size: int | None = None) -> bytes:
    """The SRV query RFC 2782 resolution starts with (``_convert._tcp.<domain>``)."""
    return build_query(name, DnsType.SRV, id=id, edns_udp_size=edns_udp_size)


# --------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------

class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def need(self, n: int, what: str) -> None:
        if self.pos + n > len(self.data):
            raise DnsFormatError(f"message ends inside {what}", self.pos)

    def unpack(self, st: struct.Struct, what: str) -> tuple[int, ...]:
        self.need(st.size, what)
        values = st.unpack_from(self.data, self.pos)
        self.pos += st.size
        return values

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def name(self, limit: int | None = None) -> DnsName:
        """A possibly compressed name at ``pos``; ``pos`` moves past its in-place bytes.

        ``limit`` bounds the in-place bytes (the end of an RDATA).
        """
        end = len(self.data) if limit is None else limit
        data = self.data
        labels: list[bytes] = []
        wire_len = 1
        pos = self.pos
        segment_start = pos  # start of the label run being read (rule 4)
        resume: int | None = None  # where the in-place bytes ended, after the first jump
        while True:
            if pos >= (end if resume is None else len(data)):
                raise DnsFormatError("name runs past its end", pos)
            length = data[pos]
            kind = length & LABEL_TYPE_MASK
            if kind == POINTER_MASK:
                if pos + 2 > (end if resume is None else len(data)):
                    raise DnsFormatError("compression pointer cut short", pos)
                target = ((length & ~POINTER_MASK) << 8) | data[pos + 1]
                if not HEADER_LEN <= target < segment_start:
                    raise DnsFormatError(
                        f"compression pointer to {target} is not backwards "
                        f"(label run starts at {segment_start})", pos)
                if resume is None:
                    resume = pos + 2
                pos = segment_start = target
                continue
            if kind:
                raise DnsFormatError(f"label type {kind >> 6:#04b} is not supported", pos)
            pos += 1
            if length == 0:
                break
            limit_here = end if resume is None else len(data)
            if pos + length > limit_here:
                raise DnsFormatError("label runs past its end", pos)
            wire_len += 1 + length
            if wire_len > MAX_NAME_WIRE_LEN:
                raise DnsFormatError(f"name longer than {MAX_NAME_WIRE_LEN} bytes", pos)
            labels.append(data[pos:pos + length])
            pos += length
        self.pos = pos if resume is None else resume
        return DnsName(tuple(labels))


def _decode_rdata(reader: _Reader, rtype: int, rdlength: int) -> RData:
    start = reader.pos
    end = start + rdlength
    reader.need(rdlength, f"RDATA of type {rtype}")
    if rtype == DnsType.A or rtype == DnsType.AAAA:
        size = _IPV4_LEN if rtype == DnsType.A else _IPV6_LEN
        if rdlength != size:
            raise DnsFormatError(f"{DnsType(rtype).name} RDATA is {rdlength} bytes, not {size}",
                                 start)
        raw = reader.take(size, "address")
        return ipaddress.IPv4Address(raw) if size == _IPV4_LEN else ipaddress.IPv6Address(raw)
    if rtype == DnsType.SRV:
        if rdlength < _SRV_FIXED.size + 1:
            raise DnsFormatError(f"SRV RDATA is {rdlength} bytes, too short", start)
        priority, weight, port = reader.unpack(_SRV_FIXED, "SRV RDATA")
        data: RData = SrvData(priority, weight, port, reader.name(end))
    elif rtype == DnsType.MX:
        if rdlength < _MX_FIXED.size + 1:
            raise DnsFormatError(f"MX RDATA is {rdlength} bytes, too short", start)
        (preference,) = reader.unpack(_MX_FIXED, "MX RDATA")
        data = MxData(preference, reader.name(end))
    elif rtype == DnsType.SOA:
        mname = reader.name(end)
        rname = reader.name(end)
        if reader.pos + _SOA_TAIL.size > end:
            raise DnsFormatError("SOA RDATA too short", reader.pos)
        data = SoaData(mname, rname, *reader.unpack(_SOA_TAIL, "SOA RDATA"))
    elif rtype in _NAME_RDATA_TYPES:
        data = reader.name(end)
    else:
        return reader.take(rdlength, "RDATA")
    if reader.pos != end:
        raise DnsFormatError(f"{DnsType(rtype).name} RDATA has {end - reader.pos} bytes "
                             "after its fields", reader.pos)
    return data


def _decode_record(reader: _Reader) -> ResourceRecord:
    name = reader.name()
    rtype, rclass, ttl, rdlength = reader.unpack(_RR_TAIL, "record header")
    if rtype == DnsType.OPT and not name.is_root:
        raise DnsFormatError("OPT record not owned by the root", reader.pos)
    return ResourceRecord(name, rtype, rclass, ttl, _decode_rdata(reader, rtype, rdlength))


def decode_message(data: bytes | bytearray | memoryview) -> DnsMessage:
    """Decode a whole DNS message (a UDP datagram, or a TCP message without its length)."""
    data = bytes(data)
    if len(data) > MAX_MESSAGE_LEN:
        raise DnsFormatError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_LEN}")
    reader = _Reader(data)
    id_, flags, qdcount, ancount, nscount, arcount = reader.unpack(_HEADER, "header")
    header = DnsHeader.from_flags(id_, flags)
    questions = []
    for _ in range(qdcount):
        name = reader.name()
        qtype, qclass = reader.unpack(_QUESTION_TAIL, "question")
        questions.append(Question(name, qtype, qclass))
    sections: list[list[ResourceRecord]] = []
    for count in (ancount, nscount, arcount):
        sections.append([_decode_record(reader) for _ in range(count)])
    if reader.pos != len(data):
        raise DnsFormatError(f"{len(data) - reader.pos} bytes after the last record", reader.pos)
    answers, authorities, additionals = sections
    if sum(1 for record in additionals if record.rtype == DnsType.OPT) > 1:
        raise DnsFormatError("more than one OPT record (RFC 6891 §6.1.1)")
    return DnsMessage(header, tuple(questions), tuple(answers), tuple(authorities),
                      tuple(additionals))


__all__ = [
    "DEFAULT_EDNS_UDP_SIZE", "HEADER_LEN", "MAX_LABEL_LEN", "MAX_NAME_WIRE_LEN", "ROOT",
    "DnsClass", "DnsFormatError", "DnsHeader", "DnsMessage", "DnsName", "DnsOpcode",
    "DnsRcode", "DnsType", "MxData", "Question", "RData", "ResourceRecord", "SoaData",
    "SrvData", "build_query", "build_srv_query", "decode_message", "encode_message",
    "opt_record",
]
