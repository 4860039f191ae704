"""The lab and demo commands a new user meets first: no root needed here.

- ``lab exec``: a bare ``mptcp-proxy`` runs with our interpreter, and
  ``lab exec`` becomes its command (``ip netns exec`` execs it): one process;
- ``lab show`` prints what ``lab up`` printed; ``lab up`` tells the
  ``--allow-target`` options the explicit proxies need for the lab;
- ``lab down --grace``; ``up``/``down``/``exec``/``demo`` refuse to start
  without privileges, with one line, before doing anything;
- ``demo --seconds`` has a floor.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import pytest


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


def test_lab_exec_becomes_its_command(monkeypatch, parser):
    """No parent left to outlive or to forward signals: ``ip netns exec``
    (which execs the command in turn) replaces ``lab exec``."""
    calls = []

    def fake_exec(file, argv, env):
        calls.append((file, argv, env))
        raise SystemExit(0)

    class FakeLab:
        def node(self, role):
            return argparse.Namespace(ns=f"mpx-x-{role[0]}")

    monkeypatch.setattr(netns, "effective_capabilities", lambda: ~0)
    monkeypatch.setattr(lab_cmd.Lab, "attach", staticmethod(lambda name: FakeLab()))
    monkeypatch.setattr(os, "execvpe", fake_exec)
    args = parser.parse_args(["lab", "exec", "x", "proxy", "--", "mptcp-proxy", "--version"])
    with pytest.raises(SystemExit):
        args.func(args)
    (file, argv, env), = calls
    assert file == "ip"
    assert argv == ["ip", "netns", "exec", "mpx-x-p", sys.executable, "-m", "mptcp_proxy",
                    "--version"]
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(os.path.abspath(sys.executable))


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
                        lambda nss, grace, spare: events.append(
                            ("term", sorted(nss), grace, spare)) or [])
    monkeypatch.setattr(lab_cmd, "remove_lab", lambda name: events.append(("remove", name)))
    # Lab a has a delay emulator: it is spared the SIGTERM (its paths carry the drain).
    monkeypatch.setattr(lab_cmd.Lab, "attach", staticmethod(
        lambda name: argparse.Namespace(impair_pid=4321 if name == "mpx-a" else None)))
    args = parser.parse_args(["lab", "down", "a", "mpx-b", "--grace", "2.5"])
    assert args.func(args) == 0
    assert events == [
        ("term", sorted(f"mpx-{n}-{r}" for n in "ab" for r in "cps"), 2.5, [4321]),
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
