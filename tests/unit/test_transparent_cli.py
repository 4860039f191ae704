"""`mptcp-proxy transparent` arguments and configuration. Pure, no root: nothing starts."""

from __future__ import annotations

import argparse

import pytest

from mptcp_proxy.cli import main as cli_main
from mptcp_proxy.cli import transparent_cmd
from mptcp_proxy.config import UpstreamMode
from mptcp_proxy.errors import ConfigError
from mptcp_proxy.modes.transparent import PortSet
from mptcp_proxy.server.transparent import Announce, TransparentConfig


@pytest.fixture
def parser():
    p = argparse.ArgumentParser(prog="mptcp-proxy")
    transparent_cmd.register(p.add_subparsers(dest="command"))
    return p


def config(parser, *argv: str) -> TransparentConfig:
    return transparent_cmd.config_from_args(parser.parse_args(["transparent", *argv]))


def test_registered_with_the_main_parser():
    assert "mptcp_proxy.cli.transparent_cmd" in cli_main.COMMANDS
    args = cli_main.build_parser().parse_args(["transparent"])
    assert args.func is transparent_cmd.run


def test_defaults(parser):
    c = config(parser)
    assert c.ports == PortSet() and c.announce == () and c.bypass_ttl == 600
    assert (c.tproxy_port, c.interfaces, c.upstream) == (7001, (), UpstreamMode.AUTO)
    assert c.keep_client_address is False
    assert (c.fwmark, c.route_table) == (0x4D50, 0x4D50)


def test_the_public_options_as_written_in_the_issue(parser):
    c = config(parser, "--ports", "80,443", "--announce", "192.0.2.1:7002",
               "--announce", "[2001:db8::1]", "--bypass-ttl", "30")
    assert c.ports == PortSet(((80, 80), (443, 443)))
    assert c.announce == (Announce("192.0.2.1", 7002), Announce("2001:db8::1", 7002))
    assert c.bypass_ttl == 30


def test_the_other_options(parser):
    c = config(parser, "--ports", "all", "--interface", "wwan0", "--interface", "eth1",
               "--tproxy-port", "17001", "--upstream", "tcp", "--keep-client-address",
               "--fwmark", "0x10", "--route-table", "77", "--copy", "--no-conn-log")
    assert c.interfaces == ("wwan0", "eth1") and c.tproxy_port == 17001
    assert c.upstream is UpstreamMode.TCP and c.keep_client_address
    assert (c.fwmark, c.route_table) == (0x10, 77)
    assert c.relay.splice is False and c.log_connections is False


@pytest.mark.parametrize("text, expected", [
    ("192.0.2.1", Announce("192.0.2.1", 7002)),
    ("192.0.2.1:9", Announce("192.0.2.1", 9)),
    ("[2001:db8::1]:7003", Announce("2001:db8::1", 7003)),
    ("[2001:DB8:0::1]", Announce("2001:db8::1", 7002)),
    ("2001:db8::1", Announce("2001:db8::1", 7002)),  # unbracketed IPv6: no port
])
def test_announce_addresses(text, expected):
    assert Announce.parse(text) == expected
    assert Announce.parse(str(expected)) == expected


@pytest.mark.parametrize("text", ["", "proxy.example:7002", "192.0.2.1:", "192.0.2.1:0",
                                  "192.0.2.1:65536", "[2001:db8::1", "[2001:db8::1]x",
                                  "0.0.0.0", "127.0.0.1", "::1", "224.0.0.1", "[::]:7002"])
def test_bad_announce_addresses_name_the_option(text):
    with pytest.raises(ConfigError) as info:
        Announce.parse(text)
    assert info.value.key == "--announce"


@pytest.mark.parametrize("argv, key", [
    (["--ports", "80-"], "--ports"),
    (["--bypass-ttl", "0"], "--bypass-ttl"),
    (["--tproxy-port", "0"], "--tproxy-port"),
    (["--interface", "a b"], "--interface"),
    (["--announce", "192.0.2.1:7001"], "--announce"),       # the listener's own port
    (["--announce", "192.0.2.1", "--announce", "192.0.2.1:7002"], "--announce"),
    (["--route-table", "254"], "--route-table"),
    (["--upstream", "quic"], "--upstream"),
    (["--workers", "2"], "--workers"),
])
def test_config_errors_name_the_option(parser, argv, key):
    with pytest.raises(ConfigError) as info:
        config(parser, *argv)
    assert info.value.key == key


def test_a_bad_fwmark_is_a_usage_error(parser):
    with pytest.raises(SystemExit):
        parser.parse_args(["transparent", "--fwmark", "lots"])
