"""`mptcp-proxy forward --listen ADDR:PORT --to HOST:PORT [--upstream auto|mptcp|tcp]`."""

from __future__ import annotations

import argparse
import logging

from mptcp_proxy.cli.common import add_relay_options, add_upstream_options, check_workers, server_settings
from mptcp_proxy.config import Endpoint, ForwardConfig

log = logging.getLogger("mptcp_proxy.cli")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "forward", help="MPTCP front door for one TCP server",
        description="Accept MPTCP (and plain TCP) connections and relay each one to a "
                    "fixed target, MPTCP first toward it when --upstream is auto.")
    p.add_argument("--listen", required=True, metavar="ADDR:PORT",
                   help="address to listen on, e.g. 0.0.0.0:8080 or [::]:8080")
    p.add_argument("--to", required=True, metavar="HOST:PORT", help="target server")
    add_upstream_options(p, "target")
    add_relay_options(p)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> ForwardConfig:
    return ForwardConfig(
        listen=Endpoint.parse(args.listen, "--listen", default_host="0.0.0.0"),
        target=Endpoint.parse(args.to, "--to"),
        **server_settings(args),
    )


def run(args: argparse.Namespace) -> int:
    from mptcp_proxy.server.forward import ForwardServer
    from mptcp_proxy.server.workers import run_workers

    config = config_from_args(args)
    workers = check_workers(args, config.listen.port)

    def serve(index: int = 0) -> int:
        server = ForwardServer(config).start(reuseport=workers > 1)
        for addr in server.listen_addresses():
            log.info("forward%s: listening on %s:%d -> %s (upstream %s, %s relay, "
                     "max %d connections)", f"[{index}]" if workers > 1 else "",
                     addr[0], addr[1], config.target, config.upstream.value,
                     "splice" if config.relay.splice else "copy", server.max_connections)
        server.serve_forever()
        log.info("forward: stopped; %d connections served, %d rejected",
                 server.stats.relayed, server.stats.rejected)
        return 0

    if workers == 1:
        return serve()
    # Fail early in the parent on a bad address rather than in every worker.
    ForwardServer(config).start(reuseport=True)._close_everything()
    return run_workers(workers, serve)
