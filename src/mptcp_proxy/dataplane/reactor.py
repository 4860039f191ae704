"""A small epoll reactor: the one place that waits on file descriptors.

Why not asyncio: the relay moves bytes with splice between raw fds and needs
nothing but "tell me when fd X is readable/writable" plus timers. A direct epoll
loop costs a fraction of asyncio's per-event overhead (no Handle objects, no
transports), which is what connections/s through a Python proxy is made of.

Design rules:
- Level-triggered epoll; a handler is ``callback(events: int)`` per fd.
- Interest masks are cached so ``set_mask`` only issues epoll_ctl on a change.
- Timers are a heap of :class:`Timer` objects, cancelled lazily; the heap is
  rebuilt without the cancelled ones once they are most of it (every relay
  arms a 300 s idle timer and cancels it when it closes: at thousands of
  connections per second the dead entries would otherwise pile up for the
  whole timeout, hundreds of MB, and every garbage collection walks them).
- ``now`` is read once per loop iteration; handlers use ``reactor.now``.
- Signals arrive through ``signal.set_wakeup_fd`` and run as ordinary callbacks,
  never inside the signal handler.
- ``call_soon_threadsafe`` is the only entry point usable from other threads.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import os
import select
import signal
import threading
import time
from collections import deque
from typing import Callable

log = logging.getLogger(__name__)

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR
EPOLLHUP = select.EPOLLHUP
EPOLLRDHUP = select.EPOLLRDHUP
EPOLLET = select.EPOLLET

COMPACT_MIN = 1024   # cancelled timers before a heap rebuild is considered

Handler = Callable[[int], None]


class Timer:
    """A scheduled callback; ``cancel()`` is O(1) amortized (the heap entry is
    skipped, and dropped when the reactor compacts its heap)."""

    __slots__ = ("when", "callback", "cancelled", "seq", "reactor")

    def __init__(self, when: float, callback: Callable[[], None], seq: int,
                 reactor: "Reactor | None" = None) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False
        self.seq = seq
        self.reactor = reactor    # set while the timer waits in that reactor's heap

    def cancel(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        self.callback = _noop     # drops what the callback kept alive
        reactor = self.reactor
        if reactor is not None:
            self.reactor = None
            reactor._timer_cancelled()


def _noop() -> None:
    return None


class Reactor:
    """Single-threaded event loop over epoll."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._handlers: dict[int, Handler] = {}
        self._masks: dict[int, int] = {}
        # fds unregistered during the current batch of events: their remaining
        # events are stale (the number may already belong to a new socket).
        self._stale: set[int] = set()
        # Heap of (when, seq, timer): tuples compare in C, a Python __lt__ does not.
        self._timers: list[tuple[float, int, Timer]] = []
        self._cancelled = 0       # cancelled timers still in the heap
        self._seq = itertools.count()
        self._ready: deque[Callable[[], None]] = deque()
        self._threadsafe: deque[Callable[[], None]] = deque()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._signal_r, self._signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._signal_handlers: dict[int, Callable[[int], None]] = {}
        self._old_signal_handlers: dict[int, object] = {}
        self._old_wakeup_fd: int | None = None
        self._running = False
        self._thread_id: int | None = None
        self.now = time.monotonic()
        self.register(self._wake_fd, EPOLLIN, self._on_wake)
        self.register(self._signal_r, EPOLLIN, self._on_signal_fd)

    # -- file descriptors -------------------------------------------------
    def register(self, fd: int, mask: int, handler: Handler) -> None:
        """Watch ``fd``; an fd already watched changes owner (one epoll_ctl MOD:
        a handshake hands its socket to the relay without a DEL and an ADD)."""
        if fd in self._handlers:
            self._handlers[fd] = handler
            self.set_mask(fd, mask)
            return
        self._epoll.register(fd, mask)
        self._handlers[fd] = handler
        self._masks[fd] = mask

    def set_mask(self, fd: int, mask: int) -> None:
        """Change the interest mask of a registered fd (no syscall if unchanged)."""
        if self._masks.get(fd) != mask:
            self._epoll.modify(fd, mask)
            self._masks[fd] = mask

    def mask_of(self, fd: int) -> int:
        return self._masks.get(fd, 0)

    def set_handler(self, fd: int, handler: Handler) -> None:
        self._handlers[fd] = handler

    def unregister(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            self._masks.pop(fd, None)
            self._stale.add(fd)
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass  # already closed: the kernel dropped it from the set

    def forget(self, fd: int) -> None:
        """Drop ``fd`` that the caller is about to close: closing removes it from
        the epoll set, so this saves the epoll_ctl(DEL) syscall."""
        if self._handlers.pop(fd, None) is not None:
            self._masks.pop(fd, None)
            self._stale.add(fd)

    def is_registered(self, fd: int) -> bool:
        return fd in self._handlers

    # -- callbacks and timers ---------------------------------------------
    def call_soon(self, callback: Callable[[], None]) -> None:
        self._ready.append(callback)

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return self.call_at(self.now + max(0.0, delay), callback)

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        seq = next(self._seq)
        timer = Timer(when, callback, seq, self)
        heapq.heappush(self._timers, (when, seq, timer))
        return timer

    @property
    def timer_count(self) -> int:
        """Heap entries, the cancelled ones not yet dropped included."""
        return len(self._timers)

    def _timer_cancelled(self) -> None:
        self._cancelled += 1
        if self._cancelled >= COMPACT_MIN and 2 * self._cancelled > len(self._timers):
            self._compact_timers()

    def _compact_timers(self) -> None:
        """Drop cancelled entries: O(n), at most once per n/2 cancels."""
        timers = self._timers
        timers[:] = [entry for entry in timers if not entry[2].cancelled]  # in place: run() holds it
        heapq.heapify(timers)
        self._cancelled = 0

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        self._threadsafe.append(callback)
        try:
            os.eventfd_write(self._wake_fd, 1)
        except BlockingIOError:
            pass  # counter saturated: a wake-up is pending anyway

    def _on_wake(self, _events: int) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass
        while self._threadsafe:
            self._ready.append(self._threadsafe.popleft())

    # -- signals ----------------------------------------------------------
    def add_signal_handler(self, signum: int, callback: Callable[[int], None]) -> None:
        """Run ``callback(signum)`` from the loop when ``signum`` arrives (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers can only be installed from the main thread")
        if self._old_wakeup_fd is None:
            self._old_wakeup_fd = signal.set_wakeup_fd(self._signal_w, warn_on_full_buffer=False)
        self._signal_handlers[signum] = callback
        # A Python-level handler must exist for the wakeup fd to be written;
        # the real work happens in _on_signal_fd, outside the handler.
        self._old_signal_handlers[signum] = signal.signal(signum, _ignore_signal)

    def remove_signal_handlers(self) -> None:
        for signum, old in self._old_signal_handlers.items():
            signal.signal(signum, old)  # type: ignore[arg-type]
        self._old_signal_handlers.clear()
        self._signal_handlers.clear()
        if self._old_wakeup_fd is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd)
            self._old_wakeup_fd = None

    def _on_signal_fd(self, _events: int) -> None:
        try:
            data = os.read(self._signal_r, 64)
        except BlockingIOError:
            return
        for signum in data:
            handler = self._signal_handlers.get(signum)
            if handler is not None:
                handler(signum)

    # -- running ----------------------------------------------------------
    def stop(self) -> None:
        """Stop after the current iteration (call from the loop, or threadsafe)."""
        self._running = False
        if self._thread_id is not None and self._thread_id != threading.get_ident():
            self.call_soon_threadsafe(_noop)

    @property
    def running(self) -> bool:
        return self._running

    def run(self) -> None:
        self._running = True
        self._thread_id = threading.get_ident()
        poll = self._epoll.poll
        handlers = self._handlers
        timers = self._timers
        ready = self._ready
        monotonic = time.monotonic
        try:
            while self._running:
                if ready:
                    timeout = 0.0
                elif timers:
                    timeout = max(0.0, timers[0][0] - monotonic())
                else:
                    timeout = -1
                try:
                    events = poll(timeout, 1024)
                except InterruptedError:
                    events = ()
                self.now = now = monotonic()
                stale = self._stale
                stale.clear()
                for fd, ev in events:
                    if fd in stale:
                        continue
                    handler = handlers.get(fd)
                    if handler is not None:
                        handler(ev)
                while timers and timers[0][0] <= now:
                    timer = heapq.heappop(timers)[2]
                    if timer.cancelled:
                        self._cancelled -= 1
                    else:
                        timer.reactor = None  # fired: a late cancel() counts nothing
                        ready.append(timer.callback)
                for _ in range(len(ready)):
                    ready.popleft()()
        finally:
            self._running = False

    def close(self) -> None:
        self.remove_signal_handlers()
        for fd in (self._wake_fd, self._signal_r, self._signal_w):
            try:
                os.close(fd)
            except OSError as exc:  # pragma: no cover - closing our own fds
                if exc.errno != errno.EBADF:
                    raise
        self._epoll.close()
        self._handlers.clear()
        self._masks.clear()


def _ignore_signal(_signum: int, _frame: object) -> None:
    return None
