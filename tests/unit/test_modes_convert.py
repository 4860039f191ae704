"""The converter handshake (sans-IO): trickle feeds, every error code, cookies, replays.

Replies are checked by decoding them with the codec as the converter's
messages, and comparing whole dataclasses.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mptcp_proxy.modes.convert import (
    BARE_REPLY,
    COOKIE_LEN,
    CloseQuietly,
    ConvertHandshake,
    ConvertSettings,
    CookieAuthority,
    HandshakeState,
    Negotiated,
    OpenUpstream,
    ReplyAndClose,
    StartRelay,
    TokenBucket,
    UpstreamFailure,
    UpstreamFailureKind,
    open_quick,
    quick_handshake,
)
from mptcp_proxy.modes.policy import ClientPolicy, TargetPolicy, parse_networks
from mptcp_proxy.wire.convert import (
    MAGIC,
    ConnectTlv,
    ConvertErrorCode,
    ConvertMessage,
    ConvertSender,
    CookieTlv,
    ErrorTlv,
    ExtendedTcpHeaderTlv,
    InfoTlv,
    SupportedTcpExtTlv,
    TcpOption,
    TcpOptionKind,
    decode_message,
)

E = ConvertErrorCode
ip = ipaddress.ip_address
CLIENT = ip("10.0.0.1")
TARGET = ip("192.0.2.10")     # documentation range, opened by the test policy
PORT = 443
NOW = 1_700_000_000.0
SECRET = b"0123456789abcdef-test-secret"
APP = b"GET / HTTP/1.1\r\nHost: example\r\n\r\n"
HEADER_ONLY = struct.pack("!BBH", 1, 1, MAGIC)
KINDS = (3, 4, 8, 30, 34)


def make_settings(**kw) -> ConvertSettings:
    kw.setdefault("targets", TargetPolicy(
        allow_targets=parse_networks(["192.0.2.0/24"], "k")).with_local({ip("192.0.2.1")}))
    kw.setdefault("supported_kinds", KINDS)
    return ConvertSettings(**kw)


def handshake(settings: ConvertSettings | None = None, client=CLIENT,
              now: float = NOW) -> ConvertHandshake:
    hs = ConvertHandshake(settings or make_settings(), client, now)
    assert hs.start() is None
    return hs


def message(*tlvs) -> bytes:
    return ConvertMessage(tuple(tlvs)).encode()


def connect_bytes(address=TARGET, port=PORT, options=()) -> bytes:
    return message(ConnectTlv(port, ip(str(address)), tuple(options)))


def reply_of(action) -> ConvertMessage:
    got, used = decode_message(action.reply, ConvertSender.CONVERTER)
    assert used == len(action.reply)
    return got


def error_of(action) -> ErrorTlv:
    assert isinstance(action, ReplyAndClose), action
    err = reply_of(action).error
    assert err is not None and err.code == action.code
    return err


def trickle(hs: ConvertHandshake, data: bytes):
    """Feed one byte at a time; every byte before the deciding one must give None."""
    for i in range(len(data)):
        action = hs.receive(data[i:i + 1])
        if action is not None:
            return action, i + 1
    return None, len(data)


# --------------------------------------------------------------------------
# Success paths
# --------------------------------------------------------------------------

def test_base_connect_opens_upstream_with_early_data_then_bare_header():
    hs = handshake()
    action = hs.receive(connect_bytes() + APP)
    assert action == OpenUpstream(TARGET, PORT, APP, ())
    assert hs.state is HandshakeState.CONNECTING and hs.outcome == "connect"
    assert hs.early_data == APP
    relay = hs.upstream_connected(Negotiated(mptcp=True, sack=True))
    assert relay == StartRelay(HEADER_ONLY)  # base Connect: Total Length 1
    assert hs.state is HandshakeState.RELAYING


def test_the_policy_answer_to_a_connect_is_remembered_per_settings():
    settings = make_settings()
    first = handshake(settings).receive(connect_bytes())
    again = handshake(settings).receive(connect_bytes())
    # Same 24 bytes: the codec's object, the settings' remembered plan, one action.
    assert again is first and first == OpenUpstream(TARGET, PORT, b"", ())
    with_data = handshake(settings).receive(connect_bytes() + APP)
    assert with_data == OpenUpstream(TARGET, PORT, APP, ()) and first.early_data == b""
    # Fresh settings (a refreshed policy) decide afresh.
    denied = make_settings(targets=TargetPolicy(
        allow_targets=parse_networks(["192.0.2.0/24"], "k"),
        deny_targets=parse_networks([f"{TARGET}/32"], "k")))
    action = handshake(denied).receive(connect_bytes())
    assert isinstance(action, ReplyAndClose) and action.reason == "target-denied"


def test_trickle_feed_decides_on_the_last_byte_of_the_message():
    data = connect_bytes()
    hs = handshake()
    action, used = trickle(hs, data)
    assert used == len(data)
    assert action == OpenUpstream(TARGET, PORT, b"", ())


def test_trickle_feed_keeps_app_bytes_of_the_deciding_segment():
    data = connect_bytes() + APP
    hs = handshake()
    # The message split in three segments at odd places; app bytes ride the last one.
    assert hs.receive(data[:3]) is None
    assert hs.receive(data[3:13]) is None
    action = hs.receive(data[13:])
    assert action.early_data == APP


def test_extended_connect_returns_extended_tcp_header_from_negotiated_options():
    options = (TcpOption(TcpOptionKind.MPTCP, bytes((0x01, 0x01))),
               TcpOption(TcpOptionKind.SACK_PERMITTED))
    hs = handshake()
    action = hs.receive(connect_bytes(options=options))
    assert action.requested_options == (30, 4)
    negotiated = Negotiated(mptcp=True, sack=True, timestamps=True, window_scale=7)
    got = reply_of(hs.upstream_connected(negotiated))
    assert got == ConvertMessage((ExtendedTcpHeaderTlv((
        TcpOption(4), TcpOption(8, bytes(8)), TcpOption(3, b"\x07"),
        TcpOption(30, b"\x01\x01"))),))
    assert got.extended_tcp_header.mptcp_capable


def test_extended_connect_to_tcp_server_shows_no_mp_capable():
    hs = handshake()
    hs.receive(connect_bytes(options=(TcpOption(30, b"\x01\x00"),)))
    got = reply_of(hs.upstream_connected(Negotiated(mptcp=False, sack=True)))
    assert got.extended_tcp_header == ExtendedTcpHeaderTlv((TcpOption(4),))
    assert not got.extended_tcp_header.mptcp_capable


def test_mp_capable_checksum_flag():
    options = Negotiated(mptcp=True, mptcp_checksum=True).syn_ack_options()
    assert options == (TcpOption(30, bytes((0x01, 0x81))),)


def test_info_alone_answers_supported_extensions_and_closes():
    hs = handshake()
    action = hs.receive(message(InfoTlv()))
    assert isinstance(action, ReplyAndClose) and action.code is None
    assert action.reason == "info" and hs.outcome == "info"
    assert reply_of(action) == ConvertMessage((SupportedTcpExtTlv(KINDS),))
    assert 30 in reply_of(action).supported_tcp_ext.kinds


def test_info_with_connect_confirms_with_both_tlvs():
    hs = handshake()
    action = hs.receive(message(InfoTlv(), ConnectTlv(PORT, TARGET, (TcpOption(4),))))
    assert isinstance(action, OpenUpstream) and hs.outcome == "connect+info"
    got = reply_of(hs.upstream_connected(Negotiated(sack=True)))
    assert got.supported_tcp_ext == SupportedTcpExtTlv(KINDS)
    assert got.extended_tcp_header == ExtendedTcpHeaderTlv((TcpOption(4),))


def test_ipv6_target_and_ipv6_client():
    target6 = ip("2001:db8:5::10")
    settings = make_settings(
        targets=TargetPolicy(allow_targets=parse_networks(["2001:db8::/32"], "k")))
    hs = handshake(settings, client=ip("fd00::5"))
    action = hs.receive(connect_bytes(target6, 8443))
    assert action == OpenUpstream(target6, 8443, b"", ())


def test_mapped_client_address_is_judged_as_ipv4():
    settings = make_settings(clients=ClientPolicy(parse_networks(["10.0.0.0/24"], "k")))
    hs = ConvertHandshake(settings, ip("::ffff:10.0.0.1"), NOW)
    assert hs.start() is None
    assert hs.client == CLIENT


# --------------------------------------------------------------------------
# Every error code
# --------------------------------------------------------------------------

def test_error_0_unsupported_version_lists_version_1():
    hs = handshake()
    action = hs.receive(b"\x02\x06\x22\x63")
    err = error_of(action)
    assert err.code == E.UNSUPPORTED_VERSION and err.supported_versions == (1,)
    assert action.reason == "unsupported-version" and hs.outcome == "error:0"
    assert hs.state is HandshakeState.CLOSING


def test_error_0_is_decided_on_the_first_byte():
    action = handshake().receive(b"\x02")
    assert error_of(action).code == E.UNSUPPORTED_VERSION


@pytest.mark.parametrize("name, data", [
    ("total length 0", b"\x01\x00\x22\x63"),
    ("total length 1 from a client", HEADER_ONLY),
    ("tlv length 0", b"\x01\x02\x22\x63" + b"\x0a\x00\x00\x00"),
    ("tlv past the end", b"\x01\x02\x22\x63" + b"\x0a\x05\x01\xbb"),
    ("duplicate tlv", b"\x01\x03\x22\x63" + InfoTlv().encode() * 2),
    ("bad magic", b"\x01\x06\x88\x03"),
    ("connect port 0", b"\x01\x06\x22\x63" + b"\x0a\x05\x00\x00" + bytes(10) + b"\xff\xff"
     + bytes(4)),
])
def test_error_1_malformed_messages_echo_the_message(name, data):
    hs = handshake()
    action, _ = trickle(hs, data + APP)
    err = error_of(action)
    assert err.code == E.MALFORMED_MESSAGE, name
    assert action.reason == "malformed"
    echoed = err.echo.rstrip(b"\x00")
    assert data.startswith(echoed) or echoed.startswith(data.rstrip(b"\x00")), (echoed, data)


@pytest.mark.parametrize("target", [
    "127.0.0.1", "::ffff:127.0.0.1", "::1", "224.0.0.1", "ff02::1", "255.255.255.255",
    "0.0.0.0", "2002:7f00:1::", "64:ff9b::7f00:1",
])
def test_error_1_connect_to_loopback_multicast_broadcast_in_any_spelling(target):
    hs = handshake()
    data = connect_bytes(target)
    action = hs.receive(data + APP)
    err = error_of(action)
    assert err.code == E.MALFORMED_MESSAGE and action.reason == "target-forbidden"
    assert err.echo[:len(data)] == data  # the whole Connect message, not the app bytes


@pytest.mark.parametrize("data", [
    b"\x01\x02\x22\x63" + bytes((99, 1, 0, 0)),         # unassigned type
    b"\x01\x02\x22\x63" + bytes((200, 1, 0, 0)),        # private-use type
    b"\x01\x02\x22\x63" + bytes((0, 1, 0, 0)),          # reserved type 0
    b"\x01\x02\x22\x63" + bytes((30, 1, 0, 0)),         # Error TLV from a client
])
def test_error_2_unsupported_message(data):
    action, _ = trickle(handshake(), data)
    err = error_of(action)
    assert err.code == E.UNSUPPORTED_MESSAGE and action.reason == "unsupported-message"
    assert err.echo.startswith(data[:4])


def test_error_3_missing_cookie_carries_a_cookie_that_then_works():
    cookies = CookieAuthority(SECRET)
    settings = make_settings(cookies=cookies)
    action = handshake(settings).receive(connect_bytes())
    err = error_of(action)
    assert err.code == E.MISSING_COOKIE and action.reason == "missing-cookie"
    assert err.value[0] == 0 and len(err.cookie) == COOKIE_LEN
    assert cookies.valid(CLIENT, err.cookie, NOW)
    retry = message(ConnectTlv(PORT, TARGET), CookieTlv(err.cookie))
    assert handshake(settings, now=NOW + 60).receive(retry + APP) == \
        OpenUpstream(TARGET, PORT, APP, ())


def test_info_alone_needs_no_cookie():
    action = handshake(make_settings(cookies=CookieAuthority(SECRET))).receive(
        message(InfoTlv()))
    assert action.reason == "info"


def test_error_32_bad_cookie():
    settings = make_settings(cookies=CookieAuthority(SECRET))
    bad = message(ConnectTlv(PORT, TARGET), CookieTlv(b"\x00" * COOKIE_LEN))
    action = handshake(settings).receive(bad)
    assert error_of(action).code == E.NOT_AUTHORIZED and action.reason == "bad-cookie"


def test_error_32_cookie_of_another_client():
    cookies = CookieAuthority(SECRET)
    theirs = cookies.issue(ip("10.0.0.2"), NOW)
    action = handshake(make_settings(cookies=cookies)).receive(
        message(ConnectTlv(PORT, TARGET), CookieTlv(theirs)))
    assert error_of(action).code == E.NOT_AUTHORIZED


def test_error_32_client_not_in_allowed_networks_before_reading():
    settings = make_settings(clients=ClientPolicy(parse_networks(["10.9.0.0/16"], "k")))
    hs = ConvertHandshake(settings, CLIENT, NOW)
    action = hs.start()
    assert error_of(action).code == E.NOT_AUTHORIZED
    assert action.reason == "client-not-allowed" and hs.state is HandshakeState.CLOSING


@pytest.mark.parametrize("target, reason", [
    ("192.0.2.1", "own-address"),            # the converter itself: hairpin
    ("::ffff:192.0.2.1", "own-address"),
    ("10.1.2.3", "special-use"),             # private range not allowed
    ("fe80::1", "link-local"),
    ("169.254.169.254", "link-local"),
])
def test_error_32_policy_refusals(target, reason):
    hs = handshake()
    action = hs.receive(connect_bytes(target))
    assert error_of(action).code == E.NOT_AUTHORIZED
    assert action.reason == "target-denied"
    assert hs.target.reason.value == reason


@pytest.mark.parametrize("kinds, refused", [
    ((29,), (29,)),                  # TCP-AO: never (RFC 8803 §4.2.5)
    ((4, 77), (77,)),
    ((77, 29, 77), (77, 29)),
])
def test_error_33_unsupported_tcp_options_are_listed(kinds, refused):
    options = tuple(TcpOption(k, b"\x00\x00") for k in kinds)
    action = handshake().receive(connect_bytes(options=options))
    err = error_of(action)
    assert err.code == E.UNSUPPORTED_TCP_OPTION
    assert err.refused_option_kinds == refused and action.reason == "unsupported-option"


def test_tcp_ao_stays_refused_even_if_configured():
    settings = make_settings(connect_option_kinds={4, 29})
    action = handshake(settings).receive(connect_bytes(options=(TcpOption(29, b"\x00\x00"),)))
    assert error_of(action).code == E.UNSUPPORTED_TCP_OPTION


def test_error_64_too_many_pending_handshakes_from_one_client():
    settings = make_settings(max_pending_per_client=3)
    assert ConvertHandshake(settings, CLIENT, NOW).start(2) is None
    action = ConvertHandshake(settings, CLIENT, NOW).start(3)
    err = error_of(action)
    assert err.code == E.RESOURCE_EXCEEDED and err.retry_delay_s == 0
    assert action.reason == "client-over-limit"


@pytest.mark.parametrize("failure, code, reason", [
    (UpstreamFailure(UpstreamFailureKind.REFUSED), E.CONNECTION_RESET, "upstream-refused"),
    (UpstreamFailure(UpstreamFailureKind.UNREACHABLE, 1), E.DESTINATION_UNREACHABLE,
     "upstream-unreachable"),
    (UpstreamFailure(UpstreamFailureKind.UNREACHABLE), E.NETWORK_FAILURE,
     "upstream-unreachable"),
    (UpstreamFailure(UpstreamFailureKind.TIMEOUT), E.NETWORK_FAILURE, "upstream-timeout"),
    (UpstreamFailure(UpstreamFailureKind.NETWORK), E.NETWORK_FAILURE, "upstream-network"),
    (UpstreamFailure(UpstreamFailureKind.RESOURCES), E.RESOURCE_EXCEEDED,
     "upstream-resources"),
])
def test_upstream_failures_map_to_server_and_converter_side_codes(failure, code, reason):
    hs = handshake(make_settings(network_retry_s=7))
    hs.receive(connect_bytes())
    action = hs.upstream_failed(failure)
    err = error_of(action)
    assert err.code == code and action.reason == reason
    if code == E.DESTINATION_UNREACHABLE:
        assert err.icmp_code == 1
    if code == E.NETWORK_FAILURE:
        assert err.retry_delay_s == 7


# --------------------------------------------------------------------------
# EOF and the deadline
# --------------------------------------------------------------------------

def test_eof_before_anything_closes_quietly():
    action = handshake().receive_eof()
    assert action == CloseQuietly("client-eof", action.detail)


def test_eof_mid_message_is_malformed():
    hs = handshake()
    data = connect_bytes()
    assert hs.receive(data[:9]) is None
    action = hs.receive_eof()
    err = error_of(action)
    assert err.code == E.MALFORMED_MESSAGE and err.echo.startswith(data[:9])


def test_total_length_larger_than_the_data_waits_then_eof_is_malformed():
    hs = handshake()
    assert hs.receive(b"\x01\x10\x22\x63" + InfoTlv().encode()) is None
    assert error_of(hs.receive_eof()).code == E.MALFORMED_MESSAGE


def test_deadline_with_nothing_received_closes_quietly():
    action = handshake().expire()
    assert isinstance(action, CloseQuietly) and action.reason == "handshake-timeout"


def test_deadline_with_a_partial_message_is_malformed():
    hs = handshake()
    hs.receive(b"\x01\x06")
    action = hs.expire()
    assert error_of(action).code == E.MALFORMED_MESSAGE
    assert action.reason == "handshake-timeout"


def test_events_out_of_order_are_our_bug_not_the_peers():
    hs = handshake()
    with pytest.raises(RuntimeError):
        hs.upstream_connected(Negotiated())
    hs.receive(connect_bytes())
    with pytest.raises(RuntimeError):
        hs.receive(b"more")
    with pytest.raises(RuntimeError):
        hs.expire()


# --------------------------------------------------------------------------
# Replays (RFC 8803 §6.2): same bytes, same answer, no state
# --------------------------------------------------------------------------

@pytest.mark.parametrize("data", [
    connect_bytes() + APP,
    message(InfoTlv()),
    connect_bytes("127.0.0.1"),
    b"\x02\x00",
])
def test_replayed_syn_data_gets_the_same_action(data):
    assert handshake().receive(data) == handshake().receive(data)


def test_replayed_cookie_request_gets_the_same_cookie_within_a_window():
    settings = make_settings(cookies=CookieAuthority(SECRET))
    first = handshake(settings, now=NOW).receive(connect_bytes())
    again = handshake(settings, now=NOW + 1).receive(connect_bytes())
    assert first == again


# --------------------------------------------------------------------------
# Cookies and the error rate limit
# --------------------------------------------------------------------------

def test_cookie_windows():
    cookies = CookieAuthority(SECRET, window_s=100)
    cookie = cookies.issue(CLIENT, 1000.0)
    assert cookies.valid(CLIENT, cookie, 1099.0)
    assert cookies.valid(CLIENT, cookie, 1150.0)       # previous window still accepted
    assert not cookies.valid(CLIENT, cookie, 1200.0)   # two windows later: expired
    assert not cookies.valid(CLIENT, cookie[:-4], 1000.0)
    assert cookies.valid(ip("::ffff:10.0.0.1"), cookie, 1000.0)
    assert cookies.issue(CLIENT, 1000.0) != CookieAuthority(SECRET + b"x", 100).issue(
        CLIENT, 1000.0)


def test_cookie_secret_must_be_long_enough():
    with pytest.raises(ValueError):
        CookieAuthority(b"short")
    with pytest.raises(ValueError):
        CookieAuthority(SECRET, window_s=0)


def test_token_bucket_burst_then_rate():
    bucket = TokenBucket(rate=2.0, burst=3)
    assert [bucket.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.allow("b", 0.0)               # per key
    assert not bucket.allow("a", 0.2)
    assert bucket.allow("a", 0.6)               # 2 tokens/s refill
    assert not bucket.allow("a", 0.6)


def test_token_bucket_memory_is_bounded():
    bucket = TokenBucket(rate=1.0, burst=1, max_keys=10)
    for i in range(100):
        bucket.allow(i, 0.0)
    assert len(bucket) == 10


# --------------------------------------------------------------------------
# Fuzz: any bytes, any segmentation -> one of our actions, never an exception
# --------------------------------------------------------------------------

@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=30),
       st.booleans())
def test_fuzz_only_actions_come_out(chunks, eof):
    hs = handshake(make_settings(cookies=CookieAuthority(SECRET)))
    action = None
    for chunk in chunks:
        action = hs.receive(chunk)
        if action is not None:
            break
    if action is None:
        action = hs.receive_eof() if eof else hs.expire()
    assert isinstance(action, (OpenUpstream, ReplyAndClose, CloseQuietly))
    if isinstance(action, ReplyAndClose):
        assert reply_of(action).tlvs  # always a valid converter message


@settings(max_examples=100)
@given(st.binary(min_size=1, max_size=1100), st.integers(1, 64))
def test_fuzz_segmentation_does_not_change_the_answer(data, size):
    whole = handshake().receive(data)
    hs = handshake()
    split = None
    for i in range(0, len(data), size):
        split = hs.receive(data[i:i + size])
        if split is not None:
            break
    if whole is None:
        assert split is None
    elif isinstance(whole, OpenUpstream):
        assert isinstance(split, OpenUpstream)
        assert (split.address, split.port) == (whole.address, whole.port)
        assert whole.early_data.startswith(split.early_data)
    else:
        assert isinstance(split, ReplyAndClose) and split.code == whole.code


# --------------------------------------------------------------------------
# Per-connection shortcuts: the same answers, less work
# --------------------------------------------------------------------------

def test_bare_reply_is_the_encoded_empty_message():
    assert BARE_REPLY == ConvertMessage(()).encode() == HEADER_ONLY


def test_base_connect_needs_no_negotiated_options():
    hs = handshake()
    hs.receive(connect_bytes() + APP)
    assert not hs.wants_negotiated
    assert hs.upstream_connected(None) == StartRelay(BARE_REPLY)


@pytest.mark.parametrize("info", [False, True])
def test_extended_connect_wants_negotiated_options(info):
    option = TcpOption(TcpOptionKind.SACK_PERMITTED)
    hs = handshake()
    tlvs = [ConnectTlv(PORT, TARGET, (option,))] + ([InfoTlv()] if info else [])
    hs.receive(message(*tlvs))
    assert hs.wants_negotiated
    with pytest.raises(RuntimeError):
        hs.upstream_connected(None)


def test_info_with_base_connect_is_answered_without_negotiated_options():
    hs = handshake()
    hs.receive(message(InfoTlv(), ConnectTlv(PORT, TARGET)))
    assert not hs.wants_negotiated
    assert reply_of(hs.upstream_connected(None)) == ConvertMessage((SupportedTcpExtTlv(KINDS),))


def test_policy_memos_give_the_policies_answers():
    settings = make_settings(clients=ClientPolicy(parse_networks(["10.0.0.0/8"], "k")))
    for address in ["192.0.2.10", "192.0.2.1", "127.0.0.1", "::ffff:127.0.0.1", "10.1.1.1",
                    "8.8.8.8", "2002:7f00:1::", "224.0.0.1", "192.0.2.10"]:
        addr = ip(address)
        assert settings.check_target(addr) == settings.targets.check(addr)
        assert settings.check_target(addr) is settings.check_target(addr)
        assert settings.allows_client(addr) == settings.clients.allows(addr)


def test_policy_memos_are_bounded_and_not_shared_across_refreshes(monkeypatch):
    import dataclasses

    from mptcp_proxy.modes import convert as mode
    monkeypatch.setattr(mode, "MEMO_SIZE", 4)
    settings = make_settings()
    for i in range(10):
        settings.check_target(ip(f"192.0.2.{i}"))
        settings.allows_client(ip(f"10.0.0.{i}"))
        assert len(settings._targets_memo) <= 4 and len(settings._clients_memo) <= 4
    refreshed = dataclasses.replace(
        settings, targets=settings.targets.with_local({ip("192.0.2.10")}))
    assert refreshed.check_target(TARGET).verdict != settings.check_target(TARGET).verdict
    assert refreshed == dataclasses.replace(refreshed)  # memos take no part in equality


# --------------------------------------------------------------------------
# The one-read path: a whole message in the first read needs no decoder
# --------------------------------------------------------------------------

def test_a_whole_first_read_is_decoded_without_a_decoder():
    hs = handshake()
    action = hs.receive(connect_bytes() + APP)
    assert action == OpenUpstream(TARGET, PORT, APP)
    assert hs.decoder is None and hs.early_data == APP and hs.received == 24


def test_a_partial_first_read_goes_through_the_decoder():
    wire = connect_bytes()
    hs = handshake()
    assert hs.receive(wire[:10]) is None
    assert hs.decoder is not None and hs.received == 10
    assert hs.receive(wire[10:] + APP) == OpenUpstream(TARGET, PORT, APP)
    assert hs.early_data == APP


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_other_buffer_types_take_the_decoder(kind):
    hs = handshake()
    assert hs.receive(kind(connect_bytes() + APP)) == OpenUpstream(TARGET, PORT, APP)
    assert type(hs.early_data) is bytes and hs.early_data == APP


@pytest.mark.parametrize("data", [
    HEADER_ONLY,                                   # no TLV: Malformed
    struct.pack("!BBH", 2, 6, MAGIC) + bytes(20),  # version 2
    message(ConnectTlv(PORT, TARGET)),             # fine: the control case
])
def test_one_read_and_trickle_give_the_same_answer(data):
    whole = handshake().receive(data)
    assert trickle(handshake(), data)[0] == whole


def test_forbidden_target_in_one_read_echoes_the_message():
    wire = connect_bytes(address="127.0.0.1", port=80)
    hs = handshake()
    err = error_of(hs.receive(wire + APP))
    assert hs.decoder is None
    # The message, not the app bytes after it (zero-padded to a whole word).
    assert err.code == E.MALFORMED_MESSAGE and err.value.rstrip(b"\0") == wire.rstrip(b"\0")
    assert len(err.value) < len(wire) + 4


def test_expire_after_a_partial_read_echoes_it():
    hs = handshake()
    assert hs.receive(connect_bytes()[:7]) is None
    err = error_of(hs.expire())
    assert err.code == E.MALFORMED_MESSAGE and err.value[:7] == connect_bytes()[:7]


def test_bare_confirmation_is_one_shared_value():
    replies = []
    for _ in range(2):
        hs = handshake()
        hs.receive(connect_bytes())
        replies.append(hs.upstream_connected(None))
    assert replies[0] == StartRelay(BARE_REPLY) and replies[0] is replies[1]


def test_policy_memos_check_identity_not_just_the_id():
    settings = make_settings()
    allowed, forbidden = ip("192.0.2.10"), ip("127.0.0.1")
    assert settings.check_target(allowed).allowed
    # An entry under this id for another object (as after the id was reused)
    # is not taken for the answer.
    settings._targets_memo[id(forbidden)] = (allowed, settings.check_target(allowed))
    settings._clients_memo[id(forbidden)] = (allowed, False)
    assert settings.check_target(forbidden) == settings.targets.check(forbidden)
    assert not settings.check_target(forbidden).allowed
    assert settings.allows_client(forbidden) == settings.clients.allows(forbidden)
    # Equal values in distinct objects get the same answers.
    assert settings.check_target(ip("192.0.2.10")) == settings.check_target(allowed)


# --------------------------------------------------------------------------
# The quick way (open_quick): the same answer as the handshake, or none
# --------------------------------------------------------------------------

_QUICK_TARGETS = [TARGET, ip("192.0.2.1"), ip("127.0.0.1"), ip("198.51.100.7"),
                  ip("2001:db8::1"), ip("::ffff:192.0.2.10"), ip("224.0.0.1")]
_QUICK_CLIENTS = [CLIENT, ip("203.0.113.9"), ip("::ffff:10.0.0.1"), ip("2001:db8::2")]


@st.composite
def first_reads(draw):
    """First reads: base Connects (often), other messages, and any bytes."""
    kind = draw(st.sampled_from(["base", "base", "base", "options", "info", "random"]))
    early = draw(st.sampled_from([b"", b"", APP, b"x"]))
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=60))
    target = draw(st.sampled_from(_QUICK_TARGETS))
    port = draw(st.sampled_from([PORT, 80, 0]))
    if port == 0:   # malformed: port 0
        return connect_bytes(target, PORT)[:-16 - 2] + b"\0\0" + target.packed.rjust(16, b"\0")
    options = ()
    if kind == "options":
        options = (TcpOption(draw(st.sampled_from([TcpOptionKind.SACK_PERMITTED, 99]))),)
    tlvs = [ConnectTlv(port, target, options)]
    if kind == "info":
        tlvs.insert(0, InfoTlv())
    return message(*tlvs) + early


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(first_reads(), st.sampled_from(_QUICK_CLIENTS), st.integers(0, 3),
       st.sampled_from(["plain", "cookies", "clients"]), st.booleans())
def test_open_quick_answers_as_the_handshake_or_not_at_all(data, client, pending, kind, warm):
    kw = {"max_pending_per_client": 2}
    if kind == "cookies":
        kw["cookies"] = CookieAuthority(SECRET)
    elif kind == "clients":
        kw["clients"] = ClientPolicy(parse_networks(["10.0.0.0/8"], "k"))
    settings_ = make_settings(**kw)
    full = ConvertHandshake(settings_, client, NOW)
    want = full.start(pending)
    if want is None:
        want = full.receive(data)
    if warm:   # the codec has seen these bytes: what open_quick relies on
        handshake(settings_).receive(data)
    got = open_quick(settings_, client, data, pending)
    if got is None:
        return
    assert got == want
    again = quick_handshake(settings_, client, NOW, data)
    assert (again.state, again.outcome, again.early_data, again.connect) == \
        (full.state, full.outcome, full.early_data, full.connect) == \
        (HandshakeState.CONNECTING, "connect", got.early_data, full.connect)
    assert again.upstream_connected(None) == StartRelay(BARE_REPLY)


def test_open_quick_takes_the_usual_case_once_the_codec_has_seen_it():
    settings_ = make_settings()
    data = connect_bytes() + APP
    assert handshake(settings_).receive(data) == OpenUpstream(TARGET, PORT, APP, ())
    assert open_quick(settings_, CLIENT, data) == OpenUpstream(TARGET, PORT, APP, ())
    assert open_quick(settings_, CLIENT, connect_bytes()) is \
        open_quick(settings_, CLIENT, connect_bytes())   # no early data: one shared action
    # Never: cookies required, over the per-client limit, bytes the codec has not seen.
    assert open_quick(make_settings(cookies=CookieAuthority(SECRET)), CLIENT, data) is None
    assert open_quick(settings_, CLIENT, data, pending_from_client=64) is None
    assert open_quick(settings_, CLIENT, connect_bytes(port=1234)) is None
