"""Integrity benchmark: wrong bytes on multipath MPTCP, direct and through each mode.

    .venv/bin/python benchmarks/integrity.py [--transfers N] [--size BYTES] [--rate MBIT]
                                             [--concurrency C] [--modes ...]

Linux 6.18 can deliver wrong bytes (right length, wrong SHA-256) on multipath
MPTCP connections that run without DSS checksums (docs/kernel/dss-corruption.md).
This benchmark counts them. Lab: two client paths shaped to ``--rate``
Mbit/s each (default 100, the shape in which the reproducer shows the fault),
the second subflow joining once the connection is up; the client and server
namespaces do *not* ask for checksums (``Lab.create(dss_checksum=False)``).

Each transfer: the client sends ``--size`` bytes (default 512 KiB) and a FIN;
the server, a plain Python MPTCP server reading with blocking ``recv()``,
hashes what it got and answers the SHA-256 followed by ``--size`` bytes of its
own, which the client checks. Both directions are verified; every payload is a
distinct window of random bytes, so data from the wrong place in the stream
cannot pass.

Scenarios, one after the other, ``--transfers`` each (default 1,000):

  direct        client -> server, MPTCP end to end, checksums off on both
                hosts: the kernel's own rate (proves the benchmark sees it)
  forward       client -> ``mptcp-proxy forward --upstream mptcp`` -> server
  convert       client library (0-RTT) -> ``mptcp-proxy convert`` -> server
  socks5        client -> ``mptcp-proxy socks5`` -> server
  http-connect  client -> ``mptcp-proxy http-connect`` -> server
  agent         app (plain TCP) -> ``mptcp-proxy client --socks5 --no-direct``
                in the client namespace -> converter -> server

The proxies run the real CLI with default settings (DSS checksums on, off
for the converter); ``--proxy-args '--dss-checksum on|off'`` sets them, and
``--bidirectional`` makes the server send while it reads (a converter's
reply, an early answer), which is what the kernel's faults need.
Reported per scenario: transfers, wrong uploads, wrong downloads, failed
connections, how many had two subflows and ``mptcpi_csum_enabled`` on the
client's socket (the agent's MPTCP leg is its own: read from its log lines),
where the first wrong uploads went wrong, and the MPTcpExt counters that go
with the faults (DSSNotMatching, DataCsumErr, MPRst*, DuplicateData). Exit
status 1 if any proxied scenario has a wrong byte, a failed connection or a
leg whose checksum state is not the one asked for; the direct scenario's
wrong transfers are the kernel's and are reported, not failed on.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import re
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from mptcp_proxy.convert_client import open_connection  # noqa: E402
from mptcp_proxy.lab import Lab, PathSpec  # noqa: E402
from mptcp_proxy.lab.traffic import proxy_handshake, serve_each, set_client_subflows  # noqa: E402
from mptcp_proxy.observe.sockinfo import is_mptcp, mptcp_info  # noqa: E402
from relay import (  # noqa: E402
    CLI, Procs, begin_run, print_footer, progress, run_meta, wait_listening,
)

RESULTS_DIR = ROOT / "bench-results"
IPPROTO_MPTCP = 262
SERVER_PORT = 9000
PORTS = {"forward": 6000, "convert": 6001, "socks5": 6002, "http-connect": 6003}
AGENT_SOCKS = 1080
MODES = ("direct", "forward", "convert", "socks5", "http-connect", "agent")
COUNTERS = ("DSSNotMatching", "DataCsumErr", "MPRstTx", "MPRstRx", "DuplicateData",
            "MPTCPRetrans", "MPJoinAckRx")
BIDIRECTIONAL = [False]   # --bidirectional, set once by main()
POOL_FACTOR = 16          # random bytes kept: POOL_FACTOR x size, windows taken from it


@dataclass
class Tally:
    mode: str
    transfers: int = 0
    wrong_up: int = 0
    wrong_down: int = 0
    failed: int = 0
    multipath: int = 0
    checksummed: int = 0
    errors: list[str] = field(default_factory=list)
    first_wrong: list[dict] = field(default_factory=list)
    counters: dict = field(default_factory=dict)
    seconds: float = 0.0


class Pool:
    """Distinct windows of one random buffer: transfer i's upload and download."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = os.urandom(size * POOL_FACTOR)

    def window(self, i: int, salt: int) -> memoryview:
        start = ((i * 2 + salt) * 7919 * 64) % (len(self.data) - self.size)
        return memoryview(self.data)[start:start + self.size]


def locate(expected: bytes, got: bytes, pool: Pool) -> dict:
    """Where the first wrong byte is, and whether the wrong bytes are a copy of
    another part of the same stream (what a stale mapping would deliver)."""
    first = next(i for i, (a, b) in enumerate(zip(expected, got)) if a != b)
    probe = got[first:first + 64]
    source = expected.find(probe) if len(probe) == 64 else -1
    last = len(got) - next(i for i, (a, b) in enumerate(zip(reversed(expected), reversed(got)))
                           if a != b)
    return {"first_wrong_offset": first, "end_of_wrong": last,
            "copy_of_offset": source if source >= 0 else None}


class HashServer:
    """MPTCP server: read to EOF with blocking recv(), answer the digest and the
    transfer's download (its index comes first, 4 bytes)."""

    def __init__(self, lab: Lab, pool: Pool, bidirectional: bool = False) -> None:
        self.pool = pool
        self.bidirectional = bidirectional
        self.wrong: list[dict] = []     # where the first wrong uploads went wrong
        with lab.server.enter():
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", SERVER_PORT))
        self.sock.listen(256)
        self.addr = (lab.server_addr, SERVER_PORT)
        serve_each(self.sock, self._handle)

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(60)
            try:
                head = b""
                while len(head) < 4:
                    chunk = conn.recv(4 - len(head))
                    if not chunk:
                        return
                    head += chunk
                (index,) = struct.unpack("!I", head)
                sender = None
                if self.bidirectional:   # the download flows while the upload does
                    sender = threading.Thread(target=conn.sendall,
                                              args=(self.pool.window(index, 1),), daemon=True)
                    sender.start()
                got = bytearray()
                while chunk := conn.recv(1 << 16):
                    got += chunk
                expected = self.pool.window(index, 0)
                if got != expected and len(self.wrong) < 5:
                    where = (locate(bytes(expected), bytes(got), self.pool)
                             if len(got) == self.pool.size else {"length": len(got)})
                    self.wrong.append({"transfer": index, "direction": "up", **where})
                if sender is not None:
                    sender.join(60)
                    conn.sendall(hashlib.sha256(got).digest())
                else:
                    conn.sendall(hashlib.sha256(got).digest() + self.pool.window(index, 1))
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


def read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(1 << 16, n - len(buf)))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def handshake(sock: socket.socket, mode: str, target: tuple) -> None:
    """The proxy protocol of ``mode`` (the agent listens for SOCKS5); raises
    LabError when refused (counted as a failed connection)."""
    if mode in ("socks5", "agent"):
        proxy_handshake(sock, "socks5", target)
    elif mode == "http-connect":
        proxy_handshake(sock, "http-connect", target)


def one_transfer(lab: Lab, mode: str, proxy: tuple, target: tuple, index: int, pool: Pool,
                 tally: Tally, lock: threading.Lock) -> None:
    up = pool.window(index, 0)
    with lab.client.enter():
        if mode == "convert":
            sock = open_connection(proxy, target, first_bytes=struct.pack("!I", index),
                                   cache=None, tfo_no_cookie=True, timeout=10).sock
            head = b""
        else:
            proto = 0 if mode == "agent" else IPPROTO_MPTCP
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)
            head = struct.pack("!I", index)
    with sock:
        sock.settimeout(60)
        if mode != "convert":
            sock.connect(proxy)
            handshake(sock, mode, target)
        sock.sendall(head)
        sock.sendall(up)
        info = mptcp_info(sock) if mode != "agent" else None
        mptcp = is_mptcp(sock) if mode != "agent" else None
        sock.shutdown(socket.SHUT_WR)
        answer = read_exact(sock, 32 + pool.size)
    down = pool.window(index, 1)
    if BIDIRECTIONAL[0]:   # download first, digest last
        answer = answer[pool.size:] + answer[:pool.size]
    with lock:
        tally.transfers += 1
        if mode != "agent":
            tally.multipath += bool(mptcp and info and info.live_subflows >= 2)
            tally.checksummed += bool(info and info.csum_enabled)
        if len(answer) < 32 or answer[:32] != hashlib.sha256(up).digest():
            tally.wrong_up += 1
        if answer[32:] != down:
            tally.wrong_down += 1
            if len(answer) == 32 + pool.size and len(tally.first_wrong) < 5:
                tally.first_wrong.append({"transfer": index, "direction": "down",
                                          **locate(bytes(down), answer[32:], pool)})


def netstat(lab: Lab, role: str) -> dict[str, int]:
    mp = getattr(lab, role).netstat().get("MPTcpExt", {})
    return {k: v for k, v in mp.items() if k in COUNTERS}


def counters(lab: Lab) -> dict[str, dict[str, int]]:
    return {role: netstat(lab, role) for role in ("client", "proxy", "server")}


def run_scenario(lab: Lab, mode: str, proxy: tuple, target: tuple, args, pool: Pool,
                 say) -> Tally:
    tally = Tally(mode)
    lock = threading.Lock()
    before = counters(lab)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as ex:
        futures = [ex.submit(one_transfer, lab, mode, proxy, target, i, pool, tally, lock)
                   for i in range(args.transfers)]
        for f in futures:
            try:
                f.result()
            except Exception as exc:  # a failed connection is counted, never retried
                with lock:
                    tally.failed += 1
                    if len(tally.errors) < 5:
                        tally.errors.append(repr(exc))
    tally.seconds = time.monotonic() - started
    after = counters(lab)
    tally.counters = {role: {k: after[role].get(k, 0) - v for k, v in before[role].items()
                             if after[role].get(k, 0) - v}
                      for role in before}
    say(f"{mode}: {tally.transfers} transfers in {tally.seconds:.1f} s, wrong up "
        f"{tally.wrong_up}, wrong down {tally.wrong_down}, failed {tally.failed}")
    return tally


def agent_csum(log_text: str) -> tuple[int, int, int]:
    """The agent's MPTCP leg is its upstream: from its connection log lines,
    (lines, with upstream_csum=yes, with 2 or more upstream subflows)."""
    lines = [l for l in log_text.splitlines() if " mode=client " in l and "conn=" in l]
    csum = sum("upstream_csum=yes" in l for l in lines)
    multi = sum(bool(re.search(r"upstream_subflows=([2-9])", l)) for l in lines)
    return len(lines), csum, multi


def checksums_expected(mode: str, proxy_args: str) -> bool:
    """Whether ``mode``'s legs must be DSS-checksummed: as ``--proxy-args`` say,
    else the mode's default (off for the converter and with --tfo, else on)."""
    words = proxy_args.replace("=", " ").split()
    for a, b in zip(words, words[1:]):
        if a == "--dss-checksum":
            return b == "on"
    return mode != "convert" and "--tfo" not in words


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transfers", type=int, default=1000)
    ap.add_argument("--size", type=int, default=512 * 1024)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--proxy-args", default="", metavar="'ARGS'",
                    help="extra options for every proxy, e.g. '--copy' or '--dss-checksum off'")
    ap.add_argument("--no-tfo", action="store_true",
                    help="convert: the library sends the Convert request after the handshake")
    ap.add_argument("--bidirectional", action="store_true",
                    help="the server sends its bytes while it reads the upload (the reply of "
                         "a converter, an early server answer): the pattern that triggers "
                         "the checksum-path fault (docs/kernel/dss-corruption.md)")
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = ap.parse_args()
    BIDIRECTIONAL[0] = args.bidirectional
    if os.geteuid() != 0:
        print("integrity.py needs root (network namespaces)", file=sys.stderr)
        return 2
    busy_before, started, stamp = begin_run()
    meta = run_meta(stamp, transfers=args.transfers, size=args.size, rate=args.rate,
                    concurrency=args.concurrency, bidirectional=args.bidirectional,
                    proxy_args=args.proxy_args, no_tfo=args.no_tfo, machine_busy_before=busy_before)
    say = progress(started)
    pool = Pool(args.size)
    tallies: list[Tally] = []
    logdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"integrity-{stamp}"
    logdir.mkdir(parents=True, exist_ok=True)
    procs = Procs(logdir)
    with Lab.create([PathSpec(rate_mbit=args.rate), PathSpec(rate_mbit=args.rate)],
                    dss_checksum=False) as lab:
        try:
            set_client_subflows(lab, 2)
            if args.no_tfo:
                lab.client.sysctl("net.ipv4.tcp_fastopen", 0)   # the library then connect()s
            server = HashServer(lab, pool, args.bidirectional)
            target = server.addr
            k = lab.server_addr.split(".")[1]
            net = f"10.{k}.0.0/16"
            proxy_addr = lab.paths[0].proxy_addr
            argv = {
                "forward": ["forward", "--to", f"{target[0]}:{target[1]}", "--upstream", "mptcp"],
                "convert": ["convert", "--allow-target", net, "--tfo-no-cookie"],
                "socks5": ["socks5", "--allow-target", net],
                "http-connect": ["http-connect", "--allow-target", net],
            }
            for mode in args.modes:
                if mode == "direct":
                    tallies.append(run_scenario(lab, mode, target, target, args, pool, say))
                    continue
                if mode == "agent":
                    conv = procs.start(lab.proxy, [CLI, "convert", "--listen",
                                                   f"0.0.0.0:{PORTS['convert']}",
                                                   "--allow-target", net,
                                                   *args.proxy_args.split()],
                                       "converter for agent")
                    wait_listening(conv.pid, PORTS["convert"])
                    agent = procs.start(lab.client, [CLI, "client", "--converter",
                                                     f"{proxy_addr}:{PORTS['convert']}",
                                                     "--socks5", f"127.0.0.1:{AGENT_SOCKS}",
                                                     # through the converter every time, not
                                                     # straight to the MPTCP server (§5.1)
                                                     "--no-direct", *args.proxy_args.split()],
                                        "agent")
                    wait_listening(agent.pid, AGENT_SOCKS)
                    tally = run_scenario(lab, mode, ("127.0.0.1", AGENT_SOCKS), target, args,
                                         pool, say)
                    text = agent.stop(15)
                    conv.stop(15)
                    lines, csum, multi = agent_csum(text)
                    tally.checksummed, tally.multipath = csum, multi
                    if lines != tally.transfers:
                        tally.errors.append(f"agent logged {lines} of {tally.transfers}")
                    tallies.append(tally)
                    continue
                port = PORTS[mode]
                proc = procs.start(lab.proxy, [CLI, *argv[mode], "--listen",
                                               f"0.0.0.0:{port}", "--no-conn-log",
                                               *args.proxy_args.split()], mode)
                wait_listening(proc.pid, port)
                tallies.append(run_scenario(lab, mode, (proxy_addr, port), target, args,
                                            pool, say))
                proc.stop(15)
            server.close()
            for w in server.wrong:
                print(f"  server saw a wrong upload: {w}")
        finally:
            procs.kill_all()
    meta["seconds"] = time.time() - started

    print()
    print(f"Integrity: {args.transfers} transfers per scenario, {args.size} bytes each way, "
          f"2 paths of {args.rate:g} Mbit/s, hosts without checksums")
    head = ("scenario", "transfers", "wrong up", "wrong down", "failed", "2 subflows",
            "checksummed", "MPTcpExt (client / proxy / server)")
    rows = [head]
    for t in tallies:
        cnt = " / ".join(",".join(f"{k}+{v}" for k, v in t.counters.get(r, {}).items()) or "-"
                         for r in ("client", "proxy", "server"))
        rows.append((t.mode, str(t.transfers), str(t.wrong_up), str(t.wrong_down),
                     str(t.failed), f"{t.multipath}", f"{t.checksummed}", cnt))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    for t in tallies:
        for w in t.first_wrong:
            print(f"  {t.mode}: {w}")
        for e in t.errors:
            print(f"  {t.mode}: {e}")
    args.results_dir.mkdir(exist_ok=True)
    path = args.results_dir / f"integrity-{stamp}.json"
    path.write_text(json.dumps({"meta": meta, "scenarios": [t.__dict__ for t in tallies]},
                               indent=1, default=str))
    print_footer(meta, path)
    bad = [t.mode for t in tallies if t.mode != "direct" and
           (t.wrong_up or t.wrong_down or t.failed or t.checksummed !=
            (t.transfers if checksums_expected(t.mode, args.proxy_args) else 0))]
    if bad:
        print(f"FAILED: {', '.join(bad)}: wrong bytes, failures, or a leg whose checksum "
              "state is not the one asked for", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
