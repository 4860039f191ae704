"""SOCKS5 handshake: vectors, trickle feeding, the bad-input matrix, fuzzing."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mptcp_proxy.modes.request import ConnectRequest
from mptcp_proxy.modes.socks5 import (
    Socks5Error, Socks5Handshake, Socks5Reply, reply_bytes,
)

GREETING = bytes.fromhex("050100")
REQ_V4 = bytes.fromhex("05010001 0a000002 1f90")                # 10.0.0.2:8080
REQ_V6 = bytes.fromhex("05010004" + "20010db8" + "00" * 11 + "01" + "01bb")
REQ_DOMAIN = bytes.fromhex("05010003 0b") + b"example.org" + bytes.fromhex("0050")


def run(hs: Socks5Handshake, data: bytes, trickle: bool = False):
    out, request = b"", None
    chunks = [data[i:i + 1] for i in range(len(data))] if trickle else [data]
    for chunk in chunks:
        sent, req = hs.feed(chunk)
        out += sent
        request = request or req
    return out, request


@pytest.mark.parametrize("trickle", [False, True])
@pytest.mark.parametrize("req, host, port", [
    (REQ_V4, ipaddress.ip_address("10.0.0.2"), 8080),
    (REQ_V6, ipaddress.ip_address("2001:db8::1"), 443),
    (REQ_DOMAIN, "example.org", 80),
])
def test_connect_no_auth(trickle, req, host, port):
    hs = Socks5Handshake()
    out, request = run(hs, GREETING + req, trickle)
    assert out == bytes.fromhex("0500")
    assert request == ConnectRequest(host, port)
    assert hs.success(("10.0.0.1", 40000)) == bytes.fromhex("05000001 0a000001 9c40")


def test_large_pipelined_data_in_the_same_read_is_not_a_handshake_error():
    hs = Socks5Handshake()
    out, request = run(hs, GREETING + REQ_V4 + b"x" * 100_000)
    assert request is not None and len(hs.leftover) == 100_000


def test_pipelined_data_is_kept_for_the_relay():
    hs = Socks5Handshake()
    out, request = run(hs, GREETING + REQ_V4 + b"GET / HTTP/1.0\r\n")
    assert request is not None and hs.leftover == b"GET / HTTP/1.0\r\n"
    hs.feed(b"more")
    assert hs.leftover == b"GET / HTTP/1.0\r\nmore"


def test_username_password():
    hs = Socks5Handshake(lambda u, p: (u, p) == ("alice", "secret"))
    auth = b"\x01\x05alice\x06secret"
    out, request = run(hs, bytes.fromhex("05020002") + auth + REQ_V4, trickle=True)
    assert out == bytes.fromhex("0502") + bytes.fromhex("0100")
    assert request.username == "alice"


def test_bad_password_gets_01_01():
    hs = Socks5Handshake(lambda u, p: False)
    with pytest.raises(Socks5Error) as err:
        run(hs, bytes.fromhex("050102") + b"\x01\x01a\x01b")
    assert err.value.reply == bytes.fromhex("0502") + bytes.fromhex("0101")


@pytest.mark.parametrize("data, reply, code", [
    (bytes.fromhex("0401"), b"", None),                                 # wrong version
    (bytes.fromhex("0500"), bytes.fromhex("05ff"), None),               # NMETHODS 0
    (bytes.fromhex("05ff") + b"\x01" * 3 + b"\x05" * 1100, bytes.fromhex("05ff"), None),
    (bytes.fromhex("050101"), bytes.fromhex("05ff"), None),             # only GSSAPI
    (GREETING + bytes.fromhex("05020001 0a000002 1f90"), b"\x05\x00" + reply_bytes(7), 7),
    (GREETING + bytes.fromhex("05030001 0a000002 1f90"), b"\x05\x00" + reply_bytes(7), 7),
    (GREETING + bytes.fromhex("05010005 0a000002 1f90"), b"\x05\x00" + reply_bytes(8), 8),
    (GREETING + bytes.fromhex("05010101 0a000002 1f90"), b"\x05\x00" + reply_bytes(1), 1),
    (GREETING + bytes.fromhex("05010003 00 0050"), b"\x05\x00" + reply_bytes(1), 1),
    (GREETING + bytes.fromhex("05010003 03") + b"a\x00b" + b"\x00\x50",
     b"\x05\x00" + reply_bytes(1), 1),
    (GREETING + bytes.fromhex("05010001 0a000002 0000"), b"\x05\x00" + reply_bytes(2), 2),
])
def test_bad_input_matrix(data, reply, code):
    hs = Socks5Handshake()
    with pytest.raises(Socks5Error) as err:
        run(hs, data)
    if reply is not None:
        assert err.value.reply == reply
    assert err.value.code == code


def test_nmethods_255_with_short_list_waits_then_bounds():
    hs = Socks5Handshake()
    assert hs.feed(bytes.fromhex("05ff") + b"\x00" * 10) == (b"", None)  # needs more
    with pytest.raises(Socks5Error):
        hs.feed(b"\x00" * 2000)  # never more than MAX_BUFFER


def test_empty_username_and_password_fail():
    for auth in (b"\x01\x00\x01p", b"\x01\x01u\x00"):
        hs = Socks5Handshake(lambda u, p: True)
        with pytest.raises(Socks5Error) as err:
            run(hs, bytes.fromhex("050102") + auth)
        assert err.value.reply == bytes.fromhex("0502") + bytes.fromhex("0101")


def test_failure_reply_after_connect():
    hs = Socks5Handshake()
    run(hs, GREETING + REQ_V4)
    assert hs.failure(Socks5Reply.CONNECTION_REFUSED) == reply_bytes(5)


@settings(max_examples=400)
@given(st.binary(max_size=600), st.booleans())
def test_fuzz_raises_only_socks5_errors(data, auth):
    hs = Socks5Handshake((lambda u, p: u == "a") if auth else None)
    try:
        run(hs, data, trickle=len(data) < 60)
    except Socks5Error:
        pass


@settings(max_examples=200)
@given(st.lists(st.integers(1, 8), min_size=1, max_size=40))
def test_any_split_gives_the_same_result(sizes):
    data = GREETING + REQ_DOMAIN + b"payload"
    chunks, pos = [], 0
    for size in sizes:
        chunks.append(data[pos:pos + size])
        pos += size
    chunks.append(data[pos:])
    hs = Socks5Handshake()
    out, request = b"", None
    for chunk in chunks:
        sent, req = hs.feed(chunk)
        out += sent
        request = request or req
    assert out == bytes.fromhex("0500") and request == ConnectRequest("example.org", 80)
    assert hs.leftover == b"payload"


@pytest.mark.parametrize("name", [b"evil.example reason=done conn=1", b"a\nb.example", b"-bad.example"])
def test_domain_names_that_are_not_host_names_get_general_failure(name):
    """They would reach the resolver and the connection log (forged lines)."""
    hs = Socks5Handshake()
    with pytest.raises(Socks5Error) as info:
        run(hs, GREETING + bytes([5, 1, 0, 3, len(name)]) + name + b"\x00\x50")
    assert info.value.code == Socks5Reply.GENERAL_FAILURE
