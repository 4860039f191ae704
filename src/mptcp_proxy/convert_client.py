"""Open TCP connections through an RFC 8803 Transport Converter, over Multipath TCP.

    from mptcp_proxy.convert_client import open_connection
    with open_connection(("192.0.2.1", 5124), ("198.51.100.7", 443),
                         first_bytes=client_hello) as conn:
        conn.sendall(more)
        answer = conn.recv(4096)

    reader, writer = await open_connection_async(converter, target, first_bytes=b"...")

What a call does:

* Opens an MPTCP socket (plain TCP if the kernel has no MPTCP) with
  TCP_NODELAY, and sends the Convert request (header, Connect TLV, optional
  Cookie TLV) followed by ``first_bytes`` with ``sendto(MSG_FASTOPEN)``: with
  a TFO cookie for the converter they all ride in the SYN (0-RTT). The
  library never changes sysctls; client TFO needs bit 0x1 of
  ``net.ipv4.tcp_fastopen`` (the kernel default). Without it, or without a
  cookie yet (the first connection to a converter only asks for one), the
  bytes follow the handshake and everything still works.
* DSS checksums (RFC 8684 §3.3): :attr:`ConnectionInfo.checksummed` says
  whether the connection uses them (negotiated when either end asks). With
  ``dss_checksum=True`` the library goes straight to an MPTCP target only
  when this host's namespace asks for checksums itself
  (``net.mptcp.checksum_enabled=1``; the library never sets it), so the
  shortcut never drops what a converter run with ``--dss-checksum on`` asks
  for. Off by default: see the README's "Data integrity".
* Reads the converter's answer exactly (never a byte past it), so the
  returned socket is positioned at the server's first byte. An Error TLV
  raises the typed :class:`~mptcp_proxy.modes.convert_client.ConvertRefused`
  subclass carrying the code; a Missing Cookie error is retried once with
  the cookie it carried (and that cookie is kept for the converter).
* Reads TCP_INFO after the handshake: if the SYN carried data that the
  SYN+ACK did not acknowledge (``tcpi_fastopen_client_fail`` = "data not
  acked"), something on the path strips SYN payloads. The kernel sends the
  bytes again after the handshake, so the connection works, but the
  converter is recorded as "TFO stripped" (RFC 8803 client obligation:
  stop relying on it; see :meth:`ConverterRegistry.tfo_stripped` and
  ``avoid_stripped``).
* By default the Connect lists MP_CAPABLE (an "extended Connect"), so the
  converter answers with the server's SYN+ACK options. If they show the
  server speaks MPTCP itself (MP_CAPABLE in the Extended TCP Header TLV), the
  target is remembered in an :class:`MptcpTargetCache`; while it is, later
  calls connect to the target
  directly (RFC 8803 §5.1), with TFO too. A direct connection that falls back
  to TCP or fails makes the library forget the target again.

Measured on Linux 6.18 (tests/integration/test_convert_client.py):
TFO with MPTCP sockets works both ways; the first connection to a converter
carries no SYN data (cookie request; ``tcpi_fastopen_client_fail`` = 1) and
the next ones do (``TCPI_OPT_SYN_DATA`` set in ``tcpi_options`` on the
client's MPTCP socket after connect, TcpExt TCPFastOpenActive and the
converter's TCPFastOpenPassive rise). A non-blocking ``sendto(MSG_FASTOPEN)``
without a cookie fails with EINPROGRESS and queues nothing; with a cookie it
returns the bytes put in the SYN. With client TFO off it fails with
EOPNOTSUPP. A missing TCPI_OPT_SYN_DATA alone does not mean "stripped": the
cookie-fetching first connection lacks it too, so the outcome is read from
``tcpi_fastopen_client_fail`` (1 no cookie, 2 data not acked, 3 SYN
retransmitted). The SYN+ACK that hands out the cookie carries no timestamps
(``tcpi_options`` 0x6: MPTCP + TFO cookie leave no room for them).
"""

from __future__ import annotations

import asyncio
import enum
import errno
import ipaddress
import os
import selectors
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mptcp_proxy.errors import ProxyError
from mptcp_proxy.modes.convert_client import (
    MP_CAPABLE_SYN_OPTION,
    ConvertAccepted,
    ConvertClientHandshake,
    ConvertRefused,
    MptcpTargetCache,
    RefusedMissingCookie,
    target_key,
)
from mptcp_proxy.kernel.checksum import checksum_enabled
from mptcp_proxy.observe.sockinfo import SockInfoError, is_mptcp, subflows_and_checksum, tcp_info
from mptcp_proxy.wire.convert import TcpOption

IPPROTO_MPTCP = 262
TCP_FASTOPEN_NO_COOKIE = 34
MSG_FASTOPEN = getattr(socket, "MSG_FASTOPEN", 0x20000000)
DEFAULT_TIMEOUT_S = 10.0

# tcpi_fastopen_client_fail (uapi linux/tcp.h, enum tcp_fastopen_client_fail)
TFO_COOKIE_UNAVAILABLE = 1
TFO_DATA_NOT_ACKED = 2
TFO_SYN_RETRANSMITTED = 3

# socket(..., IPPROTO_MPTCP) fails with these where the kernel has no MPTCP.
_NO_MPTCP_ERRNOS = frozenset({errno.EPROTONOSUPPORT, errno.ENOPROTOOPT, errno.EINVAL})
_TFO_OFF_ERRNOS = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP})
_IN_PROGRESS_ERRNOS = frozenset({errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY})

Address = tuple[str, int]


class TfoOutcome(enum.Enum):
    """What happened to the bytes meant for the SYN (read from TCP_INFO after connect)."""

    ACKED = "acked"
    """The SYN carried them and the SYN+ACK acknowledged them: 0-RTT."""
    NO_COOKIE = "no-cookie"
    """No TFO cookie for this peer yet: the SYN asked for one, the bytes followed
    the handshake. The next connection will carry them in the SYN."""
    NOT_ACKED = "not-acked"
    """The SYN carried them, the SYN+ACK did not acknowledge them: the path (or
    the peer) strips SYN payloads. The kernel sent them again after the handshake."""
    SYN_RETRANSMITTED = "syn-retransmitted"
    """The SYN was lost and sent again without data: nothing learned."""
    DISABLED = "disabled"
    """Client TFO is off (``net.ipv4.tcp_fastopen`` lacks bit 0x1): a plain connect."""
    NO_DATA = "no-data"
    """Nothing to send before the answer (direct connection without first bytes)."""
    UNKNOWN = "unknown"


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------

class ConvertClientError(ProxyError):
    """The library could not get a converted connection (refusals are ConvertRefused)."""


class ConverterConnectError(ConvertClientError):
    """The converter (or, going direct, the target) could not be reached or reset us.

    ``errno`` is the OS error number, ``address`` the peer tried last.
    """

    def __init__(self, message: str, errno_: int | None = None,
                 address: Address | None = None) -> None:
        super().__init__(message)
        self.errno = errno_
        self.address = address


class ConvertTimeout(ConvertClientError, TimeoutError):
    """No converted connection within ``timeout`` seconds; ``phase`` says where it stalled."""

    def __init__(self, message: str, phase: str) -> None:
        super().__init__(message)
        self.phase = phase


class ConverterAvoided(ConvertClientError):
    """``avoid_stripped`` was set and every address of the converter strips TFO data."""


# --------------------------------------------------------------------------
# What the library remembers between calls
# --------------------------------------------------------------------------

class ConverterRegistry:
    """Per converter address: "TFO stripped" marks and the Convert cookie to send.

    Thread-safe. Keys are ``(ip, port)`` of the converter as connected
    (:attr:`ConnectionInfo.converter`); names are not resolved here.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stripped: set[tuple] = set()
        self._cookies: dict[tuple, bytes] = {}

    def mark_tfo_stripped(self, converter: Address) -> None:
        with self._lock:
            self._stripped.add(target_key(converter))

    def clear_tfo_stripped(self, converter: Address) -> None:
        with self._lock:
            self._stripped.discard(target_key(converter))

    def tfo_stripped(self, converter: Address) -> bool:
        """True once a SYN to ``converter`` carried data its SYN+ACK did not acknowledge."""
        with self._lock:
            return target_key(converter) in self._stripped

    def stripped(self) -> list[Address]:
        with self._lock:
            return sorted((str(a), p) for a, p in self._stripped)

    def cookie(self, converter: Address) -> bytes | None:
        with self._lock:
            return self._cookies.get(target_key(converter))

    def set_cookie(self, converter: Address, cookie: bytes | None) -> None:
        with self._lock:
            if cookie is None:
                self._cookies.pop(target_key(converter), None)
            else:
                self._cookies[target_key(converter)] = cookie


class _LockedCache:
    """Serialises calls to an :class:`MptcpTargetCache` shared between threads."""

    _lock = threading.Lock()

    @classmethod
    def is_mptcp(cls, cache: MptcpTargetCache, target: Address) -> bool:
        with cls._lock:
            return cache.is_mptcp(target, time.monotonic())

    @classmethod
    def remember(cls, cache: MptcpTargetCache, target: Address) -> None:
        with cls._lock:
            cache.remember(target, time.monotonic())

    @classmethod
    def forget(cls, cache: MptcpTargetCache, target: Address) -> None:
        with cls._lock:
            cache.forget(target)


DEFAULT_CACHE = MptcpTargetCache()
"""Targets known to speak MPTCP, shared by every call that does not pass its own."""
DEFAULT_CONVERTERS = ConverterRegistry()
"""TFO-stripped marks and cookies, shared by every call that does not pass its own."""


def is_tfo_stripped(converter: Address, registry: ConverterRegistry = DEFAULT_CONVERTERS) -> bool:
    """Whether ``converter`` (an ``(ip, port)``) was seen stripping SYN data."""
    return registry.tfo_stripped(converter)


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class ConnectionInfo:
    """How a connection was made."""

    target: Address
    """The target as an ``(ip, port)`` (names resolved)."""
    converter: Address | None
    """The converter address connected to; None when the call went direct."""
    direct: bool
    """True: connected straight to the target because the cache said it speaks MPTCP."""
    reply: ConvertAccepted | None
    """The converter's answer (None when direct)."""
    tfo: TfoOutcome
    mptcp: bool
    """The socket speaks MPTCP (False: plain TCP or an MPTCP fallback)."""
    cookie: bytes | None = None
    """The Convert cookie the successful request carried."""
    checksummed: bool | None = None
    """MPTCP DSS checksums are in use (RFC 8684 §3.3); None when not MPTCP."""

    @property
    def server_mptcp(self) -> bool | None:
        """Whether the target speaks MPTCP: the converter's word, or the direct socket's."""
        if self.direct:
            return self.mptcp
        return None if self.reply is None else self.reply.server_mptcp

    @property
    def tfo_stripped(self) -> bool:
        return self.tfo is TfoOutcome.NOT_ACKED


class ConvertedConnection:
    """A connected socket positioned after the converter's answer, plus how it got there.

    Socket methods are forwarded to :attr:`sock` (blocking mode). Close it, or
    use it as a context manager.
    """

    def __init__(self, sock: socket.socket, info: ConnectionInfo) -> None:
        self.sock = sock
        self.info = info

    @property
    def server_mptcp(self) -> bool | None:
        return self.info.server_mptcp

    @property
    def direct(self) -> bool:
        return self.info.direct

    @property
    def reply(self) -> ConvertAccepted | None:
        return self.info.reply

    @property
    def tfo(self) -> TfoOutcome:
        return self.info.tfo

    @property
    def tfo_stripped(self) -> bool:
        return self.info.tfo_stripped

    @property
    def mptcp(self) -> bool:
        return self.info.mptcp

    @property
    def checksummed(self) -> bool | None:
        return self.info.checksummed

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, data: bytes, flags: int = 0) -> int:
        return self.sock.send(data, flags)

    def sendall(self, data: bytes, flags: int = 0) -> None:
        self.sock.sendall(data, flags)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        return self.sock.recv(bufsize, flags)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        return self.sock.recv_into(buffer, nbytes, flags)

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)

    def settimeout(self, value: float | None) -> None:
        self.sock.settimeout(value)

    def close(self) -> None:
        self.sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)

    def __enter__(self) -> ConvertedConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        how = "direct" if self.direct else f"via {self.info.converter}"
        return f"<ConvertedConnection to {self.info.target} {how} tfo={self.tfo.value}>"


class ConvertedStreams(tuple):
    """``(reader, writer)`` that also carries :attr:`info` (unpacks as a pair)."""

    info: ConnectionInfo

    def __new__(cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                info: ConnectionInfo) -> ConvertedStreams:
        self = super().__new__(cls, (reader, writer))
        self.info = info
        return self

    @property
    def reader(self) -> asyncio.StreamReader:
        return self[0]

    @property
    def writer(self) -> asyncio.StreamWriter:
        return self[1]


# --------------------------------------------------------------------------
# Socket steps shared by the blocking and the asyncio paths
# --------------------------------------------------------------------------

def _new_socket(family: int, tfo_no_cookie: bool) -> socket.socket:
    try:
        sock = socket.socket(family, socket.SOCK_STREAM, IPPROTO_MPTCP)
    except OSError as exc:
        if exc.errno not in _NO_MPTCP_ERRNOS:
            raise
        sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        # asyncio sets TCP_NODELAY only for IPPROTO_TCP sockets (docs/KERNEL-FACTS.md).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tfo_no_cookie:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, 1)
            except OSError:
                pass  # kernel without it on this socket: TFO then needs a cookie, as usual
    except BaseException:
        sock.close()
        raise
    return sock


def _start_connect(sock: socket.socket, sockaddr: tuple, data: bytes) -> tuple[int, bool]:
    """Begin a non-blocking connect carrying ``data`` in the SYN if TFO allows.

    Returns ``(bytes queued in the SYN, TFO attempted)``. Raises OSError for
    immediate failures (unreachable network, ...).
    """
    if data:
        try:
            return sock.sendto(data, MSG_FASTOPEN, sockaddr), True
        except OSError as exc:
            if exc.errno in _IN_PROGRESS_ERRNOS:
                return 0, True  # no cookie yet: the SYN asks for one, nothing queued
            if exc.errno not in _TFO_OFF_ERRNOS:
                raise
        attempted = False
    else:
        attempted = True
    err = sock.connect_ex(sockaddr)
    if err not in (0, *_IN_PROGRESS_ERRNOS):
        raise OSError(err, os.strerror(err))
    return 0, attempted


def _send_failed(exc: OSError, what: str, sockaddr: tuple) -> None:
    """A send after connect failed. A converter may have answered (an Error TLV)
    and closed: the caller goes on to read its answer. A target cannot."""
    if what != "converter":
        raise ConverterConnectError(f"{what} {_fmt(sockaddr)} failed: {exc.strerror or exc}",
                                    exc.errno, sockaddr) from None


def _connect_error(sock: socket.socket) -> None:
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


def _tfo_outcome(sock: socket.socket, had_data: bool, attempted: bool) -> TfoOutcome:
    if not had_data:
        return TfoOutcome.NO_DATA
    if not attempted:
        return TfoOutcome.DISABLED
    try:
        info = tcp_info(sock)
    except (OSError, SockInfoError):
        return TfoOutcome.UNKNOWN
    if info.has_syn_data:
        return TfoOutcome.ACKED
    return {TFO_COOKIE_UNAVAILABLE: TfoOutcome.NO_COOKIE,
            TFO_DATA_NOT_ACKED: TfoOutcome.NOT_ACKED,
            TFO_SYN_RETRANSMITTED: TfoOutcome.SYN_RETRANSMITTED}.get(
                info.fastopen_client_fail, TfoOutcome.UNKNOWN)


def _mptcp_state(sock: socket.socket) -> tuple[bool, bool | None]:
    """(speaks MPTCP, DSS checksums in use): ``(False, None)`` for TCP and fallback."""
    try:
        if not is_mptcp(sock):
            return False, None
    except OSError:
        return False, None
    try:
        return True, subflows_and_checksum(sock)[1]
    except OSError:
        return True, None


def _direct_allowed(dss_checksum: bool) -> bool:
    """Going straight to an MPTCP target keeps the checksums the converter
    would have asked for only if this namespace asks for them itself."""
    return not dss_checksum or checksum_enabled() is not False


def _fmt(address: tuple) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _family(ip: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(ip.split("%", 1)[0]).version == 6 \
        else socket.AF_INET


def _literal_target(target: tuple) -> Address | None:
    try:
        address, port = target_key(target)
    except ValueError:
        return None
    return str(address), port


def _check_endpoint(what: str, endpoint: object) -> tuple[str, int]:
    if (not isinstance(endpoint, tuple) or len(endpoint) != 2
            or not isinstance(endpoint[0], (str, ipaddress.IPv4Address, ipaddress.IPv6Address))
            or isinstance(endpoint[1], bool) or not isinstance(endpoint[1], int)
            or not 0 < endpoint[1] <= 0xFFFF):
        raise TypeError(f"{what} must be a (host, port) tuple, not {endpoint!r}")
    return str(endpoint[0]), endpoint[1]


def _stream_addresses(infos: Iterable[tuple]) -> list[tuple[int, tuple]]:
    seen: list[tuple[int, tuple]] = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6) and (family, sockaddr) not in seen:
            seen.append((family, sockaddr))
    return seen


def _resolve_sync(what: str, endpoint: tuple[str, int]) -> list[tuple[int, tuple]]:
    try:
        return _stream_addresses(socket.getaddrinfo(endpoint[0], endpoint[1],
                                                    type=socket.SOCK_STREAM))
    except socket.gaierror as exc:
        raise ConverterConnectError(f"cannot resolve {what} {endpoint[0]}: {exc.strerror}",
                                    None, endpoint) from None


def _resolve_target_sync(target: tuple[str, int]) -> Address:
    literal = _literal_target(target)
    if literal is not None:
        return literal
    family, sockaddr = _resolve_sync("target", target)[0]
    return sockaddr[0], sockaddr[1]


def _options(extended_options: Iterable[TcpOption] | None, cache: MptcpTargetCache | None,
             direct_if_mptcp: bool) -> tuple[TcpOption, ...]:
    if extended_options is not None:
        return tuple(extended_options)
    return (MP_CAPABLE_SYN_OPTION,) if cache is not None and direct_if_mptcp else ()


def _timeout(phase: str, address: tuple, timeout: float) -> ConvertTimeout:
    return ConvertTimeout(f"{phase} {_fmt(address)}: no progress within {timeout:g} s", phase)


# --------------------------------------------------------------------------
# Blocking API
# --------------------------------------------------------------------------

class _Deadline:
    def __init__(self, timeout: float) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        self.timeout = float(timeout)
        self.at = time.monotonic() + self.timeout

    def left(self) -> float:
        return self.at - time.monotonic()


def _wait(sock: socket.socket, events: int, deadline: _Deadline, phase: str,
          address: tuple) -> None:
    with selectors.DefaultSelector() as selector:
        selector.register(sock, events)
        while True:
            left = deadline.left()
            if left <= 0:
                raise _timeout(phase, address, deadline.timeout)
            if selector.select(left):
                return


def _connect_sync(sockaddr: tuple, family: int, data: bytes, deadline: _Deadline,
                  tfo_no_cookie: bool, what: str) -> tuple[socket.socket, TfoOutcome]:
    """A connected socket to ``sockaddr`` that has sent ``data`` (in the SYN if it could)."""
    sock = _new_socket(family, tfo_no_cookie)
    try:
        try:
            sent, attempted = _start_connect(sock, sockaddr, data)
            _wait(sock, selectors.EVENT_WRITE, deadline, f"connecting to {what}", sockaddr)
            _connect_error(sock)
        except OSError as exc:
            if isinstance(exc, ConvertTimeout):
                raise
            raise ConverterConnectError(f"cannot connect to {what} {_fmt(sockaddr)}: "
                                        f"{exc.strerror or exc}", exc.errno, sockaddr) from None
        outcome = _tfo_outcome(sock, bool(data), attempted)
        view = memoryview(data)[sent:]
        while view:
            _wait(sock, selectors.EVENT_WRITE, deadline, f"sending to {what}", sockaddr)
            try:
                view = view[sock.send(view):]
            except BlockingIOError:
                continue
            except OSError as exc:
                _send_failed(exc, what, sockaddr)
                break
        return sock, outcome
    except BaseException:
        sock.close()
        raise


def _read_reply_sync(sock: socket.socket, handshake: ConvertClientHandshake,
                     deadline: _Deadline, address: tuple) -> ConvertAccepted:
    while True:
        _wait(sock, selectors.EVENT_READ, deadline, "waiting for the answer of converter",
              address)
        try:
            chunk = sock.recv(handshake.wanted)
        except BlockingIOError:
            continue
        except OSError as exc:
            raise ConverterConnectError(f"converter {_fmt(address)} failed before answering: "
                                        f"{exc.strerror or exc}", exc.errno, address) from None
        if not chunk:
            handshake.feed_eof()  # raises: the answer was incomplete
            raise ConverterConnectError(f"converter {_fmt(address)} closed without answering",
                                        None, address)
        result = handshake.feed(chunk)
        if result is not None:
            return result


def _direct_sync(target: Address, first_bytes: bytes, deadline: _Deadline,
                 cache: MptcpTargetCache, tfo_no_cookie: bool) -> ConvertedConnection | None:
    """Connect straight to an MPTCP-capable target; None (and forget it) if that fails."""
    try:
        sock, outcome = _connect_sync(target, _family(target[0]), first_bytes, deadline,
                                      tfo_no_cookie, "target")
    except ConverterConnectError:
        _LockedCache.forget(cache, target)
        return None
    mptcp, checksummed = _mptcp_state(sock)
    if not mptcp:
        _LockedCache.forget(cache, target)  # it fell back: not MPTCP any more
    sock.setblocking(True)
    return ConvertedConnection(sock, ConnectionInfo(
        target=target, converter=None, direct=True, reply=None, tfo=outcome, mptcp=mptcp,
        checksummed=checksummed))


def open_connection(converter: tuple[str, int], target: tuple[str, int], *,
                    first_bytes: bytes = b"", timeout: float = DEFAULT_TIMEOUT_S,
                    cookie: bytes | None = None,
                    cache: MptcpTargetCache | None = DEFAULT_CACHE,
                    direct_if_mptcp: bool = True,
                    extended_options: Iterable[TcpOption] | None = None,
                    converters: ConverterRegistry = DEFAULT_CONVERTERS,
                    tfo_no_cookie: bool = False,
                    avoid_stripped: bool = False,
                    dss_checksum: bool = False) -> ConvertedConnection:
    """A connection to ``target`` through ``converter`` (or straight to an MPTCP target).

    ``converter`` and ``target`` are ``(host, port)``; names are resolved with
    getaddrinfo (the Convert protocol itself carries only addresses).
    ``first_bytes`` go in the SYN after the Convert request (keep them under
    about 1 KB: only what fits a SYN is 0-RTT). ``timeout`` bounds the whole
    call. ``cookie`` is sent in a Cookie TLV (default: the one the converter
    last handed out, see ``converters``). ``cache`` and ``direct_if_mptcp``
    control "go direct next time" (None: no cache). ``extended_options``
    make the Connect extended; the default (None) sends
    :data:`MP_CAPABLE_SYN_OPTION` when there is a cache to fill, which asks the
    converter to show whether the server answered MP_CAPABLE (a converter
    returns the Extended TCP Header only for an extended Connect, RFC 8803
    §4.2.6), and nothing otherwise; ``()`` sends a base Connect.
    ``tfo_no_cookie`` sets TCP_FASTOPEN_NO_COOKIE on the socket, for
    converters that accept SYN data without a TFO cookie.
    ``avoid_stripped`` refuses converter addresses marked "TFO stripped".
    ``dss_checksum`` goes direct only when this namespace asks for DSS
    checksums itself (see the module's notes; default False: always).

    Raises :class:`ConvertRefused` (typed per Error code), a
    :class:`~mptcp_proxy.wire.convert.ConvertProtocolError` for an answer
    that breaks RFC 8803, :class:`ConverterConnectError`,
    :class:`ConvertTimeout` or :class:`ConverterAvoided`.
    """
    converter = _check_endpoint("converter", converter)
    target = _check_endpoint("target", target)
    first_bytes = bytes(first_bytes)
    extended_options = _options(extended_options, cache, direct_if_mptcp)
    deadline = _Deadline(timeout)
    target_addr = _resolve_target_sync(target)
    if direct_if_mptcp and cache is not None and _LockedCache.is_mptcp(cache, target_addr) \
            and _direct_allowed(dss_checksum):
        direct = _direct_sync(target_addr, first_bytes, deadline, cache, tfo_no_cookie)
        if direct is not None:
            return direct

    addresses = _resolve_sync("converter", converter)
    if avoid_stripped:
        addresses = [a for a in addresses if not converters.tfo_stripped(a[1][:2])]
        if not addresses:
            raise ConverterAvoided(f"converter {converter[0]} strips TFO data on every address")
    last_error: ConvertClientError | None = None
    for family, sockaddr in addresses:
        try:
            return _via_converter_sync(sockaddr, family, target_addr, first_bytes, deadline,
                                       cookie, cache, extended_options, converters,
                                       tfo_no_cookie)
        except ConverterConnectError as exc:
            last_error = exc  # try the converter's next address
    raise last_error or ConverterConnectError(
        f"converter {converter[0]} has no IPv4 or IPv6 address", None, converter)


def _via_converter_sync(sockaddr: tuple, family: int, target: Address, first_bytes: bytes,
                        deadline: _Deadline, cookie: bytes | None,
                        cache: MptcpTargetCache | None, extended_options: Iterable[TcpOption],
                        converters: ConverterRegistry, tfo_no_cookie: bool
                        ) -> ConvertedConnection:
    conv = (sockaddr[0], sockaddr[1])
    options = tuple(extended_options)
    sent_cookie = cookie if cookie is not None else converters.cookie(conv)
    retried = False
    while True:
        handshake = ConvertClientHandshake(target, sent_cookie, options)
        sock, outcome = _connect_sync(sockaddr, family, handshake.request_bytes() + first_bytes,
                                      deadline, tfo_no_cookie, "converter")
        try:
            if outcome is TfoOutcome.NOT_ACKED:
                converters.mark_tfo_stripped(conv)
            reply = _read_reply_sync(sock, handshake, deadline, sockaddr)
        except RefusedMissingCookie as refusal:
            sock.close()
            if retried or refusal.cookie in (None, sent_cookie):
                raise
            converters.set_cookie(conv, refusal.cookie)
            sent_cookie, retried = refusal.cookie, True
            continue
        except BaseException:
            sock.close()
            raise
        break
    info = _accepted(conv, target, reply, outcome, _mptcp_state(sock), sent_cookie, cache)
    sock.setblocking(True)
    return ConvertedConnection(sock, info)


def _accepted(conv: Address, target: Address, reply: ConvertAccepted, outcome: TfoOutcome,
              mptcp: tuple[bool, bool | None], cookie: bytes | None,
              cache: MptcpTargetCache | None) -> ConnectionInfo:
    if cache is not None and reply.server_mptcp:
        _LockedCache.remember(cache, target)
    return ConnectionInfo(target=target, converter=conv, direct=False, reply=reply,
                          tfo=outcome, mptcp=mptcp[0], cookie=cookie, checksummed=mptcp[1])


def query_converter(converter: tuple[str, int], *, timeout: float = DEFAULT_TIMEOUT_S
                    ) -> tuple[int, ...] | None:
    """The TCP option kinds ``converter`` supports (an Info TLV, RFC 8803 §4.2.3)."""
    converter = _check_endpoint("converter", converter)
    deadline = _Deadline(timeout)
    family, sockaddr = _resolve_sync("converter", converter)[0]
    handshake = ConvertClientHandshake(None)
    sock, _ = _connect_sync(sockaddr, family, handshake.request_bytes(), deadline, False,
                            "converter")
    with sock:
        return _read_reply_sync(sock, handshake, deadline, sockaddr).supported


# --------------------------------------------------------------------------
# asyncio API
# --------------------------------------------------------------------------

async def _wait_writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_writer(sock.fileno())


async def _connect_async(loop: asyncio.AbstractEventLoop, sockaddr: tuple, family: int,
                         data: bytes, tfo_no_cookie: bool, what: str
                         ) -> tuple[socket.socket, TfoOutcome]:
    sock = _new_socket(family, tfo_no_cookie)
    try:
        try:
            sent, attempted = _start_connect(sock, sockaddr, data)
            await _wait_writable(loop, sock)
            _connect_error(sock)
        except OSError as exc:
            raise ConverterConnectError(f"cannot connect to {what} {_fmt(sockaddr)}: "
                                        f"{exc.strerror or exc}", exc.errno, sockaddr) from None
        outcome = _tfo_outcome(sock, bool(data), attempted)
        if sent < len(data):
            try:
                await loop.sock_sendall(sock, memoryview(data)[sent:])
            except OSError as exc:
                _send_failed(exc, what, sockaddr)
        return sock, outcome
    except BaseException:
        sock.close()
        raise


async def _read_reply_async(reader: asyncio.StreamReader, handshake: ConvertClientHandshake,
                            address: tuple) -> ConvertAccepted:
    while True:
        try:
            chunk = await reader.readexactly(handshake.wanted)
        except asyncio.IncompleteReadError as short:
            if short.partial:
                handshake.feed(short.partial)
            handshake.feed_eof()
            raise ConverterConnectError(f"converter {_fmt(address)} closed without answering",
                                        None, address) from None
        except OSError as exc:
            raise ConverterConnectError(f"converter {_fmt(address)} failed before answering: "
                                        f"{exc.strerror or exc}", exc.errno, address) from None
        result = handshake.feed(chunk)
        if result is not None:
            return result


async def _resolve_async(loop: asyncio.AbstractEventLoop, what: str,
                         endpoint: tuple[str, int]) -> list[tuple[int, tuple]]:
    try:
        return _stream_addresses(await loop.getaddrinfo(endpoint[0], endpoint[1],
                                                        type=socket.SOCK_STREAM))
    except socket.gaierror as exc:
        raise ConverterConnectError(f"cannot resolve {what} {endpoint[0]}: {exc.strerror}",
                                    None, endpoint) from None


async def _wrap(sock: socket.socket, limit: int | None) -> tuple[asyncio.StreamReader,
                                                                   asyncio.StreamWriter]:
    kwargs = {} if limit is None else {"limit": limit}
    return await asyncio.open_connection(sock=sock, **kwargs)


async def _open_async(converter: tuple[str, int], target: tuple[str, int], first_bytes: bytes,
                      cookie: bytes | None, cache: MptcpTargetCache | None,
                      direct_if_mptcp: bool, extended_options: tuple[TcpOption, ...],
                      converters: ConverterRegistry, tfo_no_cookie: bool,
                      avoid_stripped: bool, limit: int | None,
                      dss_checksum: bool) -> ConvertedStreams:
    loop = asyncio.get_running_loop()
    target_addr = _literal_target(target)
    if target_addr is None:
        family, sockaddr = (await _resolve_async(loop, "target", target))[0]
        target_addr = (sockaddr[0], sockaddr[1])

    if direct_if_mptcp and cache is not None and _LockedCache.is_mptcp(cache, target_addr) \
            and _direct_allowed(dss_checksum):
        try:
            sock, outcome = await _connect_async(loop, target_addr, _family(target_addr[0]),
                                                 first_bytes, tfo_no_cookie, "target")
        except ConverterConnectError:
            _LockedCache.forget(cache, target_addr)
        else:
            mptcp, checksummed = _mptcp_state(sock)
            if not mptcp:
                _LockedCache.forget(cache, target_addr)
            try:
                reader, writer = await _wrap(sock, limit)
            except BaseException:
                sock.close()
                raise
            return ConvertedStreams(reader, writer, ConnectionInfo(
                target=target_addr, converter=None, direct=True, reply=None, tfo=outcome,
                mptcp=mptcp, checksummed=checksummed))
    return await _via_converter_async(loop, converter, target_addr, first_bytes, cookie, cache,
                                      extended_options, converters, tfo_no_cookie,
                                      avoid_stripped, limit)


async def _via_converter_async(loop: asyncio.AbstractEventLoop, converter: tuple[str, int],
                               target_addr: Address, first_bytes: bytes, cookie: bytes | None,
                               cache: MptcpTargetCache | None,
                               extended_options: tuple[TcpOption, ...],
                               converters: ConverterRegistry, tfo_no_cookie: bool,
                               avoid_stripped: bool, limit: int | None) -> ConvertedStreams:
    addresses = await _resolve_async(loop, "converter", converter)
    if avoid_stripped:
        addresses = [a for a in addresses if not converters.tfo_stripped(a[1][:2])]
        if not addresses:
            raise ConverterAvoided(f"converter {converter[0]} strips TFO data on every address")
    last_error: ConvertClientError | None = None
    for family, sockaddr in addresses:
        conv = (sockaddr[0], sockaddr[1])
        sent_cookie = cookie if cookie is not None else converters.cookie(conv)
        retried = False
        while True:
            handshake = ConvertClientHandshake(target_addr, sent_cookie, extended_options)
            try:
                sock, outcome = await _connect_async(
                    loop, sockaddr, family, handshake.request_bytes() + first_bytes,
                    tfo_no_cookie, "converter")
            except ConverterConnectError as exc:
                last_error = exc
                break
            if outcome is TfoOutcome.NOT_ACKED:
                converters.mark_tfo_stripped(conv)
            mptcp = _mptcp_state(sock)
            try:
                reader, writer = await _wrap(sock, limit)
            except BaseException:
                sock.close()
                raise
            try:
                reply = await _read_reply_async(reader, handshake, sockaddr)
            except RefusedMissingCookie as refusal:
                writer.close()
                if retried or refusal.cookie in (None, sent_cookie):
                    raise
                converters.set_cookie(conv, refusal.cookie)
                sent_cookie, retried = refusal.cookie, True
                continue
            except ConverterConnectError as exc:
                writer.close()
                last_error = exc
                break
            except BaseException:
                writer.close()
                raise
            return ConvertedStreams(reader, writer, _accepted(
                conv, target_addr, reply, outcome, mptcp, sent_cookie, cache))
    raise last_error or ConverterConnectError(
        f"converter {converter[0]} has no IPv4 or IPv6 address", None, converter)


async def open_connection_async(converter: tuple[str, int], target: tuple[str, int], *,
                                first_bytes: bytes = b"", timeout: float = DEFAULT_TIMEOUT_S,
                                cookie: bytes | None = None,
                                cache: MptcpTargetCache | None = DEFAULT_CACHE,
                                direct_if_mptcp: bool = True,
                                extended_options: Iterable[TcpOption] | None = None,
                                converters: ConverterRegistry = DEFAULT_CONVERTERS,
                                tfo_no_cookie: bool = False, avoid_stripped: bool = False,
                                limit: int | None = None,
                                dss_checksum: bool = False) -> ConvertedStreams:
    """The asyncio form of :func:`open_connection`: ``reader, writer = await ...``.

    The result unpacks as ``(StreamReader, StreamWriter)`` and carries
    :attr:`ConvertedStreams.info`. The converter's answer has been consumed;
    the reader starts at the server's first byte. ``limit`` is the
    StreamReader buffer limit. Same arguments and errors as the blocking call.
    """
    converter = _check_endpoint("converter", converter)
    target = _check_endpoint("target", target)
    options = _options(extended_options, cache, direct_if_mptcp)
    deadline = _Deadline(timeout)
    try:
        async with asyncio.timeout(deadline.left()):
            return await _open_async(converter, target, bytes(first_bytes), cookie, cache,
                                     direct_if_mptcp, options, converters,
                                     tfo_no_cookie, avoid_stripped, limit, dss_checksum)
    except TimeoutError as exc:
        if isinstance(exc, ConvertTimeout):
            raise
        raise ConvertTimeout(f"no converted connection to {_fmt(target)} via "
                             f"{_fmt(converter)} within {deadline.timeout:g} s",
                             "open_connection_async") from None


__all__ = [
    "DEFAULT_CACHE", "DEFAULT_CONVERTERS", "MP_CAPABLE_SYN_OPTION", "ConnectionInfo",
    "ConvertClientError", "ConvertRefused", "ConvertTimeout", "ConvertedConnection",
    "ConvertedStreams", "ConverterAvoided", "ConverterConnectError", "ConverterRegistry",
    "MptcpTargetCache", "TfoOutcome", "is_tfo_stripped", "open_connection",
    "open_connection_async", "query_converter",
]
