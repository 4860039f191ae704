"""Name resolution off the event loop: getaddrinfo(3) in a small thread pool.

getaddrinfo blocks, and a proxy's loop must not. Lookups run in worker
threads; their results come back to the reactor thread through
``call_soon_threadsafe``, so callbacks run like any other handler. A lookup
whose connection went away meanwhile is cancelled: its callback never runs.
Worker threads resolve in the namespace the pool's first thread was created
in (threads inherit the creating thread's namespace), with that namespace's
/etc/hosts and resolv.conf.
"""

from __future__ import annotations

import errno
import socket
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from mptcp_proxy.dataplane.reactor import Reactor

DEFAULT_THREADS = 4
DEFAULT_MAX_PENDING = 256    # lookups queued or running; above, resolve() refuses

Resolver = Callable[[str, int], list[str]]
"""``resolver(name, port)`` -> IP address strings, best first; raises OSError on failure."""

ResolveCallback = Callable[[list[str] | None, BaseException | None], None]
"""``callback(addresses, None)`` on success, ``callback(None, error)`` on failure."""


def system_resolver(host: str, port: int) -> list[str]:
    """getaddrinfo(3), in the calling thread's namespace (and /etc/netns files)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found: list[str] = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6) and sockaddr[0] not in found:
            found.append(sockaddr[0])
    if not found:
        raise OSError(errno.ENOENT, f"{host} has no IPv4 or IPv6 address")
    return found


class ResolverBusy(Exception):
    """Too many lookups in flight: the caller should refuse, not queue."""


class Lookup:
    """One lookup in flight; ``cancel()`` drops its callback and, if it has
    not started yet, the lookup itself (a thread is not held for nobody)."""

    __slots__ = ("callback", "future")

    def __init__(self, callback: ResolveCallback) -> None:
        self.callback: ResolveCallback | None = callback
        self.future: Future | None = None

    def cancel(self) -> None:
        self.callback = None
        if self.future is not None:
            self.future.cancel()


class AsyncResolver:
    """Resolves names in worker threads, calls back on the reactor's thread."""

    def __init__(self, reactor: Reactor, resolver: Resolver | None = None,
                 threads: int = DEFAULT_THREADS, name: str = "resolve",
                 max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self.reactor = reactor
        self.resolver = resolver or system_resolver
        self.threads = threads
        self.name = name
        self.max_pending = max_pending
        self.pending = 0
        """Lookups queued or running (a slow DNS server must not queue without bound)."""
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    def resolve(self, host: str, port: int, callback: ResolveCallback) -> Lookup:
        """Start a lookup; :class:`ResolverBusy` if ``max_pending`` are in flight."""
        lookup = Lookup(callback)
        if self._closed:
            raise RuntimeError("resolver is closed")
        if self.pending >= self.max_pending:
            raise ResolverBusy(f"{self.pending} lookups in flight")
        if self._pool is None:  # started on first use: most proxies never resolve
            self._pool = ThreadPoolExecutor(max_workers=self.threads,
                                            thread_name_prefix=self.name)
        future = self._pool.submit(self.resolver, host, port)
        lookup.future = future
        self.pending += 1

        def done(fut: Future) -> None:  # in a worker thread, here, or at cancel()
            with self._lock:
                if not self._closed:
                    self.reactor.call_soon_threadsafe(lambda: self._done(lookup, fut))

        future.add_done_callback(done)
        return lookup

    def _done(self, lookup: Lookup, future: Future) -> None:
        self.pending -= 1
        if not future.cancelled():
            _deliver(lookup, future)

    def close(self) -> None:
        """Stop the workers; lookups still running never call back. Idempotent."""
        with self._lock:
            self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _deliver(lookup: Lookup, future: Future) -> None:
    callback = lookup.callback
    if callback is None:
        return
    lookup.callback = None
    try:
        addresses = future.result()
    except Exception as exc:  # a resolver bug fails this lookup, not the loop
        callback(None, exc)
        return
    callback(list(addresses), None)
