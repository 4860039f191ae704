"""Find a Transport Converter through DNS: ``_convert._tcp.<domain>`` SRV (RFC 8803 §10.1).

    from mptcp_proxy.discovery import find_converter
    converters = find_converter("example.net")     # [("192.0.2.7", 5124), ...]

The SRV answer is ordered as RFC 2782 says (lowest priority first, weighted
random order within a priority), and each target host is resolved to its
addresses through the same nameservers (the answer's additional section when
it carries them, else A and AAAA queries). The queries go over UDP with an
EDNS(0) payload size of 1232; a truncated answer is asked again over TCP.

Errors are :class:`DiscoveryError` with one line saying what failed: no such
domain, no SRV records, the service explicitly not offered (target "."),
no nameserver answered in time, every nameserver failed, no target resolved.

Anti-spoofing: every query has a random id and a fresh ephemeral port on a
connected UDP socket; an answer counts only if its id, its QR bit and its
question match the query. Anything else is ignored while the wait goes on.
"""

from __future__ import annotations

import ipaddress
import random
import secrets
import selectors
import socket
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mptcp_proxy.errors import ProxyError
from mptcp_proxy.wire.dns import (
    DEFAULT_EDNS_UDP_SIZE,
    DnsFormatError,
    DnsMessage,
    DnsName,
    DnsRcode,
    DnsType,
    Question,
    ResourceRecord,
    SrvData,
    build_query,
    decode_message,
)

SERVICE_LABELS = ("_convert", "_tcp")
"""RFC 8803 §10.1 registers the service name ``convert``; SRV adds ``_tcp``."""
DNS_PORT = 53
RESOLV_CONF = Path("/etc/resolv.conf")
DEFAULT_TIMEOUT_S = 2.0
_UDP_RECV_SIZE = 65535
_TCP_LENGTH = struct.Struct("!H")
_MAX_CNAME_HOPS = 8

Nameserver = tuple[str, int]
NameserverLike = str | tuple[str, int]


class DiscoveryError(ProxyError):
    """No converter could be found; the message says why."""


@dataclass(frozen=True)
class _Answer:
    message: DnsMessage
    server: Nameserver


# --------------------------------------------------------------------------
# Nameservers
# --------------------------------------------------------------------------

def read_resolv_conf(path: Path | str = RESOLV_CONF) -> list[Nameserver]:
    """The ``nameserver`` lines of resolv.conf(5), in order, on port 53."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise DiscoveryError(f"cannot read {path}: {exc.strerror}") from None
    servers = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                servers.append(_nameserver(fields[1]))
            except DiscoveryError:
                continue  # resolv.conf tolerates junk lines; so do we
    return servers


def _nameserver(spec: NameserverLike) -> Nameserver:
    if isinstance(spec, str):
        host, port = spec, DNS_PORT
    elif isinstance(spec, tuple) and len(spec) == 2:
        host, port = spec
    else:
        raise DiscoveryError(f"nameserver must be an address or (address, port), not {spec!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 0xFFFF:
        raise DiscoveryError(f"nameserver port must be 1..65535, not {port!r}")
    try:
        ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        raise DiscoveryError(f"nameserver {host!r} is not an IP address") from None
    return str(host), port


def _sockaddr(server: Nameserver, kind: int) -> tuple[int, tuple]:
    infos = socket.getaddrinfo(server[0], server[1], type=kind, flags=socket.AI_NUMERICHOST)
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


# --------------------------------------------------------------------------
# Transport
# --------------------------------------------------------------------------

class _QueryFailed(Exception):
    """This server did not give a usable answer; try the next one."""


def _remaining(deadline: float) -> float:
    return deadline - time.monotonic()


def _answers_query(message: DnsMessage, query_id: int, question: Question) -> bool:
    return (message.header.qr and message.header.id == query_id
            and len(message.questions) == 1 and message.questions[0].matches(question))


def _udp_exchange(server: Nameserver, query: bytes, query_id: int, question: Question,
                  deadline: float) -> DnsMessage:
    family, sockaddr = _sockaddr(server, socket.SOCK_DGRAM)
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        try:
            sock.connect(sockaddr)  # the kernel drops datagrams from anyone else
            sock.send(query)
        except OSError as exc:
            raise _QueryFailed(f"{_fmt(server)}: {exc.strerror or exc}") from None
        malformed: DnsFormatError | None = None
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ)
            while True:
                left = _remaining(deadline)
                if left <= 0:
                    why = f"malformed answer ({malformed})" if malformed else "no answer"
                    raise _QueryFailed(f"{_fmt(server)}: {why} in time")
                if selector.select(left):
                    message, malformed = _read_datagram(sock, server, malformed)
                    if message is not None and _answers_query(message, query_id, question):
                        return message


def _read_datagram(sock: socket.socket, server: Nameserver, malformed: DnsFormatError | None
                   ) -> tuple[DnsMessage | None, DnsFormatError | None]:
    """One datagram decoded, or None (nothing there, or malformed: remembered)."""
    try:
        datagram = sock.recv(_UDP_RECV_SIZE)
    except BlockingIOError:
        return None, malformed
    except OSError as exc:  # ICMP port unreachable shows up here
        raise _QueryFailed(f"{_fmt(server)}: {exc.strerror or exc}") from None
    try:
        return decode_message(datagram), malformed
    except DnsFormatError as exc:
        return None, exc


def _recv_exactly(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = _remaining(deadline)
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed mid-answer")
        buf += chunk
    return bytes(buf)


def _tcp_exchange(server: Nameserver, query: bytes, query_id: int, question: Question,
                  deadline: float) -> DnsMessage:
    family, sockaddr = _sockaddr(server, socket.SOCK_STREAM)
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(max(_remaining(deadline), 0.001))
            sock.connect(sockaddr)
            sock.sendall(_TCP_LENGTH.pack(len(query)) + query)  # RFC 1035 §4.2.2
            (length,) = _TCP_LENGTH.unpack(_recv_exactly(sock, _TCP_LENGTH.size, deadline))
            message = decode_message(_recv_exactly(sock, length, deadline))
    except (TimeoutError, socket.timeout):
        raise _QueryFailed(f"{_fmt(server)} (TCP): no answer in time") from None
    except OSError as exc:
        raise _QueryFailed(f"{_fmt(server)} (TCP): {exc.strerror or exc}") from None
    except DnsFormatError as exc:
        raise _QueryFailed(f"{_fmt(server)} (TCP): malformed answer ({exc})") from None
    if not _answers_query(message, query_id, question):
        raise _QueryFailed(f"{_fmt(server)} (TCP): answer does not match the query")
    return message


def _ask(server: Nameserver, name: DnsName, qtype: int, deadline: float) -> DnsMessage:
    """One question to one server: UDP with EDNS, TCP on truncation, no EDNS on FORMERR."""
    message = _exchange(server, name, qtype, DEFAULT_EDNS_UDP_SIZE, deadline)
    if message.header.rcode == DnsRcode.FORMERR:
        # A server from before EDNS answers FORMERR to the OPT record (RFC 6891 §7).
        message = _exchange(server, name, qtype, None, deadline)
    return message


def _exchange(server: Nameserver, name: DnsName, qtype: int, edns: int | None,
              deadline: float) -> DnsMessage:
    question = Question(name, qtype)
    query_id = secrets.randbelow(0x10000)
    query = build_query(name, qtype, id=query_id, edns_udp_size=edns)
    message = _udp_exchange(server, query, query_id, question, deadline)
    if message.header.tc:
        message = _tcp_exchange(server, query, query_id, question, deadline)
    return message


def _resolve(servers: Sequence[Nameserver], name: DnsName, qtype: int,
             deadline: float, failures: list[str]) -> DnsMessage | None:
    """The first definitive answer (NOERROR or NXDOMAIN) from ``servers``, in order.

    Each server gets an equal share of the time left. Failures are appended
    to ``failures``; None when every server failed.
    """
    for i, server in enumerate(servers):
        left = _remaining(deadline)
        if left <= 0:
            failures.append(f"{_fmt(server)}: not asked, out of time")
            continue
        share = time.monotonic() + left / (len(servers) - i)
        try:
            message = _ask(server, name, qtype, share)
        except _QueryFailed as exc:
            failures.append(str(exc))
            continue
        rcode = message.header.rcode
        if rcode in (DnsRcode.NOERROR, DnsRcode.NXDOMAIN):
            return message
        failures.append(f"{_fmt(server)}: {_rcode_name(rcode)}")
    return None


# --------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------

def _owner_names(message: DnsMessage, name: DnsName) -> list[DnsName]:
    """``name`` and the CNAME chain the answer section gives for it."""
    names = [name]
    for _ in range(_MAX_CNAME_HOPS):
        step = next((r.data for r in message.answers
                     if r.rtype == DnsType.CNAME and r.name.matches(names[-1])
                     and isinstance(r.data, DnsName)), None)
        if step is None or any(step.matches(seen) for seen in names):
            break
        names.append(step)
    return names


def _records(message: DnsMessage, name: DnsName, rtype: int,
             sections: Iterable[tuple[ResourceRecord, ...]] | None = None) -> list[ResourceRecord]:
    owners = _owner_names(message, name)
    chosen = (message.answers,) if sections is None else sections
    return [r for section in chosen for r in section
            if r.rtype == rtype and any(r.name.matches(owner) for owner in owners)]


def order_srv(records: Sequence[SrvData],
              rand: Callable[[int, int], int] | None = None) -> list[SrvData]:
    """RFC 2782 order: priority ascending; within a priority, a weighted random draw.

    Within one priority: zero-weight records go first in the list, then
    repeatedly draw a number in 0..sum(weights) and take the first record
    whose running sum reaches it. ``rand(a, b)`` returns an int in a..b
    inclusive (``random.randint``).
    """
    draw = rand if rand is not None else random.randint
    ordered: list[SrvData] = []
    for priority in sorted({r.priority for r in records}):
        pool = sorted((r for r in records if r.priority == priority),
                      key=lambda r: r.weight != 0)  # stable: zero weights first
        while pool:
            total = sum(r.weight for r in pool)
            pick = draw(0, total)
            running = 0
            for index, record in enumerate(pool):
                running += record.weight
                if running >= pick:
                    ordered.append(pool.pop(index))
                    break
    return ordered


def _addresses(message: DnsMessage | None, name: DnsName, rtype: int,
               sections: Iterable[tuple[ResourceRecord, ...]] | None = None) -> list[str]:
    if message is None:
        return []
    return [str(r.data) for r in _records(message, name, rtype, sections)
            if isinstance(r.data, (ipaddress.IPv4Address, ipaddress.IPv6Address))]


def _rcode_name(rcode: int) -> str:
    return rcode.name if isinstance(rcode, DnsRcode) else f"RCODE {rcode}"


def _fmt(server: Nameserver) -> str:
    host, port = server
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------
# The public call
# --------------------------------------------------------------------------

def service_name(domain: str) -> DnsName:
    """``_convert._tcp.<domain>``."""
    try:
        base = DnsName.from_text(domain)
        return base.child(*SERVICE_LABELS)
    except ValueError as exc:
        raise DiscoveryError(f"bad domain {domain!r}: {exc}") from None


def find_converter(domain: str, *, nameservers: Sequence[NameserverLike] | None = None,
                   timeout: float = DEFAULT_TIMEOUT_S, prefer_ipv6: bool = False,
                   rand: Callable[[int, int], int] | None = None) -> list[tuple[str, int]]:
    """Converters for ``domain``, best first: ``[(ip, port), ...]``.

    ``nameservers``: addresses or ``(address, port)`` pairs, tried in order
    (default: /etc/resolv.conf). ``timeout``: seconds for the whole search,
    shared between the servers. Each SRV target contributes its IPv4
    addresses, then its IPv6 ones (the other way round with
    ``prefer_ipv6``). ``rand`` replaces ``random.randint`` for the RFC 2782
    weighted order (tests pass a seeded one). Raises :class:`DiscoveryError`.
    """
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise DiscoveryError(f"timeout must be a positive number of seconds, not {timeout!r}")
    servers = ([_nameserver(s) for s in nameservers] if nameservers is not None
               else read_resolv_conf())
    if not servers:
        raise DiscoveryError("no nameserver configured")
    deadline = time.monotonic() + timeout
    qname = service_name(domain)
    failures: list[str] = []

    answer = _resolve(servers, qname, DnsType.SRV, deadline, failures)
    if answer is None:
        raise DiscoveryError(f"no converter for {domain}: SRV query {qname} failed: "
                             + "; ".join(failures))
    if answer.header.rcode == DnsRcode.NXDOMAIN:
        raise DiscoveryError(f"no converter for {domain}: {qname} does not exist (NXDOMAIN)")
    srvs = [r.data for r in _records(answer, qname, DnsType.SRV) if isinstance(r.data, SrvData)]
    if not srvs:
        raise DiscoveryError(f"no converter for {domain}: no SRV records at {qname}")
    if len(srvs) == 1 and srvs[0].unavailable:
        raise DiscoveryError(f"no converter for {domain}: {qname} says the service is "
                             "not offered (target \".\")")

    families = (DnsType.AAAA, DnsType.A) if prefer_ipv6 else (DnsType.A, DnsType.AAAA)
    extra = (answer.answers, answer.additionals)
    found: list[tuple[str, int]] = []
    for srv in order_srv([s for s in srvs if not s.unavailable], rand):
        # Addresses the answer already carries (RFC 2782 suggests the additional
        # section) are taken as the whole set; otherwise ask for both families.
        addresses = [address for rtype in families
                     for address in _addresses(answer, srv.target, rtype, extra)]
        if not addresses:
            for rtype in families:
                addresses += _addresses(_resolve(servers, srv.target, rtype, deadline,
                                                 failures), srv.target, rtype)
        for address in addresses:
            if (address, srv.port) not in found:
                found.append((address, srv.port))
    if not found:
        detail = ("; ".join(failures)) if failures else "no A or AAAA records"
        raise DiscoveryError(f"no converter for {domain}: no SRV target of {qname} "
                             f"resolved ({detail})")
    return found


__all__ = ["DNS_PORT", "DiscoveryError", "SERVICE_LABELS", "find_converter", "order_srv",
           "read_resolv_conf", "service_name"]
