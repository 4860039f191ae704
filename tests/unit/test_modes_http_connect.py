"""HTTP CONNECT handshake: requests, the bad-input matrix, trickle feeding, fuzzing;
the application proxies' shared refusal mapping and credentials."""

from __future__ import annotations

import base64
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mptcp_proxy.config_app_proxy import AppProxyConfig, Credentials
from mptcp_proxy.config import Endpoint
from mptcp_proxy.errors import ConfigError
from mptcp_proxy.modes.app_proxy import (
    HTTP_CONNECT, SOCKS5, AppHandshake, Refusal, error_reason, http_status, refusal_why,
    socks_reply,
)
from mptcp_proxy.modes.http_connect import (
    MAX_HEADER_BYTES, HttpConnectError, HttpConnectHandshake,
    error_body, parse_authority, response,
)
from mptcp_proxy.modes.request import ConnectRequest
from mptcp_proxy.modes.socks5 import Socks5Reply

OK = b"CONNECT 10.0.0.2:443 HTTP/1.1\r\nHost: 10.0.0.2:443\r\n\r\n"


def run(hs: HttpConnectHandshake, data: bytes, trickle: bool = False):
    out, request = b"", None
    chunks = [data[i:i + 1] for i in range(len(data))] if trickle else [data]
    for chunk in chunks:
        sent, req = hs.feed(chunk)
        out += sent
        request = request or req
    return out, request


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


@pytest.mark.parametrize("trickle", [False, True])
@pytest.mark.parametrize("line, host, port", [
    (b"CONNECT 10.0.0.2:443 HTTP/1.1", ipaddress.ip_address("10.0.0.2"), 443),
    (b"CONNECT [2001:db8::1]:8443 HTTP/1.1", ipaddress.ip_address("2001:db8::1"), 8443),
    (b"CONNECT Example.ORG.:80 HTTP/1.0", "example.org", 80),
])
def test_connect(trickle, line, host, port):
    hs = HttpConnectHandshake()
    out, request = run(hs, line + b"\r\nHost: x\r\nUser-Agent: t\r\n\r\n", trickle)
    assert out == b""
    assert request == ConnectRequest(host, port)
    assert hs.leftover == b""
    assert hs.success() == b"HTTP/1.1 200 Connection established\r\n\r\n"


def test_bare_lf_line_ends_and_leading_empty_line():
    hs = HttpConnectHandshake()
    _, request = run(hs, b"\r\nCONNECT a.example:1 HTTP/1.1\nHost: a\n\n")
    assert request == ConnectRequest("a.example", 1)


def test_tunnel_bytes_before_the_200_are_kept():
    hs = HttpConnectHandshake()
    _, request = run(hs, OK + b"\x16\x03\x01 client hello")
    assert request is not None and hs.leftover == b"\x16\x03\x01 client hello"
    hs.feed(b" more")
    assert hs.leftover == b"\x16\x03\x01 client hello more"


def test_content_length_zero_is_fine():
    _, request = run(HttpConnectHandshake(), OK[:-2] + b"Content-Length: 0\r\n\r\n")
    assert request is not None


@pytest.mark.parametrize("data, status", [
    (b"CONNECT 10.0.0.2 HTTP/1.1\r\n\r\n", 400),                    # no port
    (b"CONNECT 10.0.0.2: HTTP/1.1\r\n\r\n", 400),                   # empty port
    (b"CONNECT 10.0.0.2:0 HTTP/1.1\r\n\r\n", 400),                  # port 0
    (b"CONNECT 10.0.0.2:65536 HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT 10.0.0.2:+80 HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT 2001:db8::1:443 HTTP/1.1\r\n\r\n", 400),             # IPv6 without brackets
    (b"CONNECT [2001:db8::1 HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT bad_host!:80 HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT 999.1.1.1:80 HTTP/1.1\r\n\r\n", 400),                # numeric, not an address
    (b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 405),            # non-CONNECT methods
    (b"POST / HTTP/1.1\r\n\r\n", 405),
    (b"connect a:1 HTTP/1.1\r\n\r\n", 405),                         # methods are case-sensitive
    (b"CONNECT a:1 HTTP/2.0\r\n\r\n", 505),
    (b"CONNECT a:1 HTTX/1.1\r\n\r\n", 400),
    (b"CONNECT a:1\r\n\r\n", 400),
    (b"CONNECT  a:1 HTTP/1.1\r\n\r\n", 400),
    (OK[:-2] + b"Content-Length: 5\r\n\r\nhello", 400),             # a body
    (OK[:-2] + b"Content-Length: x\r\n\r\n", 400),
    (OK[:-2] + b"Transfer-Encoding: chunked\r\n\r\n", 400),
    (OK[:-2] + b"Bad Header: x\r\n\r\n", 400),
    (OK[:-2] + b"Host : x\r\n\r\n", 400),
    (OK[:-2] + b" folded\r\n\r\n", 400),
    (OK[:-2] + b"Host: again\r\n\r\n", 400),                        # duplicate Host
    (b"\x05\x01\x00", 400),                                          # SOCKS5 greeting
])
def test_bad_requests(data, status):
    hs = HttpConnectHandshake()
    with pytest.raises(HttpConnectError) as info:
        run(hs, data)
    assert info.value.code == status
    assert status_of(info.value.reply) == status
    assert b"Connection: close" in info.value.reply
    if status == 405:
        assert b"Allow: CONNECT" in info.value.reply
    with pytest.raises(HttpConnectError):
        hs.feed(b"more")  # a failed handshake stays failed


def test_headers_too_large():
    hs = HttpConnectHandshake()
    with pytest.raises(HttpConnectError) as info:
        run(hs, OK[:-2] + b"X-Big: " + b"a" * MAX_HEADER_BYTES)
    assert info.value.code == 431
    with pytest.raises(HttpConnectError) as info:
        run(HttpConnectHandshake(), OK[:-2] + b"X: y\r\n" * 200 + b"\r\n")
    assert info.value.code == 431


def _auth(user: str, password: str) -> bytes:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return OK[:-2] + f"Proxy-Authorization: Basic {token}\r\n\r\n".encode()


@pytest.mark.parametrize("data, ok", [
    (_auth("alice", "s3cret:x"), True),
    (_auth("alice", "wrong"), False),
    (_auth("bob", "s3cret:x"), False),
    (OK, False),                                                     # missing
    (OK[:-2] + b"Proxy-Authorization: Bearer abc\r\n\r\n", False),
    (OK[:-2] + b"Proxy-Authorization: Basic !!!\r\n\r\n", False),
    (OK[:-2] + b"Proxy-Authorization: Basic " + base64.b64encode(b"nocolon") + b"\r\n\r\n",
     False),
])
def test_basic_authentication(data, ok):
    hs = HttpConnectHandshake(lambda u, p: (u, p) == ("alice", "s3cret:x"))
    if ok:
        _, request = run(hs, data)
        assert request is not None and request.username == "alice"
        return
    with pytest.raises(HttpConnectError) as info:
        run(hs, data)
    assert info.value.code == 407
    assert b'Proxy-Authenticate: Basic realm="mptcp-proxy"' in info.value.reply


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.booleans())
def test_fuzz_raises_only_its_own_error(data, trickle):
    hs = HttpConnectHandshake()
    try:
        run(hs, data, trickle)
    except HttpConnectError as exc:
        assert exc.code in (400, 405, 407, 431, 505)
        assert exc.reply.startswith(b"HTTP/1.1 ")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=60))
def test_any_split_gives_the_same_request(cuts):
    data = b"CONNECT h.example:8080 HTTP/1.1\r\nHost: h.example:8080\r\n\r\ntunnel"
    hs = HttpConnectHandshake()
    i, request = 0, None
    for cut in cuts:
        _, req = hs.feed(data[i:i + cut])
        request = request or req
        i += cut
    _, req = hs.feed(data[i:])
    request = request or req
    assert request == ConnectRequest("h.example", 8080)
    assert hs.leftover == b"tunnel"


@given(st.text(max_size=80))
def test_parse_authority_raises_only_value_error(text):
    try:
        host, port = parse_authority(text)
    except ValueError:
        return
    assert 1 <= port <= 65535


def test_response_shapes():
    assert response(502) == (b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\n"
                             b"Content-Type: text/plain; charset=us-ascii\r\n"
                             b"Content-Length: 16\r\n\r\n502 Bad Gateway\n")
    assert b"Content-Length" not in response(200)


# -- error bodies: one line saying why (issue "The first hour of a new user") ------

def split_response(reply: bytes) -> tuple[dict[str, str], bytes]:
    head, sep, body = reply.partition(b"\r\n\r\n")
    assert sep
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.decode("ascii").partition(": ")
        headers[name.lower()] = value
    return headers, body


def test_error_body_is_one_line_with_a_correct_length():
    why = ("target 10.1.2.3:80 is in a private range (10.0.0.0/8); the proxy needs "
           "--allow-target 10.0.0.0/8 to reach it")
    headers, body = split_response(response(403, why=why))
    assert body == f"403 Forbidden: {why}\n".encode()
    assert int(headers["content-length"]) == len(body)
    assert headers["connection"] == "close"
    assert headers["content-type"].startswith("text/plain")
    assert body.count(b"\n") == 1


def test_error_body_cannot_carry_control_bytes_or_grow():
    headers, body = split_response(response(400, why="a\r\nSet-Cookie: x=1\x00\xe9" + "y" * 999))
    assert b"\r" not in body and b"\x00" not in body and body.count(b"\n") == 1
    assert b"a??Set-Cookie: x=1??" in body and "set-cookie" not in headers
    assert len(body) < 400 and int(headers["content-length"]) == len(body)
    assert error_body(404) == b"404 Error\n"


@pytest.mark.parametrize("data, status, words", [
    (b"GET http://a.example/ HTTP/1.1\r\n\r\n", 405, b"use CONNECT HOST:PORT"),
    (b"CONNECT a.example HTTP/1.1\r\n\r\n", 400, b"HOST:PORT"),
    (b"CONNECT <script>x</script>:1 HTTP/1.1\r\n\r\n", 400, b"HOST:PORT"),
    (OK[:-2] + b"Content-Length: 5\r\n\r\nhello", 400, b"no content"),
    (b"CONNECT a.example:1 HTTP/2.0\r\n\r\n", 505, b"HTTP/1.1"),
    (b"\x16\x03\x01", 400, b"not an HTTP request"),
])
def test_every_handshake_error_says_why_without_echoing_the_request(data, status, words):
    with pytest.raises(HttpConnectError) as info:
        run(HttpConnectHandshake(), data)
    headers, body = split_response(info.value.reply)
    assert status_of(info.value.reply) == status and words in body
    assert int(headers["content-length"]) == len(body) and headers["connection"] == "close"
    assert b"<script>" not in body and b"a.example" not in body


def test_bad_credentials_are_never_echoed():
    hs = HttpConnectHandshake(lambda user, password: False)
    token = base64.b64encode(b"alice:s3cret-pw").decode()
    with pytest.raises(HttpConnectError) as info:
        run(hs, OK[:-2] + f"Proxy-Authorization: Basic {token}\r\n\r\n".encode())
    _, body = split_response(info.value.reply)
    assert body == b"407 Proxy Authentication Required: wrong user name or password\n"
    assert hs.requested == (ipaddress.ip_address("10.0.0.2"), 443)  # logged as the target


def test_refusals_explain_themselves_over_http_only():
    why = refusal_why(Refusal.TARGET_NOT_ALLOWED, "10.1.2.3:80",
                      "is in a private range (10.0.0.0/8); the proxy needs --allow-target "
                      "10.0.0.0/8 to reach it")
    http = AppHandshake(HTTP_CONNECT)
    http.feed(OK)
    reply, status = http.refuse(Refusal.TARGET_NOT_ALLOWED, why)
    assert status == 403
    assert reply.endswith(b"\r\n\r\n403 Forbidden: target 10.1.2.3:80 is in a private range "
                          b"(10.0.0.0/8); the proxy needs --allow-target 10.0.0.0/8 to "
                          b"reach it\n")
    socks = AppHandshake(SOCKS5)
    socks.feed(bytes.fromhex("050100 05010001 0a000002 01bb"))
    assert socks.refuse(Refusal.TARGET_NOT_ALLOWED, why) == (
        bytes.fromhex("05020001 00000000 0000"), 2)


@pytest.mark.parametrize("refusal", list(Refusal))
def test_every_refusal_has_words(refusal):
    why = refusal_why(refusal, "example.org:443 (192.0.2.7)")
    assert why and "{" not in why
    if refusal not in (Refusal.CLIENT_NOT_ALLOWED, Refusal.RESOURCES):
        assert "example.org:443 (192.0.2.7)" in why
    assert "lookup" in refusal_why(Refusal.TIMEOUT, "a.example:1", resolving=True)


# -- shared by SOCKS5 and HTTP CONNECT ---------------------------------------------

def test_every_refusal_has_an_answer_in_both_protocols():
    for refusal in Refusal:
        assert isinstance(socks_reply(refusal), Socks5Reply)
        assert socks_reply(refusal) != Socks5Reply.SUCCEEDED
        assert 400 <= http_status(refusal) < 600
    assert http_status(Refusal.TARGET_NOT_ALLOWED) == 403
    assert http_status(Refusal.REFUSED) == 502
    assert http_status(Refusal.RESOLVE_FAILED) == 502
    assert http_status(Refusal.TIMEOUT) == 504
    assert socks_reply(Refusal.REFUSED) == Socks5Reply.CONNECTION_REFUSED
    assert socks_reply(Refusal.PORT_NOT_ALLOWED) == Socks5Reply.NOT_ALLOWED


def test_app_handshake_speaks_both_protocols():
    socks = AppHandshake(SOCKS5)
    out, request = socks.feed(bytes.fromhex("050100 05010001 0a000002 01bb") + b"early")
    assert out == b"\x05\x00" and request is not None
    assert (request.host, request.port, request.username) == \
        (ipaddress.ip_address("10.0.0.2"), 443, None)
    assert socks.leftover == b"early"
    assert socks.refuse(Refusal.REFUSED) == (bytes.fromhex("05050001 00000000 0000"), 5)
    http = AppHandshake(HTTP_CONNECT)
    out, request = http.feed(OK)
    assert out == b"" and request is not None and request.port == 443
    reply, code = http.refuse(Refusal.TIMEOUT)
    assert code == 504 and status_of(reply) == 504
    with pytest.raises(ValueError):
        AppHandshake("gopher")


def test_error_reason_names_protocol_and_code():
    try:
        AppHandshake(HTTP_CONNECT).feed(b"GET / HTTP/1.1\r\n\r\n")
    except HttpConnectError as exc:
        assert error_reason(HTTP_CONNECT, exc) == "http-error:405"
    from mptcp_proxy.modes.socks5 import Socks5Error
    assert error_reason(SOCKS5, Socks5Error("x", b"", 7)) == "socks5-error:7"
    assert error_reason(SOCKS5, Socks5Error("x")) == "socks5-bad-handshake"
    assert error_reason(SOCKS5, Socks5Error("x", stage="auth")) == "socks5-bad-auth"


def test_credentials():
    creds = Credentials.parse("# users\nalice:pw:with:colons\n\nbob:x\n")
    assert creds.check("alice", "pw:with:colons")
    assert not creds.check("alice", "pw")
    assert not creds.check("carol", "x")
    for bad in ("", "nocolon", ":pw", "user:", "a:1\na:2", "u:" + "p" * 256):
        with pytest.raises(ConfigError):
            Credentials.parse(bad)


def test_credentials_file_must_be_private(tmp_path):
    path = tmp_path / "users"
    path.write_text("alice:secret\n")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        Credentials.load(str(path))
    path.chmod(0o600)
    assert Credentials.load(str(path)).check("alice", "secret")


def test_config_validation():
    with pytest.raises(ConfigError):
        AppProxyConfig(protocol="gopher", listen=Endpoint("127.0.0.1", 0))
    with pytest.raises(ConfigError):
        AppProxyConfig(protocol=SOCKS5, listen=Endpoint("127.0.0.1", 0), allow_clients=())
    with pytest.raises(ConfigError):
        AppProxyConfig(protocol=SOCKS5, listen=Endpoint("127.0.0.1", 0), handshake_timeout=0)


def test_a_crafted_host_name_is_refused_in_linear_time():
    """A pattern over the whole name backtracked exponentially on ``a``*n + ``!``
    (3 s at n=25, doubling per letter) and froze the proxy's loop."""
    import time
    start = time.perf_counter()
    for n in (25, 30, 250, 5000):
        with pytest.raises(ValueError):
            parse_authority("a" * n + "!:443")
    hs = HttpConnectHandshake()
    with pytest.raises(HttpConnectError) as info:
        run(hs, b"CONNECT " + b"a" * 60 + b"!:443 HTTP/1.1\r\n\r\n")
    assert info.value.code == 400
    assert time.perf_counter() - start < 1.0   # measured: well under a millisecond


@pytest.mark.parametrize("name, ok", [
    ("example.org", True), ("example.org.", True), ("_srv.a-b.example", True),
    ("-a.example", False), ("a-.example", False), ("a..b", False), (".a", False),
    ("999.1.1.1", False), ("a" * 63 + ".b", True), ("a" * 64 + ".b", False),
    ("x y", False), ("a\nb", False), ("a\x7f", False), ("", False), ("a." * 127, False),
])
def test_valid_hostname(name, ok):
    from mptcp_proxy.modes.policy import valid_hostname
    assert valid_hostname(name) is ok


def test_lf_line_then_crlf_blank_line_ends_the_head():
    _, request = run(HttpConnectHandshake(), b"CONNECT a.example:1 HTTP/1.1\nHost: a\n\r\nrest")
    assert request == ConnectRequest("a.example", 1)


def test_passwords_keep_their_spaces():
    creds = Credentials.parse("alice: spaced out \n  # comment\n")
    assert creds.check("alice", " spaced out ")
    assert not creds.check("alice", "spaced out")


@pytest.mark.parametrize("authority", ["[2606:4700::5%1]:443", "[fe80::1%eth0]:80",
                                       "[fd00::1%\x1b[31mX]:80"])
def test_ipv6_zone_ids_are_refused(authority):
    """A zone id would slip past the own-address check and into the logs."""
    with pytest.raises(ValueError, match="zone"):
        parse_authority(authority)
