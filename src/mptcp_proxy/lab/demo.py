"""`mptcp-proxy demo`: watch two shaped paths carry one connection through the proxy.

Builds a 2-path lab, runs a plain-TCP sink server, the real ``forward`` proxy (as
its own process, via the CLI) and an MPTCP client; uploads over one path, then
over both, with live per-path throughput; prints the speedup, the kernel's
evidence (subflows, per-path bytes) and the proxy's own log lines. Leaves
nothing behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import TextIO

from mptcp_proxy.errors import LabError
from mptcp_proxy.lab import netns
from mptcp_proxy.lab.topology import Lab, PathSpec
from mptcp_proxy.lab.traffic import (
    PathSample, SinkServer, TransferResult, set_client_subflows, timed_upload,
)

PROXY_PORT = 8080


def require_privileges() -> None:
    """LabError, before anything is printed or built, unless we may build a lab."""
    netns.require_privileges("demo", "it builds a lab of network namespaces")


def _proxy_argv(listen: str, target: str) -> list[str]:
    return [sys.executable, "-m", "mptcp_proxy", "forward", "--listen", listen,
            "--to", target, "--upstream", "auto"]


def _wait_listening(proc: subprocess.Popen, timeout: float = 10.0) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise LabError(f"proxy exited early:\n{''.join(lines)}")
        lines.append(line)
        if "listening on" in line:
            return lines
    raise LabError("proxy did not start listening")


class Demo:
    def __init__(self, rates: tuple[float, float] = (20.0, 30.0), seconds: float = 6.0,
                 out: TextIO = sys.stdout) -> None:
        self.rates = rates
        self.seconds = seconds
        self.out = out
        self.tty = out.isatty()

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def _progress(self, sample: PathSample) -> None:
        parts = "  ".join(f"path{i} {m:5.1f}" for i, m in enumerate(sample.mbit))
        line = f"   t={sample.t:4.1f}s  {parts}  total {sample.total:5.1f} Mbit/s"
        if self.tty:
            print("\r" + line, end="", file=self.out, flush=True)
        elif int(sample.t * 2) % 2 == 0:  # every second when not a terminal
            self.say(line)

    def _phase(self, lab: Lab, dest: tuple[str, int], label: str, seed: int) -> TransferResult:
        self.say(f"{label} ({self.seconds:g} s upload, client -> proxy -> server)")
        result = timed_upload(lab, dest, self.seconds, seed=seed, on_sample=self._progress)
        if self.tty:
            print(file=self.out)
        check = "sha256 OK" if result.verified else "SHA256 MISMATCH"
        self.say(f"   {result.sent / 1e6:.1f} MB in {result.seconds:.1f} s = {result.mbit:.1f} Mbit/s, "
                 f"{result.max_subflows} subflow(s), MPTCP={'yes' if result.mptcp else 'NO (fallback)'}, "
                 f"{check}")
        return result

    def run(self) -> int:
        require_privileges()
        started = time.monotonic()
        r0, r1 = self.rates
        self.say("mptcp-proxy demo: one TCP connection, two paths, through an MPTCP proxy")
        self.say()
        with Lab.create(paths=[PathSpec(rate_mbit=r0), PathSpec(rate_mbit=r1)]) as lab:
            p0, p1 = lab.paths
            self.say(f"lab {lab.name}:")
            self.say(f"   client {p0.client_addr} ==path0 {r0:g} Mbit/s== proxy {p0.proxy_addr}")
            self.say(f"   client {p1.client_addr} ==path1 {r1:g} Mbit/s== proxy {p1.proxy_addr}")
            self.say(f"   proxy {lab.proxy_server_side_addr} ----------------- "
                     f"server {lab.server_addr} (plain TCP)")
            sink = SinkServer(lab.server, lab.server_addr, 9000, mptcp=False)
            listen = f"{p0.proxy_addr}:{PROXY_PORT}"
            proxy = lab.proxy.popen(_proxy_argv(listen, f"{lab.server_addr}:{sink.addr[1]}"),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
            try:
                log_lines = _wait_listening(proxy)
                self.say(f"   forward proxy: mptcp-proxy forward --listen {listen} "
                         f"--to {lab.server_addr}:{sink.addr[1]}")
                self.say()
                dest = (p0.proxy_addr, PROXY_PORT)
                set_client_subflows(lab, 0)
                one = self._phase(lab, dest, "[1/2] one path: client's extra subflows disabled", 1)
                set_client_subflows(lab, 8)
                self.say()
                both = self._phase(lab, dest, "[2/2] both paths: subflow endpoint on path1", 2)
            finally:
                proxy.terminate()
                try:
                    _, rest = proxy.communicate(timeout=10)
                except subprocess.TimeoutExpired:
                    proxy.kill()
                    _, rest = proxy.communicate()
                sink.close()
            log_lines += rest.splitlines(keepends=True)
        ok = one.verified and both.verified and one.mptcp and both.mptcp
        speedup = both.mbit / one.mbit if one.mbit else 0.0
        self.say()
        self.say("summary")
        self.say(f"   one path : {one.mbit:6.1f} Mbit/s   per-path bytes {one.path_bytes}")
        self.say(f"   two paths: {both.mbit:6.1f} Mbit/s   per-path bytes {both.path_bytes}")
        self.say(f"   speedup  : {speedup:.2f}x (ideal {(r0 + r1) / r0:.2f}x)   "
                 f"subflows {one.max_subflows} -> {both.max_subflows}")
        self.say(f"   bytes verified end to end by SHA-256: {'yes' if ok else 'NO'}")
        self.say("   proxy log:")
        for line in log_lines:
            if " conn=" in line:
                self.say("     " + line.rstrip().split(": ", 1)[-1])
        self.say(f"   lab removed; {time.monotonic() - started:.0f} s in all")
        if not ok:
            return 1
        if both.max_subflows < 2 or both.paths_used() < 2:
            self.say("   WARNING: the second path carried no data")
            return 1
        return 0
