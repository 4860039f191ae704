"""Implicit (transparent) proxy: what to intercept, as an nftables ruleset. Pure.

The proxy sits on the path of a client's first subflow (ARCHITECTURE.md,
"Implicit proxy"). This module renders the one table the running proxy owns:

- **Only MP_CAPABLE SYNs are diverted** (``tcp option mptcp subtype 0``,
  RFC 8684 §3.1): plain TCP is routed through untouched, and MP_JOIN SYNs
  (subtype 1, §3.2) are never taken, so a join toward another proxy's
  announced address crossing this host passes by.
- Diverted SYNs go with TPROXY to the proxy's IP_TRANSPARENT listener and get
  the fwmark that the policy rule (kernel/routing.py) routes locally; later
  packets of the flow find the transparent socket (``socket transparent 1``).
- Servers known to speak MPTCP sit in a set with a timeout
  (``mptcp_servers4`` / ``mptcp_servers6``): their SYNs are not diverted, so
  those connections run end to end until the element expires.
- ``interfaces`` limits interception to SYNs *arriving* on the proxy's access
  interfaces: the proxy's own upstream SYNs, or another proxy's, crossing this
  host on its way elsewhere are never diverted a second time.
- Destinations local to this host (``fib daddr type local``) are never
  diverted: connections to the proxy host itself are its own business.

The table comment carries the kernel state to restore if the proxy dies
without cleaning up (:class:`RestoreRecord`): the record lives, and dies, with
the network namespace it describes.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from mptcp_proxy.errors import ConfigError, KernelError

TABLE_FAMILY = "inet"
TABLE_NAME = "mptcp_proxy_transparent"
BYPASS_SET4 = "mptcp_servers4"
BYPASS_SET6 = "mptcp_servers6"
CHAIN_PREROUTING = "prerouting"
CHAIN_DIVERT = "divert"

MPTCP_SUBTYPE_MP_CAPABLE = 0   # RFC 8684 §3.1; MP_JOIN is 1 (§3.2)
DEFAULT_FWMARK = 0x4D50        # "MP"
DEFAULT_ROUTE_TABLE = 0x4D50
DEFAULT_TPROXY_PORT = 7001
DEFAULT_ANNOUNCE_PORT = 7002
DEFAULT_BYPASS_TTL = 600.0
MAX_BYPASS_TTL = 7 * 24 * 3600.0
COMMENT_MAX = 128              # nftables limit on a comment (NFTNL_UDATA_COMMENT_MAXLEN)

_IFNAME = re.compile(r"^[A-Za-z0-9_.:@+-]{1,15}$")


# --------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class PortSet:
    """Destination ports to intercept: ranges, or every port when empty."""

    ranges: tuple[tuple[int, int], ...] = ()

    @property
    def all(self) -> bool:
        return not self.ranges

    @classmethod
    def parse(cls, text: str, key: str = "--ports") -> "PortSet":
        """``all`` or a list like ``80,443,8000-8100`` (merged, sorted)."""
        text = text.strip()
        if text.lower() == "all":
            return cls()
        ranges: list[tuple[int, int]] = []
        for part in text.split(","):
            part = part.strip()
            lo_text, dash, hi_text = part.partition("-")
            if not lo_text.isdigit() or (dash and not hi_text.isdigit()):
                raise ConfigError(key, f"expected all or PORT[,PORT|LO-HI...], got {text!r}")
            lo = int(lo_text)
            hi = int(hi_text) if dash else lo
            if not 1 <= lo <= hi <= 65535:
                raise ConfigError(key, f"bad port range {part!r} (ports are 1-65535)")
            ranges.append((lo, hi))
        return cls(_merge(ranges))

    def __contains__(self, port: int) -> bool:
        return self.all or any(lo <= port <= hi for lo, hi in self.ranges)

    def __str__(self) -> str:
        if self.all:
            return "all"
        return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ranges)

    def nft(self) -> str:
        """The nftables set expression (``{ 80, 443, 8000-8100 }``)."""
        return "{ " + ", ".join(str(lo) if lo == hi else f"{lo}-{hi}"
                                for lo, hi in self.ranges) + " }"


def _merge(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return tuple(merged)


# --------------------------------------------------------------------------
# What survives a crash: the restore record in the table comment
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class RestoreRecord:
    """Kernel state the proxy changed, to put back if it died without doing so.

    Policy-routing rules and routes need no record: they carry the project's
    routing protocol number and are found by it (kernel/routing.py).
    """

    c_bit_was: str | None = None
    """``net.mptcp.allow_join_initial_addr_port`` before the proxy set it (None: untouched)."""
    limits_were: tuple[int, int] | None = None
    """``(subflows, add_addr_accepted)`` before the proxy raised them (None: untouched)."""
    endpoints: tuple[tuple[int, int], ...] = ()
    """``(id, port)`` of the signal endpoints the proxy added."""

    _PREFIX = "mptcp-proxy transparent"

    def encode(self) -> str:
        parts = [self._PREFIX]
        if self.c_bit_was is not None:
            parts.append(f"c_bit_was={self.c_bit_was}")
        if self.limits_were is not None:
            parts.append(f"limits_were={self.limits_were[0]}/{self.limits_were[1]}")
        if self.endpoints:
            parts.append("endpoints=" + "/".join(f"{i}:{p}" for i, p in self.endpoints))
        text = " ".join(parts)
        if len(text) > COMMENT_MAX:
            raise ConfigError("--announce", "too many endpoints to record")
        return text

    @classmethod
    def decode(cls, text: str) -> "RestoreRecord":
        """Parse a table comment; :class:`KernelError` if it is not one of ours."""
        if not text.startswith(cls._PREFIX):
            raise KernelError(f"not an mptcp-proxy restore record: {text!r}")
        fields: dict[str, str] = {}
        for token in text[len(cls._PREFIX):].split():
            key, eq, value = token.partition("=")
            if not eq or key in fields:
                raise KernelError(f"bad restore record token {token!r}")
            fields[key] = value
        try:
            c_bit = fields.pop("c_bit_was", None)
            if c_bit is not None and not c_bit.isdigit():
                raise ValueError(c_bit)
            limits = None
            if "limits_were" in fields:
                a, b = fields.pop("limits_were").split("/")
                limits = (int(a), int(b))
            endpoints: tuple[tuple[int, int], ...] = ()
            if "endpoints" in fields:
                endpoints = tuple((int(i), int(p)) for i, p in
                                  (e.split(":") for e in fields.pop("endpoints").split("/")))
        except ValueError:
            raise KernelError(f"bad restore record {text!r}") from None
        if fields:
            raise KernelError(f"unknown restore record fields {sorted(fields)}")
        return cls(c_bit, limits, endpoints)


# --------------------------------------------------------------------------
# The ruleset
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class InterceptRules:
    """Everything the interception ruleset depends on."""

    tproxy_port: int
    """Port of the IP_TRANSPARENT listener SYNs are diverted to."""
    ports: PortSet = field(default_factory=PortSet)
    """Destination ports to intercept."""
    interfaces: tuple[str, ...] = ()
    """Intercept only SYNs arriving on these interfaces (empty: any but ``lo``)."""
    mark: int = DEFAULT_FWMARK
    """fwmark routed to the local table by the policy rule."""
    bypass_ttl: float = DEFAULT_BYPASS_TTL
    """How long a server seen speaking MPTCP is left end to end (seconds)."""
    ipv4: bool = True
    ipv6: bool = True
    record: RestoreRecord = field(default_factory=RestoreRecord)
    """Written into the table comment."""

    def __post_init__(self) -> None:
        if not 1 <= self.tproxy_port <= 65535:
            raise ConfigError("--tproxy-port", f"port {self.tproxy_port} out of range 1-65535")
        if not 0 < self.mark <= 0xFFFFFFFF:
            raise ConfigError("--fwmark", f"mark {self.mark:#x} out of range")
        if not 1 <= self.bypass_ttl <= MAX_BYPASS_TTL:
            raise ConfigError("--bypass-ttl", f"must be 1 to {MAX_BYPASS_TTL:.0f} seconds")
        for ifname in self.interfaces:
            if not _IFNAME.match(ifname):
                raise ConfigError("--interface", f"bad interface name {ifname!r}")
        if not (self.ipv4 or self.ipv6):
            raise ConfigError("--family", "intercept IPv4, IPv6 or both")


def ttl_text(seconds: float) -> str:
    """nftables time: whole seconds, at least 1 (``600s``)."""
    return f"{max(1, round(seconds))}s"


def render_ruleset(rules: InterceptRules) -> str:
    """The body of table ``inet mptcp_proxy_transparent`` (for kernel.nft.NftTable)."""
    mark = f"{rules.mark:#x}"
    ttl = ttl_text(rules.bypass_ttl)
    if rules.interfaces:
        names = ", ".join(f'"{i}"' for i in rules.interfaces)
        iif = f"iifname {{ {names} }} "
    else:
        iif = 'iifname != "lo" '
    dport = "" if rules.ports.all else f"tcp dport {rules.ports.nft()} "
    lines = [f'  comment "{rules.record.encode()}"']
    families = []
    if rules.ipv4:
        families.append(("ipv4", "ip", BYPASS_SET4, "ipv4_addr"))
    if rules.ipv6:
        families.append(("ipv6", "ip6", BYPASS_SET6, "ipv6_addr"))
    for _, _, set_name, addr_type in families:
        lines += [
            f"  set {set_name} {{",
            f"    type {addr_type} . inet_service",
            "    flags timeout",
            f"    timeout {ttl}",
            "  }",
        ]
    lines += [
        f"  chain {CHAIN_PREROUTING} {{",
        "    type filter hook prerouting priority mangle; policy accept;",
        # Packets of diverted flows (and of transparent upstream sockets) go
        # to their local socket through the policy rule.
        f"    meta l4proto tcp socket transparent 1 meta mark set {mark} accept",
        f"    {iif}tcp flags & (fin | syn | rst | ack) == syn {dport}"
        f"tcp option mptcp subtype {MPTCP_SUBTYPE_MP_CAPABLE} jump {CHAIN_DIVERT}",
        "  }",
        f"  chain {CHAIN_DIVERT} {{",
        "    fib daddr type local return",
    ]
    for _, proto, set_name, _ in families:
        lines.append(f"    {proto} daddr . tcp dport @{set_name} return")
    for nfproto, proto, _, _ in families:
        lines.append(f"    meta nfproto {nfproto} meta l4proto tcp "
                     f"tproxy {proto} to :{rules.tproxy_port} meta mark set {mark} accept")
    lines.append("  }")
    return "\n".join(lines) + "\n"


def bypass_element(address: str, port: int, ttl: float) -> tuple[str, str]:
    """``(set name, element)`` adding server ``address:port`` to the bypass set for ``ttl``."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if not 1 <= port <= 65535:
        raise ConfigError("bypass", f"port {port} out of range")
    set_name = BYPASS_SET4 if ip.version == 4 else BYPASS_SET6
    return set_name, f"{ip} . {port} timeout {ttl_text(ttl)}"


def unmap_address(address: str) -> str:
    """``::ffff:10.0.0.1`` -> ``10.0.0.1`` (dual-stack listeners report IPv4 mapped)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return address
