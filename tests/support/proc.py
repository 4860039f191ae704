"""Running the real CLI as a subprocess in tests."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

CLI = str(Path(sys.executable).parent / "mptcp-proxy")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class CliProcess:
    """`mptcp-proxy ARGS` with stderr collected; ``wait_for(text)`` reads it."""

    def __init__(self, args: list[str], prefix: list[str] | None = None) -> None:
        self.proc = subprocess.Popen((prefix or []) + [CLI, *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.output = ""

    def _read(self, timeout: float) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if sel.select(timeout):
            chunk = self.proc.stdout.read()
            if chunk:
                self.output += chunk
        sel.close()

    def wait_for(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not seen; output so far:\n{self.output}")
            if self.proc.poll() is not None:
                self._read(0)
                if text in self.output:
                    break
                raise RuntimeError(f"process exited {self.proc.returncode}:\n{self.output}")
            self._read(0.1)
        return self.output

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 15.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"process still running; output:\n{self.output}")
            self._read(0.1)
        self._read(0)
        return self.proc.returncode

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def gone(pid: int) -> bool:
    """Not running: no such process, or a zombie waiting for its reaper."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")
