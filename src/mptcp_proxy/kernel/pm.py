"""The in-kernel MPTCP path manager through ``ip mptcp``: endpoints and limits, undone on exit.

What a transparent proxy needs from it (docs/KERNEL-FACTS.md, "Path manager"):

- a ``signal`` endpoint *with a port* for its reachable address: the kernel
  announces it (ADD_ADDR) on every new connection of the namespace and opens
  its own listener on that port, where the client's MP_JOINs land;
- limits that accept those joins (``subflows``).

Endpoints are created with explicit ids (free ones, chosen here) so that
exactly those are deleted again; limits are only ever raised, and put back.
Commands run in the calling thread's network namespace. The per-namespace C
bit sysctl lives in kernel/sysctl.py.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

from mptcp_proxy.errors import KernelError
from mptcp_proxy.kernel.routing import ip
from mptcp_proxy.kernel.sysctl import read_sysctl

log = logging.getLogger(__name__)

MAX_ENDPOINT_ID = 255            # MPTCP_PM_MAX_ADDR_ID; id 0 is the initial subflow's
MAX_ENDPOINTS = 8                # MPTCP_PM_ADDR_MAX: a ninth endpoint fails with ERANGE
ENDPOINT_FLAGS = ("signal", "subflow", "backup", "fullmesh")
_LIMITS = re.compile(r"(add_addr_accepted|subflows)\s+(\d+)")


@dataclass(frozen=True)
class PmEndpoint:
    """One path-manager endpoint as ``ip -j mptcp endpoint show`` reports it."""

    id: int
    address: str
    port: int = 0
    dev: str | None = None
    flags: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: dict) -> "PmEndpoint":
        try:
            return cls(id=int(data["id"]), address=str(data["address"]),
                       port=int(data.get("port", 0)), dev=data.get("dev"),
                       flags=tuple(f for f in ENDPOINT_FLAGS if data.get(f)))
        except (KeyError, TypeError, ValueError):
            raise KernelError(f"unexpected endpoint description {data!r}") from None


@dataclass(frozen=True)
class PmLimits:
    subflows: int
    add_addr_accepted: int


def list_endpoints() -> list[PmEndpoint]:
    out = ip("-j", "mptcp", "endpoint", "show").stdout.strip()
    try:
        data = json.loads(out or "[]")
    except ValueError:
        raise KernelError(f"cannot parse `ip -j mptcp endpoint show`: {out[:200]!r}") from None
    return [PmEndpoint.from_json(e) for e in data]


def parse_limits(text: str) -> PmLimits:
    """Parse ``ip mptcp limits show`` (iproute2 6.1 prints text even with ``-j``)."""
    values = dict((k, int(v)) for k, v in _LIMITS.findall(text))
    if set(values) != {"subflows", "add_addr_accepted"}:
        raise KernelError(f"cannot parse `ip mptcp limits show`: {text.strip()!r}")
    return PmLimits(values["subflows"], values["add_addr_accepted"])


def get_limits() -> PmLimits:
    return parse_limits(ip("mptcp", "limits", "show").stdout)


def set_limits(limits: PmLimits) -> None:
    ip("mptcp", "limits", "set", "subflows", str(limits.subflows),
       "add_addr_accepted", str(limits.add_addr_accepted))


def endpoint_add_argv(endpoint: PmEndpoint) -> list[str]:
    """``ip`` arguments adding ``endpoint`` (pure)."""
    ipaddress.ip_address(endpoint.address)  # ValueError on nonsense, before any kernel call
    argv = ["mptcp", "endpoint", "add", endpoint.address, "id", str(endpoint.id)]
    if endpoint.port:
        argv += ["port", str(endpoint.port)]
    if endpoint.dev:
        argv += ["dev", endpoint.dev]
    bad = [f for f in endpoint.flags if f not in ENDPOINT_FLAGS]
    if bad:
        raise KernelError(f"unknown endpoint flags {bad}")
    return argv + list(endpoint.flags)


def free_ids(taken: Iterable[int], count: int) -> list[int]:
    """``count`` endpoint ids not in ``taken``, from the top of the range down.

    The kernel numbers endpoints added without an id from 1 upwards; taking
    ours from the top keeps them out of each other's way.
    """
    used = set(taken)
    ids = [i for i in range(MAX_ENDPOINT_ID, 0, -1) if i not in used][:count]
    if len(ids) < count:
        raise KernelError("no free MPTCP endpoint ids")
    return ids


def delete_endpoint(endpoint_id: int, *, port: int | None = None) -> bool:
    """Delete endpoint ``endpoint_id`` if it exists (and has ``port``, when given)."""
    for endpoint in list_endpoints():
        if endpoint.id == endpoint_id and (port is None or endpoint.port == port):
            ip("mptcp", "endpoint", "delete", "id", str(endpoint_id))
            return True
    return False


def kernel_pm_active() -> bool:
    """True when the namespace uses the in-kernel path manager (which announces
    signal endpoints); False for the userspace one."""
    try:
        return read_sysctl("net.mptcp.path_manager") == "kernel"
    except KernelError:  # before Linux 6.15: pm_type 0 = kernel, 1 = userspace
        return read_sysctl("net.mptcp.pm_type") == "0"


class PathManagerChanges:
    """Endpoints added and limits raised by this process; :meth:`restore` undoes them."""

    def __init__(self) -> None:
        self.added: list[PmEndpoint] = []
        self.limits_were: PmLimits | None = None

    def plan_endpoints(self, specs: list[tuple[str, int, str | None]]) -> list[PmEndpoint]:
        """Signal endpoints for ``(address, port, dev)`` with free ids (nothing applied)."""
        current = list_endpoints()
        if len(current) + len(specs) > MAX_ENDPOINTS:
            raise KernelError(f"the path manager holds at most {MAX_ENDPOINTS} endpoints; "
                              f"{len(current)} exist, {len(specs)} more asked")
        ids = free_ids((e.id for e in current), len(specs))
        return [PmEndpoint(i, addr, port, dev, ("signal",))
                for i, (addr, port, dev) in zip(ids, specs)]

    def add_endpoint(self, endpoint: PmEndpoint) -> None:
        ip(*endpoint_add_argv(endpoint))
        self.added.append(endpoint)
        where = f"[{endpoint.address}]" if ":" in endpoint.address else endpoint.address
        log.info("path manager: endpoint id %d %s:%d %s added (removed on exit)",
                 endpoint.id, where, endpoint.port, ",".join(endpoint.flags))

    def raise_limits(self, subflows: int | None = None,
                     add_addr_accepted: int | None = None) -> PmLimits:
        """Raise the limits to at least the given values; recorded once."""
        old = get_limits()
        new = PmLimits(max(old.subflows, subflows or 0),
                       max(old.add_addr_accepted, add_addr_accepted or 0))
        if new != old:
            set_limits(new)
            if self.limits_were is None:
                self.limits_were = old
            log.info("path manager: limits subflows %d add_addr_accepted %d "
                     "(were %d, %d; restored on exit)", new.subflows,
                     new.add_addr_accepted, old.subflows, old.add_addr_accepted)
        return old

    def restore(self) -> None:
        errors = []
        while self.added:
            endpoint = self.added.pop()
            try:
                delete_endpoint(endpoint.id, port=endpoint.port)
                log.info("path manager: endpoint id %d removed", endpoint.id)
            except KernelError as exc:
                errors.append(str(exc))
        if self.limits_were is not None:
            try:
                set_limits(self.limits_were)
                log.info("path manager: limits restored")
            except KernelError as exc:
                errors.append(str(exc))
            self.limits_were = None
        if errors:
            raise KernelError("; ".join(errors))

    def __enter__(self) -> "PathManagerChanges":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()
