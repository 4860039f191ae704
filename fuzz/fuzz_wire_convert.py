"""Fuzz the RFC 8803 codec (src/mptcp_proxy/wire/convert.py).

Byte 0: bit 0 = sender (client/converter), bit 1 = accept private TLV 200,
bits 2-7 = chunking seed for the incremental ConvertDecoder. Checks the
module's design rules 1 (only IncompleteConvertMessage/ConvertProtocolError
escape), 3 (whole and chunked decoding agree) and a decode/encode/decode
round trip.
"""

from __future__ import annotations

import ipaddress
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import check, chunks, instrumented, main  # noqa: E402

with instrumented():
    from mptcp_proxy.wire import convert as wc

NAME = "wire_convert"


def _outcome_whole(payload: bytes, sender, private):
    try:
        msg, used = wc.decode_message(payload, sender, private_types=private)
    except wc.IncompleteConvertMessage:
        return ("need-more",)
    except wc.ConvertProtocolError as exc:
        check(exc.code is not None, f"protocol error without a code: {exc!r}")
        return ("error", exc.code)
    return ("ok", msg, payload[used:])


def one_input(data: bytes) -> None:
    if not data:
        return
    flags, payload = data[0], data[1:]
    sender = wc.ConvertSender.CLIENT if flags & 1 else wc.ConvertSender.CONVERTER
    private = (200,) if flags & 2 else ()
    whole = _outcome_whole(payload, sender, private)
    # The general path must agree with the base-Connect fast path / memo.
    if sender is wc.ConvertSender.CLIENT:
        again = _outcome_whole(bytearray(payload), sender, private)
        check(again == whole, f"bytes vs bytearray decode differ: {whole!r} vs {again!r}")
    if whole[0] == "ok":
        msg = whole[1]
        wire = wc.encode_message(msg, sender)
        back, used = wc.decode_message(wire, sender, private_types=private)
        check(back == msg and used == len(wire), "decode/encode/decode round trip changed")
        if msg.error is not None:  # the accessors must not raise on any decoded Error TLV
            e = msg.error
            (e.known_code, e.supported_versions, e.echo, e.cookie, e.refused_option_kinds,
             e.retry_delay_s, e.icmp_code)
    # Rule 3: fed in chunks, the decoder gives the same answer.
    decoder = wc.ConvertDecoder(sender, private_types=private)
    result = ("need-more",)
    fed = 0
    for piece in chunks(flags >> 2, payload):
        fed += len(piece)
        try:
            message = decoder.feed(piece)
        except wc.ConvertProtocolError as exc:
            result = ("error", exc.code)
            break
        if message is not None:
            result = ("ok", message, decoder.leftover + payload[fed:])
            break
    check(result == whole, f"chunked decode {result!r} != whole decode {whole!r}")
    if result[0] == "error":
        reply = decoder.error_reply(decoder._error)  # what the converter sends back
        wc.encode_message(reply, wc.ConvertSender.CONVERTER)
    elif result[0] == "need-more":
        try:
            decoder.feed_eof()
        except wc.ConvertProtocolError as exc:
            wc.encode_message(decoder.error_reply(exc), wc.ConvertSender.CONVERTER)


def seeds() -> list[bytes]:
    v4 = ipaddress.ip_address("192.0.2.10")
    v6 = ipaddress.ip_address("2001:db8::1")
    client = [
        wc.ConvertMessage((wc.ConnectTlv(443, v4),)),
        wc.ConvertMessage((wc.ConnectTlv(80, v6, (wc.TcpOption(2, b"\x05\xb4"),)),)),
        wc.ConvertMessage((wc.InfoTlv(),)),
        wc.ConvertMessage((wc.InfoTlv(), wc.ConnectTlv(443, v4),
                           wc.CookieTlv(b"\x01" * 16))),
    ]
    converter = [
        wc.ConvertMessage(()),
        wc.ConvertMessage((wc.SupportedTcpExtTlv((3, 4, 8, 30)),)),
        wc.ConvertMessage((wc.ErrorTlv.unsupported_version(),)),
        wc.ConvertMessage((wc.ErrorTlv.malformed(b"\x01\x02\x22\x63"),)),
        wc.ConvertMessage((wc.ErrorTlv.unsupported_tcp_option((30, 34)),)),
        wc.ConvertMessage((wc.ErrorTlv.destination_unreachable(3),)),
        wc.ConvertMessage((wc.ErrorTlv.missing_cookie(b"\x02" * 8),)),
    ]
    out = [bytes([1 | (s << 2)]) + m.encode() + b"GET /" for m in client for s in (0, 3)]
    out += [bytes([s << 2]) + m.encode() for m in converter for s in (0, 5)]
    return out


if __name__ == "__main__":
    main(one_input)
