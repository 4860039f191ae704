"""What a mode may do in this process: capabilities, read from ``/proc/self/status``.

Modes that change kernel state check what they need *before* changing
anything, so that an unprivileged start ends with one line saying what is
missing and why, instead of the first tool's failure (``nft``: Operation not
permitted) after half the state was installed and taken down again.

Facts this relies on (measured on Linux 6.18, see tests/unit/test_privileges.py
and tests/e2e/test_privileges_cli.py):

- netlink changes (nftables, ``ip rule``/``route``/``mptcp``), SO_MARK,
  IP_TRANSPARENT need CAP_NET_ADMIN (the last two also accept CAP_NET_RAW);
- a ``net.*`` sysctl may be written by its owner (uid 0) or with
  CAP_NET_ADMIN; CAP_DAC_OVERRIDE does not help there;
- ``/run/mptcp-proxy`` (where shared sysctls record their users) belongs to
  root: writing it needs uid 0, CAP_DAC_OVERRIDE or a directory of one's own;
- the ``nft`` and ``ip`` programs the proxy runs get, after execve, the
  bounding set when the proxy runs as uid 0, and only the *ambient* set
  otherwise (systemd: ``AmbientCapabilities=``);
- ports below ``net.ipv4.ip_unprivileged_port_start`` (1024) need
  CAP_NET_BIND_SERVICE.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mptcp_proxy.errors import PrivilegeError

CAPABILITIES: dict[str, int] = {
    "CAP_DAC_OVERRIDE": 1,
    "CAP_NET_BIND_SERVICE": 10,
    "CAP_NET_ADMIN": 12,
    "CAP_NET_RAW": 13,
    "CAP_SYS_ADMIN": 21,
}
"""The capabilities the proxy's modes may need, by name (<linux/capability.h>)."""

STATUS = Path("/proc/self/status")
UNPRIVILEGED_PORT_START = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")


@dataclass(frozen=True)
class Privileges:
    """The parts of ``/proc/PID/status`` that decide what the process may do."""

    euid: int
    effective: int
    ambient: int = 0
    bounding: int = 0

    @classmethod
    def parse(cls, text: str) -> "Privileges":
        """From the text of ``/proc/PID/status`` (``Uid:`` and the ``Cap*:`` lines).
        A missing line counts as none of its capabilities (uid: not root)."""
        fields: dict[str, str] = {}
        for line in text.splitlines():
            key, colon, value = line.partition(":")
            if colon:
                fields[key.strip()] = value.strip()

        def mask(key: str) -> int:
            try:
                return int(fields.get(key, "0").split()[0], 16)
            except (ValueError, IndexError):
                return 0

        try:
            euid = int(fields.get("Uid", "").split()[1])   # real, effective, saved, fs
        except (ValueError, IndexError):
            euid = -1
        return cls(euid, mask("CapEff"), mask("CapAmb"), mask("CapBnd"))

    @classmethod
    def current(cls) -> "Privileges":
        try:
            return cls.parse(STATUS.read_text())
        except OSError:   # no /proc: trust the uid
            root = os.geteuid() == 0
            return cls(os.geteuid(), ~0 if root else 0, 0, ~0 if root else 0)

    @property
    def root(self) -> bool:
        return self.euid == 0

    def has(self, name: str) -> bool:
        """``name`` (``CAP_NET_ADMIN``) is in the effective set."""
        return bool(self.effective >> CAPABILITIES[name] & 1)

    def children_have(self, name: str) -> bool:
        """A program this process runs (``nft``, ``ip``) gets ``name``: from the
        bounding set as root, from the ambient set otherwise."""
        bit = CAPABILITIES[name]
        if self.root:
            return bool(self.bounding >> bit & 1) and self.has(name)
        return bool(self.ambient >> bit & 1)


def _privileges(status: str | None) -> Privileges:
    return Privileges.current() if status is None else Privileges.parse(status)


def _lacks(privileges: Privileges, name: str, children: bool) -> bool:
    if name not in CAPABILITIES:
        raise ValueError(f"unknown capability {name!r}")
    return not privileges.has(name) or (children and not privileges.children_have(name))


def missing_capabilities(names: Iterable[str], status: str | None = None, *,
                         children: bool = False) -> list[str]:
    """The capabilities of ``names`` this process lacks, in the order given.

    ``status``: the text of ``/proc/self/status`` (read when None).
    ``children``: also needed by the programs it runs (``nft``, ``ip``), so,
    without root, in the ambient set too."""
    privileges = _privileges(status)
    return [name for name in names if _lacks(privileges, name, children)]


@dataclass(frozen=True)
class Need:
    """One thing a mode needs: a capability, and why (said when it is missing)."""

    capability: str
    why: str
    children: bool = False
    """The programs it runs (nft, ip) need it too."""


def unmet(needs: Iterable[Need], status: str | None = None) -> list[Need]:
    """The needs this process does not meet, in the order given."""
    privileges = _privileges(status)
    return [n for n in needs if _lacks(privileges, n.capability, n.children)]


def describe(mode: str, needs: Iterable[Need], status: str | None = None,
             advice: str = "") -> str | None:
    """One line saying what ``mode`` lacks and why, or None when nothing is missing."""
    privileges = _privileges(status)
    failed = [n for n in needs if _lacks(privileges, n.capability, n.children)]
    if not failed:
        return None
    parts = []
    for need in failed:
        if need.children and privileges.has(need.capability) and not privileges.root:
            parts.append(f"{need.capability} in its ambient set too ({need.why}, done by "
                         f"the nft and ip programs it runs; systemd: "
                         f"AmbientCapabilities={need.capability})")
        else:
            parts.append(f"{need.capability} ({need.why})")
    what = " and ".join(parts)
    if privileges.root:
        line = (f"{mode} needs {what}, which this root process lacks (a container or "
                "unit without them?)")
    else:
        line = f"{mode} needs {what}: run it as root"
    if advice:
        line += f", {advice}"
    return line + "; nothing was changed"


def require(mode: str, needs: Iterable[Need], status: str | None = None,
            advice: str = "") -> None:
    """Raise :class:`PrivilegeError` (one line) unless this process meets ``needs``."""
    problem = describe(mode, needs, status, advice)
    if problem is not None:
        raise PrivilegeError(problem)


def unprivileged_port_start() -> int:
    """The lowest port anyone may bind (``net.ipv4.ip_unprivileged_port_start``)."""
    try:
        return int(UNPRIVILEGED_PORT_START.read_text().strip())
    except (OSError, ValueError):
        return 1024


def port_needs(port: int, option: str) -> list[Need]:
    """CAP_NET_BIND_SERVICE when ``port`` is privileged (0: any free port, none)."""
    if 0 < port < unprivileged_port_start():
        return [Need("CAP_NET_BIND_SERVICE", f"{option} port {port} is below "
                                             f"{unprivileged_port_start()}")]
    return []


def bind_denied_hint(port: int) -> str:
    """What to say when binding ``port`` failed with EACCES."""
    if 0 < port < unprivileged_port_start():
        return (f"ports below {unprivileged_port_start()} need CAP_NET_BIND_SERVICE: run as "
                "root, grant it, or pick a higher port")
    return ""


def can_write_sysctl(path: Path) -> bool:
    """This process may write the sysctl file ``path`` (opened for writing, nothing
    written: the kernel's own check, uid 0 or CAP_NET_ADMIN for ``net.*``).
    A missing file counts as writable: the caller's own error says it is missing."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return False
        return True
    os.close(fd)
    return True


def can_create_in(path: Path) -> bool:
    """This process may create files under ``path`` (or, when it does not exist
    yet, create it in its nearest existing ancestor): the kernel's own check,
    capabilities included (faccessat2 with AT_EACCESS)."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return False
        probe = probe.parent
    return os.access(probe, os.W_OK | os.X_OK, effective_ids=True)


__all__ = [
    "CAPABILITIES", "Need", "Privileges", "bind_denied_hint", "can_create_in",
    "can_write_sysctl", "describe", "missing_capabilities", "port_needs", "require",
    "unmet", "unprivileged_port_start",
]
