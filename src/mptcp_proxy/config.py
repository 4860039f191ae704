"""Validated, frozen configuration values shared by every mode.

A bad value raises :class:`ConfigError` naming the option, so the CLI prints one
clear line. Parsing lives here, not in the CLI, so that TOML configs and the
command line share it.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
import socket
import stat
from dataclasses import dataclass, field

from mptcp_proxy.errors import ConfigError
from mptcp_proxy.modes.policy import DEFAULT_CLIENT_NETWORKS, IPNetwork, parse_networks


def parse_on_off(text: str, key: str) -> bool:
    """``on``/``off`` (also yes/no, true/false, 1/0) as a bool."""
    value = text.strip().lower()
    if value in ("on", "yes", "true", "1"):
        return True
    if value in ("off", "no", "false", "0"):
        return False
    raise ConfigError(key, f"expected on or off; got {text!r}")


class UpstreamMode(enum.Enum):
    """How the proxy connects to its target."""

    AUTO = "auto"    # MPTCP first; targets seen falling back are remembered as TCP-only
    MPTCP = "mptcp"  # always MPTCP (the kernel still falls back when the peer lacks it)
    TCP = "tcp"      # plain TCP

    @classmethod
    def parse(cls, text: str, key: str = "--upstream") -> "UpstreamMode":
        try:
            return cls(text.lower())
        except ValueError:
            raise ConfigError(key, f"expected one of auto, mptcp, tcp; got {text!r}") from None


@dataclass(frozen=True)
class Endpoint:
    """A host (literal address or name) and a TCP port."""

    host: str
    port: int

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("address", "empty host")
        if not 0 <= self.port <= 65535:
            raise ConfigError("address", f"port {self.port} out of range 0-65535")

    @classmethod
    def parse(cls, text: str, key: str = "address", default_host: str | None = None,
              default_port: int | None = None) -> "Endpoint":
        """Parse ``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (when ``default_host`` is
        given); ``HOST`` and ``[V6]`` alone when ``default_port`` is given."""
        text = text.strip()
        reject_url(text, key)
        if default_port is not None and text:
            if text.startswith("[") and text.endswith("]"):
                return cls(text[1:-1], default_port)
            # A name, IPv4 or "::" alone. Other bare IPv6 addresses are refused
            # below as before ("IPv6 addresses need brackets"): in "::1080" or
            # "2001:db8::1:80" the last group could be meant as the port.
            if ":" not in text or text == "::":
                return cls(text, default_port)
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or not rest.startswith(":"):
                raise ConfigError(key, f"expected [IPv6]:PORT, got {text!r}")
            port_text = rest[1:]
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep:
                raise ConfigError(key, f"expected HOST:PORT, got {text!r}")
            if ":" in host:
                raise ConfigError(key, f"IPv6 addresses need brackets: [{host}]:{port_text}")
        if not host:
            if default_host is None:
                raise ConfigError(key, f"missing host in {text!r}")
            host = default_host
        if not port_text.isdigit():
            raise ConfigError(key, f"bad port {port_text!r} in {text!r}")
        port = int(port_text)
        if port > 65535:
            raise ConfigError(key, f"port {port} out of range 0-65535")
        return cls(host, port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def resolve(self, key: str = "address") -> tuple[int, tuple]:
        """(family, sockaddr) of the first address; names are resolved once, here."""
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ConfigError(key, f"cannot resolve {self.host!r}: {exc.strerror}") from None
        family, _, _, _, sockaddr = infos[0]
        return family, sockaddr


_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)")


def reject_url(text: str, key: str) -> None:
    """ConfigError when ``text`` is a URL (``http://host:port/``), which people
    give where an address goes: say so, rather than "IPv6 addresses need brackets"."""
    match = _URL.match(text)
    if match is None:
        return
    example = "192.0.2.10:443"
    authority = match.group(2).rpartition("@")[2]   # never repeat credentials
    host, colon, port = authority.rpartition(":")
    if colon and port.isdigit() and host and (":" not in host or host.startswith("[")):
        example = f"{host}:{port}"
    raise ConfigError(key, f"a URL is not an address: give HOST:PORT (e.g. {example}), "
                           f"not {match.group(1)}://...")


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class RelayConfig:
    """Data-plane settings common to every mode."""

    splice: bool = True
    """Move bytes with splice(2) through pipes (False: copy through user space)."""
    pipe_size: int = 1 << 20
    """Pipe capacity per direction in flight (bytes); bounds buffering per direction."""
    idle_timeout: float = 300.0
    """Close a connection after this many seconds without a byte either way (0: never)."""
    connect_timeout: float = 10.0
    """Give up on an upstream connection attempt after this many seconds."""
    max_connections: int = 0
    """Stop accepting above this many open client connections (0: derived from the fd limit)."""

    def __post_init__(self) -> None:
        if self.pipe_size < 4096 or self.pipe_size > (1 << 30):
            raise ConfigError("pipe-size", "must be between 4096 and 1 GiB")
        if self.idle_timeout < 0:
            raise ConfigError("idle-timeout", "must be >= 0")
        if self.connect_timeout <= 0:
            raise ConfigError("connect-timeout", "must be > 0")
        if self.max_connections < 0:
            raise ConfigError("max-connections", "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """Settings every proxying mode shares; mode configs extend it."""

    upstream: UpstreamMode = UpstreamMode.AUTO
    """Protocol toward the target."""
    relay: RelayConfig = field(default_factory=RelayConfig)
    """Data-plane settings."""
    backlog: int = 4096
    """listen(2) backlog."""
    drain_timeout: float = 10.0
    """On SIGTERM/SIGINT, wait this long for open connections before closing them."""
    tcp_only_ttl: float = 600.0
    """In auto mode, remember a target that fell back to TCP for this many seconds."""
    log_connections: bool = True
    """Log one line per connection at close."""
    dss_checksum: bool = True
    """Ask for DSS checksums (RFC 8684 §3.3) on every MPTCP connection, both legs
    (``net.mptcp.checksum_enabled`` held at 1 in the namespace, restored on exit).
    On Linux 6.18 multipath connections can deliver wrong bytes either way; with
    checksums, none of 3,000 transfers through forward, SOCKS5 and HTTP CONNECT
    (server sending while the client uploads) was wrong, without them 6 of
    3,000 (README, "Data integrity"). The converter's default differs (see
    ConvertConfig)."""

    def __post_init__(self) -> None:
        if self.backlog < 1:
            raise ConfigError("backlog", "must be >= 1")
        if self.drain_timeout < 0:
            raise ConfigError("--drain-timeout", "must be >= 0")
        if self.tcp_only_ttl < 0:
            raise ConfigError("--tcp-only-ttl", "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class ExplicitProxySettings(ServerSettings):
    """What the modes whose clients name their target share (convert, socks5,
    http-connect): who may ask, where to, and how long the asking may take."""

    allow_clients: tuple[IPNetwork, ...] = field(
        default_factory=lambda: parse_networks(DEFAULT_CLIENT_NETWORKS, "--allow"))
    """Client source networks served; others are refused in the protocol's
    terms. Default: loopback, RFC 1918, RFC 6598 shared and ULA sources (a
    managed network, never the whole Internet)."""
    allow_targets: tuple[IPNetwork, ...] = ()
    """Special-use target ranges (private, CGN, ULA, ...) that may be connected to."""
    deny_targets: tuple[IPNetwork, ...] = ()
    """Target ranges always refused."""
    handshake_timeout: float = 10.0
    """Seconds from accept to a complete request (one deadline, not per read)."""
    max_pending_per_client: int = 64
    """Open handshakes per client address; above, refused."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.allow_clients:
            raise ConfigError("--allow", "no client network allowed: nobody could connect")
        if self.handshake_timeout <= 0:
            raise ConfigError("--handshake-timeout", "must be > 0")
        if self.max_pending_per_client < 1:
            raise ConfigError("--max-pending-per-client", "must be >= 1")


@dataclass(frozen=True)
class ForwardConfig(ServerSettings):
    """``mptcp-proxy forward``: an MPTCP front door for one TCP target."""

    listen: Endpoint
    """Address the MPTCP listener binds to."""
    target: Endpoint
    """Where every connection is forwarded."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target.port == 0:
            raise ConfigError("--to", "target port 0 is not connectable")


def read_private_file(path: str, key: str, limit: int) -> bytes:
    """The bytes of a secret-holding file (cookie secret, passwords).

    Refuses, as a :class:`ConfigError` naming ``key``, a missing or irregular
    file, one larger than ``limit`` bytes, and one others may read.
    """
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(key, f"{path} is not a regular file")
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(key, f"{path} is readable by others; chmod 600 it")
        if st.st_size > limit:
            raise ConfigError(key, f"{path} is larger than {limit} bytes")
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
