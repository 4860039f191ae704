"""The client agent's pure parts: what to capture, the nftables table that does it,
and how a converter's refusal is told to the application. No sockets, no clock.

The agent (``server/agent.py``) runs on a host whose applications speak plain
TCP. Their outgoing connections to the captured networks are redirected by
nftables to the agent's local listener; the agent learns each original
destination (SO_ORIGINAL_DST), opens an MPTCP connection to a Transport
Converter and names the destination in an RFC 8803 Connect TLV, in the SYN
with TCP Fast Open. Applications configured with a SOCKS5 proxy reach the
same path through the agent's SOCKS5 listener.

Design rules (each one is tested in ``tests/unit/test_client_agent_rules.py``):

- **One table of the agent's own** (``inet mptcp_proxy_client``), one chain
  ``type nat hook output priority -100``: only locally generated connections
  are captured, never forwarded traffic. The table is replaced atomically on
  start (a crashed run leaves no second copy) and deleted on exit.
- **The agent never captures itself**: packets carrying the agent's fwmark
  (SO_MARK on every socket it opens; the kernel copies the mark to each MPTCP
  subflow, measured) return first; so do connections to the converters'
  address and port, and to local addresses (``fib daddr type local``), which
  also keeps loopback traffic and the agent's own listener out of reach.
- Then one ``redirect to :PORT`` rule per capture spec, in the order given;
  IPv4 specs match ``ip daddr``, IPv6 specs ``ip6 daddr`` (an ``inet`` table
  sees both families).
- Capture specs are ``CIDR[:PORTS]``; an IPv6 spec with ports needs brackets
  (``[fd00::/8]:80,443``). Networks with host bits set are refused, not
  silently widened; IPv4-mapped IPv6 networks are refused (write IPv4).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias, Union

from mptcp_proxy.errors import ConfigError
from mptcp_proxy.modes.socks5 import Socks5Reply
from mptcp_proxy.modes.transparent import PortSet
from mptcp_proxy.wire.convert import ConvertErrorCode

IPNetwork: TypeAlias = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
IPAddress: TypeAlias = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

TABLE_FAMILY = "inet"
DEFAULT_TABLE = "mptcp_proxy_client"
CHAIN_OUTPUT = "output"
NAT_OUTPUT_PRIORITY = -100     # NF_IP_PRI_NAT_DST: where DNAT of local output happens
DEFAULT_MARK = 0x2263          # RFC 8803's magic number, as the agent's fwmark
MAX_MARK = 0xFFFFFFFF
TABLE_COMMENT = "mptcp-proxy client agent"


# --------------------------------------------------------------------------
# Capture specs
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class CaptureSpec:
    """One ``--capture`` value: a destination network and the ports taken there."""

    network: IPNetwork
    ports: PortSet = field(default_factory=PortSet)
    """Destination ports to capture (empty: every port)."""

    @classmethod
    def parse(cls, text: str, key: str = "--capture") -> "CaptureSpec":
        """``CIDR``, ``CIDR:PORTS``, ``[V6CIDR]:PORTS`` (PORTS: ``80,443,8000-8100`` or ``all``).

        A bare address means that one host (/32, /128).
        """
        text = text.strip()
        if not text:
            raise ConfigError(key, "empty capture spec")
        if text.startswith("["):
            net_text, sep, rest = text[1:].partition("]")
            if not sep:
                raise ConfigError(key, f"missing ']' in {text!r}")
            if rest and not rest.startswith(":"):
                raise ConfigError(key, f"expected [IPv6-CIDR]:PORTS, got {text!r}")
            ports_text: str | None = rest[1:] if rest else None
            if ":" not in net_text:
                raise ConfigError(key, f"brackets are for IPv6 networks, got {text!r}")
        elif text.count(":") >= 2:
            # IPv6 without brackets: no ports possible (the colons are the address's).
            net_text, ports_text = text, None
        else:
            net_text, sep, port_part = text.partition(":")
            ports_text = port_part if sep else None
        network = _network(net_text, text, key)
        if ports_text is None:
            ports = PortSet()
        elif not ports_text.strip():
            raise ConfigError(key, f"empty port list in {text!r}")
        else:
            ports = PortSet.parse(ports_text, key)
        return cls(network, ports)

    @property
    def version(self) -> int:
        return self.network.version

    def matches(self, address: IPAddress | str, port: int) -> bool:
        """Would a connection to ``address:port`` be captured by this spec?"""
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        return ip.version == self.version and ip in self.network and port in self.ports

    def __str__(self) -> str:
        net = f"[{self.network}]" if self.version == 6 and not self.ports.all else str(self.network)
        return net if self.ports.all else f"{net}:{self.ports}"


def _network(net_text: str, whole: str, key: str) -> IPNetwork:
    net_text = net_text.strip()
    try:
        network = ipaddress.ip_network(net_text, strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(net_text, strict=False)
        except ValueError:
            hint = ""
            if "/" in net_text and net_text.count(":") >= 2 and net_text.rsplit("/", 1)[1].count(":"):
                hint = " (IPv6 with ports needs brackets: [fd00::/8]:80,443)"
            raise ConfigError(key, f"not a network (CIDR) or address: {whole!r}{hint}") from None
        raise ConfigError(key, f"{net_text} has host bits set ({exc}); did you mean "
                               f"{loose}?") from None
    if isinstance(network, ipaddress.IPv6Network) and network.network_address.ipv4_mapped:
        raise ConfigError(key, f"{network} is IPv4-mapped: write the IPv4 network")
    return network


def parse_captures(texts: Iterable[str], key: str = "--capture") -> tuple[CaptureSpec, ...]:
    """Every ``--capture`` value, duplicates refused."""
    specs: list[CaptureSpec] = []
    for text in texts:
        spec = CaptureSpec.parse(text, key)
        if spec in specs:
            raise ConfigError(key, f"{spec} given twice")
        specs.append(spec)
    return tuple(specs)


# --------------------------------------------------------------------------
# The ruleset
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class CaptureRules:
    """Everything the capture table depends on."""

    captures: tuple[CaptureSpec, ...]
    listen_port: int
    """Port of the agent's capture listeners (127.0.0.1 and ::1): the redirect target."""
    mark: int = DEFAULT_MARK
    """fwmark the agent sets on its own sockets (SO_MARK): never captured."""
    converters: tuple[tuple[IPAddress, int], ...] = ()
    """Converter addresses and ports: never captured."""

    def __post_init__(self) -> None:
        if not self.captures:
            raise ConfigError("--capture", "nothing to capture")
        if not 1 <= self.listen_port <= 65535:
            raise ConfigError("--listen-port", f"port {self.listen_port} out of range 1-65535")
        if not 0 < self.mark <= MAX_MARK:
            raise ConfigError("--mark", f"mark {self.mark:#x} out of range 1-{MAX_MARK:#x}")
        converters = []
        for address, port in self.converters:
            ip = ipaddress.ip_address(address) if isinstance(address, str) else address
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            if not 1 <= port <= 65535:
                raise ConfigError("--converter", f"port {port} out of range 1-65535")
            if (ip, port) not in converters:
                converters.append((ip, port))
        object.__setattr__(self, "converters", tuple(converters))

    @property
    def families(self) -> tuple[int, ...]:
        """IP versions captured (4, 6), in ascending order."""
        return tuple(sorted({spec.version for spec in self.captures}))


def _proto(version: int) -> str:
    return "ip" if version == 4 else "ip6"


def render_capture_table(rules: CaptureRules) -> str:
    """The body of table ``inet mptcp_proxy_client`` (for kernel.nft.NftTable)."""
    lines = [
        f'  comment "{TABLE_COMMENT}"',
        f"  chain {CHAIN_OUTPUT} {{",
        f"    type nat hook output priority {NAT_OUTPUT_PRIORITY}; policy accept;",
        # The agent's own sockets (converter and direct connections, with
        # every MPTCP subflow) carry the mark: never redirected to itself.
        f"    meta mark {rules.mark:#x} return",
        # Loopback and this host's own addresses, the agent's listener among them.
        "    fib daddr type local return",
    ]
    for address, port in rules.converters:
        lines.append(f"    {_proto(address.version)} daddr {address} tcp dport {port} return")
    for spec in rules.captures:
        match = ("meta l4proto tcp" if spec.ports.all
                 else f"tcp dport {spec.ports.nft()}")
        lines.append(f"    {_proto(spec.version)} daddr {spec.network} {match} "
                     f"redirect to :{rules.listen_port}")
    lines.append("  }")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Telling the application
# --------------------------------------------------------------------------

SOCKS_REPLY_FOR_CONVERT_ERROR: dict[int, Socks5Reply] = {
    ConvertErrorCode.CONNECTION_RESET: Socks5Reply.CONNECTION_REFUSED,           # 96 -> 5
    ConvertErrorCode.DESTINATION_UNREACHABLE: Socks5Reply.HOST_UNREACHABLE,      # 97 -> 4
    ConvertErrorCode.NETWORK_FAILURE: Socks5Reply.NETWORK_UNREACHABLE,           # 65 -> 3
    ConvertErrorCode.NOT_AUTHORIZED: Socks5Reply.NOT_ALLOWED,                    # 32 -> 2
}
"""RFC 8803 Error codes with a SOCKS5 (RFC 1928 §6) counterpart; the rest is 1."""


def socks_reply_for(code: int) -> Socks5Reply:
    """The SOCKS5 REP for a converter's Error code (general failure when none fits)."""
    return SOCKS_REPLY_FOR_CONVERT_ERROR.get(int(code), Socks5Reply.GENERAL_FAILURE)


def refusal_reason(code: int) -> str:
    """The close-log reason for a converter's Error (``convert-error:96``)."""
    return f"convert-error:{int(code)}"


def captured_by(captures: Sequence[CaptureSpec], address: IPAddress | str,
                port: int) -> CaptureSpec | None:
    """The first spec capturing ``address:port`` (the order rules are rendered in)."""
    for spec in captures:
        if spec.matches(address, port):
            return spec
    return None


__all__ = [
    "CHAIN_OUTPUT", "DEFAULT_MARK", "DEFAULT_TABLE", "NAT_OUTPUT_PRIORITY",
    "SOCKS_REPLY_FOR_CONVERT_ERROR", "TABLE_FAMILY", "CaptureRules", "CaptureSpec",
    "captured_by", "parse_captures", "refusal_reason", "render_capture_table",
    "socks_reply_for",
]
