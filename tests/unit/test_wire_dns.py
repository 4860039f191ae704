"""DNS codec: hex vectors written by hand (RFC 1035 §4, RFC 2782), round trips,
compression pointers, the strictness matrix, and fuzz that may raise only DnsFormatError.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mptcp_proxy.errors import ProtocolError
from mptcp_proxy.wire.dns import (
    ROOT,
    DnsClass,
    DnsFormatError,
    DnsHeader,
    DnsMessage,
    DnsName,
    DnsRcode,
    DnsType,
    MxData,
    Question,
    ResourceRecord,
    SoaData,
    SrvData,
    build_query,
    build_srv_query,
    decode_message,
    encode_message,
    opt_record,
)


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


N = DnsName.from_text
SERVICE = N("_convert._tcp.example.com")
CONV1 = N("conv1.example.com")

# _convert._tcp.example.com, uncompressed (27 bytes)
SERVICE_WIRE = "08 5f636f6e76657274 04 5f746370 07 6578616d706c65 03 636f6d 00"


def test_srv_query_vector():
    assert build_srv_query("_convert._tcp.example.com", id=0x1234) == h(f"""
        1234 0100 0001 0000 0000 0000
        {SERVICE_WIRE} 0021 0001
    """)


def test_srv_query_with_edns_vector():
    # RFC 6891 §6.1.2: root owner, TYPE 41, CLASS = payload size, TTL 0, no options.
    assert build_srv_query(SERVICE, id=0xBEEF, edns_udp_size=1232) == h(f"""
        beef 0100 0001 0000 0000 0001
        {SERVICE_WIRE} 0021 0001
        00 0029 04d0 00000000 0000
    """)


# Response, offsets worked out by hand:
#   12 question name (27 bytes: "example.com" starts at 26), 39 QTYPE/QCLASS
#   43 answer: owner c00c; rdata at 55: prio 10, weight 60, port 5124, then the
#      target conv1.example.com written out in full (RFC 2782: no compression) at 61
#   80 additional A, owner c03d (-> 61); 96 additional AAAA, owner c03d
RESPONSE_WIRE = h(f"""
    1234 8580 0001 0001 0000 0002
    {SERVICE_WIRE} 0021 0001
    c00c 0021 0001 0000012c 0019  000a 003c 1404  05 636f6e7631 07 6578616d706c65 03 636f6d 00
    c03d 0001 0001 0000012c 0004  c0000207
    c03d 001c 0001 0000012c 0010  20010db8000000000000000000000007
""")
RESPONSE = DnsMessage(
    DnsHeader(id=0x1234, qr=True, aa=True, rd=True, ra=True),
    (Question(SERVICE, DnsType.SRV),),
    (ResourceRecord(SERVICE, DnsType.SRV, DnsClass.IN, 300, SrvData(10, 60, 5124, CONV1)),),
    (),
    (ResourceRecord(CONV1, DnsType.A, DnsClass.IN, 300, ipaddress.IPv4Address("192.0.2.7")),
     ResourceRecord(CONV1, DnsType.AAAA, DnsClass.IN, 300,
                    ipaddress.IPv6Address("2001:db8::7"))),
)


def test_response_vector_decodes_and_reencodes_byte_for_byte():
    assert decode_message(RESPONSE_WIRE) == RESPONSE
    assert encode_message(RESPONSE) == RESPONSE_WIRE


def test_compressed_srv_target_is_accepted():
    # Same answer, SRV target as "conv1" + pointer to "example.com" (offset 26).
    wire = h(f"""
        1234 8580 0001 0001 0000 0002
        {SERVICE_WIRE} 0021 0001
        c00c 0021 0001 0000012c 000e  000a 003c 1404  05 636f6e7631 c01a
        c03d 0001 0001 0000012c 0004  c0000207
        c03d 001c 0001 0000012c 0010  20010db8000000000000000000000007
    """)
    assert decode_message(wire) == RESPONSE


def test_pointer_chains_are_followed():
    # Additional owner "www" + pointer to the SRV target (61), itself holding no pointer,
    # and a CNAME whose RDATA points into the middle of the question name (26).
    msg = DnsMessage(DnsHeader(id=1, qr=True), (Question(SERVICE, DnsType.SRV),),
                     (ResourceRecord(SERVICE, DnsType.SRV, 1, 5, SrvData(0, 0, 1, CONV1)),),
                     (),
                     (ResourceRecord(N("www.conv1.example.com"), DnsType.CNAME, 1, 5,
                                     N("example.com")),))
    wire = encode_message(msg)
    assert b"\x03www\xc0\x3d" in wire and wire.endswith(b"\xc0\x1a")
    assert decode_message(wire) == msg


def test_uncompressed_encoding_decodes_to_the_same_message():
    plain = encode_message(RESPONSE, compress=False)
    assert plain.count(b"\x07example\x03com\x00") == 5  # every name written out
    assert len(plain) > len(RESPONSE_WIRE)
    assert decode_message(plain) == RESPONSE


def test_nxdomain_with_soa_round_trips():
    msg = DnsMessage(
        DnsHeader(id=7, qr=True, aa=True, rcode=DnsRcode.NXDOMAIN),
        (Question(SERVICE, DnsType.SRV),), (),
        (ResourceRecord(N("example.com"), DnsType.SOA, 1, 60,
                        SoaData(N("ns.example.com"), N("hostmaster.example.com"),
                                2024010101, 3600, 600, 86400, 60)),))
    wire = encode_message(msg)
    assert wire[3] & 0xF == 3
    decoded = decode_message(wire)
    assert decoded == msg and decoded.header.rcode is DnsRcode.NXDOMAIN


def test_mx_ptr_ns_txt_and_unknown_types_round_trip():
    records = (
        ResourceRecord(N("example.com"), DnsType.MX, 1, 1, MxData(10, N("mail.example.com"))),
        ResourceRecord(N("7.2.0.192.in-addr.arpa"), DnsType.PTR, 1, 1, N("conv1.example.com")),
        ResourceRecord(N("example.com"), DnsType.NS, 1, 1, N("ns.example.com")),
        ResourceRecord(N("example.com"), DnsType.TXT, 1, 1, b"\x05hello"),
        ResourceRecord(N("example.com"), 65280, 1, 1, b"\x00\x01\x02"),
    )
    msg = DnsMessage(DnsHeader(id=9, qr=True), answers=records)
    assert decode_message(encode_message(msg)) == msg


def test_header_flags_round_trip():
    header = DnsHeader(id=0xFFFF, qr=True, opcode=2, aa=True, tc=True, rd=False, ra=True, z=5,
                       rcode=DnsRcode.REFUSED)
    assert DnsHeader.from_flags(header.id, header.flags) == header
    assert header.flags == 0x8000 | (2 << 11) | 0x0400 | 0x0200 | 0x0080 | (5 << 4) | 5


def test_query_helpers_and_opt_accessor():
    query = decode_message(build_query("conv1.example.com", DnsType.AAAA, id=5,
                                       edns_udp_size=4096))
    assert query.question == Question(CONV1, DnsType.AAAA)
    assert query.opt == opt_record(4096) and query.opt.rclass == 4096
    assert query.header.rd and not query.header.qr
    assert decode_message(build_query(CONV1, DnsType.A, id=5, rd=False)).opt is None


# --------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------

@pytest.mark.parametrize("text, labels, back", [
    ("example.com", (b"example", b"com"), "example.com"),
    ("example.com.", (b"example", b"com"), "example.com"),
    (".", (), "."),
    ("", (), "."),
    ("a\\.b.c", (b"a.b", b"c"), "a\\.b.c"),
    ("x\\032y", (b"x y",), "x\\032y"),
    ("bücher.de", (b"xn--bcher-kva", b"de"), "xn--bcher-kva.de"),
    ("_convert._tcp.Example.NET", (b"_convert", b"_tcp", b"Example", b"NET"),
     "_convert._tcp.Example.NET"),
])
def test_name_text_forms(text, labels, back):
    name = N(text)
    assert name.labels == labels
    assert name.to_text() == back
    assert N(back) == name


@pytest.mark.parametrize("text", ["a..b", ".a", "a" * 64 + ".com", ".".join(["a" * 60] * 5),
                                  "a\\", "x\\300y"])
def test_bad_name_text(text):
    with pytest.raises(ValueError):
        N(text)


def test_names_compare_case_insensitively_by_key_only():
    assert N("Conv1.Example.com") != CONV1
    assert N("Conv1.Example.com").matches(CONV1)
    assert ROOT.is_root and ROOT.to_text() == "."
    assert N("example.com").child("_convert", "_tcp") == SERVICE


def test_name_limits():
    longest = DnsName((b"a" * 63, b"b" * 63, b"c" * 63, b"d" * 61))
    assert longest.wire_length == 255
    with pytest.raises(ValueError):
        DnsName((b"a" * 63, b"b" * 63, b"c" * 63, b"d" * 62))
    with pytest.raises(ValueError):
        DnsName((b"",))
    with pytest.raises(TypeError):
        DnsName(("text",))


# --------------------------------------------------------------------------
# Strictness: every rule, with the offending bytes
# --------------------------------------------------------------------------

HDR_1Q = "0001 0100 0001 0000 0000 0000"


@pytest.mark.parametrize("wire, fragment", [
    (f"{HDR_1Q} c00e 0001 0001", "not backwards"),                 # forward pointer
    (f"{HDR_1Q} c002 0001 0001", "not backwards"),                 # into the header
    (f"{HDR_1Q} 01 61 c00c 0001 0001", "not backwards"),           # a loop onto itself
    (f"{HDR_1Q} 01 61 c0", "cut short"),
    (f"{HDR_1Q} 41 61 00 0001 0001", "label type"),                 # 0b01 extended label
    (f"{HDR_1Q} 81 61 00 0001 0001", "label type"),                 # 0b10 reserved
    (f"{HDR_1Q} 05 6162 ", "past its end"),
    (f"{HDR_1Q} 01 61", "past its end"),                           # no root label
    (HDR_1Q + " " + " ".join(["3f" + "61" * 63] * 4) + " 00 0001 0001", "longer than 255"),
    (f"{HDR_1Q} 00 0001", "inside question"),
    (f"{HDR_1Q} 00 0001 0001 00", "after the last record"),
    ("0001 8100 0000 0001 0000 0000 00 0001 0001 00000000 0005 c000020700", "A RDATA is 5"),
    ("0001 8100 0000 0001 0000 0000 00 001c 0001 00000000 0004 c0000207", "AAAA RDATA is 4"),
    ("0001 8100 0000 0001 0000 0000 00 0021 0001 00000000 0009 0000 0000 0001 00 ffff",
     "after its fields"),
    ("0001 8100 0000 0001 0000 0000 00 0021 0001 00000000 0006 0000 0000 0001",
     "too short"),
    ("0001 8100 0000 0001 0000 0000 00 0021 0001 00000000 0008 0000 0000 0001 01 61",
     "past its end"),                                             # target runs past RDLENGTH
    ("0001 8100 0000 0001 0000 0000 00 0005 0001 00000000 0001 00 ff", "after the last"),
    ("0001 8100 0000 0002 0000 0000 00 0001 0001 00000000 0004 c0000207", "past its end"),
    ("0001 8100 0000 0000 0000 0002 00 0029 04d0 00000000 0000 00 0029 04d0 00000000 0000",
     "more than one OPT"),
    ("0001 8100 0000 0000 0000 0001 01 61 00 0029 04d0 00000000 0000", "root"),
    ("0001 8100 0000 0001 0000 0000 00 0006 0001 00000000 0004 00 00 0000", "SOA RDATA"),
    ("0001 81", "inside header"),
])
def test_malformed_messages(wire, fragment):
    with pytest.raises(DnsFormatError) as caught:
        decode_message(h(wire))
    assert fragment in str(caught.value)
    assert isinstance(caught.value, ProtocolError) and caught.value.code == DnsRcode.FORMERR


def test_every_strict_prefix_of_a_valid_message_is_malformed():
    for cut in range(len(RESPONSE_WIRE)):
        with pytest.raises(DnsFormatError):
            decode_message(RESPONSE_WIRE[:cut])


def test_oversized_message_is_refused():
    with pytest.raises(DnsFormatError):
        decode_message(bytes(70000))


def test_local_misuse_raises_type_and_value_errors():
    with pytest.raises(TypeError):
        ResourceRecord(CONV1, DnsType.A, 1, 1, b"\xc0\x00\x02\x07")  # A wants an IPv4Address
    with pytest.raises(TypeError):
        ResourceRecord(CONV1, DnsType.SRV, 1, 1, CONV1)
    with pytest.raises(ValueError):
        SrvData(0, 0, 70000, CONV1)
    with pytest.raises(ValueError):
        DnsHeader(id=70000)
    with pytest.raises(TypeError):
        DnsHeader(id=1, qr=1)
    with pytest.raises(TypeError):
        encode_message(b"not a message")
    with pytest.raises(ValueError):
        opt_record(100)


# --------------------------------------------------------------------------
# Hypothesis: round trips and fuzz
# --------------------------------------------------------------------------

labels = st.binary(min_size=1, max_size=8)
names = st.lists(st.sampled_from([b"example", b"com", b"_convert", b"_tcp", b"conv1", b"Conv1"])
                 | labels, max_size=4).map(lambda ls: DnsName(tuple(ls)))
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)


def rdata_for(rtype: int):
    if rtype == DnsType.A:
        return st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
    if rtype == DnsType.AAAA:
        return st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)
    if rtype == DnsType.SRV:
        return st.builds(SrvData, u16, u16, u16, names)
    if rtype == DnsType.MX:
        return st.builds(MxData, u16, names)
    if rtype == DnsType.SOA:
        return st.builds(SoaData, names, names, u32, u32, u32, u32, u32)
    if rtype in (DnsType.CNAME, DnsType.NS, DnsType.PTR):
        return names
    return st.binary(max_size=20)


record_types = st.sampled_from([DnsType.A, DnsType.AAAA, DnsType.SRV, DnsType.MX, DnsType.SOA,
                                DnsType.CNAME, DnsType.NS, DnsType.PTR, DnsType.TXT, 999])
records = record_types.flatmap(
    lambda t: st.builds(ResourceRecord, names, st.just(t), u16, u32, rdata_for(t)))
headers = st.builds(DnsHeader, u16, st.booleans(), st.integers(0, 15), st.booleans(),
                    st.booleans(), st.booleans(), st.booleans(), st.integers(0, 7),
                    st.integers(0, 15))
messages = st.builds(
    lambda header, qs, an, ns, ar, opt: DnsMessage(
        header, qs, an, ns, tuple(ar) + ((opt_record(opt),) if opt else ())),
    headers, st.lists(st.builds(Question, names, u16, u16), max_size=2),
    st.lists(records, max_size=3), st.lists(records, max_size=2), st.lists(records, max_size=2),
    st.none() | st.integers(512, 4096))
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(messages, st.booleans())
def test_round_trip(msg, compress):
    wire = encode_message(msg, compress=compress)
    assert decode_message(wire) == msg
    if compress:
        assert len(wire) <= len(encode_message(msg, compress=False))


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_raise_only_format_errors(data):
    try:
        decode_message(data)
    except DnsFormatError:
        pass


@FUZZ
@given(messages, st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1,
                          max_size=4), st.integers(0, 400))
def test_fuzz_mutated_messages_raise_only_format_errors(msg, flips, cut):
    wire = bytearray(encode_message(msg))
    for pos, value in flips:
        wire[pos % len(wire)] = value
    for data in (bytes(wire), bytes(wire[:cut])):
        try:
            decoded = decode_message(data)
        except DnsFormatError:
            continue
        assert decode_message(encode_message(decoded, compress=False)) == decoded
