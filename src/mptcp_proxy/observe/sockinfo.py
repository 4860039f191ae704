"""What the kernel knows about one MPTCP or TCP socket.

Read-only ``getsockopt()`` views used by close log lines, metrics and tests
that must prove multipath instead of assuming it.

Design rules:
- Every function takes a raw fd (the relay holds raw fds) or an object with
  ``fileno()``. Nothing here closes, changes or reads from the socket.
- ``parse_*`` functions are pure: bytes in, frozen dataclasses out. Kernels
  only ever append to these structs and copy ``min(optlen, sizeof)`` bytes, so
  a field the kernel did not fill is ``None``; bytes too short for the oldest
  layout raise :class:`SockInfoError`.
- Integers are native-endian (``=``), as the kernel writes them; network
  byte order only inside sockaddrs.

Measured on Linux 6.18 (tests/integration/test_sockinfo.py):
- ``TCP_IS_MPTCP`` is 1 on an MPTCP socket (connected, unconnected or
  listening) and 0 on a plain TCP socket and on an MPTCP socket that fell back
  (6.18 answers 0, not ENOPROTOOPT, on plain TCP).
- ``SO_PROTOCOL``: MPTCP client -> MPTCP listener gives 262 on both ends;
  plain TCP client -> MPTCP listener gives an accepted socket with 6 (the
  kernel hands out the bare TCP socket); MPTCP client -> TCP listener keeps
  262 on the client although ``TCP_IS_MPTCP`` is 0 (that is the fallback
  signature).
- After fallback every getsockopt goes to the one TCP subflow
  (net/mptcp/sockopt.c, ``__mptcp_tcp_fallback``): ``SOL_MPTCP`` options
  fail with EOPNOTSUPP (same as on plain TCP), ``TCP_INFO`` is the subflow's
  and reads CLOSE_WAIT (8) once the server's FIN arrived.
- ``MPTCP_INFO`` on an MPTCP listener succeeds with 96 zero bytes (token 0).
- ``mptcpi_subflows_total`` is the number of live subflows including the
  initial one, not a running total: it went 2 -> 1 when a subflow endpoint
  was deleted. ``mptcpi_subflows`` counts the extra (non-initial) subflows.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
import socket
import struct
import sys
from dataclasses import dataclass
from typing import Protocol

from mptcp_proxy.errors import KernelError

# --- constants (uapi linux/in.h, linux/socket.h, linux/tcp.h, linux/mptcp.h) ---

IPPROTO_MPTCP = 262
IPPROTO_TCP = 6
SOL_TCP = 6
SOL_SOCKET = 1
SO_PROTOCOL = 38
SOL_MPTCP = 284

TCP_INFO = 11
TCP_IS_MPTCP = 43

MPTCP_INFO = 1
MPTCP_TCPINFO = 2
MPTCP_SUBFLOW_ADDRS = 3
MPTCP_FULL_INFO = 4

# struct mptcp_info.mptcpi_flags
MPTCP_INFO_FLAG_FALLBACK = 1 << 0
MPTCP_INFO_FLAG_REMOTE_KEY_RECEIVED = 1 << 1

# struct tcp_info.tcpi_options
TCPI_OPT_TIMESTAMPS = 1
TCPI_OPT_SACK = 2
TCPI_OPT_WSCALE = 4
TCPI_OPT_ECN = 8
TCPI_OPT_ECN_SEEN = 16
TCPI_OPT_SYN_DATA = 32
TCPI_OPT_USEC_TS = 64
TCPI_OPT_TFO_CHILD = 128


class TcpState(enum.IntEnum):
    """``tcpi_state`` values (include/net/tcp_states.h)."""

    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11
    NEW_SYN_RECV = 12
    BOUND_INACTIVE = 13


TCP_ESTABLISHED = 1
TCP_SYN_SENT = 2
TCP_SYN_RECV = 3
TCP_FIN_WAIT1 = 4
TCP_FIN_WAIT2 = 5
TCP_TIME_WAIT = 6
TCP_CLOSE = 7
TCP_CLOSE_WAIT = 8
TCP_LAST_ACK = 9
TCP_LISTEN = 10
TCP_CLOSING = 11
TCP_NEW_SYN_RECV = 12
TCP_BOUND_INACTIVE = 13


class TcpCaState(enum.IntEnum):
    """``tcpi_ca_state`` values (uapi linux/tcp.h, enum tcp_ca_state)."""

    OPEN = 0
    DISORDER = 1
    CWR = 2
    RECOVERY = 3
    LOSS = 4


class SockInfoError(KernelError):
    """The kernel returned socket information this module cannot parse."""


class HasFileno(Protocol):
    def fileno(self) -> int: ...


FdLike = int | HasFileno

# Errors that mean "this socket is not (or no longer) MPTCP".
_NOT_MPTCP_ERRNOS = frozenset({errno.EOPNOTSUPP, errno.ENOPROTOOPT})


# --- struct layouts ---------------------------------------------------------

def _layout(spec: tuple[tuple[str | None, str], ...]) -> tuple[tuple[str, int, struct.Struct], ...]:
    """(name, struct code) in C order -> (name, offset, Struct), naturally aligned.

    ``None`` names are explicit padding/reserved bytes (code like ``"3x"``).
    """
    fields = []
    offset = 0
    for name, code in spec:
        st = struct.Struct("=" + code)
        if name is None:
            offset += st.size
            continue
        offset = -(-offset // st.size) * st.size  # align scalar to its size
        fields.append((name, offset, st))
        offset += st.size
    return tuple(fields)


def _end(layout: tuple[tuple[str, int, struct.Struct], ...], name: str) -> int:
    for field, offset, st in layout:
        if field == name:
            return offset + st.size
    raise KeyError(name)


# struct tcp_info, uapi linux/tcp.h as of 6.18. Bytes 6 and 7 are bitfields.
# The AccECN trailer (248..280, 6.18) is not parsed.
_TCP_INFO_LAYOUT = _layout((
    ("state", "B"), ("ca_state", "B"), ("retransmits", "B"), ("probes", "B"),
    ("backoff", "B"), ("options", "B"), ("_wscale", "B"), ("_flags7", "B"),
    ("rto_us", "I"), ("ato_us", "I"), ("snd_mss", "I"), ("rcv_mss", "I"),
    ("unacked", "I"), ("sacked", "I"), ("lost", "I"), ("retrans", "I"), ("fackets", "I"),
    ("last_data_sent_ms", "I"), ("last_ack_sent_ms", "I"),
    ("last_data_recv_ms", "I"), ("last_ack_recv_ms", "I"),
    ("pmtu", "I"), ("rcv_ssthresh", "I"), ("rtt_us", "I"), ("rttvar_us", "I"),
    ("snd_ssthresh", "I"), ("snd_cwnd", "I"), ("advmss", "I"), ("reordering", "I"),
    ("rcv_rtt_us", "I"), ("rcv_space", "I"),
    ("total_retrans", "I"),
    # 4.1+
    ("pacing_rate", "Q"), ("max_pacing_rate", "Q"),
    ("bytes_acked", "Q"), ("bytes_received", "Q"),
    ("segs_out", "I"), ("segs_in", "I"),
    ("notsent_bytes", "I"), ("min_rtt_us", "I"),
    ("data_segs_in", "I"), ("data_segs_out", "I"),
    ("delivery_rate", "Q"),
    ("busy_time_us", "Q"), ("rwnd_limited_us", "Q"), ("sndbuf_limited_us", "Q"),
    ("delivered", "I"), ("delivered_ce", "I"),
    ("bytes_sent", "Q"), ("bytes_retrans", "Q"),
    ("dsack_dups", "I"), ("reord_seen", "I"),
    ("rcv_ooopack", "I"),
    ("snd_wnd", "I"),
    ("rcv_wnd", "I"),
    ("rehash", "I"),
    ("total_rto", "H"), ("total_rto_recoveries", "H"), ("total_rto_time_ms", "I"),
))
# Everything up to tcpi_total_retrans has been there since Linux 2.6.
TCP_INFO_MIN_LEN = _end(_TCP_INFO_LAYOUT, "total_retrans")  # 104
TCP_INFO_PARSED_LEN = _end(_TCP_INFO_LAYOUT, "total_rto_time_ms")  # 248
# Room asked of the kernel: more than any struct tcp_info so far (280 on 6.18).
_TCP_INFO_REQUEST = 512

# struct mptcp_info, uapi linux/mptcp.h (6.10+): "=6B2xII3Q3BxI4Q4B3I", 96 bytes.
_MPTCP_INFO_LAYOUT = _layout((
    ("subflows", "B"), ("add_addr_signal", "B"), ("add_addr_accepted", "B"),
    ("subflows_max", "B"), ("add_addr_signal_max", "B"), ("add_addr_accepted_max", "B"),
    ("flags", "I"), ("token", "I"),
    ("write_seq", "Q"), ("snd_una", "Q"), ("rcv_nxt", "Q"),
    ("local_addr_used", "B"), ("local_addr_max", "B"),  # 5.12
    ("csum_enabled", "B"),  # 5.14
    ("retransmits", "I"), ("bytes_retrans", "Q"), ("bytes_sent", "Q"),  # 6.5
    ("bytes_received", "Q"), ("bytes_acked", "Q"),
    ("subflows_total", "B"),  # 6.8
    (None, "3x"),
    ("last_data_sent_ms", "I"), ("last_data_recv_ms", "I"), ("last_ack_recv_ms", "I"),  # 6.10
))
MPTCP_INFO_MIN_LEN = _end(_MPTCP_INFO_LAYOUT, "rcv_nxt")  # 40, Linux 5.9
MPTCP_INFO_LEN = _end(_MPTCP_INFO_LAYOUT, "last_ack_recv_ms")  # 96

# struct mptcp_subflow_data {u32 size_subflow_data, num_subflows, size_kernel, size_user}
_SUBFLOW_DATA = struct.Struct("=IIII")
# struct mptcp_full_info: 6 x u32, then two __aligned_u64 user pointers, then mptcp_info.
_FULL_INFO_HEAD = struct.Struct("=IIIIIIQQ")  # 40 bytes = MIN_FULL_INFO_OPTLEN_SIZE
FULL_INFO_LEN = _FULL_INFO_HEAD.size + MPTCP_INFO_LEN

# struct __kernel_sockaddr_storage is 128 bytes and pointer-aligned (it holds a
# void *), so mptcp_subflow_addrs is 2 x 128 and mptcp_subflow_info puts it
# after the u32 id at the next pointer boundary (8 on 64-bit).
_SOCKADDR_STORAGE_LEN = 128
SUBFLOW_ADDRS_LEN = 2 * _SOCKADDR_STORAGE_LEN
_PTR_ALIGN = ctypes.alignment(ctypes.c_void_p)
SUBFLOW_INFO_ADDRS_OFFSET = -(-4 // _PTR_ALIGN) * _PTR_ALIGN
SUBFLOW_INFO_LEN = SUBFLOW_INFO_ADDRS_OFFSET + SUBFLOW_ADDRS_LEN

_U16_BE = struct.Struct("!H")
_U16 = struct.Struct("=H")
_U32 = struct.Struct("=I")


def _fields(layout: tuple[tuple[str, int, struct.Struct], ...], data: bytes) -> dict[str, int | None]:
    """Unpack every field that lies wholly inside ``data``; the rest are None."""
    out: dict[str, int | None] = {}
    for name, offset, st in layout:
        out[name] = st.unpack_from(data, offset)[0] if offset + st.size <= len(data) else None
    return out


# --- dataclasses ------------------------------------------------------------

@dataclass(frozen=True)
class TcpInfo:
    """The useful part of ``struct tcp_info`` (uapi linux/tcp.h).

    Fields up to ``total_retrans`` exist on every kernel; later ones are
    ``None`` when the kernel's struct is shorter. Times are in the unit their
    suffix says; rates in bytes per second.
    """

    length: int
    """Bytes the kernel filled in."""
    state: int
    ca_state: int
    retransmits: int
    probes: int
    backoff: int
    options: int
    """``TCPI_OPT_*`` bitmask; see the ``has_*`` properties."""
    snd_wscale: int
    rcv_wscale: int
    delivery_rate_app_limited: bool
    fastopen_client_fail: int
    """TFO client status: 0 unspecified, 1 no cookie sent, 2 SYN data not acked,
    3 SYN retransmitted (uapi linux/tcp.h, enum tcp_fastopen_client_fail)."""
    rto_us: int
    ato_us: int
    snd_mss: int
    rcv_mss: int
    unacked: int
    sacked: int
    lost: int
    retrans: int
    last_data_sent_ms: int
    last_data_recv_ms: int
    last_ack_recv_ms: int
    pmtu: int
    rcv_ssthresh: int
    rtt_us: int
    rttvar_us: int
    snd_ssthresh: int
    snd_cwnd: int
    advmss: int
    reordering: int
    rcv_rtt_us: int
    rcv_space: int
    total_retrans: int
    pacing_rate: int | None = None
    max_pacing_rate: int | None = None
    bytes_acked: int | None = None
    bytes_received: int | None = None
    segs_out: int | None = None
    segs_in: int | None = None
    notsent_bytes: int | None = None
    min_rtt_us: int | None = None
    data_segs_in: int | None = None
    data_segs_out: int | None = None
    delivery_rate: int | None = None
    busy_time_us: int | None = None
    rwnd_limited_us: int | None = None
    sndbuf_limited_us: int | None = None
    delivered: int | None = None
    delivered_ce: int | None = None
    bytes_sent: int | None = None
    bytes_retrans: int | None = None
    dsack_dups: int | None = None
    reord_seen: int | None = None
    rcv_ooopack: int | None = None
    snd_wnd: int | None = None
    rcv_wnd: int | None = None
    rehash: int | None = None
    total_rto: int | None = None
    total_rto_recoveries: int | None = None
    total_rto_time_ms: int | None = None

    @property
    def has_timestamps(self) -> bool:
        return bool(self.options & TCPI_OPT_TIMESTAMPS)

    @property
    def has_sack(self) -> bool:
        return bool(self.options & TCPI_OPT_SACK)

    @property
    def has_wscale(self) -> bool:
        return bool(self.options & TCPI_OPT_WSCALE)

    @property
    def has_ecn(self) -> bool:
        return bool(self.options & TCPI_OPT_ECN)

    @property
    def has_syn_data(self) -> bool:
        """SYN-ACK acknowledged data carried in the SYN (TCP Fast Open)."""
        return bool(self.options & TCPI_OPT_SYN_DATA)

    @property
    def state_name(self) -> str:
        return _state_name(self.state)


@dataclass(frozen=True)
class MptcpInfo:
    """``struct mptcp_info`` (uapi linux/mptcp.h), as ``MPTCP_INFO`` returns it.

    Fields after ``rcv_nxt`` are ``None`` when the kernel is older than them
    (5.12, 5.14, 6.5, 6.8, 6.10).
    """

    length: int
    """Bytes the kernel filled in."""
    subflows: int
    """Extra subflows, not counting the initial one (renamed
    ``mptcpi_extra_subflows`` in newer headers)."""
    add_addr_signal: int
    add_addr_accepted: int
    subflows_max: int
    add_addr_signal_max: int
    add_addr_accepted_max: int
    flags: int
    token: int
    write_seq: int
    snd_una: int
    rcv_nxt: int
    local_addr_used: int | None = None
    local_addr_max: int | None = None
    csum_enabled: int | None = None
    retransmits: int | None = None
    bytes_retrans: int | None = None
    bytes_sent: int | None = None
    bytes_received: int | None = None
    bytes_acked: int | None = None
    subflows_total: int | None = None
    """Live subflows including the initial one (6.8+); drops when one closes."""
    last_data_sent_ms: int | None = None
    last_data_recv_ms: int | None = None
    last_ack_recv_ms: int | None = None

    @property
    def fallback(self) -> bool:
        return bool(self.flags & MPTCP_INFO_FLAG_FALLBACK)

    @property
    def remote_key_received(self) -> bool:
        return bool(self.flags & MPTCP_INFO_FLAG_REMOTE_KEY_RECEIVED)

    @property
    def live_subflows(self) -> int:
        """``subflows_total`` where the kernel has it, else ``subflows + 1``."""
        if self.subflows_total is not None:
            return self.subflows_total
        return self.subflows + 1


Address = tuple[str, int]


@dataclass(frozen=True)
class SubflowInfo:
    """One subflow of an MPTCP connection."""

    id: int | None
    """Kernel subflow id (1 = initial subflow); ``None`` without MPTCP_FULL_INFO."""
    family: int
    """``AF_INET`` or ``AF_INET6`` (``AF_UNSPEC`` if the kernel left it empty)."""
    local: Address | None
    remote: Address | None
    tcp: TcpInfo | None

    @property
    def state(self) -> int | None:
        return self.tcp.state if self.tcp else None

    @property
    def bytes_sent(self) -> int | None:
        return self.tcp.bytes_sent if self.tcp else None

    @property
    def bytes_received(self) -> int | None:
        return self.tcp.bytes_received if self.tcp else None

    @property
    def bytes_acked(self) -> int | None:
        return self.tcp.bytes_acked if self.tcp else None

    @property
    def rtt_us(self) -> int | None:
        return self.tcp.rtt_us if self.tcp else None


@dataclass(frozen=True)
class SubflowDataHeader:
    """``struct mptcp_subflow_data`` as the kernel wrote it back."""

    size_subflow_data: int
    num_subflows: int
    """All subflows of the connection, even those that did not fit."""
    size_kernel: int
    size_user: int
    """Bytes per element actually copied: min(asked, size_kernel)."""


@dataclass(frozen=True)
class FullInfoHeader:
    """The fixed part of ``struct mptcp_full_info`` as the kernel wrote it back."""

    size_tcpinfo_kernel: int
    size_tcpinfo_user: int
    size_sfinfo_kernel: int
    size_sfinfo_user: int
    num_subflows: int
    size_arrays_user: int


# --- pure parsers and request builders ---------------------------------------

def _state_name(state: int) -> str:
    try:
        return TcpState(state).name
    except ValueError:
        return str(state)


def _bitfields(b6: int, b7: int, byteorder: str) -> tuple[int, int, bool, int]:
    # GCC fills bitfields from the least significant bit on little-endian and
    # from the most significant bit on big-endian targets.
    if byteorder == "little":
        return b6 & 0x0F, b6 >> 4, bool(b7 & 0x01), (b7 >> 1) & 0x03
    return b6 >> 4, b6 & 0x0F, bool(b7 & 0x80), (b7 >> 5) & 0x03


def parse_tcp_info(data: bytes, *, byteorder: str = sys.byteorder) -> TcpInfo:
    """Parse ``struct tcp_info`` of any length >= 104 (Linux 2.6 layout)."""
    if len(data) < TCP_INFO_MIN_LEN:
        raise SockInfoError(f"tcp_info is {len(data)} bytes, need at least {TCP_INFO_MIN_LEN}")
    f = _fields(_TCP_INFO_LAYOUT, data)
    snd_wscale, rcv_wscale, app_limited, tfo_fail = _bitfields(
        f.pop("_wscale"), f.pop("_flags7"), byteorder)  # type: ignore[arg-type]
    del f["fackets"], f["last_ack_sent_ms"]  # always 0 on modern kernels
    return TcpInfo(length=len(data), snd_wscale=snd_wscale, rcv_wscale=rcv_wscale,
                   delivery_rate_app_limited=app_limited, fastopen_client_fail=tfo_fail,
                   **f)  # type: ignore[arg-type]


def parse_mptcp_info(data: bytes) -> MptcpInfo:
    """Parse ``struct mptcp_info`` of any length >= 40 (Linux 5.9 layout)."""
    if len(data) < MPTCP_INFO_MIN_LEN:
        raise SockInfoError(f"mptcp_info is {len(data)} bytes, need at least {MPTCP_INFO_MIN_LEN}")
    fields = _fields(_MPTCP_INFO_LAYOUT, data)
    if len(data) < MPTCP_INFO_LEN:
        # 6.8/6.9 return 88 bytes: 84..88 is tail padding there, not last_data_sent.
        fields["last_data_sent_ms"] = fields["last_data_recv_ms"] = None
        fields["last_ack_recv_ms"] = None
    return MptcpInfo(length=len(data), **fields)  # type: ignore[arg-type]


def parse_sockaddr(data: bytes) -> tuple[int, Address | None]:
    """Parse a sockaddr_in / sockaddr_in6 (uapi linux/in.h, linux/in6.h).

    Returns ``(family, (host, port))`` with ``host`` spelled as
    ``getsockname()`` spells it (inet_ntop); the address is ``None`` for an
    empty (``AF_UNSPEC``) or unknown family.
    """
    if len(data) < 2:
        raise SockInfoError(f"sockaddr is {len(data)} bytes")
    (family,) = _U16.unpack_from(data, 0)
    if family == socket.AF_INET:
        if len(data) < 8:
            raise SockInfoError(f"sockaddr_in is {len(data)} bytes, need 8")
        host = socket.inet_ntop(socket.AF_INET, bytes(data[4:8]))
    elif family == socket.AF_INET6:
        if len(data) < 24:
            raise SockInfoError(f"sockaddr_in6 is {len(data)} bytes, need 24")
        host = socket.inet_ntop(socket.AF_INET6, bytes(data[8:24]))
    else:
        return family, None
    return family, (host, _U16_BE.unpack_from(data, 2)[0])


def parse_subflow_addrs(data: bytes) -> tuple[int, Address | None, Address | None]:
    """Parse ``struct mptcp_subflow_addrs``: two 128-byte sockaddr unions."""
    if len(data) < SUBFLOW_ADDRS_LEN:
        raise SockInfoError(f"mptcp_subflow_addrs is {len(data)} bytes, need {SUBFLOW_ADDRS_LEN}")
    family, local = parse_sockaddr(data[:_SOCKADDR_STORAGE_LEN])
    remote_family, remote = parse_sockaddr(data[_SOCKADDR_STORAGE_LEN:SUBFLOW_ADDRS_LEN])
    return family or remote_family, local, remote


def subflow_data_request(size_user: int, capacity: int) -> bytes:
    """Input for MPTCP_TCPINFO / MPTCP_SUBFLOW_ADDRS: header + room for ``capacity`` elements."""
    return _SUBFLOW_DATA.pack(_SUBFLOW_DATA.size, 0, 0, size_user) + bytes(size_user * capacity)


def parse_subflow_data(data: bytes) -> tuple[SubflowDataHeader, list[bytes]]:
    """Split a MPTCP_TCPINFO / MPTCP_SUBFLOW_ADDRS answer into header and elements.

    Only whole elements the kernel copied count: ``(optlen - size_subflow_data)
    // size_user``, at most ``num_subflows``.
    """
    if len(data) < _SUBFLOW_DATA.size:
        raise SockInfoError(f"mptcp_subflow_data is {len(data)} bytes, need {_SUBFLOW_DATA.size}")
    header = SubflowDataHeader(*_SUBFLOW_DATA.unpack_from(data, 0))
    start = header.size_subflow_data
    if start < _SUBFLOW_DATA.size or start > len(data):
        raise SockInfoError(f"size_subflow_data {start} outside 16..{len(data)}")
    size = header.size_user
    count = 0 if size == 0 else min(header.num_subflows, (len(data) - start) // size)
    return header, [bytes(data[start + i * size:start + (i + 1) * size]) for i in range(count)]


def full_info_request(capacity: int, sfinfo_addr: int = 0, tcpinfo_addr: int = 0,
                      size_sfinfo: int = SUBFLOW_INFO_LEN,
                      size_tcpinfo: int = _TCP_INFO_REQUEST) -> bytes:
    """Input for MPTCP_FULL_INFO; the arrays live at the two user addresses."""
    head = _FULL_INFO_HEAD.pack(0, size_tcpinfo, 0, size_sfinfo, 0, capacity,
                                sfinfo_addr, tcpinfo_addr)
    return head + bytes(MPTCP_INFO_LEN)


def parse_full_info(head: bytes, sfinfo: bytes, tcpinfo: bytes
                    ) -> tuple[FullInfoHeader, MptcpInfo | None, list[SubflowInfo]]:
    """Parse a MPTCP_FULL_INFO answer (6.6+).

    ``head`` is the optlen bytes the kernel returned (header + mptcp_info);
    ``sfinfo`` and ``tcpinfo`` are the user arrays it filled, with strides
    ``size_sfinfo_user`` and ``size_tcpinfo_user`` as written back.
    """
    if len(head) < _FULL_INFO_HEAD.size:
        raise SockInfoError(f"mptcp_full_info is {len(head)} bytes, need {_FULL_INFO_HEAD.size}")
    header = FullInfoHeader(*_FULL_INFO_HEAD.unpack_from(head, 0)[:6])
    info_bytes = head[_FULL_INFO_HEAD.size:FULL_INFO_LEN]
    info = parse_mptcp_info(info_bytes) if len(info_bytes) >= MPTCP_INFO_MIN_LEN else None
    count = min(header.num_subflows, header.size_arrays_user)
    sf_size, ti_size = header.size_sfinfo_user, header.size_tcpinfo_user
    if count and (sf_size == ti_size == 0
                  or sf_size * count > len(sfinfo) or ti_size * count > len(tcpinfo)):
        raise SockInfoError(f"mptcp_full_info claims {count} elements of {sf_size}+{ti_size} "
                            f"bytes, buffers hold {len(sfinfo)}+{len(tcpinfo)}")
    result = []
    for i in range(count):
        entry = sfinfo[i * sf_size:(i + 1) * sf_size]
        sf_id = _U32.unpack_from(entry, 0)[0] if len(entry) >= 4 else None
        family, local, remote = 0, None, None
        addrs = entry[SUBFLOW_INFO_ADDRS_OFFSET:]
        if len(addrs) >= SUBFLOW_ADDRS_LEN:
            family, local, remote = parse_subflow_addrs(addrs)
        ti = tcpinfo[i * ti_size:(i + 1) * ti_size]
        tcp = parse_tcp_info(ti) if len(ti) >= TCP_INFO_MIN_LEN else None
        result.append(SubflowInfo(id=sf_id, family=family, local=local, remote=remote, tcp=tcp))
    return header, info, result


# --- syscalls ---------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.getsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int,
                             ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
_libc.getsockopt.restype = ctypes.c_int


def _fd(sock: FdLike) -> int:
    fileno = getattr(sock, "fileno", None)
    fd = fileno() if fileno is not None else sock
    if not isinstance(fd, int) or fd < 0:
        raise OSError(errno.EBADF, f"not an open file descriptor: {sock!r}")
    return fd


def _sock_or_fd(sock: FdLike) -> int | socket.socket:
    return sock if isinstance(sock, socket.socket) else _fd(sock)


def _getsockopt(fd: int, level: int, optname: int, buf: ctypes.Array) -> int:
    """libc getsockopt() on a buffer that may carry input; returns optlen."""
    optlen = ctypes.c_uint32(ctypes.sizeof(buf))
    if _libc.getsockopt(fd, level, optname, buf, ctypes.byref(optlen)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{os.strerror(err)} (getsockopt level {level} option {optname})")
    return optlen.value


def _getsockopt_bytes(fd: int | socket.socket, level: int, optname: int, size: int) -> bytes:
    if isinstance(fd, socket.socket):
        # Output-only options: the socket module's getsockopt is several times
        # cheaper than a ctypes call, and these run once per relayed connection.
        return fd.getsockopt(level, optname, size)
    buf = ctypes.create_string_buffer(size)
    optlen = _getsockopt(fd, level, optname, buf)
    return buf.raw[:optlen]


def _get_int(fd: int | socket.socket, level: int, optname: int) -> int:
    data = _getsockopt_bytes(fd, level, optname, 4)
    return int.from_bytes(data, sys.byteorder) if data else 0


def is_mptcp(sock: FdLike) -> bool:
    """True while the socket speaks MPTCP (``TCP_IS_MPTCP``).

    False on plain TCP (0 on 6.18, ENOPROTOOPT on kernels before the option)
    and on an MPTCP socket that fell back to TCP.
    """
    try:
        return _get_int(_sock_or_fd(sock), SOL_TCP, TCP_IS_MPTCP) != 0
    except OSError as e:
        if e.errno in _NOT_MPTCP_ERRNOS:
            return False
        raise


def socket_protocol(sock: FdLike) -> int:
    """``SO_PROTOCOL``: 262 for an MPTCP socket (also after fallback), 6 for TCP.

    On an accepted socket 262 means the client asked for MPTCP; a plain TCP
    client accepted by an MPTCP listener yields a socket with 6.
    """
    return _get_int(_fd(sock), SOL_SOCKET, SO_PROTOCOL)


def tcp_state(sock: FdLike) -> int:
    """``tcpi_state`` (a :class:`TcpState` when known).

    On an MPTCP socket this is the first subflow's state, not the MPTCP
    connection's (mptcp_getsockopt_first_sf_only); after fallback it is the
    one TCP subflow's, so CLOSE_WAIT there reveals a server FIN nobody read.
    """
    data = _getsockopt_bytes(_fd(sock), SOL_TCP, TCP_INFO, 1)
    if not data:
        raise SockInfoError("TCP_INFO returned no bytes")
    try:
        return TcpState(data[0])
    except ValueError:
        return data[0]


def tcp_options(sock: FdLike) -> tuple[int, int]:
    """(``tcpi_options`` bits, ``tcpi_snd_wscale``) from the first 8 bytes of TCP_INFO.

    For per-connection paths that need one bit (TCPI_OPT_SYN_DATA, SACK, ...):
    a full :func:`tcp_info` parse costs tens of microseconds.
    """
    data = _getsockopt_bytes(_sock_or_fd(sock), SOL_TCP, TCP_INFO, 8)
    if len(data) < 7:
        raise SockInfoError("TCP_INFO shorter than 7 bytes")
    snd_wscale, _rcv, _app_limited, _fail = _bitfields(data[6], data[7] if len(data) > 7 else 0,
                                                      sys.byteorder)
    return data[5], snd_wscale


_TCPI_OPTIONS_OFFSET = 5   # tcpi_state, ca_state, retransmits, probes, backoff, options


def tcp_option_bits(sock: socket.socket) -> int:
    """``tcpi_options`` alone: the first 6 bytes of TCP_INFO, one getsockopt.

    For a per-connection check of one bit (TCPI_OPT_SYN_DATA at accept).
    """
    return tcp_state_and_option_bits(sock)[1]


def tcp_state_and_option_bits(sock: socket.socket) -> tuple[int, int]:
    """``(tcpi_state, tcpi_options)`` from the first 6 bytes of TCP_INFO, one getsockopt."""
    data = sock.getsockopt(SOL_TCP, TCP_INFO, _TCPI_OPTIONS_OFFSET + 1)
    if len(data) <= _TCPI_OPTIONS_OFFSET:
        raise SockInfoError(f"TCP_INFO shorter than {_TCPI_OPTIONS_OFFSET + 1} bytes")
    return data[0], data[_TCPI_OPTIONS_OFFSET]


def tcp_info(sock: FdLike) -> TcpInfo:
    """``TCP_INFO`` (of the first subflow on an MPTCP socket)."""
    return parse_tcp_info(_getsockopt_bytes(_fd(sock), SOL_TCP, TCP_INFO, _TCP_INFO_REQUEST))


def mptcp_info(sock: FdLike) -> MptcpInfo | None:
    """``MPTCP_INFO``, or None on plain TCP and fallen-back sockets (EOPNOTSUPP).

    An MPTCP listener or unconnected socket returns zeros (token 0).
    """
    try:
        data = _getsockopt_bytes(_sock_or_fd(sock), SOL_MPTCP, MPTCP_INFO, MPTCP_INFO_LEN)
    except OSError as e:
        if e.errno in _NOT_MPTCP_ERRNOS:
            return None
        raise
    return parse_mptcp_info(data)


_SUBFLOWS_TOTAL_OFFSET = {name: off for name, off, _ in _MPTCP_INFO_LAYOUT}["subflows_total"]


def live_subflow_count(sock: FdLike) -> int:
    """Live subflows of an MPTCP connection (1 for TCP and fallback), cheaply.

    The relay asks this at least twice per connection; it reads two bytes of
    ``MPTCP_INFO`` instead of building a :class:`MptcpInfo`.
    """
    try:
        data = _getsockopt_bytes(_sock_or_fd(sock), SOL_MPTCP, MPTCP_INFO, MPTCP_INFO_LEN)
    except OSError as e:
        if e.errno in _NOT_MPTCP_ERRNOS:
            return 1
        raise
    return _subflow_count(data)


_CSUM_OFFSET = {name: off for name, off, _ in _MPTCP_INFO_LAYOUT}["csum_enabled"]


def subflows_and_checksum(sock: FdLike) -> tuple[int, bool | None]:
    """(live subflows, DSS checksum negotiated) of an MPTCP connection from one
    ``MPTCP_INFO`` read; (1, None) for TCP and fallback. The checksum flag
    (``mptcpi_csum_enabled``, Linux 5.14+) is None where the kernel lacks it."""
    try:
        data = _getsockopt_bytes(_sock_or_fd(sock), SOL_MPTCP, MPTCP_INFO, MPTCP_INFO_LEN)
    except OSError as e:
        if e.errno in _NOT_MPTCP_ERRNOS:
            return 1, None
        raise
    return _subflow_count(data), (bool(data[_CSUM_OFFSET]) if len(data) > _CSUM_OFFSET
                                  else None)


def _subflow_count(data: bytes) -> int:
    if len(data) > _SUBFLOWS_TOTAL_OFFSET and data[_SUBFLOWS_TOTAL_OFFSET]:
        return data[_SUBFLOWS_TOTAL_OFFSET]
    return (data[0] + 1) if data else 1


# Subflow limits top out at 8 (MPTCP_PM_ADDR_MAX); grow only if the kernel says so.
_INITIAL_CAPACITY = 8
_ATTEMPTS = 3


def _full_info(fd: int) -> tuple[MptcpInfo | None, list[SubflowInfo]]:
    capacity = _INITIAL_CAPACITY
    for _ in range(_ATTEMPTS):
        sfbuf = ctypes.create_string_buffer(SUBFLOW_INFO_LEN * capacity)
        tibuf = ctypes.create_string_buffer(_TCP_INFO_REQUEST * capacity)
        head = ctypes.create_string_buffer(
            full_info_request(capacity, ctypes.addressof(sfbuf), ctypes.addressof(tibuf)),
            FULL_INFO_LEN)
        optlen = _getsockopt(fd, SOL_MPTCP, MPTCP_FULL_INFO, head)
        header, info, subs = parse_full_info(head.raw[:optlen], sfbuf.raw, tibuf.raw)
        if header.num_subflows <= capacity:
            break
        capacity = header.num_subflows + 4  # subflows came up meanwhile
    return info, subs


def _subflow_array(fd: int, optname: int, size_user: int) -> tuple[SubflowDataHeader, list[bytes]]:
    capacity = _INITIAL_CAPACITY
    for _ in range(_ATTEMPTS):
        req = subflow_data_request(size_user, capacity)
        buf = ctypes.create_string_buffer(req, len(req))
        optlen = _getsockopt(fd, SOL_MPTCP, optname, buf)
        header, elements = parse_subflow_data(buf.raw[:optlen])
        if header.num_subflows <= capacity:
            break
        capacity = header.num_subflows + 4
    return header, elements


def _legacy_subflows(fd: int) -> list[SubflowInfo]:
    # Two calls, so not one snapshot: pair by position, retry once on a count mismatch.
    for _ in range(2):
        _, addrs = _subflow_array(fd, MPTCP_SUBFLOW_ADDRS, SUBFLOW_ADDRS_LEN)
        _, infos = _subflow_array(fd, MPTCP_TCPINFO, _TCP_INFO_REQUEST)
        if len(addrs) == len(infos):
            break
    result = []
    for a, t in zip(addrs, infos):
        family, local, remote = parse_subflow_addrs(a)
        result.append(SubflowInfo(id=None, family=family, local=local, remote=remote,
                                  tcp=parse_tcp_info(t) if len(t) >= TCP_INFO_MIN_LEN else None))
    return result


def subflows(sock: FdLike, *, full_info: bool = True) -> list[SubflowInfo]:
    """The subflows of an MPTCP connection; [] for plain TCP and fallback.

    Uses MPTCP_FULL_INFO (6.6+, one consistent snapshot with subflow ids) and
    falls back to MPTCP_SUBFLOW_ADDRS + MPTCP_TCPINFO (5.16+) where it is
    missing, or always when ``full_info`` is False.
    """
    fd = _fd(sock)
    try:
        if full_info:
            try:
                return _full_info(fd)[1]
            except OSError as e:
                if e.errno not in _NOT_MPTCP_ERRNOS:
                    raise
        return _legacy_subflows(fd)
    except OSError as e:
        if e.errno in _NOT_MPTCP_ERRNOS:
            return []
        raise


def connection_summary(sock: FdLike) -> dict[str, object]:
    """A few numbers for a close log line. Never raises on a dead fd.

    Keys: ``mptcp`` (speaks MPTCP now), ``fallback`` (an MPTCP socket running
    plain TCP), ``subflows`` (live subflows, 0 unless MPTCP), ``token``,
    ``state``, ``bytes_sent``, ``bytes_received``, ``bytes_retrans``
    (MPTCP data-level counters when MPTCP, else TCP's), ``rtt_us`` (TCP_INFO:
    the first subflow's), and ``error`` when the kernel refused.
    """
    summary: dict[str, object] = {"mptcp": False, "fallback": False, "subflows": 0}
    try:
        fd = _fd(sock)
        info = mptcp_info(fd)
        summary["mptcp"] = info is not None and not info.fallback
        summary["fallback"] = (info.fallback if info is not None
                               else socket_protocol(fd) == IPPROTO_MPTCP)
        tcp = tcp_info(fd)
        summary["state"] = tcp.state_name
        summary["rtt_us"] = tcp.rtt_us
        if info is not None:
            summary["subflows"] = info.live_subflows
            summary["token"] = info.token
            summary["bytes_sent"] = info.bytes_sent
            summary["bytes_received"] = info.bytes_received
            summary["bytes_retrans"] = info.bytes_retrans
        else:
            summary["bytes_sent"] = tcp.bytes_sent
            summary["bytes_received"] = tcp.bytes_received
            summary["bytes_retrans"] = tcp.bytes_retrans
    except (OSError, SockInfoError) as e:
        code = getattr(e, "errno", None)
        summary["error"] = errno.errorcode.get(code, str(e)) if code else str(e)
    return summary
