"""What a proxy protocol's handshake asks for: a target to connect to (sans-IO).

SOCKS5 CONNECT and HTTP CONNECT both end in one of these; the server decides
on it (policy, name resolution) the same way whichever protocol it came in.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass(frozen=True)
class ConnectRequest:
    """A CONNECT request. ``host`` is an address object or a domain name."""

    host: ipaddress.IPv4Address | ipaddress.IPv6Address | str
    port: int
    username: str | None = None
    """The authenticated user, when the handshake asked for credentials."""

    @property
    def is_domain(self) -> bool:
        return isinstance(self.host, str)
