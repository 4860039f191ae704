"""Who may use a proxy and where it may connect: pure address policy.

Addresses in, decisions out: no sockets, no DNS, no clock. The server feeds the
proxy's own addresses in (they change at run time); everything else is
configuration.

Design rules:
- A target is judged in every spelling it can hide behind (PROTOCOLS.md,
  "Target policy"): the address itself and each IPv4 address embedded in it,
  IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible ``::a.b.c.d``, IPv4-translated
  ``::ffff:0:a.b.c.d``, 6to4
  ``2002:AABB:CCDD::/48`` (RFC 3056), NAT64 ``64:ff9b::/96`` (RFC 6052) and
  ``64:ff9b:1::/48`` (RFC 8215), Teredo ``2001::/32`` (RFC 4380, server and
  de-obfuscated client). The worst verdict of all the spellings wins.
- Three verdicts. FORBIDDEN: never a destination (loopback, unspecified,
  multicast, broadcast); RFC 8803 §4.2.5 answers these with Malformed Message.
  DENIED: a policy refusal (link-local, the proxy's own addresses, special-use
  and private ranges not explicitly allowed, ranges the operator denies);
  answered with Not Authorized. ALLOWED: everything else (global unicast).
- ``allow_targets`` re-opens special-use ranges (a lab on 10.0.0.0/8, a private
  data centre). It never re-opens loopback, link-local, multicast, broadcast or
  the proxy itself, and ``deny_targets`` beats it.
- Clients are admitted by source network (RFC 8803 §6: a managed network).
  The default admits only loopback and private/shared/ULA sources, so a
  converter started without ``--allow`` is never an open relay for the Internet.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import TypeAlias, Union

from mptcp_proxy.errors import ConfigError

IPAddress: TypeAlias = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork: TypeAlias = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

ANY = "any"
"""Spelling of "every address" in allow lists (0.0.0.0/0 and ::/0)."""

DEFAULT_CLIENT_NETWORKS: tuple[str, ...] = (
    "127.0.0.0/8", "::1/128",                          # the host itself
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",   # RFC 1918
    "100.64.0.0/10",                                   # RFC 6598 shared (CGN subscribers)
    "fc00::/7",                                        # RFC 4193 ULA
)
"""Client sources admitted when no ``--allow`` is given: local and managed networks."""


class TargetVerdict(enum.IntEnum):
    """Ordered by severity: the worst verdict of all spellings is the answer."""

    ALLOWED = 0
    DENIED = 1
    FORBIDDEN = 2


class TargetReason(enum.Enum):
    """Why a target got its verdict (stable strings: they appear in logs)."""

    GLOBAL = "global"
    ALLOWED_RANGE = "allowed-range"
    UNSPECIFIED = "unspecified"
    LOOPBACK = "loopback"
    MULTICAST = "multicast"
    BROADCAST = "broadcast"
    LINK_LOCAL = "link-local"
    OWN_ADDRESS = "own-address"
    DENIED_RANGE = "denied-range"
    SPECIAL_USE = "special-use"


_VERDICT_OF_REASON = {
    TargetReason.GLOBAL: TargetVerdict.ALLOWED,
    TargetReason.ALLOWED_RANGE: TargetVerdict.ALLOWED,
    TargetReason.UNSPECIFIED: TargetVerdict.FORBIDDEN,
    TargetReason.LOOPBACK: TargetVerdict.FORBIDDEN,
    TargetReason.MULTICAST: TargetVerdict.FORBIDDEN,
    TargetReason.BROADCAST: TargetVerdict.FORBIDDEN,
    TargetReason.LINK_LOCAL: TargetVerdict.DENIED,
    TargetReason.OWN_ADDRESS: TargetVerdict.DENIED,
    TargetReason.DENIED_RANGE: TargetVerdict.DENIED,
    TargetReason.SPECIAL_USE: TargetVerdict.DENIED,
}


def _nets(*texts: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(t) for t in texts)


# Never destinations, whatever the configuration.
_UNSPECIFIED = _nets("0.0.0.0/8", "::/128")          # RFC 1122 §3.2.1.3 "this network"
_LOOPBACK = _nets("127.0.0.0/8", "::1/128")
_MULTICAST = _nets("224.0.0.0/4", "ff00::/8")
_BROADCAST = _nets("255.255.255.255/32")
_LINK_LOCAL = _nets("169.254.0.0/16", "fe80::/10")

# Special-use ranges (IANA special-purpose registries, RFC 6890 and updates):
# not globally reachable, or not a real destination. Denied unless allowed.
_SPECIAL_USE = _nets(
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",   # RFC 1918
    "100.64.0.0/10",                                   # RFC 6598 shared address space
    "192.0.0.0/24",                                    # RFC 6890 IETF protocol assignments
    "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24",  # RFC 5737 documentation
    "192.88.99.0/24",                                  # RFC 7526 deprecated 6to4 relays
    "198.18.0.0/15",                                   # RFC 2544 benchmarking
    "240.0.0.0/4",                                     # RFC 1112 reserved
    "::/96",                                           # RFC 4291 IPv4-compatible (deprecated)
    "::ffff:0:0:0/96",                                 # RFC 2765 IPv4-translated
    "64:ff9b:1::/48",                                  # RFC 8215 local-use NAT64
    "100::/64",                                        # RFC 6666 discard-only
    "2001::/23",                                       # RFC 2928 IETF protocol assignments (Teredo...)
    "2001:db8::/32", "3fff::/20",                      # RFC 3849, RFC 9637 documentation
    "5f00::/16",                                       # RFC 9602 SRv6 SIDs
    "fc00::/7",                                        # RFC 4193 unique local
    "fec0::/10",                                       # RFC 3879 deprecated site-local
)

# Prefixes whose last 32 bits are an IPv4 address: NAT64 (RFC 6052, RFC 8215)
# and SIIT "IPv4-translated" addresses (RFC 2765).
_EMBEDDING_LOW32 = _nets("64:ff9b::/96", "64:ff9b:1::/48", "::ffff:0:0:0/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_LOW32 = 0xFFFFFFFF


# One DNS label as hosts send it: letters, digits, underscores, inner hyphens.
# Matched label by label (never one pattern over the whole name, whose
# backtracking a crafted name makes exponential).
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")


def valid_hostname(name: str) -> bool:
    """A DNS name a proxy may resolve: 1-253 characters, LDH(+underscore)
    labels of 1-63 characters, one optional trailing dot, not all digits
    (``999.1.1.1`` is a bad address, not a name). Rejects spaces and control
    characters, which would otherwise reach resolvers and log lines."""
    if not 1 <= len(name) <= 253:
        return False
    labels = name[:-1].split(".") if name.endswith(".") else name.split(".")
    if not all(_LABEL.match(label) for label in labels):
        return False
    return not name.replace(".", "").isdigit()


def parse_address(text: str) -> IPAddress:
    """An address as text (``::ffff:a.b.c.d`` stays IPv6 here; :func:`normalize` maps it)."""
    return ipaddress.ip_address(text.split("%", 1)[0])


def normalize(address: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 (what a dual-stack socket reports for IPv4 peers) as IPv4."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def spellings(address: IPAddress) -> tuple[IPAddress, ...]:
    """``address`` (normalized) and every IPv4 address embedded in it."""
    address = normalize(address)
    found: list[IPAddress] = [address]
    if isinstance(address, ipaddress.IPv4Address):
        return tuple(found)
    as_int = int(address)
    if address in _IPV4_COMPATIBLE and as_int > 1:     # not :: or ::1 themselves
        found.append(ipaddress.IPv4Address(as_int & _LOW32))
    sixtofour = address.sixtofour
    if sixtofour is not None:
        found.append(sixtofour)
    teredo = address.teredo
    if teredo is not None:
        found.extend(teredo)
    if any(address in prefix for prefix in _EMBEDDING_LOW32):
        found.append(ipaddress.IPv4Address(as_int & _LOW32))
    return tuple(found)


def _in_any(address: IPAddress, networks: Iterable[IPNetwork]) -> bool:
    """``address`` in one of ``networks``: integer masks, compiled once per tuple
    (``address in network`` costs about a microsecond each, on every connection)."""
    value, version = int(address), address.version
    for net_version, net, mask in _compiled(networks):
        if net_version == version and value & mask == net:
            return True
    return False


_COMPILED: dict[int, tuple[object, tuple[tuple[int, int, int], ...]]] = {}


def _compiled(networks: Iterable[IPNetwork]) -> tuple[tuple[int, int, int], ...]:
    entry = _COMPILED.get(id(networks))
    if entry is not None and entry[0] is networks:
        return entry[1]
    compiled = tuple((n.version, int(n.network_address), int(n.netmask)) for n in networks)
    if isinstance(networks, tuple):  # immutable: safe to remember (kept alive by the entry)
        if len(_COMPILED) > 1024:
            _COMPILED.clear()
        _COMPILED[id(networks)] = (networks, compiled)
    return compiled


def parse_networks(texts: Iterable[str], key: str) -> tuple[IPNetwork, ...]:
    """CIDRs (or bare addresses, or ``any``) from the command line or a config file."""
    networks: list[IPNetwork] = []
    for text in texts:
        text = text.strip()
        if text.lower() == ANY:
            networks += _nets("0.0.0.0/0", "::/0")
            continue
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ConfigError(key, f"not a network (CIDR) or address: {text!r}") from None
        if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped:
            # ::ffff:10.0.0.0/104 means 10.0.0.0/8: addresses are compared normalized.
            mapped = net.network_address.ipv4_mapped
            net = ipaddress.ip_network(f"{mapped}/{max(0, net.prefixlen - 96)}", strict=False)
        networks.append(net)
    return tuple(networks)


@dataclass(frozen=True, slots=True)
class TargetDecision:
    """The verdict on one target and the spelling that earned it."""

    verdict: TargetVerdict
    reason: TargetReason
    address: IPAddress
    """The address (or embedded IPv4 address) the verdict is about."""

    @property
    def allowed(self) -> bool:
        return self.verdict is TargetVerdict.ALLOWED


@dataclass(frozen=True, slots=True)
class TargetPolicy:
    """Where connections may go (PROTOCOLS.md, "Target policy")."""

    allow_targets: tuple[IPNetwork, ...] = ()
    """Special-use ranges (private, CGN, ULA, benchmarking ...) that are allowed."""
    deny_targets: tuple[IPNetwork, ...] = ()
    """Ranges always refused, global ones included."""
    own_addresses: frozenset[IPAddress] = frozenset()
    """The proxy's own addresses: a connection there would loop back into it."""
    broadcast_addresses: frozenset[IPAddress] = frozenset()
    """Directed broadcast addresses of the proxy's subnets."""

    def __post_init__(self) -> None:
        for name in ("allow_targets", "deny_targets"):
            nets = tuple(getattr(self, name))
            for net in nets:
                if not isinstance(net, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
                    raise TypeError(f"{name} holds networks, not {type(net).__name__}")
            object.__setattr__(self, name, nets)
        for name in ("own_addresses", "broadcast_addresses"):
            object.__setattr__(self, name, frozenset(normalize(a) for a in getattr(self, name)))

    def with_local(self, own: Collection[IPAddress],
                   broadcast: Collection[IPAddress] = ()) -> "TargetPolicy":
        """The same policy with a fresh view of the proxy's own addresses."""
        return TargetPolicy(self.allow_targets, self.deny_targets, frozenset(own),
                            frozenset(broadcast))

    def check(self, address: IPAddress) -> TargetDecision:
        """The worst verdict over every spelling of ``address`` (a zone id,
        which Python keeps in IPv6Address and set lookups would see, is
        dropped first)."""
        if getattr(address, "scope_id", None):
            address = ipaddress.IPv6Address(int(address))
        first, *embedded = spellings(address)
        worst = self._decide(first)
        for spelling in embedded:
            decision = self._decide(spelling)
            if decision.verdict > worst.verdict:
                worst = decision
        return worst

    def _decide(self, address: IPAddress) -> TargetDecision:
        reason = self._reason(address)
        return TargetDecision(_VERDICT_OF_REASON[reason], reason, address)

    def _reason(self, address: IPAddress) -> TargetReason:
        if _in_any(address, _UNSPECIFIED):
            return TargetReason.UNSPECIFIED
        if _in_any(address, _LOOPBACK):
            return TargetReason.LOOPBACK
        if _in_any(address, _MULTICAST):
            return TargetReason.MULTICAST
        if _in_any(address, _BROADCAST) or address in self.broadcast_addresses:
            return TargetReason.BROADCAST
        if _in_any(address, _LINK_LOCAL):
            return TargetReason.LINK_LOCAL
        if address in self.own_addresses:
            return TargetReason.OWN_ADDRESS
        if _in_any(address, self.deny_targets):
            return TargetReason.DENIED_RANGE
        if _in_any(address, _SPECIAL_USE):
            if _in_any(address, self.allow_targets):
                return TargetReason.ALLOWED_RANGE
            return TargetReason.SPECIAL_USE
        return TargetReason.GLOBAL


# What the special-use ranges are, for people (refusal messages and hints).
_RANGE_LABELS: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(net), label) for net, label in (
        ("10.0.0.0/8", "a private range"), ("172.16.0.0/12", "a private range"),
        ("192.168.0.0/16", "a private range"), ("fc00::/7", "a private (unique local) range"),
        ("100.64.0.0/10", "the shared (CGN) range"),
        ("192.0.2.0/24", "a documentation range"), ("198.51.100.0/24", "a documentation range"),
        ("203.0.113.0/24", "a documentation range"), ("2001:db8::/32", "a documentation range"),
        ("3fff::/20", "a documentation range"), ("198.18.0.0/15", "the benchmarking range"),
    ))

_NEVER = {
    TargetReason.UNSPECIFIED: "is unspecified",
    TargetReason.LOOPBACK: "is a loopback address",
    TargetReason.MULTICAST: "is a multicast address",
    TargetReason.BROADCAST: "is a broadcast address",
    TargetReason.LINK_LOCAL: "is link-local",
}


def special_use_range(address: IPAddress) -> IPNetwork | None:
    """The special-use range (RFC 6890 registries) holding ``address``, if any."""
    address = normalize(address)
    for net in _SPECIAL_USE:
        if net.version == address.version and address in net:
            return net
    return None


def explain_target(decision: TargetDecision, requested: IPAddress | None = None,
                   advice: bool = True) -> str:
    """Why ``decision`` refused its target, as words that follow the target's name:
    ``is in a private range (10.0.0.0/8); the proxy needs --allow-target 10.0.0.0/8
    to reach it``. ``requested``: the address asked for, when the verdict is
    about an IPv4 address embedded in it; ``advice=False`` leaves out what
    the proxy would need (:func:`allow_target_hint` says it to the operator).
    Only addresses and fixed words: safe to send to clients and to log."""
    subject = ""
    if requested is not None and normalize(requested) != decision.address:
        subject = f"embeds {decision.address}, which "
    reason = decision.reason
    if decision.allowed:
        return subject + "is allowed"
    if reason is TargetReason.SPECIAL_USE:
        net = special_use_range(decision.address)
        if net is None:  # pragma: no cover - SPECIAL_USE means inside one
            return subject + "is in a special-use range; the proxy needs --allow-target to reach it"
        label = next((label for n, label in _RANGE_LABELS if n == net), "a special-use range")
        return f"{subject}is in {label} ({net})" + (
            f"; the proxy needs --allow-target {net} to reach it" if advice else "")
    if reason is TargetReason.OWN_ADDRESS:
        return subject + "is an address of this proxy (it would connect to itself)"
    if reason is TargetReason.DENIED_RANGE:
        return subject + "is in a range this proxy refuses (--deny-target)"
    return f"{subject}{_NEVER.get(reason, 'is refused')}: a proxy never connects there"


def allow_target_hint(decision: TargetDecision) -> str | None:
    """For the operator, when a special-use target was refused: which
    ``--allow-target`` would open it (None for refusals no option changes)."""
    if decision.reason is not TargetReason.SPECIAL_USE:
        return None
    net = special_use_range(decision.address)
    return ("--allow-target CIDR allows private targets"
            + (f" (here: --allow-target {net})" if net is not None else ""))


@dataclass(frozen=True, slots=True)
class ClientPolicy:
    """Which client sources may use the proxy (RFC 8803 §6: managed networks)."""

    allow: tuple[IPNetwork, ...] = _nets(*DEFAULT_CLIENT_NETWORKS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "allow", tuple(self.allow))

    def allows(self, address: IPAddress) -> bool:
        return _in_any(normalize(address), self.allow)


__all__ = [
    "allow_target_hint", "explain_target", "special_use_range", "valid_hostname",
    "ANY", "DEFAULT_CLIENT_NETWORKS", "ClientPolicy", "IPAddress", "IPNetwork",
    "TargetDecision", "TargetPolicy", "TargetReason", "TargetVerdict", "normalize",
    "parse_address", "parse_networks", "spellings",
]
