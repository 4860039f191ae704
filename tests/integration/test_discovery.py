"""Converter discovery over real UDP/TCP sockets against a small DNS server of our own.

The server (built on :mod:`mptcp_proxy.wire.dns`) listens on 127.0.0.1 with an
ephemeral port for UDP and TCP, answers from a dict zone, and can misbehave on
request: drop queries, truncate over UDP, answer SERVFAIL or FORMERR to EDNS,
send a spoofed answer first. No root needed.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import struct
import threading
import time
from collections import Counter

import pytest

from mptcp_proxy.discovery import (
    DiscoveryError,
    find_converter,
    order_srv,
    read_resolv_conf,
    service_name,
)
from mptcp_proxy.wire.dns import (
    DnsClass,
    DnsFormatError,
    DnsHeader,
    DnsMessage,
    DnsName,
    DnsRcode,
    DnsType,
    ResourceRecord,
    SrvData,
    decode_message,
    encode_message,
)

pytestmark = [pytest.mark.integration]

N = DnsName.from_text
DOMAIN = "example.net"
SRV_NAME = N("_convert._tcp.example.net")
TTL = 300


def srv(priority: int, weight: int, port: int, target: str) -> ResourceRecord:
    return ResourceRecord(SRV_NAME, DnsType.SRV, DnsClass.IN, TTL,
                          SrvData(priority, weight, port, N(target)))


def a(name: str, address: str) -> ResourceRecord:
    ip = ipaddress.ip_address(address)
    return ResourceRecord(N(name), DnsType.A if ip.version == 4 else DnsType.AAAA,
                          DnsClass.IN, TTL, ip)


def cname(name: str, target: str) -> ResourceRecord:
    return ResourceRecord(N(name), DnsType.CNAME, DnsClass.IN, TTL, N(target))


class FakeDns:
    """UDP + TCP DNS server on 127.0.0.1:<port> answering from ``records``.

    ``additional``: put A/AAAA of SRV targets in the additional section.
    ``mode``: "ok", "drop", "servfail", "truncate" (UDP answers TC=1, TCP answers
    fully), "formerr-edns" (FORMERR to queries with OPT), "spoof" (a wrong-id
    answer first, then the real one), "garbage" (an undecodable datagram first).
    """

    def __init__(self, records: list[ResourceRecord], *, additional: bool = False,
                 mode: str = "ok", host: str = "127.0.0.1") -> None:
        self.records = records
        self.additional = additional
        self.mode = mode
        self.log: list[tuple[str, str, int, bool]] = []  # (transport, name, type, edns)
        self.udp, self.tcp = _udp_and_tcp_on_one_port(host)
        self.port = self.udp.getsockname()[1]
        self.addr = (host, self.port)
        self._threads = [threading.Thread(target=self._serve_udp, daemon=True),
                         threading.Thread(target=self._serve_tcp, daemon=True)]
        for t in self._threads:
            t.start()

    def answer(self, query: DnsMessage, transport: str) -> DnsMessage | None:
        question = query.question
        self.log.append((transport, question.name.to_text().lower(), int(question.qtype),
                         query.opt is not None))
        header = dict(id=query.header.id, qr=True, aa=True, rd=query.header.rd, ra=True)
        if self.mode == "servfail":
            return DnsMessage(DnsHeader(rcode=DnsRcode.SERVFAIL, **header), query.questions)
        if self.mode == "formerr-edns" and query.opt is not None:
            return DnsMessage(DnsHeader(rcode=DnsRcode.FORMERR, **header), query.questions)
        if self.mode == "truncate" and transport == "udp":
            return DnsMessage(DnsHeader(tc=True, **header), query.questions)
        known = [r for r in self.records if r.name.matches(question.name)]
        if not known:
            return DnsMessage(DnsHeader(rcode=DnsRcode.NXDOMAIN, **header), query.questions)
        answers = [r for r in known if r.rtype in (question.qtype, DnsType.CNAME)]
        for record in list(answers):  # follow CNAMEs inside the zone, like a resolver
            if record.rtype == DnsType.CNAME:
                answers += [r for r in self.records
                            if r.name.matches(record.data) and r.rtype == question.qtype]
        extra = []
        if self.additional:
            for record in answers:
                if record.rtype == DnsType.SRV:
                    extra += [r for r in self.records if r.name.matches(record.data.target)
                              and r.rtype in (DnsType.A, DnsType.AAAA)]
        return DnsMessage(DnsHeader(**header), query.questions, tuple(answers), (),
                          tuple(extra))

    def _serve_udp(self) -> None:
        while True:
            try:
                data, peer = self.udp.recvfrom(65535)
            except OSError:
                return
            try:
                query = decode_message(data)
            except DnsFormatError:
                continue
            reply = self.answer(query, "udp")
            if self.mode == "drop" or reply is None:
                continue
            if self.mode == "spoof":
                fake = DnsMessage(DnsHeader(id=(query.header.id + 1) % 65536, qr=True),
                                  query.questions, (srv(0, 0, 1, "evil.example"),))
                self.udp.sendto(encode_message(fake), peer)
            if self.mode == "garbage":
                self.udp.sendto(b"\x00\x01garbage", peer)
            self.udp.sendto(encode_message(reply), peer)

    def _serve_tcp(self) -> None:
        while True:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    (length,) = struct.unpack("!H", _recv_exactly(conn, 2))
                    query = decode_message(_recv_exactly(conn, length))
                    wire = encode_message(self.answer(query, "tcp"))
                    conn.sendall(struct.pack("!H", len(wire)) + wire)
                except (OSError, DnsFormatError):
                    continue

    def close(self) -> None:
        for sock in (self.udp, self.tcp):
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked recvfrom()/accept()
            except OSError:
                pass
            sock.close()
        for t in self._threads:
            t.join(2)


def _udp_and_tcp_on_one_port(host: str) -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket bound to the same ephemeral port (the TCP one may be taken)."""
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((host, 0))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            tcp.bind((host, udp.getsockname()[1]))
        except OSError:
            udp.close()
            tcp.close()
            continue
        tcp.listen(8)
        return udp, tcp
    raise RuntimeError("no port free for both UDP and TCP")


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("short")
        buf += chunk
    return buf


@pytest.fixture
def dns():
    servers: list[FakeDns] = []

    def make(records, **kwargs) -> FakeDns:
        server = FakeDns(records, **kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


ZONE = [
    srv(10, 100, 5124, "conv1.example.net"),
    srv(20, 0, 5125, "conv2.example.net"),
    a("conv1.example.net", "192.0.2.1"),
    a("conv1.example.net", "2001:db8::1"),
    a("conv2.example.net", "192.0.2.2"),
]


def test_srv_answer_with_additional_addresses(dns):
    server = dns(ZONE, additional=True)
    found = find_converter(DOMAIN, nameservers=[server.addr], timeout=2)
    assert found == [("192.0.2.1", 5124), ("2001:db8::1", 5124), ("192.0.2.2", 5125)]
    # Everything came with the SRV answer: one query, over UDP, with EDNS.
    assert server.log == [("udp", "_convert._tcp.example.net", DnsType.SRV, True)]


def test_srv_targets_resolved_with_a_and_aaaa_queries(dns):
    server = dns(ZONE)
    found = find_converter(DOMAIN, nameservers=[server.addr], prefer_ipv6=True)
    assert found == [("2001:db8::1", 5124), ("192.0.2.1", 5124), ("192.0.2.2", 5125)]
    asked = [(name, qtype) for _, name, qtype, _ in server.log]
    assert asked == [("_convert._tcp.example.net", DnsType.SRV),
                     ("conv1.example.net", DnsType.AAAA), ("conv1.example.net", DnsType.A),
                     ("conv2.example.net", DnsType.AAAA), ("conv2.example.net", DnsType.A)]


def test_target_behind_a_cname(dns):
    server = dns([srv(0, 0, 7000, "alias.example.net"), cname("alias.example.net",
                                                              "real.example.net"),
                  a("real.example.net", "198.51.100.9")])
    assert find_converter(DOMAIN, nameservers=[server.addr]) == [("198.51.100.9", 7000)]


def test_nxdomain_is_a_clear_error(dns):
    server = dns([a("other.example.net", "192.0.2.9")])
    with pytest.raises(DiscoveryError, match="does not exist \\(NXDOMAIN\\)"):
        find_converter(DOMAIN, nameservers=[server.addr])


def test_no_srv_records_is_a_clear_error(dns):
    server = dns([a("_convert._tcp.example.net", "192.0.2.9")])  # NOERROR, no SRV
    with pytest.raises(DiscoveryError, match="no SRV records"):
        find_converter(DOMAIN, nameservers=[server.addr])


def test_service_explicitly_not_offered(dns):
    server = dns([srv(0, 0, 0, ".")])
    with pytest.raises(DiscoveryError, match="not offered"):
        find_converter(DOMAIN, nameservers=[server.addr])


def test_unresolvable_targets_are_a_clear_error(dns):
    server = dns([srv(0, 0, 7000, "gone.example.net")])
    with pytest.raises(DiscoveryError, match="no SRV target .* resolved"):
        find_converter(DOMAIN, nameservers=[server.addr])


def test_timeout_is_a_clear_error_within_the_deadline(dns):
    server = dns(ZONE, mode="drop")
    started = time.monotonic()
    with pytest.raises(DiscoveryError, match="no answer in time"):
        find_converter(DOMAIN, nameservers=[server.addr], timeout=0.4)
    assert 0.35 < time.monotonic() - started < 1.5


def test_truncated_udp_answer_is_asked_again_over_tcp(dns):
    server = dns(ZONE, additional=True, mode="truncate")
    found = find_converter(DOMAIN, nameservers=[server.addr])
    assert found[0] == ("192.0.2.1", 5124)
    assert [t for t, *_ in server.log] == ["udp", "tcp"]


def test_servfail_moves_on_to_the_next_nameserver(dns):
    broken = dns(ZONE, mode="servfail")
    good = dns(ZONE, additional=True)
    found = find_converter(DOMAIN, nameservers=[broken.addr, good.addr], timeout=2)
    assert found[0] == ("192.0.2.1", 5124)
    assert len(broken.log) == 1 and len(good.log) == 1


def test_every_nameserver_failing_is_reported(dns):
    one = dns(ZONE, mode="servfail")
    two = dns(ZONE, mode="drop")
    with pytest.raises(DiscoveryError) as caught:
        find_converter(DOMAIN, nameservers=[one.addr, two.addr], timeout=0.5)
    assert "SERVFAIL" in str(caught.value) and "no answer in time" in str(caught.value)


def test_edns_formerr_falls_back_to_plain_dns(dns):
    server = dns(ZONE, additional=True, mode="formerr-edns")
    assert find_converter(DOMAIN, nameservers=[server.addr])[0] == ("192.0.2.1", 5124)
    assert [edns for *_, edns in server.log] == [True, False]


@pytest.mark.parametrize("mode", ["spoof", "garbage"])
def test_spoofed_and_garbage_datagrams_are_ignored(dns, mode):
    server = dns(ZONE, additional=True, mode=mode)
    found = find_converter(DOMAIN, nameservers=[server.addr])
    assert ("192.0.2.1", 5124) in found
    assert all(host != "evil.example" for host, _ in found)


def test_port_unreachable_is_a_quick_error():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens
    started = time.monotonic()
    with pytest.raises(DiscoveryError, match="refused"):
        find_converter(DOMAIN, nameservers=[("127.0.0.1", port)], timeout=2)
    assert time.monotonic() - started < 1.0


def test_nameserver_and_argument_validation(tmp_path):
    with pytest.raises(DiscoveryError, match="not an IP address"):
        find_converter(DOMAIN, nameservers=["dns.example"])
    with pytest.raises(DiscoveryError, match="no nameserver"):
        find_converter(DOMAIN, nameservers=[])
    with pytest.raises(DiscoveryError, match="timeout"):
        find_converter(DOMAIN, nameservers=["127.0.0.1"], timeout=0)
    with pytest.raises(DiscoveryError, match="bad domain"):
        find_converter("a..b", nameservers=["127.0.0.1"])
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nsearch example.net\nnameserver 10.0.0.53\n"
                    "nameserver fe80::1%eth0 # link-local\nnameserver bogus\n"
                    "options timeout:1\n")
    assert read_resolv_conf(conf) == [("10.0.0.53", 53), ("fe80::1%eth0", 53)]
    with pytest.raises(DiscoveryError, match="cannot read"):
        read_resolv_conf(tmp_path / "missing")
    assert service_name("Example.NET.").to_text() == "_convert._tcp.Example.NET"


# --------------------------------------------------------------------------
# RFC 2782 ordering
# --------------------------------------------------------------------------

def data(priority: int, weight: int, port: int) -> SrvData:
    return SrvData(priority, weight, port, N(f"c{port}.example.net"))


def test_priority_first_then_weight():
    records = [data(20, 5, 3), data(10, 0, 1), data(10, 100, 2)]
    # rand returning the top of the range always picks the last record whose
    # running sum reaches the total; returning 0 picks the zero-weight one first.
    assert [r.port for r in order_srv(records, lambda lo, hi: hi)] == [2, 1, 3]
    assert [r.port for r in order_srv(records, lambda lo, hi: lo)] == [1, 2, 3]


def test_weighted_choice_follows_the_weights():
    rng = random.Random(8803)
    records = [data(0, 1, 1), data(0, 3, 3)]
    firsts = Counter(order_srv(records, rng.randint)[0].port for _ in range(4000))
    share = firsts[3] / 4000
    # RFC 2782 draws 0..sum inclusive: 0 and 1 pick the weight-1 record (running
    # sum 1), 2..4 the weight-3 one, so it comes first 3 times in 5.
    expected = 3 / 5
    assert abs(share - expected) < 0.04, (share, expected)


def test_order_keeps_every_record_once():
    records = [data(p, w, i) for i, (p, w) in enumerate([(1, 0), (1, 0), (0, 7), (2, 1)])]
    for seed in range(20):
        ordered = order_srv(records, random.Random(seed).randint)
        assert sorted(r.port for r in ordered) == [0, 1, 2, 3]
        assert [r.priority for r in ordered] == sorted(r.priority for r in ordered)
