"""RFC 8803 Convert codec: hex vectors, round trips, trickle feeds, the bad-input matrix, fuzz.

Vectors are written by hand from the RFC 8803 figures (§4.1 fixed header, §4.2
TLVs): each one is decoded and compared as a whole dataclass, then re-encoded
and compared byte for byte.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mptcp_proxy.errors import NeedMoreData, ProtocolError
from mptcp_proxy.wire.convert import (
    HEADER_LEN,
    MAGIC,
    MAX_ERROR_VALUE_LEN,
    MAX_MESSAGE_LEN,
    MAX_TOTAL_WORDS,
    VERSION,
    WORD,
    ConnectTlv,
    ConvertDecoder,
    ConvertErrorCode,
    ConvertMessage,
    ConvertProtocolError,
    ConvertSender,
    ConvertTlvType,
    CookieTlv,
    ErrorTlv,
    ExtendedTcpHeaderTlv,
    ForbiddenTarget,
    IncompleteConvertMessage,
    InfoTlv,
    NotConvertMessage,
    PrivateTlv,
    SupportedTcpExtTlv,
    TcpOption,
    TcpOptionKind,
    UnsupportedConvertVersion,
    check_connect_target,
    check_sender,
    classify_connect_target,
    decode_message,
    encode_message,
    encode_tlv,
    error_reply_for,
)
from mptcp_proxy.wire.convert import _decode_message_general as decode_general

CLIENT = ConvertSender.CLIENT
CONVERTER = ConvertSender.CONVERTER
E = ConvertErrorCode
ip = ipaddress.ip_address


def h(text: str) -> bytes:
    """Bytes from spaced hex, as written in the vectors below."""
    return bytes.fromhex(text)


APP_DATA = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"

# Connect TLV to 192.0.2.1:443 (RFC 8803 §4.2.5: IPv4 travels IPv4-mapped).
CONNECT_V4 = ("0a 05 01 bb"
              " 00 00 00 00 00 00 00 00 00 00 ff ff c0 00 02 01")
CONNECT_V4_TLV = ConnectTlv(443, ip("192.0.2.1"))
COOKIE_8 = bytes(range(1, 9))
TLV_HEADER_PROBE = 2  # Type and Length: what the decoder waits for before each TLV


# --------------------------------------------------------------------------
# Constants and registries
# --------------------------------------------------------------------------

def test_registries_match_rfc_8803() -> None:
    assert {t.name: t.value for t in ConvertTlvType} == {
        "INFO": 1, "CONNECT": 10, "EXTENDED_TCP_HDR": 20, "SUPPORTED_TCP_EXT": 21,
        "COOKIE": 22, "ERROR": 30}
    assert {c.name: c.value for c in ConvertErrorCode} == {
        "UNSUPPORTED_VERSION": 0, "MALFORMED_MESSAGE": 1, "UNSUPPORTED_MESSAGE": 2,
        "MISSING_COOKIE": 3, "NOT_AUTHORIZED": 32, "UNSUPPORTED_TCP_OPTION": 33,
        "RESOURCE_EXCEEDED": 64, "NETWORK_FAILURE": 65, "CONNECTION_RESET": 96,
        "DESTINATION_UNREACHABLE": 97}


def test_header_constants() -> None:
    assert VERSION == 1
    assert MAGIC == 0x2263 == 8803
    assert HEADER_LEN == WORD == 4
    assert MAX_MESSAGE_LEN == MAX_TOTAL_WORDS * WORD == 1020


def test_errors_belong_to_the_package_hierarchy() -> None:
    assert issubclass(ConvertProtocolError, ProtocolError)
    assert issubclass(UnsupportedConvertVersion, ConvertProtocolError)
    assert issubclass(NotConvertMessage, ConvertProtocolError)
    assert issubclass(IncompleteConvertMessage, NeedMoreData)


# --------------------------------------------------------------------------
# Hex vectors: decode, compare whole dataclasses, re-encode, compare bytes
# --------------------------------------------------------------------------

VECTORS = [
    pytest.param(
        CLIENT,
        "01 06 22 63" + CONNECT_V4,
        ConvertMessage((CONNECT_V4_TLV,)),
        id="connect-ipv4"),
    pytest.param(
        CLIENT,
        # Extended Connect to [2001:db8::1]:80 asking for MP_CAPABLE (30) and a
        # TFO cookie request (34, empty), padded to a word.
        "01 08 22 63"
        " 0a 07 00 50 20 01 0d b8 00 00 00 00 00 00 00 00 00 00 00 01"
        " 1e 04 01 81 22 02 00 00",
        ConvertMessage((ConnectTlv(80, ip("2001:db8::1"), (
            TcpOption(TcpOptionKind.MPTCP, h("01 81")),
            TcpOption(TcpOptionKind.FAST_OPEN))),)),
        id="extended-connect-ipv6"),
    pytest.param(
        CLIENT,
        # Info + Connect to 198.51.100.7:80 + an 8-byte cookie.
        "01 0a 22 63"
        " 01 01 00 00"
        " 0a 05 00 50 00 00 00 00 00 00 00 00 00 00 ff ff c6 33 64 07"
        " 16 03 00 00 01 02 03 04 05 06 07 08",
        ConvertMessage((InfoTlv(), ConnectTlv(80, ip("198.51.100.7")), CookieTlv(COOKIE_8))),
        id="info-connect-cookie"),
    pytest.param(
        CLIENT,
        "01 02 22 63 01 01 00 00",
        ConvertMessage((InfoTlv(),)),
        id="info-alone"),
    pytest.param(
        CONVERTER,
        "01 01 22 63",
        ConvertMessage(()),
        id="bare-header-ack"),
    pytest.param(
        CONVERTER,
        # Supported TCP Extensions: MPTCP (30), TFO (34), padded.
        "01 03 22 63 15 02 00 00 1e 22 00 00",
        ConvertMessage((SupportedTcpExtTlv((30, 34)),)),
        id="supported-tcp-ext"),
    pytest.param(
        CONVERTER,
        # Extended TCP Header: the server's SYN+ACK options, MSS 1460, NOP,
        # window scale 7, MP_CAPABLE with its 8-byte key.
        "01 07 22 63 14 06 00 00"
        " 02 04 05 b4 01 03 03 07 1e 0c 01 81 00 11 22 33 44 55 66 77",
        ConvertMessage((ExtendedTcpHeaderTlv((
            TcpOption(TcpOptionKind.MSS, h("05 b4")),
            TcpOption(TcpOptionKind.NOP),
            TcpOption(TcpOptionKind.WINDOW_SCALE, h("07")),
            TcpOption(TcpOptionKind.MPTCP, h("01 81 00 11 22 33 44 55 66 77")))),)),
        id="extended-tcp-header"),
    pytest.param(
        CONVERTER,
        "01 02 22 63 1e 01 60 00",
        ConvertMessage((ErrorTlv(E.CONNECTION_RESET, h("00")),)),
        id="error-connection-reset"),
    pytest.param(
        CONVERTER,
        "01 02 22 63 1e 01 00 01",
        ConvertMessage((ErrorTlv(E.UNSUPPORTED_VERSION, h("01")),)),
        id="error-unsupported-version"),
    pytest.param(
        CONVERTER,
        "01 04 22 63 1e 03 03 00 01 02 03 04 05 06 07 08",
        ConvertMessage((ErrorTlv(E.MISSING_COOKIE, h("00") + COOKIE_8),)),
        id="error-missing-cookie"),
    pytest.param(
        CONVERTER,
        "01 03 22 63 1e 02 21 1d 1e 00 00 00",
        ConvertMessage((ErrorTlv(E.UNSUPPORTED_TCP_OPTION, h("1d 1e 00 00 00")),)),
        id="error-unsupported-tcp-options"),
    pytest.param(
        CONVERTER,
        "01 02 22 63 1e 01 c8 07",
        ConvertMessage((ErrorTlv(200, h("07")),)),
        id="error-unregistered-code"),
    pytest.param(
        CONVERTER,
        "01 05 22 63 15 02 00 00 1e 00 00 00 1e 01 61 01 14 01 00 00",
        ConvertMessage((SupportedTcpExtTlv((30,)),
                        ErrorTlv.destination_unreachable(1),
                        ExtendedTcpHeaderTlv(()))),
        id="several-converter-tlvs"),
]


@pytest.mark.parametrize(("sender", "wire", "expected"), VECTORS)
def test_vector_decodes_to_dataclasses(sender: ConvertSender, wire: str,
                                       expected: ConvertMessage) -> None:
    data = h(wire)
    message, consumed = decode_message(data, sender)
    assert message == expected
    assert consumed == len(data)


@pytest.mark.parametrize(("sender", "wire", "expected"), VECTORS)
def test_vector_encodes_to_the_same_bytes(sender: ConvertSender, wire: str,
                                          expected: ConvertMessage) -> None:
    assert encode_message(expected, sender) == h(wire)
    assert expected.total_words * WORD == len(h(wire))


@pytest.mark.parametrize(("sender", "wire", "expected"), VECTORS)
def test_vector_followed_by_application_data(sender: ConvertSender, wire: str,
                                             expected: ConvertMessage) -> None:
    data = h(wire) + APP_DATA
    message, consumed = decode_message(data, sender)
    assert message == expected
    assert data[consumed:] == APP_DATA


@pytest.mark.parametrize(("sender", "wire", "expected"), VECTORS)
def test_vector_trickled_one_byte_at_a_time(sender: ConvertSender, wire: str,
                                            expected: ConvertMessage) -> None:
    data = h(wire)
    decoder = ConvertDecoder(sender)
    for index, byte in enumerate(data[:-1]):
        assert decoder.feed(bytes((byte,))) is None, f"complete after {index + 1} bytes"
        assert not decoder.done
    assert decoder.feed(data[-1:] + APP_DATA[:5]) == expected
    assert decoder.done and decoder.message == expected
    assert decoder.leftover == APP_DATA[:5]
    assert decoder.received == data
    decoder.feed_eof()  # a close after the message is fine


@pytest.mark.parametrize(("sender", "wire", "expected"), VECTORS)
def test_every_strict_prefix_needs_more(sender: ConvertSender, wire: str,
                                        expected: ConvertMessage) -> None:
    data = h(wire)
    for cut in range(len(data)):
        with pytest.raises(IncompleteConvertMessage) as info:
            decode_message(data[:cut], sender)
        assert cut < info.value.needed <= len(data)


def test_whole_message_in_one_segment_with_data() -> None:
    decoder = ConvertDecoder(CLIENT)
    wire = h("01 06 22 63" + CONNECT_V4)
    assert decoder.feed(wire + APP_DATA) == ConvertMessage((CONNECT_V4_TLV,))
    assert decoder.leftover == APP_DATA


def test_header_split_across_segments() -> None:
    wire = h("01 06 22 63" + CONNECT_V4)
    decoder = ConvertDecoder(CLIENT)
    assert decoder.feed(wire[:3]) is None
    assert decoder.feed(wire[3:10]) is None
    assert decoder.feed(wire[10:] + APP_DATA) == ConvertMessage((CONNECT_V4_TLV,))
    assert decoder.leftover == APP_DATA


def test_feed_after_completion_is_a_local_error() -> None:
    decoder = ConvertDecoder(CONVERTER)
    decoder.feed(h("01 01 22 63"))
    with pytest.raises(RuntimeError):
        decoder.feed(b"more")


def test_decode_accepts_bytearray_and_memoryview() -> None:
    wire = h("01 06 22 63" + CONNECT_V4) + APP_DATA
    expected = (ConvertMessage((CONNECT_V4_TLV,)), len(wire) - len(APP_DATA))
    assert decode_message(bytearray(wire), CLIENT) == expected
    assert decode_message(memoryview(wire), CLIENT) == expected


# --------------------------------------------------------------------------
# Round trips for every TLV type
# --------------------------------------------------------------------------

ROUND_TRIPS = [
    pytest.param(CLIENT, (InfoTlv(),), id="info"),
    pytest.param(CLIENT, (ConnectTlv(1, ip("::2")),), id="connect-ipv6-port-1"),
    pytest.param(CLIENT, (ConnectTlv(65535, ip("203.0.113.9"), (
        TcpOption(TcpOptionKind.MSS, h("05 b4")),
        TcpOption(TcpOptionKind.SACK_PERMITTED),
        TcpOption(TcpOptionKind.TIMESTAMPS, bytes(8)),
        TcpOption(TcpOptionKind.WINDOW_SCALE, h("07")))),), id="connect-all-syn-options"),
    pytest.param(CLIENT, (ConnectTlv(443, ip("192.0.2.1"),
                                     (TcpOption(253, bytes(range(253))),)),),
                 id="connect-longest-option"),
    pytest.param(CLIENT, (InfoTlv(), CookieTlv(bytes(range(16)))), id="info-cookie"),
    pytest.param(CONVERTER, (ExtendedTcpHeaderTlv((TcpOption(TcpOptionKind.NOP),) * 3),),
                 id="extended-header-nops"),
    pytest.param(CONVERTER, (SupportedTcpExtTlv(tuple(range(3, 256))),),
                 id="supported-every-kind"),
    pytest.param(CONVERTER, (SupportedTcpExtTlv(()),), id="supported-none"),
    pytest.param(CONVERTER, (ErrorTlv.malformed(b"\x01" * 5000),), id="error-largest"),
]


@pytest.mark.parametrize(("sender", "tlvs"), ROUND_TRIPS)
def test_round_trip(sender: ConvertSender, tlvs: tuple) -> None:
    message = ConvertMessage(tlvs)
    wire = encode_message(message, sender)
    assert len(wire) % WORD == 0
    assert wire[1] * WORD == len(wire)
    assert decode_message(wire + APP_DATA, sender) == (message, len(wire))
    assert b"".join(encode_tlv(tlv) for tlv in tlvs) == wire[HEADER_LEN:]


def test_largest_message_fills_total_length() -> None:
    wire = encode_message(ConvertMessage((ErrorTlv.malformed(bytes(5000)),)))
    assert len(wire) == MAX_MESSAGE_LEN
    assert wire[1] == MAX_TOTAL_WORDS


def test_ipv4_mapped_connect_address_is_normalized() -> None:
    mapped = ConnectTlv(80, ip("::ffff:192.0.2.1"))
    assert mapped == ConnectTlv(80, ip("192.0.2.1"))
    assert mapped.address == ipaddress.IPv4Address("192.0.2.1")
    assert mapped.address_bytes == h("00 00 00 00 00 00 00 00 00 00 ff ff c0 00 02 01")


def test_zero_and_unassigned_fields_are_ignored_on_receipt() -> None:
    # Info Zero, Cookie Zero, Supported/Extended Unassigned set to 0xffff by a peer.
    client, _ = decode_message(h("01 0a 22 63 01 01 ff ff" + CONNECT_V4
                                 + "16 03 ff ff 01 02 03 04 05 06 07 08"), CLIENT)
    assert client == ConvertMessage((InfoTlv(), CONNECT_V4_TLV, CookieTlv(COOKIE_8)))
    assert encode_message(client)[4:8] == h("01 01 00 00")  # written back as zero
    converter, _ = decode_message(h("01 04 22 63 15 01 ab cd 14 02 ab cd 02 04 05 b4"),
                                  CONVERTER)
    assert converter == ConvertMessage((
        SupportedTcpExtTlv(()),
        ExtendedTcpHeaderTlv((TcpOption(TcpOptionKind.MSS, h("05 b4")),))))


def test_message_accessors() -> None:
    message = ConvertMessage((InfoTlv(), CONNECT_V4_TLV, CookieTlv(COOKIE_8)))
    assert message.info == InfoTlv()
    assert message.connect == CONNECT_V4_TLV
    assert message.cookie == CookieTlv(COOKIE_8)
    assert message.error is None and message.supported_tcp_ext is None
    assert message.extended_tcp_header is None
    assert message.find(ConvertTlvType.CONNECT) is CONNECT_V4_TLV
    assert message.get(CookieTlv) == CookieTlv(COOKIE_8)
    assert message.find(200) is None and message.get(PrivateTlv) is None
    assert not CONNECT_V4_TLV.extended
    assert ConnectTlv(80, ip("::3"), (TcpOption(30, h("01 81")),)).extended


def test_extended_tcp_header_reports_mptcp() -> None:
    assert ExtendedTcpHeaderTlv((TcpOption(TcpOptionKind.MPTCP, h("01 81")),)).mptcp_capable
    assert not ExtendedTcpHeaderTlv((TcpOption(TcpOptionKind.MSS, h("05 b4")),)).mptcp_capable


# --------------------------------------------------------------------------
# Error TLV builders and accessors (RFC 8803 §4.2.8)
# --------------------------------------------------------------------------

@pytest.mark.parametrize(("tlv", "wire"), [
    (ErrorTlv.unsupported_version(), "1e 01 00 01"),
    (ErrorTlv.unsupported_version([1, 2]), "1e 02 00 01 02 00 00 00"),
    (ErrorTlv.malformed(), "1e 01 01 00"),
    (ErrorTlv.malformed(h("01 01 22 63")), "1e 02 01 01 01 22 63 00"),
    (ErrorTlv.unsupported_message(h("01 02 22 63 2a")), "1e 02 02 01 02 22 63 2a"),
    (ErrorTlv.missing_cookie(COOKIE_8), "1e 03 03 00 01 02 03 04 05 06 07 08"),
    (ErrorTlv.not_authorized(), "1e 01 20 00"),
    (ErrorTlv.unsupported_tcp_option([TcpOptionKind.TCP_AO]), "1e 01 21 1d"),
    (ErrorTlv.resource_exceeded(60), "1e 01 40 3c"),
    (ErrorTlv.resource_exceeded(), "1e 01 40 00"),
    (ErrorTlv.network_failure(5), "1e 01 41 05"),
    (ErrorTlv.connection_reset(), "1e 01 60 00"),
    (ErrorTlv.destination_unreachable(1), "1e 01 61 01"),
])
def test_error_builders_encode(tlv: ErrorTlv, wire: str) -> None:
    assert tlv.encode() == h(wire)
    message = ConvertMessage((tlv,))
    assert decode_message(message.encode(), CONVERTER) == (message, len(message.encode()))


def test_error_accessors_read_the_value_per_code() -> None:
    assert ErrorTlv.unsupported_version([1, 2]).supported_versions == (1, 2)
    assert ErrorTlv.unsupported_tcp_option([29, 30]).refused_option_kinds == (29, 30)
    assert ErrorTlv.missing_cookie(COOKIE_8).cookie == COOKIE_8
    assert ErrorTlv.resource_exceeded(60).retry_delay_s == 60
    assert ErrorTlv.network_failure(7).retry_delay_s == 7
    assert ErrorTlv.destination_unreachable(3).icmp_code == 3
    assert ErrorTlv.malformed(h("01 01 22 63")).echo == h("01 01 22 63 00")
    reset = ErrorTlv.connection_reset()
    assert reset.known_code is E.CONNECTION_RESET
    assert (reset.supported_versions, reset.cookie, reset.refused_option_kinds,
            reset.retry_delay_s, reset.icmp_code, reset.echo) == (None,) * 6
    assert ErrorTlv(200).known_code is None


def test_malformed_echo_is_cut_to_fit_a_message() -> None:
    tlv = ErrorTlv.malformed(bytes(range(256)) * 8)
    assert len(tlv.value) == MAX_ERROR_VALUE_LEN
    assert len(ConvertMessage((tlv,)).encode()) == MAX_MESSAGE_LEN


# --------------------------------------------------------------------------
# The bad-input matrix: exact error code (and class) for every rule
# --------------------------------------------------------------------------

MALFORMED_MATRIX = [
    # Fixed header (RFC 8803 §4.1)
    ("total-length-0", CLIENT, "01 00 22 63" + CONNECT_V4, E.MALFORMED_MESSAGE),
    ("total-length-1-from-client", CLIENT, "01 01 22 63", E.MALFORMED_MESSAGE),
    ("total-length-1-then-data", CLIENT, "01 01 22 63 47 45 54 20", E.MALFORMED_MESSAGE),
    ("version-2", CLIENT, "02 06 22 63" + CONNECT_V4, E.UNSUPPORTED_VERSION),
    ("version-0-reserved", CLIENT, "00 06 22 63" + CONNECT_V4, E.UNSUPPORTED_VERSION),
    ("version-2-from-converter", CONVERTER, "02 01 22 63", E.UNSUPPORTED_VERSION),
    ("tls-client-hello", CLIENT, "16 03 01 02 00 01 00 01 fc 03 03", E.UNSUPPORTED_VERSION),
    ("bad-magic", CLIENT, "01 06 22 64" + CONNECT_V4, E.MALFORMED_MESSAGE),
    ("http-request", CLIENT, "01 06 47 45 54 20", E.MALFORMED_MESSAGE),
    # Generic TLV framing (RFC 8803 §4.2.1)
    ("tlv-length-0", CLIENT, "01 02 22 63 01 00 00 00", E.MALFORMED_MESSAGE),
    ("tlv-length-0-type-0", CLIENT, "01 02 22 63 00 00 00 00", E.MALFORMED_MESSAGE),
    ("tlv-past-total-length", CLIENT, "01 02 22 63" + CONNECT_V4, E.MALFORMED_MESSAGE),
    ("tlv-one-word-past-end", CLIENT,
     "01 06 22 63 0a 06 01 bb 00 00 00 00 00 00 00 00 00 00 ff ff c0 00 02 01 00 00 00 00",
     E.MALFORMED_MESSAGE),
    ("duplicate-connect", CLIENT, "01 0b 22 63" + CONNECT_V4 + CONNECT_V4, E.MALFORMED_MESSAGE),
    ("duplicate-info", CLIENT, "01 03 22 63 01 01 00 00 01 01 00 00", E.MALFORMED_MESSAGE),
    ("duplicate-error", CONVERTER, "01 03 22 63 1e 01 60 00 1e 01 61 00", E.MALFORMED_MESSAGE),
    ("type-0", CLIENT, "01 07 22 63 00 01 00 00" + CONNECT_V4, E.UNSUPPORTED_MESSAGE),
    ("unknown-type-42", CLIENT, "01 07 22 63 2a 01 00 00" + CONNECT_V4, E.UNSUPPORTED_MESSAGE),
    ("spec-required-type-128", CLIENT, "01 07 22 63 80 01 00 00" + CONNECT_V4,
     E.UNSUPPORTED_MESSAGE),
    ("private-type-200", CLIENT, "01 07 22 63 c8 01 00 00" + CONNECT_V4, E.UNSUPPORTED_MESSAGE),
    ("private-type-255-converter", CONVERTER, "01 02 22 63 ff 01 00 00", E.UNSUPPORTED_MESSAGE),
    # Direction (RFC 8803 §4.2.2)
    ("error-from-client", CLIENT, "01 07 22 63 1e 01 60 00" + CONNECT_V4, E.UNSUPPORTED_MESSAGE),
    ("supported-ext-from-client", CLIENT, "01 07 22 63 15 01 00 00" + CONNECT_V4,
     E.UNSUPPORTED_MESSAGE),
    ("extended-header-from-client", CLIENT, "01 07 22 63 14 01 00 00" + CONNECT_V4,
     E.UNSUPPORTED_MESSAGE),
    ("connect-from-converter", CONVERTER, "01 06 22 63" + CONNECT_V4, E.UNSUPPORTED_MESSAGE),
    ("info-from-converter", CONVERTER, "01 02 22 63 01 01 00 00", E.UNSUPPORTED_MESSAGE),
    ("cookie-from-converter", CONVERTER, "01 03 22 63 16 02 00 00 01 02 03 04",
     E.UNSUPPORTED_MESSAGE),
    ("cookie-without-connect", CLIENT, "01 03 22 63 16 02 00 00 01 02 03 04",
     E.MALFORMED_MESSAGE),
    # Info (RFC 8803 §4.2.3) and Cookie (§4.2.7)
    ("info-length-2", CLIENT, "01 08 22 63 01 02 00 00 00 00 00 00" + CONNECT_V4,
     E.MALFORMED_MESSAGE),
    ("cookie-empty", CLIENT, "01 07 22 63 16 01 00 00" + CONNECT_V4, E.MALFORMED_MESSAGE),
    # Connect (RFC 8803 §4.2.5)
    ("connect-length-1", CLIENT, "01 02 22 63 0a 01 01 bb", E.MALFORMED_MESSAGE),
    ("connect-length-4", CLIENT,
     "01 05 22 63 0a 04 01 bb 00 00 00 00 00 00 00 00 00 00 ff ff", E.MALFORMED_MESSAGE),
    ("connect-port-0", CLIENT,
     "01 06 22 63 0a 05 00 00 00 00 00 00 00 00 00 00 00 00 ff ff c0 00 02 01",
     E.MALFORMED_MESSAGE),
    ("connect-nop-option", CLIENT, "01 07 22 63 0a 06" + CONNECT_V4[5:] + " 01 22 02 00",
     E.MALFORMED_MESSAGE),
    ("connect-eol-before-option", CLIENT, "01 07 22 63 0a 06" + CONNECT_V4[5:] + " 00 22 02 00",
     E.MALFORMED_MESSAGE),
    ("connect-nonzero-after-eol", CLIENT, "01 07 22 63 0a 06" + CONNECT_V4[5:] + " 22 02 00 01",
     E.MALFORMED_MESSAGE),
    ("connect-whole-word-padding", CLIENT,
     "01 07 22 63 0a 06" + CONNECT_V4[5:] + " 00 00 00 00", E.MALFORMED_MESSAGE),
    ("connect-option-length-0", CLIENT, "01 07 22 63 0a 06" + CONNECT_V4[5:] + " 1e 00 00 00",
     E.MALFORMED_MESSAGE),
    ("connect-option-length-1", CLIENT, "01 07 22 63 0a 06" + CONNECT_V4[5:] + " 22 01 00 00",
     E.MALFORMED_MESSAGE),
    ("connect-option-past-tlv", CLIENT, "01 07 22 63 0a 06" + CONNECT_V4[5:] + " 1e 08 01 81",
     E.MALFORMED_MESSAGE),
    ("connect-option-without-length", CLIENT,
     "01 07 22 63 0a 06" + CONNECT_V4[5:] + " 03 03 07 1e", E.MALFORMED_MESSAGE),
    # Supported TCP Extensions (RFC 8803 §4.2.4)
    ("supported-lists-nop", CONVERTER, "01 03 22 63 15 02 00 00 01 1e 00 00",
     E.MALFORMED_MESSAGE),
    ("supported-lists-mss", CONVERTER, "01 03 22 63 15 02 00 00 1e 02 00 00",
     E.MALFORMED_MESSAGE),
    ("supported-zero-between-kinds", CONVERTER, "01 03 22 63 15 02 00 00 1e 00 22 00",
     E.MALFORMED_MESSAGE),
    ("supported-kind-twice", CONVERTER, "01 03 22 63 15 02 00 00 1e 1e 00 00",
     E.MALFORMED_MESSAGE),
    ("supported-whole-word-padding", CONVERTER,
     "01 04 22 63 15 03 00 00 1e 00 00 00 00 00 00 00", E.MALFORMED_MESSAGE),
    # Extended TCP Header (RFC 8803 §4.2.6)
    ("extended-eol-before-option", CONVERTER, "01 03 22 63 14 02 00 00 00 01 01 01",
     E.MALFORMED_MESSAGE),
    ("extended-option-length-1", CONVERTER, "01 03 22 63 14 02 00 00 02 01 05 b4",
     E.MALFORMED_MESSAGE),
    ("extended-option-past-tlv", CONVERTER, "01 03 22 63 14 02 00 00 02 06 05 b4",
     E.MALFORMED_MESSAGE),
]

MATRIX_PARAMS = [pytest.param(sender, wire, code, id=name)
                 for name, sender, wire, code in MALFORMED_MATRIX]


@pytest.mark.parametrize(("sender", "wire", "code"), MATRIX_PARAMS)
def test_bad_input_gets_its_error_code(sender: ConvertSender, wire: str,
                                       code: ConvertErrorCode) -> None:
    with pytest.raises(ConvertProtocolError) as info:
        decode_message(h(wire), sender)
    assert info.value.code is code


@pytest.mark.parametrize(("sender", "wire", "code"), MATRIX_PARAMS)
def test_bad_input_trickled_gets_the_same_code(sender: ConvertSender, wire: str,
                                               code: ConvertErrorCode) -> None:
    decoder = ConvertDecoder(sender)
    data = h(wire) + APP_DATA
    with pytest.raises(ConvertProtocolError) as info:
        for byte in data:
            decoder.feed(bytes((byte,)))
    assert info.value.code is code
    with pytest.raises(ConvertProtocolError):  # the decoder stays failed
        decoder.feed(b"x")
    with pytest.raises(ConvertProtocolError):
        decoder.feed_eof()


@pytest.mark.parametrize(("sender", "wire", "code"), MATRIX_PARAMS)
def test_bad_input_gets_a_reply_that_decodes(sender: ConvertSender, wire: str,
                                             code: ConvertErrorCode) -> None:
    decoder = ConvertDecoder(sender)
    with pytest.raises(ConvertProtocolError) as info:
        decoder.feed(h(wire))
    reply = decoder.error_reply(info.value)
    assert reply.error is not None and reply.error.code is code
    assert decode_message(encode_message(reply, CONVERTER), CONVERTER)[0] == reply


def test_errors_are_raised_at_the_earliest_byte() -> None:
    with pytest.raises(UnsupportedConvertVersion) as version:
        decode_message(h("02"), CLIENT)
    assert version.value.version == 2 and version.value.supported == (1,)
    with pytest.raises(ConvertProtocolError):
        decode_message(h("01 00"), CLIENT)
    with pytest.raises(NotConvertMessage) as magic:
        decode_message(h("01 06 22 64"), CLIENT)
    assert magic.value.magic == 0x2264
    assert magic.value.code is E.MALFORMED_MESSAGE
    with pytest.raises(ConvertProtocolError) as unsupported:
        decode_message(h("01 07 22 63 2a 01"), CLIENT)  # TLV body not even here yet
    assert unsupported.value.code is E.UNSUPPORTED_MESSAGE


def test_total_length_larger_than_the_data_needs_more_then_fails_at_eof() -> None:
    wire = h("01 07 22 63" + CONNECT_V4)  # Total Length says one more word
    with pytest.raises(IncompleteConvertMessage) as info:
        decode_message(wire, CLIENT)
    assert info.value.needed == len(wire) + TLV_HEADER_PROBE
    decoder = ConvertDecoder(CLIENT)
    assert decoder.feed(wire) is None
    with pytest.raises(ConvertProtocolError) as eof:
        decoder.feed_eof()
    assert eof.value.code is E.MALFORMED_MESSAGE



def test_eof_before_any_byte_is_malformed() -> None:
    with pytest.raises(ConvertProtocolError) as info:
        ConvertDecoder(CLIENT).feed_eof()
    assert info.value.code is E.MALFORMED_MESSAGE


def test_bare_header_is_valid_only_from_the_converter() -> None:
    assert decode_message(h("01 01 22 63") + APP_DATA, CONVERTER) == (ConvertMessage(()), 4)
    with pytest.raises(ConvertProtocolError):
        decode_message(h("01 01 22 63"), CLIENT)


def test_private_types_can_be_allowed() -> None:
    wire = h("01 08 22 63 c8 02 aa bb cc dd ee ff" + CONNECT_V4)
    message, consumed = decode_message(wire, CLIENT, private_types={200})
    assert message == ConvertMessage((PrivateTlv(200, h("aa bb cc dd ee ff")), CONNECT_V4_TLV))
    assert consumed == len(wire)
    assert message.encode() == wire
    decoder = ConvertDecoder(CLIENT, private_types=[200])
    assert decoder.feed(wire) == message
    with pytest.raises(ConvertProtocolError) as other:
        decode_message(h("01 08 22 63 c9 02 aa bb cc dd ee ff" + CONNECT_V4), CLIENT,
                       private_types={200})
    assert other.value.code is E.UNSUPPORTED_MESSAGE
    with pytest.raises(ConvertProtocolError) as twice:
        decode_message(h("01 04 22 63 c8 01 00 00 c8 01 00 00 01 01 00 00"), CLIENT,
                       private_types={200})
    assert twice.value.code is E.MALFORMED_MESSAGE
    with pytest.raises(ValueError):
        decode_message(wire, CLIENT, private_types={42})  # not a private-use type


# --------------------------------------------------------------------------
# Error replies
# --------------------------------------------------------------------------

def test_error_reply_echoes_only_the_convert_message() -> None:
    wire = h("01 07 22 63 2a 01 00 00" + CONNECT_V4)
    with pytest.raises(ConvertProtocolError) as info:
        decode_message(wire + APP_DATA, CLIENT)
    reply = error_reply_for(info.value, wire + APP_DATA)
    assert reply == ConvertMessage((ErrorTlv.unsupported_message(wire),))
    assert reply.error is not None and reply.error.echo is not None
    assert reply.error.echo[:len(wire)] == wire


def test_error_reply_for_unsupported_version_lists_versions() -> None:
    with pytest.raises(ConvertProtocolError) as info:
        decode_message(h("02 01 22 63"), CLIENT)
    assert error_reply_for(info.value, h("02 01 22 63")).encode() == h("01 02 22 63 1e 01 00 01")


def test_error_reply_needs_caller_data_for_other_codes() -> None:
    with pytest.raises(ValueError):
        error_reply_for(ConvertProtocolError("refused", E.NOT_AUTHORIZED), b"")


# --------------------------------------------------------------------------
# Connect targets RFC 8803 §4.2.5 makes Malformed
# --------------------------------------------------------------------------

@pytest.mark.parametrize(("address", "kind"), [
    ("127.0.0.1", ForbiddenTarget.LOOPBACK),
    ("127.255.0.9", ForbiddenTarget.LOOPBACK),
    ("::1", ForbiddenTarget.LOOPBACK),
    ("::ffff:127.0.0.1", ForbiddenTarget.LOOPBACK),
    ("224.0.0.1", ForbiddenTarget.MULTICAST),
    ("239.1.2.3", ForbiddenTarget.MULTICAST),
    ("ff02::1", ForbiddenTarget.MULTICAST),
    ("::ffff:224.0.0.251", ForbiddenTarget.MULTICAST),
    ("255.255.255.255", ForbiddenTarget.BROADCAST),
    ("::ffff:255.255.255.255", ForbiddenTarget.BROADCAST),
    ("0.0.0.0", ForbiddenTarget.UNSPECIFIED),
    ("0.1.2.3", ForbiddenTarget.UNSPECIFIED),
    ("::", ForbiddenTarget.UNSPECIFIED),
    ("::ffff:0.0.0.0", ForbiddenTarget.UNSPECIFIED),
    ("192.0.2.1", None),
    ("2001:db8::1", None),
    ("::ffff:198.51.100.7", None),
    ("10.0.0.1", None),  # private ranges are policy, not Malformed
])
def test_classify_connect_target(address: str, kind: ForbiddenTarget | None) -> None:
    assert classify_connect_target(ip(address)) is kind
    if kind is None:
        check_connect_target(ip(address))
    else:
        with pytest.raises(ConvertProtocolError) as info:
            check_connect_target(ip(address))
        assert info.value.code is E.MALFORMED_MESSAGE


def test_mapped_loopback_connect_decodes_then_is_refused() -> None:
    wire = h("01 06 22 63 0a 05 00 50 00 00 00 00 00 00 00 00 00 00 ff ff 7f 00 00 01")
    message, _ = decode_message(wire, CLIENT)
    assert message.connect is not None
    assert message.connect.address == ipaddress.IPv4Address("127.0.0.1")
    with pytest.raises(ConvertProtocolError) as info:
        check_connect_target(message.connect.address)
    assert info.value.code is E.MALFORMED_MESSAGE


def test_classify_rejects_non_addresses() -> None:
    with pytest.raises(TypeError):
        classify_connect_target("127.0.0.1")  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Local misuse: dataclasses validate themselves
# --------------------------------------------------------------------------

@pytest.mark.parametrize("build", [
    lambda: ConnectTlv(0, ip("192.0.2.1")),
    lambda: ConnectTlv(65536, ip("192.0.2.1")),
    lambda: ConnectTlv(80, ip("192.0.2.1"), (TcpOption(TcpOptionKind.NOP),)),
    lambda: ConnectTlv(80, ip("192.0.2.1"), tuple(TcpOption(254, bytes(200)) for _ in range(5))),
    lambda: TcpOption(TcpOptionKind.EOL),
    lambda: TcpOption(256),
    lambda: TcpOption(TcpOptionKind.NOP, b"x"),
    lambda: TcpOption(30, bytes(254)),
    lambda: SupportedTcpExtTlv((TcpOptionKind.MSS,)),
    lambda: SupportedTcpExtTlv((TcpOptionKind.NOP,)),
    lambda: SupportedTcpExtTlv((0,)),
    lambda: SupportedTcpExtTlv((30, 30)),
    lambda: CookieTlv(b""),
    lambda: CookieTlv(b"abc"),
    lambda: ErrorTlv(E.NOT_AUTHORIZED, b""),
    lambda: ErrorTlv(E.NOT_AUTHORIZED, b"\x00\x00"),
    lambda: ErrorTlv(256),
    lambda: ErrorTlv(E.MALFORMED_MESSAGE, bytes(MAX_ERROR_VALUE_LEN + 4)),
    lambda: ErrorTlv.unsupported_version([]),
    lambda: ErrorTlv.unsupported_version([0]),
    lambda: ErrorTlv.unsupported_tcp_option([]),
    lambda: ErrorTlv.resource_exceeded(256),
    lambda: ErrorTlv.destination_unreachable(-1),
    lambda: ErrorTlv.missing_cookie(b"abc"),
    lambda: PrivateTlv(191),
    lambda: PrivateTlv(200, b"\x00"),
    lambda: ConvertMessage((InfoTlv(), InfoTlv())),
    lambda: ConvertMessage(tuple(PrivateTlv(t, bytes(62)) for t in range(192, 210))),
    lambda: check_sender(ConvertMessage((ErrorTlv.connection_reset(),)), CLIENT),
    lambda: check_sender(ConvertMessage((CONNECT_V4_TLV,)), CONVERTER),
    lambda: check_sender(ConvertMessage(()), CLIENT),
    lambda: encode_message(ConvertMessage((CONNECT_V4_TLV,)), CONVERTER),
])
def test_invalid_dataclass_raises_value_error(build) -> None:
    with pytest.raises(ValueError):
        build()


@pytest.mark.parametrize("build", [
    lambda: ConnectTlv(80, "192.0.2.1"),
    lambda: ConnectTlv(True, ip("192.0.2.1")),
    lambda: ConnectTlv(80, ip("192.0.2.1"), (b"\x1e\x02",)),
    lambda: TcpOption(30, "data"),
    lambda: CookieTlv(bytearray(8)),
    lambda: ConvertMessage(("not a tlv",)),
    lambda: ConvertMessage("nope"),
    lambda: encode_tlv(b"\x01\x01\x00\x00"),
    lambda: decode_message(b"", "client"),
    lambda: ConvertDecoder("client"),
])
def test_wrong_types_raise_type_error(build) -> None:
    with pytest.raises(TypeError):
        build()


def test_dataclasses_are_frozen_and_hashable() -> None:
    message = ConvertMessage([InfoTlv(), CONNECT_V4_TLV])
    assert isinstance(message.tlvs, tuple)
    assert hash(message) == hash(ConvertMessage((InfoTlv(), CONNECT_V4_TLV)))
    with pytest.raises(AttributeError):
        CONNECT_V4_TLV.port = 80  # type: ignore[misc]


# --------------------------------------------------------------------------
# Hypothesis: round trips over generated messages, fuzz, trickle equivalence
# --------------------------------------------------------------------------

FUZZ = settings(max_examples=400, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
ALLOWED_PRIVATE = frozenset({200, 255})

ipv4s = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
ipv6s = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)
option_data = st.binary(max_size=38)
tcp_options = st.builds(TcpOption, st.integers(2, 255), option_data)
nops = st.just(TcpOption(TcpOptionKind.NOP))


def whole_words(min_words: int, max_words: int, extra: int = 0) -> st.SearchStrategy[bytes]:
    return st.integers(min_words, max_words).flatmap(
        lambda n: st.binary(min_size=n * WORD + extra, max_size=n * WORD + extra))


connects = st.builds(ConnectTlv, st.integers(1, 65535), st.one_of(ipv4s, ipv6s),
                     st.lists(tcp_options, max_size=4).map(tuple))
cookies = whole_words(1, 8).map(CookieTlv)
extended_headers = st.builds(ExtendedTcpHeaderTlv,
                             st.lists(st.one_of(tcp_options, nops), max_size=6).map(tuple))
supported = st.builds(SupportedTcpExtTlv,
                      st.lists(st.integers(3, 255), unique=True, max_size=40).map(tuple))
errors = st.builds(ErrorTlv.padded, st.integers(0, 255), st.binary(max_size=60))
privates = st.builds(PrivateTlv, st.sampled_from(sorted(ALLOWED_PRIVATE)), whole_words(0, 10, 2))


@st.composite
def client_messages(draw: st.DrawFn, with_private: bool = False) -> ConvertMessage:
    tlvs = []
    kinds = draw(st.sampled_from(["connect", "info", "both"]))
    if kinds in ("connect", "both"):
        tlvs.append(draw(connects))
    if kinds in ("info", "both"):
        tlvs.append(InfoTlv())
    if draw(st.booleans()):
        tlvs.append(draw(cookies))
    if with_private and draw(st.booleans()):
        tlvs.append(draw(privates))
    return ConvertMessage(tuple(draw(st.permutations(tlvs))))


@st.composite
def converter_messages(draw: st.DrawFn, with_private: bool = False) -> ConvertMessage:
    pool = [supported, extended_headers, errors] + ([privates] if with_private else [])
    chosen = [draw(strategy) for strategy in pool if draw(st.booleans())]
    return ConvertMessage(tuple(draw(st.permutations(chosen))))


senders = st.sampled_from([CLIENT, CONVERTER])


@st.composite
def sender_and_message(draw: st.DrawFn, with_private: bool = False):
    sender = draw(senders)
    strategy = client_messages if sender is CLIENT else converter_messages
    return sender, draw(strategy(with_private))


def outcome(data: bytes, sender: ConvertSender, private: frozenset[int] = frozenset()):
    """One-shot decode as a comparable value."""
    try:
        message, consumed = decode_message(data, sender, private_types=private)
    except IncompleteConvertMessage:
        return ("more",)
    except ConvertProtocolError as error:
        return ("error", type(error), error.code, str(error))
    return ("message", message, data[consumed:])


def chunked_outcome(data: bytes, cuts: list[int], sender: ConvertSender,
                    private: frozenset[int] = frozenset()):
    """The same stream through ConvertDecoder, split at ``cuts``."""
    decoder = ConvertDecoder(sender, private_types=private)
    bounds = [0, *sorted(set(cut for cut in cuts if 0 < cut < len(data))), len(data)]
    for start, end in zip(bounds, bounds[1:]):
        try:
            message = decoder.feed(data[start:end])
        except ConvertProtocolError as error:
            return ("error", type(error), error.code, str(error))
        if message is not None:
            return ("message", message, decoder.leftover + data[end:])
    return ("more",)


@FUZZ
@given(sender_and_message(with_private=True), st.binary(max_size=40))
def test_generated_messages_round_trip(pair, trailing: bytes) -> None:
    sender, message = pair
    wire = encode_message(message, sender)
    assert len(wire) == message.total_words * WORD <= MAX_MESSAGE_LEN
    decoded, consumed = decode_message(wire + trailing, sender, private_types=ALLOWED_PRIVATE)
    assert decoded == message
    assert consumed == len(wire)
    assert decoded.encode() == wire


@FUZZ
@given(sender_and_message(), st.binary(max_size=20), st.lists(st.integers(0, 1100), max_size=12))
def test_generated_messages_fed_in_any_chunks(pair, trailing: bytes, cuts: list[int]) -> None:
    sender, message = pair
    data = encode_message(message) + trailing
    assert chunked_outcome(data, cuts, sender) == ("message", message, trailing)


@FUZZ
@given(sender_and_message())
def test_generated_message_prefixes_need_more(pair) -> None:
    sender, message = pair
    wire = message.encode()
    for cut in range(len(wire)):
        with pytest.raises(IncompleteConvertMessage) as info:
            decode_message(wire[:cut], sender)
        assert cut < info.value.needed <= len(wire)


def check_only_codec_errors(data: bytes, sender: ConvertSender, private: frozenset[int]) -> None:
    """The decoder's contract on any input."""
    try:
        message, consumed = decode_message(data, sender, private_types=private)
    except (NeedMoreData, ProtocolError) as error:
        assert isinstance(error, (IncompleteConvertMessage, ConvertProtocolError))
        if isinstance(error, ConvertProtocolError):
            assert isinstance(error.code, ConvertErrorCode)
            reply = error_reply_for(error, data)  # the converter can always answer
            assert decode_message(reply.encode(), CONVERTER)[0] == reply
        return
    # Success: canonical re-encoding has the same length and decodes the same.
    assert 0 < consumed <= min(len(data), MAX_MESSAGE_LEN)
    assert consumed % WORD == 0
    wire = message.encode()
    assert len(wire) == consumed
    assert decode_message(wire, sender, private_types=private) == (message, consumed)


header_prefixed = st.builds(
    lambda words, body: struct.pack("!BBH", VERSION, words, MAGIC) + body,
    st.integers(0, 255), st.binary(max_size=1100))


@FUZZ
@given(st.one_of(st.binary(max_size=1100), header_prefixed), senders,
       st.sampled_from([frozenset(), ALLOWED_PRIVATE]))
def test_fuzz_random_bytes_raise_only_codec_errors(data: bytes, sender: ConvertSender,
                                                   private: frozenset[int]) -> None:
    check_only_codec_errors(data, sender, private)


# Positions are drawn from a wide range so that, taken modulo the length, they
# spread over the whole message instead of clustering on the first bytes.
mutations = st.lists(st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "cut"]),
                               st.integers(0, 2**32), st.integers(0, 255)),
                     min_size=1, max_size=4)


def mutate(data: bytes, edits) -> bytes:
    buf = bytearray(data)
    for op, position, value in edits:
        index = position % (len(buf) + 1)
        if op == "insert":
            buf.insert(index, value)
        elif not buf:
            continue
        elif op == "cut":
            del buf[index:]
        else:
            index %= len(buf)
            if op == "flip":
                buf[index] ^= 1 << (value % 8)
            elif op == "set":
                buf[index] = value
            else:
                del buf[index]
    return bytes(buf)


@st.composite
def mutated_messages(draw: st.DrawFn) -> bytes:
    """A valid message, edited: anywhere, or only after a header kept valid.

    Half of the body-only edits also fix Total Length up to the new size, so
    the TLV parser (not the Total Length check) meets the damage.
    """
    _, message = draw(sender_and_message(with_private=True))
    wire = message.encode() + draw(st.sampled_from([b"", APP_DATA[:8]]))
    edits = draw(mutations)
    if draw(st.booleans()):
        return mutate(wire, edits)
    body = mutate(wire[HEADER_LEN:message.total_words * WORD], edits)
    words = message.total_words
    if draw(st.booleans()):
        words = min(MAX_TOTAL_WORDS, max(1, (HEADER_LEN + len(body) + WORD - 1) // WORD))
    return struct.pack("!BBH", VERSION, words, MAGIC) + body


@FUZZ
@given(mutated_messages(), senders, st.sampled_from([frozenset(), ALLOWED_PRIVATE]))
def test_fuzz_mutated_messages_raise_only_codec_errors(data: bytes, decode_as: ConvertSender,
                                                       private: frozenset[int]) -> None:
    check_only_codec_errors(data, decode_as, private)


@FUZZ
@given(st.one_of(header_prefixed,
                 sender_and_message().map(lambda pair: pair[1].encode() + APP_DATA[:6]),
                 mutated_messages()),
       senders, st.lists(st.integers(0, 1100), max_size=16))
def test_chunked_feeding_matches_one_shot_decoding(data: bytes, sender: ConvertSender,
                                                   cuts: list[int]) -> None:
    assert chunked_outcome(data, cuts, sender) == outcome(data, sender)


@FUZZ
@given(st.one_of(header_prefixed,
                 mutated_messages()),
       senders, st.binary(min_size=1, max_size=64))
def test_errors_do_not_depend_on_what_follows(data: bytes, sender: ConvertSender,
                                              suffix: bytes) -> None:
    first = outcome(data, sender)
    assume(first[0] == "error")
    assert outcome(data + suffix, sender) == first


# --------------------------------------------------------------------------
# The fast path for header + one base Connect TLV (the common message)
# --------------------------------------------------------------------------

BASE_CONNECT_PREFIX = struct.pack("!BBHBB", VERSION, 6, MAGIC, ConvertTlvType.CONNECT, 5)


def general_outcome(data: bytes, sender: ConvertSender, private: frozenset[int] = frozenset()):
    """What the general path (no fast path) makes of ``data``, as a comparable value."""
    try:
        message, consumed = decode_general(bytes(data[:MAX_MESSAGE_LEN]), sender, private)
    except IncompleteConvertMessage as incomplete:
        return ("more", incomplete.needed)
    except ConvertProtocolError as error:
        return ("error", type(error), error.code, str(error))
    return ("message", message, consumed)


def full_outcome(data, sender: ConvertSender, private: frozenset[int] = frozenset()):
    try:
        message, consumed = decode_message(data, sender, private_types=private)
    except IncompleteConvertMessage as incomplete:
        return ("more", incomplete.needed)
    except ConvertProtocolError as error:
        return ("error", type(error), error.code, str(error))
    return ("message", message, consumed)


base_connect_like = st.builds(
    lambda body, tail: BASE_CONNECT_PREFIX + body + tail,
    st.one_of(st.binary(min_size=18, max_size=18),
              st.builds(lambda port, rest: port + rest,
                        st.sampled_from([b"\x00\x00", b"\x00\x01", b"\xff\xff", b"\x01\xbb"]),
                        st.one_of(st.binary(min_size=16, max_size=16),
                                  st.binary(min_size=4, max_size=4).map(
                                      lambda v4: bytes(10) + b"\xff\xff" + v4)))),
    st.binary(max_size=12))


@FUZZ
@given(st.one_of(base_connect_like,
                 base_connect_like.map(lambda data: data[:len(data) // 2]),
                 mutated_messages(),
                 header_prefixed,
                 st.binary(max_size=40)),
       senders, st.sampled_from([frozenset(), ALLOWED_PRIVATE]),
       st.sampled_from([bytes, bytearray, memoryview]))
def test_fast_path_decodes_exactly_like_the_general_path(data: bytes, sender: ConvertSender,
                                                         private: frozenset[int],
                                                         kind) -> None:
    """Same message (and consumed length), same need-more, same error class, code and text."""
    assert full_outcome(kind(data), sender, private) == general_outcome(data, sender, private)


@pytest.mark.parametrize("address", ["192.0.2.1", "2001:db8::1", "::ffff:198.51.100.7",
                                     "::", "::1", "0.0.0.0"])
@pytest.mark.parametrize("port", [1, 443, 65535])
def test_fast_path_message_equals_the_constructed_one(address: str, port: int) -> None:
    built = ConvertMessage((ConnectTlv(port, ip(address)),))
    wire = built.encode()
    assert wire.startswith(BASE_CONNECT_PREFIX) and len(wire) == 24
    message, consumed = decode_message(wire + APP_DATA, CLIENT)
    assert (message, consumed) == (built, 24)
    assert hash(message) == hash(built)
    connect = message.connect
    assert type(connect.address) is type(built.connect.address)
    assert connect.options == () and not connect.extended
    assert message.encode() == wire


def test_fast_path_leaves_port_0_to_the_general_path() -> None:
    wire = BASE_CONNECT_PREFIX + bytes(2) + bytes(10) + b"\xff\xff" + bytes((192, 0, 2, 1))
    with pytest.raises(ConvertProtocolError) as info:
        decode_message(wire, CLIENT)
    assert info.value.code is E.MALFORMED_MESSAGE and "port 0" in str(info.value)


def test_fast_path_is_only_for_client_messages() -> None:
    wire = ConvertMessage((CONNECT_V4_TLV,)).encode()
    with pytest.raises(ConvertProtocolError) as info:
        decode_message(wire, CONVERTER)
    assert info.value.code is E.UNSUPPORTED_MESSAGE


def test_decoded_dataclasses_stay_frozen() -> None:
    message, _ = decode_message(ConvertMessage((CONNECT_V4_TLV,)).encode(), CLIENT)
    with pytest.raises(AttributeError):
        message.connect.port = 80  # type: ignore[misc]
    with pytest.raises(AttributeError):
        message.tlvs = ()  # type: ignore[misc]


def test_base_connect_takes_the_fast_path(monkeypatch) -> None:
    from mptcp_proxy.wire import convert as codec

    def general(*args):
        raise AssertionError("the common message went the general way")

    monkeypatch.setattr(codec, "_decode_message_general", general)
    wire = ConvertMessage((CONNECT_V4_TLV,)).encode()
    assert decode_message(wire, CLIENT) == (ConvertMessage((CONNECT_V4_TLV,)), len(wire))
    decoder = ConvertDecoder(CLIENT)
    assert decoder.feed(wire + APP_DATA) == ConvertMessage((CONNECT_V4_TLV,))
    assert decoder.leftover == APP_DATA and decoder.received == wire


def test_base_connect_messages_are_remembered_by_their_bytes(monkeypatch) -> None:
    from mptcp_proxy.wire import convert as codec

    monkeypatch.setattr(codec, "_MESSAGE_MEMO_SIZE", 2)
    monkeypatch.setattr(codec, "_BASE_CONNECT_MESSAGES", {})
    wire = ConvertMessage((CONNECT_V4_TLV,)).encode()
    first, _ = decode_message(wire + APP_DATA, CLIENT)
    again, used = decode_message(bytearray(wire), CLIENT)
    assert again is first and used == len(wire)
    for port in (1, 2, 3):
        decode_message(ConvertMessage((ConnectTlv(port, CONNECT_V4_TLV.address),)).encode(),
                       CLIENT)
        assert len(codec._BASE_CONNECT_MESSAGES) <= 2
    # Nothing but a valid base Connect is remembered (port 0 is Malformed).
    with pytest.raises(ConvertProtocolError):
        decode_message(BASE_CONNECT_PREFIX + bytes(22), CLIENT)
    with pytest.raises(ConvertProtocolError):
        decode_message(BASE_CONNECT_PREFIX + bytes(22), CLIENT)


def test_bad_private_types_are_refused_before_the_fast_path() -> None:
    wire = ConvertMessage((CONNECT_V4_TLV,)).encode()
    decode_message(wire, CLIENT)  # remembered now
    with pytest.raises(ValueError):
        decode_message(wire, CLIENT, private_types={42})
