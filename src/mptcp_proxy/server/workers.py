"""Several worker processes behind one port (SO_REUSEPORT).

Each worker is a full single-threaded proxy with its own listener bound with
SO_REUSEPORT; the kernel spreads new connections across them. This multiplies
the per-process fd limit (20,000 here) and uses more cores. The parent only
supervises: it forwards SIGINT/SIGTERM (workers drain), restarts a worker that
died unexpectedly (at most once per second), and exits when all have stopped.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import time
from typing import Callable

log = logging.getLogger("mptcp_proxy.server")

RESTART_MIN_INTERVAL = 1.0
PR_SET_PDEATHSIG = 1          # <linux/prctl.h>


def _die_with(parent: int) -> None:
    """SIGTERM this worker when the supervisor dies, even by SIGKILL: the parent
    holds what the workers share (the converter's sysctl bits), and orphans
    would go on serving without it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG): %s", os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as exc:
        log.warning("prctl unavailable: %s", exc)
    if os.getppid() != parent:   # it died before the prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def run_workers(count: int, serve: Callable[[int], int]) -> int:
    """Fork ``count`` workers running ``serve(index)``; supervise until all stop."""
    children: dict[int, int] = {}   # pid -> worker index
    stopping = False
    last_start: dict[int, float] = {}

    parent = os.getpid()

    def spawn(index: int) -> None:
        last_start[index] = time.monotonic()
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                _die_with(parent)
                code = serve(index)
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                os._exit(code)
        children[pid] = index
        log.info("worker %d started (pid %d)", index, pid)

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for index in range(count):
            spawn(index)
        status = 0
        while children:
            try:
                pid, wait_status = os.wait()
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            index = children.pop(pid, None)
            if index is None:
                continue
            code = os.waitstatus_to_exitcode(wait_status)
            if stopping:
                log.info("worker %d (pid %d) stopped", index, pid)
                status = status or (code if code > 0 else 0)
                continue
            log.warning("worker %d (pid %d) exited unexpectedly (%d); restarting", index, pid, code)
            wait = RESTART_MIN_INTERVAL - (time.monotonic() - last_start.get(index, 0.0))
            if wait > 0:
                time.sleep(wait)
            if not stopping:
                spawn(index)
        return status
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
