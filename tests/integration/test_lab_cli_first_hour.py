"""The lab commands a new user meets first, for real: the CLI in processes of its own.

- ``lab exec`` finds ``mptcp-proxy`` without PATH, its child dies with it
  (SIGKILL included) and gets the SIGTERM sent to it;
- ``lab show`` prints again what ``lab up`` printed, hint included;
- ``lab down`` gives what runs in a lab SIGTERM and a grace before SIGKILL;
- without privileges ``lab up``/``down``/``exec`` and ``demo`` refuse in one
  line and create nothing.

Every lab is named ``mpx-t<random>`` and removed whatever happens; the CLI runs
with a PATH that does not hold the virtualenv.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.proc import gone

from mptcp_proxy.lab import Lab, netns, remove_lab
from mptcp_proxy.lab import topology
from mptcp_proxy.cli import lab_cmd

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

CLI = str(Path(sys.executable).parent / "mptcp-proxy")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SRC = str(Path(__file__).resolve().parents[2] / "src")


def env_without_venv() -> dict[str, str]:
    """Our environment as ``sudo`` leaves it: the virtualenv is not on PATH."""
    return {**os.environ, "PATH": SYSTEM_PATH}


def cli(*argv: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *argv], capture_output=True, text=True, timeout=timeout,
                          env=env_without_venv(), **kwargs)


def cli_popen(*argv: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([CLI, *argv], env=env_without_venv(), text=True, **kwargs)


def unique_name() -> str:
    return f"mpx-t{secrets.token_hex(3)}"


@pytest.fixture
def lab_up():
    """A lab built by ``lab up`` (one path); removed at the end whatever happens."""
    names: list[str] = []

    def up(*extra: str) -> tuple[str, subprocess.CompletedProcess[str]]:
        name = unique_name()
        names.append(name)
        done = cli("lab", "up", "--name", name, "--paths", "1", *extra)
        assert done.returncode == 0, done.stderr
        return name, done

    try:
        yield up
    finally:
        for name in names:
            remove_lab(name)


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.01)


def pids_named(ns: str, comm: str) -> list[int]:
    pids = []
    for pid in netns.pids_in([ns]).get(ns, []):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                pids.append(pid)
        except OSError:
            pass
    return pids


def kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------
# lab show
# --------------------------------------------------------------------------

def test_lab_show_prints_what_lab_up_printed(lab_up):
    name, up = lab_up("--rate", "20")
    show = cli("lab", "show", name)
    assert show.returncode == 0, show.stderr
    assert show.stdout == up.stdout
    lab = Lab.attach(name)
    v4, v6 = lab.plan.networks
    assert f"--allow-target {v4} --allow-target {v6}" in show.stdout
    assert v4 == ".".join(lab.server_addr.split(".")[:2]) + ".0.0/16"

    as_json = cli("lab", "show", name, "--json")
    assert as_json.returncode == 0, as_json.stderr
    facts = json.loads(as_json.stdout)
    assert facts == json.loads(json.dumps(lab.facts()))
    assert facts["proxy_options"] == ["--allow-target", v4, "--allow-target", v6]
    assert facts["hint"].startswith("proxies in this lab: add --allow-target")


def test_lab_up_json_has_the_hint_too(lab_up):
    name, up = lab_up("--json")
    facts = json.loads(up.stdout)
    assert facts["name"] == name
    assert facts == json.loads(cli("lab", "show", name, "--json").stdout)
    assert facts["networks"][0] in facts["hint"] and facts["networks"][1] in facts["hint"]


def test_lab_show_of_no_lab_is_one_line():
    done = cli("lab", "show", unique_name())
    assert done.returncode == 1
    assert done.stderr.startswith("mptcp-proxy: no lab named mpx-t")
    assert done.stderr.count("\n") == 1


# --------------------------------------------------------------------------
# lab exec
# --------------------------------------------------------------------------

def test_lab_exec_runs_mptcp_proxy_without_the_venv_on_path(lab_up):
    name, _ = lab_up()
    done = cli("lab", "exec", name, "proxy", "--", "mptcp-proxy", "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("mptcp-proxy ")
    # And scripts the command starts find it too.
    done = cli("lab", "exec", name, "proxy", "--", "sh", "-c", "command -v mptcp-proxy")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == CLI


def test_killing_lab_exec_kills_its_child(lab_up):
    name, _ = lab_up()
    ns = Lab.attach(name).proxy.ns
    proc = cli_popen("lab", "exec", name, "proxy", "--", "sleep", "1000")
    try:
        wait_until(lambda: pids_named(ns, "sleep"), 10, "sleep started")
        child, = pids_named(ns, "sleep")
        proc.kill()  # SIGKILL: lab exec runs no code of its own
        proc.wait(5)
        wait_until(lambda: gone(child), 1.0, "the child died with lab exec")
    finally:
        proc.kill()
        proc.wait(5)
        kill_all(pids_named(ns, "sleep"))


def test_sigterm_to_lab_exec_reaches_the_child_and_its_status_comes_back(lab_up, tmp_path):
    name, _ = lab_up()
    mark = tmp_path / "terminated"
    code = ("import signal, sys, time\n"
            "def stop(*_):\n"
            f"    open({str(mark)!r}, 'w').write('clean')\n"
            "    sys.exit(3)\n"
            "signal.signal(signal.SIGTERM, stop)\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n")
    proc = cli_popen("lab", "exec", name, "server", "--", sys.executable, "-c", code,
                     stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.terminate()
        assert proc.wait(10) == 3
        assert mark.read_text() == "clean"
    finally:
        proc.kill()
        proc.wait(5)


# --------------------------------------------------------------------------
# lab down
# --------------------------------------------------------------------------

def test_lab_down_lets_processes_exit_on_sigterm_before_the_lab_goes(lab_up, tmp_path):
    name, _ = lab_up()
    lab = Lab.attach(name)
    mark = tmp_path / "restored"
    polite = ("import signal, sys, time\n"
              "def stop(*_):\n"
              "    time.sleep(0.5)  # restoring state takes a moment\n"
              f"    open({str(mark)!r}, 'w').write('state restored')\n"
              "    sys.exit(0)\n"
              "signal.signal(signal.SIGTERM, stop)\n"
              "print('ready', flush=True)\n"
              "time.sleep(60)\n")
    stubborn = ("import signal, time\n"
                "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                "print('ready', flush=True)\n"
                "time.sleep(60)\n")
    procs = [lab.proxy.popen([sys.executable, "-c", polite], stdout=subprocess.PIPE, text=True),
             lab.client.popen([sys.executable, "-c", stubborn], stdout=subprocess.PIPE,
                              text=True)]
    try:
        for p in procs:
            assert p.stdout.readline() == "ready\n"
        start = time.monotonic()
        down = cli("lab", "down", name, "--grace", "2")
        took = time.monotonic() - start
        assert down.returncode == 0, down.stderr
        assert down.stdout == f"removed {name}\n"
        assert mark.read_text() == "state restored"
        # The stubborn one had its grace, then SIGKILL.
        assert procs[0].wait(5) == 0
        assert procs[1].wait(5) == -9
        assert 2.0 <= took < 6.0, took
        assert not any(netns.exists(ns) for ns in lab.plan.namespaces)
        assert not topology.state_path(name).exists()
    finally:
        for p in procs:
            p.kill()
            p.wait(5)


def test_lab_down_stops_a_proxy_with_sigterm(lab_up):
    """A proxy run by `lab exec` drains on SIGTERM; its `lab exec` exits with it."""
    name, _ = lab_up()
    lab = Lab.attach(name)
    listen = f"{lab.paths[0].proxy_addr}:8080"
    proxy = cli_popen("lab", "exec", name, "proxy", "--", "mptcp-proxy", "forward",
                      "--listen", listen, "--to", f"{lab.server_addr}:9000",
                      stderr=subprocess.PIPE)
    try:
        line = proxy.stderr.readline()
        while "listening on" not in line:
            assert line, "the proxy exited before listening"
            line = proxy.stderr.readline()
        down = cli("lab", "down", name)
        assert down.returncode == 0, down.stderr
        assert proxy.wait(10) == 0
        assert "SIGTERM: stopping" in proxy.stderr.read()
    finally:
        proxy.kill()
        proxy.wait(5)


def test_lab_down_with_no_grace_kills_at_once(lab_up):
    name, _ = lab_up()
    lab = Lab.attach(name)
    stubborn = lab.server.popen(["sh", "-c", "trap '' TERM; sleep 60"])
    try:
        start = time.monotonic()
        assert cli("lab", "down", name, "--grace", "0").returncode == 0
        assert time.monotonic() - start < 2.0
        assert stubborn.wait(5) != 0
    finally:
        stubborn.kill()
        stubborn.wait(5)


# --------------------------------------------------------------------------
# Privileges, for real
# --------------------------------------------------------------------------

def _unprivileged_python() -> list[str] | None:
    """A Python that user nobody can run, with this source tree importable."""
    for python in (sys.executable, shutil.which("python3", path=SYSTEM_PATH)):
        if not python:
            continue
        probe = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c",
             "import sys, mptcp_proxy; assert sys.version_info >= (3, 11)"],
            capture_output=True, env={**os.environ, "PYTHONPATH": SRC}, timeout=30)
        if probe.returncode == 0:
            return [python, "-m", "mptcp_proxy"]
    return None


AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
# Root, but with every capability dropped (a container without them).
WITHOUT_CAPS = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]

COMMANDS = [
    (["lab", "up", "--name", "NAME"], "lab up needs "),
    (["lab", "down", "NAME"], "lab down needs "),
    (["lab", "exec", "NAME", "client", "--", "true"], "lab exec needs "),
    (["demo", "--seconds", "1"], "demo needs "),
]


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) missing")
@pytest.mark.parametrize("who", ["nobody", "root-without-capabilities"])
@pytest.mark.parametrize("argv, needs", COMMANDS)
def test_without_privileges_commands_refuse_in_one_line_and_create_nothing(
        who, argv, needs, lab_up):
    if argv[0] == "lab" and argv[1] in ("down", "exec"):
        name, _ = lab_up()  # a lab the command must leave alone
    else:
        name = unique_name()
    argv = [name if a == "NAME" else a for a in argv]
    if who == "nobody":
        python = _unprivileged_python()
        if python is None:
            pytest.skip("no Python that user nobody can run")
        prefix, expected = AS_NOBODY + python, needs + "root ("
    else:
        prefix, expected = WITHOUT_CAPS + [CLI], needs + "CAP_SYS_ADMIN"
    before = set(netns.list_namespaces("mpx-"))
    done = subprocess.run(prefix + argv, capture_output=True, text=True, timeout=60,
                          env={**env_without_venv(), "PYTHONPATH": SRC}, cwd="/")
    assert done.returncode == 1, done
    assert done.stdout == ""                       # no banner, no facts
    assert done.stderr.startswith("mptcp-proxy: " + expected), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "mount" not in done.stderr
    # Nothing made, nothing removed.
    after = set(netns.list_namespaces("mpx-"))
    if argv[1] == "up":
        assert not any(ns.startswith(name) for ns in after)
        assert not topology.state_path(name).exists()
    elif argv[0] == "lab":
        assert Lab.attach(name).plan.namespaces  # still there
        assert {ns for ns in before if ns.startswith(name)} <= after


def test_the_up_check_passes_as_root():
    lab_cmd.require_privileges("up")
    lab_cmd.require_privileges("down")
    lab_cmd.require_privileges("exec")
