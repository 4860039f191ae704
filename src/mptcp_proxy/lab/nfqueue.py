"""nfnetlink_queue messages: what the lab's delay emulator says to the kernel. Pure.

Bytes in, small frozen values out, and back: no sockets, no clock. The
emulator (:mod:`mptcp_proxy.lab.impair`) owns the socket.

Facts from the uapi headers (``linux/netlink.h``, ``linux/netfilter/nfnetlink.h``,
``linux/netfilter/nfnetlink_queue.h``):

- A netlink message is ``struct nlmsghdr`` (len u32, type u16, flags u16,
  seq u32, pid u32; host byte order) followed by its payload, padded to 4 bytes.
  Several messages may share one datagram.
- nfnetlink messages have type ``subsystem << 8 | message`` and start with
  ``struct nfgenmsg`` (family u8, version u8, res_id be16); for nfqueue,
  ``res_id`` is the queue number.
- Attributes are ``struct nlattr`` (len u16, type u16, host order) and a
  payload padded to 4 bytes; nfqueue payloads are big-endian.
- A queued packet (``NFQNL_MSG_PACKET``) always carries ``NFQA_PACKET_HDR``
  (packet_id be32, hw_protocol be16, hook u8) as its first attribute.
- ``NFQNL_MSG_VERDICT_BATCH`` gives one verdict to every packet of the queue
  whose id is not after the given id; packets already judged are not touched.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from mptcp_proxy.errors import LabError

NETLINK_NETFILTER = 12          # protocol of the AF_NETLINK socket
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5          # setsockopt: no ENOBUFS when the kernel drops messages

NLMSG_HDR = struct.Struct("=IHHII")       # len, type, flags, seq, pid
NFGENMSG = struct.Struct("!BBH")          # family, version, res_id (queue number)
NLATTR = struct.Struct("=HH")             # len, type
NLMSG_ALIGNTO = 4
NFNETLINK_V0 = 0
NFNL_SUBSYS_QUEUE = 3
NLA_TYPE_MASK = 0x3FFF                    # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

# <linux/netlink.h>
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4

PACKET_HDR = struct.Struct("!IHB")        # packet_id, hw_protocol, hook
VERDICT_HDR = struct.Struct("!II")        # verdict, id
CONFIG_CMD = struct.Struct("!BxH")        # command, pad, pf
CONFIG_PARAMS = struct.Struct("!IB")      # copy_range, copy_mode (packed: 5 bytes)
BE32 = struct.Struct("!I")
ERRNO = struct.Struct("=i")


class QueueMsg(IntEnum):
    """``enum nfqnl_msg_types``."""

    PACKET = 0          # kernel -> user: a queued packet
    VERDICT = 1         # user -> kernel: verdict on one packet
    CONFIG = 2          # user -> kernel: bind, parameters
    VERDICT_BATCH = 3   # user -> kernel: verdict on every packet up to an id


class PacketAttr(IntEnum):
    """``enum nfqnl_attr_type`` (the ones this module reads or writes)."""

    PACKET_HDR = 1
    VERDICT_HDR = 2
    MARK = 3
    TIMESTAMP = 4
    IFINDEX_INDEV = 5
    IFINDEX_OUTDEV = 6
    SKB_INFO = 14


class ConfigAttr(IntEnum):
    """``enum nfqnl_attr_config``."""

    CMD = 1
    PARAMS = 2
    QUEUE_MAXLEN = 3
    MASK = 4
    FLAGS = 5


class ConfigCmd(IntEnum):
    """``enum nfqnl_msg_config_cmds``."""

    BIND = 1
    UNBIND = 2


class CopyMode(IntEnum):
    """``enum nfqnl_config_mode``."""

    NONE = 0
    META = 1            # metadata only: no payload is copied to us
    PACKET = 2


class ConfigFlag(IntFlag):
    """``NFQA_CFG_F_*``."""

    FAIL_OPEN = 1 << 0  # accept instead of drop when the queue is full
    CONNTRACK = 1 << 1
    GSO = 1 << 2        # hand GSO packets over whole instead of segmenting them
    UID_GID = 1 << 3
    SECCTX = 1 << 4


class SkbInfo(IntFlag):
    """``NFQA_SKB_*`` bits of ``NFQA_SKB_INFO``."""

    CSUMNOTREADY = 1 << 0
    GSO = 1 << 1
    CSUM_NOTVERIFIED = 1 << 2


class Verdict(IntEnum):
    """``NF_DROP`` / ``NF_ACCEPT`` (``linux/netfilter.h``)."""

    DROP = 0
    ACCEPT = 1


class NfqueueError(LabError):
    """A netlink message from the kernel is malformed, or the kernel refused a request."""


def align(n: int) -> int:
    return (n + NLMSG_ALIGNTO - 1) & ~(NLMSG_ALIGNTO - 1)


def queue_msg_type(msg: QueueMsg) -> int:
    return NFNL_SUBSYS_QUEUE << 8 | msg


# --------------------------------------------------------------------------
# Encoding (user -> kernel)
# --------------------------------------------------------------------------

def encode_attr(attr_type: int, payload: bytes) -> bytes:
    length = NLATTR.size + len(payload)
    return NLATTR.pack(length, attr_type) + payload + bytes(align(length) - length)


def encode_message(msg: QueueMsg, queue: int, attrs: bytes, *, seq: int = 0,
                   flags: int = NLM_F_REQUEST, family: int = 0) -> bytes:
    """One nfqueue message: nlmsghdr, nfgenmsg for ``queue``, then ``attrs``."""
    if not 0 <= queue <= 0xFFFF:
        raise NfqueueError(f"queue number {queue} is out of range 0-65535")
    body = NFGENMSG.pack(family, NFNETLINK_V0, queue) + attrs
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), queue_msg_type(msg), flags,
                          seq & 0xFFFFFFFF, 0) + body


def bind_request(queue: int, *, seq: int = 0) -> bytes:
    """Bind ``queue`` to the sending socket; asks for an acknowledgement."""
    return encode_message(QueueMsg.CONFIG, queue,
                          encode_attr(ConfigAttr.CMD, CONFIG_CMD.pack(ConfigCmd.BIND, 0)),
                          seq=seq, flags=NLM_F_REQUEST | NLM_F_ACK)


def config_request(queue: int, *, copy_mode: CopyMode = CopyMode.META, copy_range: int = 0,
                   maxlen: int | None = None, flags: ConfigFlag | None = None,
                   mask: ConfigFlag | None = None, seq: int = 0) -> bytes:
    """Set a bound queue's copy mode, length limit and flags; asks for an acknowledgement.

    ``mask`` says which flags to change (default: those in ``flags``); the
    kernel wants FLAGS and MASK together.
    """
    attrs = encode_attr(ConfigAttr.PARAMS, CONFIG_PARAMS.pack(copy_range, copy_mode))
    if maxlen is not None:
        attrs += encode_attr(ConfigAttr.QUEUE_MAXLEN, BE32.pack(maxlen))
    if flags is not None or mask is not None:
        flags = ConfigFlag(flags or 0)
        mask = flags if mask is None else mask
        attrs += encode_attr(ConfigAttr.FLAGS, BE32.pack(flags))
        attrs += encode_attr(ConfigAttr.MASK, BE32.pack(mask))
    return encode_message(QueueMsg.CONFIG, queue, attrs, seq=seq,
                          flags=NLM_F_REQUEST | NLM_F_ACK)


def verdict_message(queue: int, packet_id: int, verdict: Verdict, *,
                    batch: bool = False, seq: int = 0) -> bytes:
    """A verdict on packet ``packet_id`` of ``queue`` (``batch``: on every id up to it).

    No acknowledgement is asked for: a verdict on an unknown id is the only
    error, and the emulator never sends one.
    """
    return encode_message(QueueMsg.VERDICT_BATCH if batch else QueueMsg.VERDICT, queue,
                          encode_attr(PacketAttr.VERDICT_HDR,
                                      VERDICT_HDR.pack(verdict, packet_id & 0xFFFFFFFF)),
                          seq=seq)


# --------------------------------------------------------------------------
# Decoding (kernel -> user)
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class QueuedPacket:
    """``NFQNL_MSG_PACKET``: a packet waiting for our verdict."""

    queue: int
    packet_id: int
    hw_protocol: int    # ETH_P_IP 0x0800, ETH_P_IPV6 0x86dd
    hook: int           # NF_INET_POST_ROUTING 4 ...
    family: int
    skb_info: SkbInfo = SkbInfo(0)


@dataclass(frozen=True)
class Ack:
    """``NLMSG_ERROR``: ``errno`` 0 acknowledges request ``seq``, else refuses it."""

    seq: int
    errno: int


@dataclass(frozen=True)
class Other:
    """A message this module does not interpret (NLMSG_DONE, other types)."""

    msg_type: int
    seq: int


Message = QueuedPacket | Ack | Other


def iter_attrs(buf: bytes | memoryview, start: int, end: int):
    """``(type, payload_start, payload_end)`` of each attribute in ``buf[start:end]``."""
    pos = start
    while pos < end:
        if end - pos < NLATTR.size:
            raise NfqueueError(f"truncated attribute header at {pos}")
        length, attr_type = NLATTR.unpack_from(buf, pos)
        if length < NLATTR.size or pos + length > end:
            raise NfqueueError(f"attribute length {length} at {pos} does not fit")
        yield attr_type & NLA_TYPE_MASK, pos + NLATTR.size, pos + length
        pos += align(length)


def _decode_packet(buf: bytes | memoryview, start: int, end: int) -> QueuedPacket:
    if end - start < NFGENMSG.size:
        raise NfqueueError("packet message without nfgenmsg")
    family, _version, queue = NFGENMSG.unpack_from(buf, start)
    header = None
    info = SkbInfo(0)
    for attr_type, a, b in iter_attrs(buf, start + NFGENMSG.size, end):
        if attr_type == PacketAttr.PACKET_HDR:
            if b - a < PACKET_HDR.size:
                raise NfqueueError(f"NFQA_PACKET_HDR of {b - a} bytes")
            header = PACKET_HDR.unpack_from(buf, a)
        elif attr_type == PacketAttr.SKB_INFO and b - a >= BE32.size:
            info = SkbInfo(BE32.unpack_from(buf, a)[0] & 0x7)
    if header is None:
        raise NfqueueError("packet message without NFQA_PACKET_HDR")
    packet_id, hw_protocol, hook = header
    return QueuedPacket(queue=queue, packet_id=packet_id, hw_protocol=hw_protocol,
                        hook=hook, family=family, skb_info=info)


_PACKET_TYPE = NFNL_SUBSYS_QUEUE << 8 | QueueMsg.PACKET
_MSG_START = struct.Struct("=IH")                       # nlmsg_len, nlmsg_type
_FIRST_ATTR = NLMSG_HDR.size + NFGENMSG.size            # where NFQA_PACKET_HDR sits
_FAST_MIN = _FIRST_ATTR + NLATTR.size + PACKET_HDR.size


def fast_packet_id(buf: bytes | bytearray | memoryview, size: int) -> int | None:
    """The packet id when ``buf[:size]`` is exactly one packet message, else None.

    The emulator's hot path: it reads one datagram per queued packet and needs
    only the id. Anything else (several messages, errors, a header elsewhere)
    returns None and goes through :func:`decode_messages`.
    """
    if size < _FAST_MIN:
        return None
    length, msg_type = _MSG_START.unpack_from(buf, 0)
    if length != size or msg_type != _PACKET_TYPE:
        return None
    attr_len, attr_type = NLATTR.unpack_from(buf, _FIRST_ATTR)
    if attr_type & NLA_TYPE_MASK != PacketAttr.PACKET_HDR or \
            attr_len < NLATTR.size + PACKET_HDR.size or _FIRST_ATTR + attr_len > size:
        return None
    return BE32.unpack_from(buf, _FIRST_ATTR + NLATTR.size)[0]


def decode_messages(buf: bytes | memoryview) -> list[Message]:
    """Every netlink message in one datagram from the kernel."""
    messages: list[Message] = []
    pos, size = 0, len(buf)
    while pos < size:
        if size - pos < NLMSG_HDR.size:
            raise NfqueueError(f"truncated netlink header at {pos}")
        length, msg_type, _flags, seq, _pid = NLMSG_HDR.unpack_from(buf, pos)
        if length < NLMSG_HDR.size or pos + length > size:
            raise NfqueueError(f"netlink length {length} at {pos} does not fit in {size}")
        start, end = pos + NLMSG_HDR.size, pos + length
        if msg_type == NLMSG_ERROR:
            if end - start < ERRNO.size:
                raise NfqueueError("truncated NLMSG_ERROR")
            # The error is negative; the original request's header follows it.
            (err,) = ERRNO.unpack_from(buf, start)
            orig_seq = seq
            if end - start >= ERRNO.size + NLMSG_HDR.size:
                orig_seq = NLMSG_HDR.unpack_from(buf, start + ERRNO.size)[3]
            messages.append(Ack(seq=orig_seq, errno=-err))
        elif msg_type == queue_msg_type(QueueMsg.PACKET):
            messages.append(_decode_packet(buf, start, end))
        else:
            messages.append(Other(msg_type=msg_type, seq=seq))
        pos += align(length)
    return messages
