"""The relay: moves bytes between two connected sockets until both sides are done.

Every proxy mode ends here; only the handshake in front differs.

Design rules:
- Raw fds, non-blocking, driven by the :class:`Reactor` (level-triggered).
- Splice mode (default): socket -> pipe -> socket with ``os.splice``; payload
  never enters Python. A pipe is borrowed from the :class:`PipePool` only while a
  direction has bytes in flight, so idle connections hold two fds, not six.
- Copy mode: ``os.read``/``os.write`` through Python bytes. It is the fallback
  (no pipe available, splice refused by the fd type) and a reference
  implementation; both pass the same conformance suite.
- Backpressure: a direction holds at most one pipe (or one chunk) of data; when
  the destination would block, reading from the source stops until it drains.
- Half-close: EOF from one side becomes ``shutdown(SHUT_WR)`` on the other once
  every byte before it was delivered; the other direction keeps flowing.
- Errors (reset, broken pipe) on either side abort both: the surviving peer gets
  a RST (SO_LINGER 0), so it can never mistake a broken relay for a clean EOF.
- Timeouts: idle timeout per connection (lazy timer re-armed from
  ``last_active``). An optional close probe guards upstream MPTCP sockets that
  fell back to TCP and can miss the server's FIN (docs/KERNEL-FACTS.md, "fallback-close
  trap"): if the subflow sits in CLOSE_WAIT with nothing to read on two probes in
  a row, the direction is treated as ended.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import socket
import struct
import sys
import termios
from typing import Protocol

from mptcp_proxy.dataplane.pipes import PipePool
from mptcp_proxy.dataplane.reactor import (
    EPOLLERR, EPOLLET, EPOLLHUP, EPOLLIN, EPOLLOUT, Reactor, Timer,
)
from mptcp_proxy.observe.sockinfo import TCP_CLOSE_WAIT, SockInfoError, tcp_state

log = logging.getLogger(__name__)

SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
LINGER_ABORT = struct.pack("ii", 1, 0)
IPPROTO_MPTCP = 262
MIN_READ = 16384   # smallest read size: a few pages; FIONREAD may lag the subflows
PIPE_BUF = select.PIPE_BUF  # a write of at most this into an empty pipe is whole or nothing

# errnos meaning "this fd type cannot splice": fall back to copying.
_NO_SPLICE_ERRNOS = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})

# Close reasons (stable strings: they appear in logs and tests).
REASON_DONE = "done"              # both directions ended with EOF
REASON_IDLE = "idle-timeout"
REASON_SHUTDOWN = "shutdown"      # the proxy is stopping
REASON_CLIENT_RESET = "client-reset"
REASON_UPSTREAM_RESET = "upstream-reset"
REASON_CLIENT_ERROR = "client-error"
REASON_UPSTREAM_ERROR = "upstream-error"

_SIDE_NAMES = ("client", "upstream")


class RelayObserver(Protocol):
    def relay_closing(self, relay: "Relay") -> None:
        """Called once, fds still open (read socket stats here)."""

    def relay_closed(self, relay: "Relay") -> None:
        """Called once after both fds are closed."""

    def relay_first_eof(self, relay: "Relay") -> None:
        """Called when the first direction reads EOF (both peers still connected:
        the moment to sample subflows before they start going away)."""


class Direction:
    """One direction of a relay: bytes read from ``src`` are written to ``dst``."""

    __slots__ = ("src", "dst", "side", "sized_reads", "pipe", "pending", "buf", "eof",
                 "shut", "blocked", "bytes")

    def __init__(self, src: int, dst: int, side: int, sized_reads: bool = False) -> None:
        self.src = src
        self.dst = dst
        self.side = side          # 0: src is the client side, 1: src is the upstream side
        # Size each read by what is queued (FIONREAD): MPTCP has no splice_read,
        # so the kernel allocates and fills pages for the whole requested length
        # (a 1 MiB splice costs ~24 us even when it returns 1 KiB).
        self.sized_reads = sized_reads
        self.pipe: tuple[int, int] | None = None
        self.pending = 0          # bytes in the pipe (splice mode)
        self.buf: memoryview | None = None  # unsent bytes (copy mode)
        self.eof = False          # src returned EOF
        self.shut = False         # dst got SHUT_WR (direction finished)
        self.blocked = False      # waiting for dst to become writable
        self.bytes = 0            # bytes delivered to dst

    @property
    def in_flight(self) -> int:
        return self.pending + (len(self.buf) if self.buf is not None else 0)


class RelayEngine:
    """Owns the relays of one reactor: shared pipe pool, timers, limits."""

    def __init__(self, reactor: Reactor, *, splice: bool = True,
                 pipe_size: int = 1 << 20, copy_chunk: int = 256 << 10,
                 idle_timeout: float | None = 300.0, burst: int = 4,
                 probe_interval: float = 1.0,
                 observer: RelayObserver | None = None) -> None:
        self.reactor = reactor
        self.splice = splice
        self.pipes = PipePool(size=pipe_size)
        self.copy_chunk = copy_chunk
        self.idle_timeout = idle_timeout
        self.burst = burst        # read/write rounds per event before yielding to others
        self.probe_interval = probe_interval
        self.observer = observer
        self.relays: set[Relay] = set()
        self._probed: set[Relay] = set()
        self._probe_timer: Timer | None = None
        self.total_relays = 0

    def relay(self, client: socket.socket, upstream: socket.socket, *, meta: object = None,
              probe_upstream_close: bool = False,
              initial_to_upstream: bytes = b"", initial_to_client: bytes = b"") -> "Relay":
        """Start relaying between two connected, non-blocking sockets.

        The relay owns both sockets from now on and closes them when done.
        ``initial_*`` bytes (already read by a handshake) are sent first.
        """
        relay = Relay(self, client, upstream, meta)
        self.relays.add(relay)
        self.total_relays += 1
        if initial_to_upstream:
            relay.ab.buf = memoryview(initial_to_upstream)
        if initial_to_client:
            relay.ba.buf = memoryview(initial_to_client)
        if probe_upstream_close:
            self._probed.add(relay)
            if self._probe_timer is None:
                self._probe_timer = self.reactor.call_later(self.probe_interval, self._probe)
        relay.start()
        return relay

    def _probe(self) -> None:
        """Look for upstream subflows in CLOSE_WAIT that never signalled EOF."""
        self._probe_timer = None
        for relay in list(self._probed):
            relay.probe_upstream_close()
        if self._probed:
            self._probe_timer = self.reactor.call_later(self.probe_interval, self._probe)

    def close_all(self, reason: str = REASON_SHUTDOWN) -> None:
        for relay in list(self.relays):
            relay.close(reason, abort=True)

    def _forget(self, relay: "Relay") -> None:
        self.relays.discard(relay)
        self._probed.discard(relay)
        if not self._probed and self._probe_timer is not None:
            self._probe_timer.cancel()
            self._probe_timer = None

    def close(self) -> None:
        self.close_all()
        self.pipes.close()


class Relay:
    """One relayed connection: client fd ``a``, upstream fd ``b``."""

    __slots__ = ("engine", "sa", "sb", "a", "b", "ab", "ba", "meta", "started", "ended",
                 "last_active", "reason", "closed", "splice", "_idle_timer",
                 "_probe_strikes", "__weakref__")

    def __init__(self, engine: RelayEngine, sa: socket.socket, sb: socket.socket,
                 meta: object) -> None:
        self.engine = engine
        self.sa = sa              # client-side socket (owns fd a)
        self.sb = sb              # upstream socket (owns fd b)
        self.a = a = sa.fileno()
        self.b = b = sb.fileno()
        self.ab = Direction(a, b, 0, sa.proto == IPPROTO_MPTCP)   # client -> upstream
        self.ba = Direction(b, a, 1, sb.proto == IPPROTO_MPTCP)   # upstream -> client
        self.meta = meta
        self.started = engine.reactor.now
        self.ended = 0.0
        self.last_active = self.started
        self.reason = ""
        self.closed = False
        self.splice = engine.splice
        self._idle_timer: Timer | None = None
        self._probe_strikes = 0

    # -- public view ------------------------------------------------------
    @property
    def bytes_up(self) -> int:
        """Bytes delivered client -> upstream."""
        return self.ab.bytes

    @property
    def bytes_down(self) -> int:
        """Bytes delivered upstream -> client."""
        return self.ba.bytes

    @property
    def duration(self) -> float:
        return (self.ended or self.engine.reactor.now) - self.started

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> None:
        reactor = self.engine.reactor
        # Read interest from the start (one epoll_ctl per fd); a direction with
        # bytes from the handshake writes those first (its _pump updates masks).
        reactor.register(self.a, 0 if self.ab.buf is not None else EPOLLIN, self._on_a)
        reactor.register(self.b, 0 if self.ba.buf is not None else EPOLLIN, self._on_b)
        if self.engine.idle_timeout:
            self._idle_timer = reactor.call_later(self.engine.idle_timeout, self._check_idle)
        # Deliver bytes a handshake already read; otherwise wait for readiness
        # (a speculative read costs a syscall per side, and more on MPTCP).
        for d in (self.ab, self.ba):
            if d.buf is not None and not self.closed:
                if self.splice and len(d.buf) <= PIPE_BUF:
                    self._stage_initial(d)
                if not self.closed:
                    self._pump(d)

    def _stage_initial(self, d: Direction) -> None:
        """Put a handshake's bytes (a reply, early data) in a pipe, followed by what
        ``d.src`` has already received: one splice then sends both, in one segment
        instead of a small one and then the data (a converter's reply and the
        server's first bytes). Nothing waits: with nothing to read yet, the
        handshake's bytes go alone, at once."""
        pipes = self.engine.pipes
        pipe = pipes.acquire()
        if pipe is None:
            return  # out of fds: _pump writes the bytes from memory
        buf = d.buf
        assert buf is not None  # only called with handshake bytes
        try:
            n = os.write(pipe[1], buf)
        except OSError:
            pipes.release(pipe)  # nothing written: it is still empty
            return
        # pipe(7): an empty pipe takes up to PIPE_BUF bytes whole (or refuses them).
        assert n == len(buf)
        d.pipe = pipe
        d.pending = n
        d.buf = None
        size = pipes.size - n
        if d.sized_reads:
            size = min(size, max(MIN_READ, _queued(d.src)))
        try:
            d.pending += os.splice(d.src, pipe[1], size, flags=SPLICE_FLAGS)
        except BlockingIOError:
            pass  # nothing received yet
        except OSError as exc:
            if exc.errno in _NO_SPLICE_ERRNOS:
                self.splice = False  # as _pump does: it reads by copying from now on
                return
            # Without staging the handshake's bytes were sent before the read
            # failed: send them now, then fail the same way.
            try:
                os.splice(pipe[0], d.dst, d.pending, flags=SPLICE_FLAGS)
            except OSError:
                pass
            self._fail(d.side, exc.errno)
        # An EOF (0 bytes) is not recorded here: _pump's read meets it again.

    def _on_a(self, events: int) -> None:
        self._on_event(events, self.ab, self.ba)

    def _on_b(self, events: int) -> None:
        self._on_event(events, self.ba, self.ab)

    def _on_event(self, events: int, reading: Direction, writing: Direction) -> None:
        # ``reading`` has this fd as src, ``writing`` has it as dst.
        handled = False
        if events & EPOLLOUT and writing.blocked:
            handled = True
            writing.blocked = False
            self._pump(writing)
        if self.closed:
            return
        if events & (EPOLLIN | EPOLLERR | EPOLLHUP) and not reading.eof and not reading.blocked:
            handled = True
            self._pump(reading)
        if not handled and events & (EPOLLERR | EPOLLHUP) and not self.closed:
            # epoll reports ERR/HUP whatever the mask. ERR (or a pending SO_ERROR)
            # is a reset we must act on even with nothing to read. HUP alone is
            # legitimate (peer's FIN queued behind a blocked write, our FIN sent):
            # switch this fd to edge-triggered until our interest changes, or the
            # level-triggered HUP would spin the loop.
            sock = self.sa if reading.side == 0 else self.sb
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err or events & EPOLLERR:
                self._fail(reading.side, err or errno.ECONNRESET)
            else:
                reactor = self.engine.reactor
                fd = reading.src
                reactor.set_mask(fd, reactor.mask_of(fd) | EPOLLET)

    def _pump(self, d: Direction) -> None:
        """Move bytes for one direction until it would block, ends, or yields."""
        if self.closed:
            return
        self.last_active = self.engine.reactor.now
        rounds = self.engine.burst
        while True:
            # 1. Deliver what is in flight.
            if d.pending:
                try:
                    n = os.splice(d.pipe[0], d.dst, d.pending, flags=SPLICE_FLAGS)  # type: ignore[index]
                except BlockingIOError:
                    self._block(d)
                    return
                except OSError as exc:
                    self._fail(1 - d.side, exc.errno)
                    return
                d.pending -= n
                d.bytes += n
                if d.pending:
                    continue
            elif d.buf is not None:
                try:
                    n = os.write(d.dst, d.buf)
                except BlockingIOError:
                    self._block(d)
                    return
                except OSError as exc:
                    self._fail(1 - d.side, exc.errno)
                    return
                d.bytes += n
                if n < len(d.buf):
                    d.buf = d.buf[n:]
                    continue
                d.buf = None
            # 2. Nothing in flight: hand the pipe back, finish or read more.
            if d.pipe is not None:
                self.engine.pipes.release(d.pipe)
                d.pipe = None
            if d.eof:
                self._finish(d)
                return
            if rounds == 0:
                self._update_masks()  # still readable: level-triggered epoll calls again
                return
            rounds -= 1
            if self.splice:
                pipe = self.engine.pipes.acquire()
                if pipe is None:
                    n = self._read_copy(d)   # out of fds: degrade to copying this chunk
                else:
                    d.pipe = pipe
                    size = self.engine.pipes.size
                    if d.sized_reads:
                        size = min(size, max(MIN_READ, _queued(d.src)))
                    try:
                        n = os.splice(d.src, pipe[1], size, flags=SPLICE_FLAGS)
                    except BlockingIOError:
                        n = -1
                    except OSError as exc:
                        if exc.errno in _NO_SPLICE_ERRNOS:
                            self.splice = False
                            n = self._read_copy(d)
                        else:
                            self._fail(d.side, exc.errno)
                            return
                    else:
                        d.pending = n
            else:
                n = self._read_copy(d)
            if n < 0:
                if n == -1:
                    self._wait_readable(d)
                return    # -2: failed and closed
            if n == 0:
                d.eof = True
                other = self.ba if d is self.ab else self.ab
                if not other.eof and self.engine.observer is not None:
                    try:
                        self.engine.observer.relay_first_eof(self)
                    except Exception:  # an observer bug must not stop the loop
                        log.exception("relay observer failed in relay_first_eof")

    def _read_copy(self, d: Direction) -> int:
        """Read one chunk into ``d.buf``: >0 bytes, 0 EOF, -1 would block, -2 failed."""
        # Python allocates the whole requested size before reading: size it.
        size = min(self.engine.copy_chunk, max(MIN_READ, _queued(d.src)))
        try:
            data = os.read(d.src, size)
        except BlockingIOError:
            return -1
        except OSError as exc:
            self._fail(d.side, exc.errno)
            return -2
        if data:
            d.buf = memoryview(data)
        return len(data)

    def _block(self, d: Direction) -> None:
        d.blocked = True
        self._update_masks()

    def _wait_readable(self, d: Direction) -> None:
        if d.pipe is not None and not d.pending:
            self.engine.pipes.release(d.pipe)
            d.pipe = None
        self._update_masks()

    def _update_masks(self) -> None:
        ab, ba = self.ab, self.ba
        mask_a = (0 if ab.eof or ab.blocked else EPOLLIN) | (EPOLLOUT if ba.blocked else 0)
        mask_b = (0 if ba.eof or ba.blocked else EPOLLIN) | (EPOLLOUT if ab.blocked else 0)
        reactor = self.engine.reactor
        reactor.set_mask(self.a, mask_a)
        reactor.set_mask(self.b, mask_b)

    def _finish(self, d: Direction) -> None:
        """EOF read and every byte delivered: pass the FIN on."""
        if not d.shut:
            d.shut = True
            try:
                (self.sb if d.side == 0 else self.sa).shutdown(socket.SHUT_WR)
            except OSError as exc:
                if exc.errno not in (errno.ENOTCONN,):
                    self._fail(1 - d.side, exc.errno)
                    return
        if self.ab.shut and self.ba.shut:
            self.close(REASON_DONE)
        else:
            self._update_masks()

    def _fail(self, side: int, err: int | None) -> None:
        # ENOTCONN: what a reset MPTCP socket reports on read.
        if err in (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ENOTCONN):
            reason = REASON_CLIENT_RESET if side == 0 else REASON_UPSTREAM_RESET
        else:
            name = errno.errorcode.get(err or 0, str(err))
            reason = (REASON_CLIENT_ERROR if side == 0 else REASON_UPSTREAM_ERROR) + f":{name}"
        self.close(reason, abort=True)

    def _check_idle(self) -> None:
        self._idle_timer = None
        if self.closed:
            return
        timeout = self.engine.idle_timeout or 0.0
        deadline = self.last_active + timeout
        if self.engine.reactor.now >= deadline:
            self.close(REASON_IDLE, abort=True)
        else:
            self._idle_timer = self.engine.reactor.call_at(deadline, self._check_idle)

    def probe_upstream_close(self) -> None:
        """Detect a server FIN that a fallen-back MPTCP socket did not report."""
        d = self.ba
        if self.closed or d.eof or d.blocked or d.in_flight:
            self._probe_strikes = 0
            return
        try:
            state = tcp_state(self.sb)
        except (OSError, SockInfoError):
            state = -1   # unreadable: not the trap (an error shows up on the next read)
        if state != TCP_CLOSE_WAIT:
            self._probe_strikes = 0
            return
        before = d.bytes
        self._pump(d)  # a pending EOF or data shows up here if the socket reports it
        if self.closed or d.eof or d.bytes != before:
            self._probe_strikes = 0
            return
        self._probe_strikes += 1
        if self._probe_strikes >= 2:
            log.warning("upstream subflow in CLOSE_WAIT without EOF on the MPTCP socket: "
                        "treating as EOF (fallback-close guard)")
            d.eof = True
            self._pump(d)

    def close(self, reason: str, abort: bool = False) -> None:
        if self.closed:
            return
        engine = self.engine
        self.reason = reason
        if engine.observer is not None:
            try:
                engine.observer.relay_closing(self)
            except Exception:  # an observer bug must not leak fds
                log.exception("relay observer failed in relay_closing")
        self.closed = True
        self.ended = engine.reactor.now
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        reactor = engine.reactor
        for d in (self.ab, self.ba):
            if d.pipe is not None:
                if d.pending:
                    engine.pipes.discard(d.pipe)
                else:
                    engine.pipes.release(d.pipe)
                d.pipe = None
                d.pending = 0
            d.buf = None
        for fd, sock in ((self.a, self.sa), (self.b, self.sb)):
            reactor.forget(fd)  # close() below removes it from the epoll set
            if abort:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ABORT)
                except OSError:
                    pass  # already dead
            sock.close()
        self.a = self.b = -1
        engine._forget(self)
        if engine.observer is not None:
            try:
                engine.observer.relay_closed(self)
            except Exception:
                log.exception("relay observer failed in relay_closed")


def _queued(fd: int) -> int:
    """Bytes ready to read on a socket (FIONREAD); 0 when unknown."""
    try:
        return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), sys.byteorder)
    except OSError:
        return 0

