"""Fuzz the SOCKS5 server handshake (src/mptcp_proxy/modes/socks5.py).

Byte 0: bit 0 = require username/password (user/pass), bits 1-7 = chunking
seed. Expected rejection: Socks5Error (a ProtocolError). Whole and chunked
feeding must send the same bytes and give the same request or error.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import check, instrumented, main, same_whole_and_chunked  # noqa: E402

with instrumented():
    from mptcp_proxy.modes.socks5 import Socks5Error, Socks5Handshake

NAME = "socks5"


def _auth(user: str, password: str) -> bool:
    return user == "user" and password == "pass"


def _run(auth, pieces):
    hs = Socks5Handshake(auth)
    sent = bytearray()
    try:
        for piece in pieces:
            out, request = hs.feed(piece)
            sent += out
            if request is not None:
                # Pipelined data keeps arriving; it must all end up in leftover.
                continue
    except Socks5Error as exc:
        sent += exc.reply
        check(hs.state == "failed", f"Socks5Error in state {hs.state}")
        return ("error", exc.code, bytes(sent), hs.requested)
    if hs.done:
        reply = hs.success(("192.0.2.1", 1080))
        check(reply[:2] == b"\x05\x00", f"bad success reply {reply!r}")
    return ("ok" if hs.done else "pending", hs.request, hs.leftover, bytes(sent), hs.requested)


def one_input(data: bytes) -> None:
    if not data:
        return
    flags, payload = data[0], data[1:]
    auth = _auth if flags & 1 else None
    same_whole_and_chunked(lambda pieces: _run(auth, pieces), payload, flags >> 1)


def seeds() -> list[bytes]:
    greeting = b"\x05\x01\x00"
    auth = b"\x05\x02\x00\x02" + b"\x01\x04user\x04pass"
    requests = [
        b"\x05\x01\x00\x01\xc0\x00\x02\x0a\x01\xbb",
        b"\x05\x01\x00\x04" + bytes(15) + b"\x01" + b"\x00\x50",
        b"\x05\x01\x00\x03\x0bexample.com\x01\xbb",
        b"\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x00",
    ]
    out = []
    for r in requests:
        out.append(b"\x00" + greeting + r + b"GET /")
        out.append(b"\x07" + greeting + r)
        out.append(b"\x01" + auth + r)
    return out


if __name__ == "__main__":
    main(one_input)
