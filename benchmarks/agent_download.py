"""Downloads through the client agent, 0-RTT or not, against ``forward``: the agent's default.

    .venv/bin/python benchmarks/agent_download.py [--size BYTES] [--repeat N] [--rates A B]

The client agent carries an application's TCP connection to the converter
over MPTCP; with TCP Fast Open (``--tfo``, the Convert request in the SYN)
the converter accepts it in 0-RTT. On Linux 6.18 a multipath download on a
connection accepted with TFO runs many times slower (README, known kernel
issues; ``docs/kernel/dss-corruption.md`` has the measurements). This
benchmark measures what that costs a user, to choose the agent's default.

Lab: two client paths shaped to ``--rates`` (default 20 and 30 Mbit/s), the
real CLI in the namespaces: ``mptcp-proxy convert`` and ``mptcp-proxy
forward`` in the proxy namespace, ``mptcp-proxy client --socks5`` in the
client namespace (once with ``--tfo``, once with ``--no-tfo``), a plain TCP
server that sends ``--size`` bytes (default 20 MB) per connection. Each
round runs, interleaved:

  (f) forward   MPTCP client -> forward -> server
  (t) agent TFO app -> agent (SOCKS5) -> converter, request in the SYN
  (n) agent     the same with --no-tfo (request after the handshake)

``--repeat`` rounds (default 3), each download timed from connect to the
last byte and checked with SHA-256. The agents keep running across rounds, so
from the second connection on the TFO agent has its cookie and sends the
request in the SYN (the converter's TCPFastOpenPassive rises: counted; an untimed 1 KB
download first fetches the cookie). The
result is each scenario's times and the median ratio to (f); the issue's
target for the default: no more than 1.2x forward's time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from mptcp_proxy.lab import Lab, PathSpec  # noqa: E402
from mptcp_proxy.lab.traffic import serve_each  # noqa: E402
from relay import CLI, Procs, begin_run, print_footer, run_meta, wait_listening  # noqa: E402

RESULTS_DIR = ROOT / "bench-results"
IPPROTO_MPTCP = 262
SERVER_PORT = 9000
WARMUP_PORT = 9001
CONVERT_PORT = 5124
FORWARD_PORT = 6000
AGENT_PORT = {"t": 1080, "n": 1081}
LABELS = {"f": "(f) forward", "t": "(t) agent --tfo", "n": "(n) agent, default (no TFO)"}
TIMEOUT = 180.0


class Sender:
    """Plain TCP server: each connection gets the same ``size`` bytes, then EOF."""

    def __init__(self, lab: Lab, data: bytes, port: int) -> None:
        self.data = data
        with lab.server.enter():
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", port))
        self.sock.listen(16)
        serve_each(self.sock, self._send)

    def _send(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.sendall(self.data)
            except OSError:
                pass


def download(lab: Lab, key: str, target: tuple, size: int) -> tuple[float, str, int]:
    """(seconds, sha256, bytes) of one download through scenario ``key``."""
    with lab.client.enter():
        if key == "f":
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(TIMEOUT)
        t0 = time.monotonic()
        if key == "f":
            sock.connect((lab.paths[0].proxy_addr, FORWARD_PORT))
        else:
            sock.connect(("127.0.0.1", AGENT_PORT[key]))
            sock.sendall(b"\x05\x01\x00\x05\x01\x00\x01" + socket.inet_aton(target[0])
                         + struct.pack("!H", target[1]))
            head = b""
            while len(head) < 12:
                chunk = sock.recv(12 - len(head))
                if not chunk:
                    raise RuntimeError(f"{key}: SOCKS5 closed")
                head += chunk
            if head[:2] != b"\x05\x00" or head[2:4] != b"\x05\x00":  # method, then reply
                raise RuntimeError(f"{key}: SOCKS5 refused {head!r}")
        digest = hashlib.sha256()
        got = 0
        while chunk := sock.recv(1 << 16):
            digest.update(chunk)
            got += len(chunk)
        return time.monotonic() - t0, digest.hexdigest(), got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=20_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rates", type=float, nargs=2, default=(20.0, 30.0), metavar="MBIT")
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("agent_download.py needs root (network namespaces)", file=sys.stderr)
        return 2
    busy_before, started, stamp = begin_run()
    meta = run_meta(stamp, size=args.size, repeat=args.repeat, rates=list(args.rates),
                    machine_busy_before=busy_before)
    data = os.urandom(args.size)
    want = hashlib.sha256(data).hexdigest()
    times: dict[str, list[float]] = {k: [] for k in LABELS}
    bad: list[str] = []
    procs = Procs(Path(tempfile.mkdtemp(prefix="agent-download-")))
    with Lab.create([PathSpec(rate_mbit=r) for r in args.rates]) as lab:
        try:
            Sender(lab, data, SERVER_PORT)
            Sender(lab, b"w" * 1000, WARMUP_PORT)
            target = (lab.server_addr, SERVER_PORT)
            k = lab.server_addr.split(".")[1]
            conv = procs.start(lab.proxy, [CLI, "convert", "--listen", f"0.0.0.0:{CONVERT_PORT}",
                                           "--allow-target", f"10.{k}.0.0/16", "--no-conn-log"],
                               "converter")
            fwd = procs.start(lab.proxy, [CLI, "forward", "--listen", f"0.0.0.0:{FORWARD_PORT}",
                                          "--to", f"{target[0]}:{target[1]}", "--no-conn-log"],
                              "forward")
            wait_listening(conv.pid, CONVERT_PORT)
            wait_listening(fwd.pid, FORWARD_PORT)
            converter = f"{lab.paths[0].proxy_addr}:{CONVERT_PORT}"
            for key, tfo in (("t", "--tfo"), ("n", "--no-tfo")):
                agent = procs.start(lab.client, [CLI, "client", "--converter", converter,
                                                 "--socks5", f"127.0.0.1:{AGENT_PORT[key]}",
                                                 "--nft-table", f"mpx_agent_{key}", tfo,
                                                 "--no-conn-log"], f"agent {key}")
                wait_listening(agent.pid, AGENT_PORT[key])
            # Untimed: the TFO agent fetches its cookie, so every timed
            # connection of it carries the request in the SYN.
            for key in ("t", "n"):
                download(lab, key, (lab.server_addr, WARMUP_PORT), 1000)
            passive0 = lab.proxy.netstat()["TcpExt"].get("TCPFastOpenPassive", 0)
            for rnd in range(args.repeat):
                for key in LABELS:
                    seconds, digest, got = download(lab, key, target, args.size)
                    ok = digest == want and got == args.size
                    if not ok:
                        bad.append(f"round {rnd} {key}: {got} bytes, sha {digest[:12]}")
                    times[key].append(seconds)
                    print(f"round {rnd}: {LABELS[key]:24} {seconds:6.2f} s "
                          f"{'sha ok' if ok else 'WRONG BYTES'}", flush=True)
            passive = lab.proxy.netstat()["TcpExt"].get("TCPFastOpenPassive", 0) - passive0
        finally:
            procs.kill_all()
    meta["seconds"] = time.time() - started
    base = statistics.median(times["f"])
    print()
    print(f"{args.size / 1e6:g} MB downloads, paths {args.rates[0]:g} + {args.rates[1]:g} Mbit/s, "
          f"{args.repeat} rounds; converter TCPFastOpenPassive +{passive}")
    for key, label in LABELS.items():
        med = statistics.median(times[key])
        print(f"  {label:24} median {med:6.2f} s  [{min(times[key]):.2f}-{max(times[key]):.2f}]"
              f"  vs forward {med / base:5.2f}x")
    args.results_dir.mkdir(exist_ok=True)
    path = args.results_dir / f"agent-download-{stamp}.json"
    path.write_text(json.dumps({"meta": meta, "times": times, "tfo_passive": passive,
                                "bad": bad}, indent=1))
    print_footer(meta, path)
    if bad:
        print("WRONG BYTES: " + "; ".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
