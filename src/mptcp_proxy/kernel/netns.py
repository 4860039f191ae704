"""Moving the calling thread between network namespaces (setns(2)).

Python 3.11 has no ``os.setns``: libc's through ctypes. Sockets keep the
namespace they were created in; /proc/sys/net and /proc/thread-self/net follow
the thread. Used by the lab (named namespaces) and by proxies that must undo
kernel changes in the namespace they started in, whichever thread tears down.
"""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager
from typing import Iterator

CLONE_NEWNET = 0x40000000  # <sched.h>
THREAD_NETNS = "/proc/thread-self/ns/net"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace ``fd`` refers to."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def open_current() -> int:
    """An fd of the calling thread's network namespace (close it when done)."""
    return os.open(THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)


@contextmanager
def in_netns(fd: int | None) -> Iterator[None]:
    """Run the body in namespace ``fd`` (None: stay); always come back, also on errors."""
    if fd is None:
        yield
        return
    home = open_current()
    try:
        same = os.fstat(home).st_ino == os.fstat(fd).st_ino
        if not same:
            setns(fd)
        try:
            yield
        finally:
            if not same:
                setns(home)
    finally:
        os.close(home)
