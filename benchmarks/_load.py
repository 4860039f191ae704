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
- ``conncheck`` (benchmarks/convert.py) is ``connrate`` that also compares every
  reply with ``conn-server``'s bytes, times the first byte, and can open each
  connection with an RFC 8803 Convert request (in the SYN with TCP Fast Open,
  or after the handshake). Only that option imports the project (its client
  handshake builds the request and parses the converter's replies).

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


# -- connection rate, checked: content, time to first byte, RFC 8803 Convert -----------

TCP_FASTOPEN_NO_COOKIE = 34   # <linux/tcp.h>; missing from Python's socket module
CONVERT_WORD = 4              # RFC 8803 §4.1: Total Length counts 32-bit words
TIMEVAL = struct.Struct("@ll")


def conn_pattern(size: int) -> bytes:
    """The bytes ``conn-server`` sends (keep in step with cmd_conn_server)."""
    return bytes(range(256)) * (size // 256) + bytes(size % 256)


class ConvertReplies:
    """Builds the Convert request and judges the converter's replies.

    The one place this file uses the project's code (imported only with
    ``--convert-target``): the request comes from
    ``ConvertClientHandshake(target).request_bytes()`` and replies are parsed
    by ``ConvertClientHandshake.feed``. ``every``: a fresh handshake parses every
    reply (40-100 us of client CPU each, measured). ``memo``: each distinct reply byte string
    is parsed once by a fresh handshake and its verdict reused, which is exact
    (the verdict is a pure function of the bytes) and costs ~1 us, so the
    client's CPU, shared with the proxy on a small machine, stays what it is
    for the other scenarios.
    """

    def __init__(self, target: str, every: bool) -> None:
        src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
        if src not in sys.path:
            sys.path.insert(0, src)
        from mptcp_proxy.modes.convert_client import ConvertClientHandshake
        self._handshake = ConvertClientHandshake
        self.target = parse_addr(target)[1]
        self.request = ConvertClientHandshake(self.target).request_bytes()
        self.every = every
        self._verdicts: dict[bytes, str | None] = {}
        self.counts: dict[bytes, int] = {}
        self.parsed = 0

    @staticmethod
    def length(buf: bytearray) -> int | None:
        """Length of the converter's message at the start of ``buf``; None: need more."""
        if len(buf) < 2:
            return None
        return buf[1] * CONVERT_WORD or CONVERT_WORD  # 0 is Malformed: the parser says so

    def check(self, reply: bytes) -> str | None:
        """None if the converter accepted, else the error kind."""
        self.counts[reply] = self.counts.get(reply, 0) + 1
        if not self.every and reply in self._verdicts:
            return self._verdicts[reply]
        self.parsed += 1
        handshake = self._handshake(self.target)
        try:
            accepted = handshake.feed(reply)
        except Exception as exc:  # ConvertRefused, ConvertProtocolError: typed, with a code
            code = getattr(exc, "code", None)
            verdict = f"convert:{type(exc).__name__}:{int(code) if code is not None else '-'}"
        else:
            verdict = ("convert:incomplete" if accepted is None
                       else "convert:overlong" if accepted.leftover else None)
        self._verdicts[reply] = verdict
        return verdict

    def summary(self) -> dict:
        return {"request": self.request.hex(), "parse": "every" if self.every else "memo",
                "parsed": self.parsed,
                "replies": {r.hex(): n for r, n in self.counts.items()},
                "verdicts": {r.hex(): v or "accepted" for r, v in self._verdicts.items()}}


class CheckStats:
    def __init__(self) -> None:
        self.lat: list[int] = []
        self.ttfb: list[int] = []
        self.errors: dict[str, int] = {}
        self.late = self.mptcp = self.syn_queued = self.syn_missed = 0
        self.fin_lag_max = 0.0   # last byte -> EOF, seconds
        self.fin_lag_over_10ms = 0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def fin_lag(self, lag: float) -> None:
        if lag > self.fin_lag_max:
            self.fin_lag_max = lag
        if lag > 0.01:
            self.fin_lag_over_10ms += 1

    def result(self, t_start: float, t_end: float, conv: ConvertReplies | None) -> dict:
        out = {"completed": len(self.lat), "errors": sum(self.errors.values()),
               "errors_by_kind": self.errors, "late": self.late, "mptcp": self.mptcp,
               "syn_queued": self.syn_queued, "syn_missed": self.syn_missed,
               "fin_lag_max_us": int(self.fin_lag_max * 1e6),
               "fin_lag_over_10ms": self.fin_lag_over_10ms,
               "t_start": t_start, "t_end": t_end, "lat_us": self.lat, "ttfb_us": self.ttfb}
        if conv is not None:
            out["convert"] = conv.summary()
        return out


def _errno_kind(exc: OSError) -> str:
    return "os:" + errno.errorcode.get(exc.errno or 0, str(exc.errno))


def cmd_conncheck(args: argparse.Namespace) -> None:
    family, addr = parse_addr(args.connect)
    proto = proto_number(args.proto)
    conv = (ConvertReplies(args.convert_target, args.parse == "every")
            if args.convert_target else None)
    expected = conn_pattern(args.size)
    if args.wait_go:
        wait_go()
    u0, s0 = cpu_times()
    if args.concurrency == 1:
        res = conncheck_blocking(family, addr, proto, args.duration, expected, conv,
                                 args.convert_send == "syn", args.timeout, args.fin_timeout)
    else:
        res = conncheck_epoll(family, addr, proto, args.duration, expected, conv,
                              args.convert_send == "syn", args.concurrency, args.timeout,
                              args.fin_timeout)
    u1, s1 = cpu_times()
    res["cpu"] = (u1 - u0) + (s1 - s0)
    res["cpu_user"] = u1 - u0
    say(res)


def _timeout_kind(phase: str, buf: bytearray, expected: bytes, what: str) -> str:
    """Error kind of a connection given up on: all bytes right but no EOF is
    ``fin-missed`` (seen on MPTCP client sockets that fell back to TCP)."""
    if phase == "payload" and buf == expected:
        return "fin-missed"
    return f"{phase}:{len(buf) if phase == 'payload' else ''}:{what}"


def _timeval(seconds: float) -> bytes:
    return TIMEVAL.pack(int(seconds), int(seconds % 1 * 1e6))


def conncheck_blocking(family, addr, proto, duration, expected, conv, tfo, timeout,
                       fin_timeout) -> dict:
    """One connection at a time on a blocking socket (SO_RCVTIMEO/SO_SNDTIMEO)."""
    st = CheckStats()
    size = len(expected)
    monotonic = time.monotonic
    timeo = _timeval(timeout)
    fin_timeo = _timeval(fin_timeout) if fin_timeout and fin_timeout < timeout else None
    request = conv.request if conv is not None else b""
    t_start = monotonic()
    deadline = t_start + duration
    now = t_start
    while now < deadline:
        t0 = monotonic()
        s = socket.socket(family, socket.SOCK_STREAM, proto)
        phase = "connect"
        buf = bytearray()
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeo)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeo)  # connect too
            if conv is None:
                s.connect(addr)
            elif tfo:
                s.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, 1)
                # Blocking: returns once connected, with what the SYN carried.
                n = s.sendto(request, socket.MSG_FASTOPEN, addr)
                if n == len(request):
                    st.syn_queued += 1
                else:
                    st.syn_missed += 1
                    s.sendall(request[n:])
            else:
                s.connect(addr)
                s.sendall(request)
            st.mptcp += is_mptcp(s)
            if conv is not None:
                phase = "convert"
                while True:
                    want = conv.length(buf)
                    if want is not None and len(buf) >= want:
                        break
                    data = s.recv(4096)
                    if not data:
                        raise _Fail("convert:eof")
                    buf += data
                verdict = conv.check(bytes(buf[:want]))
                if verdict:
                    raise _Fail(verdict)
                del buf[:want]
            phase = "payload"
            t_first = monotonic() if buf else 0.0
            t_last = t_first if len(buf) >= size else 0.0
            armed = fin_timeo is None
            while True:
                if t_last and not armed:   # all bytes in: now only the FIN is awaited
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, fin_timeo)
                    armed = True
                data = s.recv(4096)
                if not data:
                    break
                if not t_first:
                    t_first = monotonic()
                buf += data
                if not t_last and len(buf) >= size:
                    t_last = monotonic()
            if t_last:
                st.fin_lag(monotonic() - t_last)
            if buf == expected:
                st.lat.append(int((t_last - t0) * 1e6))
                st.ttfb.append(int((t_first - t0) * 1e6))
            else:
                st.error("short" if len(buf) != size else "mismatch")
        except _Fail as exc:
            st.error(exc.kind)
        except OSError as exc:
            st.error(_timeout_kind(phase, buf, expected, _errno_kind(exc)))
        finally:
            s.close()
        now = monotonic()
    return st.result(t_start, deadline, conv)


class _Fail(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def conncheck_epoll(family, addr, proto, duration, expected, conv, tfo, concurrency,
                    timeout, fin_timeout) -> dict:
    """``concurrency`` connections in flight in one non-blocking epoll loop; each
    is given up on ``timeout`` seconds after it started, or ``fin_timeout``
    after its last byte without EOF."""
    st = CheckStats()
    size = len(expected)
    ep = select.epoll()
    # fd -> [sock, t0, stage (0 converter reply, 1 payload), buf, t_first, t_last,
    #        checked (TCP_IS_MPTCP read), unsent request bytes]
    conns: dict[int, list] = {}
    EIN, EOUT = select.EPOLLIN, select.EPOLLOUT
    nodelay = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    no_cookie = (socket.IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, 1)
    monotonic = time.monotonic
    request = conv.request if conv is not None else b""
    first_stage = 0 if conv is not None else 1

    def start() -> None:
        t0 = monotonic()
        s = socket.socket(family, socket.SOCK_STREAM, proto)
        s.setblocking(False)
        s.setsockopt(*nodelay)
        unsent = b""
        try:
            if conv is not None and tfo:
                s.setsockopt(*no_cookie)
                try:
                    n = s.sendto(request, socket.MSG_FASTOPEN, addr)
                except BlockingIOError:   # EINPROGRESS: nothing queued (no TFO)
                    n = 0
                if n == len(request):
                    st.syn_queued += 1
                else:
                    st.syn_missed += 1
                    unsent = request[n:]
            else:
                err = s.connect_ex(addr)
                if err not in (0, errno.EINPROGRESS):
                    raise OSError(err, os.strerror(err))
                unsent = request
        except OSError as exc:
            st.error("connect::" + _errno_kind(exc))
            s.close()
            return
        fd = s.fileno()
        conns[fd] = [s, t0, first_stage, bytearray(), 0.0, 0.0, False, unsent]
        ep.register(fd, EOUT if unsent else EIN)

    def finish(fd: int, kind: str | None) -> None:
        c = conns.pop(fd)
        ep.unregister(fd)
        c[0].close()
        if kind is not None:
            st.error(kind)
        elif c[5] <= deadline:
            st.lat.append(int((c[5] - c[1]) * 1e6))
            st.ttfb.append(int((c[4] - c[1]) * 1e6))
        else:
            st.late += 1

    def payload(c: list, data) -> None:
        if not c[4]:
            c[4] = monotonic()
        buf = c[3]
        buf += data
        if not c[5] and len(buf) >= size:
            c[5] = monotonic()

    t_start = monotonic()
    deadline = t_start + duration
    for _ in range(concurrency):
        start()
    next_scan = t_start + 0.1
    while conns:
        events = ep.poll(0.1)
        now = monotonic()
        for fd, _ev in events:
            c = conns.get(fd)
            if c is None:
                continue
            s = c[0]
            if c[7]:   # connected (or failed): send the Convert request now
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                try:
                    if err:
                        raise OSError(err, os.strerror(err))
                    s.send(c[7])   # 24 bytes into an empty send buffer
                except OSError as exc:
                    finish(fd, "connect::" + _errno_kind(exc))
                else:
                    c[7] = b""
                    ep.modify(fd, EIN)
                    continue
                if now < deadline:
                    start()
                continue
            if not c[6]:
                c[6] = True
                st.mptcp += is_mptcp(s)
            done = False
            try:
                while True:
                    data = s.recv(4096)
                    if not data:
                        buf = c[3]
                        if c[5]:
                            st.fin_lag(monotonic() - c[5])
                        if c[2] == 0:
                            finish(fd, "convert:eof")
                        elif buf == expected:
                            finish(fd, None)
                        else:
                            finish(fd, "short" if len(buf) != size else "mismatch")
                        done = True
                        break
                    if c[2] == 1:
                        payload(c, data)
                        continue
                    buf = c[3]
                    buf += data
                    want = conv.length(buf)
                    if want is None or len(buf) < want:
                        continue
                    verdict = conv.check(bytes(buf[:want]))
                    if verdict:
                        finish(fd, verdict)
                        done = True
                        break
                    rest = bytes(buf[want:])
                    c[2] = 1
                    c[3] = bytearray()
                    if rest:
                        payload(c, rest)
            except BlockingIOError:
                continue
            except OSError as exc:
                finish(fd, f"{'convert' if c[2] == 0 else 'payload'}:{len(c[3])}:"
                           + _errno_kind(exc))
                done = True
            if done and now < deadline:
                start()
        if now >= next_scan:
            next_scan = now + 0.1
            for fd in [fd for fd, c in conns.items() if now - c[1] > timeout
                       or (fin_timeout and c[5] and now - c[5] > fin_timeout)]:
                c = conns[fd]
                phase = "connect" if c[7] else "convert" if c[2] == 0 else "payload"
                finish(fd, _timeout_kind(phase, c[3], expected, "timeout"))
                if now < deadline:
                    start()
    ep.close()
    return st.result(t_start, deadline, conv)


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

    sp = sub.add_parser("conncheck", help="connection rate with every reply checked, "
                        "time to first byte, optional RFC 8803 Convert request")
    common(sp, False)
    sp.add_argument("--concurrency", type=int, default=1)
    sp.add_argument("--duration", type=float, default=3.0)
    sp.add_argument("--size", type=int, default=CONN_REPLY)
    sp.add_argument("--convert-target", metavar="ADDR:PORT",
                    help="--connect is an RFC 8803 converter: ask it for this target")
    sp.add_argument("--convert-send", choices=("syn", "after"), default="syn",
                    help="the Convert request rides in the SYN (TCP Fast Open with "
                         "TCP_FASTOPEN_NO_COOKIE) or follows the handshake (default syn)")
    sp.add_argument("--parse", choices=("memo", "every"), default="memo",
                    help="parse each distinct converter reply once, or every reply")
    sp.add_argument("--timeout", type=float, default=5.0,
                    help="give a connection up after this many seconds (default 5)")
    sp.add_argument("--fin-timeout", type=float, default=0.0,
                    help="give a connection up this long after its last byte if no EOF "
                         "came (counted as fin-missed; default 0: only --timeout)")
    sp.set_defaults(func=cmd_conncheck)

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
