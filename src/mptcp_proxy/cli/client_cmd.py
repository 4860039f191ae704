"""`mptcp-proxy client --converter ADDR:PORT|auto [--capture CIDR[:PORTS] ...] [--socks5 ADDR:PORT]`.

The client agent, for hosts whose applications do not speak MPTCP. Run it as
root on the host itself (or in its network namespace): it installs one
nftables table there and removes it on exit; nothing else is changed.
"""

from __future__ import annotations

import argparse
import logging

from mptcp_proxy.cli.common import add_relay_options, dss_checksum, relay_config
from mptcp_proxy.config import Endpoint, is_ip_literal
from mptcp_proxy.errors import ConfigError
from mptcp_proxy.modes.client_agent import DEFAULT_MARK, DEFAULT_TABLE, parse_captures

log = logging.getLogger("mptcp_proxy.cli")

AUTO = "auto"
DNS_PORT = 53
DEFAULT_DISCOVERY_TIMEOUT = 5.0
# The Convert request after the handshake unless --tfo: on Linux 6.18 a
# multipath download on a connection the converter accepted with SYN data ran
# 9.3x slower than through forward (20 MB over 20 + 30 Mbit/s: 16-72 s against
# 3.4-4.0 s; after the handshake 1.00x), measured with
# benchmarks/agent_download.py. One round trip more per connection instead.
DEFAULT_TFO = False
_NOT_YET_DISCOVERED = Endpoint("converter.invalid", 1)  # stands in while options are checked


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "client", help="client agent: carry this host's TCP connections over MPTCP "
                       "to an RFC 8803 converter",
        description="Capture this host's outgoing TCP connections to the given networks "
                    "(nftables, a table of the agent's own, removed on exit) and/or offer a "
                    "SOCKS5 listener, and carry each connection over Multipath TCP to a "
                    "Transport Converter, naming the destination in an RFC 8803 Connect "
                    "TLV (in the SYN with TCP Fast Open). Servers the converter reports "
                    "as MPTCP-capable are then reached directly.")
    p.add_argument("--converter", required=True, metavar="ADDR:PORT|auto",
                   help="the converter, or 'auto' to find it with DNS SRV "
                        "_convert._tcp.DOMAIN (see --domain)")
    p.add_argument("--domain", metavar="DOMAIN",
                   help="with --converter auto: the domain whose _convert._tcp SRV "
                        "records name the converters")
    p.add_argument("--dns-server", action="append", default=[], metavar="ADDR[:PORT]",
                   help="with --converter auto: nameserver to ask (repeatable; default: "
                        "/etc/resolv.conf)")
    p.add_argument("--capture", action="append", default=[], metavar="CIDR[:PORTS]",
                   help="capture connections to this network, e.g. 192.0.2.0/24, "
                        "10.0.0.0/8:80,443,8000-8100, [fd00::/8]:443 (repeatable)")
    p.add_argument("--listen-port", type=int, default=0, metavar="PORT",
                   help="port of the capture listeners on 127.0.0.1 and ::1 "
                        "(default: a free one)")
    p.add_argument("--socks5", metavar="ADDR:PORT",
                   help="also listen for SOCKS5 (RFC 1928, CONNECT, no authentication) "
                        "on this address, e.g. 127.0.0.1:1080")
    p.add_argument("--tfo-no-cookie", action="store_true",
                   help="put the Convert request in the SYN even without a TFO cookie; implies --tfo "
                        "(TCP_FASTOPEN_NO_COOKIE; the converter must run with "
                        "--tfo-no-cookie)")
    tfo = p.add_mutually_exclusive_group()
    tfo.add_argument("--tfo", dest="tfo", action="store_true", default=None,
                     help="put the Convert request in the SYN (TCP Fast Open, 0-RTT)"
                          + (" (default)" if DEFAULT_TFO else ""))
    tfo.add_argument("--no-tfo", dest="tfo", action="store_false",
                     help="send the Convert request after the handshake (one round trip "
                          "more)" + ("" if DEFAULT_TFO else " (default)")
                          + ". On Linux 6.18 a multipath download on a connection the "
                          "converter accepted with SYN data runs many times slower "
                          "(README, 'The client agent')")
    p.add_argument("--mark", type=_integer, default=DEFAULT_MARK, metavar="MARK",
                   help=f"fwmark on the agent's own sockets, never captured "
                        f"(default {DEFAULT_MARK:#x})")
    p.add_argument("--nft-table", default=DEFAULT_TABLE, metavar="NAME",
                   help=f"name of the agent's nftables table (default {DEFAULT_TABLE})")
    p.add_argument("--handshake-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="deadline from accept to relay: SOCKS5, name resolution, converter "
                        "connect and answer (default 10)")
    p.add_argument("--no-direct", action="store_true",
                   help="always go through the converter, even to servers it reported "
                        "as MPTCP-capable")
    p.add_argument("--mptcp-cache-ttl", type=float, default=600.0, metavar="SECONDS",
                   help="how long a server reported MPTCP-capable is reached directly "
                        "(default 600)")
    add_relay_options(p, dss_checksum=None)
    p.set_defaults(func=run)


def _integer(text: str) -> int:
    """Decimal or 0x-prefixed hex."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def parse_nameserver(text: str, key: str = "--dns-server") -> tuple[str, int]:
    """``ADDR``, ``ADDR:PORT``, ``[V6]:PORT`` or a bare IPv6 address; an IP literal."""
    text = text.strip()
    if is_ip_literal(text):
        return text, DNS_PORT
    endpoint = Endpoint.parse(text, key)
    if not is_ip_literal(endpoint.host):
        raise ConfigError(key, f"{endpoint.host!r} is not an IP address")
    if endpoint.port == 0:
        raise ConfigError(key, "port 0")
    return endpoint.host, endpoint.port


def discover(args: argparse.Namespace) -> tuple[Endpoint, ...]:
    """``--converter auto``: the converters of ``--domain``, best first (RFC 8803 §10.1)."""
    from mptcp_proxy.discovery import find_converter

    if not args.domain:
        raise ConfigError("--domain", "--converter auto needs the domain to look up")
    servers = [parse_nameserver(s) for s in args.dns_server] or None
    found = find_converter(args.domain, nameservers=servers, timeout=DEFAULT_DISCOVERY_TIMEOUT)
    log.info("client: converters for %s: %s", args.domain,
             ", ".join(str(Endpoint(h, p)) for h, p in found))
    return tuple(Endpoint(host, port) for host, port in found)


def config_from_args(args: argparse.Namespace, converters: tuple[Endpoint, ...] | None = None):
    from mptcp_proxy.server.agent import AgentConfig

    if getattr(args, "workers", 1) != 1:
        raise ConfigError("--workers", "the client agent runs as one process")
    if args.converter.strip().lower() != AUTO:
        if args.domain or args.dns_server:
            raise ConfigError("--domain", "--domain and --dns-server go with --converter auto")
        converters = (Endpoint.parse(args.converter, "--converter"),)
    elif converters is None:
        converters = discover(args)
    if args.tfo is False and args.tfo_no_cookie:
        raise ConfigError("--tfo-no-cookie", "contradicts --no-tfo")
    return AgentConfig(
        converters=converters,
        capture=parse_captures(args.capture),
        listen_port=args.listen_port,
        socks5=Endpoint.parse(args.socks5, "--socks5", default_host="127.0.0.1")
        if args.socks5 else None,
        mark=args.mark,
        # --tfo-no-cookie asks for 0-RTT: it implies --tfo unless --no-tfo says otherwise.
        tfo=(args.tfo_no_cookie or DEFAULT_TFO) if args.tfo is None else args.tfo,
        tfo_no_cookie=args.tfo_no_cookie,
        table=args.nft_table,
        handshake_timeout=args.handshake_timeout,
        direct=not args.no_direct,
        mptcp_cache_ttl=args.mptcp_cache_ttl,
        relay=relay_config(args),
        drain_timeout=args.drain_timeout,
        log_connections=not args.no_conn_log,
        dss_checksum=None if args.dss_checksum is None else dss_checksum(args),
    )


def run(args: argparse.Namespace) -> int:
    from mptcp_proxy.server.agent import ClientAgent

    # Options are checked before anything is asked of the network.
    if args.converter.strip().lower() == AUTO:
        config_from_args(args, converters=(_NOT_YET_DISCOVERED,))
    config = config_from_args(args)
    agent = ClientAgent(config).start()
    converters = ", ".join(f"[{s[0]}]:{s[1]}" if ":" in s[0] else f"{s[0]}:{s[1]}"
                           for _, s in agent.converters)
    if config.capture:
        log.info("client: capturing %s -> listener :%d (nftables table inet %s, mark %#x)",
                 ", ".join(str(c) for c in config.capture), agent.capture_port,
                 config.table, config.mark)
    if agent.socks_port is not None:
        for addr in agent.listen_addresses():
            if addr[1] == agent.socks_port:
                log.info("client: SOCKS5 listening on %s:%d", addr[0], addr[1])
    log.info("client: ready; converter %s (TFO %s%s, direct to MPTCP servers %s, max %d "
             "connections)", converters,
             "off" if not config.tfo else ("on" if agent.tfo_client else "off (sysctl)"),
             ", no cookie" if config.tfo_no_cookie else "",
             "on" if config.direct else "off", agent.max_connections)
    agent.serve_forever()
    stats = agent.agent_stats
    log.info("client: stopped; %d connections relayed (%d via the converter, %d with the "
             "Convert request in the SYN, %d direct), %d refused",
             agent.stats.relayed, stats.via_converter, stats.tfo_acked, stats.direct,
             agent.stats.rejected)
    return 0
