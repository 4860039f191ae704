"""Fuzz the HTTP CONNECT handshake and parse_authority
(src/mptcp_proxy/modes/http_connect.py).

Byte 0: bit 0 = require Basic auth (user:pass), bit 1 = fuzz parse_authority
with the payload as text instead, bits 2-7 = chunking seed. Expected
rejections: HttpConnectError (a ProtocolError, code = HTTP status) from the
handshake, ValueError from parse_authority. Whole and chunked feeding must
give the same request or the same status.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import check, instrumented, main, same_whole_and_chunked  # noqa: E402

with instrumented():
    from mptcp_proxy.modes.http_connect import (
        HttpConnectError, HttpConnectHandshake, parse_authority,
    )

NAME = "http_connect"


def _auth(user: str, password: str) -> bool:
    return user == "user" and password == "pass"


def _run(auth, pieces):
    hs = HttpConnectHandshake(auth)
    try:
        for piece in pieces:
            hs.feed(piece)
    except HttpConnectError as exc:
        check(exc.reply.startswith(b"HTTP/1.1 %d " % exc.code) or exc.reply == b"",
              f"reply does not carry status {exc.code}: {exc.reply[:40]!r}")
        return ("error", exc.code)
    if hs.done:
        check(hs.success().startswith(b"HTTP/1.1 200"), "bad success reply")
    return ("ok" if hs.done else "pending", hs.request, hs.leftover)


def one_input(data: bytes) -> None:
    if not data:
        return
    flags, payload = data[0], data[1:]
    if flags & 2:
        for text in (payload.decode("latin-1"), payload.decode("utf-8", "replace")):
            try:
                host, port = parse_authority(text)
            except ValueError:
                continue
            check(0 < port < 65536, f"port {port} out of range")
        return
    auth = _auth if flags & 1 else None
    same_whole_and_chunked(lambda pieces: _run(auth, pieces), payload, flags >> 2)


def seeds() -> list[bytes]:
    ok = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
    v6 = b"CONNECT [2001:db8::1]:8443 HTTP/1.1\r\nHost: [2001:db8::1]:8443\r\n\r\nhello"
    auth = (b"CONNECT 192.0.2.1:80 HTTP/1.1\r\nHost: 192.0.2.1:80\r\n"
            b"Proxy-Authorization: Basic dXNlcjpwYXNz\r\n\r\n")
    lf = b"CONNECT example.com:443 HTTP/1.0\n\n"
    out = [b"\x00" + ok, b"\x14" + ok, b"\x00" + v6, b"\x01" + auth, b"\x0d" + auth,
           b"\x00" + lf, b"\x00GET / HTTP/1.1\r\nHost: x\r\n\r\n"]
    out += [b"\x02" + t for t in (b"example.com:443", b"[::1]:80", b"1.2.3.4:0", b"[fe80::1%eth0]:1")]
    return out


if __name__ == "__main__":
    main(one_input)
