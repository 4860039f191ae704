"""RFC 8803 client handshake (sans-IO): request vectors, every converter answer fed whole
and one byte at a time, every Error code as a typed refusal, the MPTCP target cache.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mptcp_proxy.errors import ProtocolError
from mptcp_proxy.modes.convert_client import (
    MP_CAPABLE_SYN_OPTION,
    REFUSALS,
    ClientState,
    ConvertAccepted,
    ConvertClientHandshake,
    ConvertRefused,
    MptcpTargetCache,
    RefusedConnectionReset,
    RefusedDestinationUnreachable,
    RefusedMalformedMessage,
    RefusedMissingCookie,
    RefusedNetworkFailure,
    RefusedNotAuthorized,
    RefusedResourceExceeded,
    RefusedUnsupportedMessage,
    RefusedUnsupportedTcpOption,
    RefusedUnsupportedVersion,
    refusal_for,
    target_key,
)
from mptcp_proxy.wire.convert import (
    ConnectTlv,
    ConvertErrorCode,
    ConvertMessage,
    ConvertProtocolError,
    ConvertSender,
    CookieTlv,
    ErrorTlv,
    ExtendedTcpHeaderTlv,
    InfoTlv,
    NotConvertMessage,
    SupportedTcpExtTlv,
    TcpOption,
    TcpOptionKind,
    UnsupportedConvertVersion,
    decode_message,
    encode_message,
)

E = ConvertErrorCode
TARGET = ("192.0.2.1", 443)


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


def reply(*tlvs) -> bytes:
    return encode_message(ConvertMessage(tuple(tlvs)))


def trickle(handshake: ConvertClientHandshake, data: bytes):
    """Feed one byte at a time; return the first non-None result and the bytes left unfed."""
    for i in range(len(data)):
        result = handshake.feed(data[i:i + 1])
        if result is not None:
            return result, data[i + 1:]
    return None, b""


def read_like_a_socket(handshake: ConvertClientHandshake, stream: bytes):
    """What a blocking caller does: read at most ``wanted`` bytes each time."""
    pos = 0
    while True:
        want = handshake.wanted
        assert want > 0
        chunk = stream[pos:pos + want]
        pos += len(chunk)
        if not chunk:
            handshake.feed_eof()
            return None, stream[pos:]
        result = handshake.feed(chunk)
        if result is not None:
            return result, stream[pos:]


# --------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------

def test_connect_request_vector_ipv4():
    hs = ConvertClientHandshake(TARGET)
    assert hs.request_bytes() == h("""
        01 06 2263
        0a 05 01bb 00000000 00000000 0000ffff c0000201
    """)
    assert hs.request == ConvertMessage((ConnectTlv(443, ipaddress.ip_address("192.0.2.1")),))
    assert hs.target == (ipaddress.IPv4Address("192.0.2.1"), 443)
    assert hs.state is ClientState.AWAIT_REPLY


def test_connect_request_vector_ipv6_with_cookie_and_mp_capable():
    hs = ConvertClientHandshake(("2001:db8::7", 8080), cookie=b"COOK",
                                extended_options=(MP_CAPABLE_SYN_OPTION,))
    assert hs.request_bytes() == h("""
        01 09 2263
        0a 06 1f90 20010db8 00000000 00000000 00000007 1e04 0101
        16 02 0000 434f4f4b
    """)
    decoded, used = decode_message(hs.request_bytes(), ConvertSender.CLIENT)
    assert decoded == hs.request and used == len(hs.request_bytes())
    assert decoded.connect.extended


def test_info_request_vector():
    hs = ConvertClientHandshake(None)
    assert hs.request_bytes() == h("01 02 2263 01 01 0000")
    assert hs.request.info == InfoTlv()
    assert hs.target is None


def test_ipv4_mapped_target_travels_as_ipv4():
    assert (ConvertClientHandshake(("::ffff:192.0.2.1", 443)).request_bytes()
            == ConvertClientHandshake(TARGET).request_bytes())


@pytest.mark.parametrize("target, error", [
    (("example.com", 443), ValueError),      # Convert carries addresses, not names
    (("192.0.2.1", 0), ValueError),
    (("192.0.2.1", 65536), ValueError),
    (("192.0.2.1", True), ValueError),
    (("192.0.2.1",), TypeError),
    ("192.0.2.1:443", TypeError),
    ((42, 443), TypeError),
])
def test_bad_targets_are_local_errors(target, error):
    with pytest.raises(error):
        ConvertClientHandshake(target)


def test_cookie_must_be_whole_words_and_options_need_a_target():
    with pytest.raises(ValueError):
        ConvertClientHandshake(TARGET, cookie=b"abc")
    with pytest.raises(ValueError):
        ConvertClientHandshake(None, extended_options=(MP_CAPABLE_SYN_OPTION,))


def test_mp_capable_option_is_an_mptcpv1_syn_option():
    # RFC 8684 §3.1: kind 30, length 4, subtype 0 / version 1, flags with H set.
    assert MP_CAPABLE_SYN_OPTION.encode() == h("1e 04 01 01")


# --------------------------------------------------------------------------
# Accepting answers, whole and trickled
# --------------------------------------------------------------------------

MPTCP_SYNACK = ExtendedTcpHeaderTlv((TcpOption(TcpOptionKind.MSS, h("05b4")),
                                     TcpOption(TcpOptionKind.NOP),
                                     TcpOption(TcpOptionKind.MPTCP, h("0181 0102030405060708"))))
TCP_SYNACK = ExtendedTcpHeaderTlv((TcpOption(TcpOptionKind.MSS, h("05b4")),))

ACCEPTS = {
    # name: (answer bytes, server_mptcp, supported, extended header)
    "bare-header": (h("01 01 2263"), None, None, None),
    "mptcp-server": (reply(MPTCP_SYNACK), True, None, MPTCP_SYNACK),
    "tcp-server": (reply(TCP_SYNACK), False, None, TCP_SYNACK),
    "empty-synack-options": (reply(ExtendedTcpHeaderTlv()), False, None, ExtendedTcpHeaderTlv()),
    "supported-ext": (reply(SupportedTcpExtTlv((30, 34))), None, (30, 34), None),
    "both": (reply(TCP_SYNACK, SupportedTcpExtTlv((30,))), False, (30,), TCP_SYNACK),
}


@pytest.mark.parametrize("name", sorted(ACCEPTS))
@pytest.mark.parametrize("how", ["whole", "trickle", "socket-like"])
def test_every_accepting_answer(name, how):
    answer, server_mptcp, supported, extended = ACCEPTS[name]
    app = b"HTTP/1.1 200 OK\r\n"
    hs = ConvertClientHandshake(TARGET, extended_options=(MP_CAPABLE_SYN_OPTION,))
    if how == "whole":
        result, unfed = hs.feed(answer + app), b""
        assert result.leftover == app
    elif how == "trickle":
        result, unfed = trickle(hs, answer + app)
        assert result.leftover == b"" and unfed == app
    else:
        result, unfed = read_like_a_socket(hs, answer + app)
        assert result.leftover == b"" and unfed == app  # never read past the answer
    assert isinstance(result, ConvertAccepted)
    assert result.server_mptcp is server_mptcp
    assert result.supported == supported
    assert result.extended_header == extended
    assert result.message == decode_message(answer, ConvertSender.CONVERTER)[0]
    assert hs.state is ClientState.ACCEPTED and hs.result is result and hs.wanted == 0
    hs.feed_eof()  # closing after the answer is fine


def test_wanted_tracks_the_header_then_total_length():
    answer = reply(MPTCP_SYNACK)
    hs = ConvertClientHandshake(TARGET)
    assert hs.wanted == 4
    hs.feed(answer[:1])
    assert hs.wanted == 3
    hs.feed(answer[1:2])  # Total Length known now
    assert hs.wanted == len(answer) - 2
    hs.feed(answer[2:7])
    assert hs.wanted == len(answer) - 7
    assert hs.feed(answer[7:]) is not None and hs.wanted == 0


def test_empty_feed_is_need_more_and_feed_after_accept_is_misuse():
    hs = ConvertClientHandshake(TARGET)
    assert hs.feed(b"") is None
    hs.feed(h("01 01 2263"))
    with pytest.raises(RuntimeError):
        hs.feed(b"x")


def test_info_answer_lists_supported_kinds():
    hs = ConvertClientHandshake(None)
    result = hs.feed(reply(SupportedTcpExtTlv((TcpOptionKind.MPTCP,))))
    assert result.supported == (30,) and result.server_mptcp is None


# --------------------------------------------------------------------------
# Refusals: every Error code becomes a typed error
# --------------------------------------------------------------------------

ERRORS = [
    (ErrorTlv.unsupported_version((1, 2)), RefusedUnsupportedVersion,
     {"supported_versions": (1, 2)}),
    (ErrorTlv.malformed(h("01 00 2263")), RefusedMalformedMessage, {"echo": h("01002263 00")}),
    (ErrorTlv.unsupported_message(h("01 02 2263 c0 01 0000")), RefusedUnsupportedMessage,
     {"echo": h("01022263 c0010000 00")}),
    (ErrorTlv.missing_cookie(b"FRESHCK!"), RefusedMissingCookie, {"cookie": b"FRESHCK!"}),
    (ErrorTlv.not_authorized(), RefusedNotAuthorized, {}),
    (ErrorTlv.unsupported_tcp_option((29, 34)), RefusedUnsupportedTcpOption,
     {"refused_option_kinds": (29, 34)}),
    (ErrorTlv.resource_exceeded(0), RefusedResourceExceeded, {"retry_delay_s": 30}),
    (ErrorTlv.resource_exceeded(5), RefusedResourceExceeded, {"retry_delay_s": 5}),
    (ErrorTlv.network_failure(0), RefusedNetworkFailure, {"retry_delay_s": 0}),
    (ErrorTlv.network_failure(9), RefusedNetworkFailure, {"retry_delay_s": 9}),
    (ErrorTlv.connection_reset(), RefusedConnectionReset, {}),
    (ErrorTlv.destination_unreachable(3), RefusedDestinationUnreachable, {"icmp_code": 3}),
]
ACCESSORS = ("supported_versions", "echo", "cookie", "refused_option_kinds", "retry_delay_s",
             "icmp_code")


def test_every_registered_code_has_a_refusal_class():
    assert set(REFUSALS) == set(ConvertErrorCode)
    assert {cls for _, cls, _ in ERRORS} == set(REFUSALS.values())


@pytest.mark.parametrize("error, cls, values", ERRORS,
                         ids=[f"{e.code.name}-{e.value.hex()}" for e, _, _ in ERRORS])
@pytest.mark.parametrize("how", ["whole", "trickle"])
def test_every_error_code_is_a_typed_refusal(error, cls, values, how):
    hs = ConvertClientHandshake(TARGET)
    answer = reply(error) + b"ignored"
    with pytest.raises(cls) as caught:
        if how == "whole":
            hs.feed(answer)
        else:
            trickle(hs, answer)
    refusal = caught.value
    assert isinstance(refusal, ConvertRefused) and isinstance(refusal, ProtocolError)
    assert refusal.code == error.code and isinstance(refusal.code, ConvertErrorCode)
    assert refusal.error == error
    for name in ACCESSORS:
        assert getattr(refusal, name) == values.get(name), name
    assert error.code.name in str(refusal)
    # Sticky: the handshake is over.
    assert hs.state is ClientState.FAILED and hs.wanted == 0 and hs.error is refusal
    with pytest.raises(cls):
        hs.feed(b"more")
    with pytest.raises(cls):
        hs.feed_eof()


def test_unregistered_error_code_is_a_plain_refusal_with_the_int():
    hs = ConvertClientHandshake(TARGET)
    with pytest.raises(ConvertRefused) as caught:
        hs.feed(reply(ErrorTlv.padded(100, b"\x07")))
    assert type(caught.value) is ConvertRefused
    assert caught.value.code == 100 and not isinstance(caught.value.code, ConvertErrorCode)
    assert "100" in str(caught.value)


def test_error_wins_over_other_tlvs():
    with pytest.raises(RefusedNotAuthorized):
        ConvertClientHandshake(TARGET).feed(reply(TCP_SYNACK, ErrorTlv.not_authorized()))


def test_missing_cookie_without_cookie_bytes_gives_none():
    refusal = refusal_for(ErrorTlv(E.MISSING_COOKIE, b"\x00"))
    assert isinstance(refusal, RefusedMissingCookie) and refusal.cookie is None


def test_refused_cookie_can_be_sent_back():
    refusal = refusal_for(ErrorTlv.missing_cookie(b"12345678"))
    retry = ConvertClientHandshake(TARGET, cookie=refusal.cookie)
    assert retry.request.cookie == CookieTlv(b"12345678")


def test_refusal_needs_an_error_tlv():
    with pytest.raises(TypeError):
        ConvertRefused("nope")


# --------------------------------------------------------------------------
# Answers that break RFC 8803
# --------------------------------------------------------------------------

@pytest.mark.parametrize("answer, error, code", [
    (h("02 01 2263"), UnsupportedConvertVersion, E.UNSUPPORTED_VERSION),
    (h("01 01 dead"), NotConvertMessage, E.MALFORMED_MESSAGE),
    (h("01 00 2263"), ConvertProtocolError, E.MALFORMED_MESSAGE),
    (h("01 02 2263 14 02 0000"), ConvertProtocolError, E.MALFORMED_MESSAGE),  # past Total Length
    (reply(InfoTlv()), ConvertProtocolError, E.UNSUPPORTED_MESSAGE),  # client-only TLV
    (h("01 02 2263 c8 01 0000"), ConvertProtocolError, E.UNSUPPORTED_MESSAGE),  # private type
    (h("01 03 2263 14 01 0000 14 01 0000"), ConvertProtocolError, E.MALFORMED_MESSAGE),  # dup
    (b"HTTP/1.1 200 OK\r\n", UnsupportedConvertVersion, E.UNSUPPORTED_VERSION),
])
@pytest.mark.parametrize("how", ["whole", "trickle"])
def test_answers_breaking_the_protocol(answer, error, code, how):
    hs = ConvertClientHandshake(TARGET)
    with pytest.raises(error) as caught:
        if how == "whole":
            hs.feed(answer)
        else:
            trickle(hs, answer)
    assert caught.value.code == code
    assert not isinstance(caught.value, ConvertRefused)
    assert hs.state is ClientState.FAILED
    with pytest.raises(error):
        hs.feed(b"")


@pytest.mark.parametrize("fed", [b"", h("01"), h("01 02 2263"), h("01 02 2263 14")])
def test_close_before_the_answer_is_malformed(fed):
    hs = ConvertClientHandshake(TARGET)
    hs.feed(fed)
    with pytest.raises(ConvertProtocolError) as caught:
        hs.feed_eof()
    assert caught.value.code == E.MALFORMED_MESSAGE
    with pytest.raises(ConvertProtocolError):
        hs.feed(b"x")


# --------------------------------------------------------------------------
# Fuzz: only the four outcomes, whatever the chunking
# --------------------------------------------------------------------------

def outcome(chunks: list[bytes]):
    hs = ConvertClientHandshake(TARGET)
    try:
        for chunk in chunks:
            result = hs.feed(chunk)
            if result is not None:
                return ("accepted", result.message, result.leftover)
        hs.feed_eof()
    except ConvertRefused as refusal:
        return ("refused", type(refusal), refusal.code)
    except ConvertProtocolError as error:
        return ("bad", error.code)
    return ("unreachable",)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


valid_answers = st.sampled_from([a for a, *_ in ACCEPTS.values()]
                                + [reply(e) for e, _, _ in ERRORS])
streams = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda a, tail: a + tail, valid_answers, st.binary(max_size=16)),
    st.builds(lambda body: h("01") + bytes([(len(body) + 4) // 4]) + h("2263") + body,
              st.binary(max_size=40)),
)


@settings(max_examples=400, deadline=None)
@given(streams, st.lists(st.integers(0, 200), max_size=8))
def test_fuzz_only_protocol_outcomes_and_chunking_does_not_matter(data, cuts):
    whole = outcome([data])
    assert whole[0] in ("accepted", "refused", "bad")
    chunked = outcome(split(data, cuts))
    if whole[0] == "accepted":
        # Same message; the leftover is split differently but adds up the same way.
        assert chunked[0] == "accepted" and chunked[1] == whole[1]
    else:
        assert chunked == whole


# --------------------------------------------------------------------------
# MPTCP target cache (RFC 8803 §5.1: go direct next time)
# --------------------------------------------------------------------------

def test_cache_remembers_until_ttl():
    cache = MptcpTargetCache(ttl=60)
    assert not cache.is_mptcp(TARGET, now=0)
    cache.remember(TARGET, now=100)
    assert cache.is_mptcp(TARGET, now=100)
    assert cache.is_mptcp(TARGET, now=159.9)
    assert not cache.is_mptcp(TARGET, now=160)  # expired entries go
    assert len(cache) == 0


def test_cache_refresh_extends_and_forget_drops():
    cache = MptcpTargetCache(ttl=10)
    cache.remember(TARGET, now=0)
    cache.remember(TARGET, now=8)
    assert cache.is_mptcp(TARGET, now=17)
    cache.forget(TARGET)
    assert not cache.is_mptcp(TARGET, now=17)
    cache.forget(TARGET)  # idempotent


def test_cache_keys_are_normalised_addresses_and_ports():
    cache = MptcpTargetCache(ttl=10)
    cache.remember(("::ffff:192.0.2.1", 443), now=0)
    assert cache.is_mptcp((ipaddress.ip_address("192.0.2.1"), 443), now=1)
    assert not cache.is_mptcp(("192.0.2.1", 80), now=1)
    cache.remember(("2001:DB8::1", 443), now=0)
    assert cache.is_mptcp(("2001:db8::1", 443), now=1)
    assert target_key(("2001:db8::1", 443)) == (ipaddress.ip_address("2001:db8::1"), 443)


def test_cache_is_bounded_least_recently_confirmed_first():
    cache = MptcpTargetCache(ttl=100, max_entries=2)
    a, b, c = ("192.0.2.1", 1), ("192.0.2.2", 1), ("192.0.2.3", 1)
    cache.remember(a, now=0)
    cache.remember(b, now=1)
    cache.remember(a, now=2)  # a confirmed again: b is now the oldest
    cache.remember(c, now=3)
    assert len(cache) == 2
    assert cache.is_mptcp(a, now=4) and cache.is_mptcp(c, now=4)
    assert not cache.is_mptcp(b, now=4)
    cache.clear()
    assert len(cache) == 0


@pytest.mark.parametrize("kwargs", [{"ttl": 0}, {"ttl": -1}, {"ttl": "5"}, {"ttl": True},
                                    {"max_entries": 0}, {"max_entries": 1.5}])
def test_cache_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        MptcpTargetCache(**kwargs)


def test_cache_rejects_names():
    with pytest.raises(ValueError):
        MptcpTargetCache().remember(("example.com", 443), now=0)
