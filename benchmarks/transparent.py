"""Transparent-proxy benchmark: aggregated goodput through ``mptcp-proxy transparent``.

    .venv/bin/python benchmarks/transparent.py [--rate MBIT MBIT] [--seconds S] [--repeat N]

Builds the ``operator`` lab (path 0 "cellular" through the proxy host, path 1
"Wi-Fi" through a router; both shaped with tbf) and runs the real CLI on the
proxy node::

    mptcp-proxy transparent --ports 9000 --announce PROXY_PUBLIC_ADDR

Measured in the same run, interleaved run by run:

  (p) proxied  client MPTCP -> TCP server:9000, intercepted; the client joins the
               proxy's announced address over Wi-Fi (the figure of the target)
  (d) direct   client MPTCP -> MPTCP server:9001, not intercepted: end-to-end MPTCP
               over both paths (what MPTCP itself reaches here)
  (1) one path client plain TCP -> TCP server:9000 over path 0, routed untouched

Goodput is measured by the receiver: payload bytes over the span from its first
byte to its last. Every transfer is verified by SHA-256; the proxied runs also
show the kernel's evidence (bytes per subflow with its addresses, per-path link
bytes, the proxy's MPTcpExt join counters). Prints figures and the ratio to
the sum of the two path rates (target: >= 90%); never pass/fail on speed. The
exit status is non-zero only if the benchmark itself broke (a hash mismatch,
MPTCP not used, the proxy not intercepting).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from mptcp_proxy.lab import Lab, Node, PathSpec  # noqa: E402
from mptcp_proxy.lab.traffic import TransferResult, serve_each, timed_upload  # noqa: E402

VENV_BIN = ROOT / ".venv" / "bin"
CLI = str(VENV_BIN / "mptcp-proxy")
RESULTS_DIR = ROOT / "bench-results"
PROXIED_PORT = 9000
DIRECT_PORT = 9001
IPPROTO_MPTCP = 262
REPLY = struct.Struct("!32sQ")  # what lab.traffic.timed_upload expects back


@dataclass
class Received:
    count: int
    first: float
    last: float

    @property
    def mbit(self) -> float:
        span = self.last - self.first
        return self.count * 8 / span / 1e6 if span > 0 else 0.0


class TimedSink:
    """Like lab.traffic.SinkServer (hash + count reply), and it times the bytes."""

    def __init__(self, node: Node, host: str, port: int, mptcp: bool) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with node.enter():
            self.sock = socket.socket(family, socket.SOCK_STREAM, IPPROTO_MPTCP if mptcp else 0)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(16)
        self.received: list[Received] = []
        self._thread = serve_each(self.sock, self._handle, "bench-sink")

    def _handle(self, conn: socket.socket) -> None:
        digest = hashlib.sha256()
        buf = bytearray(1 << 18)
        view = memoryview(buf)
        count, first, last = 0, 0.0, 0.0
        with conn:
            conn.settimeout(60)
            while True:
                n = conn.recv_into(buf)
                if not n:
                    break
                last = time.monotonic()
                if not count:
                    first = last
                count += n
                digest.update(view[:n])
            self.received.append(Received(count, first, last))
            conn.sendall(REPLY.pack(digest.digest(), count))

    def take(self, timeout: float = 5.0) -> Received:
        deadline = time.monotonic() + timeout
        while not self.received:
            if time.monotonic() > deadline:
                raise RuntimeError("the sink recorded nothing")
            time.sleep(0.01)
        return self.received.pop()

    def close(self) -> None:
        self.sock.close()


def start_proxy(lab: Lab, dss_checksum: str = "on") -> subprocess.Popen:
    argv = ["ip", "netns", "exec", lab.proxy.ns, CLI, "transparent",
            "--ports", str(PROXIED_PORT), "--announce", lab.proxy_public_addr, "--no-conn-log",
            "--dss-checksum", dss_checksum]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 15
    lines = []
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise RuntimeError("proxy exited:\n" + "".join(lines))
        lines.append(line)
        if "transparent: ready" in line:
            return proc
    raise RuntimeError("proxy did not get ready:\n" + "".join(lines))


def stop_proxy(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
    return err or ""


def mptcp_counters(node: Node) -> dict[str, int]:
    return node.netstat().get("MPTcpExt", {})


def run(args: argparse.Namespace) -> dict:
    rates = args.rate
    path_sum = sum(rates)
    results: dict[str, list] = {"proxied": [], "direct": [], "one_path": []}
    evidence: list[dict] = []
    with Lab.create([PathSpec(rate_mbit=r) for r in rates], topology="operator") as lab:
        tcp_sink = TimedSink(lab.server, lab.server_addr, PROXIED_PORT, mptcp=False)
        mp_sink = TimedSink(lab.mpserver, lab.mpserver_addr, DIRECT_PORT, mptcp=True)
        proxy = start_proxy(lab, args.dss_checksum)
        try:
            for i in range(args.repeat):
                before = mptcp_counters(lab.proxy)
                p = timed_upload(lab, (lab.server_addr, PROXIED_PORT), args.seconds, seed=i)
                after = mptcp_counters(lab.proxy)
                check(p, "proxied", mptcp=True)
                got = tcp_sink.take()
                results["proxied"].append(got.mbit)
                evidence.append({
                    "run": i, "goodput_mbit": round(got.mbit, 2),
                    "subflow_bytes": p.subflow_bytes,
                    "path_link_bytes": p.path_bytes,
                    "proxy_mptcpext": {k: after[k] - before.get(k, 0) for k in
                                       ("MPCapableSYNRX", "MPJoinSynRx", "MPJoinPortSynRx",
                                        "MismatchPortSynRx", "AddAddrTx")},
                })
                print(f"  run {i + 1}: proxied {got.mbit:5.1f} Mbit/s", end="", flush=True)

                d = timed_upload(lab, (lab.mpserver_addr, DIRECT_PORT), args.seconds, seed=100 + i)
                check(d, "direct", mptcp=True)
                got = mp_sink.take()
                results["direct"].append(got.mbit)
                print(f"   direct {got.mbit:5.1f}", end="", flush=True)

                o = timed_upload(lab, (lab.server_addr, PROXIED_PORT), args.seconds / 2,
                                 mptcp=False, seed=200 + i)
                check(o, "one path", mptcp=False)
                got = tcp_sink.take()
                results["one_path"].append(got.mbit)
                print(f"   one path {got.mbit:5.1f}", flush=True)
        finally:
            log = stop_proxy(proxy)
            tcp_sink.close()
            mp_sink.close()
        if "kernel state restored" not in log:
            raise RuntimeError("the proxy did not restore its kernel state:\n" + log[-2000:])
        lab_name = lab.name
    med = {k: statistics.median(v) for k, v in results.items()}
    return {
        "lab": lab_name, "rates_mbit": rates, "seconds": args.seconds, "repeat": args.repeat,
        "dss_checksum": args.dss_checksum,
        "runs_mbit": results, "median_mbit": med,
        "proxied_vs_path_sum": med["proxied"] / path_sum,
        "proxied_vs_direct": med["proxied"] / med["direct"] if med["direct"] else None,
        "evidence": evidence,
        "kernel": platform.release(),
    }


def check(result: TransferResult, what: str, *, mptcp: bool) -> None:
    if not result.verified:
        raise RuntimeError(f"{what}: bytes differ end to end")
    if result.mptcp != mptcp:
        raise RuntimeError(f"{what}: client socket MPTCP={result.mptcp}, expected {mptcp}")
    if mptcp and result.paths_used(min_share=0.2) != 2:
        raise RuntimeError(f"{what}: did not use both paths: {result.path_bytes}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, nargs=2, default=[20.0, 20.0], metavar="MBIT",
                    help="rates of path 0 (cellular) and path 1 (Wi-Fi), Mbit/s (default 20 20)")
    ap.add_argument("--seconds", type=float, default=8.0, help="per transfer (default 8)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per scenario (default 3)")
    ap.add_argument("--dss-checksum", choices=("on", "off"), default="on",
                    help="the proxy's --dss-checksum (default on, the mode's default)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("transparent.py needs root (network namespaces)", file=sys.stderr)
        return 2
    started = time.monotonic()
    print(f"operator lab, paths {args.rate[0]:g} + {args.rate[1]:g} Mbit/s, "
          f"{args.seconds:g} s transfers, {args.repeat} runs")
    try:
        res = run(args)
    except RuntimeError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    med = res["median_mbit"]
    path_sum = sum(args.rate)
    print()
    print(f"  (p) proxied   MPTCP client -> transparent proxy -> TCP server  "
          f"{med['proxied']:6.1f} Mbit/s  {res['proxied_vs_path_sum']:6.1%} of the path sum "
          f"({path_sum:g}); target >= 90%")
    print(f"  (d) direct    MPTCP client -> MPTCP server, end to end         "
          f"{med['direct']:6.1f} Mbit/s  {med['direct'] / path_sum:6.1%}; "
          f"proxied/direct {res['proxied_vs_direct']:.2f}")
    print(f"  (1) one path  TCP client on path 0, routed untouched           "
          f"{med['one_path']:6.1f} Mbit/s  {med['one_path'] / args.rate[0]:6.1%} of path 0; "
          f"proxied/one path {med['proxied'] / med['one_path']:.2f}x")
    ev = res["evidence"][-1]
    print(f"  evidence (last proxied run): subflows {ev['subflow_bytes']}")
    print(f"    client path link bytes {ev['path_link_bytes']}; proxy MPTcpExt "
          f"{ev['proxy_mptcpext']}")
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"transparent-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"took {time.monotonic() - started:.0f} s; results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
