"""`mptcp-proxy socks5 --listen ADDR:PORT ...` and `mptcp-proxy http-connect --listen ADDR:PORT ...`."""

from __future__ import annotations

import argparse
import logging
import textwrap

from mptcp_proxy.cli.common import (
    add_policy_options, add_relay_options, add_upstream_options, check_workers, policy_settings,
    server_settings,
)
from mptcp_proxy.config import Endpoint
from mptcp_proxy.config_app_proxy import AppProxyConfig, Credentials
from mptcp_proxy.modes.app_proxy import HTTP_CONNECT, SOCKS5
from mptcp_proxy.modes.transparent import PortSet

log = logging.getLogger("mptcp_proxy.cli")

_DESCRIPTIONS = {
    SOCKS5: ("SOCKS5 proxy (RFC 1928) on an MPTCP listener",
             "Serve SOCKS5 CONNECT requests (no authentication, or username/password "
             "with --auth) arriving over MPTCP (or plain TCP), and connect to the "
             "requested target, MPTCP first."),
    HTTP_CONNECT: ("HTTP CONNECT proxy (RFC 9110) on an MPTCP listener",
                   "Serve HTTP CONNECT tunnels (Basic proxy authentication with --auth) "
                   "arriving over MPTCP (or plain TCP), and connect to the requested "
                   "target, MPTCP first. Other methods get 405; refusals (403, 502, 504) "
                   "carry a one-line body saying why."),
}

DEFAULT_PORTS = {SOCKS5: 1080, HTTP_CONNECT: 3128}
"""The protocols' customary ports: --listen's example and its port when none is given."""

_EXAMPLES = {
    SOCKS5: ("mptcp-proxy socks5 --listen 0.0.0.0:1080 --allow 10.0.0.0/8",
             "curl --socks5-hostname PROXY:1080 https://example.org/"),
    HTTP_CONNECT: ("mptcp-proxy http-connect --listen 0.0.0.0:3128 --allow-port 443",
                   "curl --proxytunnel -x http://PROXY:3128 https://example.org/"),
}

_EPILOG = ("Targets in private and other special-use ranges (10.0.0.0/8, 192.168.0.0/16, "
           "fc00::/7, ...) are refused unless --allow-target lists them, e.g. "
           "--allow-target 10.0.0.0/8. Logs go to stderr, one line per connection "
           "(-q hides those).")


def register(sub: argparse._SubParsersAction) -> None:
    for protocol in (SOCKS5, HTTP_CONNECT):
        summary, description = _DESCRIPTIONS[protocol]
        port = DEFAULT_PORTS[protocol]
        examples = "\n".join(f"  {line}" for line in _EXAMPLES[protocol])
        p = sub.add_parser(
            protocol, help=summary, formatter_class=argparse.RawDescriptionHelpFormatter,
            description=textwrap.fill(description, 78, break_on_hyphens=False),
            epilog=f"example:\n{examples}\n\n"
                   + textwrap.fill(_EPILOG, 78, break_on_hyphens=False))
        p.add_argument("--listen", required=True, metavar="ADDR[:PORT]",
                       help=f"address to listen on, e.g. 0.0.0.0:{port} or [::]:{port} "
                            f"(port {port} when none is given)")
        add_policy_options(p, over_limit="closed at once")
        p.add_argument("--allow-port", default="all", metavar="PORTS",
                       help="target ports served: all, or a list like 443,8000-8100 "
                            "(default all)")
        p.add_argument("--auth", metavar="FILE",
                       help="require authentication; FILE holds user:password lines "
                            "(mode 600)")
        add_upstream_options(p)
        add_relay_options(p)
        p.set_defaults(func=run, protocol=protocol)


def config_from_args(args: argparse.Namespace) -> AppProxyConfig:
    return AppProxyConfig(
        protocol=args.protocol,
        listen=Endpoint.parse(args.listen, "--listen", default_host="0.0.0.0",
                              default_port=DEFAULT_PORTS[args.protocol]),
        **policy_settings(args),
        allow_ports=PortSet.parse(args.allow_port, "--allow-port"),
        credentials=Credentials.load(args.auth) if args.auth else None,
        **server_settings(args),
    )


def run(args: argparse.Namespace) -> int:
    from mptcp_proxy.server.app_proxy import AppProxyServer
    from mptcp_proxy.server.workers import run_workers

    config = config_from_args(args)
    workers = check_workers(args, config.listen.port)

    def serve(index: int = 0) -> int:
        server = AppProxyServer(config).start(reuseport=workers > 1)
        for addr in server.listen_addresses():
            log.info("%s%s: listening on %s:%d (auth %s, ports %s, upstream %s, clients %s, "
                     "max %d connections)", config.protocol,
                     f"[{index}]" if workers > 1 else "", addr[0], addr[1],
                     "required" if config.credentials else "off", config.allow_ports,
                     config.upstream.value,
                     ", ".join(str(n) for n in config.allow_clients), server.max_connections)
        server.serve_forever()
        log.info("%s: stopped; %d connections relayed, %d refused", config.protocol,
                 server.stats.relayed, server.stats.rejected)
        return 0

    if workers == 1:
        return serve()
    # Fail early in the parent on a bad address rather than in every worker.
    AppProxyServer(config).start(reuseport=True)._close_everything()
    return run_workers(workers, serve)
