"""HTTP CONNECT proxy handshake (RFC 9110 §9.3.6, RFC 9112 message syntax), sans-IO.

Bytes in, decisions out, like :mod:`mptcp_proxy.modes.socks5`:
:meth:`HttpConnectHandshake.feed` returns the request once its header block
is complete; the caller connects and asks for the reply with :meth:`success`
or :meth:`failure`. No sockets, no clock.

Design rules:
- Only CONNECT: any other method is 405 (this is a tunnel, not a web proxy).
- The request's header block is bounded (``MAX_HEADER_BYTES``, 431 above it).
- A CONNECT request has no content: ``Content-Length`` other than 0, or any
  ``Transfer-Encoding``, is 400 (the bytes after the header block would be
  ambiguous: content, or the start of the tunnel).
- Bytes after the blank line are tunnel bytes the client sent before our 200:
  kept in ``leftover`` and relayed after the reply, never dropped.
- Every violation raises :class:`HttpConnectError` carrying the complete
  response to send before closing and the status code.
- Error responses carry a one-line ``text/plain`` body saying why (``403
  Forbidden: target 10.1.2.3:80 is in a private range ...``), made of fixed
  words and values the proxy validated (addresses, LDH host names, ports):
  never the client's raw bytes, never its credentials.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from typing import Callable

from mptcp_proxy.errors import ProtocolError
from mptcp_proxy.modes.policy import valid_hostname
from mptcp_proxy.modes.request import ConnectRequest

MAX_HEADER_BYTES = 8192        # request line + headers + blank line
MAX_HEADERS = 100
REALM = "mptcp-proxy"

_REASONS = {
    200: "Connection established",
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}

_TOO_LARGE = f"the request's header block is over {MAX_HEADER_BYTES} bytes"

# RFC 9110 §5.6.2 token characters: method and field names.
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VERSION = re.compile(rb"^HTTP/(\d)\.(\d)$")


class HttpConnectError(ProtocolError):
    """The request cannot be served: send ``reply`` (a whole response), then close."""

    def __init__(self, message: str, reply: bytes, code: int) -> None:
        super().__init__(message, code)
        self.reply = reply


Authenticator = Callable[[str, str], bool]


MAX_WHY = 300                  # characters of an error body's explanation


def error_body(status: int, why: str = "") -> bytes:
    """The one-line body of an error response: ``403 Forbidden: WHY`` (or just
    the status). Anything but printable ASCII in ``why`` becomes ``?`` and it
    is cut at ``MAX_WHY`` characters: a body is never a channel for bytes the
    proxy did not mean to send."""
    line = f"{status} {_REASONS.get(status, 'Error')}"
    if why:
        clean = "".join(c if " " <= c <= "~" else "?" for c in why[:MAX_WHY])
        line += f": {clean}"
    return (line + "\n").encode("ascii")


def response(status: int, extra_headers: tuple[str, ...] = (), why: str = "") -> bytes:
    """A complete response. Error responses say ``Connection: close`` and carry
    a one-line ``text/plain`` body saying why (:func:`error_body`); the
    tunnel's 200 carries neither length nor encoding (§9.3.6)."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
    body = b""
    if status // 100 != 2:
        body = error_body(status, why)
        lines += ["Connection: close", "Content-Type: text/plain; charset=us-ascii",
                  f"Content-Length: {len(body)}"]
    lines += list(extra_headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


def parse_authority(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address | str, int]:
    """``host:port`` or ``[v6]:port`` of a CONNECT request (RFC 9110 §9.3.6:
    authority-form, the port is required). Raises ValueError with the reason."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("unclosed [ in authority")
        host_text, rest = text[1:end], text[end + 1:]
        if not rest.startswith(":"):
            raise ValueError("no port in authority")
        port_text = rest[1:]
        if "%" in host_text:
            # A zone id names an interface of the proxy, not a place on the
            # Internet; Python keeps it in the address, where it would slip
            # past set lookups (the proxy's own addresses) and into logs.
            raise ValueError("IPv6 zone ids are not accepted")
        try:
            host: ipaddress.IPv4Address | ipaddress.IPv6Address | str = \
                ipaddress.IPv6Address(host_text)
        except ValueError:
            raise ValueError(f"bad IPv6 address {host_text!r}") from None
    else:
        host_text, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError("no port in authority")
        if not host_text or ":" in host_text:
            raise ValueError(f"bad host {host_text!r} (IPv6 needs brackets)")
        try:
            host = ipaddress.IPv4Address(host_text)
        except ValueError:
            if not valid_hostname(host_text):
                raise ValueError(f"bad host name {host_text!r}") from None
            host = host_text.rstrip(".").lower()
    if not port_text.isdigit() or len(port_text) > 5:
        raise ValueError(f"bad port {port_text!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return host, port


class HttpConnectHandshake:
    """Server side of one HTTP CONNECT request."""

    def __init__(self, authenticator: Authenticator | None = None) -> None:
        """With ``authenticator``, a ``Proxy-Authorization: Basic`` header is
        required (407 without it, or with bad credentials)."""
        self._auth = authenticator
        self._buf = bytearray()
        self._done = False
        self._failed = False
        self.request: ConnectRequest | None = None
        self.leftover = b""
        self.requested: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address | str, int] \
            | None = None
        """The CONNECT target once parsed and valid, also when the request then
        fails (407, content): what the close log names."""

    @property
    def done(self) -> bool:
        return self._done

    def feed(self, data: bytes) -> tuple[bytes, ConnectRequest | None]:
        """Consume bytes; return (bytes to send now, the request once complete).

        Nothing is ever sent before the request is complete; the tuple keeps
        the shape of the other handshakes."""
        if self._done:
            self.leftover += data
            return b"", None
        if self._failed:
            raise HttpConnectError("handshake already failed", b"", 400)
        self._buf += data
        # Checked first, whole request or not, so that how the bytes were
        # segmented never changes the answer (found by fuzz/fuzz_http_connect.py).
        if self._buf and not self._buf[:1].isalpha() and self._buf[:1] not in (b"\r", b"\n"):
            self._fail(400, "not an HTTP request",
                       why="not an HTTP request; this is an HTTP CONNECT proxy")
        end, sep_len = _header_end(self._buf)
        if end < 0:
            if len(self._buf) > MAX_HEADER_BYTES:
                self._fail(431, f"header block over {MAX_HEADER_BYTES} bytes", why=_TOO_LARGE)
            return b"", None
        if end + sep_len > MAX_HEADER_BYTES:
            self._fail(431, f"header block over {MAX_HEADER_BYTES} bytes", why=_TOO_LARGE)
        head = bytes(self._buf[:end])
        self.leftover = bytes(self._buf[end + sep_len:])
        self._buf.clear()
        self.request = self._parse(head)
        self._done = True
        return b"", self.request

    def success(self) -> bytes:
        if not self._done:
            raise HttpConnectError("success() before a request", b"", 500)
        return response(200)

    def failure(self, status: int, why: str = "") -> bytes:
        """The refusal of a complete request; ``why`` becomes its body's
        explanation (fixed words and validated values only, see :func:`error_body`)."""
        self._failed = True
        return response(status, why=why)

    # -- parsing --------------------------------------------------------------
    def _fail(self, status: int, message: str, extra: tuple[str, ...] = (),
              why: str = "") -> None:
        """``message`` is for the log (it may quote the client); ``why`` is for
        the client and made of fixed words only."""
        self._failed = True
        raise HttpConnectError(message, response(status, extra, why), status)

    def _parse(self, head: bytes) -> ConnectRequest:
        lines = [line[:-1] if line.endswith(b"\r") else line for line in head.split(b"\n")]
        # RFC 9112 §2.2: ignore at least one empty line before the request line.
        while lines and not lines[0]:
            lines.pop(0)
        if not lines:
            self._fail(400, "empty request", why="empty request")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not all(parts):
            self._fail(400, "request line is not METHOD SP TARGET SP VERSION",
                       why="the request line must be CONNECT HOST:PORT HTTP/1.1")
        method, target, version = parts
        match = _VERSION.match(version)
        if not match:
            self._fail(400, f"bad HTTP version {version[:16]!r}",
                       why="the request line must end in HTTP/1.1")
        if match.group(1) != b"1":
            self._fail(505, f"HTTP version {version.decode('ascii')} not supported",
                       why="this proxy speaks HTTP/1.1 and HTTP/1.0")
        if not _TOKEN.match(method):
            self._fail(400, "bad method", why="bad method")
        if method != b"CONNECT":
            self._fail(405, f"method {method[:16].decode('ascii')} not allowed; "
                            "this proxy only tunnels (CONNECT)", ("Allow: CONNECT",),
                       why="this proxy only tunnels: use CONNECT HOST:PORT")
        try:
            host, port = parse_authority(target.decode("ascii"))
        except (UnicodeDecodeError, ValueError) as exc:
            self._fail(400, f"bad CONNECT target: {exc}",
                       why="the CONNECT target must be HOST:PORT or [IPv6]:PORT, "
                           "with a port from 1 to 65535")
        self.requested = (host, port)  # type: ignore[possibly-undefined]
        headers = self._headers(lines[1:])
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) != 0):
            self._fail(400, f"CONNECT with content (Content-Length {length[:16]})",
                       why="a CONNECT request has no content (Content-Length must be 0)")
        if "transfer-encoding" in headers:
            self._fail(400, "CONNECT with Transfer-Encoding",
                       why="a CONNECT request has no content (no Transfer-Encoding)")
        username = self._authenticate(headers.get("proxy-authorization"))
        return ConnectRequest(host, port, username)  # type: ignore[possibly-undefined]

    def _headers(self, lines: list[bytes]) -> dict[str, str]:
        if len(lines) > MAX_HEADERS:
            self._fail(431, f"more than {MAX_HEADERS} header fields",
                       why=f"more than {MAX_HEADERS} header fields")
        headers: dict[str, str] = {}
        for line in lines:
            name, colon, value = line.partition(b":")
            # No whitespace before the colon, no obsolete line folding (§5.1, §5.2).
            if not colon or not _TOKEN.match(name):
                self._fail(400, "malformed header field", why="malformed header field")
            try:
                text = value.strip(b" \t").decode("latin-1")
            except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
                self._fail(400, "undecodable header field", why="undecodable header field")
            if any(c in text for c in "\r\n\0"):
                self._fail(400, "control character in header field",
                           why="control character in a header field")
            key = name.decode("ascii").lower()
            if key in ("content-length", "proxy-authorization", "host") and key in headers:
                self._fail(400, f"duplicate {key} header", why=f"duplicate {key} header")
            headers[key] = text
        return headers

    def _authenticate(self, credentials: str | None) -> str | None:
        if self._auth is None:
            return None
        challenge = (f'Proxy-Authenticate: Basic realm="{REALM}"',)
        if credentials is None:
            self._fail(407, "no Proxy-Authorization", challenge,
                       why="this proxy needs a user name and password (Basic)")
        scheme, _, token = credentials.partition(" ")
        if scheme.lower() != "basic":
            self._fail(407, f"authentication scheme {scheme[:16]!r} not supported", challenge,
                       why="this proxy only takes Basic authentication")
        try:
            decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            self._fail(407, "malformed Basic credentials", challenge,
                       why="malformed Basic credentials")
        username, colon, password = decoded.partition(":")  # type: ignore[possibly-undefined]
        if not colon or not self._auth(username, password):
            # One answer for an unknown user and a wrong password (no oracle).
            self._fail(407, f"bad credentials for {username[:64]!r}", challenge,
                       why="wrong user name or password")
        return username


def _header_end(buf: bytearray) -> tuple[int, int]:
    """(index of the blank line that ends the header block, its length), or (-1, 0).

    Lines may end in CRLF or a bare LF (RFC 9112 §2.2 lets recipients accept it)."""
    ends = [(i, n) for i, n in ((buf.find(b"\r\n\r\n"), 4), (buf.find(b"\n\n"), 2),
                                (buf.find(b"\n\r\n"), 3)) if i >= 0]
    return min(ends) if ends else (-1, 0)


__all__ = [
    "HttpConnectError", "HttpConnectHandshake", "MAX_HEADER_BYTES",
    "error_body", "parse_authority", "response",
]
