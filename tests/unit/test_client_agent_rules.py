"""The client agent's capture specs, nftables table and refusal mapping. Pure, no root."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mptcp_proxy.errors import ConfigError
from mptcp_proxy.kernel.nft import render_table
from mptcp_proxy.modes.client_agent import (
    DEFAULT_MARK,
    DEFAULT_TABLE,
    TABLE_FAMILY,
    CaptureRules,
    CaptureSpec,
    captured_by,
    parse_captures,
    refusal_reason,
    render_capture_table,
    socks_reply_for,
)
from mptcp_proxy.modes.socks5 import Socks5Reply
from mptcp_proxy.modes.transparent import PortSet
from mptcp_proxy.wire.convert import ConvertErrorCode

GOLDEN_FULL = """\
  comment "mptcp-proxy client agent"
  chain output {
    type nat hook output priority -100; policy accept;
    meta mark 0x2263 return
    fib daddr type local return
    ip daddr 192.0.2.1 tcp dport 5124 return
    ip6 daddr 2001:db8::1 tcp dport 5124 return
    ip daddr 198.51.100.0/24 meta l4proto tcp redirect to :7000
    ip daddr 203.0.113.0/24 tcp dport { 80, 443, 8000-8100 } redirect to :7000
    ip6 daddr fd00::/8 tcp dport { 80, 443 } redirect to :7000
  }
"""

GOLDEN_MINIMAL = """\
  comment "mptcp-proxy client agent"
  chain output {
    type nat hook output priority -100; policy accept;
    meta mark 0x1 return
    fib daddr type local return
    ip daddr 10.0.0.7/32 meta l4proto tcp redirect to :65535
  }
"""


def net(text: str):
    return ipaddress.ip_network(text)


# --------------------------------------------------------------------------
# Capture specs
# --------------------------------------------------------------------------

@pytest.mark.parametrize("text, network, ports", [
    ("10.0.0.0/8", "10.0.0.0/8", ()),
    ("10.0.0.0/8:80", "10.0.0.0/8", ((80, 80),)),
    ("10.0.0.0/8:80,443,8000-8100", "10.0.0.0/8", ((80, 80), (443, 443), (8000, 8100))),
    ("10.0.0.0/8:all", "10.0.0.0/8", ()),
    (" 192.0.2.7 ", "192.0.2.7/32", ()),
    ("192.0.2.7:443", "192.0.2.7/32", ((443, 443),)),
    ("0.0.0.0/0:443", "0.0.0.0/0", ((443, 443),)),
    ("fd00::/8", "fd00::/8", ()),
    ("[fd00::/8]", "fd00::/8", ()),
    ("[fd00::/8]:80,443", "fd00::/8", ((80, 80), (443, 443))),
    ("[2001:db8::1]:8443", "2001:db8::1/128", ((8443, 8443),)),
    ("2001:db8::1", "2001:db8::1/128", ()),
    ("::/0", "::/0", ()),
    ("10.0.0.0/8:443,80,81-90,85", "10.0.0.0/8", ((80, 90), (443, 443))),  # merged, sorted
])
def test_parse_capture_specs(text, network, ports):
    spec = CaptureSpec.parse(text)
    assert spec.network == net(network)
    assert spec.ports == PortSet(ports)


@pytest.mark.parametrize("text, why", [
    ("", "empty"),
    ("   ", "empty"),
    ("10.0.0.1/8", "host bits set"),
    ("10.0.0.1/8", "did you mean 10.0.0.0/8"),
    ("10.0.0.0/33", "not a network"),
    ("example.com", "not a network"),
    ("10.0.0.0/8:", "empty port list"),
    ("10.0.0.0/8:0", "1-65535"),
    ("10.0.0.0/8:65536", "1-65535"),
    ("10.0.0.0/8:90-80", "1-65535"),
    ("10.0.0.0/8:http", "expected all or PORT"),
    ("10.0.0.0/8:80,,443", "expected all or PORT"),
    ("[fd00::/8", "missing ']'"),
    ("[fd00::/8]80", "expected [IPv6-CIDR]:PORTS"),
    ("[10.0.0.0/8]:80", "brackets are for IPv6"),
    ("fd00::/8:80", "needs brackets"),
    ("fd00::1/8", "host bits set"),
    ("::ffff:10.0.0.0/104", "IPv4-mapped"),
    ("[fd00::/8]:", "empty port list"),
])
def test_bad_capture_specs_name_the_option(text, why):
    with pytest.raises(ConfigError) as info:
        CaptureSpec.parse(text)
    assert info.value.key == "--capture"
    assert why in str(info.value)


@pytest.mark.parametrize("text", [
    "10.0.0.0/8", "10.0.0.0/8:80,443,8000-8100", "fd00::/8", "[fd00::/8]:80,443",
    "192.0.2.7/32:1-65535",
])
def test_str_round_trips(text):
    spec = CaptureSpec.parse(text)
    assert CaptureSpec.parse(str(spec)) == spec
    assert str(spec) == text


def test_duplicates_are_refused_and_order_is_kept():
    specs = parse_captures(["10.0.0.0/8:80", "[fd00::/8]:443", "192.0.2.0/24"])
    assert [str(s) for s in specs] == ["10.0.0.0/8:80", "[fd00::/8]:443", "192.0.2.0/24"]
    with pytest.raises(ConfigError, match="given twice"):
        parse_captures(["10.0.0.0/8:80,443", "10.0.0.0/8:443,80"])


def test_matches_and_captured_by():
    specs = parse_captures(["10.1.0.0/16:80,8000-8100", "[fd00::/8]:443", "192.0.2.0/24"])
    assert captured_by(specs, "10.1.2.3", 80) is specs[0]
    assert captured_by(specs, "10.1.2.3", 8050) is specs[0]
    assert captured_by(specs, "10.1.2.3", 443) is None
    assert captured_by(specs, "10.2.0.1", 80) is None
    assert captured_by(specs, "fd00::5", 443) is specs[1]
    assert captured_by(specs, "fd00::5", 80) is None
    assert captured_by(specs, "192.0.2.200", 1) is specs[2]
    assert captured_by(specs, ipaddress.ip_address("192.0.2.1"), 65535) is specs[2]
    # An IPv4 spec never matches IPv6 and the other way round.
    assert not CaptureSpec.parse("::/0").matches("10.0.0.1", 80)
    assert not CaptureSpec.parse("0.0.0.0/0").matches("::1", 80)


@given(st.text(max_size=40))
def test_parse_raises_only_config_error(text):
    try:
        spec = CaptureSpec.parse(text)
    except ConfigError:
        return
    assert CaptureSpec.parse(str(spec)) == spec


@given(st.one_of(st.ip_addresses(v=4).map(lambda a: f"{a}/32"),
                 st.ip_addresses(v=6).map(lambda a: f"[{a}/128]")),
       st.lists(st.tuples(st.integers(1, 65535), st.integers(0, 50)), min_size=1, max_size=5))
def test_generated_specs_round_trip(network, ranges):
    if network.startswith("[") and ipaddress.ip_address(network[1:-5]).ipv4_mapped:
        return
    ports = ",".join(f"{lo}-{min(65535, lo + n)}" if n else str(lo) for lo, n in ranges)
    spec = CaptureSpec.parse(f"{network}:{ports}")
    assert CaptureSpec.parse(str(spec)) == spec
    for lo, n in ranges:
        assert lo in spec.ports and min(65535, lo + n) in spec.ports


# --------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------

def test_golden_full_table():
    rules = CaptureRules(
        captures=parse_captures(["198.51.100.0/24", "203.0.113.0/24:80,443,8000-8100",
                                 "[fd00::/8]:443,80"]),
        listen_port=7000,
        converters=((ipaddress.ip_address("192.0.2.1"), 5124), ("2001:db8::1", 5124),
                    ("::ffff:192.0.2.1", 5124)),  # the mapped spelling is the same converter
    )
    assert render_capture_table(rules) == GOLDEN_FULL
    assert rules.mark == DEFAULT_MARK == 0x2263
    assert rules.families == (4, 6)


def test_golden_minimal_table():
    rules = CaptureRules(parse_captures(["10.0.0.7"]), 65535, mark=1)
    assert render_capture_table(rules) == GOLDEN_MINIMAL
    assert rules.families == (4,)


def test_the_table_replaces_a_stale_copy_atomically():
    rules = CaptureRules(parse_captures(["10.0.0.0/8"]), 7000)
    script = render_table(TABLE_FAMILY, DEFAULT_TABLE, render_capture_table(rules))
    lines = script.splitlines()
    assert lines[:3] == ["table inet mptcp_proxy_client", "delete table inet mptcp_proxy_client",
                         "table inet mptcp_proxy_client {"]
    assert lines[-1] == "}"


def test_own_traffic_returns_before_any_redirect():
    rules = CaptureRules(parse_captures(["0.0.0.0/0", "::/0"]), 7000,
                         converters=(("10.0.0.1", 5124),))
    body = render_capture_table(rules).splitlines()
    first_redirect = next(i for i, line in enumerate(body) if "redirect" in line)
    returns = [i for i, line in enumerate(body) if line.strip().endswith("return")]
    assert len(returns) == 3 and max(returns) < first_redirect
    assert body[returns[0]].strip() == "meta mark 0x2263 return"
    assert "fib daddr type local return" in body[returns[1]]
    assert "ip daddr 10.0.0.1 tcp dport 5124 return" in body[returns[2]]


@pytest.mark.parametrize("kwargs, key", [
    (dict(captures=()), "--capture"),
    (dict(listen_port=0), "--listen-port"),
    (dict(listen_port=65536), "--listen-port"),
    (dict(mark=0), "--mark"),
    (dict(mark=1 << 32), "--mark"),
    (dict(converters=(("10.0.0.1", 0),)), "--converter"),
])
def test_rules_validate(kwargs, key):
    args = dict(captures=parse_captures(["10.0.0.0/8"]), listen_port=7000)
    args.update(kwargs)
    with pytest.raises(ConfigError) as info:
        CaptureRules(**args)
    assert info.value.key == key


# --------------------------------------------------------------------------
# Telling the application
# --------------------------------------------------------------------------

@pytest.mark.parametrize("code, rep", [
    (ConvertErrorCode.CONNECTION_RESET, Socks5Reply.CONNECTION_REFUSED),
    (ConvertErrorCode.DESTINATION_UNREACHABLE, Socks5Reply.HOST_UNREACHABLE),
    (ConvertErrorCode.NETWORK_FAILURE, Socks5Reply.NETWORK_UNREACHABLE),
    (ConvertErrorCode.NOT_AUTHORIZED, Socks5Reply.NOT_ALLOWED),
    (ConvertErrorCode.MALFORMED_MESSAGE, Socks5Reply.GENERAL_FAILURE),
    (ConvertErrorCode.UNSUPPORTED_TCP_OPTION, Socks5Reply.GENERAL_FAILURE),
    (ConvertErrorCode.RESOURCE_EXCEEDED, Socks5Reply.GENERAL_FAILURE),
    (ConvertErrorCode.MISSING_COOKIE, Socks5Reply.GENERAL_FAILURE),
    (200, Socks5Reply.GENERAL_FAILURE),  # private-use code
])
def test_socks_reply_for_convert_errors(code, rep):
    assert socks_reply_for(code) is rep
    assert refusal_reason(code) == f"convert-error:{int(code)}"


def test_numbers_from_the_brief():
    assert [int(socks_reply_for(c)) for c in (96, 97, 65, 32, 1)] == [5, 4, 3, 2, 1]


# --------------------------------------------------------------------------
# The command line (parsing only: nothing is started)
# --------------------------------------------------------------------------

def parse_cli(*argv: str):
    from mptcp_proxy.cli.client_cmd import config_from_args
    from mptcp_proxy.cli.main import build_parser

    return config_from_args(build_parser().parse_args(["client", *argv]))


def test_cli_builds_the_agent_config():
    config = parse_cli("--converter", "[2001:db8::7]:5124", "--capture", "10.0.0.0/8:80,443",
                       "--capture", "[fd00::/8]:443", "--socks5", ":1080", "--tfo-no-cookie",
                       "--mark", "0x10", "--listen-port", "7000", "--no-direct",
                       "--handshake-timeout", "3", "--nft-table", "agent_b")
    assert [str(c) for c in config.converters] == ["[2001:db8::7]:5124"]
    assert [str(c) for c in config.capture] == ["10.0.0.0/8:80,443", "[fd00::/8]:443"]
    assert str(config.socks5) == "127.0.0.1:1080"
    assert (config.mark, config.listen_port, config.tfo_no_cookie, config.direct) == \
        (0x10, 7000, True, False)
    assert (config.handshake_timeout, config.table) == (3.0, "agent_b")


@pytest.mark.parametrize("argv, key", [
    (["--converter", "192.0.2.1:5124"], "--capture"),
    (["--converter", "192.0.2.1:0", "--socks5", ":1080"], "--converter"),
    (["--converter", "192.0.2.1:5124", "--socks5", ":1080", "--nft-table", "bad name"],
     "--nft-table"),
    (["--converter", "192.0.2.1:5124", "--socks5", ":1080", "--handshake-timeout", "0"],
     "--handshake-timeout"),
    (["--converter", "192.0.2.1:5124", "--socks5", ":7000", "--listen-port", "7000"],
     "--socks5"),
    (["--converter", "192.0.2.1:5124", "--capture", "10.0.0.0/8", "--listen-port", "70000"],
     "--listen-port"),
    (["--converter", "192.0.2.1:5124", "--dns-server", "127.0.0.1", "--socks5", ":1080"],
     "--domain"),
    (["--converter", "192.0.2.1:5124", "--socks5", ":1080", "--no-tfo", "--tfo-no-cookie"],
     "--tfo-no-cookie"),
])
def test_cli_refuses_bad_options(argv, key):
    with pytest.raises(ConfigError) as info:
        parse_cli(*argv)
    assert info.value.key == key


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1", ("127.0.0.1", 53)),
    ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    ("::1", ("::1", 53)),
    ("[::1]:5353", ("::1", 5353)),
])
def test_nameserver_spellings(text, expected):
    from mptcp_proxy.cli.client_cmd import parse_nameserver
    assert parse_nameserver(text) == expected


@pytest.mark.parametrize("text", ["ns.example", "ns.example:53", "127.0.0.1:0", "[::1]"])
def test_bad_nameservers(text):
    from mptcp_proxy.cli.client_cmd import parse_nameserver
    with pytest.raises(ConfigError):
        parse_nameserver(text)
