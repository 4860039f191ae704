"""SOCKS5 server handshake (RFC 1928) with username/password (RFC 1929), sans-IO.

Bytes in, decisions out: :meth:`Socks5Handshake.feed` returns what to send and,
once the request is complete, a :class:`ConnectRequest`. The caller connects and
then asks for the final reply with :meth:`success` or :meth:`failure`. No
sockets, no clock: the one handshake deadline belongs to the caller.

Design rules:
- Never assume a message arrives in one read, nor alone: bytes pipelined after
  the request are kept in ``leftover`` and relayed after the reply.
- Every protocol violation raises :class:`Socks5Error` carrying the bytes to send
  before closing (possibly none), and the REP code when the request stage failed.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from typing import Callable

from mptcp_proxy.errors import ProtocolError
from mptcp_proxy.modes.policy import valid_hostname
from mptcp_proxy.modes.request import ConnectRequest

SOCKS_VERSION = 5
AUTH_VERSION = 1  # RFC 1929 sub-negotiation version


class Socks5Method(enum.IntEnum):
    NO_AUTH = 0x00
    GSSAPI = 0x01
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE = 0xFF


class Socks5Command(enum.IntEnum):
    CONNECT = 1
    BIND = 2
    UDP_ASSOCIATE = 3


class Socks5AddressType(enum.IntEnum):
    IPV4 = 1
    DOMAIN = 3
    IPV6 = 4


class Socks5Reply(enum.IntEnum):
    """REP values, RFC 1928 section 6."""

    SUCCEEDED = 0
    GENERAL_FAILURE = 1
    NOT_ALLOWED = 2
    NETWORK_UNREACHABLE = 3
    HOST_UNREACHABLE = 4
    CONNECTION_REFUSED = 5
    TTL_EXPIRED = 6
    COMMAND_NOT_SUPPORTED = 7
    ADDRESS_TYPE_NOT_SUPPORTED = 8


class Socks5Error(ProtocolError):
    """The client broke the protocol or was refused; send ``reply`` then close."""

    def __init__(self, message: str, reply: bytes = b"", code: int | None = None,
                 stage: str = "") -> None:
        super().__init__(message, code)
        self.reply = reply
        self.stage = stage
        """Where it failed: ``greeting``, ``auth`` or ``request`` ("" if unknown)."""


class _State(enum.Enum):
    GREETING = "greeting"
    AUTH = "auth"
    REQUEST = "request"
    CONNECTING = "connecting"
    DONE = "done"
    FAILED = "failed"


Authenticator = Callable[[str, str], bool]


def reply_bytes(rep: int, bound: tuple[str, int] | None = None) -> bytes:
    """A SOCKS5 reply; ``bound`` is BND.ADDR/BND.PORT (0.0.0.0:0 when unknown)."""
    host, port = bound if bound is not None else ("0.0.0.0", 0)
    addr = ipaddress.ip_address(host)
    atyp = Socks5AddressType.IPV4 if addr.version == 4 else Socks5AddressType.IPV6
    return struct.pack("!BBBB", SOCKS_VERSION, rep, 0, atyp) + addr.packed + struct.pack("!H", port)


class Socks5Handshake:
    """Server side of one SOCKS5 handshake."""

    # Largest request: 4 + 1 + 255 + 2 bytes; a greeting is at most 257.
    MAX_BUFFER = 1024

    def __init__(self, authenticator: Authenticator | None = None) -> None:
        """With ``authenticator`` only username/password (method 2) is offered;
        without it, only "no authentication" (method 0)."""
        self._auth = authenticator
        self._buf = bytearray()
        self._state = _State.GREETING
        self._username: str | None = None
        self.request: ConnectRequest | None = None
        self.leftover = b""
        self.requested: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address | str, int] \
            | None = None
        """The CONNECT target once decoded and valid, also when the request is
        then refused (port 0): what the close log names."""

    @property
    def state(self) -> str:
        return self._state.value

    @property
    def done(self) -> bool:
        return self._state in (_State.CONNECTING, _State.DONE)

    def feed(self, data: bytes) -> tuple[bytes, ConnectRequest | None]:
        """Consume bytes; return (bytes to send now, the request once complete)."""
        if self._state in (_State.CONNECTING, _State.DONE):
            self.leftover += data  # pipelined before our reply: relayed afterwards
            return b"", None
        if self._state is _State.FAILED:
            raise Socks5Error("handshake already failed")
        self._buf += data
        out = bytearray()
        try:
            while True:
                before = self._state
                if self._state is _State.GREETING:
                    out += self._greeting()
                elif self._state is _State.AUTH:
                    out += self._authenticate()
                elif self._state is _State.REQUEST:
                    if self._request():
                        # Bytes after the request are the client's data, whatever
                        # their size: they are relayed, never counted as handshake.
                        self.leftover = bytes(self._buf)
                        self._buf.clear()
                        return bytes(out), self.request
                if self._state is before:
                    break
        except Socks5Error as exc:
            # Replies earned by earlier stages of this same read go out first.
            exc.reply = bytes(out) + exc.reply
            raise
        if len(self._buf) > self.MAX_BUFFER:
            self._fail("handshake larger than any valid SOCKS5 message")
        return bytes(out), None

    # -- stages ---------------------------------------------------------------
    def _fail(self, message: str, reply: bytes = b"", code: int | None = None) -> None:
        stage, self._state = self._state.value, _State.FAILED
        raise Socks5Error(message, reply, code, stage)

    def _greeting(self) -> bytes:
        buf = self._buf
        if not buf:
            return b""
        if buf[0] != SOCKS_VERSION:
            self._fail(f"not SOCKS5 (version byte {buf[0]})")  # no reply: not our protocol
        if len(buf) < 2:
            return b""
        nmethods = buf[1]
        refuse = bytes([SOCKS_VERSION, Socks5Method.NO_ACCEPTABLE])
        if nmethods == 0:
            self._fail("greeting offers no methods", refuse)
        if len(buf) < 2 + nmethods:
            return b""
        methods = set(buf[2:2 + nmethods])
        del buf[:2 + nmethods]
        wanted = Socks5Method.USERNAME_PASSWORD if self._auth else Socks5Method.NO_AUTH
        if wanted not in methods:
            self._fail(f"no acceptable method in {sorted(methods)}", refuse)
        self._state = _State.AUTH if self._auth else _State.REQUEST
        return bytes([SOCKS_VERSION, wanted])

    def _authenticate(self) -> bytes:
        buf = self._buf
        failure = bytes([AUTH_VERSION, 1])
        if not buf:
            return b""
        if buf[0] != AUTH_VERSION:
            self._fail(f"bad auth sub-negotiation version {buf[0]}", failure)
        if len(buf) < 2:
            return b""
        ulen = buf[1]
        if ulen == 0:
            self._fail("empty username", failure)
        if len(buf) < 3 + ulen:
            return b""
        plen = buf[2 + ulen]
        if plen == 0:
            self._fail("empty password", failure)
        if len(buf) < 3 + ulen + plen:
            return b""
        username = bytes(buf[2:2 + ulen]).decode("utf-8", "replace")
        password = bytes(buf[3 + ulen:3 + ulen + plen]).decode("utf-8", "replace")
        del buf[:3 + ulen + plen]
        if self._auth is None or not self._auth(username, password):
            self._fail(f"bad credentials for {username!r}", failure)
        self._username = username
        self._state = _State.REQUEST
        return bytes([AUTH_VERSION, 0])

    def _request(self) -> bool:
        buf = self._buf
        if len(buf) < 4:
            if buf and buf[0] != SOCKS_VERSION:
                self._refuse(Socks5Reply.GENERAL_FAILURE, f"request version {buf[0]}")
            return False
        ver, cmd, rsv, atyp = buf[0], buf[1], buf[2], buf[3]
        if ver != SOCKS_VERSION:
            self._refuse(Socks5Reply.GENERAL_FAILURE, f"request version {ver}")
        if rsv != 0:
            self._refuse(Socks5Reply.GENERAL_FAILURE, f"reserved byte is {rsv}, not 0")
        if cmd != Socks5Command.CONNECT:
            self._refuse(Socks5Reply.COMMAND_NOT_SUPPORTED, f"command {cmd} not supported")
        if atyp == Socks5AddressType.IPV4:
            end = 4 + 4
        elif atyp == Socks5AddressType.IPV6:
            end = 4 + 16
        elif atyp == Socks5AddressType.DOMAIN:
            if len(buf) < 5:
                return False
            dlen = buf[4]
            if dlen == 0:
                self._refuse(Socks5Reply.GENERAL_FAILURE, "empty domain name")
            end = 5 + dlen
        else:
            self._refuse(Socks5Reply.ADDRESS_TYPE_NOT_SUPPORTED, f"address type {atyp}")
        if len(buf) < end + 2:
            return False
        raw = bytes(buf[4:end])
        port = struct.unpack("!H", buf[end:end + 2])[0]
        del buf[:end + 2]
        host: ipaddress.IPv4Address | ipaddress.IPv6Address | str
        if atyp == Socks5AddressType.IPV4:
            host = ipaddress.IPv4Address(raw)
        elif atyp == Socks5AddressType.IPV6:
            host = ipaddress.IPv6Address(raw)
        else:
            name = raw[1:]
            if b"\x00" in name:
                self._refuse(Socks5Reply.GENERAL_FAILURE, "NUL byte in domain name")
            try:
                host = name.decode("ascii")
            except UnicodeDecodeError:
                self._refuse(Socks5Reply.GENERAL_FAILURE, "domain name is not ASCII")
            if not valid_hostname(host):
                # Spaces and control characters would reach resolvers and log lines.
                self._refuse(Socks5Reply.GENERAL_FAILURE, "not a valid host name")
        self.requested = (host, port)  # type: ignore[possibly-undefined]
        if port == 0:
            self._refuse(Socks5Reply.NOT_ALLOWED, "port 0")
        self.request = ConnectRequest(host, port, self._username)
        self._state = _State.CONNECTING
        return True

    def _refuse(self, rep: Socks5Reply, message: str) -> None:
        self._fail(message, reply_bytes(rep), int(rep))

    # -- after connecting -----------------------------------------------------
    def success(self, bound: tuple[str, int] | None = None) -> bytes:
        if self._state is not _State.CONNECTING:
            raise Socks5Error(f"success() in state {self._state.value}")
        self._state = _State.DONE
        return reply_bytes(Socks5Reply.SUCCEEDED, bound)

    def failure(self, rep: Socks5Reply) -> bytes:
        self._state = _State.FAILED
        return reply_bytes(rep)
