"""Pure parsing of the kernel's socket-info structs, from crafted byte strings.

Layouts are written out here independently of the module (uapi linux/tcp.h and
linux/mptcp.h) so a slip in either shows up as a mismatch.
"""

from __future__ import annotations

import socket
import struct
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mptcp_proxy.errors import KernelError
from mptcp_proxy.observe import sockinfo as si

# struct tcp_info up to tcpi_total_rto_time (6.7+), 248 bytes, in C order.
TCP_INFO_FMT = ("=8B" "4I" "5I" "4I" "8I" "2I" "I"   # ..total_retrans: 104 (2.6)
                "4Q" "2I" "4I" "Q" "3Q" "2I" "2Q" "2I" "I" "I" "I" "I" "2H" "I")
TCP_INFO_NAMES = (
    "state ca_state retransmits probes backoff options _wscale _flags7 "
    "rto_us ato_us snd_mss rcv_mss unacked sacked lost retrans fackets "
    "last_data_sent_ms last_ack_sent_ms last_data_recv_ms last_ack_recv_ms "
    "pmtu rcv_ssthresh rtt_us rttvar_us snd_ssthresh snd_cwnd advmss reordering "
    "rcv_rtt_us rcv_space total_retrans "
    "pacing_rate max_pacing_rate bytes_acked bytes_received segs_out segs_in "
    "notsent_bytes min_rtt_us data_segs_in data_segs_out delivery_rate "
    "busy_time_us rwnd_limited_us sndbuf_limited_us delivered delivered_ce "
    "bytes_sent bytes_retrans dsack_dups reord_seen rcv_ooopack snd_wnd rcv_wnd "
    "rehash total_rto total_rto_recoveries total_rto_time_ms").split()
# The brief's (and KERNEL-FACTS') format for struct mptcp_info, 6.10+.
MPTCP_INFO_FMT = "=6B2xII3Q3BxI4Q4B3I"

little_endian_only = pytest.mark.skipif(sys.byteorder != "little",
                                        reason="captured on x86_64")


def tcp_info_values() -> dict[str, int]:
    """A distinct value per field, small enough for its type."""
    values = {name: 100 + i for i, name in enumerate(TCP_INFO_NAMES)}
    values["state"] = si.TCP_CLOSE_WAIT
    values["options"] = si.TCPI_OPT_SACK | si.TCPI_OPT_WSCALE | si.TCPI_OPT_SYN_DATA
    values["_wscale"] = 0x7A if sys.byteorder == "little" else 0xA7  # snd 10, rcv 7
    values["_flags7"] = 0b101 if sys.byteorder == "little" else 0xC0  # app_limited, tfo 2
    values["bytes_acked"] = 1 << 40
    values["pacing_rate"] = 2**64 - 1
    return values


def tcp_info_bytes(values: dict[str, int], trailer: bytes = bytes(32)) -> bytes:
    return struct.pack(TCP_INFO_FMT, *(values[n] for n in TCP_INFO_NAMES)) + trailer


class TestLayouts:
    def test_tcp_info_offsets_match_uapi(self) -> None:
        # offsets from uapi linux/tcp.h (the same ones other tools static_assert)
        offsets = {name: off for name, off, _ in si._TCP_INFO_LAYOUT}
        assert offsets["rto_us"] == 8
        assert offsets["snd_mss"] == 16
        assert offsets["rtt_us"] == 68
        assert offsets["rttvar_us"] == 72
        assert offsets["rcv_rtt_us"] == 92
        assert offsets["total_retrans"] == 100
        assert offsets["bytes_acked"] == 120
        assert offsets["bytes_received"] == 128
        assert offsets["min_rtt_us"] == 148
        assert offsets["delivery_rate"] == 160
        assert offsets["bytes_sent"] == 200
        assert offsets["bytes_retrans"] == 208
        assert offsets["snd_wnd"] == 228
        assert offsets["rcv_wnd"] == 232
        assert offsets["total_rto"] == 240
        assert si.TCP_INFO_MIN_LEN == 104
        assert si.TCP_INFO_PARSED_LEN == struct.calcsize(TCP_INFO_FMT) == 248

    def test_mptcp_info_layout_matches_documented_format(self) -> None:
        assert struct.calcsize(MPTCP_INFO_FMT) == si.MPTCP_INFO_LEN == 96
        assert si.MPTCP_INFO_MIN_LEN == 40
        offsets = {name: off for name, off, _ in si._MPTCP_INFO_LAYOUT}
        assert offsets["flags"] == 8
        assert offsets["token"] == 12
        assert offsets["local_addr_used"] == 40
        assert offsets["retransmits"] == 44
        assert offsets["bytes_acked"] == 72
        assert offsets["subflows_total"] == 80
        assert offsets["last_data_sent_ms"] == 84

    def test_subflow_struct_sizes(self) -> None:
        # 6.18 reports size_kernel 256 (addrs) and 264 (subflow_info) on x86_64
        assert si.SUBFLOW_ADDRS_LEN == 256
        if struct.calcsize("P") == 8:
            assert si.SUBFLOW_INFO_ADDRS_OFFSET == 8
            assert si.SUBFLOW_INFO_LEN == 264
        assert si.FULL_INFO_LEN == 136

    def test_constants(self) -> None:
        assert (si.IPPROTO_MPTCP, si.SOL_MPTCP, si.TCP_IS_MPTCP) == (262, 284, 43)
        assert (si.MPTCP_INFO, si.MPTCP_TCPINFO, si.MPTCP_SUBFLOW_ADDRS,
                si.MPTCP_FULL_INFO) == (1, 2, 3, 4)
        assert si.TCP_ESTABLISHED == si.TcpState.ESTABLISHED == 1
        assert si.TCP_CLOSE_WAIT == si.TcpState.CLOSE_WAIT == 8
        assert si.TCP_LISTEN == si.TcpState.LISTEN == 10
        assert si.SockInfoError.__mro__[1] is KernelError


class TestTcpInfo:
    def test_full_6_18_struct(self) -> None:
        values = tcp_info_values()
        info = si.parse_tcp_info(tcp_info_bytes(values))
        assert info.length == 280
        for name in TCP_INFO_NAMES:
            if name.startswith("_") or name in ("fackets", "last_ack_sent_ms"):
                continue
            assert getattr(info, name) == values[name], name
        assert info.state_name == "CLOSE_WAIT"
        assert (info.snd_wscale, info.rcv_wscale) == (10, 7)
        assert info.delivery_rate_app_limited is True
        assert info.fastopen_client_fail == 2

    def test_option_flags(self) -> None:
        info = si.parse_tcp_info(tcp_info_bytes(tcp_info_values()))
        assert info.has_sack and info.has_wscale and info.has_syn_data
        assert not info.has_timestamps and not info.has_ecn

    @pytest.mark.parametrize("byteorder, b6, b7", [("little", 0x7A, 0b101), ("big", 0xA7, 0xC0)])
    def test_bitfields_follow_target_byte_order(self, byteorder: str, b6: int, b7: int) -> None:
        data = bytearray(tcp_info_bytes(tcp_info_values()))
        data[6], data[7] = b6, b7
        info = si.parse_tcp_info(bytes(data), byteorder=byteorder)
        assert (info.snd_wscale, info.rcv_wscale) == (10, 7)
        assert (info.delivery_rate_app_limited, info.fastopen_client_fail) == (True, 2)

    @pytest.mark.parametrize("length, last_present, first_missing", [
        (104, "total_retrans", "pacing_rate"),        # 2.6
        (144, "segs_in", "notsent_bytes"),            # 4.2
        (192, "sndbuf_limited_us", "delivered"),      # 4.10
        (232, "snd_wnd", "rcv_wnd"),                  # 5.4
        (240, "rehash", "total_rto"),                 # 6.2
        (248, "total_rto_time_ms", None),             # 6.7
    ])
    def test_short_structs_from_older_kernels(self, length: int, last_present: str,
                                              first_missing: str | None) -> None:
        values = tcp_info_values()
        info = si.parse_tcp_info(tcp_info_bytes(values)[:length])
        assert info.length == length
        assert getattr(info, last_present) == values[last_present]
        if first_missing is not None:
            assert getattr(info, first_missing) is None
            assert info.total_rto_time_ms is None

    def test_partial_field_is_none_not_garbage(self) -> None:
        # 124 bytes: bytes_acked (120..128) is cut in half
        info = si.parse_tcp_info(tcp_info_bytes(tcp_info_values())[:124])
        assert info.max_pacing_rate is not None
        assert info.bytes_acked is None

    @pytest.mark.parametrize("length", [0, 1, 8, 103])
    def test_too_short(self, length: int) -> None:
        with pytest.raises(si.SockInfoError, match="tcp_info is"):
            si.parse_tcp_info(bytes(length))

    def test_unknown_state_keeps_number(self) -> None:
        data = bytearray(104)
        data[0] = 99
        assert si.parse_tcp_info(bytes(data)).state_name == "99"


# 96 bytes captured from MPTCP_INFO on a 6.18 client after sending 1000 bytes.
CAPTURED_MPTCP_INFO = bytes.fromhex(
    "000000020000000002000000"
    "0b9fec4c3fe9038ac0c0ad6f3fe9038ac0c0ad6fc008f929aceaf804"
    "00000000000000000000000000000000e803000000000000"
    "0000000000000000e8030000000000000100000034000000"
    "3400000034000000")


class TestMptcpInfo:
    def values(self) -> tuple[int, ...]:
        return (1, 2, 3, 4, 5, 6,                   # subflows .. add_addr_accepted_max
                si.MPTCP_INFO_FLAG_REMOTE_KEY_RECEIVED, 0xDEADBEEF,
                2**64 - 1, 2**63, 12345,            # write_seq, snd_una, rcv_nxt
                7, 8, 1,                            # local_addr_used/max, csum
                9, 10, 11, 12, 13,                  # retransmits, bytes_*
                2, 0, 0, 0,                         # subflows_total, reserved[3]
                14, 15, 16)

    def test_full_struct(self) -> None:
        info = si.parse_mptcp_info(struct.pack(MPTCP_INFO_FMT, *self.values()))
        assert info == si.MptcpInfo(
            length=96, subflows=1, add_addr_signal=2, add_addr_accepted=3, subflows_max=4,
            add_addr_signal_max=5, add_addr_accepted_max=6, flags=2, token=0xDEADBEEF,
            write_seq=2**64 - 1, snd_una=2**63, rcv_nxt=12345, local_addr_used=7,
            local_addr_max=8, csum_enabled=1, retransmits=9, bytes_retrans=10, bytes_sent=11,
            bytes_received=12, bytes_acked=13, subflows_total=2, last_data_sent_ms=14,
            last_data_recv_ms=15, last_ack_recv_ms=16)
        assert info.remote_key_received and not info.fallback
        assert info.live_subflows == 2

    @little_endian_only
    def test_captured_vector(self) -> None:
        info = si.parse_mptcp_info(CAPTURED_MPTCP_INFO)
        assert (info.subflows, info.subflows_max, info.subflows_total) == (0, 2, 1)
        assert info.flags == si.MPTCP_INFO_FLAG_REMOTE_KEY_RECEIVED
        assert info.token == 0x4CEC9F0B
        assert info.bytes_sent == info.bytes_acked == 1000
        assert info.bytes_received == 0
        assert info.last_data_sent_ms == info.last_ack_recv_ms == 52

    @pytest.mark.parametrize("length, present, missing", [
        (40, "rcv_nxt", "local_addr_used"),       # 5.9
        (42, "local_addr_max", "csum_enabled"),   # 5.12
        (48, "csum_enabled", "bytes_retrans"),    # 5.14 (43 bytes, padded to 48)
        (80, "bytes_acked", "subflows_total"),    # 6.5
        (88, "subflows_total", "last_data_sent_ms"),  # 6.8 (81, padded to 88)
    ])
    def test_short_structs_from_older_kernels(self, length: int, present: str,
                                              missing: str) -> None:
        info = si.parse_mptcp_info(struct.pack(MPTCP_INFO_FMT, *self.values())[:length])
        assert getattr(info, present) is not None
        assert getattr(info, missing) is None
        assert info.last_ack_recv_ms is None

    def test_live_subflows_without_subflows_total(self) -> None:
        info = si.parse_mptcp_info(struct.pack(MPTCP_INFO_FMT, *self.values())[:80])
        assert info.live_subflows == 2  # 1 extra + the initial one

    def test_fallback_flag(self) -> None:
        values = list(self.values())
        values[6] = si.MPTCP_INFO_FLAG_FALLBACK
        assert si.parse_mptcp_info(struct.pack(MPTCP_INFO_FMT, *values)).fallback

    def test_too_short(self) -> None:
        with pytest.raises(si.SockInfoError, match="mptcp_info is 39 bytes"):
            si.parse_mptcp_info(bytes(39))


def sockaddr_in(host: str, port: int, size: int = 128) -> bytes:
    raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(host)
    return raw.ljust(size, b"\0")[:size]


def sockaddr_in6(host: str, port: int, size: int = 128) -> bytes:
    raw = (struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", port, 0)
           + socket.inet_pton(socket.AF_INET6, host) + struct.pack("=I", 0))
    return raw.ljust(size, b"\0")[:size]


class TestSockaddr:
    def test_ipv4(self) -> None:
        assert si.parse_sockaddr(sockaddr_in("192.0.2.7", 443)) == (
            socket.AF_INET, ("192.0.2.7", 443))

    def test_ipv6_and_mapped(self) -> None:
        assert si.parse_sockaddr(sockaddr_in6("2001:db8::1", 8080)) == (
            socket.AF_INET6, ("2001:db8::1", 8080))
        assert si.parse_sockaddr(sockaddr_in6("::ffff:127.0.0.1", 1)) == (
            socket.AF_INET6, ("::ffff:127.0.0.1", 1))

    def test_unspec_and_unknown_family(self) -> None:
        assert si.parse_sockaddr(bytes(128)) == (0, None)
        assert si.parse_sockaddr(struct.pack("=H", socket.AF_UNIX).ljust(128, b"x")) == (
            socket.AF_UNIX, None)

    @pytest.mark.parametrize("data", [b"", b"\x02", sockaddr_in("10.0.0.1", 1, 7),
                                      sockaddr_in6("::1", 1, 23)])
    def test_truncated(self, data: bytes) -> None:
        with pytest.raises(si.SockInfoError):
            si.parse_sockaddr(data)

    def test_subflow_addrs(self) -> None:
        data = sockaddr_in("10.0.0.1", 40000) + sockaddr_in("10.0.0.2", 5201)
        assert si.parse_subflow_addrs(data) == (
            socket.AF_INET, ("10.0.0.1", 40000), ("10.0.0.2", 5201))
        data6 = sockaddr_in6("fd00::1", 1) + sockaddr_in6("fd00::2", 2)
        assert si.parse_subflow_addrs(data6) == (
            socket.AF_INET6, ("fd00::1", 1), ("fd00::2", 2))

    def test_subflow_addrs_short(self) -> None:
        with pytest.raises(si.SockInfoError, match="mptcp_subflow_addrs is 255"):
            si.parse_subflow_addrs(bytes(255))


class TestSubflowData:
    def test_request(self) -> None:
        req = si.subflow_data_request(256, 2)
        assert req[:16] == struct.pack("=IIII", 16, 0, 0, 256)
        assert len(req) == 16 + 512 and not any(req[16:])

    def answer(self, num: int, size_user: int, elements: list[bytes], size_kernel: int = 280) -> bytes:
        return struct.pack("=IIII", 16, num, size_kernel, size_user) + b"".join(elements)

    def test_two_elements(self) -> None:
        a = sockaddr_in("10.0.0.1", 1) + sockaddr_in("10.0.0.9", 9)
        b = sockaddr_in("10.0.1.1", 2) + sockaddr_in("10.0.0.9", 9)
        header, elements = si.parse_subflow_data(self.answer(2, 256, [a, b], 256))
        assert header == si.SubflowDataHeader(16, 2, 256, 256)
        assert elements == [a, b]

    def test_more_subflows_than_room(self) -> None:
        # num_subflows counts all; optlen covers only what was copied
        header, elements = si.parse_subflow_data(self.answer(3, 280, [bytes(280)]))
        assert header.num_subflows == 3
        assert len(elements) == 1

    def test_partial_trailing_element_ignored(self) -> None:
        _, elements = si.parse_subflow_data(self.answer(2, 280, [bytes(280), bytes(100)]))
        assert len(elements) == 1

    def test_older_kernel_smaller_elements(self) -> None:
        # a kernel with a 232-byte tcp_info copies 232 per element: stride is size_user
        values = tcp_info_values()
        elem = tcp_info_bytes(values)[:232]
        _, elements = si.parse_subflow_data(self.answer(2, 232, [elem, elem], 232))
        infos = [si.parse_tcp_info(e) for e in elements]
        assert [i.snd_wnd for i in infos] == [values["snd_wnd"]] * 2
        assert infos[1].rcv_wnd is None

    def test_header_only_and_zero_size(self) -> None:
        assert si.parse_subflow_data(self.answer(1, 280, []))[1] == []
        assert si.parse_subflow_data(self.answer(5, 0, [bytes(64)]))[1] == []

    @pytest.mark.parametrize("data", [
        bytes(15),
        struct.pack("=IIII", 8, 0, 0, 0),
        struct.pack("=IIII", 64, 1, 0, 0),
    ])
    def test_malformed(self, data: bytes) -> None:
        with pytest.raises(si.SockInfoError):
            si.parse_subflow_data(data)


class TestFullInfo:
    def test_request(self) -> None:
        req = si.full_info_request(4, 0x1000, 0x2000)
        assert len(req) == si.FULL_INFO_LEN
        assert struct.unpack_from("=6IQQ", req) == (0, 512, 0, si.SUBFLOW_INFO_LEN, 0, 4,
                                                    0x1000, 0x2000)

    def build(self, count: int, num: int | None = None, sf_size: int = si.SUBFLOW_INFO_LEN,
              ti_size: int = 280, with_info: bool = True) -> tuple[bytes, bytes, bytes]:
        head = struct.pack("=6IQQ", 280, ti_size, si.SUBFLOW_INFO_LEN, sf_size,
                           count if num is None else num, 8, 0, 0)
        if with_info:
            head += struct.pack(MPTCP_INFO_FMT, *TestMptcpInfo().values())
        sfinfo = b""
        tcpinfo = b""
        for i in range(count):
            addrs = sockaddr_in(f"10.0.{i}.1", 1000 + i) + sockaddr_in("10.9.9.9", 443)
            entry = struct.pack("=I", i + 1).ljust(si.SUBFLOW_INFO_ADDRS_OFFSET, b"\0") + addrs
            sfinfo += entry[:sf_size]
            values = tcp_info_values()
            values["bytes_acked"] = 1000 * (i + 1)
            tcpinfo += tcp_info_bytes(values)[:ti_size]
        return head, sfinfo.ljust(8 * si.SUBFLOW_INFO_LEN, b"\0"), tcpinfo.ljust(8 * 512, b"\0")

    def test_two_subflows(self) -> None:
        header, info, subs = si.parse_full_info(*self.build(2))
        assert header.num_subflows == 2 and header.size_tcpinfo_user == 280
        assert info is not None and info.token == 0xDEADBEEF
        assert [s.id for s in subs] == [1, 2]
        assert [s.local for s in subs] == [("10.0.0.1", 1000), ("10.0.1.1", 1001)]
        assert {s.remote for s in subs} == {("10.9.9.9", 443)}
        assert [s.bytes_acked for s in subs] == [1000, 2000]
        assert all(s.family == socket.AF_INET and s.state == si.TCP_CLOSE_WAIT for s in subs)

    def test_header_without_mptcp_info(self) -> None:
        _, info, subs = si.parse_full_info(*self.build(1, with_info=False))
        assert info is None and len(subs) == 1

    def test_more_subflows_than_room(self) -> None:
        head, sfinfo, tcpinfo = self.build(8, num=11)
        header, _, subs = si.parse_full_info(head, sfinfo, tcpinfo)
        assert header.num_subflows == 11 and len(subs) == 8  # size_arrays_user

    def test_no_tcp_info_and_no_addrs(self) -> None:
        _, _, subs = si.parse_full_info(*self.build(1, sf_size=4, ti_size=0))
        assert subs == [si.SubflowInfo(id=1, family=0, local=None, remote=None, tcp=None)]
        assert subs[0].bytes_sent is None and subs[0].rtt_us is None

    def test_malformed(self) -> None:
        with pytest.raises(si.SockInfoError):
            si.parse_full_info(bytes(39), b"", b"")
        head, _, _ = self.build(2)
        with pytest.raises(si.SockInfoError, match="buffers hold"):
            si.parse_full_info(head, bytes(100), bytes(100))
        head = struct.pack("=6IQQ", 0, 0, 0, 0, 2**32 - 1, 2**32 - 1, 0, 0)
        with pytest.raises(si.SockInfoError, match="claims"):
            si.parse_full_info(head, b"", b"")


class TestFuzz:
    """Garbage from the kernel may raise SockInfoError, nothing else."""

    @given(st.binary(max_size=400))
    def test_tcp_info(self, data: bytes) -> None:
        try:
            si.parse_tcp_info(data)
        except si.SockInfoError:
            pass

    @given(st.binary(max_size=120))
    def test_mptcp_info(self, data: bytes) -> None:
        try:
            si.parse_mptcp_info(data)
        except si.SockInfoError:
            pass

    @given(st.binary(max_size=300))
    def test_addrs(self, data: bytes) -> None:
        try:
            si.parse_subflow_addrs(data)
        except si.SockInfoError:
            pass

    @given(st.binary(max_size=600))
    def test_subflow_data(self, data: bytes) -> None:
        try:
            si.parse_subflow_data(data)
        except si.SockInfoError:
            pass

    @given(st.binary(min_size=40, max_size=140), st.binary(max_size=600),
           st.binary(max_size=600))
    def test_full_info(self, head: bytes, sfinfo: bytes, tcpinfo: bytes) -> None:
        try:
            si.parse_full_info(head, sfinfo, tcpinfo)
        except si.SockInfoError:
            pass
