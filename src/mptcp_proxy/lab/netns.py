"""Low-level helpers for named network namespaces (the ones in /run/netns).

Two ways into a namespace:

- :func:`enter` moves the *calling thread* into it with ``setns(2)``. Sockets
  created inside stay in that namespace after the block ends, so a test can
  build a listener in the server namespace and use it from any thread. Reads of
  per-namespace files must then go through ``/proc/thread-self``: ``/proc/net``
  and ``/proc/self`` follow the thread-group leader, and ``/sys/class/net``
  follows the mount namespace, not the thread.
- :func:`run` and :func:`popen` start a program under ``ip netns exec``, which
  also remounts ``/sys`` so the program sees its namespace everywhere.

Everything here needs root (CAP_SYS_ADMIN). Nothing here knows about labs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from mptcp_proxy.errors import LabError
from mptcp_proxy.kernel.netns import in_netns
from mptcp_proxy.kernel.privileges import CAPABILITIES, Privileges

NETNS_RUN_DIR = Path("/run/netns")
THREAD_PROC_NET = Path("/proc/thread-self/net")
PROC_SYS = Path("/proc/sys")

# Generous: `ip -batch` scripts finish in milliseconds; a hang means a bug.
COMMAND_TIMEOUT_S = 30.0
# How long a SIGKILLed process may take to leave its namespace.
KILL_WAIT_S = 2.0
# How often waits for processes to leave a namespace look again.
POLL_INTERVAL_S = 0.02

# Capability numbers the lab commands need (one table: kernel/privileges.py).
CAP_NET_ADMIN = CAPABILITIES["CAP_NET_ADMIN"]
CAP_SYS_ADMIN = CAPABILITIES["CAP_SYS_ADMIN"]
CAP_NAMES = {number: name for name, number in CAPABILITIES.items()}


def effective_capabilities() -> int:
    """This process's effective capability set, as a bit mask (``CapEff``)."""
    return Privileges.current().effective


def missing_capabilities(caps: Iterable[int]) -> list[str]:
    """Names of the capabilities in ``caps`` this process lacks, in the order given."""
    have = effective_capabilities()
    return [CAP_NAMES.get(cap, f"capability {cap}") for cap in caps if not have >> cap & 1]


def require_privileges(command: str, why: str,
                       caps: Sequence[int] = (CAP_SYS_ADMIN, CAP_NET_ADMIN)) -> None:
    """Refuse to start ``command`` without ``caps``: one LabError line saying why.

    Called before a command does anything, so that an unprivileged user gets
    this line rather than the first tool's failure (``mount --make-shared
    /run/netns failed``) or half a lab.
    """
    missing = missing_capabilities(caps)
    if not missing:
        return
    if os.geteuid() != 0:
        names = " and ".join(CAP_NAMES.get(c, f"capability {c}") for c in caps)
        raise LabError(f"{command} needs root ({names}: {why}); run it with sudo")
    raise LabError(f"{command} needs {' and '.join(missing)} ({why}), which this root "
                   "process lacks (a container without them?)")


def ns_path(ns: str) -> Path:
    """The bind mount that names ``ns``."""
    return NETNS_RUN_DIR / ns


def exists(ns: str) -> bool:
    return ns_path(ns).exists()


def list_namespaces(prefix: str = "") -> list[str]:
    """Named namespaces whose name starts with ``prefix``, sorted."""
    try:
        names = os.listdir(NETNS_RUN_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


@contextmanager
def enter(ns: str) -> Iterator[None]:
    """Run the body with the calling thread inside network namespace ``ns``.

    The thread's original namespace is restored on exit, also when the body
    raises. Nesting works: each level returns to the namespace it came from.
    Never ``await`` inside: other tasks of the loop would run in ``ns`` too.
    """
    try:
        target = os.open(ns_path(ns), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise LabError(f"network namespace {ns!r} does not exist") from None
    try:
        with in_netns(target):
            yield
    finally:
        os.close(target)


def _ns_argv(ns: str, argv: Sequence[str]) -> list[str]:
    if not argv:
        raise LabError("empty command")
    return ["ip", "netns", "exec", ns, *argv]


def run(ns: str, argv: Sequence[str], *, check: bool = True, capture: bool = True,
        input: str | None = None, timeout: float | None = COMMAND_TIMEOUT_S,
        ) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside ``ns`` and wait for it.

    With ``capture`` the output is returned as text; without it the command
    shares our stdin/stdout/stderr (what ``lab exec`` wants). With ``check`` a
    non-zero exit raises :class:`LabError` carrying the command's stderr.
    """
    full = _ns_argv(ns, argv)
    try:
        proc = subprocess.run(full, capture_output=capture, text=True, input=input,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise LabError(f"in {ns}: {' '.join(argv)} did not finish in {timeout} s") from None
    if check and proc.returncode != 0:
        detail = (proc.stderr or "").strip()
        raise LabError(f"in {ns}: {' '.join(argv)} exited {proc.returncode}"
                       + (f": {detail}" if detail else ""))
    return proc


def popen(ns: str, argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
    """Start ``argv`` inside ``ns``; keyword arguments go to :class:`subprocess.Popen`."""
    return subprocess.Popen(_ns_argv(ns, argv), **popen_kwargs)


def _tool_batch(tool: str, lines: Sequence[str], ns: str | None,
                options: Sequence[str] = ()) -> None:
    if not lines:
        return
    argv = [tool, *options] + (["-n", ns] if ns else []) + ["-batch", "-"]
    proc = subprocess.run(argv, input="\n".join(lines) + "\n", capture_output=True,
                          text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        where = f" in {ns}" if ns else ""
        raise LabError(f"{tool} -batch{where} failed: {proc.stderr.strip()}")


def ip_batch(lines: Sequence[str], ns: str | None = None, family: str | None = None) -> None:
    """Apply ``ip`` commands (one per line, without the leading ``ip``) in one process.

    ``family`` (``-4``/``-6``) applies to the whole batch: lines cannot carry
    options. ``ip -batch`` stops at the first failing line; its message names it.
    """
    _tool_batch("ip", lines, ns, [family] if family else ())


def tc_batch(lines: Sequence[str], ns: str | None = None) -> None:
    """Apply ``tc`` commands (one per line, without the leading ``tc``) in one process."""
    _tool_batch("tc", lines, ns)


def _sysctl_path(key: str) -> Path:
    # Dotted keys cannot name interfaces with dots in them; slashes can.
    rel = key if "/" in key else key.replace(".", "/")
    return PROC_SYS / rel


def sysctl(ns: str, key: str, value: str | int | None = None) -> str:
    """Read ``key`` (``net.ipv4.ip_forward``) in ``ns`` and, given ``value``, write it.

    Returns the value found before the write, so callers can restore it.
    /proc/sys/net resolves against the namespace of the thread that opens it,
    hence the ``enter``.
    """
    path = _sysctl_path(key)
    with enter(ns):
        try:
            old = path.read_text().strip()
            if value is not None:
                path.write_text(f"{value}\n")
        except OSError as exc:
            raise LabError(f"in {ns}: sysctl {key}: {exc.strerror or exc}") from None
    return old


def sysctls(ns: str, values: Iterable[tuple[str, str | int]]) -> None:
    """Write several sysctls in ``ns`` with one namespace switch."""
    with enter(ns):
        for key, value in values:
            try:
                _sysctl_path(key).write_text(f"{value}\n")
            except OSError as exc:
                raise LabError(f"in {ns}: sysctl {key}={value}: {exc.strerror or exc}") from None


def parse_netstat(text: str) -> dict[str, dict[str, int]]:
    """Parse /proc/net/netstat (or snmp): pairs of ``Section: names`` / ``Section: values``."""
    sections: dict[str, dict[str, int]] = {}
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for header, values in zip(lines[0::2], lines[1::2]):
        section, _, names = header.partition(":")
        vsection, _, nums = values.partition(":")
        if section != vsection:
            raise LabError(f"netstat: unpaired sections {section!r} and {vsection!r}")
        sections[section] = dict(zip(names.split(), (int(n) for n in nums.split())))
    return sections


def read_netstat(ns: str) -> dict[str, dict[str, int]]:
    """Counters of ``ns`` by section: ``read_netstat(ns)["MPTcpExt"]["MPJoinSynRx"]``."""
    with enter(ns):
        text = (THREAD_PROC_NET / "netstat").read_text()
    return parse_netstat(text)


def parse_net_dev(text: str) -> dict[str, tuple[int, int]]:
    """Parse /proc/net/dev into ``{ifname: (tx_bytes, rx_bytes)}``."""
    counters: dict[str, tuple[int, int]] = {}
    for line in text.splitlines()[2:]:  # two header lines
        name, _, fields = line.partition(":")
        nums = fields.split()
        # Receive: bytes packets errs drop fifo frame compressed multicast; then transmit.
        counters[name.strip()] = (int(nums[8]), int(nums[0]))
    return counters


def link_bytes(ns: str, ifname: str) -> tuple[int, int]:
    """``(tx_bytes, rx_bytes)`` of interface ``ifname`` in ``ns`` (layer-2 bytes)."""
    with enter(ns):
        text = (THREAD_PROC_NET / "dev").read_text()
    try:
        return parse_net_dev(text)[ifname]
    except KeyError:
        raise LabError(f"in {ns}: no interface {ifname!r}") from None


def link_states(ns: str) -> dict[str, str]:
    """``{ifname: operstate}`` in ``ns`` (``UP``, ``DOWN``, ``UNKNOWN`` ...)."""
    proc = subprocess.run(["ip", "-n", ns, "-j", "link", "show"], capture_output=True,
                          text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        raise LabError(f"in {ns}: ip link show: {proc.stderr.strip()}")
    return {link["ifname"]: link.get("operstate", "UNKNOWN") for link in json.loads(proc.stdout)}


def wait_links_up(links: Iterable[tuple[str, str]], timeout: float) -> None:
    """Wait until every ``(ns, ifname)`` has operstate UP.

    Until then its qdisc is not active and the device drops what it is given.
    """
    by_ns: dict[str, set[str]] = {}
    for ns, ifname in links:
        by_ns.setdefault(ns, set()).add(ifname)
    deadline = time.monotonic() + timeout
    while by_ns:
        for ns in list(by_ns):
            states = link_states(ns)
            by_ns[ns] = {i for i in by_ns[ns] if states.get(i) != "UP"}
            if not by_ns[ns]:
                del by_ns[ns]
        if by_ns and time.monotonic() > deadline:
            raise LabError(f"links not up after {timeout} s: {by_ns}")
        if by_ns:
            time.sleep(0.01)


def _ancestors(pid: int) -> set[int]:
    """``pid`` and the processes above it, up to init."""
    chain = set()
    while pid > 1 and pid not in chain:
        chain.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rpartition(")")[2].split()[1])   # field 4: ppid
        except (OSError, ValueError, IndexError):
            break
    return chain


def pids_in(namespaces: Iterable[str]) -> dict[str, list[int]]:
    """Processes whose main thread lives in each namespace (what `ip netns pids` does).

    Our own process and its ancestors are never listed: a thread of ours
    inside a lab namespace, or the shell in the lab that ran ``lab down``,
    must not be killed by it.
    """
    wanted: dict[tuple[int, int], str] = {}
    found: dict[str, list[int]] = {}
    for ns in namespaces:
        try:
            st = os.stat(ns_path(ns))
        except FileNotFoundError:
            continue
        wanted[(st.st_dev, st.st_ino)] = ns
        found[ns] = []
    if not wanted:
        return found
    spared = _ancestors(os.getpid())
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in spared:
            continue
        try:
            st = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:  # gone, a zombie, or a kernel thread
            continue
        ns = wanted.get((st.st_dev, st.st_ino))
        if ns is not None:
            found[ns].append(int(entry.name))
    return found


def terminate_processes(namespaces: Iterable[str], grace: float,
                        spare: Iterable[int] = ()) -> list[int]:
    """SIGTERM every process living in ``namespaces``; wait up to ``grace`` seconds.

    Gives proxies running in a lab the chance to drain and restore what they
    changed before :func:`delete` SIGKILLs them. Returns the pids still there
    when the time is up (:func:`delete` kills them). Processes that appear
    during the wait get their SIGTERM too. ``spare``: pids left alone (the
    lab's delay emulator: its paths carry nothing without it, and the
    proxies draining need them).
    """
    namespaces = list(namespaces)
    spared = set(spare)
    deadline = time.monotonic() + (grace if grace > 0 else 0.0)  # NaN: no wait
    signalled: set[int] = set()
    while True:
        pids = [pid for group in pids_in(namespaces).values() for pid in group
                if pid not in spared]
        for pid in pids:
            if pid in signalled:
                continue
            signalled.add(pid)
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if not pids or time.monotonic() >= deadline:
            return pids
        time.sleep(POLL_INTERVAL_S)


def kill_processes(namespaces: Iterable[str]) -> list[int]:
    """SIGKILL every process living in ``namespaces``; wait until they are gone.

    Returns the pids still there after :data:`KILL_WAIT_S` (normally none).
    Deleting a namespace only removes its name: processes inside would keep
    it (and its veths) alive.
    """
    namespaces = list(namespaces)
    deadline = time.monotonic() + KILL_WAIT_S
    while True:
        pids = [pid for group in pids_in(namespaces).values() for pid in group]
        if not pids or time.monotonic() > deadline:
            return pids
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def delete(namespaces: Iterable[str], grace: float = 0.0) -> None:
    """Kill what runs inside ``namespaces``, then delete them. Missing ones are skipped.

    With ``grace`` the processes first get SIGTERM and that many seconds to
    exit (:func:`terminate_processes`); SIGKILL takes the rest.
    """
    present = [ns for ns in namespaces if exists(ns)]
    if not present:
        return
    if grace > 0:
        terminate_processes(present, grace)
    survivors = kill_processes(present)
    # -force: one failing delete must not keep the others alive.
    proc = subprocess.run(["ip", "-force", "-batch", "-"],
                          input="".join(f"netns delete {ns}\n" for ns in present),
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                          check=False)
    left = [ns for ns in present if exists(ns)]
    if left:
        raise LabError(f"could not delete namespaces {left}: {proc.stderr.strip()}")
    if survivors:
        raise LabError(f"processes {survivors} did not die; namespaces {present} "
                       "are unnamed but alive until they do")
