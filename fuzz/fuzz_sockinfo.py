"""Fuzz the pure sockinfo parsers (src/mptcp_proxy/observe/sockinfo.py).

Byte 0 picks the parser (mod 6; bit 3 = big-endian tcp_info bitfields);
for parse_full_info the next 4 bytes split the rest into head/sfinfo/tcpinfo.
Expected rejection: SockInfoError. Properties of the parsed objects must not
raise either.
"""

from __future__ import annotations

import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import instrumented, main  # noqa: E402

with instrumented():
    from mptcp_proxy.observe import sockinfo as si

NAME = "sockinfo"


def _touch_tcp(t) -> None:
    (t.has_timestamps, t.has_sack, t.has_wscale, t.has_ecn, t.has_syn_data, t.state_name)


def _touch_mptcp(m) -> None:
    (m.fallback, m.remote_key_received, m.live_subflows)


def one_input(data: bytes) -> None:
    if not data:
        return
    which, payload = data[0], data[1:]
    try:
        kind = which % 6
        if kind == 0:
            _touch_tcp(si.parse_tcp_info(payload, byteorder="big" if which & 8 else "little"))
        elif kind == 1:
            _touch_mptcp(si.parse_mptcp_info(payload))
        elif kind == 2:
            si.parse_sockaddr(payload)
        elif kind == 3:
            si.parse_subflow_addrs(payload)
        elif kind == 4:
            si.parse_subflow_data(payload)
        else:
            a, b = struct.unpack("!HH", payload[:4].ljust(4, b"\0"))
            rest = payload[4:]
            a %= len(rest) + 1
            b %= len(rest) - a + 1
            header, info, subflows = si.parse_full_info(rest[:a], rest[a:a + b], rest[a + b:])
            if info is not None:
                _touch_mptcp(info)
            for sf in subflows:
                (sf.state, sf.bytes_sent, sf.bytes_received, sf.bytes_acked, sf.rtt_us)
                if sf.tcp is not None:
                    _touch_tcp(sf.tcp)
    except si.SockInfoError:
        pass


def seeds() -> list[bytes]:
    v4 = struct.pack("=H", 2) + struct.pack("!H", 443) + bytes([192, 0, 2, 1]) + bytes(8)
    v6 = (struct.pack("=H", 10) + struct.pack("!H", 80) + bytes(4)
          + bytes.fromhex("20010db8000000000000000000000001") + bytes(4))
    addrs = v4.ljust(128, b"\0") + v6.ljust(128, b"\0")
    tcp = bytes([1, 0, 0, 0, 0, 7, 0x77, 0]) + bytes(range(240))
    mptcp = bytes(range(96))
    sub = si.subflow_data_request(len(addrs), 2)
    sub = struct.pack("=IIII", 16, 2, len(addrs), len(addrs)) + addrs + addrs
    sfinfo = struct.pack("=I", 1).ljust(si.SUBFLOW_INFO_ADDRS_OFFSET, b"\0") + addrs
    head = struct.pack("=IIIIIIQQ", len(tcp), len(tcp), len(sfinfo), len(sfinfo), 1, 1, 0, 0) + mptcp
    full = struct.pack("!HH", len(head), len(sfinfo)) + head + sfinfo + tcp
    return [b"\x00" + tcp, b"\x08" + tcp[:104], b"\x01" + mptcp, b"\x01" + mptcp[:40],
            b"\x02" + v4, b"\x02" + v6, b"\x03" + addrs, b"\x04" + sub, b"\x05" + full,
            b"\x05" + struct.pack("!HH", 136, 0) + si.full_info_request(4)]


if __name__ == "__main__":
    main(one_input)
