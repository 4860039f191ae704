"""Rendering a lab plan into ip/tc batch lines and sysctls. Pure, no root."""

from __future__ import annotations

import pytest

from mptcp_proxy.lab import PathSpec, plan_lab
from mptcp_proxy.lab.topology import (
    node_sysctls,
    render_client_path_routes,
    render_links,
    render_node,
    render_shaping,
    subnet_octet,
    tbf_params,
)

K = subnet_octet("mpx-golden")


@pytest.fixture
def plan():
    return plan_lab("golden", [PathSpec(rate_mbit=20), PathSpec()])


def test_links_are_born_in_their_namespaces_with_distinct_indexes(plan):
    assert render_links(plan) == [
        "link add name path0 index 10 netns mpx-golden-c type veth "
        "peer name path0 index 20 netns mpx-golden-p",
        "link add name path1 index 11 netns mpx-golden-c type veth "
        "peer name path1 index 21 netns mpx-golden-p",
        "link add name srvlink index 30 netns mpx-golden-p type veth "
        "peer name srvlink index 40 netns mpx-golden-s",
    ]


def test_client_script(plan):
    lines, lines6 = render_node(plan, "client")
    path0 = [
        f"addr add 10.{K}.0.1/24 dev path0",
        f"addr add fd00:{K}::1/64 dev path0 nodad",
        "link set path0 up",
    ]
    routes0 = [
        f"rule add from 10.{K}.0.1 table 100 pref 1000",
        "route add unreachable default table 100 metric 4096",
        "route add unreachable ::/0 table 100 metric 4096",
        f"route add 10.{K}.0.0/24 dev path0 src 10.{K}.0.1 table 100",
        f"route add default via 10.{K}.0.2 dev path0 table 100",
        f"route add fd00:{K}::/64 dev path0 table 100",
        f"route add ::/0 via fd00:{K}::2 dev path0 table 100",
        f"route add default via 10.{K}.0.2 dev path0 metric 10",
        f"route add ::/0 via fd00:{K}::2 dev path0 metric 10",
    ]
    assert lines[0] == "link set lo up"
    assert lines[1:4] == path0
    assert lines[7:16] == routes0
    assert f"route add default via 10.{K}.1.2 dev path1 metric 11" in lines
    assert lines[-5:] == [
        "mptcp limits set subflows 8 add_addr_accepted 8",
        f"mptcp endpoint add 10.{K}.0.1 dev path0 subflow",
        f"mptcp endpoint add fd00:{K}::1 dev path0 subflow",
        f"mptcp endpoint add 10.{K}.1.1 dev path1 subflow",
        f"mptcp endpoint add fd00:{K}:1::1 dev path1 subflow",
    ]
    # `rule add from <IPv6>` only parses in an `ip -6` batch.
    assert lines6 == [f"rule add from fd00:{K}::1 table 100 pref 1000",
                      f"rule add from fd00:{K}:1::1 table 101 pref 1001"]


def test_proxy_script_is_a_plain_router(plan):
    lines, lines6 = render_node(plan, "proxy")
    assert lines == [
        "link set lo up",
        f"addr add 10.{K}.0.2/24 dev path0", f"addr add fd00:{K}::2/64 dev path0 nodad",
        "link set path0 up",
        f"addr add 10.{K}.1.2/24 dev path1", f"addr add fd00:{K}:1::2/64 dev path1 nodad",
        "link set path1 up",
        f"addr add 10.{K}.254.1/24 dev srvlink",
        f"addr add fd00:{K}:254::1/64 dev srvlink nodad",
        "link set srvlink up",
        "mptcp limits set subflows 8 add_addr_accepted 8",
    ]
    assert lines6 == []


def test_server_script_routes_back_through_the_proxy(plan):
    lines, lines6 = render_node(plan, "server")
    assert lines == [
        "link set lo up",
        f"addr add 10.{K}.254.2/24 dev srvlink",
        f"addr add fd00:{K}:254::2/64 dev srvlink nodad",
        "link set srvlink up",
        f"route add default via 10.{K}.254.1 dev srvlink",
        f"route add ::/0 via fd00:{K}:254::1 dev srvlink",
        "mptcp limits set subflows 8 add_addr_accepted 8",
    ]
    assert lines6 == []


def test_shaping_at_both_ends_of_shaped_paths_only(plan):
    tbf = "qdisc replace dev path0 root tbf rate 20000000bit burst 16384 limit 81920"
    assert render_shaping(plan, "client") == [tbf]
    assert render_shaping(plan, "proxy") == [tbf]
    assert render_shaping(plan, "server") == []


def test_path_up_restores_routes_with_replace(plan):
    lines = render_client_path_routes(plan, 1, verb="replace")
    assert lines == [
        f"route replace 10.{K}.1.0/24 dev path1 src 10.{K}.1.1 table 101",
        f"route replace default via 10.{K}.1.2 dev path1 table 101",
        f"route replace fd00:{K}:1::/64 dev path1 table 101",
        f"route replace ::/0 via fd00:{K}:1::2 dev path1 table 101",
        f"route replace default via 10.{K}.1.2 dev path1 metric 11",
        f"route replace ::/0 via fd00:{K}:1::2 dev path1 metric 11",
    ]


@pytest.mark.parametrize("mbit", [0.1, 1, 10, 20, 100, 1000, 10_000])
def test_tbf_bucket_and_queue_scale_with_rate(mbit):
    rate, burst, limit = tbf_params(mbit)
    assert rate == int(mbit * 1e6)
    assert burst >= 16 * 1024                    # > one GSO-less MTU burst, always
    assert burst >= rate / 8 * 0.002 - 1         # 2 ms of traffic
    assert limit - burst >= 64 * 1024            # room for TCP to keep the link busy
    assert limit - burst <= max(64 * 1024, rate / 8 * 0.010) + 1  # no bufferbloat


def test_sysctls_relax_rp_filter_everywhere_and_forward_only_in_the_proxy():
    for role in ("client", "proxy", "server"):
        values = dict(node_sysctls(role))
        assert values["net.ipv4.conf.all.rp_filter"] == 0
        assert values["net.ipv4.conf.default.rp_filter"] == 0
        assert values["net.ipv6.conf.default.accept_dad"] == 0
        assert values["net.ipv6.conf.default.keep_addr_on_down"] == 1
        forwarding = role == "proxy"
        assert ("net.ipv4.ip_forward" in values) == forwarding
        assert ("net.ipv6.conf.all.forwarding" in values) == forwarding


def test_unknown_role_is_refused(plan):
    from mptcp_proxy.errors import LabError
    with pytest.raises(LabError, match="unknown role"):
        render_node(plan, "router")
