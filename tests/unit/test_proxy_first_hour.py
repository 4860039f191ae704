"""The proxy commands a new user meets first (issue "The first hour of a new user").
Pure: nothing starts, no root needed.

- a refused private target is explained (policy words, the --allow-target hint);
- ``-v``/``-q`` work before and after every subcommand; logs go to stderr;
- ``--announce`` must be one of this host's addresses, checked before anything;
- a URL where an address goes says so;
- ``http-connect --help`` shows 3128, ``socks5 --help`` 1080;
- what each mode needs from the process, said before it changes anything.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

import pytest

from mptcp_proxy.cli import app_proxy_cmd, main as cli_main
from mptcp_proxy.config import Endpoint
from mptcp_proxy.errors import ConfigError, PrivilegeError
from mptcp_proxy.modes.app_proxy import HTTP_CONNECT, SOCKS5
from mptcp_proxy.modes.client_agent import parse_captures
from mptcp_proxy.modes.policy import (
    TargetPolicy, allow_target_hint, explain_target, parse_networks, special_use_range,
)
from mptcp_proxy.server import convert as convert_server
from mptcp_proxy.server import transparent
from mptcp_proxy.server.agent import AgentConfig, agent_needs
from mptcp_proxy.server.transparent import (
    Announce, TransparentConfig, check_announce_addresses, transparent_needs,
)
from tests.unit.test_privileges import NOBODY, NOBODY_NET_ADMIN_AMBIENT, ROOT, status

ip = ipaddress.ip_address


# --------------------------------------------------------------------------
# Refused targets, explained
# --------------------------------------------------------------------------

@pytest.mark.parametrize("target, words", [
    ("10.1.2.3", "is in a private range (10.0.0.0/8); the proxy needs --allow-target "
                 "10.0.0.0/8 to reach it"),
    ("192.168.7.1", "private range (192.168.0.0/16)"),
    ("fd12::1", "private (unique local) range (fc00::/7)"),
    ("100.64.0.9", "shared (CGN) range (100.64.0.0/10)"),
    ("203.0.113.5", "documentation range (203.0.113.0/24)"),
    ("127.0.0.1", "is a loopback address: a proxy never connects there"),
    ("169.254.0.1", "is link-local: a proxy never connects there"),
    ("224.0.0.1", "is a multicast address"),
    ("0.0.0.0", "is unspecified"),
    ("64:ff9b::a01:203", "embeds 10.1.2.3, which is in a private range (10.0.0.0/8)"),
    ("2002:7f00:1::", "embeds 127.0.0.1, which is a loopback address"),
])
def test_refused_targets_are_explained(target, words):
    decision = TargetPolicy().check(ip(target))
    assert not decision.allowed
    assert words in explain_target(decision, ip(target))


def test_own_denied_and_allowed_targets_are_explained():
    policy = TargetPolicy(deny_targets=parse_networks(["8.8.8.0/24"], "d"),
                          allow_targets=parse_networks(["10.0.0.0/8"], "a"),
                          own_addresses=frozenset({ip("10.9.9.9")}))
    assert "(--deny-target)" in explain_target(policy.check(ip("8.8.8.8")))
    assert "an address of this proxy" in explain_target(policy.check(ip("10.9.9.9")))
    assert explain_target(policy.check(ip("10.1.2.3"))) == "is allowed"


def test_the_operator_hint_names_the_option_only_where_it_helps():
    hint = allow_target_hint(TargetPolicy().check(ip("10.1.2.3")))
    assert hint == ("--allow-target CIDR allows private targets "
                    "(here: --allow-target 10.0.0.0/8)")
    assert allow_target_hint(TargetPolicy().check(ip("127.0.0.1"))) is None
    decision = TargetPolicy().check(ip("10.1.2.3"))
    assert explain_target(decision, advice=False) == "is in a private range (10.0.0.0/8)"
    assert special_use_range(ip("8.8.8.8")) is None


# --------------------------------------------------------------------------
# -v / -q before and after the subcommand
# --------------------------------------------------------------------------

COMMANDS = {
    "forward": ["forward", "--listen", ":8080", "--to", "192.0.2.10:443"],
    "convert": ["convert", "--listen", ":5124"],
    "socks5": ["socks5", "--listen", ":1080"],
    "http-connect": ["http-connect", "--listen", ":3128"],
    "transparent": ["transparent"],
    "client": ["client", "--converter", "10.0.0.1:5124", "--socks5", "127.0.0.1:1080"],
    "lab up": ["lab", "up", "--paths", "2"],
    "lab list": ["lab", "list"],
    "lab down": ["lab", "down", "--all"],
    "demo": ["demo"],
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
@pytest.mark.parametrize("flags, verbose, quiet", [
    (([], []), 0, False),
    ((["-q"], []), 0, True),
    (([], ["-q"]), 0, True),
    (([], ["--quiet"]), 0, True),
    ((["-v"], []), 1, False),
    (([], ["-v"]), 1, False),
    ((["-v"], ["-v"]), 2, False),
    (([], ["-vv"]), 2, False),
    ((["-q"], ["-v"]), 1, True),
])
def test_verbose_and_quiet_anywhere(name, flags, verbose, quiet):
    before, after = flags
    argv = COMMANDS[name]
    args = cli_main.parse_args([*before, *argv, *after])
    assert (args.verbose, args.quiet) == (verbose, quiet)
    assert not any(key.startswith("_sub") for key in vars(args))


def test_every_subcommand_parser_has_them():
    parser = cli_main.build_parser()
    subparsers = cli_main._subparsers(parser)
    assert len(subparsers) >= 12     # seven commands, lab's actions
    for sub in subparsers:
        assert {"-v", "-q", "--verbose", "--quiet"} <= set(sub._option_string_actions), sub.prog


def test_lab_exec_keeps_the_commands_own_flags():
    args = cli_main.parse_args(["lab", "exec", "mpx-x", "client", "--", "ip", "-v", "-q"])
    assert args.argv[-3:] == ["ip", "-v", "-q"] and (args.verbose, args.quiet) == (0, False)


def test_the_levels(monkeypatch):
    seen = {}
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: seen.update(kw))
    cli_main.setup_logging(0, True)
    assert seen["level"] == logging.WARNING and seen["stream"] is sys.stderr
    cli_main.setup_logging(2, False)
    assert seen["level"] == logging.DEBUG


def test_help_says_where_logs_go(capsys):
    with pytest.raises(SystemExit):
        cli_main.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Logs go to stderr" in out and "one line per connection" in out
    assert "before or after the subcommand" in out
    with pytest.raises(SystemExit):
        cli_main.main(["forward", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "-q, --quiet" in out and "hides" in out


# --------------------------------------------------------------------------
# Addresses: URLs, --announce, default ports
# --------------------------------------------------------------------------

@pytest.mark.parametrize("text, example", [
    ("http://192.0.2.10:8080/", "192.0.2.10:8080"),
    ("https://example.org/path", "192.0.2.10:443"),
    ("http://alice:secret@proxy.example:3128", "proxy.example:3128"),
    ("https://[2001:db8::1]:8443/", "[2001:db8::1]:8443"),
    ("socks5h://127.0.0.1:1080", "127.0.0.1:1080"),
])
def test_a_url_is_not_an_address(text, example):
    with pytest.raises(ConfigError) as info:
        Endpoint.parse(text, "--to")
    assert info.value.key == "--to"
    assert info.value.message.startswith("a URL is not an address: give HOST:PORT")
    assert f"(e.g. {example})" in info.value.message
    assert "brackets" not in info.value.message and "secret" not in info.value.message


def test_an_announced_url_is_not_an_address_either():
    with pytest.raises(ConfigError, match="a URL is not an address"):
        Announce.parse("http://198.51.100.1:7002")


def test_addresses_still_parse_and_ipv6_still_needs_brackets():
    assert Endpoint.parse("192.0.2.10:443") == Endpoint("192.0.2.10", 443)
    assert Endpoint.parse("[2001:db8::1]:443") == Endpoint("2001:db8::1", 443)
    with pytest.raises(ConfigError, match="brackets"):
        Endpoint.parse("2001:db8::1:443")


@pytest.mark.parametrize("text, expected", [
    ("0.0.0.0", Endpoint("0.0.0.0", 3128)),
    ("[::]", Endpoint("::", 3128)),
    ("::", Endpoint("::", 3128)),
    ("proxy.example", Endpoint("proxy.example", 3128)),
    (":8080", Endpoint("0.0.0.0", 8080)),
    ("10.0.0.1:8080", Endpoint("10.0.0.1", 8080)),
    ("[::1]:8080", Endpoint("::1", 8080)),
])
def test_a_listen_address_without_port_gets_the_default(text, expected):
    assert Endpoint.parse(text, "--listen", default_host="0.0.0.0", default_port=3128) == expected


@pytest.mark.parametrize("text", ["::1080", "2001:db8::1:80"])
def test_a_bare_ipv6_address_that_may_hide_a_port_still_needs_brackets(text):
    with pytest.raises(ConfigError, match="brackets"):
        Endpoint.parse(text, "--listen", default_host="0.0.0.0", default_port=3128)


def test_each_application_proxy_listens_on_its_protocols_port():
    parser = argparse.ArgumentParser(prog="mptcp-proxy")
    app_proxy_cmd.register(parser.add_subparsers(dest="command"))
    for protocol, port in ((SOCKS5, 1080), (HTTP_CONNECT, 3128)):
        config = app_proxy_cmd.config_from_args(
            parser.parse_args([protocol, "--listen", "0.0.0.0"]))
        assert config.listen == Endpoint("0.0.0.0", port)


@pytest.mark.parametrize("protocol, port, other", [(HTTP_CONNECT, 3128, 1080),
                                                   (SOCKS5, 1080, 3128)])
def test_help_examples_use_the_protocols_port(capsys, protocol, port, other):
    with pytest.raises(SystemExit):
        cli_main.main([protocol, "--help"])
    out = capsys.readouterr().out
    assert f"0.0.0.0:{port}" in out and f":{other}" not in out
    assert "--allow-target 10.0.0.0/8" in " ".join(out.split())


def test_announced_addresses_must_be_this_hosts(monkeypatch):
    own = {ip("198.51.100.7"), ip("2001:db8::7"), ip("127.0.0.1"), ip("fe80::1")}
    monkeypatch.setattr(transparent, "local_addresses", lambda: (own, set()))
    check_announce_addresses((Announce("198.51.100.7"), Announce("2001:db8::7", 7003)))
    check_announce_addresses(())
    with pytest.raises(ConfigError) as info:
        check_announce_addresses((Announce("198.51.100.7"), Announce("198.51.100.1", 7002)))
    assert info.value.key == "--announce"
    message = info.value.message
    assert message.startswith("198.51.100.1 is not an address of this host")
    assert "own addresses" in message and "join" in message
    assert message.endswith("this host has 198.51.100.7, 2001:db8::7")  # not lo, not fe80


def test_the_announce_check_runs_before_anything_changes(monkeypatch):
    """start() checks privileges and addresses before the namespace lock or any
    kernel call: a failing check leaves nothing to undo."""
    calls = []
    monkeypatch.setattr(transparent, "local_addresses", lambda: ({ip("192.0.2.1")}, set()))
    monkeypatch.setattr(transparent, "require", lambda *a, **k: calls.append("require"))
    monkeypatch.setattr(transparent.netns, "open_current",
                        lambda: calls.append("netns") or pytest.fail("went on"))
    server = transparent.TransparentServer(
        TransparentConfig(announce=(Announce("198.51.100.1"),)))
    with pytest.raises(ConfigError, match="not an address of this host"):
        server.start()
    assert calls == ["require"]


def test_announce_help_says_the_address_must_be_this_hosts(capsys):
    with pytest.raises(SystemExit):
        cli_main.main(["transparent", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "ADDR must be an address of this host" in out
    assert "Needs CAP_NET_ADMIN" in out


# --------------------------------------------------------------------------
# What each mode needs
# --------------------------------------------------------------------------

def test_transparent_needs_net_admin_for_itself_and_nft():
    [need] = transparent_needs(TransparentConfig())
    assert need.capability == "CAP_NET_ADMIN" and need.children
    assert "nftables" in need.why and "IP_TRANSPARENT" in need.why
    needs = transparent_needs(TransparentConfig(tproxy_port=700))
    assert [n.capability for n in needs] == ["CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"]


def agent(**kw) -> AgentConfig:
    kw.setdefault("converters", (Endpoint("10.0.0.1", 5124),))
    return AgentConfig(**kw)


def test_the_client_agent_needs_net_admin_for_capture_and_so_mark():
    capture = agent(capture=parse_captures(["192.0.2.0/24:80"]))
    [need] = agent_needs(capture, NOBODY)
    assert need.capability == "CAP_NET_ADMIN" and need.children and "nftables" in need.why
    socks_only = agent(socks5=Endpoint("127.0.0.1", 1080))
    assert [n.capability for n in agent_needs(socks_only, NOBODY)] == ["CAP_NET_ADMIN"]
    assert agent_needs(socks_only, status(65534, eff=f"{1 << 13:016x}")) == []  # NET_RAW: SO_MARK
    assert agent_needs(socks_only, ROOT) == []   # listed, then met: see describe()
    low = agent(socks5=Endpoint("127.0.0.1", 1080), listen_port=0)
    assert all(n.capability != "CAP_NET_BIND_SERVICE" for n in agent_needs(low, ROOT))
    low = agent(socks5=Endpoint("127.0.0.1", 108))
    assert agent_needs(low, ROOT)[-1].capability == "CAP_NET_BIND_SERVICE"
    assert agent_needs(capture, NOBODY_NET_ADMIN_AMBIENT)[0].children


def test_convert_says_what_to_do_when_it_may_not_manage_the_sysctl(monkeypatch):
    convert_server.check_tfo_sysctl_rights(0)            # no bits wanted: nothing to check
    monkeypatch.setattr(convert_server, "can_write_sysctl", lambda path: False)
    monkeypatch.setattr(convert_server, "can_create_in", lambda path: False)
    monkeypatch.setattr(convert_server, "read_sysctl", lambda key: "1")
    with pytest.raises(PrivilegeError) as info:
        convert_server.check_tfo_sysctl_rights(3)
    line = str(info.value)
    assert "\n" not in line
    assert "CAP_NET_ADMIN (to write net.ipv4.tcp_fastopen)" in line
    assert "CAP_DAC_OVERRIDE (to record the sysctl's users in /run/mptcp-proxy/sysctl)" in line
    assert line.endswith("run as root, or set net.ipv4.tcp_fastopen=3 yourself and pass "
                         "--no-sysctl; nothing was changed")
    monkeypatch.setattr(convert_server, "can_write_sysctl", lambda path: True)
    with pytest.raises(PrivilegeError) as info:
        convert_server.check_tfo_sysctl_rights(3)
    assert "CAP_NET_ADMIN" not in str(info.value)
