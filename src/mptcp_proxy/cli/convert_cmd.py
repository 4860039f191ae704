"""`mptcp-proxy convert --listen ADDR:PORT [--allow CIDR ...] [--cookie-secret FILE]`."""

from __future__ import annotations

import argparse
import dataclasses
import logging

from mptcp_proxy.cli.common import (
    add_policy_options, add_relay_options, add_upstream_options, check_workers, policy_settings,
    server_settings,
)
from mptcp_proxy.config import Endpoint
from mptcp_proxy.config_convert import ConvertConfig, load_cookie_secret

log = logging.getLogger("mptcp_proxy.cli")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="RFC 8803 Transport Converter (0-RTT Convert protocol)",
        description="Accept MPTCP connections carrying an RFC 8803 Convert message "
                    "(in the SYN with TCP Fast Open, or right after the handshake), "
                    "connect to the requested server (MPTCP first) and relay.")
    p.add_argument("--listen", required=True, metavar="ADDR:PORT",
                   help="address to listen on, e.g. 0.0.0.0:5124 or [::]:5124")
    add_policy_options(p, "converter", request="Convert message", over_limit="Error 64")
    p.add_argument("--cookie-secret", metavar="FILE",
                   help="require a Cookie TLV with every Connect, keyed by the secret "
                        "in FILE (>= 16 bytes, mode 600)")
    p.add_argument("--cookie-window", type=int, default=3600, metavar="SECONDS",
                   help="cookie lifetime window; a cookie lasts 1-2 windows (default 3600)")
    p.add_argument("--tfo-queue", type=int, default=1024, metavar="N",
                   help="TCP Fast Open queue length of the listener; 0 disables TFO "
                        "(default 1024)")
    p.add_argument("--tfo-no-cookie", action="store_true",
                   help="accept SYN data without a TFO cookie (0-RTT on a client's first "
                        "connection if it sets TCP_FASTOPEN_NO_COOKIE; spoofable)")
    p.add_argument("--no-upstream-tfo", action="store_true",
                   help="do not offer the client's first bytes to the server's SYN")
    p.add_argument("--error-rate", type=float, default=10.0, metavar="PER_SECOND",
                   help="error replies per second per client; above: close silently "
                        "(default 10)")
    p.add_argument("--error-burst", type=int, default=20, metavar="N",
                   help="error replies a client may get in a burst (default 20)")
    p.add_argument("--no-sysctl", action="store_true",
                   help="do not touch net.ipv4.tcp_fastopen (set it yourself: 3). Managing "
                        "it needs root (CAP_NET_ADMIN to write it, write access to "
                        "/run/mptcp-proxy to record its users); with this option convert "
                        "needs no privileges (but CAP_NET_BIND_SERVICE for ports < 1024)")
    add_upstream_options(p, "server")
    add_relay_options(p, dss_checksum=False)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> ConvertConfig:
    secret = load_cookie_secret(args.cookie_secret) if args.cookie_secret else None
    return ConvertConfig(
        listen=Endpoint.parse(args.listen, "--listen", default_host="0.0.0.0"),
        **policy_settings(args),
        cookie_secret=secret,
        cookie_window=args.cookie_window,
        tfo_queue=args.tfo_queue,
        tfo_no_cookie=args.tfo_no_cookie,
        upstream_tfo=not args.no_upstream_tfo,
        error_rate=args.error_rate,
        error_burst=args.error_burst,
        manage_sysctls=not args.no_sysctl,
        **server_settings(args),
    )


def run(args: argparse.Namespace) -> int:
    from mptcp_proxy.kernel.sysctl import SharedSysctlBits
    from mptcp_proxy.server.convert import (
        TFO_SYSCTL, ConvertServer, acquire_tfo_bits, check_tfo_sysctl_rights, tfo_sysctl_bits,
    )
    from mptcp_proxy.server.workers import run_workers

    config = config_from_args(args)
    workers = check_workers(args, config.listen.port)
    if config.manage_sysctls:
        check_tfo_sysctl_rights(tfo_sysctl_bits(config))   # before anything changes

    def serve(index: int = 0, worker_config: ConvertConfig = config) -> int:
        server = ConvertServer(worker_config).start(reuseport=workers > 1)
        clients = ", ".join(str(n) for n in config.allow_clients)
        for addr in server.listen_addresses():
            log.info("convert%s: listening on %s:%d (TFO %s%s, cookies %s, upstream %s, "
                     "clients %s, max %d connections)",
                     f"[{index}]" if workers > 1 else "", addr[0], addr[1],
                     f"queue {config.tfo_queue}" if server.tfo_enabled else "off",
                     ", no TFO cookie needed" if config.tfo_no_cookie else "",
                     "required" if config.cookie_secret else "off", config.upstream.value,
                     clients, server.max_connections)
        server.serve_forever()
        stats = server.convert_stats
        log.info("convert: stopped; %d connections relayed, %d refused; %d with the Convert "
                 "header in the SYN, %d after the handshake; %d accepted before the "
                 "client's third ACK (%d pushed once established, %d given up on)",
                 server.stats.relayed, server.stats.rejected, stats.syn_data,
                 stats.no_syn_data, stats.early_accepted, server.establish.pushed,
                 server.establish.expired)
        return 0

    if workers == 1:
        return serve()
    # Workers share the namespace: the parent owns the sysctls, restores them last.
    holder = SharedSysctlBits(TFO_SYSCTL, tfo_sysctl_bits(config))
    try:
        if config.manage_sysctls and holder.bits:
            acquire_tfo_bits(holder)
        worker_config = dataclasses.replace(config, manage_sysctls=False)
        # Fail early in the parent on a bad address rather than in every worker.
        ConvertServer(worker_config).start(reuseport=True)._close_everything()
        return run_workers(workers, lambda index: serve(index, worker_config))
    finally:
        holder.release()
