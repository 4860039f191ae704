"""`mptcp-proxy demo`: a 2-path lab, the forward proxy, live throughput, a summary."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="show two paths carrying one connection (builds a lab)",
                       description="Build a 2-path lab, run the forward proxy in it, upload "
                                   "over one path then both, and print the speedup.")
    p.add_argument("--rates", type=float, nargs=2, default=(20.0, 30.0), metavar="MBIT",
                   help="rate of path0 and path1 in Mbit/s (default 20 30)")
    p.add_argument("--seconds", type=float, default=6.0,
                   help="duration of each upload phase (default 6)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mptcp_proxy.lab.demo import Demo

    return Demo(rates=tuple(args.rates), seconds=args.seconds).run()
