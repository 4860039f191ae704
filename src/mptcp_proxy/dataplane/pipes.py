"""A pool of kernel pipes for splice.

A pipe costs two file descriptors, and the hard fd limit here is 20,000 per
process (docs/KERNEL-FACTS.md), so a relay must not hold a pipe per idle connection.
Directions borrow a pipe only while bytes are in flight and give it back empty.
"""

from __future__ import annotations

import errno
import fcntl
import os

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)

# errnos that mean "no fds or memory right now": the caller degrades, never dies.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


class PipePool:
    """Hands out non-blocking pipes of ``size`` bytes; keeps up to ``max_idle``."""

    def __init__(self, size: int = 1 << 20, max_idle: int = 64) -> None:
        self.requested_size = size
        self.size = size
        self.max_idle = max_idle
        self._idle: list[tuple[int, int]] = []
        self.created = 0
        self.in_use = 0
        self.failures = 0
        self._size_known = False

    def acquire(self) -> tuple[int, int] | None:
        """A pipe (read_fd, write_fd), or None when the process is out of fds/memory."""
        if self._idle:
            self.in_use += 1
            return self._idle.pop()
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in RESOURCE_ERRNOS:
                self.failures += 1
                return None
            raise
        if self.requested_size:
            try:
                fcntl.fcntl(w, F_SETPIPE_SZ, self.requested_size)
            except OSError:
                # Over pipe-max-size or the user's pipe quota: keep the default size.
                pass
            if not self._size_known:
                self.size = fcntl.fcntl(w, F_GETPIPE_SZ)
                self._size_known = True
        self.created += 1
        self.in_use += 1
        return r, w

    def release(self, pipe: tuple[int, int]) -> None:
        """Give back an EMPTY pipe."""
        self.in_use -= 1
        if len(self._idle) < self.max_idle:
            self._idle.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def discard(self, pipe: tuple[int, int]) -> None:
        """Close a pipe that may still hold bytes (connection aborted)."""
        self.in_use -= 1
        os.close(pipe[0])
        os.close(pipe[1])

    @property
    def idle(self) -> int:
        return len(self._idle)

    def close(self) -> None:
        for r, w in self._idle:
            os.close(r)
            os.close(w)
        self._idle.clear()
