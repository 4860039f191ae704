"""Fuzz the converter's sans-IO handshake (src/mptcp_proxy/modes/convert.py).

Byte 0: bits 0-1 = settings (open / target allow-list / cookies / no connect
options), bit 2 = IPv6 client, bit 3 = end by deadline instead of EOF,
bits 4-7 = chunking seed. The handshake never raises on peer bytes: every
outcome is an action, so *any* exception is a crash. The same bytes whole
and in chunks must give the same decision.
"""

from __future__ import annotations

import ipaddress
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import check, chunks, instrumented, main  # noqa: E402

with instrumented():
    from mptcp_proxy.modes import convert as mc
    from mptcp_proxy.modes.policy import TargetPolicy, parse_networks
    from mptcp_proxy.wire import convert as wc

NAME = "convert_handshake"
NOW = 1_700_000_000.0
SECRET = b"0123456789abcdef-fuzz-secret"
CLIENTS = (ipaddress.ip_address("10.0.0.7"), ipaddress.ip_address("fd00::7"))
SETTINGS = (
    mc.ConvertSettings(),
    mc.ConvertSettings(targets=TargetPolicy(
        allow_targets=parse_networks(["192.0.2.0/24"], "k")).with_local(
            {ipaddress.ip_address("192.0.2.1")}), supported_kinds=(3, 4, 8, 30, 34)),
    mc.ConvertSettings(cookies=mc.CookieAuthority(SECRET)),
    mc.ConvertSettings(connect_option_kinds=frozenset()),
)
NEGOTIATED = mc.Negotiated(mptcp=True, sack=True, timestamps=True, window_scale=7,
                           mptcp_checksum=True)


def _summary(action, hs):
    if action is None:
        return ("none",)
    if isinstance(action, mc.ReplyAndClose):
        return ("reply-close", action.reason, action.code, hs.outcome)
    if isinstance(action, mc.OpenUpstream):
        return ("open", action.address, action.port, action.requested_options, hs.outcome)
    return (type(action).__name__, hs.outcome)


def _finish(action, hs) -> None:
    """Drive the handshake to its end the way the server would."""
    if isinstance(action, mc.ReplyAndClose):
        decoded, _ = wc.decode_message(action.reply, wc.ConvertSender.CONVERTER)
        check((decoded.error is not None) == (action.code is not None),
              f"reply TLVs {decoded.tlvs!r} do not match code {action.code!r}")
    if isinstance(action, mc.OpenUpstream):
        if hs.connect.port % 2:
            start = hs.upstream_connected(NEGOTIATED if hs.wants_negotiated else None)
            if start.reply:
                wc.decode_message(start.reply, wc.ConvertSender.CONVERTER)
        else:
            kind = list(mc.UpstreamFailureKind)[hs.connect.port % len(mc.UpstreamFailureKind)]
            hs.upstream_failed(mc.UpstreamFailure(kind, hs.connect.port % 256))


def one_input(data: bytes) -> None:
    if not data:
        return
    flags, payload = data[0], data[1:]
    settings, client = SETTINGS[flags & 3], CLIENTS[(flags >> 2) & 1]
    by_deadline = bool(flags & 8)

    hs = mc.ConvertHandshake(settings, client, NOW)
    action = hs.start()
    if action is not None:
        return
    if payload:
        action = hs.receive(payload)
    if action is None:
        action = hs.expire() if by_deadline else hs.receive_eof()
    whole = _summary(action, hs)
    whole_early = hs.early_data
    _finish(action, hs)

    hs = mc.ConvertHandshake(settings, client, NOW)
    hs.start()
    action, fed = None, 0
    for piece in chunks(flags >> 4, payload):
        fed += len(piece)
        action = hs.receive(piece)
        if action is not None:
            break
    if action is None:
        action = hs.expire() if by_deadline else hs.receive_eof()
    chunked = _summary(action, hs)
    check(chunked == whole, f"chunked handshake {chunked!r} != whole {whole!r}")
    if isinstance(action, mc.OpenUpstream):
        check(action.early_data + payload[fed:] == whole_early, "early data differs")
    _finish(action, hs)


def seeds() -> list[bytes]:
    cookie = mc.CookieAuthority(SECRET).issue(CLIENTS[0], NOW)
    v4 = ipaddress.ip_address("192.0.2.10")
    msgs = [
        wc.ConvertMessage((wc.ConnectTlv(443, v4),)),
        wc.ConvertMessage((wc.ConnectTlv(80, ipaddress.ip_address("2001:db8::1"),
                                         (wc.TcpOption(2, b"\x05\xb4"),
                                          wc.TcpOption(30, b"\x00\x81"))),)),
        wc.ConvertMessage((wc.InfoTlv(),)),
        wc.ConvertMessage((wc.InfoTlv(), wc.ConnectTlv(443, v4))),
        wc.ConvertMessage((wc.ConnectTlv(443, ipaddress.ip_address("127.0.0.1")),)),
        wc.ConvertMessage((wc.ConnectTlv(443, v4), wc.CookieTlv(cookie))),
    ]
    return [bytes([f]) + m.encode() + b"hello" for m in msgs for f in (0, 1, 2, 0x36, 0x0b)]


if __name__ == "__main__":
    main(one_input)
