"""``transparent`` mode: an implicit MPTCP proxy on the path of the client's first subflow.

Nobody configures this proxy: it runs on a router the client's traffic
crosses (ARCHITECTURE.md, "Implicit proxy")::

    client SYN(MP_CAPABLE) to S:443 --> nftables TPROXY (MP_CAPABLE SYNs only) -->
      IP_TRANSPARENT MPTCP listener: the accepted socket's local address is S:443
    proxy -> S: MPTCP first, TCP fallback (from its own address, or the client's)
    proxy -> client: C bit set (no joins to S:443), ADD_ADDR(proxy address, port)
    S answers MP_CAPABLE -> S joins the bypass set: later SYNs to S run end to end

Kernel state, all in the proxy's network namespace, all undone on exit:
one nftables table (modes/transparent.py renders it), a fwmark rule plus a
local route table (kernel/routing.py), the C bit sysctl
(``net.mptcp.allow_join_initial_addr_port=0``), signal endpoints with a port
and maybe raised limits (kernel/pm.py). If the proxy dies without undoing
them, the table's comment records what to put back and the next start does it
before anything else. An abstract unix socket, which is per network namespace
and vanishes with its process, keeps two proxies out of one namespace.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import queue
import re
import socket
import threading
from dataclasses import dataclass, field

from mptcp_proxy.config import Endpoint, ServerSettings, reject_url
from mptcp_proxy.dataplane.connect import ConnectResult, Connector
from mptcp_proxy.dataplane.reactor import Reactor
from mptcp_proxy.errors import ConfigError, KernelError
from mptcp_proxy.kernel import netns, pm
from mptcp_proxy.kernel.nft import NftTable, nft, nft_cmd, table_exists
from mptcp_proxy.kernel.privileges import Need, port_needs, require
from mptcp_proxy.kernel.routing import TproxyRoute, TproxyRouting
from mptcp_proxy.kernel.sysctl import SysctlChanges, read_sysctl, write_sysctl
from mptcp_proxy.modes.transparent import (
    DEFAULT_ANNOUNCE_PORT,
    DEFAULT_BYPASS_TTL,
    DEFAULT_FWMARK,
    DEFAULT_ROUTE_TABLE,
    DEFAULT_TPROXY_PORT,
    TABLE_FAMILY,
    TABLE_NAME,
    InterceptRules,
    PortSet,
    RestoreRecord,
    bypass_element,
    render_ruleset,
    unmap_address,
)
from mptcp_proxy.modes.policy import (
    IPNetwork, TargetPolicy, normalize, parse_address, parse_networks,
)
from mptcp_proxy.observe.addresses import local_addresses
from mptcp_proxy.server.base import ProxyServer, Session, format_addr, open_listener, server_arguments

log = logging.getLogger("mptcp_proxy.transparent")

C_BIT_SYSCTL = "net.mptcp.allow_join_initial_addr_port"
MIN_SUBFLOWS = 2               # joins the proxy accepts per connection (kernel default)
LOCK_NAME = b"\0mptcp-proxy/transparent"
_TABLE_COMMENT = re.compile(r"\Atable \S+ \S+ \{\n\s*comment \"([^\"]*)\"")


@dataclass(frozen=True)
class Announce:
    """An address (and port) the proxy announces to its MPTCP clients."""

    address: str
    port: int = DEFAULT_ANNOUNCE_PORT

    @classmethod
    def parse(cls, text: str, key: str = "--announce") -> "Announce":
        """``ADDR``, ``ADDR:PORT``, ``[V6]`` or ``[V6]:PORT``; addresses are literals."""
        text = text.strip()
        reject_url(text, key)
        host, port = text, DEFAULT_ANNOUNCE_PORT
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise ConfigError(key, f"expected ADDR[:PORT] or [IPv6][:PORT], got {text!r}")
            if rest:
                port = _port(rest[1:], key, text)
        elif text.count(":") == 1:
            host, _, port_text = text.partition(":")
            port = _port(port_text, key, text)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(key, f"{host!r} is not an IP address") from None
        if ip.is_unspecified or ip.is_multicast or ip.is_loopback:
            raise ConfigError(key, f"{host} cannot be announced to clients")
        return cls(str(ip), port)

    def __str__(self) -> str:
        return f"[{self.address}]:{self.port}" if ":" in self.address \
            else f"{self.address}:{self.port}"


def _port(text: str, key: str, whole: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ConfigError(key, f"bad port in {whole!r}")
    return int(text)


@dataclass(frozen=True)
class TransparentConfig(ServerSettings):
    """``mptcp-proxy transparent``: intercept MPTCP SYNs crossing this host."""

    ports: PortSet = field(default_factory=PortSet)
    """Destination ports whose MPTCP SYNs are intercepted (empty: all)."""
    announce: tuple[Announce, ...] = ()
    """Addresses (with ports) announced to clients, so they join the proxy over
    their other paths. Empty: no announcement (one path per connection)."""
    bypass_ttl: float = DEFAULT_BYPASS_TTL
    """Seconds a server seen answering with MPTCP is left end to end."""
    tproxy_port: int = DEFAULT_TPROXY_PORT
    """Port of the IP_TRANSPARENT listener that diverted SYNs are sent to."""
    interfaces: tuple[str, ...] = ()
    """Intercept only SYNs arriving on these interfaces (empty: any but lo)."""
    keep_client_address: bool = False
    """Connect upstream from the client's address (IP_TRANSPARENT) instead of the proxy's."""
    fwmark: int = DEFAULT_FWMARK
    """fwmark of diverted packets (routed by the local policy rule)."""
    route_table: int = DEFAULT_ROUTE_TABLE
    """Routing table holding the local default route for marked packets."""
    deny_targets: tuple[IPNetwork, ...] = ()
    """Destinations never relayed (the client is reset). Interception makes the
    proxy the connection's origin, so forward-chain firewall rules no longer
    see it: list here what they refused."""

    def __post_init__(self) -> None:
        super().__post_init__()
        # InterceptRules validates the port, mark, TTL and interface names.
        InterceptRules(tproxy_port=self.tproxy_port, ports=self.ports,
                       interfaces=self.interfaces, mark=self.fwmark,
                       bypass_ttl=self.bypass_ttl)
        try:
            TproxyRoute(self.fwmark, self.route_table)
        except KernelError as exc:
            raise ConfigError("--route-table", str(exc)) from None
        seen = set()
        for a in self.announce:
            if (a.address, a.port) in seen:
                raise ConfigError("--announce", f"{a} given twice")
            seen.add((a.address, a.port))
            if a.port == self.tproxy_port:
                raise ConfigError("--announce", f"port {a.port} is the interception "
                                  "listener's; announce another one")


# --------------------------------------------------------------------------
# Before anything changes: privileges, announced addresses
# --------------------------------------------------------------------------

NET_ADMIN_WHY = ("for its nftables table, policy routing, MPTCP path-manager endpoints, "
                 "the C-bit sysctl and its IP_TRANSPARENT listener")
MAX_ADDRESSES_LISTED = 6


def transparent_needs(config: TransparentConfig) -> list[Need]:
    """What ``transparent`` needs from the process, with why (kernel/privileges.py)."""
    return [Need("CAP_NET_ADMIN", NET_ADMIN_WHY, children=True),
            *port_needs(config.tproxy_port, "--tproxy-port")]


def check_announce_addresses(announce: tuple["Announce", ...]) -> None:
    """ConfigError unless every announced address is one of this namespace's
    own: clients open their extra subflows *to* it, and the kernel opens its
    listener for them there (else ``create listen socket error: -99``)."""
    if not announce:
        return
    # The namespace's addresses (/proc: IPv4 local routes, IPv6 addresses, those
    # still in DAD too), not a bind() probe: a namespace without addresses has
    # no local table yet, and binding any address there succeeds.
    own = local_addresses()[0]
    for entry in announce:
        if normalize(parse_address(entry.address)) in own:
            continue
        mine = sorted((a for a in own if not (a.is_loopback or a.is_link_local)),
                      key=lambda a: (a.version, a))
        listed = ", ".join(str(a) for a in mine[:MAX_ADDRESSES_LISTED])
        if len(mine) > MAX_ADDRESSES_LISTED:
            listed += ", ..."
        raise ConfigError("--announce", f"{entry.address} is not an address of this host: "
                          "announce one of the proxy host's own addresses, the one the "
                          "clients' other paths reach it at (they join it there)"
                          + (f"; this host has {listed}" if listed
                             else "; this host has no address to announce"))


def preflight(config: TransparentConfig) -> None:
    """Everything checked before the first change to the kernel: the process's
    privileges (one line naming what is missing) and the announced addresses."""
    require("transparent", transparent_needs(config))
    check_announce_addresses(config.announce)


# --------------------------------------------------------------------------
# Namespace helpers
# --------------------------------------------------------------------------

def _namespace_lock() -> socket.socket:
    """One transparent proxy per network namespace: an abstract unix socket name."""
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        lock.bind(LOCK_NAME)
    except OSError as exc:
        lock.close()
        if exc.errno == errno.EADDRINUSE:
            raise KernelError("another transparent proxy runs in this network namespace") \
                from None
        raise KernelError(f"cannot take the namespace lock: {exc.strerror}") from None
    return lock


def read_restore_record() -> RestoreRecord | None:
    """The record in a table left by a proxy that died, if there is one."""
    if not table_exists(TABLE_FAMILY, TABLE_NAME):
        return None
    # nft 1.0.6 leaves table comments out of its JSON: read the text form.
    out = nft_cmd("list", "table", TABLE_FAMILY, TABLE_NAME)
    match = _TABLE_COMMENT.search(out)
    return RestoreRecord.decode(match.group(1) if match else "")


def recover_stale_state() -> RestoreRecord | None:
    """Undo what a proxy that died left behind (table, sysctl, limits, endpoints).

    Call with the namespace lock held: a table present now is nobody's.
    Policy-routing leftovers are removed by TproxyRouting.apply.
    """
    try:
        record = read_restore_record()
    except KernelError as exc:
        log.warning("stale table %s: %s; removing it", TABLE_NAME, exc)
        nft(f"delete table {TABLE_FAMILY} {TABLE_NAME}\n")
        return None
    if record is None:
        return None
    log.warning("found the state of a transparent proxy that did not clean up; restoring it")
    for endpoint_id, port in record.endpoints:
        pm.delete_endpoint(endpoint_id, port=port)
    if record.limits_were is not None:
        pm.set_limits(pm.PmLimits(*record.limits_were))
    if record.c_bit_was is not None:
        write_sysctl(C_BIT_SYSCTL, record.c_bit_was)
    nft(f"delete table {TABLE_FAMILY} {TABLE_NAME}\n")
    return record


# --------------------------------------------------------------------------
# Bypass set writer
# --------------------------------------------------------------------------

class BypassWriter:
    """Adds MPTCP servers to the bypass set from a thread of its own.

    ``nft`` is a process: the reactor must not wait for it. Elements expire in
    the kernel; this side only avoids re-adding one that is still there.
    """

    def __init__(self, table: NftTable, ttl: float, now) -> None:
        self.table = table
        self.ttl = ttl
        self._now = now
        self._known: dict[tuple[str, int], float] = {}
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.added = 0
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="transparent-bypass",
                                        daemon=True)
        self._thread.start()

    def add(self, address: str, port: int) -> bool:
        """Queue ``address:port``; False when it is already in the set."""
        key = (unmap_address(address), port)
        now = self._now()
        if self._known.get(key, 0.0) > now:
            return False
        self._known[key] = now + self.ttl
        self._queue.put(key)
        return True

    def _run(self) -> None:
        while True:
            key = self._queue.get()
            if key is None:
                return
            set_name, element = bypass_element(key[0], key[1], self.ttl)
            try:
                self.table.add_element(set_name, element)
                self.added += 1
                log.info("bypass: %s speaks MPTCP; end to end for %.0fs",
                         format_addr(key), self.ttl)
            except KernelError as exc:
                self.errors += 1
                self._known.pop(key, None)
                log.warning("bypass: cannot add %s: %s", format_addr(key), exc)

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------

class TransparentServer(ProxyServer):
    mode_name = "transparent"

    def __init__(self, config: TransparentConfig, reactor: Reactor | None = None) -> None:
        super().__init__(**server_arguments(config), reactor=reactor)
        self.config = config
        self.connector = Connector(self.reactor, config.upstream,
                                   timeout=config.relay.connect_timeout,
                                   tcp_only_ttl=config.tcp_only_ttl,
                                   transparent=config.keep_client_address)
        # On-path, every destination the client could reach is fair game
        # (private ranges included) except the deny list and what can never
        # be a remote server (loopback, multicast, unspecified, link-local).
        self.targets = TargetPolicy(parse_networks(["0.0.0.0/0", "::/0"], "targets"),
                                    config.deny_targets)
        self.ipv6 = True
        self.table: NftTable | None = None
        self.bypass: BypassWriter | None = None
        self.recovered: RestoreRecord | None = None
        self._routing: TproxyRouting | None = None
        self._sysctls = SysctlChanges()
        self._pm = pm.PathManagerChanges()
        self._lock: socket.socket | None = None
        self._netns_fd: int | None = None
        self._kernel_released = False
        self._closed = False

    # -- start and stop -----------------------------------------------------
    def start(self) -> "TransparentServer":
        """Take the namespace, open the listener, install the kernel state.

        Runs in the calling thread's network namespace; everything is undone
        there by :meth:`release_kernel` (also when this raises half-way).
        Privileges and announced addresses are checked first (:func:`preflight`):
        a start that cannot succeed changes nothing.
        """
        preflight(self.config)
        self._netns_fd = netns.open_current()
        try:
            self._lock = _namespace_lock()
            self.recovered = recover_stale_state()
            self.hold_kernel_state()
            self._open_listener()
            self._install()
        except BaseException:
            self._close_everything()
            raise
        return self

    def _open_listener(self) -> None:
        # One dual-stack listener takes both families (IPv4 arrives mapped);
        # without IPv6 in the namespace, IPv4 only.
        self.ipv6 = _ipv6_works()
        host = "::" if self.ipv6 else "0.0.0.0"
        self.add_listener(open_listener(Endpoint(host, self.config.tproxy_port),
                                        backlog=self.config.backlog, transparent=True,
                                        key="--tproxy-port"))

    def _install(self) -> None:
        config = self.config
        if config.announce and not pm.kernel_pm_active():
            raise KernelError("--announce needs the in-kernel path manager "
                              "(net.mptcp.path_manager=kernel)")
        families = ("-4", "-6") if self.ipv6 else ("-4",)
        self._routing = TproxyRouting(TproxyRoute(config.fwmark, config.route_table,
                                                  families=families))
        self._routing.apply()

        # What will change, recorded in the table before it changes.
        c_bit_was = read_sysctl(C_BIT_SYSCTL)
        limits = pm.get_limits()
        raise_limits = bool(config.announce) and limits.subflows < MIN_SUBFLOWS
        endpoints = self._pm.plan_endpoints(
            [(a.address, a.port, None) for a in config.announce])
        record = RestoreRecord(
            c_bit_was=c_bit_was if c_bit_was != "0" else None,
            limits_were=(limits.subflows, limits.add_addr_accepted) if raise_limits else None,
            endpoints=tuple((e.id, e.port) for e in endpoints))
        rules = InterceptRules(tproxy_port=config.tproxy_port, ports=config.ports,
                               interfaces=config.interfaces, mark=config.fwmark,
                               bypass_ttl=config.bypass_ttl, ipv6=self.ipv6, record=record)
        self.table = NftTable(TABLE_FAMILY, TABLE_NAME, render_ruleset(rules)).apply()

        # RFC 8684 §3.1: the C bit tells clients not to join S:443 (the real
        # server, which knows nothing of this connection); they join the
        # announced address instead.
        self._sysctls.set(C_BIT_SYSCTL, 0)
        if raise_limits:
            self._pm.raise_limits(subflows=MIN_SUBFLOWS)
        for endpoint in endpoints:
            try:
                self._pm.add_endpoint(endpoint)
            except KernelError as exc:
                raise KernelError(f"cannot announce {endpoint.address} port "
                                  f"{endpoint.port}: {exc}") from None
        if any(":" in a.address for a in config.announce):
            # Measured (6.18): ADD_ADDR for IPv6 with a port is 30 bytes and does not
            # fit beside TCP timestamps; the kernel drops it (MPTcpExt AddAddrTxDrop).
            # Dual-stack clients still join an announced IPv4 address.
            log.warning("transparent: an IPv6 address with a port is only announced on "
                        "connections without TCP timestamps; announce an IPv4 address too")
        self.bypass = BypassWriter(self.table, config.bypass_ttl, lambda: self.reactor.now)
        log.info("transparent: intercepting MPTCP SYNs to ports %s on %s -> listener :%d; "
                 "C bit set; announcing %s; bypass TTL %.0fs; upstream %s from %s",
                 config.ports, ",".join(config.interfaces) or "all interfaces",
                 config.tproxy_port,
                 ", ".join(str(a) for a in config.announce) or "nothing",
                 config.bypass_ttl, config.upstream.value,
                 "the client's address" if config.keep_client_address else "this host")

    def release_kernel(self) -> None:
        """Undo every kernel change, in reverse order, in the proxy's namespace. Idempotent."""
        if self._kernel_released:
            return
        self._kernel_released = True
        errors: list[str] = []
        if self.bypass is not None:
            self.bypass.close()
        with netns.in_netns(self._netns_fd):
            steps = [self._pm.restore, self._sysctls.restore]
            if self.table is not None:
                steps.append(self.table.remove)
            if self._routing is not None:
                steps.append(self._routing.remove)
            for step in steps:
                try:
                    step()
                except KernelError as exc:
                    errors.append(str(exc))
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if self._netns_fd is not None:
            os.close(self._netns_fd)
            self._netns_fd = None
        if errors:
            log.error("transparent: could not undo everything: %s", "; ".join(errors))
        else:
            log.info("transparent: kernel state restored")

    def _close_everything(self) -> None:
        if self._closed:  # the reactor's fds must not be closed twice
            return
        self._closed = True
        try:
            super()._close_everything()
        finally:
            self.release_kernel()

    def close(self) -> None:
        """Release everything when :meth:`serve_forever` never ran. Idempotent."""
        self._close_everything()

    # -- connections ----------------------------------------------------------
    def handle_accept(self, sock: socket.socket, addr: tuple, session: Session) -> None:
        local = sock.getsockname()
        host, port = unmap_address(local[0]), local[1]
        client_host = unmap_address(addr[0])
        session.client = format_addr((client_host, addr[1]))
        session.target = format_addr((host, port))
        if port == self.config.tproxy_port and _is_local(host):
            # Interception never diverts local destinations: this client dialled
            # the listener itself. Relaying would connect to ourselves.
            self.reject(sock, session, "not-intercepted")
            return
        decision = self.targets.check(normalize(parse_address(host)))
        if not decision.allowed:
            # A reset, as a firewall's reject would give (the client believes
            # it talks to the server: no protocol of ours to answer in).
            self.reject(sock, session, f"refused:{decision.reason.value}")
            return
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        source = (client_host, 0) if self.config.keep_client_address else None

        def note_bypass(result: ConnectResult) -> None:
            if result.mptcp and self.bypass is not None:
                added = self.bypass.add(host, port)
                session.extra = {"bypass": "added" if added else "known"}

        self.connect_and_relay(sock, session, family, (host, port), source=source,
                               before_relay=note_bypass)


def _is_local(host: str) -> bool:
    """Is ``host`` an address of this namespace? (binding to it succeeds)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError:
            return False
    return True


def _ipv6_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM):
            return True
    except OSError:
        return False
