"""Fuzz the DNS codec (src/mptcp_proxy/wire/dns.py).

The whole input is one DNS message. Expected rejection: DnsFormatError (a
ProtocolError). A decoded message must re-encode (compressed and not) to
bytes that decode to the same message, and every name must survive
to_text/from_text.
"""

from __future__ import annotations

import ipaddress
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import check, instrumented, main  # noqa: E402

with instrumented():
    from mptcp_proxy.wire import dns

NAME = "dns"


def _names(msg):
    for q in msg.questions:
        yield q.name
    for rr in msg.answers + msg.authorities + msg.additionals:
        yield rr.name
        data = rr.data
        if isinstance(data, dns.DnsName):
            yield data
        elif isinstance(data, (dns.SrvData,)):
            yield data.target
        elif isinstance(data, dns.MxData):
            yield data.exchange
        elif isinstance(data, dns.SoaData):
            yield data.mname
            yield data.rname


def one_input(data: bytes) -> None:
    try:
        msg = dns.decode_message(data)
    except dns.DnsFormatError:
        return
    for compress in (True, False):
        wire = dns.encode_message(msg, compress=compress)
        check(dns.decode_message(wire) == msg, f"round trip (compress={compress}) changed")
    for name in _names(msg):
        check(dns.DnsName.from_text(name.to_text()) == name, f"text round trip of {name}")
    msg.question, msg.opt  # accessors must not raise


def seeds() -> list[bytes]:
    target = dns.DnsName.from_text("conv1.example.com")
    service = dns.DnsName.from_text("_convert._tcp.example.com")
    resp = dns.DnsMessage(
        dns.DnsHeader(id=0x1234, qr=True, aa=True, rd=True, ra=True),
        (dns.Question(service, dns.DnsType.SRV),),
        (dns.ResourceRecord(service, dns.DnsType.SRV, dns.DnsClass.IN, 300,
                            dns.SrvData(10, 60, 5124, target)),
         dns.ResourceRecord(service, dns.DnsType.CNAME, dns.DnsClass.IN, 300, target)),
        (dns.ResourceRecord(dns.DnsName.from_text("example.com"), dns.DnsType.SOA,
                            dns.DnsClass.IN, 60,
                            dns.SoaData(target, target, 1, 2, 3, 4, 5)),),
        (dns.ResourceRecord(target, dns.DnsType.A, dns.DnsClass.IN, 300,
                            ipaddress.IPv4Address("192.0.2.7")),
         dns.ResourceRecord(target, dns.DnsType.AAAA, dns.DnsClass.IN, 300,
                            ipaddress.IPv6Address("2001:db8::7")),
         dns.ResourceRecord(target, dns.DnsType.MX, dns.DnsClass.IN, 300,
                            dns.MxData(5, target)),
         dns.ResourceRecord(target, 99, dns.DnsClass.IN, 300, b"v=spf1"),
         dns.opt_record()),
    )
    return [
        dns.build_srv_query("_convert._tcp.example.com", id=7),
        dns.build_srv_query("_convert._tcp.example.com", id=8, edns_udp_size=1232),
        dns.build_query("conv1.example.com", dns.DnsType.AAAA, id=9),
        dns.encode_message(resp),
        dns.encode_message(resp, compress=False),
    ]


if __name__ == "__main__":
    main(one_input)
