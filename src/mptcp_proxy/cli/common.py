"""Options shared by the proxy subcommands."""

from __future__ import annotations

import argparse

from mptcp_proxy.config import RelayConfig, UpstreamMode, parse_on_off
from mptcp_proxy.errors import ConfigError


def add_relay_options(parser: argparse.ArgumentParser, *,
                      dss_checksum: bool | None = True) -> None:
    group = parser.add_argument_group("relay")
    group.add_argument("--connect-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="give up connecting upstream after this long (default 10)")
    group.add_argument("--idle-timeout", type=float, default=300.0, metavar="SECONDS",
                       help="close connections idle this long; 0 disables (default 300)")
    group.add_argument("--max-connections", type=int, default=0, metavar="N",
                       help="stop accepting above N open connections "
                            "(default: derived from the fd limit)")
    group.add_argument("--pipe-size", type=int, default=1 << 20, metavar="BYTES",
                       help="splice pipe capacity per direction in flight (default 1 MiB)")
    group.add_argument("--copy", action="store_true",
                       help="relay by copying through user space instead of splice(2)")
    group.add_argument("--drain-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="on SIGINT/SIGTERM wait this long for open connections (default 10)")
    group.add_argument("--no-conn-log", action="store_true",
                       help="do not log one line per connection")
    group.add_argument("--workers", type=int, default=1, metavar="N",
                       help="worker processes sharing the port with SO_REUSEPORT (default 1)")
    add_integrity_options(parser, dss_checksum)


def add_integrity_options(parser: argparse.ArgumentParser, default: bool | None = True) -> None:
    """``--dss-checksum``; its default is the mode's (README, "Data integrity"):
    on, or off where TCP Fast Open is used (None: decided by the mode's config)."""
    spelled = {True: "on", False: "off", None: None}[default]
    why = {True: "on",
           False: "off: with TCP Fast Open, checksums made some multipath uploads wrong "
                  "on Linux 6.18",
           None: "on, or off with --tfo: with TCP Fast Open, checksums made some multipath "
                 "uploads wrong on Linux 6.18"}[default]
    parser.add_argument("--dss-checksum", default=spelled, metavar="on|off",
                        help="ask for MPTCP DSS checksums (RFC 8684 3.3) on every MPTCP "
                             "connection; 'on' sets net.mptcp.checksum_enabled=1 in this "
                             f"network namespace while running (default {why}; README, "
                             "'Data integrity')")


def dss_checksum(args: argparse.Namespace) -> bool:
    return parse_on_off(args.dss_checksum, "--dss-checksum")


def add_policy_options(parser: argparse.ArgumentParser, peer: str = "proxy",
                       request: str = "request", over_limit: str = "") -> None:
    """The options of :class:`~mptcp_proxy.config.ExplicitProxySettings`: policy
    (``--allow``, ``--allow-target``, ``--deny-target``) and handshake limits."""
    from mptcp_proxy.modes.policy import DEFAULT_CLIENT_NETWORKS

    parser.add_argument("--allow", action="append", metavar="CIDR",
                        help="client networks served (repeatable; 'any' for all). Default: "
                             + ", ".join(DEFAULT_CLIENT_NETWORKS))
    parser.add_argument("--allow-target", action="append", default=[], metavar="CIDR",
                        help="special-use target range to allow (private, CGN, ULA, "
                             "benchmarking ...; repeatable). Loopback, link-local, multicast, "
                             f"broadcast and the {peer}'s own addresses are always refused")
    parser.add_argument("--deny-target", action="append", default=[], metavar="CIDR",
                        help="target range to refuse (repeatable)")
    parser.add_argument("--handshake-timeout", type=float, default=10.0, metavar="SECONDS",
                        help=f"deadline from accept to a complete {request} (default 10)")
    parser.add_argument("--max-pending-per-client", type=int, default=64, metavar="N",
                        help="open handshakes per client address"
                             + (f"; above: {over_limit}" if over_limit else "") + " (default 64)")


def policy_settings(args: argparse.Namespace) -> dict:
    """The config fields of :func:`add_policy_options`."""
    from mptcp_proxy.modes.policy import DEFAULT_CLIENT_NETWORKS, parse_networks

    return {
        "allow_clients": parse_networks(args.allow or DEFAULT_CLIENT_NETWORKS, "--allow"),
        "allow_targets": parse_networks(args.allow_target, "--allow-target"),
        "deny_targets": parse_networks(args.deny_target, "--deny-target"),
        "handshake_timeout": args.handshake_timeout,
        "max_pending_per_client": args.max_pending_per_client,
    }


def add_upstream_options(parser: argparse.ArgumentParser, peer: str = "target") -> None:
    """``--upstream`` and ``--tcp-only-ttl``: how every mode connects onward."""
    parser.add_argument("--upstream", default="auto", metavar="auto|mptcp|tcp",
                        help=f"protocol toward the {peer} (default auto: MPTCP first; a {peer} "
                             "that falls back is remembered and reached with TCP)")
    parser.add_argument("--tcp-only-ttl", type=float, default=600.0, metavar="SECONDS",
                        help=f"auto mode: how long a {peer} that fell back stays TCP-only")


def server_settings(args: argparse.Namespace) -> dict:
    """Settings every proxying mode's config takes, from the shared options."""
    return {
        "upstream": UpstreamMode.parse(args.upstream),
        "relay": relay_config(args),
        "drain_timeout": args.drain_timeout,
        "tcp_only_ttl": args.tcp_only_ttl,
        "log_connections": not args.no_conn_log,
        "dss_checksum": dss_checksum(args),
    }


def check_workers(args: argparse.Namespace, listen_port: int) -> int:
    if args.workers < 1 or args.workers > 256:
        raise ConfigError("--workers", "must be between 1 and 256")
    if args.workers > 1 and listen_port == 0:
        raise ConfigError("--workers", "several workers need a fixed --listen port")
    return args.workers


def relay_config(args: argparse.Namespace) -> RelayConfig:
    return RelayConfig(splice=not args.copy, pipe_size=args.pipe_size,
                       idle_timeout=args.idle_timeout, connect_timeout=args.connect_timeout,
                       max_connections=args.max_connections)
