"""`mptcp-proxy demo`: a 2-path lab, the forward proxy, live throughput, a summary."""

from __future__ import annotations

import argparse
import math

from mptcp_proxy.errors import ConfigError

# Each phase must last long enough for throughput samples (every 0.5 s) and a
# rate worth comparing: the second subflow joins within milliseconds, but the
# first half second is mostly TCP's start and the shapers' burst.
MIN_SECONDS = 1.0
MAX_SECONDS = 3600.0
# PathSpec's range for a tbf rate.
MIN_RATE_MBIT = 0.01
MAX_RATE_MBIT = 100_000.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="show two paths carrying one connection (builds a lab)",
                       description="Build a 2-path lab, run the forward proxy in it, upload "
                                   "over one path then both, and print the speedup. "
                                   "Needs root (it builds network namespaces).")
    p.add_argument("--rates", type=float, nargs=2, default=(20.0, 30.0), metavar="MBIT",
                   help="rate of path0 and path1 in Mbit/s (default 20 30)")
    p.add_argument("--seconds", type=float, default=6.0,
                   help=f"duration of each upload phase, {MIN_SECONDS:g} to "
                        f"{MAX_SECONDS:g} (default 6)")
    p.set_defaults(func=run)


def check_args(rates: tuple[float, float], seconds: float) -> None:
    """ConfigError naming the option for a value the demo cannot use."""
    if not (math.isfinite(seconds) and MIN_SECONDS <= seconds <= MAX_SECONDS):
        raise ConfigError("--seconds", f"must be {MIN_SECONDS:g} to {MAX_SECONDS:g} "
                                       f"seconds, not {seconds:g} (each upload phase "
                                       "needs time for throughput samples)")
    for rate in rates:
        if not (math.isfinite(rate) and MIN_RATE_MBIT <= rate <= MAX_RATE_MBIT):
            raise ConfigError("--rates", f"rates must be {MIN_RATE_MBIT:g} to "
                                         f"{MAX_RATE_MBIT:g} Mbit/s, not {rate:g}")


def run(args: argparse.Namespace) -> int:
    from mptcp_proxy.lab.demo import Demo, require_privileges

    rates = tuple(args.rates)
    check_args(rates, args.seconds)
    require_privileges()
    return Demo(rates=rates, seconds=args.seconds).run()
