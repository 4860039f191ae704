"""The lab and demo commands a new user meets first: no root needed here.

- ``lab exec``: a bare ``mptcp-proxy`` runs with our interpreter, the child
  dies with us (even by SIGKILL) and gets the signals sent to us, once;
- ``lab show`` prints what ``lab up`` printed; ``lab up`` tells the
  ``--allow-target`` options the explicit proxies need for the lab;
- ``lab down --grace``; ``up``/``down``/``exec``/``demo`` refuse to start
  without privileges, with one line, before doing anything;
- ``demo --seconds`` has a floor.

The signal tests run :func:`run_tied` around plain processes (no namespace),
in a stand-in for ``lab exec``: a Python process of its own.
"""

from __future__ import annotations

import argparse
import fcntl
import ipaddress
import json
import math
import os
import pty
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from tests.support.proc import gone

from mptcp_proxy.cli import demo_cmd, lab_cmd
from mptcp_proxy.errors import ConfigError, LabError
from mptcp_proxy.lab import Lab, PathSpec, child, netns, plan_lab
from mptcp_proxy.lab import demo as demo_mod
from mptcp_proxy.lab import topology
from mptcp_proxy.modes.policy import TargetPolicy, parse_networks


@pytest.fixture
def parser():
    p = argparse.ArgumentParser(prog="mptcp-proxy")
    sub = p.add_subparsers(dest="command")
    lab_cmd.register(sub)
    demo_cmd.register(sub)
    return p


# --------------------------------------------------------------------------
# lab exec: the project's own CLI without PATH
# --------------------------------------------------------------------------

def test_a_bare_mptcp_proxy_runs_with_our_interpreter():
    assert child.project_argv(["mptcp-proxy", "forward", "--listen", "x"], "/v/bin/python") \
        == ["/v/bin/python", "-m", "mptcp_proxy", "forward", "--listen", "x"]
    assert child.project_argv(["mptcp-proxy"])[:3] == [sys.executable, "-m", "mptcp_proxy"]


@pytest.mark.parametrize("argv", [
    ["/opt/bin/mptcp-proxy", "forward"],   # a path is the user's choice
    ["ip", "-br", "addr"],
    ["sh", "-c", "mptcp-proxy --version"],
])
def test_other_commands_run_as_given(argv):
    assert child.project_argv(argv, "/v/bin/python") == argv


def test_without_an_interpreter_the_command_runs_as_given():
    assert child.project_argv(["mptcp-proxy", "-h"], "") == ["mptcp-proxy", "-h"]


def test_the_module_the_rewrite_runs_exists():
    import mptcp_proxy
    assert (Path(mptcp_proxy.__file__).parent / "__main__.py").is_file()


def test_the_child_finds_our_scripts_first_on_path():
    env = child.child_env({"PATH": "/usr/bin:/bin", "HOME": "/h"}, "/venv/bin/python")
    dirs = env["PATH"].split(os.pathsep)
    assert dirs[0] == "/venv/bin" and dirs[-2:] == ["/usr/bin", "/bin"]
    assert env["HOME"] == "/h"
    assert len(dirs) == len(set(dirs))


def test_the_child_gets_a_path_even_when_we_have_none():
    env = child.child_env({}, "/venv/bin/python")
    assert env["PATH"].startswith("/venv/bin" + os.pathsep)


def test_the_child_path_does_not_repeat_directories():
    bindir = os.path.dirname(os.path.abspath(sys.executable))
    env = child.child_env({"PATH": f"/usr/bin:{bindir}:/bin"})
    assert env["PATH"].split(os.pathsep).count(bindir) == 1
    assert env["PATH"].split(os.pathsep)[0] == bindir


@pytest.mark.parametrize("returncode, status", [(0, 0), (3, 3), (-15, 143), (-9, 137)])
def test_exit_status_follows_the_shell(returncode, status):
    assert child.exit_status(returncode) == status


def _siginfo(signo: int, code: int, pid: int) -> signal.struct_siginfo:
    return signal.struct_siginfo((signo, code, 0, pid, 0, 0, 0))


def test_signals_from_the_terminal_are_not_sent_twice():
    assert not child.should_forward(_siginfo(signal.SIGINT, child.SI_KERNEL, 0), 1234)
    assert child.should_forward(_siginfo(signal.SIGINT, 0, 999), 1234)       # kill(1)
    assert child.should_forward(_siginfo(signal.SIGTERM, -1, 999), 1234)     # sigqueue
    assert not child.should_forward(_siginfo(signal.SIGTERM, 0, 1234), 1234)  # the child


# A stand-in for `lab exec`: run_tied around a plain Popen, in a process of its own.
STANDIN = ("import subprocess, sys\n"
           "from mptcp_proxy.lab.child import run_tied\n"
           "sys.exit(run_tied(subprocess.Popen, sys.argv[1:]))\n")

# The child: writes its pid, logs every INT/TERM/HUP it gets, then waits 0.3 s
# more (a second copy of a signal would arrive meanwhile) and exits 10 + count.
# Optional: how long to wait for a first signal (default 30 s), and "alone" to
# leave the terminal's foreground process group first.
COUNTER = """
import os, signal, sys, time
log = sys.argv[1]
patience = float(sys.argv[2]) if len(sys.argv) > 2 else 30.0
if sys.argv[3:] == ["alone"]:
    os.setpgid(0, 0)
got = []
def on(signum, frame):
    got.append(signum)
    with open(log, "a") as f:
        f.write(f"{signum}\\n")
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, on)
with open(log + ".pid.tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(log + ".pid.tmp", log + ".pid")
deadline = time.monotonic() + patience
while not got and time.monotonic() < deadline:
    time.sleep(0.01)
time.sleep(0.3)
sys.exit(10 + len(got))
"""

SLEEPER = """
import os, sys, time
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(1000)
"""


def _standin(argv: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", STANDIN, *argv], **kwargs)


def _wait_file(path: Path, proc: subprocess.Popen, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"stand-in exited {proc.returncode}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)
    return path.read_text()


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_the_child_dies_when_lab_exec_is_killed(tmp_path):
    pidfile = tmp_path / "child.pid"
    standin = _standin([sys.executable, "-c", SLEEPER, str(pidfile)])
    pid = None
    try:
        pid = int(_wait_file(pidfile, standin))
        standin.kill()  # SIGKILL: no handler of ours runs
        standin.wait(5)
        assert _wait_gone(pid, 1.0), "the child outlived a SIGKILLed lab exec"
    finally:
        standin.kill()
        standin.wait(5)
        if pid is not None:
            _kill_quietly(pid)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signals_sent_to_lab_exec_reach_the_child_once(tmp_path, signum):
    log = tmp_path / "signals"
    standin = _standin([sys.executable, "-c", COUNTER, str(log)])
    try:
        pid = int(_wait_file(Path(f"{log}.pid"), standin))
        standin.send_signal(signum)
        assert standin.wait(10) == 11            # the child's status: one signal
        assert log.read_text().split() == [str(int(signum))]
        assert gone(pid)
    finally:
        standin.kill()
        standin.wait(5)


def test_a_child_killed_by_a_signal_gives_128_plus_it(tmp_path):
    standin = _standin(["sh", "-c", "kill -TERM $$"])
    assert standin.wait(10) == 128 + signal.SIGTERM


def test_exit_status_and_arguments_pass_through():
    proc = _standin(["sh", "-c", "exit 7"])
    assert proc.wait(10) == 7


def _ctrl_c(log: Path, *child_args: str) -> int:
    """Run the stand-in on a terminal of its own, type ^C there; its exit status."""
    master, slave = pty.openpty()

    def controlling_tty() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    standin = _standin([sys.executable, "-c", COUNTER, str(log), *child_args], stdin=slave,
                       stdout=slave, stderr=slave, start_new_session=True,
                       preexec_fn=controlling_tty)
    os.close(slave)
    try:
        _wait_file(Path(f"{log}.pid"), standin)
        time.sleep(0.05)  # past the child's setpgid
        os.write(master, termios.tcgetattr(master)[6][termios.VINTR])  # ^C
        return standin.wait(10)
    finally:
        standin.kill()
        standin.wait(5)
        os.close(master)


def test_ctrl_c_reaches_the_child_once(tmp_path):
    """The terminal sends SIGINT to both: a proxy takes a second one as 'no drain'."""
    log = tmp_path / "signals"
    assert _ctrl_c(log) == 11
    assert log.read_text().split() == [str(int(signal.SIGINT))]


def test_ctrl_c_is_not_passed_on(tmp_path):
    """Deterministic: a child outside the foreground group gets no copy from us.

    (Where both get it, a second copy may merge with the first in the kernel,
    so the test above cannot always tell.)
    """
    log = tmp_path / "signals"
    assert _ctrl_c(log, "1.0", "alone") == 10
    assert not log.exists()


def test_run_tied_leaves_the_signal_mask_as_it_found_it():
    before = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    assert child.run_tied(subprocess.Popen, ["true"]) == 0
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == before


def test_the_child_does_not_inherit_our_blocked_signals():
    out = subprocess.run(
        [sys.executable, "-c", "import subprocess, sys\n"
         "from mptcp_proxy.lab.child import run_tied\n"
         "sys.exit(run_tied(subprocess.Popen, ['grep', '^SigBlk', '/proc/self/status']))"],
        capture_output=True, text=True, timeout=10)
    assert out.returncode == 0
    assert int(out.stdout.split()[1], 16) == 0


def test_lab_exec_runs_its_command_tied_to_it(monkeypatch, parser):
    calls = []

    class FakeLab:
        def node(self, role):
            return argparse.Namespace(popen=lambda argv, **kw: calls.append((role, argv, kw))
                                      or subprocess.Popen(["true"]))

    monkeypatch.setattr(netns, "effective_capabilities", lambda: ~0)
    monkeypatch.setattr(lab_cmd.Lab, "attach", staticmethod(lambda name: FakeLab()))
    args = parser.parse_args(["lab", "exec", "x", "proxy", "--", "mptcp-proxy", "--version"])
    assert args.func(args) == 0
    (role, argv, kw), = calls
    assert role == "proxy"
    assert argv == [sys.executable, "-m", "mptcp_proxy", "--version"]
    assert kw["env"]["PATH"].split(os.pathsep)[0] == os.path.dirname(
        os.path.abspath(sys.executable))
    assert callable(kw["preexec_fn"])


# --------------------------------------------------------------------------
# lab show, and the --allow-target hint of lab up
# --------------------------------------------------------------------------

def _unbuilt(name: str = "hint", topology_name: str = "basic") -> Lab:
    plan = plan_lab(name, [PathSpec(rate_mbit=20), PathSpec()], topology_name)
    return Lab(plan, owner_pid=None, persistent=True, owned=False)  # pure: nothing built


def _addresses(value) -> list[ipaddress._BaseAddress]:
    """Every IP address in a plan's dict, at any depth."""
    if isinstance(value, dict):
        return [a for v in value.values() for a in _addresses(v)]
    if isinstance(value, (list, tuple)):
        return [a for v in value for a in _addresses(v)]
    if isinstance(value, str):
        try:
            return [ipaddress.ip_address(value)]
        except ValueError:
            return []
    return []


@pytest.mark.parametrize("name", ["hint", "a", "demo", "x-1", "zz_top"])
@pytest.mark.parametrize("topology_name", ["basic", "operator"])
def test_the_lab_networks_hold_every_lab_address(name, topology_name):
    plan = _unbuilt(name, topology_name).plan
    nets = [ipaddress.ip_network(n) for n in plan.networks]
    assert [n.version for n in nets] == [4, 6]
    assert nets[0].prefixlen == 16 and nets[1].prefixlen == 32
    addresses = _addresses(plan.to_dict())
    assert len(addresses) >= 10
    for address in addresses:
        assert any(address in n for n in nets if n.version == address.version), address


def test_the_hinted_options_let_the_target_policy_reach_the_lab():
    plan = _unbuilt("policy").plan
    options = plan.allow_target_options
    assert options[0::2] == ("--allow-target", "--allow-target")
    allowed = TargetPolicy(allow_targets=parse_networks(options[1::2], "--allow-target"))
    for address in (plan.server_addr, plan.server_addr6, plan.paths[1].client_addr6):
        address = ipaddress.ip_address(address)
        assert not TargetPolicy().check(address).allowed   # why the hint exists
        assert allowed.check(address).allowed


def test_lab_up_text_names_the_options_and_the_modes():
    lab = _unbuilt()
    v4, v6 = lab.plan.networks
    text = lab_cmd.format_facts(lab)
    line, = [ln for ln in text.splitlines() if "--allow-target" in ln]
    assert f"--allow-target {v4} --allow-target {v6}" in line
    assert "convert, socks5 and http-connect" in line
    assert f"mptcp-proxy lab show {lab.name}" in text


def test_lab_up_json_carries_the_hint():
    lab = _unbuilt()
    facts = json.loads(json.dumps(lab.facts()))
    assert facts["networks"] == list(lab.plan.networks)
    assert facts["proxy_options"] == ["--allow-target", lab.plan.networks[0],
                                      "--allow-target", lab.plan.networks[1]]
    assert facts["hint"].startswith("proxies in this lab: add --allow-target ")
    assert topology.LabPlan.from_dict(
        {k: v for k, v in facts.items()
         if k in topology.LabPlan.__dataclass_fields__}) == lab.plan


@pytest.mark.parametrize("as_json", [False, True])
def test_lab_show_prints_what_lab_up_printed(monkeypatch, capsys, parser, as_json):
    lab = _unbuilt("shown")
    lab.impair_pid = 77
    monkeypatch.setattr(netns, "effective_capabilities", lambda: 0)  # show only reads
    seen = []
    monkeypatch.setattr(lab_cmd.Lab, "attach",
                        staticmethod(lambda name: seen.append(name) or lab))
    args = parser.parse_args(["lab", "show", "shown"] + (["--json"] if as_json else []))
    assert args.func is lab_cmd.cmd_show
    assert args.func(args) == 0
    out = capsys.readouterr().out
    lab_cmd.print_facts(lab, as_json)
    assert out == capsys.readouterr().out
    assert seen == ["shown"]
    if as_json:
        assert json.loads(out)["impair_pid"] == 77
    else:
        assert out.startswith("lab mpx-shown (basic, 2 paths)")


def test_lab_show_needs_a_name(parser):
    with pytest.raises(SystemExit):
        parser.parse_args(["lab", "show"])


# --------------------------------------------------------------------------
# lab down --grace
# --------------------------------------------------------------------------

def test_down_grace_defaults_to_five_seconds(parser):
    assert parser.parse_args(["lab", "down", "x"]).grace == 5.0
    assert parser.parse_args(["lab", "down", "--all", "--grace", "0"]).grace == 0.0


@pytest.mark.parametrize("grace", ["-1", "nan", "inf"])
def test_down_refuses_a_grace_it_cannot_wait(parser, grace):
    args = parser.parse_args(["lab", "down", "x", "--grace", grace])
    with pytest.raises(ConfigError) as info:
        args.func(args)
    assert info.value.key == "--grace"


def test_down_terminates_every_lab_together_then_removes_them(monkeypatch, parser):
    events = []
    monkeypatch.setattr(netns, "effective_capabilities", lambda: ~0)
    monkeypatch.setattr(lab_cmd, "list_labs", lambda: ["mpx-a", "mpx-b"])
    monkeypatch.setattr(netns, "exists", lambda ns: ns.endswith(("-c", "-p", "-s")))
    monkeypatch.setattr(netns, "terminate_processes",
                        lambda nss, grace: events.append(("term", sorted(nss), grace)) or [])
    monkeypatch.setattr(lab_cmd, "remove_lab", lambda name: events.append(("remove", name)))
    args = parser.parse_args(["lab", "down", "a", "mpx-b", "--grace", "2.5"])
    assert args.func(args) == 0
    assert events == [
        ("term", sorted(f"mpx-{n}-{r}" for n in "ab" for r in "cps"), 2.5),
        ("remove", "mpx-a"), ("remove", "mpx-b")]


def test_terminate_processes_without_processes_returns_at_once(monkeypatch):
    monkeypatch.setattr(netns, "pids_in", lambda nss: {ns: [] for ns in nss})
    start = time.monotonic()
    assert netns.terminate_processes(["mpx-none-c"], 5.0) == []
    assert time.monotonic() - start < 1.0


def test_terminate_processes_sigterms_once_and_reports_survivors(monkeypatch):
    sent = []
    monkeypatch.setattr(netns, "pids_in", lambda nss: {"mpx-x-c": [4242424]})
    monkeypatch.setattr(netns.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    start = time.monotonic()
    assert netns.terminate_processes(["mpx-x-c"], 0.2) == [4242424]
    assert 0.2 <= time.monotonic() - start < 1.0
    assert sent == [(4242424, signal.SIGTERM)]


# --------------------------------------------------------------------------
# Privileges, checked before anything else
# --------------------------------------------------------------------------

@pytest.fixture
def unprivileged(monkeypatch):
    """A non-root user without capabilities; anything that acts fails the test."""
    monkeypatch.setattr(netns, "effective_capabilities", lambda: 0)
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)

    def forbidden(*_a, **_k):
        raise AssertionError("acted without privileges")

    for owner, attr in ((lab_cmd.Lab, "create"), (lab_cmd.Lab, "attach"),
                        (lab_cmd, "remove_lab"), (lab_cmd, "list_labs"),
                        (netns, "terminate_processes"), (netns, "delete"),
                        (demo_mod.Lab, "create")):
        monkeypatch.setattr(owner, attr, forbidden)


@pytest.mark.parametrize("argv, needs", [
    (["lab", "up", "--name", "x"], "lab up needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN: "
                                   "it creates network namespaces); run it with sudo"),
    (["lab", "down", "x"], "lab down needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN: "),
    (["lab", "down", "--all"], "lab down needs root"),
    (["lab", "exec", "x", "client", "--", "true"], "lab exec needs root (CAP_SYS_ADMIN: "),
    (["demo"], "demo needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN: it builds a lab"),
])
def test_commands_refuse_to_start_without_privileges(unprivileged, parser, capsys,
                                                     argv, needs):
    args = parser.parse_args(argv)
    with pytest.raises(LabError) as info:
        args.func(args)
    message = str(info.value)
    assert message.startswith(needs)
    assert "\n" not in message and message.endswith("run it with sudo")
    assert capsys.readouterr().out == ""  # the demo's banner included


def test_a_root_process_without_capabilities_is_told_which(monkeypatch):
    monkeypatch.setattr(netns, "effective_capabilities", lambda: 1 << netns.CAP_NET_ADMIN)
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    with pytest.raises(LabError, match=r"^lab up needs CAP_SYS_ADMIN \(it creates network "
                                       r"namespaces\), which this root process lacks"):
        lab_cmd.require_privileges("up")


def test_privileges_are_read_from_the_effective_set():
    caps = netns.effective_capabilities()
    expected = Path("/proc/self/status").read_text().split("CapEff:")[1].split()[0]
    assert caps == int(expected, 16)
    if caps >> netns.CAP_SYS_ADMIN & 1 and caps >> netns.CAP_NET_ADMIN & 1:
        lab_cmd.require_privileges("up")  # no error


def test_usage_errors_come_before_the_privilege_check(unprivileged, parser):
    args = parser.parse_args(["lab", "up", "--paths", "9"])
    with pytest.raises(ConfigError, match="--paths"):
        args.func(args)
    args = parser.parse_args(["lab", "up", "--name", "Bad Name"])
    with pytest.raises(LabError, match="invalid lab name"):
        args.func(args)


def test_the_cli_prints_one_line_and_exits_1(unprivileged, capsys):
    from mptcp_proxy.cli.main import main
    assert main(["lab", "up", "--name", "x"]) == 1
    err = capsys.readouterr().err
    assert err == ("mptcp-proxy: lab up needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN: it "
                   "creates network namespaces); run it with sudo\n")


# --------------------------------------------------------------------------
# demo --seconds
# --------------------------------------------------------------------------

@pytest.mark.parametrize("seconds", [0, -1, 0.5, 0.99, math.nan, math.inf, 3601])
def test_demo_refuses_phases_too_short_or_absurd(seconds):
    with pytest.raises(ConfigError) as info:
        demo_cmd.check_args((20, 30), seconds)
    assert info.value.key == "--seconds"


@pytest.mark.parametrize("seconds", [1, 1.5, 6, 3600])
def test_demo_accepts_a_second_or_more(seconds):
    demo_cmd.check_args((20, 30), seconds)


@pytest.mark.parametrize("rates", [(0, 30), (20, -1), (20, math.nan), (20, 1e9)])
def test_demo_refuses_rates_a_path_cannot_have(rates):
    with pytest.raises(ConfigError) as info:
        demo_cmd.check_args(rates, 6)
    assert info.value.key == "--rates"


def test_demo_seconds_zero_is_a_usage_error_before_anything(unprivileged, capsys):
    from mptcp_proxy.cli.main import main
    assert main(["demo", "--seconds", "0"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("mptcp-proxy: configuration error: --seconds: must be 1 to ")
