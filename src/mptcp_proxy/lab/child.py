"""What ``lab exec`` runs: found without PATH, and the command is ``lab exec`` itself.

- ``mptcp-proxy`` (the bare name) runs as ``python -m mptcp_proxy`` with the
  interpreter running us, so a lab command works when the virtualenv is not
  on PATH (``sudo`` resets PATH); the interpreter's script directory also goes
  first on the command's PATH, for scripts it starts.
- ``lab exec`` replaces itself with ``ip netns exec``, which execs the command:
  one process, so whatever stops ``lab exec`` (SIGTERM, Ctrl-C, a hangup,
  SIGKILL, a supervisor's process-group kill) stops the command, exactly once,
  and its exit status is ``lab exec``'s.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from typing import NoReturn

PROJECT_COMMAND = "mptcp-proxy"
PROJECT_MODULE = "mptcp_proxy"


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


def exec_in(ns: str, argv: Sequence[str]) -> NoReturn:
    """Become ``ip netns exec NS`` running ``argv`` (never returns).

    ``ip netns exec`` execs the command itself, so it keeps this process: its
    pid, its signals (SIGTERM, Ctrl-C, a hangup, SIGKILL), its exit status.
    """
    os.execvpe("ip", ["ip", "netns", "exec", ns, *project_argv(argv)], child_env())
