"""Sysctls set by a running proxy, recorded and restored on exit.

Values under /proc/sys/net are per network namespace: the namespace of the
thread that opens the file. A :class:`SysctlChanges` restores in reverse order
what it changed, also when the caller fails half-way.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from mptcp_proxy.errors import KernelError
from mptcp_proxy.kernel import netns

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
        raise KernelError(f"cannot read sysctl {key}: {exc.strerror}", exc.errno) from None


def write_sysctl(key: str, value: str | int) -> None:
    try:
        sysctl_path(key).write_text(f"{value}\n")
    except OSError as exc:
        raise KernelError(f"cannot set sysctl {key}={value}: {exc.strerror}", exc.errno) from None


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


# --------------------------------------------------------------------------
# Bits several processes of one namespace need (net.ipv4.tcp_fastopen)
# --------------------------------------------------------------------------

SHARED_STATE_DIR = Path("/run/mptcp-proxy/sysctl")


def _netns_inode() -> int:
    """The calling thread's network namespace, as the inode of its nsfs file."""
    return os.stat("/proc/thread-self/ns/net").st_ino


def _process_start(pid: int) -> str | None:
    """Start time of ``pid`` (field 22 of /proc/PID/stat), or None if it is gone.
    With the pid it names a process for good: pids are reused, start times not."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


class SharedSysctlBits:
    """OR ``bits`` into an integer sysctl for as long as any holder needs them.

    Several converters may run in one network namespace, and any of them may be
    SIGKILLed. Plain save-and-restore gets both wrong: the first to exit
    restores the old value under the others, and a killed one leaves its value
    for the next start to mistake for the original. Holders are therefore
    recorded in ``/run/mptcp-proxy/sysctl/<netns inode>-<key>.json`` (under an
    flock): the original value, the value set, and each holder's pid and start
    time. The last live holder to release restores the original; a start that
    finds only dead holders restores it first. Either restores only if the
    value is still the one set (an administrator's later change is left alone).
    """

    def __init__(self, key: str, bits: int, state_dir: Path = SHARED_STATE_DIR) -> None:
        sysctl_path(key)  # validates the name
        self.key = key
        self.bits = bits
        self.state_dir = state_dir
        self.token = f"{os.getpid()}:{_process_start(os.getpid())}:{id(self):x}"
        self.path: Path | None = None
        self.held = False
        # The namespace acquired in: release() restores there, whichever thread
        # (and namespace) it runs in; /proc/sys/net follows the calling thread.
        self._netns_fd: int | None = None
        self.recovered = False
        """A record left by holders that all died was found (and undone) by acquire()."""

    def acquire(self) -> None:
        """Set the bits (if not set already) and register as a holder. Idempotent.

        :class:`KernelError` if the sysctl or the record cannot be written."""
        if self.held:
            return
        fd = netns.open_current()   # first: a failure here leaves nothing recorded
        try:
            self._acquire()
        except OSError as exc:
            os.close(fd)
            raise KernelError(f"cannot record the users of {self.key} in {self.state_dir}: "
                              f"{exc.strerror}", exc.errno) from None
        except BaseException:
            os.close(fd)
            raise
        self._netns_fd = fd

    def _acquire(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.state_dir / f"{_netns_inode()}-{self.key}.json"
        with self._locked() as record:
            self._remove_records_of_gone_namespaces()
            holders = _live(record.get("holders", [])) if record else []
            if record and not holders:
                self._restore(record, "left by a process that died")
                self.recovered = True
                record = {}
            current = int(read_sysctl(self.key))
            if not record:
                record.update(original=str(current))
            wanted = current | self.bits
            if wanted != current:
                write_sysctl(self.key, wanted)
                log.info("sysctl %s: %s -> %s (restored when the last user exits)",
                         self.key, current, wanted)
            record["set"] = str(wanted)
            record["holders"] = holders + [self.token]
            try:
                self._write(record)
            except OSError:
                if wanted != current:   # unrecorded, it would never be restored
                    write_sysctl(self.key, current)
                raise
        self.held = True

    def release(self) -> None:
        """Deregister; the last holder restores the original value. Idempotent."""
        if not self.held:
            return
        self.held = False
        fd, self._netns_fd = self._netns_fd, None
        try:
            with netns.in_netns(fd):
                self._release()
        except OSError as exc:
            raise KernelError(f"cannot update the users of {self.key} in {self.state_dir}: "
                              f"{exc.strerror}") from None
        finally:
            if fd is not None:
                os.close(fd)

    def _release(self) -> None:
        with self._locked() as record:
            if not record:
                return
            holders = [h for h in _live(record.get("holders", [])) if h != self.token]
            if holders:
                record["holders"] = holders
                self._write(record)
                return
            self._restore(record, "no user left")
            assert self.path is not None  # set by acquire
            self.path.unlink(missing_ok=True)

    # -- helpers -------------------------------------------------------------
    def _restore(self, record: dict, why: str) -> None:
        try:
            current = read_sysctl(self.key)
        except KernelError as exc:
            log.error("%s", exc)
            return
        if current != record.get("set"):
            log.warning("sysctl %s is %s, not the %s we set: leaving it", self.key, current,
                        record.get("set"))
            return
        write_sysctl(self.key, record["original"])
        log.info("sysctl %s restored to %s (%s)", self.key, record["original"], why)

    def _remove_records_of_gone_namespaces(self) -> None:
        """Records whose namespace no longer exists (a lab deleted under a
        killed converter) would otherwise stay, and inode numbers are reused."""
        live = _live_netns_inodes()
        for path in self.state_dir.glob("*-*.json"):
            inode = path.name.partition("-")[0]
            if path != self.path and inode.isdigit() and int(inode) not in live:
                path.unlink(missing_ok=True)

    def _write(self, record: dict) -> None:
        assert self.path is not None  # set by acquire
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record) + "\n")
        tmp.replace(self.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict]:
        """The record (empty if none or unreadable), under an exclusive flock."""
        assert self.path is not None  # set by acquire
        # One lock for the directory: a lock file per record could not be
        # removed with its record without racing a process waiting on it.
        with open(self.state_dir / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                try:
                    record = json.loads(self.path.read_text())
                    if not isinstance(record, dict) or "original" not in record:
                        raise ValueError("not a record")
                except FileNotFoundError:
                    record = {}
                except (OSError, ValueError) as exc:
                    log.warning("ignoring unreadable %s: %s", self.path, exc)
                    record = {}
                yield record
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _live_netns_inodes() -> set[int]:
    """Inodes of the network namespaces that exist: those of processes and
    those kept by a bind mount (``ip netns``)."""
    found: set[int] = set()
    for ns_file in [*Path("/proc").glob("[0-9]*/ns/net"), *Path("/run/netns").glob("*")]:
        try:
            found.add(os.stat(ns_file).st_ino)
        except OSError:
            continue   # the process ended meanwhile
    return found


def _live(holders: list) -> list[str]:
    """The holders whose process (pid and start time) still runs."""
    live = []
    for token in holders:
        pid_text, _, rest = str(token).partition(":")
        start = rest.partition(":")[0]
        if pid_text.isdigit() and _process_start(int(pid_text)) == start:
            live.append(str(token))
    return live
