"""Lab topologies: a multipath client, a proxy and a server in network namespaces.

The ``basic`` topology::

    client <name>-c           proxy <name>-p                 server <name>-s
      path0 10.K.0.1/24 ====== path0 10.K.0.2/24
      path1 10.K.1.1/24 ====== path1 10.K.1.2/24
      ...   (tbf at both ends) srvlink 10.K.254.1/24 ======== srvlink 10.K.254.2/24

The client routes by source address (``ip rule from 10.K.I.1 lookup 100+I``),
defaults to path 0 and has a ``subflow`` MPTCP endpoint on every path.

The ``operator`` topology (exactly two paths) puts the proxy on one access
path only, like a mobile operator's middlebox::

    client <name>-c      proxy <name>-p          wifi <name>-w (router, "the Internet")
      path0 10.K.0.1 ==== path0 10.K.0.2                      (path 0, "cellular")
                          uplink 10.K.253.1 ----- proxy 10.K.253.2
                          (its public address)
      path1 10.K.1.1 ================================ path1 10.K.1.2 (path 1, "Wi-Fi")
                                                  srvlink 10.K.254.1 --- server <name>-s
                                                                         srvlink 10.K.254.2
                                                  mpsrvlink 10.K.252.1 - mpserver <name>-m
                                                                         srvlink 10.K.252.2

The server speaks plain TCP (``net.mptcp.enabled=0`` in its namespace, so
whatever runs there does); the second server, ``mpserver``, speaks MPTCP.
Both access paths are shaped with tbf at both ends; the core links are not.
The client is set up as in ``basic`` (default route via path 0, so through the
proxy), except that its endpoints are also ``fullmesh`` (see render_node).

Access paths may also have a one-way delay and a random loss
(``PathSpec(delay_ms=..., loss_pct=...)``), applied in each direction: a
round trip over a path of 10 ms gains 20 ms, and a loss of 1% loses 1% of the
packets each way. There is no netem on these machines, so the lab emulates
both with :mod:`mptcp_proxy.lab.impair`: one process per lab, in the client
namespace, holding the ids of packets that an iptables NFQUEUE rule queues
where they arrive (the gateway's end for client-to-gateway traffic, the
client's end for the way back). Paths without delay or loss get no queue.
Delay comes on top of the tbf rate, like propagation after serialisation.

IPv6 mirrors IPv4: ``fd00:K:I::1/64`` for ``10.K.I.1/24``. ``K`` is derived from
the lab name so that two labs never look alike in a trace (their namespaces
keep them apart anyway). The proxy namespace is also a router, so the client
reaches the server directly through it (the baseline a benchmark compares
with) or through a proxy listening there.

Design rules:
- Planning (names, addresses) and rendering (``ip``/``tc`` batch scripts) are
  pure functions, tested without root. Applying a plan is a handful of
  ``ip -batch`` / ``tc -batch`` processes plus in-thread sysctl writes.
- Nothing is created in the root namespace: veths are born inside theirs.
- Teardown always happens: context-manager exit, exceptions, interpreter
  exit (atexit) and SIGTERM/SIGHUP. Deleting a lab kills what runs inside it.
- A lab's facts live in ``/run/mptcp-proxy/labs/NAME.json`` so that another
  process (the CLI, a demo) can :meth:`Lab.attach` to it.
"""

from __future__ import annotations

import atexit
import hashlib
import ipaddress
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mptcp_proxy.errors import LabError
from mptcp_proxy.lab import netns

log = logging.getLogger(__name__)

LAB_PREFIX = "mpx-"
STATE_DIR = Path("/run/mptcp-proxy/labs")
TOPOLOGIES = ("basic", "operator")
ROLES = ("client", "proxy", "server")               # the basic topology's nodes
OPERATOR_ROLES = ("client", "proxy", "wifi", "server", "mpserver")
ALL_ROLES = ("client", "proxy", "wifi", "server", "mpserver")
ROLE_SUFFIX = {"client": "-c", "proxy": "-p", "server": "-s", "wifi": "-w", "mpserver": "-m"}
OPERATOR_PATHS = 2           # path 0 through the proxy, path 1 through the Wi-Fi router

# The kernel path manager holds at most 8 endpoints (MPTCP_PM_ADDR_MAX; a 9th
# fails with ERANGE) and each path takes two, IPv4 and IPv6.
MAX_PATHS = 4
MPTCP_LIMIT = 8
SERVER_SUBNET = 254          # third octet of the proxy-server link
PATH_TABLE_BASE = 100        # client routing table of path i: 100 + i
RULE_PREF_BASE = 1000        # its `ip rule` preference: 1000 + i
# Per-path tables end in an unreachable route, so that traffic bound to a
# path that is down fails instead of leaking onto another path.
UNREACHABLE_METRIC = 4096
# Main-table defaults via every path, path 0 preferred: new connections still
# leave when path 0 is down.
DEFAULT_METRIC_BASE = 10

# Explicit interface indexes. Left to the kernel, both ends of a veth get
# index 2 in their fresh namespaces; the kernel then treats their carrier
# change as non-urgent (linkwatch: ifindex == iflink) and starts the link up
# to a second later, dropping packets meanwhile.
IFINDEX_CLIENT_PATH = 10     # + path index
IFINDEX_PROXY_PATH = 20      # + path index
IFINDEX_PROXY_SERVER = 30
IFINDEX_SERVER = 40
IFINDEX_WIFI_CORE = 50       # + core link number (operator)
IFINDEX_MPSERVER = 60
UPLINK_SUBNET = 253          # operator: proxy uplink (its public address) to the router
MPSERVER_SUBNET = 252        # operator: router to the MPTCP server
LINK_UP_TIMEOUT_S = 3.0

# Path delay and loss (PathSpec): the emulator's bounds. 100% loss is a path
# that is down: set_path_up(i, False) says so more clearly.
MAX_DELAY_MS = 10_000.0
# The delay emulator must bind its queues within this time, or the build fails.
IMPAIR_READY_TIMEOUT_S = 10.0

# Every address of lab K is in 10.K.0.0/16 and fd00:K::/32 (LabPlan.networks).
LAB_PREFIX_LEN = 16
LAB_PREFIX_LEN6 = 32
# The explicit proxies that refuse private targets unless --allow-target says so.
TARGET_CHECKING_MODES = ("convert", "socks5", "http-connect")

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,23}$")
SERVER_LINK_IF = "srvlink"


# --------------------------------------------------------------------------
# Plan: pure facts about a lab
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class PathSpec:
    """How one access path between client and proxy behaves."""

    rate_mbit: float | None = None
    """Rate limit in each direction, in Mbit/s of layer-2 bytes (tbf).
    ``None`` leaves the path unshaped. TCP goodput is about 95% of it
    (Ethernet, IP and TCP headers)."""

    delay_ms: float = 0.0
    """One-way delay added in each direction, in ms (a round trip gains twice
    it). Emulated on NFQUEUE (see :mod:`mptcp_proxy.lab.impair`); 0: none."""
    loss_pct: float = 0.0
    """Probability, in percent, that a packet is lost, drawn independently for
    each packet in each direction; 0: none."""

    def __post_init__(self) -> None:
        if self.rate_mbit is not None and not 0.01 <= self.rate_mbit <= 100_000:
            raise LabError(f"path rate {self.rate_mbit} Mbit/s is out of range")
        check_impairment(self.delay_ms, self.loss_pct)

    @property
    def impaired(self) -> bool:
        """The path needs the delay emulator (it has delay or loss)."""
        return self.delay_ms > 0 or self.loss_pct > 0


def check_impairment(delay_ms: float, loss_pct: float) -> None:
    """Refuse a delay or loss the emulator cannot give (LabError naming the range)."""
    if not 0.0 <= delay_ms <= MAX_DELAY_MS:
        raise LabError(f"path delay {delay_ms} ms is out of range 0-{MAX_DELAY_MS:g}")
    if not 0.0 <= loss_pct < 100.0:
        raise LabError(f"path loss {loss_pct}% is out of range 0-100 (100 excluded)")


@dataclass(frozen=True)
class AccessPath:
    """One client-proxy link as built: interface names and addresses at both ends."""

    index: int
    spec: PathSpec
    client_if: str
    client_addr: str
    client_addr6: str
    proxy_if: str
    """Interface at the far end (the gateway's end) of the path."""
    proxy_addr: str
    """Address of the far end: the client's gateway on this path."""
    proxy_addr6: str
    prefix_len: int = 24
    prefix_len6: int = 64
    gateway: str = "proxy"
    """Role of the node at the far end: ``proxy``, or ``wifi`` (operator path 1)."""

    @property
    def rate_mbit(self) -> float | None:
        return self.spec.rate_mbit

    @property
    def delay_ms(self) -> float:
        return self.spec.delay_ms

    @property
    def loss_pct(self) -> float:
        return self.spec.loss_pct

    @property
    def table(self) -> int:
        """The client's routing table for traffic sourced from this path."""
        return PATH_TABLE_BASE + self.index


@dataclass(frozen=True)
class CoreLink:
    """An unshaped point-to-point veth behind the access paths (operator topology)."""

    a_role: str
    a_if: str
    a_index: int
    a_addr: str
    a_addr6: str
    b_role: str
    b_if: str
    b_index: int
    b_addr: str
    b_addr6: str
    prefix_len: int = 24
    prefix_len6: int = 64


@dataclass(frozen=True)
class LabPlan:
    """Everything about a lab that can be known before building it."""

    name: str
    topology: str
    paths: tuple[AccessPath, ...]
    proxy_server_if: str
    """The proxy's server-facing interface (operator: its uplink to the router)."""
    proxy_server_side_addr: str
    """The proxy's server-facing address (operator: its public address)."""
    proxy_server_side_addr6: str
    server_if: str
    server_addr: str
    server_addr6: str
    roles: tuple[str, ...] = ROLES
    """The lab's nodes, in build order."""
    links: tuple[CoreLink, ...] = ()
    """Operator: the core links (proxy uplink, router to each server)."""
    mpserver_addr: str = ""
    """Operator: the MPTCP server's address ("" in the basic topology)."""
    mpserver_addr6: str = ""

    def ns(self, role: str) -> str:
        """Namespace name of ``role`` (client, proxy, server, wifi, mpserver)."""
        return self.name + ROLE_SUFFIX[role]

    @property
    def namespaces(self) -> tuple[str, ...]:
        return tuple(self.ns(role) for role in self.roles)

    @property
    def proxy_public_addr(self) -> str:
        """The proxy address every node can reach (what a transparent proxy announces)."""
        return self.proxy_server_side_addr

    @property
    def proxy_public_addr6(self) -> str:
        return self.proxy_server_side_addr6

    @property
    def networks(self) -> tuple[str, str]:
        """``(IPv4, IPv6)`` networks holding every address of the lab.

        ``10.K.0.0/16`` and ``fd00:K::/32``: private ranges, which the explicit
        proxies (convert, socks5, http-connect) refuse as targets unless
        allowed with ``--allow-target`` (see :func:`allow_target_hint`).
        """
        v4 = ipaddress.ip_network(f"{self.server_addr}/{LAB_PREFIX_LEN}", strict=False)
        v6 = ipaddress.ip_network(f"{self.server_addr6}/{LAB_PREFIX_LEN6}", strict=False)
        return str(v4), str(v6)

    @property
    def allow_target_options(self) -> tuple[str, ...]:
        """``--allow-target NET`` for each of :attr:`networks`, as argv words."""
        return tuple(word for net in self.networks for word in ("--allow-target", net))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabPlan:
        try:
            paths = tuple(
                AccessPath(**{**p, "spec": PathSpec(**p["spec"])}) for p in data["paths"])
            links = tuple(CoreLink(**link) for link in data.get("links", ()))
            roles = tuple(data.get("roles", ROLES))
            if any(role not in ROLE_SUFFIX for role in roles):
                raise LabError(f"malformed lab state: unknown roles in {roles}")
            return cls(**{**data, "paths": paths, "links": links, "roles": roles})
        except (KeyError, TypeError) as exc:
            raise LabError(f"malformed lab state: {exc}") from None


def allow_target_advice(plan: LabPlan) -> str:
    """What the explicit proxies need to reach the lab's servers (``add --allow-target ...``)."""
    modes = f"{', '.join(TARGET_CHECKING_MODES[:-1])} and {TARGET_CHECKING_MODES[-1]}"
    return (f"add {' '.join(plan.allow_target_options)} to {modes} to reach its servers "
            "(lab addresses are private: refused as targets by default)")


def allow_target_hint(plan: LabPlan) -> str:
    """The same as one self-contained line: ``proxies in this lab: add ...``."""
    return "proxies in this lab: " + allow_target_advice(plan)


def canonical_name(raw: str) -> str:
    """The lab name for ``raw``: ``demo`` and ``mpx-demo`` both mean ``mpx-demo``.

    Every lab name carries the prefix so ``lab down --all`` can find them.
    """
    bare = raw[len(LAB_PREFIX):] if raw.startswith(LAB_PREFIX) else raw
    if not NAME_RE.match(bare):
        raise LabError(f"invalid lab name {raw!r}: use 1-24 of a-z 0-9 _ -")
    return LAB_PREFIX + bare


def new_name() -> str:
    return LAB_PREFIX + secrets.token_hex(3)


def subnet_octet(name: str) -> int:
    """Second IPv4 octet for lab ``name``: stable, 16..239."""
    return 16 + hashlib.sha256(name.encode()).digest()[0] % 224


def plan_lab(name: str, paths: Sequence[PathSpec], topology: str = "basic") -> LabPlan:
    """Names and addresses for a lab; pure."""
    name = canonical_name(name)
    if topology not in TOPOLOGIES:
        raise LabError(f"unknown topology {topology!r} (known: {', '.join(TOPOLOGIES)})")
    if not 1 <= len(paths) <= MAX_PATHS:
        raise LabError(f"a lab has 1 to {MAX_PATHS} paths, not {len(paths)}")
    k = subnet_octet(name)

    def v6(subnet: int, host: int) -> str:
        # Canonical text, so it compares equal to what getpeername() returns.
        return str(ipaddress.IPv6Address(f"fd00:{k}:{subnet}::{host}"))

    if topology == "operator":
        return _plan_operator(name, paths, k, v6)

    access = tuple(
        AccessPath(index=i, spec=spec,
                   client_if=f"path{i}", client_addr=f"10.{k}.{i}.1", client_addr6=v6(i, 1),
                   proxy_if=f"path{i}", proxy_addr=f"10.{k}.{i}.2", proxy_addr6=v6(i, 2))
        for i, spec in enumerate(paths))
    return LabPlan(
        name=name, topology=topology, paths=access,
        proxy_server_if=SERVER_LINK_IF,
        proxy_server_side_addr=f"10.{k}.{SERVER_SUBNET}.1",
        proxy_server_side_addr6=v6(SERVER_SUBNET, 1),
        server_if=SERVER_LINK_IF,
        server_addr=f"10.{k}.{SERVER_SUBNET}.2",
        server_addr6=v6(SERVER_SUBNET, 2),
    )


def _plan_operator(name: str, paths: Sequence[PathSpec], k: int, v6) -> LabPlan:
    """The operator topology: path 0 through the proxy, path 1 through the Wi-Fi router."""
    if len(paths) != OPERATOR_PATHS:
        raise LabError(f"the operator topology has {OPERATOR_PATHS} paths "
                       f"(cellular, Wi-Fi), not {len(paths)}")
    access = tuple(
        AccessPath(index=i, spec=spec,
                   client_if=f"path{i}", client_addr=f"10.{k}.{i}.1", client_addr6=v6(i, 1),
                   proxy_if=f"path{i}", proxy_addr=f"10.{k}.{i}.2", proxy_addr6=v6(i, 2),
                   gateway="proxy" if i == 0 else "wifi")
        for i, spec in enumerate(paths))

    def core(subnet: int, a_role: str, a_if: str, a_index: int,
             b_role: str, b_if: str, b_index: int) -> CoreLink:
        return CoreLink(a_role=a_role, a_if=a_if, a_index=a_index,
                        a_addr=f"10.{k}.{subnet}.1", a_addr6=v6(subnet, 1),
                        b_role=b_role, b_if=b_if, b_index=b_index,
                        b_addr=f"10.{k}.{subnet}.2", b_addr6=v6(subnet, 2))

    links = (
        core(UPLINK_SUBNET, "proxy", "uplink", IFINDEX_PROXY_SERVER,
             "wifi", "proxy", IFINDEX_WIFI_CORE),
        core(SERVER_SUBNET, "wifi", SERVER_LINK_IF, IFINDEX_WIFI_CORE + 1,
             "server", SERVER_LINK_IF, IFINDEX_SERVER),
        core(MPSERVER_SUBNET, "wifi", "mpsrvlink", IFINDEX_WIFI_CORE + 2,
             "mpserver", SERVER_LINK_IF, IFINDEX_MPSERVER),
    )
    uplink, srv, mpsrv = links
    return LabPlan(
        name=name, topology="operator", paths=access,
        proxy_server_if=uplink.a_if,
        proxy_server_side_addr=uplink.a_addr, proxy_server_side_addr6=uplink.a_addr6,
        server_if=srv.b_if, server_addr=srv.b_addr, server_addr6=srv.b_addr6,
        roles=OPERATOR_ROLES, links=links,
        mpserver_addr=mpsrv.b_addr, mpserver_addr6=mpsrv.b_addr6,
    )


# --------------------------------------------------------------------------
# Rendering: plan -> ip/tc batch lines and sysctls; pure
# --------------------------------------------------------------------------

def tbf_params(rate_mbit: float) -> tuple[int, int, int]:
    """``(rate_bit_s, burst_bytes, limit_bytes)`` for a tbf of ``rate_mbit``.

    Burst: 2 ms of traffic, at least 16 KiB; smaller buckets lose rate at high
    speed because the qdisc watchdog cannot refill them often enough. Limit:
    the bucket plus 10 ms of queue, at least 64 KiB, so TCP can keep the link
    busy without a long standing queue.
    """
    rate = int(rate_mbit * 1_000_000)
    bytes_per_s = rate / 8
    burst = max(16 * 1024, int(bytes_per_s * 0.002))
    limit = burst + max(64 * 1024, int(bytes_per_s * 0.010))
    return rate, burst, limit


def render_links(plan: LabPlan) -> list[str]:
    """``ip -batch`` lines, run in the root namespace, creating the veth pairs.

    Each end is created directly in its namespace: nothing touches the root
    namespace and names never clash.
    """
    if plan.topology == "operator":
        return _render_links_operator(plan)
    c, p, s = plan.namespaces
    lines = [f"link add name {a.client_if} index {IFINDEX_CLIENT_PATH + a.index} netns {c} "
             f"type veth peer name {a.proxy_if} index {IFINDEX_PROXY_PATH + a.index} netns {p}"
             for a in plan.paths]
    lines.append(f"link add name {plan.proxy_server_if} index {IFINDEX_PROXY_SERVER} netns {p} "
                 f"type veth peer name {plan.server_if} index {IFINDEX_SERVER} netns {s}")
    return lines


def _render_links_operator(plan: LabPlan) -> list[str]:
    c = plan.ns("client")
    lines = [f"link add name {a.client_if} index {IFINDEX_CLIENT_PATH + a.index} netns {c} "
             f"type veth peer name {a.proxy_if} index {IFINDEX_PROXY_PATH + a.index} "
             f"netns {plan.ns(a.gateway)}"
             for a in plan.paths]
    lines += [f"link add name {link.a_if} index {link.a_index} netns {plan.ns(link.a_role)} "
              f"type veth peer name {link.b_if} index {link.b_index} "
              f"netns {plan.ns(link.b_role)}"
              for link in plan.links]
    return lines


def render_client_path_routes(plan: LabPlan, index: int, verb: str = "add") -> list[str]:
    """Routes the client needs for path ``index``: its table and its main default.

    ``verb`` is ``add`` when building, ``replace`` when a path comes back up
    (bringing a link down removes every route through it).
    """
    a = plan.paths[index]
    t = a.table
    net = ipaddress.ip_interface(f"{a.client_addr}/{a.prefix_len}").network
    net6 = ipaddress.ip_interface(f"{a.client_addr6}/{a.prefix_len6}").network
    return [
        f"route {verb} {net} dev {a.client_if} src {a.client_addr} table {t}",
        f"route {verb} default via {a.proxy_addr} dev {a.client_if} table {t}",
        f"route {verb} {net6} dev {a.client_if} table {t}",
        f"route {verb} ::/0 via {a.proxy_addr6} dev {a.client_if} table {t}",
        f"route {verb} default via {a.proxy_addr} dev {a.client_if} "
        f"metric {DEFAULT_METRIC_BASE + index}",
        f"route {verb} ::/0 via {a.proxy_addr6} dev {a.client_if} "
        f"metric {DEFAULT_METRIC_BASE + index}",
    ]


def _addr_lines(ifname: str, addr: str, plen: int, addr6: str, plen6: int) -> list[str]:
    # nodad: a tentative address cannot be used for a second or so.
    return [f"addr add {addr}/{plen} dev {ifname}",
            f"addr add {addr6}/{plen6} dev {ifname} nodad",
            f"link set {ifname} up"]


MPTCP_LIMITS_LINE = (f"mptcp limits set subflows {MPTCP_LIMIT} "
                     f"add_addr_accepted {MPTCP_LIMIT}")


def render_node(plan: LabPlan, role: str) -> tuple[list[str], list[str]]:
    """``ip -batch`` lines configuring ``role``'s namespace: ``(lines, lines6)``.

    ``lines6`` must run under ``ip -6``: in a batch, ``rule add from`` parses
    its address as IPv4 unless the whole batch is IPv6.
    """
    if plan.topology == "operator" and role != "client":
        return _render_node_operator(plan, role), []
    lines = ["link set lo up"]
    lines6: list[str] = []
    if role == "client":
        for a in plan.paths:
            lines += _addr_lines(a.client_if, a.client_addr, a.prefix_len,
                                 a.client_addr6, a.prefix_len6)
        for a in plan.paths:
            lines += [f"rule add from {a.client_addr} table {a.table} "
                      f"pref {RULE_PREF_BASE + a.index}",
                      f"route add unreachable default table {a.table} "
                      f"metric {UNREACHABLE_METRIC}",
                      f"route add unreachable ::/0 table {a.table} "
                      f"metric {UNREACHABLE_METRIC}"]
            lines += render_client_path_routes(plan, a.index)
            lines6.append(f"rule add from {a.client_addr6} table {a.table} "
                          f"pref {RULE_PREF_BASE + a.index}")
        lines.append(MPTCP_LIMITS_LINE)
        # A `subflow` endpoint on every path: the kernel path manager adds a
        # subflow from each endpoint except the one the connection started
        # from (measured), so a connection begun on any path uses them all.
        # Operator: `fullmesh` too. A transparent proxy sets the C bit, so no
        # subflow goes to the initial address; for an announced address the
        # kernel PM picks the source by routing (path 0 again) unless the
        # endpoints are fullmesh, which make it join from every path (measured).
        flags = "subflow fullmesh" if plan.topology == "operator" else "subflow"
        for a in plan.paths:
            lines += [f"mptcp endpoint add {a.client_addr} dev {a.client_if} {flags}",
                      f"mptcp endpoint add {a.client_addr6} dev {a.client_if} {flags}"]
    elif role == "proxy":
        for a in plan.paths:
            lines += _addr_lines(a.proxy_if, a.proxy_addr, a.prefix_len,
                                 a.proxy_addr6, a.prefix_len6)
        lines += _addr_lines(plan.proxy_server_if, plan.proxy_server_side_addr, 24,
                             plan.proxy_server_side_addr6, 64)
        lines.append(MPTCP_LIMITS_LINE)
    elif role == "server":
        lines += _addr_lines(plan.server_if, plan.server_addr, 24, plan.server_addr6, 64)
        # Replies to every client subnet go back through the proxy router.
        lines += [f"route add default via {plan.proxy_server_side_addr} dev {plan.server_if}",
                  f"route add ::/0 via {plan.proxy_server_side_addr6} dev {plan.server_if}",
                  MPTCP_LIMITS_LINE]
    else:
        raise LabError(f"unknown role {role!r}")
    return lines, lines6


def _render_node_operator(plan: LabPlan, role: str) -> list[str]:
    """Operator nodes other than the client (which is the same as in basic)."""
    if role not in plan.roles:
        raise LabError(f"unknown role {role!r}")
    lines = ["link set lo up"]
    for a in plan.paths:
        if a.gateway == role:
            lines += _addr_lines(a.proxy_if, a.proxy_addr, a.prefix_len,
                                 a.proxy_addr6, a.prefix_len6)
    for link in plan.links:
        for end_role, ifname, addr, addr6 in ((link.a_role, link.a_if, link.a_addr, link.a_addr6),
                                              (link.b_role, link.b_if, link.b_addr, link.b_addr6)):
            if end_role == role:
                lines += _addr_lines(ifname, addr, link.prefix_len, addr6, link.prefix_len6)
    uplink = plan.links[0]
    if role == "proxy":
        # The proxy is the client's cellular gateway; the Internet is behind the router.
        lines += [f"route add default via {uplink.b_addr} dev {uplink.a_if}",
                  f"route add ::/0 via {uplink.b_addr6} dev {uplink.a_if}"]
    elif role == "wifi":
        # Client subnets of paths through the proxy are reached through the proxy.
        for a in plan.paths:
            if a.gateway == "proxy":
                net = ipaddress.ip_interface(f"{a.client_addr}/{a.prefix_len}").network
                net6 = ipaddress.ip_interface(f"{a.client_addr6}/{a.prefix_len6}").network
                lines += [f"route add {net} via {uplink.a_addr} dev {uplink.b_if}",
                          f"route add {net6} via {uplink.a_addr6} dev {uplink.b_if}"]
    else:  # a server: everything through the router
        link = next(x for x in plan.links if x.b_role == role)
        lines += [f"route add default via {link.a_addr} dev {link.b_if}",
                  f"route add ::/0 via {link.a_addr6} dev {link.b_if}"]
    if role != "wifi":
        lines.append(MPTCP_LIMITS_LINE)
    return lines


def render_shaping(plan: LabPlan, role: str) -> list[str]:
    """``tc -batch`` lines: a tbf on each shaped path, at both ends of its veth."""
    if role in ("server", "mpserver"):
        return []
    lines = []
    for a in plan.paths:
        if a.rate_mbit is None:
            continue
        if role == "client":
            ifname = a.client_if
        elif role == a.gateway:
            ifname = a.proxy_if
        else:
            continue
        rate, burst, limit = tbf_params(a.rate_mbit)
        lines.append(f"qdisc replace dev {ifname} root tbf rate {rate}bit "
                     f"burst {burst} limit {limit}")
    return lines


HOST_ROLES = ("client", "server", "mpserver")
"""Namespaces that stand for end hosts (the others run proxies or route)."""


def node_sysctls(role: str, topology: str = "basic",
                 dss_checksum: bool = False) -> list[tuple[str, int]]:
    """Sysctls for ``role``'s namespace, set before any interface exists.

    ``default`` values are what new interfaces inherit, so writing them first
    covers every veth of the lab. ``dss_checksum``: the end hosts ask for
    MPTCP DSS checksums (the proxy's namespace is left to the proxy). Off by
    default, like the kernel and the proxy: on 6.18 they do not keep wrong
    bytes out (docs/kernel/dss-corruption.md); the lab's transfers are hashed.
    """
    values: list[tuple[str, int]] = []
    for scope in ("all", "default"):
        values += [
            # Strict reverse-path filtering drops subflows that arrive on
            # a path the routing table would not use to answer.
            (f"net.ipv4.conf.{scope}.rp_filter", 0),
            (f"net.ipv6.conf.{scope}.accept_dad", 0),
            # Keep IPv6 addresses while a path is down, like IPv4 does.
            (f"net.ipv6.conf.{scope}.keep_addr_on_down", 1),
        ]
    values += [
        # A fresh measurement every connection, not one tuned by the last.
        ("net.ipv4.tcp_no_metrics_save", 1),
    ]
    if role in ("proxy", "wifi"):
        values += [("net.ipv4.ip_forward", 1), ("net.ipv6.conf.all.forwarding", 1)]
    if dss_checksum and role in HOST_ROLES:
        values.append(("net.mptcp.checksum_enabled", 1))
    if topology == "operator" and role == "server":
        # The operator lab's server speaks plain TCP whatever runs there.
        values.append(("net.mptcp.enabled", 0))
    return values


# --------------------------------------------------------------------------
# Nodes and labs: applying plans to the kernel
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Node:
    """One namespace of a lab (client, proxy, server; operator: wifi, mpserver)."""

    role: str
    ns: str

    def enter(self) -> AbstractContextManager[None]:
        """Move the calling thread into this node (see :func:`netns.enter`)."""
        return netns.enter(self.ns)

    def run(self, argv: Sequence[str], *, check: bool = True, capture: bool = True,
            input: str | None = None, timeout: float | None = netns.COMMAND_TIMEOUT_S,
            ) -> subprocess.CompletedProcess[str]:
        return netns.run(self.ns, argv, check=check, capture=capture, input=input,
                         timeout=timeout)

    def popen(self, argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
        return netns.popen(self.ns, argv, **popen_kwargs)

    def sysctl(self, key: str, value: str | int | None = None) -> str:
        return netns.sysctl(self.ns, key, value)

    def netstat(self) -> dict[str, dict[str, int]]:
        return netns.read_netstat(self.ns)

    def link_bytes(self, ifname: str) -> tuple[int, int]:
        return netns.link_bytes(self.ns, ifname)


def state_path(name: str) -> Path:
    return STATE_DIR / f"{name}.json"


def impair_log_path(name: str) -> Path:
    """Where lab ``name``'s delay emulator writes its log."""
    return STATE_DIR / f"{name}.impair.log"


class Lab:
    """A built topology. Use :meth:`create` or :meth:`attach`, not the constructor.

    ``with Lab.create(...) as lab:`` destroys the lab on exit. A lab made by
    :meth:`attach` belongs to someone else: leaving its ``with`` block does not
    destroy it; :meth:`destroy` does.
    """

    def __init__(self, plan: LabPlan, *, owner_pid: int | None, persistent: bool,
                 owned: bool) -> None:
        self.plan = plan
        self.owner_pid = owner_pid
        self.persistent = persistent
        self.client = Node("client", plan.ns("client"))
        self.proxy = Node("proxy", plan.ns("proxy"))
        self.server = Node("server", plan.ns("server"))
        # Operator topology only (None in basic): the Wi-Fi router, the MPTCP server.
        self.wifi = Node("wifi", plan.ns("wifi")) if "wifi" in plan.roles else None
        self.mpserver = Node("mpserver", plan.ns("mpserver")) if "mpserver" in plan.roles \
            else None
        self._owned = owned  # built by this handle: leaving `with` destroys it
        self.impair_pid: int | None = None
        """The delay emulator's process (None: no path has delay or loss)."""
        self._impair_proc: subprocess.Popen | None = None
        self._destroyed = False
        # Reentrant: the SIGTERM handler runs on the main thread, maybe in
        # the middle of a destroy() of the same lab.
        self._lock = threading.RLock()

    # -- facts ------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def topology(self) -> str:
        return self.plan.topology

    @property
    def paths(self) -> tuple[AccessPath, ...]:
        return self.plan.paths

    @property
    def server_addr(self) -> str:
        return self.plan.server_addr

    @property
    def server_addr6(self) -> str:
        return self.plan.server_addr6

    @property
    def proxy_server_side_addr(self) -> str:
        return self.plan.proxy_server_side_addr

    @property
    def proxy_server_side_addr6(self) -> str:
        return self.plan.proxy_server_side_addr6

    @property
    def mpserver_addr(self) -> str:
        return self.plan.mpserver_addr

    @property
    def mpserver_addr6(self) -> str:
        return self.plan.mpserver_addr6

    @property
    def proxy_public_addr(self) -> str:
        return self.plan.proxy_public_addr

    @property
    def proxy_public_addr6(self) -> str:
        return self.plan.proxy_public_addr6

    @property
    def nodes(self) -> tuple[Node, ...]:
        return tuple(self.node(role) for role in self.plan.roles)

    def node(self, role: str) -> Node:
        if role not in self.plan.roles:
            raise LabError(f"unknown node {role!r} (one of {', '.join(self.plan.roles)})")
        return getattr(self, role)

    # -- lifecycle --------------------------------------------------------
    @classmethod
    def create(cls, paths: Sequence[PathSpec] = (PathSpec(), PathSpec()), *,
               name: str | None = None, topology: str = "basic",
               persistent: bool = False, dss_checksum: bool = False) -> Lab:
        """Build a lab and return it, ready to use.

        ``dss_checksum``: the client and server namespaces ask for MPTCP DSS
        checksums (default False: the kernel's default).

        ``persistent`` labs outlive this process (the CLI's ``lab up``); any
        other lab is destroyed at the latest when the interpreter exits or
        gets SIGTERM/SIGHUP. A failed build removes what it made.
        """
        plan = plan_lab(name or new_name(), list(paths), topology)
        taken = [ns for ns in plan.namespaces if netns.exists(ns)]
        if taken or state_path(plan.name).exists():
            raise LabError(f"lab {plan.name} already exists")
        lab = cls(plan, owner_pid=None if persistent else os.getpid(),
                  persistent=persistent, owned=True)
        if not persistent:
            _register(lab)
        try:
            lab._build(dss_checksum)
        except BaseException:
            lab.destroy()
            raise
        return lab

    @classmethod
    def attach(cls, name: str) -> Lab:
        """Reopen a lab built by another process, from its state file."""
        name = canonical_name(name)
        try:
            data = json.loads(state_path(name).read_text())
            plan = LabPlan.from_dict(data["plan"])
        except FileNotFoundError:
            raise LabError(f"no lab named {name}") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LabError(f"cannot read state of lab {name}: {exc!r}") from None
        missing = [ns for ns in plan.namespaces if not netns.exists(ns)]
        if missing:
            raise LabError(f"lab {name} is broken: namespaces {missing} are gone")
        lab = cls(plan, owner_pid=data.get("owner_pid"),
                  persistent=bool(data.get("persistent")), owned=False)
        lab.impair_pid = data.get("impair_pid")
        return lab

    def _build(self, dss_checksum: bool = False) -> None:
        plan = self.plan
        netns.ip_batch([f"netns add {ns}" for ns in plan.namespaces])
        for node in self.nodes:
            netns.sysctls(node.ns, node_sysctls(node.role, plan.topology, dss_checksum))
        netns.ip_batch(render_links(plan))
        for node in self.nodes:
            lines, lines6 = render_node(plan, node.role)
            netns.ip_batch(lines, node.ns)
            netns.ip_batch(lines6, node.ns, family="-6")
            netns.tc_batch(render_shaping(plan, node.role), node.ns)
        netns.wait_links_up(self._links(), LINK_UP_TIMEOUT_S)
        self._start_impairment()
        self._write_state()

    def _start_impairment(self) -> None:
        """Start the delay emulator and queue the impaired paths to it, if any.

        The emulator lives in the client namespace, so removing the lab kills
        it; its queues are bound before any rule sends packets to them.
        """
        from mptcp_proxy.lab import impair  # the emulator's module imports this one

        queues = impair.plan_queues(self.plan)
        if not queues:
            return
        self._impair_proc = impair.start(self.client.ns, queues, impair_log_path(self.name),
                                         timeout=IMPAIR_READY_TIMEOUT_S)
        self.impair_pid = self._impair_proc.pid
        for ns in dict.fromkeys(q.ns for q in queues):
            impair.install_rules(ns, [q for q in queues if q.ns == ns])

    def _links(self, index: int | None = None) -> list[tuple[str, str]]:
        """``(ns, ifname)`` of both ends of path ``index``, or of every link."""
        paths = self.paths if index is None else (self.paths[index],)
        links = [(ns, ifname) for a in paths
                 for ns, ifname in ((self.client.ns, a.client_if),
                                    (self.plan.ns(a.gateway), a.proxy_if))]
        if index is None and self.plan.links:
            links += [end for link in self.plan.links
                      for end in ((self.plan.ns(link.a_role), link.a_if),
                                  (self.plan.ns(link.b_role), link.b_if))]
        elif index is None:
            links += [(self.proxy.ns, self.plan.proxy_server_if),
                      (self.server.ns, self.plan.server_if)]
        return links

    def _write_state(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        state = {"plan": self.plan.to_dict(), "owner_pid": self.owner_pid,
                 "persistent": self.persistent, "impair_pid": self.impair_pid}
        tmp = state_path(self.name).with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(state_path(self.name))

    def destroy(self) -> None:
        """Kill every process in the lab, delete its namespaces and state. Idempotent."""
        with self._lock:
            if self._destroyed:
                return
            remove_lab(self.name)
            self._destroyed = True
            _unregister(self)
            if self._impair_proc is not None:
                # Killed with the lab's namespaces: collect its exit status.
                try:
                    self._impair_proc.wait(netns.KILL_WAIT_S)
                except subprocess.TimeoutExpired:
                    log.warning("delay emulator %d of lab %s did not exit",
                                self._impair_proc.pid, self.name)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._owned:
            self.destroy()

    def __repr__(self) -> str:
        return f"<Lab {self.name} paths={len(self.paths)}>"

    # -- operations -------------------------------------------------------
    def set_path_up(self, index: int, up: bool) -> None:
        """Bring path ``index`` down (both ends of its link) or back up.

        Down removes every route through the link, like a lost radio link;
        up restores the client's routes for it.
        """
        try:
            a = self.paths[index]
        except IndexError:
            raise LabError(f"lab {self.name} has no path {index}") from None
        state = "up" if up else "down"
        netns.ip_batch([f"link set {a.proxy_if} {state}"], self.plan.ns(a.gateway))
        client_lines = [f"link set {a.client_if} {state}"]
        if up:
            client_lines += render_client_path_routes(self.plan, index, verb="replace")
        netns.ip_batch(client_lines, self.client.ns)
        if up:
            netns.wait_links_up(self._links(index), LINK_UP_TIMEOUT_S)

    def facts(self) -> dict[str, Any]:
        """The lab as plain data (what ``lab up`` prints)."""
        return {"name": self.name,
                "namespaces": dict(zip(self.plan.roles, self.plan.namespaces)),
                "impair_pid": self.impair_pid,
                **self.plan.to_dict(),
                "networks": list(self.plan.networks),
                "proxy_options": list(self.plan.allow_target_options),
                "hint": allow_target_hint(self.plan)}


def lab_namespaces(name: str) -> list[str]:
    """Every namespace lab ``name`` may have (whichever topology built it)."""
    name = canonical_name(name)
    return [name + ROLE_SUFFIX[role] for role in ALL_ROLES]


def remove_lab(name: str, grace: float = 0.0) -> None:
    """Delete lab ``name``'s namespaces (killing what runs there) and state file.

    With ``grace``, what runs there gets SIGTERM and that many seconds to exit
    before SIGKILL (``lab down``: proxies drain and restore their state).
    """
    name = canonical_name(name)
    netns.delete(lab_namespaces(name), grace=grace)
    state_path(name).unlink(missing_ok=True)
    impair_log_path(name).unlink(missing_ok=True)


def list_labs() -> list[str]:
    """Names of labs on this machine: from state files and from namespaces."""
    names = {p.stem for p in STATE_DIR.glob(f"{LAB_PREFIX}*.json")} if STATE_DIR.exists() else set()
    for ns in netns.list_namespaces(LAB_PREFIX):
        for suffix in ROLE_SUFFIX.values():
            if ns.endswith(suffix):
                names.add(ns[: -len(suffix)])
    return sorted(names)


# --------------------------------------------------------------------------
# Teardown of this process's labs at exit and on fatal signals
# --------------------------------------------------------------------------

_live: dict[str, Lab] = {}
_hooks_installed = False
_FATAL_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _register(lab: Lab) -> None:
    global _hooks_installed
    _live[lab.name] = lab
    if not _hooks_installed:
        _hooks_installed = True
        atexit.register(_destroy_live_labs)
        _install_signal_handlers()


def _unregister(lab: Lab) -> None:
    _live.pop(lab.name, None)


def _destroy_live_labs() -> None:
    # A forked child inherits _live and atexit: only the creator tears down.
    for lab in list(_live.values()):
        if lab.owner_pid != os.getpid():
            continue
        try:
            lab.destroy()
        except Exception:  # keep going: the other labs must go too
            log.exception("removing lab %s failed", lab.name)


def _install_signal_handlers() -> None:
    """Remove our labs on SIGTERM/SIGHUP, then die of the signal as before.

    Only where nobody installed a handler (the default would kill us without
    running atexit) and only from the main thread, where Python allows it.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in _FATAL_SIGNALS:
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _on_fatal_signal)


def _on_fatal_signal(signum: int, _frame: object) -> None:
    _destroy_live_labs()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
