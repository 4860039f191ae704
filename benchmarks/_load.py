"""Load generators for benchmarks/relay.py: servers and clients, one process each.

Standalone (standard library only) so it measures sockets, not the project's code.
Every subcommand prints one line per event on stdout: ``ready`` once it can be
used, and clients end with one JSON line of results. Times are
``time.monotonic()``, which is one clock for every process on the machine (no
time namespaces), so the orchestrator can line up streams from many processes.

Design rules (the generators must never be the bottleneck):
- Bulk: blocking sockets, 1 MiB ``send`` of a memoryview slice, ``recv_into`` a
  preallocated 1 MiB buffer; one process per stream (the server forks one child
  per connection). Hashing only on fixed-volume integrity transfers.
- Connection rate: c=1 is a blocking loop; c>1 is one non-blocking epoll loop
  keeping ``c`` connections in flight. The server is a blocking accept loop:
  accept, send 1 KiB, close: four syscalls per connection.
- TCP_NODELAY on every socket (accepted MPTCP sockets do not get it otherwise).
- Start barrier: clients connect, print ``ready`` and wait for a line on stdin
  (``--wait-go``), so process start-up never counts in a measurement.

Bulk wire protocol (client -> server, 24-byte header, then per op):
  ``MPXB`` op(1: ``U`` upload | ``D`` download) flags(1: bit0 hash) pad(2)
  volume(u64, 0 = by duration) duration_ms(u32) seed(u32)
  U: client sends the pattern, SHUT_WR; server counts to EOF, answers one JSON
     line, closes.  D: server sends the pattern, SHUT_WR; client counts to EOF.
The pattern is a seeded random block of a length that is no power of two
(1 MiB + 4093), repeated: lost, duplicated or reordered chunks change the hash.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import random
import resource
import select
import signal
import socket
import struct
import sys
import time

IPPROTO_MPTCP = 262
TCP_IS_MPTCP = 43
CHUNK = 1 << 20
PATTERN_LEN = (1 << 20) + 4093
HEADER = struct.Struct("!4sccHQII")
MAGIC = b"MPXB"
FLAG_HASH = 1
CONN_REPLY = 1024
IDLE_GREETING = b"!"


# -- helpers ------------------------------------------------------------------

def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parse_addr(text: str) -> tuple[int, tuple]:
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, (host, int(port))


def proto_number(name: str) -> int:
    return IPPROTO_MPTCP if name == "mptcp" else socket.IPPROTO_TCP


def new_socket(family: int, proto: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def listener(addr: str, proto: str, backlog: int = 4096) -> socket.socket:
    family, sockaddr = parse_addr(addr)
    sock = socket.socket(family, socket.SOCK_STREAM, proto_number(proto))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(sockaddr)
    sock.listen(backlog)
    return sock


def is_mptcp(sock: socket.socket) -> bool:
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, TCP_IS_MPTCP) == 1
    except OSError:
        return False


def say(obj: object) -> None:
    line = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def wait_go() -> None:
    say("ready")
    if not sys.stdin.readline():
        sys.exit(0)  # the orchestrator went away


def cpu_times() -> tuple[float, float]:
    t = os.times()
    return t.user, t.system


class Pattern:
    """The deterministic byte stream: ``view(offset, n)`` without copying."""

    def __init__(self, seed: int) -> None:
        base = random.Random(seed).randbytes(PATTERN_LEN)
        self.buf = memoryview(base + base[:CHUNK])

    def view(self, offset: int, n: int = CHUNK) -> memoryview:
        start = offset % PATTERN_LEN
        return self.buf[start:start + min(n, CHUNK)]

    def sha256(self, volume: int) -> str:
        h = hashlib.sha256()
        off = 0
        while off < volume:
            v = self.view(off, volume - off)
            h.update(v)
            off += len(v)
        return h.hexdigest()


def send_pattern(sock: socket.socket, pattern: Pattern, volume: int, duration: float) -> int:
    """Send by volume (>0) or for ``duration`` seconds; return bytes sent."""
    off = 0
    if volume:
        while off < volume:
            off += sock.send(pattern.view(off, volume - off))
        return off
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        off += sock.send(pattern.view(off))
    return off


def receive(sock: socket.socket, want_hash: bool) -> dict:
    """Read to EOF; bytes, first/last byte times, optional SHA-256."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    h = hashlib.sha256() if want_hash else None
    total = 0
    t_first = t_last = 0.0
    recv_into = sock.recv_into
    while True:
        n = recv_into(view, CHUNK)
        if not n:
            break
        if not total:
            t_first = time.monotonic()
        total += n
        if h is not None:
            h.update(view[:n])
    t_last = time.monotonic()
    return {"bytes": total, "t_first": t_first, "t_last": t_last,
            "sha256": h.hexdigest() if h is not None else None}


# -- bulk -----------------------------------------------------------------------

def cmd_bulk_server(args: argparse.Namespace) -> None:
    lsock = listener(args.listen, args.proto)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reap themselves
    say("ready")
    while True:
        conn, _ = lsock.accept()
        if os.fork() == 0:
            lsock.close()
            try:
                bulk_session(conn)
            except OSError:
                pass
            os._exit(0)
        conn.close()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("short header")
        data += chunk
    return data


def bulk_session(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    magic, op, flags, _, volume, duration_ms, seed = HEADER.unpack(recv_exact(conn, HEADER.size))
    if magic != MAGIC:
        return
    u0, s0 = cpu_times()
    if op == b"U":
        result = receive(conn, bool(flags[0] & FLAG_HASH))
        u1, s1 = cpu_times()
        result.update(cpu_user=u1 - u0, cpu_sys=s1 - s0, mptcp=is_mptcp(conn))
        conn.sendall(json.dumps(result).encode() + b"\n")
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(4096):
            pass
    elif op == b"D":
        send_pattern(conn, Pattern(seed), volume, duration_ms / 1000)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(4096):
            pass
    conn.close()


def cmd_bulk_client(args: argparse.Namespace) -> None:
    family, addr = parse_addr(args.connect)
    sock = new_socket(family, proto_number(args.proto))
    sock.connect(addr)
    mptcp = is_mptcp(sock)
    if args.wait_go:
        wait_go()
    flags = FLAG_HASH if args.hash else 0
    op = b"U" if args.op == "up" else b"D"
    sock.sendall(HEADER.pack(MAGIC, op, bytes([flags]), 0, args.volume,
                             int(args.duration * 1000), args.seed))
    pattern = Pattern(args.seed)
    u0, s0 = cpu_times()
    t0 = time.monotonic()
    out: dict = {"op": args.op, "mptcp": mptcp, "t_go": t0}
    if op == b"U":
        sent = send_pattern(sock, pattern, args.volume, args.duration)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        u1, s1 = cpu_times()
        peer = json.loads(reply)
        out.update(bytes=peer["bytes"], t_first=peer["t_first"], t_last=peer["t_last"],
                   sent=sent, sha256=peer["sha256"], server_mptcp=peer["mptcp"],
                   recv_cpu=peer["cpu_user"] + peer["cpu_sys"],
                   recv_cpu_user=peer["cpu_user"],
                   send_cpu=(u1 - u0) + (s1 - s0), send_cpu_user=u1 - u0)
    else:
        result = receive(sock, args.hash)
        u1, s1 = cpu_times()
        out.update(result, recv_cpu=(u1 - u0) + (s1 - s0), recv_cpu_user=u1 - u0)
    sock.close()
    if args.hash:
        expected = pattern.sha256(args.volume)
        out["sha_ok"] = out["sha256"] == expected and out["bytes"] == args.volume
        out["sha_expected"] = expected
    say(out)


# -- connection rate ---------------------------------------------------------------

def cmd_conn_server(args: argparse.Namespace) -> None:
    lsock = listener(args.listen, args.proto)
    reply = bytes(range(256)) * (args.size // 256) + bytes(args.size % 256)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    for _ in range(args.procs - 1):
        if os.fork() == 0:
            break
    else:
        say("ready")
    accept = lsock.accept
    nodelay = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        try:
            conn, _ = accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                time.sleep(0.01)
            continue
        try:
            conn.setsockopt(*nodelay)
            conn.send(reply)
        except OSError:
            pass
        conn.close()


def cmd_connrate(args: argparse.Namespace) -> None:
    family, addr = parse_addr(args.connect)
    proto = proto_number(args.proto)
    if args.wait_go:
        wait_go()
    u0, s0 = cpu_times()
    if args.concurrency == 1:
        res = connrate_blocking(family, addr, proto, args.duration, args.size)
    else:
        res = connrate_epoll(family, addr, proto, args.duration, args.size, args.concurrency)
    u1, s1 = cpu_times()
    res["cpu"] = (u1 - u0) + (s1 - s0)
    res["cpu_user"] = u1 - u0
    say(res)


def connrate_blocking(family, addr, proto, duration, size) -> dict:
    lat: list[int] = []
    errors = mptcp = 0
    t_start = time.monotonic()
    deadline = t_start + duration
    now = t_start
    while now < deadline:
        t0 = time.monotonic()
        s = socket.socket(family, socket.SOCK_STREAM, proto)
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(5)
            s.connect(addr)
            mptcp += is_mptcp(s)
            got = 0
            t_last = 0.0
            while True:
                data = s.recv(4096)
                if not data:
                    break
                got += len(data)
                if got >= size and not t_last:
                    t_last = time.monotonic()
            if got == size:
                lat.append(int((t_last - t0) * 1e6))
            else:
                errors += 1
        except OSError:
            errors += 1
        finally:
            s.close()
        now = time.monotonic()
    return {"completed": len(lat), "errors": errors, "mptcp": mptcp,
            "t_start": t_start, "t_end": deadline, "lat_us": lat}


def connrate_epoll(family, addr, proto, duration, size, concurrency) -> dict:
    ep = select.epoll()
    conns: dict[int, list] = {}   # fd -> [sock, t0, got, t_last, checked]
    lat: list[int] = []
    late = errors = mptcp = 0
    EIN = select.EPOLLIN
    nodelay = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    monotonic = time.monotonic

    def start() -> None:
        nonlocal errors
        s = socket.socket(family, socket.SOCK_STREAM, proto)
        s.setblocking(False)
        s.setsockopt(*nodelay)
        t0 = monotonic()
        err = s.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS):
            errors += 1
            s.close()
            return
        fd = s.fileno()
        conns[fd] = [s, t0, 0, 0.0, False]
        ep.register(fd, EIN)

    def finish(fd: int, ok: bool) -> None:
        nonlocal errors, late
        c = conns.pop(fd)
        ep.unregister(fd)
        c[0].close()
        if ok:
            if c[3] <= deadline:
                lat.append(int((c[3] - c[1]) * 1e6))
            else:
                late += 1
        else:
            errors += 1

    t_start = monotonic()
    deadline = t_start + duration
    for _ in range(concurrency):
        start()
    stop_at = deadline + 5.0
    while conns:
        events = ep.poll(1.0)
        now = monotonic()
        for fd, _ev in events:
            c = conns.get(fd)
            if c is None:
                continue
            s = c[0]
            if not c[4]:
                c[4] = True
                mptcp += is_mptcp(s)
            try:
                while True:
                    data = s.recv(4096)
                    if not data:
                        finish(fd, c[2] == size)
                        break
                    c[2] += len(data)
                    if c[2] >= size and not c[3]:
                        c[3] = monotonic()
            except BlockingIOError:
                continue
            except OSError:
                finish(fd, False)
            if now < deadline:
                start()
        if now > stop_at:
            for fd in list(conns):
                finish(fd, False)
    ep.close()
    return {"completed": len(lat), "errors": errors, "late": late, "mptcp": mptcp,
            "t_start": t_start, "t_end": deadline, "lat_us": lat}


# -- idle connections ------------------------------------------------------------------

def cmd_idle_server(args: argparse.Namespace) -> None:
    raise_nofile()
    lsock = listener(args.listen, args.proto)
    lsock.setblocking(False)
    ep = select.epoll()
    ep.register(lsock.fileno(), select.EPOLLIN)
    conns: dict[int, socket.socket] = {}
    say("ready")
    while True:
        for fd, _ev in ep.poll():
            if fd == lsock.fileno():
                while True:
                    try:
                        conn, _ = lsock.accept()
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        if exc.errno in (errno.EMFILE, errno.ENFILE):
                            time.sleep(0.01)
                        break
                    conn.setblocking(False)
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    try:
                        conn.send(IDLE_GREETING)
                    except OSError:
                        conn.close()
                        continue
                    conns[conn.fileno()] = conn
                    ep.register(conn.fileno(), select.EPOLLIN)
            else:
                conn = conns.get(fd)
                if conn is None:
                    continue
                try:
                    if conn.recv(4096):
                        continue
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                ep.unregister(fd)
                del conns[fd]
                conn.close()


def cmd_idle_client(args: argparse.Namespace) -> None:
    """Open ``count`` connections, each waiting for the server's greeting; hold them."""
    raise_nofile()
    family, addr = parse_addr(args.connect)
    proto = proto_number(args.proto)
    ep = select.epoll()
    pending: dict[int, socket.socket] = {}
    held: list[socket.socket] = []
    errors = mptcp = started = 0
    t0 = time.monotonic()
    deadline = t0 + args.timeout
    while (started < args.count or pending) and time.monotonic() < deadline:
        while started < args.count and len(pending) < args.window:
            s = socket.socket(family, socket.SOCK_STREAM, proto)
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            started += 1
            err = s.connect_ex(addr)
            if err not in (0, errno.EINPROGRESS):
                errors += 1
                s.close()
                continue
            pending[s.fileno()] = s
            ep.register(s.fileno(), select.EPOLLIN)
        for fd, _ev in ep.poll(0.5):
            s = pending.pop(fd)
            ep.unregister(fd)
            try:
                ok = s.recv(16) == IDLE_GREETING
            except OSError:
                ok = False
            if ok:
                mptcp += is_mptcp(s)
                held.append(s)
            else:
                errors += 1
                s.close()
    errors += len(pending)
    say({"established": len(held), "errors": errors, "mptcp": mptcp,
         "seconds": time.monotonic() - t0})
    sys.stdin.readline()  # hold until told (or until the orchestrator exits)
    for s in held:
        s.close()


# -- main ------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, server: bool):
        if server:
            sp.add_argument("--listen", required=True, metavar="ADDR:PORT")
        else:
            sp.add_argument("--connect", required=True, metavar="ADDR:PORT")
            sp.add_argument("--wait-go", action="store_true",
                            help="print 'ready', then start on a line from stdin")
        sp.add_argument("--proto", choices=("mptcp", "tcp"), default="mptcp")

    sp = sub.add_parser("bulk-server")
    common(sp, True)
    sp.set_defaults(func=cmd_bulk_server)

    sp = sub.add_parser("bulk-client")
    common(sp, False)
    sp.add_argument("--op", choices=("up", "down"), required=True)
    sp.add_argument("--duration", type=float, default=3.0)
    sp.add_argument("--volume", type=int, default=0, help="bytes; 0 = by duration")
    sp.add_argument("--hash", action="store_true")
    sp.add_argument("--seed", type=int, default=1)
    sp.set_defaults(func=cmd_bulk_client)

    sp = sub.add_parser("conn-server")
    common(sp, True)
    sp.add_argument("--size", type=int, default=CONN_REPLY)
    sp.add_argument("--procs", type=int, default=1)
    sp.set_defaults(func=cmd_conn_server)

    sp = sub.add_parser("connrate")
    common(sp, False)
    sp.add_argument("--concurrency", type=int, default=1)
    sp.add_argument("--duration", type=float, default=3.0)
    sp.add_argument("--size", type=int, default=CONN_REPLY)
    sp.set_defaults(func=cmd_connrate)

    sp = sub.add_parser("idle-server")
    common(sp, True)
    sp.set_defaults(func=cmd_idle_server)

    sp = sub.add_parser("idle-client")
    common(sp, False)
    sp.add_argument("--count", type=int, default=5000)
    sp.add_argument("--window", type=int, default=256, help="connects in flight")
    sp.add_argument("--timeout", type=float, default=60.0)
    sp.set_defaults(func=cmd_idle_client)

    args = p.parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
