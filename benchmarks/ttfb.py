"""Time-to-first-byte benchmark: the converter's 0-RTT against direct and SOCKS5, with path delay.

    .venv/bin/python benchmarks/ttfb.py [--delay MS] [--rounds N] [--quick]

Builds a lab with one client-proxy path delayed by ``--delay`` ms in each
direction (the lab's NFQUEUE delay emulation: a round trip gains 2 x delay;
the proxy-server link is not delayed, like a converter near the servers) and a
plain-TCP request/response server in the server namespace (read a 64-byte
request, answer 1 KiB, close). The proxies are the real CLI in the proxy
namespace, all started once:

    mptcp-proxy convert --tfo-no-cookie ...      (RFC 8803 converter)
    mptcp-proxy socks5 ...                       (the same proxy host, SOCKS5)
    mptcp-proxy http-connect ...                 (the same proxy host, HTTP CONNECT)

Each connection: connect, send the request, read the whole answer. TTFB is
from the start of connect to the first byte of the server's answer. Measured
in the same run, interleaved connection by connection:

  (d)  direct     plain TCP client -> server (the proxy namespace only routes):
                  handshake, then request -> answer: 2 round trips
  (dt) direct TFO the same with TCP Fast Open to the server (server's TFO
                  listener, no cookie): 1 round trip; for reference
  (c)  convert    MPTCP client -> converter -> server with the library
                  (``convert_client.open_connection``): Convert request and
                  the application's request in the SYN (TFO, no cookie): 1 RTT
  (s)  socks5     MPTCP client -> SOCKS5 on the same proxy, as curl does it:
                  handshake, greeting -> method, CONNECT -> reply, request ->
                  answer: 4 round trips
  (h)  http       MPTCP client -> HTTP CONNECT on the same proxy: handshake,
                  CONNECT -> 200, request -> answer: 3 round trips

The round trip is measured too (TCP_INFO smoothed RTT of the direct
connections' sockets). Targets (issue: explicit proxy): (c) p50 TTFB <= (d)
p50 + 10%, and (s) p50 - (c) p50 >= one round trip. Evidence printed with the
figures: every answer compared with the server's pattern; the proxy
namespace's TcpExt TCPFastOpenPassive delta against the number of (c)
connections and the library's TFO outcome (the Convert request rode in the
SYN); TCP_IS_MPTCP on every client socket toward the proxy. Results go to
``bench-results/ttfb-<ts>.json``. Exit status 0 unless the benchmark itself
broke (wrong bytes, a refusal, SYN data not acknowledged, MPTCP not used);
latency is never pass/fail.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
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

from mptcp_proxy.convert_client import TfoOutcome, open_connection  # noqa: E402
from mptcp_proxy.lab import Lab, PathSpec  # noqa: E402
from mptcp_proxy.lab.traffic import serve_each  # noqa: E402
from relay import CLI, BenchError, Procs, _format, wait_listening  # noqa: E402

RESULTS_DIR = ROOT / "bench-results"
SERVER_PORT = 5300
CONVERT_PORT = 5124
SOCKS_PORT = 1080
HTTP_PORT = 3128
REQUEST = b"GET /ttfb HTTP/1.1\r\nHost: server\r\nX-Pad: " + b"p" * 25 + b"\r\n\r\n"
ANSWER = hashlib.sha256(b"ttfb").digest() * 32        # 1 KiB the client compares
IPPROTO_MPTCP = 262
TCP_FASTOPEN = 23
TCP_FASTOPEN_NO_COOKIE = 34
TCP_IS_MPTCP = 43
TARGET_CONVERT_VS_DIRECT = 1.10
SCENARIOS = (("d", "(d) direct TCP"), ("dt", "(dt) direct TFO"), ("c", "(c) convert 0-RTT"),
             ("s", "(s) SOCKS5"), ("h", "(h) HTTP CONNECT"))


# -- the server (a thread in the server namespace) ------------------------------------

class AnswerServer:
    """Reads len(REQUEST) bytes, answers ANSWER, closes. TFO without cookies on."""

    def __init__(self, lab: Lab) -> None:
        with lab.server.enter():
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN, 256)
            self.sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, 1)
            self.sock.bind((lab.server_addr, SERVER_PORT))
            self.sock.listen(256)
        self.errors: list[str] = []
        self.thread = serve_each(self.sock, self._handle, "ttfb-answer")

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                got = b""
                while len(got) < len(REQUEST):
                    chunk = conn.recv(len(REQUEST) - len(got))
                    if not chunk:
                        break
                    got += chunk
                if got != REQUEST:
                    self.errors.append(f"bad request {got[:40]!r}")
                    return
                conn.sendall(ANSWER)
            except OSError as exc:
                self.errors.append(repr(exc))

    def close(self) -> None:
        self.sock.close()


# -- clients (threads in the client namespace) -------------------------------------------

class Client:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.server = (lab.server_addr, SERVER_PORT)
        self.proxy = lab.paths[0].proxy_addr
        self.rtts_ms: list[float] = []
        self.tfo_outcomes: dict[str, int] = {}

    def _socket(self, mptcp: bool) -> socket.socket:
        with self.lab.client.enter():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM,
                                 IPPROTO_MPTCP if mptcp else 0)
        sock.settimeout(10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def one(self, key: str) -> float:
        """One connection of scenario ``key``; returns its TTFB in ms."""
        return getattr(self, f"_{key}")()

    def _finish(self, sock: socket.socket, t0: float, head: bytes = b"") -> float:
        """Read the answer (``head``: bytes already read); TTFB of its first byte."""
        first = time.perf_counter() if head else None
        data = head
        while len(data) < len(ANSWER):
            chunk = sock.recv(65536)
            if not chunk:
                break
            if first is None:
                first = time.perf_counter()
            data += chunk
        if data != ANSWER or first is None:
            raise BenchError(f"wrong answer: {len(data)} bytes, {data[:20]!r}")
        return (first - t0) * 1000

    def _d(self) -> float:
        with self._socket(mptcp=False) as sock:
            t0 = time.perf_counter()
            sock.connect(self.server)
            sock.sendall(REQUEST)
            ttfb = self._finish(sock, t0)
            rtt_us = struct.unpack_from("I", sock.getsockopt(socket.IPPROTO_TCP,
                                                             socket.TCP_INFO, 104), 68)[0]
            self.rtts_ms.append(rtt_us / 1000)
            return ttfb

    def _dt(self) -> float:
        with self._socket(mptcp=False) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, 1)
            t0 = time.perf_counter()
            sent = sock.sendto(REQUEST, socket.MSG_FASTOPEN, self.server)
            if sent != len(REQUEST):
                raise BenchError(f"direct TFO: SYN took {sent} of {len(REQUEST)} bytes")
            return self._finish(sock, t0)

    def _c(self) -> float:
        t0 = time.perf_counter()
        with self.lab.client.enter():
            conn = open_connection((self.proxy, CONVERT_PORT), self.server,
                                   first_bytes=REQUEST, tfo_no_cookie=True, cache=None,
                                   timeout=10)
        with conn:
            outcome = conn.tfo.value
            self.tfo_outcomes[outcome] = self.tfo_outcomes.get(outcome, 0) + 1
            if conn.tfo is not TfoOutcome.ACKED:
                raise BenchError(f"convert: the SYN data was not acknowledged ({outcome})")
            check_mptcp(conn.sock, "convert")
            return self._finish(conn.sock, t0, conn.recv(65536))

    def _s(self) -> float:
        with self._socket(mptcp=True) as sock:
            t0 = time.perf_counter()
            sock.connect((self.proxy, SOCKS_PORT))
            sock.sendall(b"\x05\x01\x00")
            if read_exact(sock, 2) != b"\x05\x00":
                raise BenchError("SOCKS5: method refused")
            sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(self.server[0])
                         + struct.pack("!H", SERVER_PORT))
            reply = read_exact(sock, 10)
            if reply[:2] != b"\x05\x00":
                raise BenchError(f"SOCKS5: reply {reply!r}")
            sock.sendall(REQUEST)
            check_mptcp(sock, "socks5")
            return self._finish(sock, t0)

    def _h(self) -> float:
        with self._socket(mptcp=True) as sock:
            t0 = time.perf_counter()
            sock.connect((self.proxy, HTTP_PORT))
            target = f"{self.server[0]}:{SERVER_PORT}"
            sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(1)
                if not chunk:
                    raise BenchError(f"HTTP CONNECT: closed after {head!r}")
                head += chunk
            if not head.startswith(b"HTTP/1.1 200"):
                raise BenchError(f"HTTP CONNECT: {head!r}")
            sock.sendall(REQUEST)
            check_mptcp(sock, "http-connect")
            return self._finish(sock, t0)


def read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise BenchError(f"closed after {data!r}")
        data += chunk
    return data


def check_mptcp(sock: socket.socket, what: str) -> None:
    if not sock.getsockopt(socket.SOL_TCP, TCP_IS_MPTCP):
        raise BenchError(f"{what}: the client leg fell back to TCP")


# -- the run ---------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="ttfb-") as logdir, \
            Lab.create([PathSpec(delay_ms=args.delay)]) as lab:
        procs = Procs(Path(logdir))
        server = AnswerServer(lab)
        lab.server.sysctl("net.ipv4.tcp_fastopen", 3)
        lab.client.sysctl("net.ipv4.tcp_fastopen", 1)
        k = lab.server_addr.split(".")[1]
        proxy = lab.paths[0].proxy_addr
        common = ["--allow-target", f"10.{k}.254.0/24", "--no-conn-log"]
        try:
            started = {
                CONVERT_PORT: procs.start(lab.proxy, [CLI, "convert", "--listen",
                                                      f"{proxy}:{CONVERT_PORT}",
                                                      "--tfo-no-cookie", *common], "convert"),
                SOCKS_PORT: procs.start(lab.proxy, [CLI, "socks5", "--listen",
                                                    f"{proxy}:{SOCKS_PORT}", *common], "socks5"),
                HTTP_PORT: procs.start(lab.proxy, [CLI, "http-connect", "--listen",
                                                   f"{proxy}:{HTTP_PORT}", *common],
                                       "http-connect"),
            }
            for port, proc in started.items():
                wait_listening(proc.pid, port)
            client = Client(lab)
            for key, _ in SCENARIOS:      # warm-up: ARP, route caches, the proxies' code
                client.one(key)
            client.rtts_ms.clear()
            client.tfo_outcomes.clear()
            passive_before = lab.proxy.netstat()["TcpExt"]["TCPFastOpenPassive"]
            samples: dict[str, list[float]] = {key: [] for key, _ in SCENARIOS}
            for _ in range(args.rounds):
                for key, _ in SCENARIOS:
                    samples[key].append(client.one(key))
            passive = lab.proxy.netstat()["TcpExt"]["TCPFastOpenPassive"] - passive_before
            if server.errors:
                raise BenchError(f"server: {server.errors[:3]}")
        finally:
            procs.kill_all()
            server.close()
    return {"samples_ms": samples, "rtt_ms": client.rtts_ms, "tfo_passive": passive,
            "tfo_outcomes": client.tfo_outcomes}


def analyze(raw: dict, args: argparse.Namespace) -> dict:
    s = raw["samples_ms"]
    p50 = {k: statistics.median(v) for k, v in s.items()}
    rtt = statistics.median(raw["rtt_ms"])
    result = {
        "p50_ms": p50,
        "p90_ms": {k: pct(v, 0.9) for k, v in s.items()},
        "min_ms": {k: min(v) for k, v in s.items()},
        "rtt_ms": rtt,
        "convert_vs_direct": p50["c"] / p50["d"],
        "socks_minus_convert_rtts": (p50["s"] - p50["c"]) / rtt,
    }
    result["target_convert_vs_direct_met"] = result["convert_vs_direct"] <= TARGET_CONVERT_VS_DIRECT
    result["target_socks_rtt_met"] = result["socks_minus_convert_rtts"] >= 1.0
    return result


def render(res: dict, raw: dict, args: argparse.Namespace) -> str:
    rtt = res["rtt_ms"]
    rows = [("scenario", "TTFB p50 ms", "p90 ms", "min ms", "p50 in RTTs", "vs (d)")]
    for key, label in SCENARIOS:
        rows.append((label, f"{res['p50_ms'][key]:.1f}", f"{res['p90_ms'][key]:.1f}",
                     f"{res['min_ms'][key]:.1f}", f"{res['p50_ms'][key] / rtt:.2f}",
                     f"{res['p50_ms'][key] / res['p50_ms']['d']:.2f}"))
    lines = [
        f"TTFB, path delay {args.delay:g} ms each way, {args.rounds} connections per scenario "
        f"(interleaved); measured RTT (TCP_INFO, p50) {rtt:.1f} ms",
        _format(rows),
        "",
        f"(c)/(d) p50: {res['convert_vs_direct']:.2f} (target <= {TARGET_CONVERT_VS_DIRECT:.2f}: "
        f"{'met' if res['target_convert_vs_direct_met'] else 'NOT met'})",
        f"(s)-(c) p50: {res['socks_minus_convert_rtts']:.2f} RTT (target >= 1 RTT: "
        f"{'met' if res['target_socks_rtt_met'] else 'NOT met'})",
        f"evidence: converter TCPFastOpenPassive +{raw['tfo_passive']} for {args.rounds} (c) "
        f"connections; library TFO outcomes {raw['tfo_outcomes']}; every answer "
        f"({len(ANSWER)} B) byte-compared; client legs to the proxy TCP_IS_MPTCP=1",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay", type=float, default=20.0, metavar="MS",
                        help="one-way delay of the client-proxy path (default 20)")
    parser.add_argument("--rounds", type=int, default=40, metavar="N",
                        help="connections per scenario (default 40)")
    parser.add_argument("--quick", action="store_true", help="10 rounds")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 10
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    try:
        raw = run(args)
    except BenchError as exc:
        print(f"benchmark broke: {exc}", file=sys.stderr)
        return 1
    if raw["tfo_passive"] < args.rounds:
        print(f"benchmark broke: only {raw['tfo_passive']} of {args.rounds} converter "
              "connections had SYN data", file=sys.stderr)
        return 1
    res = analyze(raw, args)
    print(render(res, raw, args))
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS_DIR / f"ttfb-{stamp}.json"
    out.write_text(json.dumps({"args": vars(args), "raw": raw, "result": res,
                               "machine": {"kernel": platform.release(),
                                           "cpus": os.cpu_count()}}, indent=2) + "\n")
    print(f"results: {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
