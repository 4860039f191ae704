"""`mptcp-proxy lab ...`: build, inspect, use and remove namespace labs.

Labs made here are persistent: they outlive the command and are removed with
``lab down``. Everything they contain is in namespaces named ``mpx-*``.

``up``, ``down`` and ``exec`` need root (network namespaces) and say so before
doing anything; ``list`` and ``show`` only read.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from mptcp_proxy.config import parse_on_off
from mptcp_proxy.errors import ConfigError, LabError
from mptcp_proxy.lab import Lab, PathSpec, list_labs, remove_lab
from mptcp_proxy.lab.child import exec_in
from mptcp_proxy.lab.topology import (
    ALL_ROLES,
    LAB_PREFIX,
    MAX_DELAY_MS,
    MAX_PATHS,
    TOPOLOGIES,
    AccessPath,
    allow_target_advice,
    canonical_name,
    impair_log_path,
    lab_namespaces,
    state_path,
)
from mptcp_proxy.lab import netns

DEFAULT_PATHS = 2
# `lab down`: seconds the lab's processes get between SIGTERM and SIGKILL.
DEFAULT_GRACE_S = 5.0

# What each command needs, and why: the line an unprivileged user gets.
NEEDS = {
    "up": ((netns.CAP_SYS_ADMIN, netns.CAP_NET_ADMIN), "it creates network namespaces"),
    "down": ((netns.CAP_SYS_ADMIN, netns.CAP_NET_ADMIN),
             "it stops the processes in a lab's network namespaces and deletes them"),
    "exec": ((netns.CAP_SYS_ADMIN,), "it enters a lab's network namespace"),
}


def require_privileges(action: str) -> None:
    """LabError unless this process may run ``lab ACTION`` (checked before anything)."""
    caps, why = NEEDS[action]
    netns.require_privileges(f"lab {action}", why, caps)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "lab", help="network-namespace labs: client, proxy, server and shaped paths",
        description="Build and use network-namespace labs (namespaces named mpx-*).")
    sub = parser.add_subparsers(dest="lab_command", metavar="ACTION")
    sub.required = True

    up = sub.add_parser("up", help="build a lab and print its facts")
    up.add_argument("--name", help="lab name (gets the mpx- prefix); default: random")
    up.add_argument("--paths", type=int, metavar="N",
                    help=f"number of client-proxy paths, 1-{MAX_PATHS} "
                         f"(default {DEFAULT_PATHS}, or one per --rate/--delay/--loss)")
    up.add_argument("--rate", type=float, nargs="+", metavar="MBIT",
                    help="rate limit in Mbit/s: one for every path, or one per path; "
                         "default unshaped")
    up.add_argument("--delay", type=float, nargs="+", metavar="MS",
                    help="one-way delay in ms, added in each direction (a round trip "
                         "gains twice it): one for every path, or one per path; default 0")
    up.add_argument("--loss", type=float, nargs="+", metavar="PCT",
                    help="random packet loss in percent, in each direction: one for "
                         "every path, or one per path; default 0")
    up.add_argument("--topology", choices=TOPOLOGIES, default="basic",
                    help="topology to build (default basic)")
    up.add_argument("--dss-checksum", default="off", metavar="on|off",
                    help="end hosts (client, servers) ask for MPTCP DSS checksums "
                         "(default off, the kernel's default; README, 'Data integrity')")
    up.add_argument("--json", action="store_true", help="print the facts as JSON")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="remove labs and everything running in them",
                          description="Stop what runs in the labs (SIGTERM, then SIGKILL "
                                      "after --grace seconds) and remove them.")
    which = down.add_mutually_exclusive_group(required=True)
    which.add_argument("names", nargs="*", default=[], metavar="NAME")
    which.add_argument("--all", action="store_true",
                       help=f"remove every lab on this machine ({LAB_PREFIX}* namespaces)")
    down.add_argument("--grace", type=float, default=DEFAULT_GRACE_S, metavar="SECONDS",
                      help="how long processes in the labs get after SIGTERM to drain and "
                           "restore their state before SIGKILL (default "
                           f"{DEFAULT_GRACE_S:g}; 0: SIGKILL at once)")
    down.set_defaults(func=cmd_down)

    exec_ = sub.add_parser(
        "exec", help="run a command in a node of a lab",
        description="Run CMD in a lab node; exits with its status. A bare 'mptcp-proxy' "
                    "runs with this command's own Python, PATH or not. CMD gets SIGTERM "
                    "when this command dies, and the SIGINT/SIGTERM/SIGHUP sent to it.")
    exec_.add_argument("name", metavar="NAME")
    exec_.add_argument("role", choices=ALL_ROLES, metavar="NODE",
                       help="one of " + ", ".join(ALL_ROLES) + " (wifi and mpserver: "
                            "operator topology)")
    exec_.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    exec_.set_defaults(func=cmd_exec)

    ls = sub.add_parser("list", help="list labs on this machine")
    ls.set_defaults(func=cmd_list)

    show = sub.add_parser("show", help="print a lab's facts again (what `lab up` printed)")
    show.add_argument("name", metavar="NAME")
    show.add_argument("--json", action="store_true", help="print the facts as JSON")
    show.set_defaults(func=cmd_show)


def path_specs(paths: int | None, rates: list[float] | None,
               delays: list[float] | None = None,
               losses: list[float] | None = None) -> list[PathSpec]:
    """PathSpecs from ``--paths``, ``--rate``, ``--delay`` and ``--loss``.

    Each of the lists holds one value for every path or one per path; a bad
    combination or value is a ConfigError naming the option.
    """
    options = {"--rate": rates or [], "--delay": delays or [], "--loss": losses or []}
    per_path_counts = [len(v) for v in options.values() if len(v) > 1]
    count = paths if paths is not None else (per_path_counts[0] if per_path_counts
                                             else DEFAULT_PATHS)
    if not 1 <= count <= MAX_PATHS:
        raise ConfigError("--paths", f"must be 1 to {MAX_PATHS}, not {count}")
    for key, values in options.items():
        if len(values) > 1 and len(values) != count:
            raise ConfigError(key, f"give one value or {count} values, not {len(values)}")
    if any(r <= 0 for r in options["--rate"]):
        raise ConfigError("--rate", "rates must be positive")
    if any(not 0 <= d <= MAX_DELAY_MS for d in options["--delay"]):
        raise ConfigError("--delay", f"delays must be 0 to {MAX_DELAY_MS:g} ms")
    if any(not 0 <= x < 100 for x in options["--loss"]):
        raise ConfigError("--loss", "loss must be at least 0 and below 100 percent")

    def spread(values: list[float], default):
        return values * count if len(values) == 1 else values or [default] * count

    return [PathSpec(rate_mbit=r, delay_ms=d, loss_pct=x)
            for r, d, x in zip(spread(options["--rate"], None),
                               spread(options["--delay"], 0.0),
                               spread(options["--loss"], 0.0))]


def describe_path(a: AccessPath) -> str:
    """``20 Mbit/s, 10 ms delay each way, 1% loss each way``: how path ``a`` behaves."""
    parts = [f"{a.rate_mbit:g} Mbit/s" if a.rate_mbit else "unshaped"]
    if a.delay_ms:
        parts.append(f"{a.delay_ms:g} ms delay each way")
    if a.loss_pct:
        parts.append(f"{a.loss_pct:g}% loss each way")
    return ", ".join(parts)


def format_facts(lab: Lab) -> str:
    """What a person needs to use a lab, as text."""
    c = lab.client.ns
    lines = [f"lab {lab.name} ({lab.topology}, {len(lab.paths)} paths)",
             "  namespaces  " + "  ".join(f"{n.role} {n.ns}" for n in lab.nodes)]
    for a in lab.paths:
        lines.append(f"  path {a.index}      client {a.client_if} {a.client_addr} "
                     f"{a.client_addr6}  <->  {a.gateway} {a.proxy_if} {a.proxy_addr} "
                     f"{a.proxy_addr6}  {describe_path(a)}")
    if lab.impair_pid is not None:
        lines.append(f"  emulator    delay/loss by pid {lab.impair_pid} (NFQUEUE), "
                     f"log {impair_log_path(lab.name)}")
    if lab.topology == "operator":
        lines += [
            f"  server      {lab.server_addr} {lab.server_addr6}  (plain TCP)",
            f"  mpserver    {lab.mpserver_addr} {lab.mpserver_addr6}  (MPTCP)",
            f"  proxy       public {lab.proxy_public_addr} {lab.proxy_public_addr6}  "
            f"(path 0 crosses it, path 1 does not)",
        ]
    else:
        lines.append(f"  server      {lab.server_addr} {lab.server_addr6}  "
                     f"(proxy side {lab.proxy_server_side_addr} {lab.proxy_server_side_addr6})")
    lines += [
        f"  proxies     {allow_target_advice(lab.plan)}",
        f"  exec        mptcp-proxy lab exec {lab.name} client -- ip -br addr",
        f"              ip netns exec {c} bash",
        f"  again       mptcp-proxy lab show {lab.name}",
        f"  remove      mptcp-proxy lab down {lab.name}",
    ]
    return "\n".join(lines)


def print_facts(lab: Lab, as_json: bool) -> None:
    """What ``lab up`` and ``lab show`` print."""
    print(json.dumps(lab.facts(), indent=2) if as_json else format_facts(lab))


def cmd_up(args: argparse.Namespace) -> int:
    specs = path_specs(args.paths, args.rate, args.delay, args.loss)
    dss = parse_on_off(args.dss_checksum, "--dss-checksum")
    if args.name is not None:
        canonical_name(args.name)  # a bad name is refused before the privilege check
    require_privileges("up")
    lab = Lab.create(specs, name=args.name, topology=args.topology, persistent=True,
                     dss_checksum=dss)
    print_facts(lab, args.json)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    print_facts(Lab.attach(args.name), args.json)
    return 0


def _emulators(names: list[str]) -> list[int]:
    """The delay emulators of labs ``names``: they stop last (with the lab)."""
    pids = []
    for name in names:
        try:
            pid = Lab.attach(name).impair_pid
        except LabError:
            continue
        if pid:
            pids.append(pid)
    return pids


def cmd_down(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.grace) and args.grace >= 0):
        raise ConfigError("--grace", f"must be 0 or more seconds, not {args.grace:g}")
    require_privileges("down")
    if args.all:
        names = list_labs()
        # Stray namespaces: what a crashed build left without a recognisable suffix.
        strays = netns.list_namespaces(LAB_PREFIX)
    else:
        names = [canonical_name(n) for n in args.names]
        unknown = [n for n in names if n not in list_labs()]
        if unknown:
            raise LabError(f"no lab named {', '.join(unknown)}")
        strays = []
    # Every lab's processes get their SIGTERM, and the grace, together.
    everything = dict.fromkeys([ns for name in names for ns in lab_namespaces(name)] + strays)
    netns.terminate_processes([ns for ns in everything if netns.exists(ns)], args.grace,
                              spare=_emulators(names))
    for name in names:
        remove_lab(name)
        print(f"removed {name}")
    if strays:
        netns.delete(strays)
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise ConfigError("CMD", "give a command to run, after --")
    require_privileges("exec")
    node = Lab.attach(args.name).node(args.role)
    sys.stdout.flush()
    sys.stderr.flush()
    exec_in(node.ns, argv)


def cmd_list(args: argparse.Namespace) -> int:
    for name in list_labs():
        if not state_path(name).exists():
            print(f"{name}  (no state file: remove with `lab down {name}`)")
            continue
        try:
            lab = Lab.attach(name)
        except LabError as exc:  # a broken lab is listed, not fatal
            print(f"{name}  ({exc})")
            continue
        rates = ", ".join(f"{a.rate_mbit:g}" if a.rate_mbit else "-" for a in lab.paths)
        if any(a.spec.impaired for a in lab.paths):
            rates += "] delay ms=[" + ", ".join(f"{a.delay_ms:g}" for a in lab.paths)
            rates += "] loss %=[" + ", ".join(f"{a.loss_pct:g}" for a in lab.paths)
        if lab.persistent:
            owner = "persistent"
        elif os.path.exists(f"/proc/{lab.owner_pid}"):
            owner = f"owned by pid {lab.owner_pid}"
        else:  # its process was SIGKILLed before it could clean up
            owner = f"stale: pid {lab.owner_pid} is gone"
        if lab.impair_pid is not None and not os.path.exists(f"/proc/{lab.impair_pid}"):
            owner += "  (delay emulator gone: its paths carry nothing)"
        print(f"{name}  {lab.topology}  paths={len(lab.paths)} Mbit/s=[{rates}]  "
              f"server={lab.server_addr}  {owner}")
    return 0
