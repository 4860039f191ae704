"""Policy routing for TPROXY: a fwmark rule and a local default route, undone on exit.

A SYN diverted by TPROXY keeps its foreign destination address; only a route
of type ``local`` makes the host deliver it instead of forwarding it
(docs/KERNEL-FACTS.md, "Interception")::

    ip rule add fwmark MARK lookup TABLE pref PREF protocol 203
    ip route add local default dev lo table TABLE proto 203

for IPv4 and IPv6. Every rule and route carries the routing protocol number
:data:`RT_PROTO`, so a rule set left by a proxy that was killed is recognised
and removed at the next start (:meth:`TproxyRouting.apply`), and nothing else
is ever touched. Commands run in the calling thread's network namespace.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from mptcp_proxy.errors import KernelError

log = logging.getLogger(__name__)

RT_PROTO = 203            # routing protocol number marking mptcp-proxy's rules and routes
DEFAULT_RULE_PREF = 100   # before source-based rules a multi-homed host may have
FAMILIES = ("-4", "-6")
IP_TIMEOUT_S = 10.0
_MAX_STALE = 64           # bound on stale rules removed per family (one `del` each)


def ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGV`` in the calling thread's network namespace."""
    exe = shutil.which("ip")
    if exe is None:
        raise KernelError("ip (iproute2) is not installed")
    try:
        proc = subprocess.run([exe, *argv], capture_output=True, text=True,
                              timeout=IP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise KernelError(f"ip {' '.join(argv)} timed out") from None
    if check and proc.returncode != 0:
        raise KernelError(f"ip {' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
    return proc


@dataclass(frozen=True)
class TproxyRoute:
    """The policy rule and local table TPROXY needs; pure description."""

    mark: int
    table: int
    pref: int = DEFAULT_RULE_PREF
    families: Sequence[str] = FAMILIES

    def __post_init__(self) -> None:
        if not 0 < self.mark <= 0xFFFFFFFF:
            raise KernelError(f"fwmark {self.mark:#x} out of range")
        # 253-255 are the kernel's default, main and local tables.
        if not 1 <= self.table < 2**31 or self.table in (253, 254, 255):
            raise KernelError(f"routing table {self.table} is not usable")
        if not 1 <= self.pref < 32766:
            raise KernelError(f"rule preference {self.pref} must be 1-32765")
        if any(f not in FAMILIES for f in self.families):
            raise KernelError(f"bad address families {self.families}")

    def add_commands(self) -> list[list[str]]:
        """``ip`` argument lists that install the rule and route, per family."""
        commands = []
        for fam in self.families:
            commands.append([fam, "rule", "add", "fwmark", f"{self.mark:#x}", "lookup",
                             str(self.table), "pref", str(self.pref),
                             "protocol", str(RT_PROTO)])
            commands.append([fam, "route", "add", "local", "default", "dev", "lo",
                             "table", str(self.table), "proto", str(RT_PROTO)])
        return commands

    def delete_commands(self) -> list[list[str]]:
        """``ip`` argument lists that remove exactly what :meth:`add_commands` adds."""
        commands = []
        for fam in self.families:
            commands.append([fam, "route", "del", "local", "default", "dev", "lo",
                             "table", str(self.table), "proto", str(RT_PROTO)])
            commands.append([fam, "rule", "del", "fwmark", f"{self.mark:#x}", "lookup",
                             str(self.table), "pref", str(self.pref),
                             "protocol", str(RT_PROTO)])
        return commands


def tagged_rules(family: str) -> list[dict]:
    """Policy rules of ``family`` carrying :data:`RT_PROTO` (ours, maybe stale)."""
    out = ip("-j", family, "rule", "show").stdout
    try:
        rules = json.loads(out or "[]")
    except ValueError:
        raise KernelError(f"cannot parse `ip -j {family} rule show`: {out[:200]!r}") from None
    return [r for r in rules if str(r.get("protocol")) == str(RT_PROTO)]


def tagged_routes(family: str) -> list[dict]:
    """Routes of ``family``, in any table, carrying :data:`RT_PROTO`."""
    out = ip("-j", family, "route", "show", "table", "all", "proto", str(RT_PROTO)).stdout
    try:
        return json.loads(out or "[]")
    except ValueError:
        raise KernelError(f"cannot parse `ip -j route show`: {out[:200]!r}") from None


def remove_tagged(families: Sequence[str] = FAMILIES) -> int:
    """Delete every rule and route tagged :data:`RT_PROTO`; return how many there were."""
    removed = 0
    for fam in families:
        for route in tagged_routes(fam):
            table = str(route.get("table", "main"))
            ip(fam, "route", "flush", "table", table, "proto", str(RT_PROTO), check=False)
            removed += 1
        for _ in range(_MAX_STALE):
            if ip(fam, "rule", "del", "protocol", str(RT_PROTO), check=False).returncode != 0:
                break
            removed += 1
    return removed


class TproxyRouting:
    """Installs a :class:`TproxyRoute` and removes it again (context manager)."""

    def __init__(self, route: TproxyRoute) -> None:
        self.route = route
        self.installed = False

    def apply(self) -> "TproxyRouting":
        stale = remove_tagged(self.route.families)
        if stale:
            log.warning("routing: removed %d stale rule(s)/route(s) of a previous run", stale)
        try:
            for argv in self.route.add_commands():
                ip(*argv)
        except KernelError:
            remove_tagged(self.route.families)
            raise
        self.installed = True
        log.info("routing: fwmark %#x -> table %d (local default), pref %d",
                 self.route.mark, self.route.table, self.route.pref)
        return self

    def remove(self) -> None:
        if not self.installed:
            return
        self.installed = False
        failed = [" ".join(argv) for argv in self.route.delete_commands()
                  if ip(*argv, check=False).returncode != 0]
        if failed:
            raise KernelError(f"could not remove: {'; '.join(failed)}")
        log.info("routing: fwmark rule and local table %d removed", self.route.table)

    def __enter__(self) -> "TproxyRouting":
        return self.apply()

    def __exit__(self, *exc_info: object) -> None:
        self.remove()
