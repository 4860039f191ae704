"""What the application proxies (SOCKS5, HTTP CONNECT) share, sans-IO.

Both protocols end their handshake the same way: a target (address or name,
port) is requested, the proxy decides and connects, and answers success or a
refusal in the protocol's own terms. :class:`Refusal` names why a request
failed once; :func:`socks_reply` and :func:`http_status` say it in each
protocol (PROTOCOLS.md: SOCKS5 REP codes; HTTP 403 policy, 502 refused or DNS
failure, 504 timeout). :class:`AppHandshake` gives the server one interface to
both handshakes.
"""

from __future__ import annotations

import enum

from mptcp_proxy.errors import ProtocolError
from mptcp_proxy.modes.request import ConnectRequest
from mptcp_proxy.modes.http_connect import HttpConnectError, HttpConnectHandshake
from mptcp_proxy.modes.socks5 import Authenticator, Socks5Error, Socks5Handshake, Socks5Reply

SOCKS5 = "socks5"
HTTP_CONNECT = "http-connect"
PROTOCOLS = (SOCKS5, HTTP_CONNECT)


class Refusal(enum.Enum):
    """Why a well-formed request was not served."""

    CLIENT_NOT_ALLOWED = "client-not-allowed"
    TARGET_NOT_ALLOWED = "target-not-allowed"
    PORT_NOT_ALLOWED = "port-not-allowed"
    RESOLVE_FAILED = "resolve-failed"
    REFUSED = "refused"
    HOST_UNREACHABLE = "host-unreachable"
    NETWORK_UNREACHABLE = "network-unreachable"
    TIMEOUT = "timeout"
    RESOURCES = "resources"
    NETWORK = "network"


_SOCKS_REPLY = {
    Refusal.CLIENT_NOT_ALLOWED: Socks5Reply.NOT_ALLOWED,
    Refusal.TARGET_NOT_ALLOWED: Socks5Reply.NOT_ALLOWED,
    Refusal.PORT_NOT_ALLOWED: Socks5Reply.NOT_ALLOWED,
    Refusal.RESOLVE_FAILED: Socks5Reply.HOST_UNREACHABLE,
    Refusal.REFUSED: Socks5Reply.CONNECTION_REFUSED,
    Refusal.HOST_UNREACHABLE: Socks5Reply.HOST_UNREACHABLE,
    Refusal.NETWORK_UNREACHABLE: Socks5Reply.NETWORK_UNREACHABLE,
    # RFC 1928 has no "timed out"; TTL expired is the closest (Dante, OpenSSH agree).
    Refusal.TIMEOUT: Socks5Reply.TTL_EXPIRED,
    Refusal.RESOURCES: Socks5Reply.GENERAL_FAILURE,
    Refusal.NETWORK: Socks5Reply.GENERAL_FAILURE,
}

_HTTP_STATUS = {
    Refusal.CLIENT_NOT_ALLOWED: 403,
    Refusal.TARGET_NOT_ALLOWED: 403,
    Refusal.PORT_NOT_ALLOWED: 403,
    Refusal.RESOLVE_FAILED: 502,
    Refusal.REFUSED: 502,
    Refusal.HOST_UNREACHABLE: 502,
    Refusal.NETWORK_UNREACHABLE: 502,
    Refusal.TIMEOUT: 504,
    Refusal.RESOURCES: 503,
    Refusal.NETWORK: 502,
}


# What an HTTP refusal's body says (``{target}``: host:port as the proxy
# validated it, a name with its address when resolved). Fixed words only.
_WHY = {
    Refusal.CLIENT_NOT_ALLOWED: "your address is not among the client networks this proxy "
                                "serves (--allow)",
    Refusal.TARGET_NOT_ALLOWED: "target {target} is not allowed by this proxy's policy",
    Refusal.PORT_NOT_ALLOWED: "target {target}: the port is not one this proxy serves "
                              "(--allow-port)",
    Refusal.RESOLVE_FAILED: "cannot resolve the name of target {target}",
    Refusal.REFUSED: "target {target} refused the connection",
    Refusal.HOST_UNREACHABLE: "target {target} is unreachable (host unreachable)",
    Refusal.NETWORK_UNREACHABLE: "target {target} is unreachable (network unreachable)",
    Refusal.TIMEOUT: "target {target} did not answer in time",
    Refusal.RESOURCES: "the proxy is busy; try again later",
    Refusal.NETWORK: "connecting to target {target} failed",
}


def refusal_why(refusal: Refusal, target: str = "-", explanation: str = "",
                resolving: bool = False) -> str:
    """What an HTTP refusal says after its status: ``target 10.1.2.3:80 is in a
    private range (10.0.0.0/8); the proxy needs --allow-target 10.0.0.0/8 to
    reach it``. ``explanation``: the policy's words for a refused target
    (:func:`~mptcp_proxy.modes.policy.explain_target`); ``resolving``: a
    timeout hit the name lookup, not the connect."""
    if refusal is Refusal.TARGET_NOT_ALLOWED and explanation:
        return f"target {target} {explanation}"
    if refusal is Refusal.TIMEOUT and resolving:
        return f"the name lookup for target {target} did not finish in time"
    return _WHY[refusal].format(target=target)


def socks_reply(refusal: Refusal) -> Socks5Reply:
    return _SOCKS_REPLY[refusal]


def http_status(refusal: Refusal) -> int:
    return _HTTP_STATUS[refusal]


class AppHandshake:
    """One server-side handshake of ``protocol``, behind one interface.

    ``feed`` returns (bytes to send now, the request once complete) and raises
    :class:`ProtocolError` whose ``reply`` is the whole answer to send before
    closing; ``leftover`` holds bytes that followed the request; ``success``
    and ``refuse`` build the final answer."""

    def __init__(self, protocol: str, authenticator: Authenticator | None = None) -> None:
        if protocol == SOCKS5:
            self._hs: Socks5Handshake | HttpConnectHandshake = Socks5Handshake(authenticator)
        elif protocol == HTTP_CONNECT:
            self._hs = HttpConnectHandshake(authenticator)
        else:
            raise ValueError(f"unknown protocol {protocol!r}")
        self.protocol = protocol

    def feed(self, data: bytes) -> tuple[bytes, ConnectRequest | None]:
        return self._hs.feed(data)

    @property
    def leftover(self) -> bytes:
        return self._hs.leftover

    @property
    def requested(self) -> tuple[object, int] | None:
        """(host, port) of the request once its target was decoded and valid,
        even if the request then failed; None before."""
        return self._hs.requested

    def success(self, bound: tuple[str, int] | None = None) -> bytes:
        if isinstance(self._hs, Socks5Handshake):
            return self._hs.success(bound)
        return self._hs.success()

    def refuse(self, refusal: Refusal, why: str = "") -> tuple[bytes, int]:
        """(the answer, its code: SOCKS REP or HTTP status). ``why`` becomes the
        HTTP body's explanation (:func:`refusal_why`); SOCKS has no room for it."""
        if isinstance(self._hs, Socks5Handshake):
            rep = socks_reply(refusal)
            return self._hs.failure(rep), int(rep)
        status = http_status(refusal)
        return self._hs.failure(status, why), status


def error_reason(protocol: str, exc: ProtocolError) -> str:
    """The close log's reason for a handshake error: ``socks5-error:7``,
    ``http-error:405``; without a code, the SOCKS5 stage that failed
    (``socks5-bad-greeting``, ``socks5-bad-auth``: what fail2ban-style tools
    watch) or ``socks5-bad-handshake``."""
    if exc.code is None:
        stage = getattr(exc, "stage", "")
        return f"{protocol}-bad-{stage or 'handshake'}"
    return f"{'socks5' if protocol == SOCKS5 else 'http'}-error:{exc.code}"


HandshakeError = (Socks5Error, HttpConnectError)

__all__ = [
    "HTTP_CONNECT", "PROTOCOLS", "SOCKS5", "AppHandshake", "HandshakeError",
    "Refusal", "error_reason", "http_status", "refusal_why", "socks_reply",
]
