"""Relay benchmark: direct MPTCP vs. ``mptcp-proxy forward``, side by side, one run.

    .venv/bin/python benchmarks/relay.py [--quick] [--repeat N]

Builds a lab with one unshaped path and measures, in the same run:

  (a)  direct   client MPTCP -> server MPTCP listener (the proxy ns only routes)
  (b)  tcp      client MPTCP -> ``mptcp-proxy forward --upstream tcp`` -> TCP-only server
  (b') mptcp    client MPTCP -> ``mptcp-proxy forward --upstream mptcp`` -> MPTCP server

Figures: bulk Gbit/s (1 stream, repeated; 8 streams) both ways; connections/s at
concurrency 1 and 64 with connect-to-last-byte latency; proxy CPU seconds per GB
relayed; proxy PSS per idle relayed connection. Ratios against (a) and the
project's targets are printed; results go to ``bench-results/relay-<ts>.json``.
A control pair with a plain TCP client, (c) direct and (d) through the proxy,
shows the relay's own cost apart from MPTCP's.

Measured on this machine (Linux 6.18, 2 cores): MPTCP bulk transfers stall in
bursts: the receiver holds every byte the sender wrote (msk ``rcv_nxt`` equals
the sender's ``write_seq``) while the sender's ``snd_una`` lags by a full 4 MB
send buffer, until an MPTCP-level retransmission (``MPTcpExt:MPTCPRetrans``,
always matched by ``DuplicateData`` at the receiver) gets things moving. It is
worst when an MPTCP endpoint also waits on another socket (any relay, even a
trivial blocking one) or shares the CPUs with other work (a CPU hog next to a
direct transfer); plain TCP in the same places is unaffected. Each bulk run
records those counters and the table prints them next to the throughput.
Figures, never pass/fail: the exit status is 0 unless the benchmark itself broke
(a transfer failed its SHA-256, or MPTCP was not used where claimed).

Design rules:
- Every load generator is its own process (``benchmarks/_load.py``), started
  in the lab namespaces; the proxy is the real CLI, one process per service
  (bulk, connection rate, idle) and upstream mode, so each figure reads the
  one process that did the work.
- Scenarios are interleaved run by run (a, b, b', a, b, b', ...) so a slow
  moment of this shared 2-core machine hits all three alike.
- Clients connect first and start together on a "go" line: process start-up
  never counts. Throughput is bytes counted by the receivers over the span
  from the first byte to the last, across all streams of a run.
- Everything started here is killed in ``finally`` (process groups by pid);
  the lab's context manager removes the namespaces.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from mptcp_proxy.lab import Lab, PathSpec  # noqa: E402

LOAD = str(ROOT / "benchmarks" / "_load.py")
VENV_BIN = ROOT / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
CLI = str(VENV_BIN / "mptcp-proxy")
RESULTS_DIR = ROOT / "bench-results"

CLK_TCK = os.sysconf("SC_CLK_TCK")
GB = 1e9

# Targets (see the task brief / ARCHITECTURE): ratio of the proxy to direct MPTCP.
TARGET_BULK = 0.66
TARGET_CONN64 = 0.5
TARGET_PSS_KIB = 3.0

# Ports. Servers (server ns): one per service and protocol. Proxies (proxy ns):
# one per service and upstream mode.
SERVICES = ("bulk", "conn", "idle")
SERVER_PORT = {("bulk", "mptcp"): 5001, ("bulk", "tcp"): 5002,
               ("conn", "mptcp"): 5101, ("conn", "tcp"): 5102,
               ("idle", "mptcp"): 5201, ("idle", "tcp"): 5202}
PROXY_PORT = {("bulk", "tcp"): 6001, ("bulk", "mptcp"): 6002,
              ("conn", "tcp"): 6101, ("conn", "mptcp"): 6102,
              ("idle", "tcp"): 6201, ("idle", "mptcp"): 6202}
SERVER_CMD = {"bulk": "bulk-server", "conn": "conn-server", "idle": "idle-server"}


@dataclass(frozen=True)
class Scenario:
    key: str                 # "direct", "tcp", "mptcp"; controls: "tcp-direct", "tcp-proxy"
    label: str
    upstream: str | None     # proxy --upstream, None for direct
    client_proto: str = "mptcp"


SCENARIOS = (
    Scenario("direct", "(a) direct", None),
    Scenario("tcp", "(b) proxy, upstream tcp", "tcp"),
    Scenario("mptcp", "(b') proxy, upstream mptcp", "mptcp"),
)
# Controls with a plain TCP client (no MPTCP anywhere): the relay's own cost,
# without what MPTCP does on the client leg. Bulk single stream only.
CONTROLS = (
    Scenario("tcp-direct", "(c) direct, TCP client", None, "tcp"),
    Scenario("tcp-proxy", "(d) proxy up=tcp, TCP client", "tcp", "tcp"),
)

# Kernel counters read in every namespace around each bulk run: MPTCP-level
# retransmissions are the signature of the stalls described in the report.
COUNTERS = (("MPTcpExt", "MPTCPRetrans"), ("MPTcpExt", "DuplicateData"),
            ("TcpExt", "TCPFastRetrans"), ("TcpExt", "TCPSACKReorder"),
            ("TcpExt", "TCPFromZeroWindowAdv"))


class BenchError(RuntimeError):
    pass


# -- processes ---------------------------------------------------------------------

class Proc:
    """A process in a lab namespace, with a line reader on its stdout."""

    def __init__(self, name: str, popen: subprocess.Popen, log_path: Path) -> None:
        self.name = name
        self.popen = popen
        self.pid = popen.pid
        self.log_path = log_path
        self._buf = b""

    def readline(self, timeout: float) -> str:
        fd = self.popen.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name}: no output after {timeout:.0f} s{self.tail()}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise BenchError(f"{self.name}: exited ({self.popen.poll()}){self.tail()}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def expect(self, text: str, timeout: float) -> None:
        line = self.readline(timeout)
        if line != text:
            raise BenchError(f"{self.name}: expected {text!r}, got {line[:200]!r}{self.tail()}")

    def result(self, timeout: float) -> dict:
        return json.loads(self.readline(timeout))

    def tell(self, line: str) -> None:
        self.popen.stdin.write(line.encode() + b"\n")
        self.popen.stdin.flush()

    def tail(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip()
        except OSError:
            return ""
        return ("\n  stderr: " + text[-1500:].replace("\n", "\n  ")) if text else ""

    def stop(self, timeout: float = 5.0) -> str:
        """SIGTERM (a proxy drains and logs its counters), then kill; its stderr."""
        terminate([self], timeout)
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)  # its own session: forked children too
            except ProcessLookupError:
                pass
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                stream.close()


class Procs:
    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.live: list[Proc] = []
        self._n = 0

    def start(self, node, argv: list[str], name: str, stdin: bool = False) -> Proc:
        self._n += 1
        log_path = self.logdir / f"{self._n:04d}-{name.replace(' ', '_')}.log"
        with open(log_path, "wb") as err:
            popen = node.popen(argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=err, start_new_session=True)
        proc = Proc(name, popen, log_path)
        self.live.append(proc)
        return proc

    def finish(self, proc: Proc, timeout: float = 10.0) -> None:
        """Wait for a client that has reported; kill it if it lingers."""
        try:
            proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        proc.kill()
        if proc in self.live:
            self.live.remove(proc)

    def kill_all(self, grace: float = 3.0) -> None:
        """SIGTERM everything still running (a proxy then gives back its sysctl
        records), SIGKILL what is left after ``grace`` seconds."""
        terminate(list(reversed(self.live)), grace)
        self.live.clear()


def terminate(procs: list[Proc], grace: float) -> None:
    """SIGTERM each of ``procs`` (and its process group), wait up to ``grace``
    seconds for all of them together, then SIGKILL what is left."""
    for proc in procs:
        if proc.popen.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        proc.kill()


def load_argv(*args: object) -> list[str]:
    return [PYTHON, LOAD, *(str(a) for a in args)]


# -- /proc readings ------------------------------------------------------------------

def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK   # fields 14, 15 of stat(5)


def proc_pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise BenchError(f"no Pss in /proc/{pid}/smaps_rollup")


def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies summed over all CPUs."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + vals[4]
    total = sum(vals[:8])
    return total - idle, total


def kernel_counters(lab: Lab) -> dict[str, int]:
    """COUNTERS summed over the lab's three namespaces."""
    total = {f"{sec}.{name}": 0 for sec, name in COUNTERS}
    for node in lab.nodes:
        stats = node.netstat()
        for sec, name in COUNTERS:
            total[f"{sec}.{name}"] += stats.get(sec, {}).get(name, 0)
    return total


def wait_listening(pid: int, port: int, timeout: float = 10.0) -> None:
    """Until process ``pid``'s namespace has a TCP listener on ``port``."""
    want = f":{port:04X}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for table in ("tcp", "tcp6"):
            try:
                with open(f"/proc/{pid}/net/{table}") as f:
                    next(f)
                    for line in f:
                        cols = line.split()
                        if cols[1].endswith(want) and cols[3] == "0A":
                            return
            except (OSError, StopIteration):
                pass
        time.sleep(0.02)
    raise BenchError(f"nothing listens on port {port} in the namespace of pid {pid}")


def wait_proxy(proc: Proc, port: int, marker: bytes = b"mptcp-proxy") -> None:
    """Until ``proc`` listens on ``port``; and its pid must be the proxy itself
    (``marker`` in its command line), not a wrapper: its CPU is read from /proc."""
    wait_listening(proc.pid, port)
    with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
        if marker not in f.read():
            raise BenchError(f"pid {proc.pid} is not the proxy itself")


# -- load generators, released together -------------------------------------------------

def release_clients(procs: Procs, node, argvs: list[list[str]], name: str, timeout: float,
                    proxy_cpu: Callable[[], dict[str, float]],
                    counters: Callable[[], dict[str, int]]) -> tuple[list[dict], dict]:
    """Start clients in ``node``, release them together, collect their JSON lines.

    Returns (results, meter) where meter has the wall time, the growth of each
    of ``proxy_cpu()``'s readings (CPU seconds), the machine CPU busy fraction
    over the run, and the growth of each of ``counters()`` (read outside the
    timed span).
    """
    clients = [procs.start(node, argv, f"{name} #{i}", stdin=True)
               for i, argv in enumerate(argvs)]
    try:
        for c in clients:
            c.expect("ready", 20)
        counters0 = counters()
        cpu0 = proxy_cpu()
        busy0, total0 = machine_cpu()
        t0 = time.monotonic()
        for c in clients:
            c.tell("go")
        results = [c.result(timeout) for c in clients]
        wall = time.monotonic() - t0
        cpu1 = proxy_cpu()
        busy1, total1 = machine_cpu()
        counters1 = counters()
    finally:
        for c in clients:
            procs.finish(c, timeout=5)
    meter = {"wall": wall, **{k: cpu1[k] - cpu0[k] for k in cpu0},
             "machine_busy": (busy1 - busy0) / max(1, total1 - total0),
             "counters": {k: counters1[k] - counters0[k] for k in counters0}}
    return results, meter


# -- a run: start, lab, end --------------------------------------------------------------

def begin_run() -> tuple[float, float, str]:
    """How busy the machine is over one second, then the clock starts:
    (busy fraction, start time, the run's time stamp)."""
    busy0, total0 = machine_cpu()
    time.sleep(1.0)
    busy1, total1 = machine_cpu()
    busy_before = (busy1 - busy0) / max(1, total1 - total0)
    return busy_before, time.time(), time.strftime("%Y%m%d-%H%M%S")


def run_meta(stamp: str, **fields: object) -> dict:
    """A results file's "meta": the machine and its load, ``fields``, other labs present."""
    return {"started": stamp, "kernel": platform.release(), "cpus": os.cpu_count(),
            "loadavg_before": open("/proc/loadavg").read().split()[:3], **fields,
            "other_labs": sorted({n[:-2] for n in os.listdir("/run/netns")}
                                 if os.path.isdir("/run/netns") else [])}


def progress(started: float) -> Callable[[str], None]:
    """A printer of progress lines stamped with the seconds since ``started``."""
    def say(msg: str) -> None:
        print(f"[{time.time() - started:5.1f}s] {msg}", flush=True)
    return say


def run_in_lab(logs_prefix: str, measure: Callable[[Lab, Procs], None], *,
               rate_mbit: float | None = None, dss_checksum: bool = False) -> str | None:
    """``measure(lab, procs)`` in a lab with one path (unshaped unless
    ``rate_mbit``; ``dss_checksum``: its end hosts ask for DSS checksums);
    every process it started is killed before the lab goes. None if all went
    well, else the BenchError it raised: that is said on stderr, and the
    processes' logs are kept."""
    logdir = Path(tempfile.mkdtemp(prefix=logs_prefix))
    procs = Procs(logdir)
    try:
        with Lab.create(paths=[PathSpec(rate_mbit=rate_mbit)], dss_checksum=dss_checksum) as lab:
            try:
                measure(lab, procs)
            finally:
                procs.kill_all()
    except BenchError as exc:
        print(f"benchmark failed: {exc}\nprocess logs kept in {logdir}", file=sys.stderr)
        return str(exc)
    finally:
        procs.kill_all()
    shutil.rmtree(logdir, ignore_errors=True)
    return None


def print_footer(meta: dict, path: Path) -> None:
    """The report's last lines: the run's length and load, where its results went."""
    print(f"took {meta['seconds']:.0f} s; machine {meta['machine_busy_before']:.0%} busy in "
          f"the second before; load average before {' '.join(meta['loadavg_before'])}"
          + (f"; other labs present at start: {', '.join(meta['other_labs'])}"
             if meta["other_labs"] else ""))
    print(f"results: {path}")


# -- the benchmark ---------------------------------------------------------------------

@dataclass
class Setup:
    lab: Lab
    procs: Procs
    proxies: dict = field(default_factory=dict)     # (service, upstream) -> Proc

    def target(self, sc: Scenario, service: str) -> str:
        if sc.upstream is None:
            return f"{self.lab.server_addr}:{SERVER_PORT[(service, sc.client_proto)]}"
        return f"{self.lab.paths[0].proxy_addr}:{PROXY_PORT[(service, sc.upstream)]}"

    def proxy(self, sc: Scenario, service: str) -> Proc | None:
        return None if sc.upstream is None else self.proxies[(service, sc.upstream)]


def enable_rps(lab: Lab) -> None:
    """RPS on every lab veth: each flow is processed on one CPU, so its packets
    stay in order when the sending task migrates (veth enqueues on the current CPU)."""
    mask = format((1 << (os.cpu_count() or 1)) - 1, "x")
    script = ("for f in /sys/class/net/*/queues/rx-*/rps_cpus; do "
              "case $f in */lo/*) ;; *) echo %s > $f;; esac; done" % mask)
    for node in lab.nodes:
        node.run(["sh", "-c", script])


def start_everything(setup: Setup) -> None:
    lab, procs = setup.lab, setup.procs
    for (service, proto), port in SERVER_PORT.items():
        p = procs.start(lab.server, load_argv(SERVER_CMD[service], "--listen",
                                              f"0.0.0.0:{port}", "--proto", proto),
                        f"server {service} {proto}")
        p.expect("ready", 15)
    for (service, upstream), port in PROXY_PORT.items():
        server_proto = "tcp" if upstream == "tcp" else "mptcp"
        to = f"{lab.server_addr}:{SERVER_PORT[(service, server_proto)]}"
        p = procs.start(lab.proxy, [CLI, "forward", "--listen", f"0.0.0.0:{port}", "--to", to,
                                    "--upstream", upstream, "--no-conn-log"],
                        f"proxy {service} {upstream}")
        setup.proxies[(service, upstream)] = p
    for (service, upstream), port in PROXY_PORT.items():
        wait_proxy(setup.proxies[(service, upstream)], port)


def run_clients(setup: Setup, argvs: list[list[str]], name: str, timeout: float,
                proxy: Proc | None) -> tuple[list[dict], dict]:
    """Start clients, release them together, collect their JSON lines.

    Returns (results, meter) where meter has wall time, proxy CPU seconds,
    machine CPU busy fraction and the kernel COUNTERS over the run.
    """
    return release_clients(
        setup.procs, setup.lab.client, argvs, name, timeout,
        lambda: {"proxy_cpu": proc_cpu_seconds(proxy.pid) if proxy else 0.0},
        lambda: kernel_counters(setup.lab))


def bulk(setup: Setup, sc: Scenario, op: str, streams: int, duration: float,
         volume: int = 0, seed: int = 1) -> dict:
    target = setup.target(sc, "bulk")
    argvs = []
    for i in range(streams):
        a = ["bulk-client", "--connect", target, "--proto", sc.client_proto, "--op", op,
             "--wait-go", "--seed", seed + i]
        a += ["--volume", volume, "--hash"] if volume else ["--duration", duration]
        argvs.append(load_argv(*a))
    timeout = (60 if volume else duration + 30)
    results, meter = run_clients(setup, argvs, f"bulk {sc.key} {op} x{streams}", timeout,
                                 setup.proxy(sc, "bulk"))
    total = sum(r["bytes"] for r in results)
    span = max(r["t_last"] for r in results) - min(r["t_first"] for r in results)
    out = {"scenario": sc.key, "op": op, "streams": streams, "bytes": total, "seconds": span,
           "gbps": total * 8 / span / 1e9 if span > 0 else 0.0,
           "client_mptcp": sum(bool(r["mptcp"]) for r in results), "clients": len(results),
           "recv_cpu": sum(r["recv_cpu"] for r in results),
           "recv_cpu_user": sum(r["recv_cpu_user"] for r in results), **meter}
    if op == "up":
        out["server_mptcp"] = sum(bool(r["server_mptcp"]) for r in results)
        out["send_cpu"] = sum(r["send_cpu"] for r in results)
    if volume:
        out["sha_ok"] = all(r["sha_ok"] for r in results)
        out["sha256"] = [r["sha256"] for r in results]
        out["sha_expected"] = [r["sha_expected"] for r in results]
    return out


def connrate(setup: Setup, sc: Scenario, concurrency: int, duration: float,
             nprocs: int) -> dict:
    target = setup.target(sc, "conn")
    nprocs = max(1, min(nprocs, concurrency))
    shares = [concurrency // nprocs + (1 if i < concurrency % nprocs else 0)
              for i in range(nprocs)]
    argvs = [load_argv("connrate", "--connect", target, "--concurrency", c,
                       "--duration", duration, "--wait-go") for c in shares]
    results, meter = run_clients(setup, argvs, f"conn {sc.key} c={concurrency}", duration + 30,
                                 setup.proxy(sc, "conn"))
    lat = sorted(x for r in results for x in r["lat_us"])
    completed = sum(r["completed"] for r in results)

    def pct(q: float) -> float | None:
        if not lat:
            return None
        return lat[min(len(lat) - 1, int(q * (len(lat) - 1) + 0.5))] / 1000.0

    return {"scenario": sc.key, "concurrency": concurrency, "procs": nprocs,
            "completed": completed, "rate": completed / duration,
            "errors": sum(r["errors"] for r in results),
            "late": sum(r.get("late", 0) for r in results),
            "client_mptcp": sum(r["mptcp"] for r in results),
            "client_sockets": completed + sum(r["errors"] + r.get("late", 0) for r in results),
            "p50_ms": pct(0.5), "p99_ms": pct(0.99),
            "client_cpu": sum(r["cpu"] for r in results),
            "client_cpu_user": sum(r["cpu_user"] for r in results), **meter}


def idle(setup: Setup, sc: Scenario, count: int) -> dict:
    proxy = setup.proxy(sc, "idle")
    assert proxy is not None
    target = setup.target(sc, "idle")

    def hold(n: int, name: str) -> tuple[Proc, dict]:
        c = setup.procs.start(setup.lab.client,
                              load_argv("idle-client", "--connect", target, "--count", n),
                              name, stdin=True)
        return c, c.result(90)

    # Warm-up: the first connections import and allocate what every later one reuses.
    c, warm = hold(64, f"idle {sc.key} warm-up")
    c.tell("close")
    setup.procs.finish(c)
    time.sleep(0.5)
    pss0, fds0 = proc_pss_kib(proxy.pid), proc_fds(proxy.pid)
    c, res = hold(count, f"idle {sc.key} x{count}")
    try:
        time.sleep(1.0)  # let the last relays settle
        pss1, fds1 = proc_pss_kib(proxy.pid), proc_fds(proxy.pid)
    finally:
        c.tell("close")
        setup.procs.finish(c)
    n = res["established"]
    return {"scenario": sc.key, "count": count, "established": n, "errors": res["errors"],
            "client_mptcp": res["mptcp"], "setup_seconds": res["seconds"],
            "pss_before_kib": pss0, "pss_after_kib": pss1,
            "kib_per_conn": (pss1 - pss0) / n if n else None,
            "fds_before": fds0, "fds_after": fds1, "warmup_ok": warm["established"] == 64}


# -- report ---------------------------------------------------------------------------

def summarize(runs: list[dict]) -> dict:
    vals = [r["gbps"] for r in runs]
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "runs": vals}


def ratio_cell(value: float | None, base: float | None, target: float | None) -> str:
    if value is None or not base:
        return "-"
    r = value / base
    if target is None:
        return f"{r:.2f}"
    return f"{r:.2f} {'ok' if r >= target else 'LOW'}"


def render_table(res: dict, args: argparse.Namespace) -> str:
    sc_keys = [s.key for s in SCENARIOS]
    rows: list[tuple[str, ...]] = []
    head = ("figure", "(a) direct", "(b) up=tcp", "b/a", "(b') up=mptcp", "b'/a", "target")
    rows.append(head)

    def add(label: str, cells: dict, ratios: dict | None, target: str) -> None:
        rows.append((label, cells.get("direct", "-"), cells.get("tcp", "-"),
                     (ratios or {}).get("tcp", ""), cells.get("mptcp", "-"),
                     (ratios or {}).get("mptcp", ""), target))

    for streams in (1, 8):
        for op, word in (("up", "upload c->s"), ("down", "download s->c")):
            key = f"bulk_{streams}_{op}"
            s = res["bulk"][key]
            if streams == 1:
                cells = {k: f"{s[k]['median']:.2f} [{s[k]['min']:.2f}-{s[k]['max']:.2f}]"
                         for k in sc_keys}
                label = f"bulk 1 stream {word} Gbit/s med[min-max]"
            else:
                cells = {k: f"{s[k]['median']:.2f}" for k in sc_keys}
                label = f"bulk 8 streams {word} Gbit/s"
            ratios = {k: ratio_cell(s[k]["median"], s["direct"]["median"], TARGET_BULK)
                      for k in ("tcp", "mptcp")}
            add(label, cells, ratios, f">= {TARGET_BULK}")
    for c in (1, 64):
        s = res["conn"][f"c{c}"]
        cells = {k: f"{s[k]['rate']:.0f}" for k in sc_keys}
        target = TARGET_CONN64 if c == 64 else None
        ratios = {k: ratio_cell(s[k]["rate"], s["direct"]["rate"], target)
                  for k in ("tcp", "mptcp")}
        add(f"connections/s c={c}", cells, ratios, f">= {TARGET_CONN64}" if target else "")
        cells = {k: (f"{s[k]['p50_ms']:.2f} / {s[k]['p99_ms']:.2f}"
                     if s[k]["p50_ms"] is not None else "-") for k in sc_keys}
        add(f"  latency p50 / p99 ms c={c}", cells, None, "")
    add("  proxy CPU us per connection c=64",
        {k: f"{res['conn']['c64'][k]['proxy_us_per_conn']:.0f}" for k in ("tcp", "mptcp")},
        None, "")
    rtx = res["mptcp_rtx"]
    add("MPTCP-level retransmits, bulk runs with any",
        {k: f"{rtx[k]['runs_with_rtx']}/{rtx[k]['runs']} (sum {rtx[k]['total']})"
         for k in sc_keys}, None, "")
    cpu = res["proxy_cpu"]
    add("proxy CPU s per GB relayed (bulk)",
        {k: f"{cpu[k]['s_per_gb']:.3f}" for k in ("tcp", "mptcp")}, None, "")
    add("  proxy CPU use 1 / 8 streams",
        {k: f"{cpu[k]['util_1']:.0%} / {cpu[k]['util_8']:.0%}" for k in ("tcp", "mptcp")},
        None, "")
    add("machine CPU busy 1 / 8 streams (2 cores)",
        {k: f"{cpu[k]['machine_1']:.0%} / {cpu[k]['machine_8']:.0%}" for k in sc_keys},
        None, "")
    idle_r = res["idle"]
    cells, ratios = {}, {}
    for k in ("tcp", "mptcp"):
        v = idle_r[k]["kib_per_conn"]
        cells[k] = f"{v:.2f}" if v is not None else "-"
        ratios[k] = ("ok" if v is not None and v <= TARGET_PSS_KIB else "HIGH")
    add(f"proxy PSS KiB per idle conn ({args.idle_conns})", cells, ratios,
        f"<= {TARGET_PSS_KIB:g} KiB")
    add("  proxy fds with idle conns",
        {k: str(idle_r[k]["fds_after"]) for k in ("tcp", "mptcp")}, None, "")
    add("client sockets MPTCP (TCP_IS_MPTCP)",
        {k: f"{res['mptcp'][k]['client'][0]}/{res['mptcp'][k]['client'][1]}" for k in sc_keys},
        None, "all")
    add("server sockets MPTCP (uploads)",
        {k: f"{res['mptcp'][k]['server'][0]}/{res['mptcp'][k]['server'][1]}" for k in sc_keys},
        None, "a,b': all; b: 0")
    add("SHA-256 check upload / download",
        {k: " / ".join("ok" if res["integrity"][k][op]["sha_ok"] else "FAIL"
                       for op in ("up", "down")) for k in sc_keys}, None, "ok")
    add("errors (conn-rate; idle)",
        {k: f"{res['conn']['c1'][k]['errors'] + res['conn']['c64'][k]['errors']}"
            + (f"; {idle_r[k]['errors']}" if k in idle_r else "") for k in sc_keys},
        None, "0")

    return _format(rows)


# -- main -------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 s runs, smaller integrity transfers")
    ap.add_argument("--repeat", type=int, default=3, metavar="N",
                    help="single-stream runs per figure (default 3)")
    ap.add_argument("--duration", type=float, default=None, metavar="S",
                    help="seconds per run (default 3, --quick 1)")
    ap.add_argument("--idle-conns", type=int, default=5000, metavar="N")
    ap.add_argument("--conn-procs", type=int, default=2, metavar="N",
                    help="client processes sharing the c=64 connection-rate load (default 2)")
    ap.add_argument("--rps", action="store_true",
                    help="steer each flow to one CPU on the lab's veths (RPS): no veth "
                         "reordering when senders migrate between CPUs")
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = ap.parse_args()
    duration = args.duration or (1.0 if args.quick else 3.0)
    integrity_volume = (32 if args.quick else 128) << 20

    if os.geteuid() != 0:
        print("relay.py needs root (network namespaces)", file=sys.stderr)
        return 2
    # Everything shares 2 cores with whatever else runs here, and MPTCP bulk
    # collapses under CPU contention (module docstring): record how busy we found it.
    busy_before, started, stamp = begin_run()
    meta = run_meta(stamp, duration=duration, repeat=args.repeat, quick=args.quick,
                    integrity_bytes=integrity_volume, idle_conns=args.idle_conns,
                    conn_procs_c64=args.conn_procs, python=platform.python_version(),
                    rps=args.rps, machine_busy_before=busy_before)
    raw: dict = {"bulk": [], "integrity": [], "conn": [], "idle": []}
    if busy_before > 0.10:
        print(f"warning: the machine was {busy_before:.0%} busy before the run (other "
              f"processes, labs {', '.join(meta['other_labs']) or 'none'}): figures will be "
              "low and noisy, MPTCP bulk most of all", file=sys.stderr)
    say = progress(started)

    def measure(lab: Lab, procs: Procs) -> None:
        meta["lab"] = lab.name
        setup = Setup(lab, procs)
        if args.rps:
            enable_rps(lab)
        start_everything(setup)
        say(f"lab {lab.name} up; servers and 6 proxies running")
        # 1. Integrity (also warms every path up).
        for sc in SCENARIOS:
            for op in ("up", "down"):
                r = bulk(setup, sc, op, 1, duration, volume=integrity_volume, seed=7)
                raw["integrity"].append(r)
                say(f"integrity {sc.key:6s} {op:4s} sha_ok={r['sha_ok']} "
                    f"{r['gbps']:.2f} Gbit/s")
        # 2. Bulk, single stream repeated, then 8 streams; interleaved.
        plan = [(1, rep) for rep in range(args.repeat)] + [(8, 0)]
        for streams, rep in plan:
            for op in ("up", "down"):
                for sc in SCENARIOS + (CONTROLS if streams == 1 else ()):
                    r = bulk(setup, sc, op, streams, duration)
                    r["rep"] = rep
                    raw["bulk"].append(r)
                    say(f"bulk {sc.key:10s} {op:4s} x{streams} {r['gbps']:6.2f} Gbit/s "
                        f"proxy cpu {r['proxy_cpu'] / r['wall']:4.0%} "
                        f"machine {r['machine_busy']:4.0%} mptcp-rtx "
                        f"{r['counters']['MPTcpExt.MPTCPRetrans']}")
        # 3. Connection rate.
        for c in (1, 64):
            for sc in SCENARIOS:
                r = connrate(setup, sc, c, duration, 1 if c == 1 else args.conn_procs)
                raw["conn"].append(r)
                say(f"conn {sc.key:10s} c={c:<3d} {r['rate']:7.0f}/s "
                    f"p50 {r['p50_ms']} p99 {r['p99_ms']} ms errors {r['errors']} "
                    f"proxy cpu {r['proxy_cpu'] / r['wall']:.0%}")
        # 4. Idle connections (proxies only).
        for sc in SCENARIOS[1:]:
            r = idle(setup, sc, args.idle_conns)
            raw["idle"].append(r)
            say(f"idle {sc.key:10s} {r['established']} held, "
                f"{r['kib_per_conn']:.2f} KiB/conn, proxy fds {r['fds_after']}")

    if run_in_lab("relay-bench-", measure) is not None:
        return 1

    res = analyze(raw)
    meta["seconds"] = time.time() - started
    out = {"meta": meta, "summary": res, "raw": raw}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"relay-{stamp}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")

    print()
    print(f"mptcp-proxy relay benchmark {stamp}: lab {meta['lab']}, 1 unshaped path, "
          f"Linux {meta['kernel']}, {meta['cpus']} CPUs, {duration:g} s runs, "
          f"single-stream x{args.repeat}, c=64 from {args.conn_procs} client process(es)")
    print("(a) client MPTCP -> server MPTCP, routed by the proxy ns; (b) client MPTCP -> "
          "mptcp-proxy forward --upstream tcp -> TCP server;")
    print("(b') same with --upstream mptcp -> MPTCP server. Ratios use medians.")
    print()
    print(render_table(res, args))
    print()
    print(render_controls(res))
    print()
    print_footer(meta, path)
    ok = all(r["sha_ok"] for r in raw["integrity"])
    for k in ("direct", "tcp", "mptcp"):
        got, total = res["mptcp"][k]["client"]
        ok = ok and got == total
    return 0 if ok else 1


def analyze(raw: dict) -> dict:
    keys = [s.key for s in SCENARIOS]
    res: dict = {"bulk": {}, "conn": {}, "idle": {}, "integrity": {}, "proxy_cpu": {},
                 "mptcp": {}, "controls": {}, "mptcp_rtx": {}}
    for streams in (1, 8):
        for op in ("up", "down"):
            res["bulk"][f"bulk_{streams}_{op}"] = {
                k: summarize([r for r in raw["bulk"] if r["scenario"] == k
                              and r["streams"] == streams and r["op"] == op]) for k in keys}
    for op in ("up", "down"):
        res["controls"][f"bulk_1_{op}"] = {
            c.key: summarize([r for r in raw["bulk"] if r["scenario"] == c.key
                              and r["op"] == op]) for c in CONTROLS}
    for c in CONTROLS:
        runs = [r for r in raw["bulk"] if r["scenario"] == c.key]
        res["controls"].setdefault("proxy_util", {})[c.key] = (
            sum(r["proxy_cpu"] for r in runs) / sum(r["wall"] for r in runs))
        res["controls"].setdefault("proxy_s_per_gb", {})[c.key] = (
            sum(r["proxy_cpu"] for r in runs) / (sum(r["bytes"] for r in runs) / GB))
    for c in (1, 64):
        res["conn"][f"c{c}"] = {r["scenario"]: {
            **{x: r[x] for x in ("rate", "p50_ms", "p99_ms", "errors", "late", "completed",
                                 "client_cpu", "machine_busy", "proxy_cpu", "wall")},
            "proxy_us_per_conn": (r["proxy_cpu"] / r["completed"] * 1e6
                                  if r["completed"] else None)}
            for r in raw["conn"] if r["concurrency"] == c}
    for r in raw["idle"]:
        res["idle"][r["scenario"]] = {x: r[x] for x in (
            "kib_per_conn", "established", "errors", "pss_before_kib", "pss_after_kib",
            "fds_before", "fds_after")}
    for r in raw["integrity"]:
        res["integrity"].setdefault(r["scenario"], {})[r["op"]] = {
            "sha_ok": r["sha_ok"], "bytes": r["bytes"], "gbps": r["gbps"]}
    for k in keys + [c.key for c in CONTROLS]:
        runs = [r for r in raw["bulk"] if r["scenario"] == k]
        rtx = [r["counters"]["MPTcpExt.MPTCPRetrans"] for r in runs]
        res["mptcp_rtx"][k] = {"per_run_median": statistics.median(rtx), "total": sum(rtx),
                               "runs_with_rtx": sum(1 for x in rtx if x), "runs": len(rtx)}
    for k in keys:
        runs = [r for r in raw["bulk"] if r["scenario"] == k]

        def util(streams: int, what: str) -> float:
            sel = [r for r in runs if r["streams"] == streams]
            return sum(r[what] if what == "proxy_cpu" else r[what] * r["wall"]
                       for r in sel) / sum(r["wall"] for r in sel)

        entry = {"machine_1": util(1, "machine_busy"), "machine_8": util(8, "machine_busy")}
        if k != "direct":
            cpu = sum(r["proxy_cpu"] for r in runs)
            nbytes = sum(r["bytes"] for r in runs)
            entry.update(s_per_gb=cpu / (nbytes / GB), cpu_seconds=cpu, bytes=nbytes,
                         util_1=util(1, "proxy_cpu"), util_8=util(8, "proxy_cpu"))
        res["proxy_cpu"][k] = entry
        client = [0, 0]
        server = [0, 0]
        for r in raw["bulk"] + raw["integrity"]:
            if r["scenario"] == k:
                client[0] += r["client_mptcp"]
                client[1] += r["clients"]
                if r["op"] == "up":
                    server[0] += r["server_mptcp"]
                    server[1] += r["clients"]
        for r in raw["conn"]:
            if r["scenario"] == k:
                client[0] += r["client_mptcp"]
                client[1] += r["client_sockets"]
        for r in raw["idle"]:
            if r["scenario"] == k:
                client[0] += r["client_mptcp"]
                client[1] += r["established"]
        res["mptcp"][k] = {"client": client, "server": server}
    return res


def render_controls(res: dict) -> str:
    rows = [("control: plain TCP client, single stream", "(c) direct TCP",
             "(d) proxy up=tcp", "d/c")]
    ctl = res["controls"]
    for op, word in (("up", "upload c->s"), ("down", "download s->c")):
        s = ctl[f"bulk_1_{op}"]
        cells = [f"{s[k]['median']:.2f} [{s[k]['min']:.2f}-{s[k]['max']:.2f}]"
                 for k in ("tcp-direct", "tcp-proxy")]
        rows.append((f"bulk 1 stream {word} Gbit/s med[min-max]", *cells,
                     ratio_cell(s["tcp-proxy"]["median"], s["tcp-direct"]["median"], None)))
    rows.append(("  proxy CPU use", "-", f"{ctl['proxy_util']['tcp-proxy']:.0%}", ""))
    rows.append(("  proxy CPU s per GB relayed", "-",
                 f"{ctl['proxy_s_per_gb']['tcp-proxy']:.3f}", ""))
    return _format(rows)


def _format(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[j]) if j == 0 else cell.rjust(widths[j])
                               for j, cell in enumerate(r)).rstrip())
        if i == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
