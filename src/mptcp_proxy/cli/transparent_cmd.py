"""`mptcp-proxy transparent [--ports LIST|all] [--announce ADDR[:PORT]] [--bypass-ttl SECONDS]`.

Run on a host that routes the clients' traffic (the on-path proxy). Needs
root (nftables, policy routing, sysctls, path-manager endpoints: checked
before anything changes); everything it changes is put back when it exits.
"""

from __future__ import annotations

import argparse
import logging

from mptcp_proxy.cli.common import add_relay_options, add_upstream_options, server_settings
from mptcp_proxy.errors import ConfigError
from mptcp_proxy.modes.policy import parse_networks
from mptcp_proxy.modes.transparent import (
    DEFAULT_ANNOUNCE_PORT,
    DEFAULT_BYPASS_TTL,
    DEFAULT_FWMARK,
    DEFAULT_ROUTE_TABLE,
    DEFAULT_TPROXY_PORT,
    PortSet,
)

log = logging.getLogger("mptcp_proxy.cli")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "transparent", help="implicit MPTCP proxy on the path of the client's first subflow",
        description="Intercept TCP SYNs carrying MP_CAPABLE that cross this host (nftables "
                    "TPROXY), terminate their MPTCP connections here and relay them to the "
                    "real servers; plain TCP passes untouched. With --announce, clients "
                    "learn this proxy's address and add subflows to it over their other "
                    "paths. Servers that answer with MPTCP are bypassed for a while.",
        epilog="Needs CAP_NET_ADMIN (run as root): nftables, policy routing, MPTCP "
               "endpoints, the C-bit sysctl, IP_TRANSPARENT. Checked at start, before "
               "anything changes; everything changed is put back on exit. Example: "
               "mptcp-proxy transparent --ports 80,443 --announce 203.0.113.5:7002 "
               "(203.0.113.5: an address of this host).")
    p.add_argument("--ports", default="all", metavar="LIST|all",
                   help="destination ports to intercept: all (default) or a list such as "
                        "80,443,8000-8100")
    p.add_argument("--announce", action="append", default=[], metavar="ADDR[:PORT]",
                   help="announce this address of the proxy to clients (ADD_ADDR), with "
                        f"PORT (default {DEFAULT_ANNOUNCE_PORT}; the kernel listens there "
                        "for their joins); repeatable. ADDR must be an address of this "
                        "host (checked at start), the one the clients' other paths reach "
                        "it at: they open their extra subflows to it. Announce an IPv4 "
                        "address: an IPv6 one with a port only fits connections without "
                        "TCP timestamps. Without it, connections use the path they "
                        "started on")
    p.add_argument("--bypass-ttl", type=float, default=DEFAULT_BYPASS_TTL, metavar="SECONDS",
                   help="how long a server seen speaking MPTCP is left end to end "
                        f"(default {DEFAULT_BYPASS_TTL:.0f})")
    p.add_argument("--interface", action="append", default=[], metavar="IF",
                   help="intercept only SYNs arriving on IF (repeatable; default: every "
                        "interface but lo). Set it when other traffic, such as another "
                        "proxy's, crosses this host")
    p.add_argument("--tproxy-port", type=int, default=DEFAULT_TPROXY_PORT, metavar="PORT",
                   help=f"local port of the interception listener (default {DEFAULT_TPROXY_PORT})")
    add_upstream_options(p, "server")
    p.add_argument("--deny-target", action="append", default=[], metavar="CIDR",
                   help="destinations never relayed: the client gets a reset (repeatable). "
                        "Intercepted connections leave from this host, so forward-chain "
                        "firewall rules no longer apply to them; list what they refuse")
    p.add_argument("--keep-client-address", action="store_true",
                   help="connect to servers from the client's address (IP_TRANSPARENT) "
                        "instead of this host's; replies must route back through this host")
    p.add_argument("--fwmark", type=_integer, default=DEFAULT_FWMARK,
                   metavar="MARK", help=f"fwmark of diverted packets (default {DEFAULT_FWMARK:#x})")
    p.add_argument("--route-table", type=int, default=DEFAULT_ROUTE_TABLE, metavar="N",
                   help=f"routing table for diverted packets (default {DEFAULT_ROUTE_TABLE})")
    add_relay_options(p)
    p.set_defaults(func=run)


def _integer(text: str) -> int:
    """Decimal or 0x-prefixed hex."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def config_from_args(args: argparse.Namespace):
    from mptcp_proxy.server.transparent import Announce, TransparentConfig

    if getattr(args, "workers", 1) != 1:
        raise ConfigError("--workers", "transparent mode runs as one process")
    return TransparentConfig(
        ports=PortSet.parse(args.ports),
        announce=tuple(Announce.parse(a) for a in args.announce),
        bypass_ttl=args.bypass_ttl,
        tproxy_port=args.tproxy_port,
        interfaces=tuple(args.interface),
        keep_client_address=args.keep_client_address,
        fwmark=args.fwmark,
        route_table=args.route_table,
        deny_targets=parse_networks(args.deny_target, "--deny-target"),
        **server_settings(args),
    )


def run(args: argparse.Namespace) -> int:
    from mptcp_proxy.server.transparent import TransparentServer

    config = config_from_args(args)
    server = TransparentServer(config).start()
    log.info("transparent: ready (listener :%d, %s relay, max %d connections)",
             config.tproxy_port, "splice" if config.relay.splice else "copy",
             server.max_connections)
    server.serve_forever()
    log.info("transparent: stopped; %d connections served, %d rejected",
             server.stats.relayed, server.stats.rejected)
    return 0
