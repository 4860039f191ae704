"""Sysctls set by a running proxy, recorded and restored on exit.

Values under /proc/sys/net are per network namespace: the namespace of the
thread that opens the file. A :class:`SysctlChanges` restores in reverse order
what it changed, also when the caller fails half-way.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mptcp_proxy.errors import KernelError

log = logging.getLogger(__name__)

PROC_SYS = Path("/proc/sys")


def sysctl_path(key: str) -> Path:
    if not key or key.startswith(".") or ".." in key or "/" in key:
        raise KernelError(f"bad sysctl name {key!r}")
    return PROC_SYS / key.replace(".", "/")


def read_sysctl(key: str) -> str:
    try:
        return sysctl_path(key).read_text().strip()
    except OSError as exc:
        raise KernelError(f"cannot read sysctl {key}: {exc.strerror}") from None


def write_sysctl(key: str, value: str | int) -> None:
    try:
        sysctl_path(key).write_text(f"{value}\n")
    except OSError as exc:
        raise KernelError(f"cannot set sysctl {key}={value}: {exc.strerror}") from None


class SysctlChanges:
    """Set sysctls now, put the old values back on :meth:`restore` (idempotent)."""

    def __init__(self) -> None:
        self._saved: list[tuple[str, str]] = []

    def set(self, key: str, value: str | int) -> str:
        """Set ``key``; return the previous value. Unchanged values are not recorded."""
        old = read_sysctl(key)
        if old.split() == str(value).split():
            return old
        write_sysctl(key, value)
        self._saved.append((key, old))
        log.info("sysctl %s: %s -> %s (restored on exit)", key, old, value)
        return old

    def set_bits(self, key: str, bits: int) -> str:
        """OR ``bits`` into an integer sysctl (e.g. net.ipv4.tcp_fastopen)."""
        old = read_sysctl(key)
        return self.set(key, int(old) | bits)

    @property
    def changed(self) -> list[tuple[str, str]]:
        return list(self._saved)

    def restore(self) -> None:
        errors = []
        while self._saved:
            key, old = self._saved.pop()
            try:
                write_sysctl(key, old)
                log.info("sysctl %s restored to %s", key, old)
            except KernelError as exc:
                errors.append(str(exc))
        if errors:
            raise KernelError("; ".join(errors))

    def __enter__(self) -> "SysctlChanges":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()
