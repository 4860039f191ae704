"""Configuration of the RFC 8803 converter (``mptcp-proxy convert``).

Kept apart from ``config.py`` so that the converter's options grow without
touching what every mode shares. Same rules: frozen, validated dataclasses; a
bad value raises :class:`ConfigError` naming the option.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mptcp_proxy.config import Endpoint, ExplicitProxySettings, read_private_file
from mptcp_proxy.errors import ConfigError
from mptcp_proxy.modes.convert import (
    DEFAULT_COOKIE_WINDOW_S, DEFAULT_NETWORK_RETRY_S, MIN_COOKIE_SECRET_LEN,
)

MAX_COOKIE_SECRET_FILE = 4096


@dataclass(frozen=True)
class ConvertConfig(ExplicitProxySettings):
    """``mptcp-proxy convert``: an RFC 8803 Transport Converter. Refused clients
    and targets get Error 32; over ``max_pending_per_client``, Error 64."""

    listen: Endpoint
    """Address the MPTCP (TCP Fast Open) listener binds to."""
    cookie_secret: bytes | None = field(default=None, repr=False)
    """With a secret, every Connect needs a Cookie TLV (missing: Error 3 with a
    fresh cookie; invalid: Error 32)."""
    cookie_window: int = DEFAULT_COOKIE_WINDOW_S
    """Seconds per cookie window; a cookie lasts one to two windows."""
    tfo_queue: int = 1024
    """TCP_FASTOPEN queue length on the listener (0: no Fast Open, header after
    the handshake only)."""
    tfo_no_cookie: bool = False
    """Accept SYN data without a TFO cookie (TCP_FASTOPEN_NO_COOKIE on the
    listener). Clients must ask for it too (TCP_FASTOPEN_NO_COOKIE on their
    socket); gives 0-RTT on the very first connection but lets spoofed SYNs
    carry requests."""
    upstream_tfo: bool = True
    """Offer the client's first application bytes to the server's SYN (TFO)."""
    error_rate: float = 10.0
    """Error replies per second per client address (token bucket)."""
    error_burst: int = 20
    """Error replies a client may get in a burst; over the rate: close, no reply."""
    network_retry: int = DEFAULT_NETWORK_RETRY_S
    """Retry delay (s) suggested with Network Failure (65)."""
    manage_sysctls: bool = True
    """Set net.ipv4.tcp_fastopen bits on start, restore them on exit."""
    dss_checksum: bool = field(default=False, kw_only=True)
    """Off for the converter: with DSS checksums, 27 of 1,000 multipath uploads of
    0-RTT (TCP Fast Open) connections arrived wrong on Linux 6.18, without them
    1 of 3,000 (README, "Data integrity")."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cookie_secret is not None and len(self.cookie_secret) < MIN_COOKIE_SECRET_LEN:
            raise ConfigError("--cookie-secret",
                              f"secret must have at least {MIN_COOKIE_SECRET_LEN} bytes")
        if self.cookie_window < 1:
            raise ConfigError("--cookie-window", "must be >= 1 second")
        if not 0 <= self.tfo_queue <= 1 << 20:
            raise ConfigError("--tfo-queue", "must be between 0 and 1048576")
        if self.error_rate <= 0:
            raise ConfigError("--error-rate", "must be > 0")
        if self.error_burst < 1:
            raise ConfigError("--error-burst", "must be >= 1")
        if not 0 <= self.network_retry <= 255:
            raise ConfigError("--network-retry", "must be between 0 and 255 seconds")


def load_cookie_secret(path: str, key: str = "--cookie-secret") -> bytes:
    """The secret in ``path``: its bytes, surrounding whitespace stripped.

    Refuses a missing, empty, huge or too short file, and one that others may
    read (the secret is what stops clients from minting cookies).
    """
    secret = read_private_file(path, key, MAX_COOKIE_SECRET_FILE).strip()
    if len(secret) < MIN_COOKIE_SECRET_LEN:
        raise ConfigError(key, f"{path} holds {len(secret)} bytes; at least "
                               f"{MIN_COOKIE_SECRET_LEN} are needed")
    return secret
