#!/usr/bin/env python3
"""Standalone reproducer: MPTCP delivers wrong bytes on multipath connections
when the receiver writes a few bytes back early (Linux 6.18.44, upstream MPTCP),
with or without DSS checksums.

The trigger is --server-write BYTES: the server send()s BYTES to the client
right after accept() (or after its first recv, or once ESTABLISHED) while the
client uploads; the second subflow joins during the upload.  Without it no
wrong transfer was ever seen.  Each wrong transfer prints a SIGNATURE line:
the wrong payload range and which range of the expected stream it is a copy of.

Needs root, iproute2 (ip, tc), Python 3.11+, standard library only.  Builds its
own network namespaces (prefix "dssr-"), never touches the root namespace's
sysctls, and removes everything on exit (including Ctrl-C).

Topology (no router):

    client ns                         server ns
    c0 10.71.1.1/24 ---- tbf ---- s0 10.71.1.2/24   (server address)
    c1 10.71.2.1/24 ---- tbf ---- s1 10.71.2.2/24

  The client has a "subflow" endpoint on 10.71.2.1; policy routing sends the
  join to 10.71.1.2 out of c1.

Topology (--router):

    client ns               router ns              server ns
    c0 10.71.1.1 --tbf-- r0 10.71.1.254
    c1 10.71.2.1 --tbf-- r1 10.71.2.254  r2 10.71.3.254 ---- s0 10.71.3.2

Each connection i carries S deterministic pseudo-random bytes derived from
(seed, i).  The receiver hashes them (SHA-256) and, when wrong, locates the
first differing byte and searches the expected stream for the bytes it got
instead (a shifted copy says "data from another place in the stream").

Exit code: 0 when the measurement ran (whatever it found), 2 on setup errors.

Examples:
    sudo python3 repro_dss_corruption.py --router --server-write 4 --checksum both --tfo \
        --connections 300          # ~1-3 % wrong: payload [0,376) = copy of [65160,65536)
    sudo python3 repro_dss_corruption.py --router --server-write 4 --checksum off \
        --direction both --connections 300   # ~25 %: [14200,28400) = copy of [65140,79340)
    sudo python3 repro_dss_corruption.py --router --checksum both --tfo --connections 300  # 0
"""
from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import os
import random
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

IPPROTO_MPTCP = 262
SOL_MPTCP = 284
MPTCP_INFO = 1
TCP_FASTOPEN = 23
TCP_FASTOPEN_NO_COOKIE = 34
MSG_FASTOPEN = 0x20000000
MAGIC = b"DSSR"
HDR = struct.Struct("!4sIQB3x")  # magic, index, size, direction(0 up, 1 down)
PORT = 5777
JOIN_EP_ID = 9

# --------------------------------------------------------------------------
# helpers shared by the roles


def expected_bytes(seed: int, idx: int, size: int) -> bytes:
    return random.Random(seed * 1_000_003 + idx).randbytes(size)


def mptcp_info(sock: socket.socket) -> dict:
    try:
        raw = sock.getsockopt(SOL_MPTCP, MPTCP_INFO, 96)
    except OSError as e:
        return {"error": str(e)}
    d = {"subflows": raw[0] if raw else None}
    if len(raw) > 42:
        d["csum_enabled"] = raw[42]
    if len(raw) > 80:
        d["subflows_total"] = raw[80]
    return d


def recv_all(sock: socket.socket, reader: str, read_size: int, limit: int | None = None) -> bytes:
    """Read until EOF (or until `limit` bytes)."""
    chunks = []
    got = 0
    if reader == "blocking":
        sock.setblocking(True)
        while limit is None or got < limit:
            want = read_size if limit is None else min(read_size, limit - got)
            try:
                b = sock.recv(want)
            except BlockingIOError:  # SO_RCVTIMEO expired
                raise TimeoutError("recv timed out (SO_RCVTIMEO)")
            if not b:
                break
            chunks.append(b)
            got += len(b)
    else:
        sock.setblocking(False)
        try:
            while limit is None or got < limit:
                r, _, _ = select.select([sock], [], [], 60)
                if not r:
                    raise TimeoutError("select timed out")
                want = read_size if limit is None else min(read_size, limit - got)
                try:
                    b = sock.recv(want)
                except BlockingIOError:
                    continue
                if not b:
                    break
                chunks.append(b)
                got += len(b)
        finally:
            sock.setblocking(True)
    return b"".join(chunks)


def set_timeouts(sock: socket.socket, secs: int = 60) -> None:
    tv = struct.pack("ll", secs, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def analyse(got: bytes, exp: bytes, max_ranges: int = 4) -> dict:
    """Describe how `got` differs from `exp`."""
    res: dict = {"len_got": len(got), "len_exp": len(exp)}
    n = min(len(got), len(exp))
    if got[:n] == exp[:n]:
        res["first_diff"] = n if len(got) != len(exp) else None
        res["kind"] = "length only"
        return res
    # coarse scan in 64-byte blocks, then refine each bad run to byte precision
    B = 64
    runs: list[list[int]] = []
    for off in range(0, n, B):
        if got[off:off + B] != exp[off:off + B]:
            if runs and runs[-1][1] == off:
                runs[-1][1] = min(off + B, n)
            else:
                runs.append([off, min(off + B, n)])
    ranges = []
    for s, e in runs:
        while s < e and got[s] == exp[s]:
            s += 1
        while e > s and got[e - 1] == exp[e - 1]:
            e -= 1
        ranges.append((s, e))
    res["first_diff"] = ranges[0][0]
    res["bad_ranges"] = len(ranges)
    res["bad_bytes_total"] = sum(e - s for s, e in ranges)
    details = []
    for s, e in ranges[:max_ranges]:
        win = got[s:min(e, s + 64)]
        d = {"start": s, "end": e, "len": e - s}
        if win.count(0) == len(win):
            d["content"] = "zeros"
        else:
            srcs = []
            p = exp.find(win)
            while p != -1 and len(srcs) < 3:
                srcs.append(p)
                p = exp.find(win, p + 1)
            if srcs:
                d["content"] = "copy of expected stream"
                d["source_offsets"] = srcs
                d["shift"] = srcs[0] - s  # >0: bytes from later in stream, <0: earlier
                # does the whole bad run come from that same shifted place?
                src = srcs[0]
                d["whole_run_is_shifted_copy"] = got[s:e] == exp[src:src + (e - s)]
            else:
                d["content"] = "not found in expected stream"
        details.append(d)
    res["ranges"] = details
    kinds = {d.get("content") for d in details}
    res["kind"] = ", ".join(sorted(k for k in kinds if k))
    return res


# --------------------------------------------------------------------------
# server role (runs inside the server namespace)


EARLY_BYTE = b"E"
TCP_SYN_RECV = 3


def tcp_state(sock: socket.socket) -> int:
    # MPTCP answers TCP_INFO with the first subflow's tcp_info; byte 0 is tcpi_state
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def early_write(conn: socket.socket, args, when: str) -> None:
    """The trigger: a small server->client write while the client's upload starts."""
    if args.server_write <= 0 or args.server_write_when != when:
        return
    if when == "established":
        t_end = time.monotonic() + 5
        while tcp_state(conn) == TCP_SYN_RECV and time.monotonic() < t_end:
            time.sleep(0.0002)
    state = tcp_state(conn)
    conn.sendall(EARLY_BYTE * args.server_write)
    with STATE_LOCK:
        WRITE_STATES[state] = WRITE_STATES.get(state, 0) + 1


STATE_LOCK = threading.Lock()
WRITE_STATES: dict[int, int] = {}


def server_conn(conn: socket.socket, args) -> None:
    try:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        set_timeouts(conn)
        early_write(conn, args, "accept")
        early_write(conn, args, "established")
        hdr = recv_all(conn, "blocking", HDR.size, limit=HDR.size)
        if len(hdr) != HDR.size:
            return
        early_write(conn, args, "after-first-read")
        magic, idx, size, direction = HDR.unpack(hdr)
        if magic != MAGIC:
            conn.sendall(json.dumps({"error": "bad header", "hdr": hdr.hex()}).encode())
            return
        if direction in (0, 2):  # upload: read, hash, verify, reply with a JSON verdict
            t0 = time.monotonic()
            got = recv_all(conn, args.reader, args.read_size)
            dt = time.monotonic() - t0
            exp = expected_bytes(args.seed, idx, size)
            ok = hashlib.sha256(got).digest() == hashlib.sha256(exp).digest()
            rep = {"idx": idx, "ok": ok, "len": len(got), "recv_time": dt,
                   "info": mptcp_info(conn)}
            with STATE_LOCK:
                rep["write_states"] = dict(WRITE_STATES)
            if not ok:
                rep["analysis"] = analyse(got, exp)
            if direction == 2:  # both: verdict (length-prefixed), then our own stream
                v = json.dumps(rep).encode()
                conn.sendall(struct.pack("!I", len(v)) + v
                             + expected_bytes(args.seed, idx + 1_000_000, size))
            else:
                conn.sendall(json.dumps(rep).encode())
        else:  # download: send the stream and close
            data = expected_bytes(args.seed, idx, size)
            conn.sendall(data)
            info = mptcp_info(conn)
            conn.shutdown(socket.SHUT_WR)
            # wait for the client's close so the FIN exchange completes
            try:
                recv_all(conn, "blocking", 4096)
            except Exception:
                pass
            _ = info
    except Exception as e:  # report, keep serving
        print(f"server conn error: {e!r}", file=sys.stderr, flush=True)
    finally:
        conn.close()


def role_server(args) -> int:
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if args.tfo:
        ls.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN, 128)
        ls.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, 1)
    ls.bind(("0.0.0.0", PORT))
    ls.listen(128)
    print("READY", flush=True)
    while True:
        conn, _ = ls.accept()
        threading.Thread(target=server_conn, args=(conn, args), daemon=True).start()


# --------------------------------------------------------------------------
# client role (runs inside the client namespace)


def ip_quiet(*a: str) -> None:
    subprocess.run(["ip", *a], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def client_one(args, idx: int) -> dict:
    direction = {"up": 0, "down": 1, "both": 2}[args.direction]
    hdr = HDR.pack(MAGIC, idx, args.size, direction)
    rec: dict = {"idx": idx}
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    set_timeouts(s)
    timer = None
    t0 = time.monotonic()
    try:
        if args.join_delay > 0 and args.paths == 2:
            timer = threading.Timer(args.join_delay, ip_quiet, args=(
                "mptcp", "endpoint", "add", args.join_addr, "dev", "c1",
                "id", str(JOIN_EP_ID), "subflow"))
            timer.start()
        if args.tfo:
            s.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, 1)
            s.sendto(hdr, MSG_FASTOPEN, (args.server_addr, PORT))
        else:
            s.connect((args.server_addr, PORT))
            s.sendall(hdr)
        if direction == 2:
            s.sendall(expected_bytes(args.seed, idx, args.size))
            s.shutdown(socket.SHUT_WR)
            got = recv_all(s, args.reader, args.read_size)
            if args.server_write > 0:
                early, got = got[:args.server_write], got[args.server_write:]
                rec["early_ok"] = early == EARLY_BYTE * args.server_write
            rec["elapsed"] = time.monotonic() - t0
            rec["info"] = mptcp_info(s)
            (vlen,) = struct.unpack("!I", got[:4])
            up = json.loads(got[4:4 + vlen])
            body = got[4 + vlen:]
            exp = expected_bytes(args.seed, idx + 1_000_000, args.size)
            down_ok = hashlib.sha256(body).digest() == hashlib.sha256(exp).digest()
            rec["up_ok"] = up.get("ok")
            rec["down_ok"] = down_ok
            rec["ok"] = bool(up.get("ok")) and down_ok
            rec["len"] = len(body)
            if not up.get("ok"):
                rec["analysis_up"] = up.get("analysis")
            if not down_ok:
                rec["analysis"] = analyse(body, exp)
        elif direction == 0:
            s.sendall(expected_bytes(args.seed, idx, args.size))
            rec["sender_info"] = mptcp_info(s)
            s.shutdown(socket.SHUT_WR)
            reply = recv_all(s, "blocking", 65536)
            if args.server_write > 0:
                early, reply = reply[:args.server_write], reply[args.server_write:]
                rec["early_ok"] = early == EARLY_BYTE * args.server_write
            rec["elapsed"] = time.monotonic() - t0
            try:
                rec.update(json.loads(reply))
            except ValueError:
                rec["ok"] = None
                rec["error"] = f"bad verdict from server: {reply[:200]!r}"
        else:
            got = recv_all(s, args.reader, args.read_size)
            rec["elapsed"] = time.monotonic() - t0
            rec["info"] = mptcp_info(s)
            if args.server_write > 0:
                early, got = got[:args.server_write], got[args.server_write:]
                rec["early_ok"] = early == EARLY_BYTE * args.server_write
            exp = expected_bytes(args.seed, idx, args.size)
            rec["len"] = len(got)
            rec["ok"] = hashlib.sha256(got).digest() == hashlib.sha256(exp).digest()
            if not rec["ok"]:
                rec["analysis"] = analyse(got, exp)
    except Exception as e:
        rec["ok"] = None
        rec["error"] = repr(e)
        rec["elapsed"] = time.monotonic() - t0
    finally:
        s.close()
        if timer is not None:
            timer.cancel()
            timer.join()
            ip_quiet("mptcp", "endpoint", "del", "id", str(JOIN_EP_ID))
    return rec


def role_client(args) -> int:
    if args.parallel <= 1:
        out = [client_one(args, i) for i in range(args.connections)]
    else:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(max_workers=args.parallel) as ex:
            out = list(ex.map(lambda i: client_one(args, i), range(args.connections)))
    json.dump(out, sys.stdout)
    sys.stdout.flush()
    return 0


# --------------------------------------------------------------------------
# orchestrator (root namespace: only creates/destroys its own namespaces)


class Lab:
    def __init__(self, args):
        self.args = args
        suffix = "%06x" % random.SystemRandom().getrandbits(24)
        self.prefix = f"dssr-{suffix}"
        self.c = f"{self.prefix}-c"
        self.s = f"{self.prefix}-s"
        self.r = f"{self.prefix}-r" if args.router else None
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.notes: list[str] = []

    # -- plumbing
    def sh(self, *cmd: str, ns: str | None = None, check: bool = True) -> str:
        full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
        p = subprocess.run(full, capture_output=True, text=True)
        if check and p.returncode != 0:
            raise RuntimeError(f"command failed: {' '.join(full)}: {p.stderr.strip()}")
        return p.stdout

    def ipn(self, ns: str, *a: str, check: bool = True) -> str:
        return self.sh("ip", "-n", ns, *a, check=check)

    def sysctl(self, ns: str, key: str, val) -> None:
        self.sh("sysctl", "-qw", f"{key}={val}", ns=ns)

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.kill()
                except Exception:
                    pass
                try:
                    p.wait(timeout=5)
                except Exception:
                    pass
        self.procs.clear()
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)
        self.namespaces.clear()

    # -- topology
    def tbf(self, ns: str, dev: str) -> None:
        rate = self.args.rate  # Mbit/s
        bps = rate * 1_000_000 / 8
        # bucket: --tbf-burst-ms of traffic (>= 16 KiB); queue: bucket plus
        # --tbf-queue-ms of traffic (>= 64 KiB).  A short queue means tail drops.
        burst = max(16 * 1024, int(bps * self.args.tbf_burst_ms / 1000))
        limit = burst + max(64 * 1024, int(bps * self.args.tbf_queue_ms / 1000))
        self.ipn(ns, "link", "set", dev, "up")
        self.sh("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{rate}mbit",
                "burst", str(burst), "limit", str(limit), ns=ns)

    def offloads(self, ns: str, dev: str) -> None:
        a = self.args
        if a.gro is None and a.tso is None:
            return
        if not shutil.which("ethtool"):
            if "no ethtool" not in self.notes:
                self.notes.append("no ethtool")
            return
        opts = []
        if a.gro is not None:
            opts += ["gro", "on" if a.gro else "off"]
        if a.tso is not None:
            opts += ["tso", "on" if a.tso else "off", "gso", "on" if a.tso else "off"]
        p = subprocess.run(["ip", "netns", "exec", ns, "ethtool", "-K", dev, *opts],
                           capture_output=True, text=True)
        if p.returncode != 0:
            self.notes.append(f"ethtool -K {dev} failed: {p.stderr.strip()}")

    def build(self) -> None:
        a = self.args
        nss = [self.c, self.s] + ([self.r] if self.r else [])
        for ns in nss:
            subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
            self.namespaces.append(ns)
            self.ipn(ns, "link", "set", "lo", "up")
            for k in ("all", "default"):
                self.sysctl(ns, f"net.ipv4.conf.{k}.rp_filter", 0)
            self.sysctl(ns, "net.mptcp.enabled", 1)
            # no_metrics_save=1: every connection starts from scratch (slow
            # start, no cached ssthresh), like fresh clients do
            self.sysctl(ns, "net.ipv4.tcp_no_metrics_save", 0 if a.metrics_save else 1)
        # checksum setting (per namespace)
        cs = a.checksum
        self.sysctl(self.c, "net.mptcp.checksum_enabled", 1 if cs in ("client", "both") else 0)
        self.sysctl(self.s, "net.mptcp.checksum_enabled", 1 if cs in ("server", "both") else 0)
        if a.tfo:
            self.sysctl(self.c, "net.ipv4.tcp_fastopen", 3)
            self.sysctl(self.s, "net.ipv4.tcp_fastopen", 3)
        C, S = self.c, self.s
        if not self.r:
            self.ipn(C, "link", "add", "c0", "type", "veth", "peer", "name", "s0", "netns", S)
            self.ipn(C, "link", "add", "c1", "type", "veth", "peer", "name", "s1", "netns", S)
            self.ipn(C, "addr", "add", "10.71.1.1/24", "dev", "c0")
            self.ipn(C, "addr", "add", "10.71.2.1/24", "dev", "c1")
            self.ipn(S, "addr", "add", "10.71.1.2/24", "dev", "s0")
            self.ipn(S, "addr", "add", "10.71.2.2/24", "dev", "s1")
            for ns, devs in ((C, ("c0", "c1")), (S, ("s0", "s1"))):
                for d in devs:
                    self.tbf(ns, d)
                    self.offloads(ns, d)
            self.ipn(C, "rule", "add", "from", "10.71.2.1", "table", "102")
            self.ipn(C, "route", "add", "10.71.1.0/24", "via", "10.71.2.2", "dev", "c1", "table", "102")
            a.server_addr = "10.71.1.2"
        else:
            R = self.r
            self.ipn(C, "link", "add", "c0", "type", "veth", "peer", "name", "r0", "netns", R)
            self.ipn(C, "link", "add", "c1", "type", "veth", "peer", "name", "r1", "netns", R)
            self.ipn(R, "link", "add", "r2", "type", "veth", "peer", "name", "s0", "netns", S)
            self.ipn(C, "addr", "add", "10.71.1.1/24", "dev", "c0")
            self.ipn(C, "addr", "add", "10.71.2.1/24", "dev", "c1")
            self.ipn(R, "addr", "add", "10.71.1.254/24", "dev", "r0")
            self.ipn(R, "addr", "add", "10.71.2.254/24", "dev", "r1")
            self.ipn(R, "addr", "add", "10.71.3.254/24", "dev", "r2")
            self.ipn(S, "addr", "add", "10.71.3.2/24", "dev", "s0")
            self.sysctl(R, "net.ipv4.ip_forward", 1)
            for ns, d in ((C, "c0"), (C, "c1"), (R, "r0"), (R, "r1")):
                self.tbf(ns, d)
                self.offloads(ns, d)
            for ns, d in ((R, "r2"), (S, "s0")):
                self.ipn(ns, "link", "set", d, "up")
                self.offloads(ns, d)
            self.ipn(C, "route", "add", "default", "via", "10.71.1.254", "dev", "c0")
            self.ipn(C, "rule", "add", "from", "10.71.2.1", "table", "102")
            self.ipn(C, "route", "add", "default", "via", "10.71.2.254", "dev", "c1", "table", "102")
            self.ipn(S, "route", "add", "default", "via", "10.71.3.254", "dev", "s0")
            a.server_addr = "10.71.3.2"
        for ns in nss:
            self.sh("sh", "-c", "for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 > $f; done", ns=ns)
        # MPTCP path manager: limits on both ends, subflow endpoint on the client
        for ns in (C, S):
            self.ipn(ns, "mptcp", "limits", "set", "subflows", "2", "add_addr_accepted", "2")
        a.join_addr = "10.71.2.1"
        if a.paths == 2 and a.join_delay <= 0:
            self.ipn(C, "mptcp", "endpoint", "add", "10.71.2.1", "dev", "c1",
                     "id", str(JOIN_EP_ID), "subflow")

    def counters(self, ns: str) -> dict:
        txt = self.sh("cat", "/proc/net/netstat", ns=ns)
        lines = txt.strip().split("\n")
        res = {}
        for i in range(0, len(lines) - 1, 2):
            k, v = lines[i].split(), lines[i + 1].split()
            pre = k[0].rstrip(":")
            for name, val in zip(k[1:], v[1:]):
                res[f"{pre}:{name}"] = int(val)
        return res

    def start_server(self) -> None:
        a = self.args
        cmd = ["ip", "netns", "exec", self.s, sys.executable, os.path.abspath(__file__),
               "--_role", "server", "--seed", str(a.seed), "--reader", a.reader,
               "--read-size", str(a.read_size), "--server-write", str(a.server_write),
               "--server-write-when", a.server_write_when] + (["--tfo"] if a.tfo else [])
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        line = p.stdout.readline()
        if line.strip() != "READY":
            raise RuntimeError(f"server did not start: {line!r} {p.stderr.read()}")
        self.server = p

    def run_client(self) -> list:
        a = self.args
        cmd = ["ip", "netns", "exec", self.c, sys.executable, os.path.abspath(__file__),
               "--_role", "client", "--seed", str(a.seed), "--reader", a.reader,
               "--read-size", str(a.read_size), "--connections", str(a.connections),
               "--size", str(a.size), "--direction", a.direction, "--paths", str(a.paths),
               "--join-delay", str(a.join_delay), "--parallel", str(a.parallel), "--_server-addr", a.server_addr,
               "--_join-addr", a.join_addr, "--server-write", str(a.server_write),
               "--server-write-when", a.server_write_when] + (["--tfo"] if a.tfo else [])
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        out, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"client failed rc={p.returncode}: {err[-2000:]}")
        return json.loads(out)


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def signature(rec: dict) -> str:
    """One line per wrong transfer: where the bytes are wrong and what they are.

    Offsets are payload offsets (after the 16-byte header); add 16 for the
    offset in the connection's byte stream."""
    parts = []
    for name in ("analysis_up", "analysis"):
        a = rec.get(name)
        if not a:
            continue
        way = {"analysis_up": "up", "analysis": "down" if "analysis_up" in rec or
               rec.get("down_ok") is not None else ""}[name]
        if rec.get("up_ok") is None and rec.get("down_ok") is None:
            way = ""
        head = f"#{rec['idx']}{(' ' + way) if way else ''}: got {a.get('len_got')} of " \
               f"{a.get('len_exp')} bytes"
        if a.get("kind") == "length only":
            parts.append(f"{head}, length only, first diff at {a.get('first_diff')}")
            continue
        rngs = []
        for d in a.get("ranges", []):
            t = f"[{d['start']},{d['end']}) {d['len']} B"
            if d.get("content") == "copy of expected stream":
                src = d["source_offsets"][0]
                t += (f" = copy of expected [{src},{src + d['len']})"
                      + ("" if d.get("whole_run_is_shifted_copy") else " (first 64 B only)"))
            else:
                t += f" = {d.get('content')}"
            rngs.append(t)
        more = a.get("bad_ranges", 0) - len(rngs)
        parts.append(f"{head}, {a.get('bad_bytes_total')} wrong bytes in "
                     f"{a.get('bad_ranges')} range(s): " + "; ".join(rngs)
                     + (f"; +{more} more" if more > 0 else ""))
    return " | ".join(parts) or f"#{rec['idx']}: no analysis"


INTERESTING_TCP = ("TCPFastOpenActive", "TCPFastOpenPassive", "TCPFastOpenPassiveFail",
                   "TCPFastOpenActiveFail", "TCPOFOQueue", "TCPAbortOnData")


def diff_counters(before: dict, after: dict) -> dict:
    d = {}
    for k, v in after.items():
        delta = v - before.get(k, 0)
        if delta and (k.startswith("MPTcpExt:") or k.split(":", 1)[1] in INTERESTING_TCP):
            d[k] = delta
    return d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--connections", type=int, default=100)
    ap.add_argument("--size", type=int, default=512 * 1024, help="bytes per connection")
    ap.add_argument("--rate", type=int, default=100, help="tbf rate per path, Mbit/s")
    ap.add_argument("--tbf-burst-ms", type=float, default=2.0,
                    help="tbf bucket size in ms of traffic (at least 16 KiB)")
    ap.add_argument("--tbf-queue-ms", type=float, default=10.0,
                    help="tbf queue (limit minus bucket) in ms of traffic (at least 64 KiB)")
    ap.add_argument("--metrics-save", action=argparse.BooleanOptionalAction, default=False,
                    help="keep TCP metrics between connections (net.ipv4.tcp_no_metrics_save=0)")
    ap.add_argument("--parallel", type=int, default=1,
                    help="connections in flight at once (1: one after the other)")
    ap.add_argument("--checksum", choices=["off", "client", "server", "both"], default="off",
                    help="where net.mptcp.checksum_enabled=1 is set")
    ap.add_argument("--router", action=argparse.BooleanOptionalAction, default=False,
                    help="put a forwarding namespace between client and server")
    ap.add_argument("--direction", choices=["up", "down", "both"], default="up",
                    help="up: client sends S bytes; down: server sends S bytes; both: client "
                         "sends S bytes and FIN, server verifies and answers S bytes of its own")
    ap.add_argument("--reader", choices=["blocking", "nonblocking"], default="blocking")
    ap.add_argument("--read-size", type=int, default=65536)
    ap.add_argument("--join-delay", type=float, default=0.0,
                    help="0: client subflow endpoint exists from the start (the kernel joins "
                         "right after the handshake, while data flows); >0: the endpoint is "
                         "added this many seconds after connect() and removed after the "
                         "connection (one connection at a time)")
    ap.add_argument("--paths", type=int, choices=[1, 2], default=2)
    ap.add_argument("--gro", action=argparse.BooleanOptionalAction, default=None,
                    help="ethtool -K gro on/off on every veth (skipped without ethtool)")
    ap.add_argument("--tso", action=argparse.BooleanOptionalAction, default=None,
                    help="ethtool -K tso/gso on/off on every veth (skipped without ethtool)")
    ap.add_argument("--tfo", action="store_true",
                    help="TCP Fast Open: server listener TCP_FASTOPEN+NO_COOKIE, client "
                         "TCP_FASTOPEN_NO_COOKIE and sendto(MSG_FASTOPEN) of the 16-byte header, "
                         "so the header rides in the SYN (every direction: with --direction up "
                         "this is a TFO upload); net.ipv4.tcp_fastopen=3 on both ends.  With "
                         "--direction down: the slow TFO-download symptom")
    ap.add_argument("--server-write", type=int, default=0, metavar="BYTES",
                    help="THE TRIGGER: the server writes this many bytes to the client right "
                         "after accept() (see --server-write-when), while the client uploads; "
                         "the client reads them only after its upload")
    ap.add_argument("--server-write-when", choices=["accept", "after-first-read", "established"],
                    default="accept",
                    help="accept: before the first recv(); after-first-read: after reading the "
                         "16-byte header; established: before the first recv(), once the first "
                         "subflow's tcpi_state is no longer SYN_RECV (matters with TFO)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--show-bad", type=int, default=5, help="analyse the first N wrong transfers")
    ap.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    ap.add_argument("--_role", choices=["server", "client"], help=argparse.SUPPRESS)
    ap.add_argument("--_server-addr", dest="server_addr", help=argparse.SUPPRESS)
    ap.add_argument("--_join-addr", dest="join_addr", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._role == "server":
        return role_server(args)
    if args._role == "client":
        return role_client(args)

    if args.parallel > 1 and args.join_delay > 0:
        print("--join-delay > 0 needs --parallel 1 (the endpoint is added per connection)",
              file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("must run as root", file=sys.stderr)
        return 2

    lab = Lab(args)
    atexit.register(lab.cleanup)

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        try:
            lab.build()
            lab.start_server()
        except Exception as e:
            print(f"setup error: {e}", file=sys.stderr)
            return 2
        ends = {"client": lab.c, "server": lab.s}
        before = {k: lab.counters(ns) for k, ns in ends.items()}
        load_before = loadavg()
        t0 = time.monotonic()
        try:
            recs = lab.run_client()
        except Exception as e:
            print(f"run error: {e}", file=sys.stderr)
            return 2
        wall = time.monotonic() - t0
        load_after = loadavg()
        time.sleep(0.2)
        after = {k: lab.counters(ns) for k, ns in ends.items()}
        deltas = {k: diff_counters(before[k], after[k]) for k in ends}
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        lab.cleanup()
        return 130
    finally:
        lab.cleanup()

    bad = [r for r in recs if r.get("ok") is False]
    if args.direction == "both":
        print(f"wrong uploads {sum(1 for r in recs if r.get('up_ok') is False)}, wrong downloads "
              f"{sum(1 for r in recs if r.get('down_ok') is False)}")
    err = [r for r in recs if r.get("ok") is None]
    good = [r for r in recs if r.get("ok") is True]
    el = [r["elapsed"] for r in recs if r.get("ok") is not None and "elapsed" in r]
    info_key = "info"
    csum = sorted({str(r.get(info_key, {}).get("csum_enabled")) for r in recs})
    subflows = {}
    for r in recs:
        inf = r.get(info_key, {})
        k = str(inf.get("subflows_total", inf.get("subflows")))
        subflows[k] = subflows.get(k, 0) + 1
    cfg = {k: getattr(args, k) for k in ("connections", "size", "rate", "checksum", "router",
                                         "direction", "reader", "read_size", "join_delay",
                                         "paths", "gro", "tso", "tfo", "seed",
                                         "tbf_burst_ms", "tbf_queue_ms", "metrics_save", "parallel",
                                         "server_write", "server_write_when")}
    summary = {
        "config": cfg, "kernel": os.uname().release, "wall_s": round(wall, 2),
        "ok": len(good), "wrong": len(bad), "errors": len(err),
        "elapsed_median_s": round(statistics.median(el), 4) if el else None,
        "elapsed_min_s": round(min(el), 4) if el else None,
        "elapsed_max_s": round(max(el), 4) if el else None,
        "goodput_median_mbit": round(args.size * 8 / statistics.median(el) / 1e6, 1) if el else None,
        "receiver_csum_enabled": csum,
        "receiver_subflows_total_hist": subflows,
        "counters": deltas, "notes": lab.notes,
        "loadavg_before": load_before, "loadavg_after": load_after,
        "early_bytes_wrong": sum(1 for r in recs if r.get("early_ok") is False),
        "server_tcp_state_at_early_write": next(
            (r.get("write_states") for r in reversed(recs) if r.get("write_states")), None),
        "signatures": [signature(r) for r in bad],
        "bad": [{"idx": r["idx"], "len": r.get("len"), "analysis": r.get("analysis"),
                 "analysis_up": r.get("analysis_up")}
                for r in bad[:args.show_bad]],
        "errors_detail": [{"idx": r["idx"], "error": r.get("error")} for r in err[:5]],
    }
    print(f"kernel {summary['kernel']}  config {json.dumps(cfg)}")
    print(f"transfers: {len(recs)}  ok {len(good)}  WRONG {len(bad)}  errors {len(err)}  "
          f"wall {wall:.1f}s")
    print(f"per-connection time: median {summary['elapsed_median_s']}s min "
          f"{summary['elapsed_min_s']}s max {summary['elapsed_max_s']}s  "
          f"(median goodput {summary['goodput_median_mbit']} Mbit/s)")
    print(f"receiver mptcpi_csum_enabled: {csum}; receiver subflows_total: {subflows}")
    print(f"loadavg before {load_before} after {load_after}")
    if args.server_write:
        print(f"early write: {args.server_write} bytes at {args.server_write_when}; server "
              f"tcpi_state at the write (count): {summary['server_tcp_state_at_early_write']} "
              f"(1 ESTABLISHED, 3 SYN_RECV); early bytes wrong at the client: "
              f"{summary['early_bytes_wrong']}")
    for end in ("client", "server"):
        d = deltas[end]
        print(f"{end} counter deltas: " + (", ".join(f"{k.split(':')[1]} +{v}" for k, v in
                                                     sorted(d.items())) or "none"))
    for sig in summary["signatures"]:
        print("SIGNATURE " + sig)
    for b in summary["bad"]:
        print(f"wrong transfer #{b['idx']}: {json.dumps(b['analysis'] or b['analysis_up'])}")
    for e in summary["errors_detail"]:
        print(f"error transfer #{e['idx']}: {e['error']}")
    if lab.notes:
        print("notes: " + "; ".join(lab.notes))
    print("RESULT " + json.dumps({k: summary[k] for k in ("ok", "wrong", "errors",
                                                           "elapsed_median_s")} | cfg))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
