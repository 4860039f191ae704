"""Options shared by the proxy subcommands."""

from __future__ import annotations

import argparse

from mptcp_proxy.config import RelayConfig


def add_relay_options(parser: argparse.ArgumentParser) -> None:
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


def relay_config(args: argparse.Namespace) -> RelayConfig:
    return RelayConfig(splice=not args.copy, pipe_size=args.pipe_size,
                       idle_timeout=args.idle_timeout, connect_timeout=args.connect_timeout,
                       max_connections=args.max_connections)
