"""The one error hierarchy of mptcp-proxy.

Every error the package raises on purpose derives from :class:`ProxyError`.
Errors that describe a peer's fault carry the wire code to answer with, so the
handshake layer can reply in the protocol's own terms (Convert Error TLV, SOCKS
reply code, HTTP status) without a table of its own.
"""

from __future__ import annotations


class ProxyError(Exception):
    """Root of every error raised by mptcp-proxy."""


class ConfigError(ProxyError):
    """A configuration value or command-line option is invalid.

    ``key`` names the offending option so the CLI can print one clear line.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class KernelError(ProxyError):
    """A kernel control operation (sysctl, nft, ip, netlink) failed.

    ``errno`` is the OS error number when one caused it (EACCES: no right to).
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class PrivilegeError(KernelError):
    """The process lacks a capability a mode needs; raised before anything is
    changed, with one line naming what is missing and why."""


class LabError(ProxyError):
    """Building, using or removing a lab topology failed."""


class ProtocolError(ProxyError):
    """A peer sent bytes that violate a wire protocol.

    ``code`` is the protocol's own error code to answer with (for example the
    RFC 8803 Error TLV code or the SOCKS5 REP value); ``None`` when the only
    answer is to close.
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class NeedMoreData(ProxyError):
    """An incremental decoder needs more bytes before it can decide."""


class UpstreamError(ProxyError):
    """Connecting to the target failed.

    ``reason`` is one of ``refused``, ``unreachable``, ``timeout``, ``network``,
    ``reset``, ``policy``, ``resources``; ``errno`` is the OS error number when
    there was one; ``icmp_code`` the ICMP code when it is known.
    """

    def __init__(self, reason: str, message: str, errno: int | None = None,
                 icmp_code: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.errno = errno
        self.icmp_code = icmp_code


class PolicyError(ProxyError):
    """A target or client was refused by the configured policy."""
