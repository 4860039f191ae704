"""Bulk MPTCP through `forward` on shaped links: where does the relay stop keeping up?

    .venv/bin/python benchmarks/shaped.py [--rates 1000 5000 10000] [--duration 3]

For each link rate (tbf on the lab's one path, layer-2 Mbit/s) it measures, in
the same lab, a single MPTCP stream upload and download (a) direct to an MPTCP
server and (b) through ``mptcp-proxy forward --upstream tcp`` to the same
server, and prints Gbit/s and the ratio b/a. It also prints the proxy
namespace's MPTcpExt DuplicateData and TcpExt TCPFromZeroWindowAdv deltas: on
this kernel an MPTCP receiver whose window closes (the proxy, once it is the
bottleneck) stalls the sender until an MPTCP-level retransmission, which these
counters show.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from mptcp_proxy.lab import Lab, PathSpec  # noqa: E402

PY = sys.executable
LOAD = str(ROOT / "benchmarks" / "_load.py")
SERVER_PORT, PROXY_PORT = 7000, 6000


def counter(lab: Lab, section: str, key: str) -> int:
    return lab.proxy.netstat().get(section, {}).get(key, 0)


def run_bulk(lab: Lab, dest: str, op: str, duration: float) -> float:
    r = lab.client.run([PY, LOAD, "bulk-client", "--connect", dest, "--proto", "mptcp",
                        "--op", op, "--duration", str(duration)], timeout=duration + 30)
    d = json.loads(r.stdout.strip().splitlines()[-1])
    if not d.get("mptcp"):
        raise RuntimeError(f"client socket fell back to TCP: {d}")
    return d["bytes"] * 8 / (d["t_last"] - d["t_first"]) / 1e9


def measure(rate: float, duration: float) -> list[tuple]:
    rows = []
    with Lab.create(paths=[PathSpec(rate_mbit=rate)]) as lab:
        server = lab.server.popen([PY, LOAD, "bulk-server", "--listen",
                                   f"{lab.server_addr}:{SERVER_PORT}", "--proto", "mptcp"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proxy = lab.proxy.popen([PY, "-m", "mptcp_proxy", "forward", "--listen",
                                 f"{lab.paths[0].proxy_addr}:{PROXY_PORT}", "--to",
                                 f"{lab.server_addr}:{SERVER_PORT}", "--upstream", "tcp",
                                 "--no-conn-log"], stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.0)
            for op in ("up", "down"):
                direct = run_bulk(lab, f"{lab.server_addr}:{SERVER_PORT}", op, duration)
                dup0 = counter(lab, "MPTcpExt", "DuplicateData")
                zw0 = counter(lab, "TcpExt", "TCPFromZeroWindowAdv")
                proxied = run_bulk(lab, f"{lab.paths[0].proxy_addr}:{PROXY_PORT}", op, duration)
                rows.append((rate, op, direct, proxied,
                             counter(lab, "MPTcpExt", "DuplicateData") - dup0,
                             counter(lab, "TcpExt", "TCPFromZeroWindowAdv") - zw0))
        finally:
            proxy.terminate()
            server.terminate()
            proxy.wait(10)
            server.wait(10)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", type=float, nargs="+", default=[1000, 5000, 10000],
                    metavar="MBIT")
    ap.add_argument("--duration", type=float, default=3.0)
    args = ap.parse_args()
    print(f"{'link Mbit/s':>11} {'dir':>4} {'direct Gbit/s':>14} {'forward Gbit/s':>15} "
          f"{'ratio':>6} {'proxy DupData':>14} {'proxy ZeroWin':>14}")
    for rate in args.rates:
        for rate_, op, direct, proxied, dup, zw in measure(rate, args.duration):
            print(f"{rate_:>11.0f} {op:>4} {direct:>14.2f} {proxied:>15.2f} "
                  f"{proxied / direct:>6.2f} {dup:>14d} {zw:>14d}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
