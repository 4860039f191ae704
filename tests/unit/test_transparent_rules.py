"""The transparent proxy's nftables ruleset and its pieces. Pure, no root."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mptcp_proxy.errors import ConfigError, KernelError
from mptcp_proxy.kernel.nft import render_table
from mptcp_proxy.modes.transparent import (
    BYPASS_SET4,
    BYPASS_SET6,
    TABLE_NAME,
    InterceptRules,
    PortSet,
    RestoreRecord,
    bypass_element,
    render_ruleset,
    ttl_text,
    unmap_address,
)

GOLDEN_FULL = """\
  comment "mptcp-proxy transparent c_bit_was=1 limits_were=2/0 endpoints=255:7002/254:7002"
  set mptcp_servers4 {
    type ipv4_addr . inet_service
    flags timeout
    timeout 600s
  }
  set mptcp_servers6 {
    type ipv6_addr . inet_service
    flags timeout
    timeout 600s
  }
  chain prerouting {
    type filter hook prerouting priority mangle; policy accept;
    meta l4proto tcp socket transparent 1 meta mark set 0x4d50 accept
    iifname { "path0", "wlan0" } tcp flags & (fin | syn | rst | ack) == syn \
tcp dport { 80, 443, 8000-8100 } tcp option mptcp subtype 0 jump divert
  }
  chain divert {
    fib daddr type local return
    ip daddr . tcp dport @mptcp_servers4 return
    ip6 daddr . tcp dport @mptcp_servers6 return
    meta nfproto ipv4 meta l4proto tcp tproxy ip to :7001 meta mark set 0x4d50 accept
    meta nfproto ipv6 meta l4proto tcp tproxy ip6 to :7001 meta mark set 0x4d50 accept
  }
"""

GOLDEN_IPV4_ALL_PORTS = """\
  comment "mptcp-proxy transparent"
  set mptcp_servers4 {
    type ipv4_addr . inet_service
    flags timeout
    timeout 30s
  }
  chain prerouting {
    type filter hook prerouting priority mangle; policy accept;
    meta l4proto tcp socket transparent 1 meta mark set 0x1 accept
    iifname != "lo" tcp flags & (fin | syn | rst | ack) == syn tcp option mptcp subtype 0 \
jump divert
  }
  chain divert {
    fib daddr type local return
    ip daddr . tcp dport @mptcp_servers4 return
    meta nfproto ipv4 meta l4proto tcp tproxy ip to :17001 meta mark set 0x1 accept
  }
"""


def test_golden_ruleset_v4_v6_ports_interfaces_and_restore_record():
    rules = InterceptRules(
        tproxy_port=7001, ports=PortSet.parse("443,80,8000-8100"),
        interfaces=("path0", "wlan0"),
        record=RestoreRecord("1", (2, 0), ((255, 7002), (254, 7002))))
    assert render_ruleset(rules) == GOLDEN_FULL


def test_golden_ruleset_ipv4_only_every_port():
    rules = InterceptRules(tproxy_port=17001, mark=1, bypass_ttl=30, ipv6=False)
    assert render_ruleset(rules) == GOLDEN_IPV4_ALL_PORTS


def test_ruleset_fits_an_owned_table():
    script = render_table("inet", TABLE_NAME, render_ruleset(InterceptRules(tproxy_port=1)))
    assert script.startswith(f"table inet {TABLE_NAME}\ndelete table inet {TABLE_NAME}\n")


def test_only_mp_capable_syns_are_diverted():
    """MP_JOIN (subtype 1) crosses the host untouched: another proxy's joins pass."""
    text = render_ruleset(InterceptRules(tproxy_port=7001))
    divert = [line for line in text.splitlines() if "jump divert" in line]
    assert len(divert) == 1
    assert "tcp option mptcp subtype 0" in divert[0]
    assert "syn / " not in divert[0] and "== syn" in divert[0]  # SYN without ACK only


@pytest.mark.parametrize("text, ranges, shown", [
    ("all", (), "all"),
    ("ALL", (), "all"),
    ("443", ((443, 443),), "443"),
    ("443,80", ((80, 80), (443, 443)), "80,443"),
    (" 80 , 81 ,82-90 ", ((80, 90),), "80-90"),
    ("1-65535", ((1, 65535),), "1-65535"),
    ("8000-8100,8050-8200,9000", ((8000, 8200), (9000, 9000)), "8000-8200,9000"),
])
def test_port_lists(text, ranges, shown):
    ports = PortSet.parse(text)
    assert ports.ranges == ranges
    assert str(ports) == shown
    assert PortSet.parse(str(ports)) == ports


@pytest.mark.parametrize("text", ["", "0", "65536", "80,", "a", "90-80", "-5", "1-", "80;443",
                                  "80 443", "0x50"])
def test_bad_port_lists_name_the_option(text):
    with pytest.raises(ConfigError) as info:
        PortSet.parse(text)
    assert info.value.key == "--ports"


def test_port_membership():
    ports = PortSet.parse("80,8000-8100")
    assert 80 in ports and 8050 in ports and 81 not in ports
    assert 1 in PortSet() and 65535 in PortSet()


@given(st.lists(st.tuples(st.integers(1, 65535), st.integers(0, 300)), min_size=1,
                max_size=20))
def test_port_ranges_merge_to_the_same_set(pairs):
    text = ",".join(f"{lo}-{min(65535, lo + n)}" for lo, n in pairs)
    ports = PortSet.parse(text)
    for lo, n in pairs:
        assert lo in ports and min(65535, lo + n) in ports
    # Merged ranges are sorted, disjoint and not adjacent.
    for (_, hi), (lo2, _) in zip(ports.ranges, ports.ranges[1:]):
        assert lo2 > hi + 1


@pytest.mark.parametrize("record", [
    RestoreRecord(),
    RestoreRecord(c_bit_was="1"),
    RestoreRecord(limits_were=(2, 0)),
    RestoreRecord("1", (8, 8), ((255, 7002),)),
    RestoreRecord(None, None, tuple((255 - i, 7002 + i) for i in range(8))),
])
def test_restore_record_round_trip(record):
    assert RestoreRecord.decode(record.encode()) == record
    assert len(record.encode()) <= 128


@pytest.mark.parametrize("text", [
    "", "someone else's table", "mptcp-proxy transparent c_bit_was", "mptcp-proxy transparent x=1",
    "mptcp-proxy transparent c_bit_was=1 c_bit_was=0", "mptcp-proxy transparent limits_were=2",
    "mptcp-proxy transparent endpoints=1", "mptcp-proxy transparent endpoints=a:b",
    "mptcp-proxy transparent c_bit_was=-1",
])
def test_foreign_or_broken_restore_records_are_kernel_errors(text):
    with pytest.raises(KernelError):
        RestoreRecord.decode(text)


@pytest.mark.parametrize("address, port, ttl, expected", [
    ("10.0.0.1", 443, 600, (BYPASS_SET4, "10.0.0.1 . 443 timeout 600s")),
    ("::ffff:10.0.0.1", 443, 2.4, (BYPASS_SET4, "10.0.0.1 . 443 timeout 2s")),
    ("fd00:1::2", 80, 0.2, (BYPASS_SET6, "fd00:1::2 . 80 timeout 1s")),
    ("FD00:0001:0000::0002", 80, 60, (BYPASS_SET6, "fd00:1::2 . 80 timeout 60s")),
])
def test_bypass_elements(address, port, ttl, expected):
    assert bypass_element(address, port, ttl) == expected


@pytest.mark.parametrize("address, port", [("10.0.0.1; flush ruleset", 80), ("10.0.0.1", 0)])
def test_bypass_elements_refuse_what_is_not_an_address_and_port(address, port):
    with pytest.raises((ValueError, ConfigError)):
        bypass_element(address, port, 60)


@pytest.mark.parametrize("address, expected", [
    ("::ffff:10.1.2.3", "10.1.2.3"), ("10.1.2.3", "10.1.2.3"), ("fd00::1", "fd00::1"),
    ("not an address", "not an address"),
])
def test_unmap_address(address, expected):
    assert unmap_address(address) == expected


def test_ttl_text_is_whole_seconds_at_least_one():
    assert [ttl_text(t) for t in (0.1, 1, 1.6, 600)] == ["1s", "1s", "2s", "600s"]


@pytest.mark.parametrize("kwargs, key", [
    ({"tproxy_port": 0}, "--tproxy-port"),
    ({"tproxy_port": 70000}, "--tproxy-port"),
    ({"tproxy_port": 1, "mark": 0}, "--fwmark"),
    ({"tproxy_port": 1, "bypass_ttl": 0}, "--bypass-ttl"),
    ({"tproxy_port": 1, "interfaces": ('eth0" accept',)}, "--interface"),
    ({"tproxy_port": 1, "interfaces": ("x" * 16,)}, "--interface"),
    ({"tproxy_port": 1, "ipv4": False, "ipv6": False}, "--family"),
])
def test_intercept_rules_validate_what_reaches_nft(kwargs, key):
    with pytest.raises(ConfigError) as info:
        InterceptRules(**kwargs)
    assert info.value.key == key
