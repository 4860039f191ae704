"""What ``lab exec`` runs, tied to its life: found without PATH, killed with it.

- ``mptcp-proxy`` (the bare name) runs as ``python -m mptcp_proxy`` with the
  interpreter running us, so a lab command works when the virtualenv is not
  on PATH (``sudo`` resets PATH); the interpreter's script directory also goes
  first on the child's PATH, for scripts the command starts.
- The child gets SIGTERM when we die, even by SIGKILL (``PR_SET_PDEATHSIG``,
  which survives ``ip netns exec``'s execve).
- SIGINT, SIGTERM and SIGHUP sent to us are passed on to the child, once; we
  wait for it and return its status. Signals the terminal sends to its whole
  foreground process group (Ctrl-C) reach the child directly and are not sent
  a second time: a proxy takes a second SIGINT as "stop at once, no drain".
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Mapping, Sequence

PROJECT_COMMAND = "mptcp-proxy"
PROJECT_MODULE = "mptcp_proxy"
PR_SET_PDEATHSIG = 1           # <linux/prctl.h>
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# si_code of a signal the kernel generated: the terminal's Ctrl-C, a hangup.
SI_KERNEL = 0x80
# How long one wait for a signal lasts before the child's status is polled
# again (SIGCHLD wakes us sooner).
WAIT_SLICE_S = 0.5


def project_argv(argv: Sequence[str], python: str | None = None) -> list[str]:
    """``argv``, with a bare ``mptcp-proxy`` replaced by ``python -m mptcp_proxy``."""
    python = python if python is not None else sys.executable
    if argv and argv[0] == PROJECT_COMMAND and python:
        return [python, "-m", PROJECT_MODULE, *argv[1:]]
    return list(argv)


def script_dirs(python: str | None = None) -> list[str]:
    """Directories holding our interpreter and the project's scripts, deduplicated."""
    python = python if python is not None else sys.executable
    dirs = []
    if python:
        dirs.append(os.path.dirname(os.path.abspath(python)))  # not resolved: a venv's bin
    try:
        dirs.append(sysconfig.get_path("scripts"))
    except KeyError:
        pass
    return list(dict.fromkeys(d for d in dirs if d))


def child_env(env: Mapping[str, str] | None = None, python: str | None = None,
              ) -> dict[str, str]:
    """``env`` (default ours) with :func:`script_dirs` first on PATH."""
    env = dict(os.environ if env is None else env)
    first = script_dirs(python)
    rest = [d for d in env.get("PATH", os.defpath).split(os.pathsep) if d and d not in first]
    env["PATH"] = os.pathsep.join(first + rest)
    return env


def die_with_parent(parent: int, mask: set[int] | None = None) -> Callable[[], None]:
    """A ``preexec_fn``: SIGTERM the child when ``parent`` dies; restore ``mask``.

    Runs between fork and exec. If the parent is already gone when the prctl
    takes effect, the child terminates itself at once.
    """
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork

    def preexec() -> None:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def exit_status(returncode: int) -> int:
    """A shell's exit status for ``returncode``: 128 + N for a death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def should_forward(info: signal.struct_siginfo, child: int) -> bool:
    """Whether a signal we received must be passed on to the child (pid ``child``).

    Not when the kernel sent it to the whole process group (Ctrl-C, a
    terminal hangup: the child got it too), nor when the child sent it.
    """
    return info.si_code != SI_KERNEL and info.si_pid != child


def run_tied(popen: Callable[..., subprocess.Popen], argv: Sequence[str]) -> int:
    """Start ``popen(argv, ...)``, forward signals to it, wait; its exit status.

    ``popen`` is :meth:`Node.popen` (or any Popen-like starter taking the same
    keyword arguments). Only the calling thread's signal mask changes, and
    only while the child runs; call it from the main thread.
    """
    watched = {*FORWARDED_SIGNALS, signal.SIGCHLD}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    try:
        proc = popen(project_argv(argv), env=child_env(),
                     preexec_fn=die_with_parent(os.getpid(), old_mask))
        while proc.poll() is None:
            info = signal.sigtimedwait(watched, WAIT_SLICE_S)
            if info is None or info.si_signo == signal.SIGCHLD:
                continue
            if should_forward(info, proc.pid):
                try:
                    proc.send_signal(info.si_signo)
                except ProcessLookupError:
                    pass
        # Signals that arrived as the child ended were for it: drop them, so
        # unblocking does not kill us after the fact.
        while signal.sigtimedwait(set(FORWARDED_SIGNALS), 0) is not None:
            pass
        return exit_status(proc.returncode)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
