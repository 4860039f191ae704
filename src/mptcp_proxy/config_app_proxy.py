"""Configuration of the application proxies (``mptcp-proxy socks5`` and ``http-connect``).

Same rules as every mode config: frozen, validated dataclasses; a bad value
raises :class:`ConfigError` naming the option.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from mptcp_proxy.config import Endpoint, ExplicitProxySettings, read_private_file
from mptcp_proxy.errors import ConfigError
from mptcp_proxy.modes.app_proxy import PROTOCOLS
from mptcp_proxy.modes.transparent import PortSet

MAX_AUTH_FILE = 1 << 20


@dataclass(frozen=True)
class Credentials:
    """Users and passwords from an ``--auth`` file (``user:password`` per line)."""

    users: dict[str, str] = field(default_factory=dict, repr=False)

    def check(self, username: str, password: str) -> bool:
        expected = self.users.get(username)
        # Compared in constant time; an unknown user costs the same as a wrong password.
        return hmac.compare_digest((expected or "\0").encode(), password.encode()) \
            and expected is not None

    @classmethod
    def parse(cls, text: str, key: str = "--auth") -> "Credentials":
        users: dict[str, str] = {}
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            # Not stripped: spaces may belong to the password.
            user, colon, password = line.partition(":")
            if not colon or not user or not password:
                raise ConfigError(key, f"line {number}: expected user:password")
            if len(user.encode()) > 255 or len(password.encode()) > 255:
                raise ConfigError(key, f"line {number}: user and password are at most "
                                       "255 bytes (RFC 1929)")
            if user in users:
                raise ConfigError(key, f"line {number}: user {user!r} listed twice")
            users[user] = password
        if not users:
            raise ConfigError(key, "no user:password line")
        return cls(users)

    @classmethod
    def load(cls, path: str, key: str = "--auth") -> "Credentials":
        """From ``path``, which others must not be able to read."""
        data = read_private_file(path, key, MAX_AUTH_FILE)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(key, f"{path} is not UTF-8") from None
        return cls.parse(text, key)


@dataclass(frozen=True)
class AppProxyConfig(ExplicitProxySettings):
    """``mptcp-proxy socks5`` / ``mptcp-proxy http-connect``: explicit proxies over
    MPTCP. Refused clients and targets get REP 2 / 403; over
    ``max_pending_per_client`` the connection is closed before the handshake."""

    protocol: str
    """``socks5`` or ``http-connect``."""
    listen: Endpoint
    """Address the MPTCP listener binds to (plain-TCP clients are served too)."""
    allow_ports: PortSet = field(default_factory=PortSet)
    """Target ports served (empty: every port)."""
    credentials: Credentials | None = None
    """With credentials, clients must authenticate (SOCKS5 RFC 1929, HTTP Basic)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.protocol not in PROTOCOLS:
            raise ConfigError("protocol", f"one of {', '.join(PROTOCOLS)}, not {self.protocol!r}")
