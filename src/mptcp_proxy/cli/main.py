"""Command-line entry point: `mptcp-proxy MODE ...`.

Each subcommand lives in its own module exposing ``register(subparsers)``; the
module adds its parser and sets ``func(args) -> int``. This module only parses,
configures logging and maps errors to exit codes.

``-v``/``-q`` are accepted before the subcommand and after it (``mptcp-proxy
forward ... -q``): added here to every subcommand's parser, nested ones too,
after the modules registered theirs, and merged with the top-level ones.
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

VERBOSE_HELP = "more log output (-vv for debug)"
QUIET_HELP = ("only warnings and errors: hides the startup lines and the one line per "
              "connection")
LOGGING_EPILOG = ("Logs go to stderr: what each mode sets up, warnings, and one line per "
                  "connection when it closes (logger mptcp_proxy.conn, level INFO). -q "
                  "shows only warnings and errors, -v adds detail, -vv debug; both may "
                  "come before or after the subcommand.")
# Where the subcommands' own -v/-q land before they are merged with the top level's.
_SUB_VERBOSE = "_sub_verbose"
_SUB_QUIET = "_sub_quiet"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mptcp-proxy",
        description="Multipath TCP proxies for Linux.",
        epilog=LOGGING_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help=VERBOSE_HELP)
    parser.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    for subparser in _subparsers(parser):
        _add_log_options(subparser)
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser below ``parser`` (``forward``, ``lab``, ``lab up`` ...)."""
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases share a parser
                found.append(child)
                found.extend(_subparsers(child))
    return found


def _add_log_options(parser: argparse.ArgumentParser) -> None:
    """``-v``/``-q`` on a subcommand's parser, into attributes of their own: a
    subparser's defaults would otherwise overwrite the top-level values."""
    taken = parser._option_string_actions
    group = parser.add_argument_group("logging (also accepted before the subcommand)")
    if "-v" not in taken and "--verbose" not in taken:
        group.add_argument("-v", "--verbose", action="count", dest=_SUB_VERBOSE,
                           default=argparse.SUPPRESS, help=VERBOSE_HELP)
    if "-q" not in taken and "--quiet" not in taken:
        group.add_argument("-q", "--quiet", action="store_true", dest=_SUB_QUIET,
                           default=argparse.SUPPRESS, help=QUIET_HELP)


def parse_args(argv: list[str] | None = None,
               parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The command line, with ``-v``/``-q`` counted wherever they were given."""
    args = (parser or build_parser()).parse_args(argv)
    args.verbose = getattr(args, "verbose", 0) + vars(args).pop(_SUB_VERBOSE, 0)
    args.quiet = bool(getattr(args, "quiet", False) or vars(args).pop(_SUB_QUIET, False))
    return args


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
