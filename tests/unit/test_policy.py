"""Target and client policy: every spelling of every address class (pure, no sockets)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mptcp_proxy.errors import ConfigError
from mptcp_proxy.modes.policy import (
    DEFAULT_CLIENT_NETWORKS,
    ClientPolicy,
    TargetPolicy,
    TargetReason,
    TargetVerdict,
    normalize,
    parse_address,
    parse_networks,
    spellings,
)

ip = ipaddress.ip_address
ALLOWED, DENIED, FORBIDDEN = TargetVerdict.ALLOWED, TargetVerdict.DENIED, TargetVerdict.FORBIDDEN


def check(text: str, policy: TargetPolicy | None = None):
    return (policy or TargetPolicy()).check(parse_address(text))


# --------------------------------------------------------------------------
# Never destinations: RFC 8803 answers Malformed (FORBIDDEN), in every spelling
# --------------------------------------------------------------------------

@pytest.mark.parametrize("text, reason", [
    ("127.0.0.1", TargetReason.LOOPBACK),
    ("127.255.255.254", TargetReason.LOOPBACK),
    ("::1", TargetReason.LOOPBACK),
    ("::ffff:127.0.0.1", TargetReason.LOOPBACK),          # IPv4-mapped
    ("::7f00:1", TargetReason.LOOPBACK),                  # IPv4-compatible
    ("::ffff:0:7f00:1", TargetReason.LOOPBACK),           # IPv4-translated (SIIT)
    ("2002:7f00:1::", TargetReason.LOOPBACK),             # 6to4
    ("2002:7f00:1:1234::5", TargetReason.LOOPBACK),
    ("64:ff9b::7f00:1", TargetReason.LOOPBACK),           # NAT64 well-known prefix
    ("64:ff9b:1::7f00:1", TargetReason.LOOPBACK),         # NAT64 local-use prefix
    ("0.0.0.0", TargetReason.UNSPECIFIED),
    ("0.1.2.3", TargetReason.UNSPECIFIED),                # "this network" 0/8
    ("::", TargetReason.UNSPECIFIED),
    ("::ffff:0.0.0.0", TargetReason.UNSPECIFIED),
    ("224.0.0.1", TargetReason.MULTICAST),
    ("239.255.255.250", TargetReason.MULTICAST),
    ("ff02::1", TargetReason.MULTICAST),
    ("ff0e::101", TargetReason.MULTICAST),
    ("::ffff:224.0.0.1", TargetReason.MULTICAST),
    ("2002:e000:1::", TargetReason.MULTICAST),            # 6to4 of 224.0.0.1
    ("64:ff9b::e000:1", TargetReason.MULTICAST),
    ("255.255.255.255", TargetReason.BROADCAST),
    ("::ffff:255.255.255.255", TargetReason.BROADCAST),
    ("64:ff9b::ffff:ffff", TargetReason.BROADCAST),
    ("2002:ffff:ffff::", TargetReason.BROADCAST),
])
def test_forbidden_targets(text, reason):
    decision = check(text)
    assert decision.verdict is FORBIDDEN, decision
    assert decision.reason is reason
    assert not decision.allowed


def test_forbidden_beats_any_allow_list():
    anything = TargetPolicy(allow_targets=parse_networks(["any"], "k"))
    for text in ("127.0.0.1", "::1", "::ffff:127.0.0.1", "2002:7f00:1::", "224.0.0.1",
                 "255.255.255.255", "0.0.0.0"):
        assert check(text, anything).verdict is FORBIDDEN, text
    loop_allowed = TargetPolicy(allow_targets=parse_networks(["127.0.0.0/8", "::1"], "k"))
    assert check("127.0.0.1", loop_allowed).verdict is FORBIDDEN


# --------------------------------------------------------------------------
# Policy refusals (Not Authorized): link-local, own addresses, special-use
# --------------------------------------------------------------------------

@pytest.mark.parametrize("text, reason", [
    ("fe80::1", TargetReason.LINK_LOCAL),
    ("fe80::1%eth0", TargetReason.LINK_LOCAL),
    ("169.254.1.1", TargetReason.LINK_LOCAL),
    ("::ffff:169.254.169.254", TargetReason.LINK_LOCAL),  # cloud metadata, mapped
    ("64:ff9b::a9fe:a9fe", TargetReason.LINK_LOCAL),      # ... and via NAT64
    ("10.0.0.1", TargetReason.SPECIAL_USE),
    ("172.16.5.4", TargetReason.SPECIAL_USE),
    ("192.168.1.1", TargetReason.SPECIAL_USE),
    ("100.64.0.1", TargetReason.SPECIAL_USE),
    ("198.18.0.1", TargetReason.SPECIAL_USE),
    ("192.0.2.1", TargetReason.SPECIAL_USE),
    ("240.0.0.1", TargetReason.SPECIAL_USE),
    ("fc00::1", TargetReason.SPECIAL_USE),
    ("fd12:3456::1", TargetReason.SPECIAL_USE),
    ("2001:db8::1", TargetReason.SPECIAL_USE),
    ("fec0::1", TargetReason.SPECIAL_USE),
    ("::ffff:10.1.2.3", TargetReason.SPECIAL_USE),
    ("2002:a00:1::", TargetReason.SPECIAL_USE),           # 6to4 of 10.0.0.1
    ("64:ff9b::a00:1", TargetReason.SPECIAL_USE),         # NAT64 of 10.0.0.1
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", TargetReason.SPECIAL_USE),  # Teredo
])
def test_denied_targets(text, reason):
    decision = check(text)
    assert decision.verdict is DENIED, decision
    assert decision.reason is reason


@pytest.mark.parametrize("text", [
    "8.8.8.8", "1.1.1.1", "::ffff:8.8.8.8", "2606:4700:4700::1111",
    "64:ff9b::808:808", "2002:808:808::1",
])
def test_global_targets_are_allowed(text):
    decision = check(text)
    assert decision.verdict is ALLOWED and decision.allowed
    assert decision.reason is TargetReason.GLOBAL


def test_allow_targets_opens_special_use_ranges_in_every_spelling():
    lab = TargetPolicy(allow_targets=parse_networks(["10.0.0.0/8", "fd00::/8"], "k"))
    for text in ("10.1.2.3", "::ffff:10.1.2.3", "2002:a01:203::", "64:ff9b::a01:203",
                 "fd00:1::5"):
        decision = check(text, lab)
        assert decision.verdict is ALLOWED, text
    assert check("10.1.2.3", lab).reason is TargetReason.ALLOWED_RANGE
    # ... but not other special ranges, nor link-local.
    assert check("192.168.0.1", lab).verdict is DENIED
    assert check("169.254.0.1", TargetPolicy(allow_targets=parse_networks(["any"], "k"))
                 ).verdict is DENIED


def test_own_addresses_are_denied_in_every_spelling_even_when_allowed():
    policy = TargetPolicy(allow_targets=parse_networks(["10.0.0.0/8", "fd00::/8"], "k")
                          ).with_local({ip("10.9.0.2"), ip("fd00:9::2")})
    for text in ("10.9.0.2", "::ffff:10.9.0.2", "2002:a09:2::", "64:ff9b::a09:2",
                 "fd00:9::2"):
        decision = check(text, policy)
        assert decision.verdict is DENIED and decision.reason is TargetReason.OWN_ADDRESS, text
    assert check("10.9.0.3", policy).verdict is ALLOWED


def test_own_addresses_given_as_mapped_are_normalized():
    policy = TargetPolicy().with_local({ip("::ffff:203.0.113.9")})
    assert ip("203.0.113.9") in policy.own_addresses
    assert check("203.0.113.9", policy).reason is TargetReason.OWN_ADDRESS


def test_directed_broadcast_addresses_are_forbidden():
    policy = TargetPolicy(allow_targets=parse_networks(["10.0.0.0/8"], "k")).with_local(
        set(), {ip("10.9.0.255")})
    decision = check("10.9.0.255", policy)
    assert decision.verdict is FORBIDDEN and decision.reason is TargetReason.BROADCAST
    assert check("::ffff:10.9.0.255", policy).verdict is FORBIDDEN


def test_deny_targets_beats_allow_and_covers_global_ranges():
    policy = TargetPolicy(allow_targets=parse_networks(["10.0.0.0/8"], "k"),
                          deny_targets=parse_networks(["10.66.0.0/16", "8.8.8.0/24"], "k"))
    assert check("10.66.1.1", policy).reason is TargetReason.DENIED_RANGE
    assert check("8.8.8.8", policy).reason is TargetReason.DENIED_RANGE
    assert check("::ffff:8.8.8.8", policy).reason is TargetReason.DENIED_RANGE
    assert check("64:ff9b::808:808", policy).reason is TargetReason.DENIED_RANGE
    assert check("10.67.1.1", policy).verdict is ALLOWED


def test_decision_names_the_embedded_spelling_that_failed():
    decision = check("2002:7f00:1::")
    assert decision.address == ip("127.0.0.1")


def test_spellings():
    assert spellings(ip("::ffff:1.2.3.4")) == (ip("1.2.3.4"),)
    assert spellings(ip("2002:102:304::1")) == (ip("2002:102:304::1"), ip("1.2.3.4"))
    assert spellings(ip("64:ff9b::102:304")) == (ip("64:ff9b::102:304"), ip("1.2.3.4"))
    assert spellings(ip("::102:304")) == (ip("::102:304"), ip("1.2.3.4"))
    assert spellings(ip("::1")) == (ip("::1"),)
    teredo = spellings(ip("2001:0:4136:e378:8000:63bf:3fff:fdd2"))
    assert ip("65.54.227.120") in teredo and ip("192.0.2.45") in teredo


@given(st.one_of(
    st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
    st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)))
def test_every_address_gets_a_verdict(address):
    decision = TargetPolicy().check(address)
    assert decision.verdict in TargetVerdict
    # A loopback anywhere inside is never allowed.
    if any(s.is_loopback for s in spellings(address)):
        assert decision.verdict is FORBIDDEN


@given(st.integers(0, 2**24 - 1))
def test_every_embedded_loopback_is_forbidden(low):
    v4 = ipaddress.IPv4Address((127 << 24) | low)
    for wrapped in (f"::ffff:{v4}", f"64:ff9b::{v4}", f"::{v4}",
                    f"2002:{int(v4) >> 16:x}:{int(v4) & 0xffff:x}::"):
        assert check(wrapped).verdict is FORBIDDEN, wrapped


# --------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------

@pytest.mark.parametrize("text, allowed", [
    ("10.1.2.3", True), ("::ffff:10.1.2.3", True), ("192.168.7.7", True),
    ("172.31.0.1", True), ("100.64.1.1", True), ("127.0.0.1", True), ("::1", True),
    ("fd00:1::1", True), ("8.8.8.8", False), ("::ffff:8.8.8.8", False),
    ("2001:4860::1", False), ("172.32.0.1", False), ("169.254.0.1", False),
])
def test_default_client_policy_admits_only_local_and_managed_networks(text, allowed):
    assert ClientPolicy().allows(parse_address(text)) is allowed


def test_default_client_networks_are_the_documented_ones():
    assert ClientPolicy().allow == parse_networks(DEFAULT_CLIENT_NETWORKS, "k")


def test_client_allow_list_and_any():
    only = ClientPolicy(parse_networks(["198.51.100.0/24"], "--allow"))
    assert only.allows(ip("198.51.100.7")) and only.allows(ip("::ffff:198.51.100.7"))
    assert not only.allows(ip("10.0.0.1"))
    everyone = ClientPolicy(parse_networks(["any"], "--allow"))
    assert everyone.allows(ip("8.8.8.8")) and everyone.allows(ip("2001:db8::1"))


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------

def test_parse_networks():
    assert parse_networks(["10.0.0.1"], "k") == (ipaddress.ip_network("10.0.0.1/32"),)
    assert parse_networks(["10.1.2.3/8"], "k") == (ipaddress.ip_network("10.0.0.0/8"),)
    assert parse_networks(["::ffff:10.0.0.0/104"], "k") == (ipaddress.ip_network("10.0.0.0/8"),)
    assert parse_networks(["ANY"], "k") == (ipaddress.ip_network("0.0.0.0/0"),
                                            ipaddress.ip_network("::/0"))


@pytest.mark.parametrize("text", ["10.0.0.0/33", "nonsense", "", "10.0.0.0/8/8"])
def test_parse_networks_names_the_option(text):
    with pytest.raises(ConfigError) as info:
        parse_networks([text], "--allow-target")
    assert info.value.key == "--allow-target"


def test_normalize_and_parse_address():
    assert normalize(ip("::ffff:1.2.3.4")) == ip("1.2.3.4")
    assert normalize(ip("::1")) == ip("::1")
    assert parse_address("fe80::1%path0") == ip("fe80::1")


def test_a_zone_id_does_not_hide_the_proxys_own_address():
    from mptcp_proxy.modes.policy import TargetPolicy, TargetReason
    policy = TargetPolicy((), ()).with_local([ipaddress.ip_address("2606:4700::5")], [])
    assert policy.check(ipaddress.IPv6Address("2606:4700::5%1")).reason is TargetReason.OWN_ADDRESS
