"""Command-line entry point: `mptcp-proxy MODE ...`.

Each subcommand lives in its own module exposing ``register(subparsers)``; the
module adds its parser and sets ``func(args) -> int``. This module only parses,
configures logging and maps errors to exit codes.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from mptcp_proxy import __version__
from mptcp_proxy.errors import ConfigError, ProxyError

# Subcommand modules, in the order `--help` lists them.
COMMANDS = (
    "mptcp_proxy.cli.forward_cmd",
    "mptcp_proxy.cli.convert_cmd",
    "mptcp_proxy.cli.app_proxy_cmd",
    "mptcp_proxy.cli.transparent_cmd",
    "mptcp_proxy.cli.client_cmd",
    "mptcp_proxy.cli.lab_cmd",
    "mptcp_proxy.cli.demo_cmd",
)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mptcp-proxy",
        description="Multipath TCP proxies for Linux.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    try:
        return int(args.func(args) or EXIT_OK)
    except ConfigError as exc:
        print(f"mptcp-proxy: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ProxyError as exc:
        print(f"mptcp-proxy: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `mptcp-proxy lab list | head`: the reader went away; not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
