"""DSS checksum cost: ``mptcp-proxy forward`` with ``--dss-checksum on`` vs. ``off``, one run.

    .venv/bin/python benchmarks/checksum_cost.py [--quick] [--repeat N] [--duration S]
        [--scenarios mptcp,tcp,direct] [--rate-mbit MBIT]

What ``--dss-checksum on`` costs (the default is off: README, "Data
integrity"). A proxy with it asks for MPTCP DSS checksums (RFC 8684 §3.3)
on every MPTCP connection by holding the sysctl
``net.mptcp.checksum_enabled=1`` in its network namespace while it runs. The
sysctl is namespace-wide, so "on" and "off" cannot run side by side: each
block of runs starts the proxies with one setting and stops them, and the
settings alternate block by block (on, off; off, on; ...). The lab has one
path, unshaped unless ``--rate-mbit``, and is built with ``Lab.create(...,
dss_checksum=False)``: its end hosts do not ask for checksums, so only the
proxy's setting decides.

Scenarios (all clients MPTCP, one process per load generator, ``_load.py``):

  (b') mptcp   client -> ``forward --upstream mptcp`` -> MPTCP server: with
               "on" both legs are checksummed (the proxy asks on each)
  (b)  tcp     client -> ``forward --upstream tcp`` -> TCP server: "on"
               checksums the client leg only
  (a)  direct  client -> server, no proxy: ``checksum_enabled`` set to 1 or 0
               in the client and server namespaces, i.e. the kernel's own cost
               of checksumming one MPTCP connection (a baseline)

Figures per scenario and setting: bulk Gbit/s, one stream, upload and
download (repeated; median [min-max]); proxy CPU seconds per GB relayed in
each direction (utime+stime from /proc/PID/stat of the proxy, over the run);
receiver CPU seconds per GB (the receiving load generator's own utime+stime:
its kernel verifies the checksum, though on veth much of that runs in
softirq in the sender's context); connections/s at c=64 (from 2 client
processes; each connection: connect, receive 1 KiB, close) with latency
p50/p99 and proxy CPU per connection; on/off ratios of the medians. The
first block of each setting also transfers a fixed volume each way and
compares SHA-256s. Raw results: ``bench-results/checksum-cost-<ts>.json``.

Proof that a setting took effect, on the connections measured: during every
bulk and c=64 run a watcher thread borrows the sockets of the proxy (and of
the load-generating clients) with pidfd_getfd(2) and reads MPTCP_INFO
(SOL_MPTCP 284, MPTCP_INFO 1; ``mptcpi_csum_enabled`` is byte 42 of struct
mptcp_info) of connected ones: each checked MPTCP socket (client sockets,
the proxy's client legs, its MPTCP upstream legs) must say 1 in "on" runs
and 0 in "off" runs, and ``--upstream tcp`` legs must be plain TCP. The
namespaces' ``checksum_enabled`` values are read back at the start of each
block and after every run (the proxy ns: 1 while "on" proxies run, 0 again once they have
stopped), and ``MPTcpExt:DataCsumErr`` must stay 0 in every namespace. Any
of these failing, a wrong SHA-256 or a non-MPTCP client socket stops the
benchmark with a non-zero exit status (partial results are still written);
speed itself is never pass/fail.

Noise: the machine has 2 cores shared by the proxy, the load generators, the
kernel's softirq work and whatever else runs here (other labs); MPTCP bulk
on this kernel also stalls in bursts until an MPTCP-level retransmission
(see ``relay.py``), so single runs swing by tens of percent. The table prints
min-max, the machine's busy fraction and the runs with MPTCP retransmits
next to the medians, and "paired": the median of on/off ratios of blocks
run next to each other, which cancels slow drift in the machine's load.
Read an on/off ratio within about +-20% (see the control below) as "no
measurable difference" unless the ranges separate.

Measured here (Linux 6.18, 2 cores, other labs running alongside; runs
checksum-cost-20261208-042104 and -042541 unshaped, -042908 with
``--rate-mbit 5000``):
- Unshaped, bulk through the proxy is bound by MPTCP stalls (0.2-1.3 Gbit/s,
  every run with MPTCP-level retransmits, the proxy at 2-15% of a core): the
  on/off throughput ratios (0.7-2.1) have no consistent sign; checksums'
  effect on throughput is below that noise. At 5 Gbit/s (tbf), (a) and (b)
  run at the link's rate both ways with and without checksums (on/off
  0.99-1.07); (b') stalls there too.
- Proxy CPU per GB relayed: on/off medians 1.06-1.66 unshaped (paired
  1.17-1.41), both upstreams and directions. At 5 Gbit/s, (b): 1.22 (paired
  1.22-1.30) for downloads, where the proxy sends on the checksummed leg
  and computes the checksums, 0.99 for uploads, where it receives on it
  (verification runs in softirq, on veth mostly in the sender's context).
- The receiving load generator's CPU per GB: on/off 1.0-1.6. Control: in
  (b) uploads the server receives plain TCP, which no setting touches, and
  its ratio is 0.93-1.24: per-run CPU figures here are good to ~+-20%.
- c=64 connections/s: on/off medians (b') 0.93-1.04, (b) 0.67-0.72 (paired
  0.72-0.90), (a) 0.80-0.93 (paired 0.89-0.98); proxy CPU per connection
  1.00-1.10 (b'), 1.03-1.38 (b).
- Every run: checksum state as intended on every socket checked,
  DataCsumErr 0, all SHA-256s right. Whole-machine CPU per GB is in the JSON
  (``machine_s_per_gb_*``) but not the table: other tenants dominate it.

Reuses ``relay.py``'s harness (the lab, processes, release barrier,
bulk/connrate helpers, ports, CPU readings). Added here: proxies started and
stopped per block, and the socket watcher.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from mptcp_proxy.lab import Lab  # noqa: E402
from relay import (  # noqa: E402
    CLI, GB, PROXY_PORT, SCENARIOS, SERVER_CMD, SERVER_PORT, BenchError, Procs,
    Scenario, Setup, _format, begin_run, bulk, connrate, load_argv, print_footer, progress,
    run_in_lab, run_meta, terminate, wait_proxy,
)

RESULTS_DIR = ROOT / "bench-results"
SYSCTL = "net.mptcp.checksum_enabled"
SOL_MPTCP = 284
MPTCP_INFO = 1
CSUM_OFFSET = 42            # mptcpi_csum_enabled in struct mptcp_info (Linux 5.14+)
IPPROTO_MPTCP = 262
SYS_PIDFD_GETFD = 438       # the same number on every architecture
SETTINGS = ("on", "off")
BY_KEY = {s.key: s for s in SCENARIOS}
ORDER = ("mptcp", "tcp", "direct")   # table order: both legs checksummed first
LABEL = {"mptcp": "(b') forward --upstream mptcp -> MPTCP server (on: both legs)",
         "tcp": "(b) forward --upstream tcp -> TCP server (on: client leg)",
         "direct": "(a) direct MPTCP, sysctl in client+server ns (kernel baseline)"}
# Counters read in every namespace around every block and the whole run
# (relay.py's kernel_counters, summed over namespaces, around every run).
COUNTERS = (("MPTcpExt", "DataCsumErr"), ("MPTcpExt", "MPTCPRetrans"),
            ("MPTcpExt", "DuplicateData"))

_libc = ctypes.CDLL(None, use_errno=True)


# -- reading another process's sockets ---------------------------------------------------

def borrow_fd(pidfd: int, fd: int) -> int:
    """A duplicate of ``fd`` of the process behind ``pidfd`` (pidfd_getfd(2))."""
    r = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return r


def connected_sockets(pid: int) -> list[dict]:
    """Connected TCP/MPTCP sockets of ``pid``: ports, protocol and, for MPTCP,
    ``mptcpi_csum_enabled`` (None if MPTCP_INFO is refused: a fallback)."""
    out: list[dict] = []
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return out
    try:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            return out
        for name in names:
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
                fd = borrow_fd(pidfd, int(name))
            except (OSError, ValueError):
                continue
            try:
                sock = socket.socket(fileno=fd)
            except OSError:
                os.close(fd)
                continue
            try:
                if sock.family not in (socket.AF_INET, socket.AF_INET6) \
                        or sock.type != socket.SOCK_STREAM:
                    continue
                try:
                    peer = sock.getpeername()   # ENOTCONN: listening, connecting, closed
                except OSError:
                    continue
                proto = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
                csum = None
                if proto == IPPROTO_MPTCP:
                    try:
                        info = sock.getsockopt(SOL_MPTCP, MPTCP_INFO, 256)
                        csum = info[CSUM_OFFSET] if len(info) > CSUM_OFFSET else None
                    except OSError:
                        pass
                out.append({"local_port": sock.getsockname()[1], "peer_port": peer[1],
                            "proto": "mptcp" if proto == IPPROTO_MPTCP else "tcp",
                            "csum": csum})
            except OSError:
                continue
            finally:
                sock.close()   # our duplicate only
    finally:
        os.close(pidfd)
    return out


class Watch:
    """During one run, sample the sockets of some processes until every role
    (a socket predicate) has matched at least one connected socket."""

    def __init__(self, pids: Callable[[], list[int]],
                 roles: dict[str, Callable[[int, dict], bool]]) -> None:
        self.pids = pids
        self.roles = roles
        self.sample: dict[str, list[dict]] | None = None
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Watch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.polls += 1
            found: dict[str, list[dict]] = {r: [] for r in self.roles}
            for pid in self.pids():
                for s in connected_sockets(pid):
                    for role, match in self.roles.items():
                        if match(pid, s):
                            found[role].append(s)
            if all(found.values()):
                self.sample = found
                return
            self._stop.wait(0.02)


def judge(watch: Watch, setting: str, upstream: str | None, what: str) -> dict:
    """Did ``setting`` take effect on the sockets the watcher saw? Raises if not."""
    if watch.sample is None:
        raise BenchError(f"{what}: the watcher saw no connected socket for every role "
                         f"({', '.join(watch.roles)}) in {watch.polls} polls: checksum "
                         "state unverified")
    want = 1 if setting == "on" else 0
    checked = 0
    for role, socks in watch.sample.items():
        for s in socks:
            if role == "upstream" and upstream == "tcp":
                if s["proto"] != "tcp":
                    raise BenchError(f"{what}: --upstream tcp leg is {s}")
                continue
            if s["proto"] != "mptcp" or s["csum"] != want:
                raise BenchError(f"{what}: {role} socket {s}: expected MPTCP with "
                                 f"mptcpi_csum_enabled={want} (--dss-checksum {setting})")
            checked += 1
    return {"mptcp_sockets_checked": checked, "csum": want, "polls": watch.polls,
            "roles": {r: len(v) for r, v in watch.sample.items()}}


# -- the lab --------------------------------------------------------------------------------

def counters(lab: Lab) -> dict[str, int]:
    """COUNTERS per namespace role and summed ("all.<section>.<name>")."""
    out: dict[str, int] = {}
    for node in lab.nodes:
        stats = node.netstat()
        for sec, name in COUNTERS:
            v = stats.get(sec, {}).get(name, 0)
            out[f"{node.role}.{sec}.{name}"] = v
            out[f"all.{sec}.{name}"] = out.get(f"all.{sec}.{name}", 0) + v
    return out


def check_csum_errors(before: dict[str, int], after: dict[str, int], what: str) -> None:
    errs = {k: after[k] - before[k] for k in before
            if k.endswith("DataCsumErr") and after[k] != before[k]}
    if errs:
        raise BenchError(f"{what}: MPTcpExt:DataCsumErr grew: {errs} (a DSS checksum "
                         "failed its check)")


class Bench:
    def __init__(self, lab: Lab, procs: Procs, args: argparse.Namespace) -> None:
        self.lab = lab
        self.procs = procs
        self.args = args
        self.setup = Setup(lab, procs)
        self.argv: dict[str, list[str]] = {}

    # sysctls
    def sysctls(self) -> dict[str, str]:
        return {n.role: n.sysctl(SYSCTL) for n in self.lab.nodes}

    def expect_sysctls(self, want: dict[str, str], what: str) -> None:
        got = self.sysctls()
        if got != want:
            raise BenchError(f"{what}: {SYSCTL} is {got}, expected {want}")

    def set_hosts(self, value: int) -> None:
        for node in (self.lab.client, self.lab.server):
            node.sysctl(SYSCTL, value)

    # processes
    def start_servers(self) -> None:
        for (service, proto), port in SERVER_PORT.items():
            if service == "idle":
                continue
            p = self.procs.start(self.lab.server,
                                 load_argv(SERVER_CMD[service], "--listen", f"0.0.0.0:{port}",
                                           "--proto", proto), f"server {service} {proto}")
            p.expect("ready", 15)

    def start_proxies(self, setting: str, upstreams: list[str]) -> None:
        started = []
        for (service, upstream), port in PROXY_PORT.items():
            if service == "idle" or upstream not in upstreams:
                continue
            to_proto = "tcp" if upstream == "tcp" else "mptcp"
            argv = [CLI, "forward", "--listen", f"0.0.0.0:{port}",
                    "--to", f"{self.lab.server_addr}:{SERVER_PORT[(service, to_proto)]}",
                    "--upstream", upstream, "--no-conn-log", "--dss-checksum", setting]
            self.argv[f"{service} {upstream} {setting}"] = argv
            p = self.procs.start(self.lab.proxy, argv, f"proxy {service} {upstream} {setting}")
            self.setup.proxies[(service, upstream)] = p
            started.append((p, port))
        for p, port in started:
            wait_proxy(p, port)

    def stop_proxies(self) -> None:
        live = list(self.setup.proxies.values())
        terminate(live, 10.0)   # SIGTERM: each proxy gives its sysctl back
        for p in live:
            if p.popen.returncode not in (0, None) and p.popen.returncode != -15:
                print(f"note: {p.name} exited {p.popen.returncode}", file=sys.stderr)
            if p in self.procs.live:
                self.procs.live.remove(p)
        self.setup.proxies.clear()

    def client_pids(self, prefix: str) -> Callable[[], list[int]]:
        return lambda: [p.pid for p in list(self.procs.live) if p.name.startswith(prefix)]

    # runs
    def watch(self, sc: Scenario, service: str, client_prefix: str | None) -> Watch:
        """Roles: the clients' sockets toward their target; for a proxy, its
        client legs (accepted on its port) and upstream legs (to the server)."""
        target_port = int(self.setup.target(sc, service).rpartition(":")[2])
        roles: dict[str, Callable[[int, dict], bool]] = {}
        client_pids = self.client_pids(client_prefix) if client_prefix else (lambda: [])
        proxy = self.setup.proxy(sc, service)
        if client_prefix:
            roles["client"] = lambda pid, s: pid != (proxy.pid if proxy else -1) \
                and s["peer_port"] == target_port
        if proxy is None:
            return Watch(client_pids, roles)
        srv_port = SERVER_PORT[(service, "tcp" if sc.upstream == "tcp" else "mptcp")]
        roles["proxy client leg"] = lambda pid, s: pid == proxy.pid \
            and s["local_port"] == target_port
        roles["upstream"] = lambda pid, s: pid == proxy.pid and s["peer_port"] == srv_port
        return Watch(lambda: [proxy.pid, *client_pids()], roles)

    def bulk(self, sc: Scenario, setting: str, op: str, duration: float,
             volume: int = 0) -> dict:
        # relay.bulk names its clients "bulk <key> <op> x1 #0".
        w = self.watch(sc, "bulk", f"bulk {sc.key} {op} ")
        with w:
            r = bulk(self.setup, sc, op, 1, duration, volume=volume, seed=11)
        what = f"bulk {sc.key} {op} --dss-checksum {setting}"
        r["csum_check"] = judge(w, setting, sc.upstream, what)
        if r["client_mptcp"] != r["clients"]:
            raise BenchError(f"{what}: a client socket is not MPTCP")
        if op == "up" and sc.upstream != "tcp" and r["server_mptcp"] != r["clients"]:
            raise BenchError(f"{what}: a server socket is not MPTCP")
        if volume and not r["sha_ok"]:
            raise BenchError(f"{what}: SHA-256 mismatch: got {r['sha256']}, "
                             f"expected {r['sha_expected']}")
        return r

    def conn(self, sc: Scenario, setting: str, duration: float) -> dict:
        # Direct: watch the connrate clients' in-flight sockets (relay.connrate
        # names them "conn <key> c=64 #i"); via a proxy: its two legs.
        w = self.watch(sc, "conn", f"conn {sc.key} c=64 " if sc.upstream is None else None)
        with w:
            r = connrate(self.setup, sc, 64, duration, self.args.conn_procs)
        what = f"conn {sc.key} c=64 --dss-checksum {setting}"
        r["csum_check"] = judge(w, setting, sc.upstream, what)
        if r["client_mptcp"] != r["client_sockets"]:
            raise BenchError(f"{what}: {r['client_sockets'] - r['client_mptcp']} client "
                             "sockets not MPTCP")
        r.pop("lat_us", None)
        return r


# -- analysis ---------------------------------------------------------------------------------

def stat(runs: list[dict], fn: Callable[[dict], float | None]) -> dict | None:
    """Median, min, max of ``fn`` over ``runs``, and the values by block (rep)."""
    by_rep = {r["rep"]: v for r in runs if (v := fn(r)) is not None}
    vals = list(by_rep.values())
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "runs": vals, "by_rep": by_rep}


def per_gb(cpu: str) -> Callable[[dict], float | None]:
    return lambda r: r[cpu] / (r["bytes"] / GB) if r["bytes"] else None


def machine_cpu(r: dict) -> float:
    """CPU seconds the whole machine spent over a run: every process, softirq
    (where a receiver's checksum is verified), and whatever else runs here
    (other labs: this figure is only as clean as the machine was quiet)."""
    return r["machine_busy"] * r["wall"] * (os.cpu_count() or 1)


def analyze(raw: dict, keys: list[str]) -> dict:
    res: dict = {}
    for k in keys:
        for setting in SETTINGS:
            e: dict = {}
            bulk_runs = [r for r in raw["bulk"] if r["scenario"] == k and r["setting"] == setting]
            for op in ("up", "down"):
                runs = [r for r in bulk_runs if r["op"] == op]
                e[f"gbps_{op}"] = stat(runs, lambda r: r["gbps"])
                if k != "direct":
                    e[f"proxy_s_per_gb_{op}"] = stat(runs, per_gb("proxy_cpu"))
                    e[f"proxy_util_{op}"] = stat(runs, lambda r: r["proxy_cpu"] / r["wall"])
                e[f"recv_s_per_gb_{op}"] = stat(runs, per_gb("recv_cpu"))
                e[f"machine_busy_{op}"] = stat(runs, lambda r: r["machine_busy"])
                e[f"machine_s_per_gb_{op}"] = stat(
                    runs, lambda r: machine_cpu(r) / (r["bytes"] / GB) if r["bytes"] else None)
            e["rtx_runs"] = [sum(1 for r in bulk_runs if r["counters"]["MPTcpExt.MPTCPRetrans"]),
                             len(bulk_runs)]
            conn = [r for r in raw["conn"] if r["scenario"] == k and r["setting"] == setting]
            e["conn_rate"] = stat(conn, lambda r: r["rate"])
            e["conn_p50_ms"] = stat(conn, lambda r: r["p50_ms"])
            e["conn_p99_ms"] = stat(conn, lambda r: r["p99_ms"])
            e["conn_errors"] = sum(r["errors"] for r in conn)
            e["conn_machine_busy"] = stat(conn, lambda r: r["machine_busy"])
            if k != "direct":
                e["proxy_us_per_conn"] = stat(conn, lambda r: r["proxy_cpu"] / r["completed"]
                                              * 1e6 if r["completed"] else None)
            e["machine_us_per_conn"] = stat(conn, lambda r: machine_cpu(r) / r["completed"]
                                            * 1e6 if r["completed"] else None)
            integ = [r for r in raw["integrity"]
                     if r["scenario"] == k and r["setting"] == setting]
            e["integrity"] = {r["op"]: {"sha_ok": r["sha_ok"], "bytes": r["bytes"],
                                        "gbps": r["gbps"]} for r in integ}
            checks = [r["csum_check"] for r in bulk_runs + conn + integ]
            e["csum_runs_checked"] = len(checks)
            e["csum_sockets_checked"] = sum(c["mptcp_sockets_checked"] for c in checks)
            res.setdefault(k, {})[setting] = e
        res[k]["paired_on_off"] = {
            key: paired(res[k]["on"].get(key), res[k]["off"].get(key))
            for key, v in res[k]["on"].items() if isinstance(v, dict) and "by_rep" in v}
    return res


def paired(on: dict | None, off: dict | None) -> dict | None:
    """on/off of the blocks run next to each other (same rep): drift of the
    machine's load between blocks cancels out better than in the medians."""
    if not on or not off:
        return None
    ratios = [on["by_rep"][rep] / off["by_rep"][rep] for rep in on["by_rep"]
              if rep in off["by_rep"] and off["by_rep"][rep]]
    if not ratios:
        return None
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
            "runs": ratios}


def cell(s: dict | None, fmt: str = ".2f", spread: bool = True) -> str:
    if not s:
        return "-"
    text = format(s["median"], fmt)
    if spread and len(s["runs"]) > 1:
        text += f" [{format(s['min'], fmt)}-{format(s['max'], fmt)}]"
    return text


def ratio(on: dict | None, off: dict | None) -> str:
    if not on or not off or not off["median"]:
        return "-"
    return f"{on['median'] / off['median']:.2f}"


def render_table(res: dict, keys: list[str], integrity_mib: int) -> str:
    rows: list[tuple[str, ...]] = [("figure", "on  med [min-max]", "off  med [min-max]",
                                    "on/off", "paired [min-max]")]
    for k in keys:
        on, off = res[k]["on"], res[k]["off"]
        rows.append((LABEL[k], "", "", "", ""))

        def add(label: str, key: str, fmt: str = ".2f") -> None:
            rows.append((f"  {label}", cell(on.get(key), fmt), cell(off.get(key), fmt),
                         ratio(on.get(key), off.get(key)),
                         cell(res[k]["paired_on_off"].get(key), ".2f")))

        add("bulk upload c->s Gbit/s", "gbps_up")
        add("bulk download s->c Gbit/s", "gbps_down")
        if k != "direct":
            add("proxy CPU s/GB upload", "proxy_s_per_gb_up", ".3f")
            add("proxy CPU s/GB download", "proxy_s_per_gb_down", ".3f")
            add("proxy CPU use upload", "proxy_util_up", ".0%")
            add("proxy CPU use download", "proxy_util_down", ".0%")
        add("receiver CPU s/GB upload (server)", "recv_s_per_gb_up", ".3f")
        add("receiver CPU s/GB download (client)", "recv_s_per_gb_down", ".3f")
        add("connections/s c=64", "conn_rate", ".0f")
        add("  latency p50 ms c=64", "conn_p50_ms")
        add("  latency p99 ms c=64", "conn_p99_ms")
        if k != "direct":
            add("  proxy CPU us/conn c=64", "proxy_us_per_conn", ".0f")
        add("  machine CPU us/conn c=64 (all)", "machine_us_per_conn", ".0f")
        rows.append(("  machine busy bulk up / down / conn",
                     *(" / ".join(f"{e[x]['median']:.0%}" if e[x] else "-"
                                  for x in ("machine_busy_up", "machine_busy_down",
                                            "conn_machine_busy")) for e in (on, off)), "", ""))
        rows.append(("  bulk runs with MPTCP-level rtx",
                     *(f"{e['rtx_runs'][0]}/{e['rtx_runs'][1]}" for e in (on, off)), "", ""))
        rows.append((f"  SHA-256 {integrity_mib} MiB up / down",
                     *(" / ".join(("ok" if e["integrity"][op]["sha_ok"] else "FAIL")
                                  if op in e["integrity"] else "-" for op in ("up", "down"))
                       for e in (on, off)), "", ""))
        rows.append(("  csum_enabled seen: MPTCP sockets (runs)",
                     *(f"={1 if s == 'on' else 0}: {res[k][s]['csum_sockets_checked']} "
                       f"({res[k][s]['csum_runs_checked']})" for s in SETTINGS), "", ""))
        rows.append(("  conn-rate errors", *(str(e["conn_errors"]) for e in (on, off)), "", ""))
    return _format(rows)


# -- main -----------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 s runs, 1 repeat, 32 MiB hashes")
    ap.add_argument("--repeat", type=int, default=None, metavar="N",
                    help="blocks per setting, on and off alternating (default 3, --quick 1)")
    ap.add_argument("--duration", type=float, default=None, metavar="S",
                    help="seconds per run (default 3, --quick 1)")
    ap.add_argument("--scenarios", default="mptcp,tcp,direct",
                    help="comma-separated subset of mptcp,tcp,direct (default all)")
    ap.add_argument("--conn-procs", type=int, default=2, metavar="N",
                    help="client processes sharing the c=64 load (default 2)")
    ap.add_argument("--integrity-mib", type=int, default=None, metavar="MIB",
                    help="volume of the hashed transfers (default 128, --quick 32)")
    ap.add_argument("--rate-mbit", type=float, default=None, metavar="MBIT",
                    help="shape the lab's path (tbf) to this rate; default unshaped, as "
                         "the figures above")
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = ap.parse_args()
    duration = args.duration or (1.0 if args.quick else 3.0)
    repeat = args.repeat or (1 if args.quick else 3)
    integrity_mib = args.integrity_mib or (32 if args.quick else 128)
    keys = [k for k in ORDER if k in args.scenarios.split(",")]
    if not keys:
        ap.error("--scenarios: nothing to run")

    if os.geteuid() != 0:
        print("checksum_cost.py needs root (network namespaces)", file=sys.stderr)
        return 2
    busy_before, started, stamp = begin_run()
    meta = run_meta(stamp, machine_busy_before=busy_before, duration=duration, repeat=repeat,
                    quick=args.quick, scenarios=keys, conn_procs_c64=args.conn_procs,
                    integrity_bytes=integrity_mib << 20, python=platform.python_version(),
                    lab_dss_checksum=False, rate_mbit=args.rate_mbit)
    if busy_before > 0.10:
        print(f"warning: the machine was {busy_before:.0%} busy before the run (other "
              f"labs: {', '.join(meta['other_labs']) or 'none'}): figures will be low and "
              "noisy", file=sys.stderr)
    raw: dict = {"bulk": [], "integrity": [], "conn": [], "blocks": []}
    say = progress(started)
    proxy_keys = [k for k in keys if k != "direct"]
    upstreams = [BY_KEY[k].upstream for k in proxy_keys]

    def measure(lab: Lab, procs: Procs) -> None:
        meta["lab"] = lab.name
        bench = Bench(lab, procs, args)
        off_all = {"client": "0", "proxy": "0", "server": "0"}
        bench.expect_sysctls(off_all, "lab built with dss_checksum=False")
        bench.start_servers()
        c_start = counters(lab)
        say(f"lab {lab.name} up, servers running; {SYSCTL} {bench.sysctls()}")

        def runs(k: str, setting: str, rep: int, want: dict[str, str]) -> None:
            sc = BY_KEY[k]

            def record(kind: str, r: dict) -> dict:
                bench.expect_sysctls(want, f"after {kind} {k} {setting}")
                r.update(setting=setting, rep=rep)
                raw[kind].append(r)
                return r

            if rep == 0:   # the first block of each setting: hashed transfers
                for op in ("up", "down"):
                    r = record("integrity", bench.bulk(sc, setting, op, duration,
                                                       volume=integrity_mib << 20))
                    say(f"  integrity {k:6s} {setting:3s} {op:4s} sha ok "
                        f"{r['gbps']:.2f} Gbit/s, csum={r['csum_check']['csum']} on "
                        f"{r['csum_check']['mptcp_sockets_checked']} sockets")
            for op in ("up", "down"):
                r = record("bulk", bench.bulk(sc, setting, op, duration))
                say(f"  bulk {k:6s} {setting:3s} {op:4s} {r['gbps']:6.2f} Gbit/s proxy cpu "
                    f"{r['proxy_cpu'] / r['wall']:4.0%} machine {r['machine_busy']:4.0%} "
                    f"mptcp-rtx {r['counters']['MPTcpExt.MPTCPRetrans']} "
                    f"csum={r['csum_check']['csum']}x{r['csum_check']['mptcp_sockets_checked']}")
            r = record("conn", bench.conn(sc, setting, duration))
            say(f"  conn {k:6s} {setting:3s} c=64 {r['rate']:7.0f}/s p50 {r['p50_ms']:.2f} "
                f"p99 {r['p99_ms']:.2f} ms errors {r['errors']} proxy cpu "
                f"{r['proxy_cpu'] / r['wall']:.0%} machine {r['machine_busy']:.0%} "
                f"csum={r['csum_check']['csum']}x{r['csum_check']['mptcp_sockets_checked']}")

        for rep in range(repeat):
            order = SETTINGS if rep % 2 == 0 else tuple(reversed(SETTINGS))
            for setting in order:
                v = "1" if setting == "on" else "0"
                block = {"rep": rep, "setting": setting, "loadavg": open("/proc/loadavg")
                         .read().split()[:3], "counters_before": counters(lab)}
                if proxy_keys:
                    bench.start_proxies(setting, upstreams)
                    want = {"client": "0", "proxy": v, "server": "0"}
                    bench.expect_sysctls(want, f"proxies started with --dss-checksum {setting}")
                    say(f"rep {rep} {setting}: proxies up (up={','.join(upstreams)}), "
                        f"{SYSCTL} {bench.sysctls()}")
                    for k in proxy_keys:
                        runs(k, setting, rep, want)
                    bench.stop_proxies()
                    bench.expect_sysctls(off_all, f"proxies with --dss-checksum {setting} "
                                         "stopped (the sysctl must be given back)")
                if "direct" in keys:
                    bench.set_hosts(int(v))
                    want = {"client": v, "proxy": "0", "server": v}
                    try:
                        bench.expect_sysctls(want, "direct: hosts set")
                        say(f"rep {rep} {setting}: direct, {SYSCTL} {bench.sysctls()}")
                        runs("direct", setting, rep, want)
                    finally:
                        bench.set_hosts(0)
                block["counters_after"] = counters(lab)
                raw["blocks"].append(block)
                check_csum_errors(block["counters_before"], block["counters_after"],
                                  f"rep {rep} {setting}")
        c_end = counters(lab)
        meta["counters_delta"] = {k: c_end[k] - c_start[k] for k in c_start}
        check_csum_errors(c_start, c_end, "the whole run")
        meta["argv"] = bench.argv

    failure = run_in_lab("checksum-cost-", measure, rate_mbit=args.rate_mbit)
    meta["seconds"] = time.time() - started
    meta["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"checksum-cost-{stamp}.json"
    if failure:
        path.write_text(json.dumps({"meta": meta, "failed": failure, "raw": raw},
                                   indent=1) + "\n")
        print(f"partial results: {path}", file=sys.stderr)
        return 1
    res = analyze(raw, keys)
    path.write_text(json.dumps({"meta": meta, "summary": res, "raw": raw}, indent=1) + "\n")

    path_word = "unshaped" if args.rate_mbit is None else f"{args.rate_mbit:g} Mbit/s"
    print()
    print(f"mptcp-proxy DSS checksum cost {stamp}: lab {meta['lab']} (end hosts do not ask "
          f"for checksums), 1 {path_word} path, Linux {meta['kernel']}, {meta['cpus']} CPUs; "
          f"{duration:g} s runs, {repeat} block(s) per setting, on/off alternating; bulk 1 "
          f"stream; c=64 from {args.conn_procs} client processes")
    print("on = forward --dss-checksum on (proxy ns net.mptcp.checksum_enabled=1) or, for "
          "(a), the sysctl set in client+server ns; off = not. Ratios: on/off of medians.")
    print()
    print(render_table(res, keys, integrity_mib))
    print()
    print(f"MPTcpExt deltas over the run (all ns): DataCsumErr "
          f"{meta['counters_delta']['all.MPTcpExt.DataCsumErr']}, MPTCPRetrans "
          f"{meta['counters_delta']['all.MPTcpExt.MPTCPRetrans']}, DuplicateData "
          f"{meta['counters_delta']['all.MPTcpExt.DuplicateData']}; load average after "
          f"{' '.join(meta['loadavg_after'])}")
    print_footer(meta, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
