"""nfnetlink_queue messages (lab/nfqueue.py). Pure, no root.

Vectors are written from the uapi structs: nlmsghdr {u32 len, u16 type, u16
flags, u32 seq, u32 pid} in host (little-endian) order, nfgenmsg {u8 family,
u8 version, be16 res_id}, nlattr {u16 len, u16 type} and big-endian payloads.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mptcp_proxy.errors import LabError
from mptcp_proxy.lab import nfqueue as nfq
from mptcp_proxy.lab.nfqueue import (
    Ack,
    ConfigFlag,
    NfqueueError,
    Other,
    QueuedPacket,
    SkbInfo,
    Verdict,
    bind_request,
    config_request,
    decode_messages,
    fast_packet_id,
    verdict_message,
)

# type 0x0302: NFNL_SUBSYS_QUEUE (3) << 8 | NFQNL_MSG_CONFIG (2); flags REQUEST|ACK
BIND_Q3_SEQ1 = bytes.fromhex(
    "1c000000" "0203" "0500" "01000000" "00000000"   # nlmsghdr: 28 bytes
    "00" "00" "0003"                                 # nfgenmsg: AF_UNSPEC, v0, queue 3
    "0800" "0100" "01" "00" "0000")                  # NFQA_CFG_CMD: BIND, pad, pf 0

CONFIG_Q3_SEQ2 = bytes.fromhex(
    "38000000" "0203" "0500" "02000000" "00000000"   # nlmsghdr: 56 bytes
    "00" "00" "0003"
    "0900" "0200" "00000000" "01" "000000"           # NFQA_CFG_PARAMS: range 0, META, pad
    "0800" "0300" "00002710"                         # NFQA_CFG_QUEUE_MAXLEN 10000
    "0800" "0500" "00000004"                         # NFQA_CFG_FLAGS: F_GSO
    "0800" "0400" "00000004")                        # NFQA_CFG_MASK: F_GSO

# type 0x0303: NFQNL_MSG_VERDICT_BATCH; flags REQUEST only (no ACK)
BATCH_ACCEPT_Q1_ID7 = bytes.fromhex(
    "20000000" "0303" "0100" "00000000" "00000000"
    "00" "00" "0001"
    "0c00" "0200" "00000001" "00000007")             # NFQA_VERDICT_HDR: ACCEPT, id 7

# type 0x0301: NFQNL_MSG_VERDICT
DROP_Q1_ID9 = bytes.fromhex(
    "20000000" "0103" "0100" "00000000" "00000000"
    "00" "00" "0001"
    "0c00" "0200" "00000000" "00000009")             # NF_DROP, id 9

# What the kernel sends for a queued IPv4 packet in copy mode META (type 0x0300):
# NFQA_PACKET_HDR first, then in/out ifindex and NFQA_SKB_INFO (GSO).
PACKET_Q2_ID258 = bytes.fromhex(
    "30000000" "0003" "0000" "00000000" "00000000"   # 48 bytes, seq 0, pid 0
    "02" "00" "0002"                                 # AF_INET, v0, queue 2
    "0b00" "0100" "00000102" "0800" "00" "00"        # id 258, ETH_P_IP, hook 0, pad
    "0800" "0500" "0000000a"                         # IFINDEX_INDEV 10
    "0800" "0e00" "00000002")                        # SKB_INFO: GSO

# The same with NFQA_PACKET_HDR last: valid, but not for the fast path.
PACKET_HDR_LAST = PACKET_Q2_ID258[:20] + PACKET_Q2_ID258[32:] + PACKET_Q2_ID258[20:32]

# An acknowledgement (NLMSG_ERROR, error 0) of request seq 5, and a refusal
# (-EBUSY) of request seq 6; each echoes the request's header.
ACK_SEQ5 = struct.pack("=IHHII", 36, 2, 0x100, 5, 0) + struct.pack("=i", 0) + \
    struct.pack("=IHHII", 28, 0x0302, 5, 5, 0)
EBUSY_SEQ6 = struct.pack("=IHHII", 36, 2, 0, 6, 0) + struct.pack("=i", -16) + \
    struct.pack("=IHHII", 28, 0x0302, 5, 6, 0)


def test_bind_request_vector():
    assert bind_request(3, seq=1) == BIND_Q3_SEQ1


def test_config_request_vector():
    assert config_request(3, maxlen=10_000, flags=ConfigFlag.GSO, seq=2) == CONFIG_Q3_SEQ2


def test_config_request_can_clear_a_flag():
    msg = config_request(0, flags=ConfigFlag(0), mask=ConfigFlag.GSO)
    assert msg.endswith(bytes.fromhex("0800050000000000" "0800040000000004"))


def test_verdict_vectors():
    assert verdict_message(1, 7, Verdict.ACCEPT, batch=True) == BATCH_ACCEPT_Q1_ID7
    assert verdict_message(1, 9, Verdict.DROP) == DROP_Q1_ID9


def test_queue_number_must_fit_res_id():
    with pytest.raises(NfqueueError, match="out of range"):
        bind_request(65536)


def test_decode_a_queued_packet():
    assert decode_messages(PACKET_Q2_ID258) == [QueuedPacket(
        queue=2, packet_id=258, hw_protocol=0x0800, hook=0, family=2,
        skb_info=SkbInfo.GSO)]


def test_fast_path_agrees_with_the_decoder():
    assert fast_packet_id(PACKET_Q2_ID258, len(PACKET_Q2_ID258)) == 258
    # The buffer may be larger than the datagram (recv_into a big buffer).
    big = bytearray(PACKET_Q2_ID258 + bytes(100))
    assert fast_packet_id(big, len(PACKET_Q2_ID258)) == 258


@pytest.mark.parametrize("data", [
    ACK_SEQ5,                                  # not a packet
    PACKET_Q2_ID258 + PACKET_Q2_ID258,         # two messages in one datagram
    PACKET_Q2_ID258[:30],                      # truncated
    PACKET_HDR_LAST,                           # header not first
], ids=["ack", "two", "short", "hdr-not-first"])
def test_fast_path_leaves_everything_else_to_the_decoder(data):
    assert fast_packet_id(data, len(data)) is None


def test_decoder_finds_the_header_anywhere():
    assert decode_messages(PACKET_HDR_LAST) == decode_messages(PACKET_Q2_ID258)


def test_decode_two_packets_in_one_datagram():
    msgs = decode_messages(PACKET_Q2_ID258 + PACKET_Q2_ID258)
    assert [m.packet_id for m in msgs] == [258, 258]


def test_decode_acks_and_refusals_by_request_seq():
    assert decode_messages(ACK_SEQ5 + EBUSY_SEQ6) == [Ack(seq=5, errno=0),
                                                       Ack(seq=6, errno=16)]


def test_decode_other_messages_without_interpreting_them():
    done = struct.pack("=IHHII", 20, nfq.NLMSG_DONE, 0, 9, 0) + bytes(4)
    assert decode_messages(done) == [Other(msg_type=nfq.NLMSG_DONE, seq=9)]


@pytest.mark.parametrize("data, match", [
    (PACKET_Q2_ID258[:10], "truncated netlink header"),
    (struct.pack("=IHHII", 8, 0x0300, 0, 0, 0), "does not fit"),
    (struct.pack("=IHHII", 99, 0x0300, 0, 0, 0), "does not fit"),
    (PACKET_Q2_ID258[:18] + bytes.fromhex("0000"), "does not fit"),
    (struct.pack("=IHHII", 18, 0x0300, 0, 0, 0) + b"\0\0", "without nfgenmsg"),
    (struct.pack("=IHHII", 28, 0x0300, 0, 0, 0) + bytes(4) + bytes.fromhex("080005000000000a"),
     "without NFQA_PACKET_HDR"),
    (struct.pack("=IHHII", 28, 0x0300, 0, 0, 0) + bytes(4) + bytes.fromhex("0800010000000001"),
     "NFQA_PACKET_HDR of 4 bytes"),
    (struct.pack("=IHHII", 22, 0x0300, 0, 0, 0) + bytes(4) + bytes.fromhex("0900"),
     "truncated attribute"),
    (struct.pack("=IHHII", 28, 0x0300, 0, 0, 0) + bytes(4) + bytes.fromhex("2000010000000001"),
     "does not fit"),
    (struct.pack("=IHHII", 18, 2, 0, 0, 0) + b"\0\0", "truncated NLMSG_ERROR"),
], ids=["short-header", "len-too-small", "len-too-big", "len-past-data", "no-nfgenmsg",
        "no-packet-hdr", "short-packet-hdr", "short-attr", "attr-past-end", "short-error"])
def test_malformed_input_is_an_nfqueue_error(data, match):
    with pytest.raises(NfqueueError, match=match):
        decode_messages(data)


def test_nfqueue_error_is_a_lab_error():
    assert issubclass(NfqueueError, LabError)


@given(st.binary(max_size=256))
def test_fuzz_decoder_raises_only_its_own_error(data):
    try:
        decode_messages(data)
    except NfqueueError:
        pass
    fast_packet_id(data, len(data))  # never raises


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF), st.booleans())
def test_verdicts_round_trip_through_the_attribute_walker(queue, packet_id, batch):
    msg = verdict_message(queue, packet_id, Verdict.ACCEPT, batch=batch)
    length, msg_type = struct.unpack_from("=IH", msg)
    assert length == len(msg) and msg_type == 0x0300 | (3 if batch else 1)
    attrs = list(nfq.iter_attrs(msg, 20, len(msg)))
    assert [(t, msg[a:b]) for t, a, b in attrs] == [
        (nfq.PacketAttr.VERDICT_HDR, struct.pack("!II", 1, packet_id))]


def test_the_codec_is_pure():
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(nfq))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "struct", "dataclasses", "enum", "mptcp_proxy.errors"}
