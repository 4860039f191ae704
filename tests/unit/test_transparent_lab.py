"""The `operator` lab topology: plan and rendering. Pure, no root."""

from __future__ import annotations

import json

import pytest

from mptcp_proxy.cli import lab_cmd
from mptcp_proxy.errors import LabError
from mptcp_proxy.lab import LabPlan, PathSpec, plan_lab
from mptcp_proxy.lab.topology import (
    ALL_ROLES,
    OPERATOR_ROLES,
    ROLE_SUFFIX,
    TOPOLOGIES,
    node_sysctls,
    render_links,
    render_node,
    render_shaping,
    subnet_octet,
)

K = subnet_octet("mpx-golden")


@pytest.fixture
def plan():
    return plan_lab("golden", [PathSpec(rate_mbit=20), PathSpec(rate_mbit=30)], "operator")


def test_operator_is_a_known_topology_next_to_basic():
    assert TOPOLOGIES == ("basic", "operator")
    assert set(ROLE_SUFFIX) == set(ALL_ROLES)
    assert len(set(ROLE_SUFFIX.values())) == len(ROLE_SUFFIX)


def test_plan(plan):
    assert plan.roles == OPERATOR_ROLES == ("client", "proxy", "wifi", "server", "mpserver")
    assert plan.namespaces == ("mpx-golden-c", "mpx-golden-p", "mpx-golden-w",
                               "mpx-golden-s", "mpx-golden-m")
    cell, wifi = plan.paths
    assert (cell.gateway, cell.proxy_addr, cell.client_addr) == \
        ("proxy", f"10.{K}.0.2", f"10.{K}.0.1")
    assert (wifi.gateway, wifi.proxy_addr, wifi.client_addr) == \
        ("wifi", f"10.{K}.1.2", f"10.{K}.1.1")
    assert (plan.proxy_public_addr, plan.proxy_public_addr6) == \
        (f"10.{K}.253.1", f"fd00:{K}:253::1")
    assert (plan.server_addr, plan.server_addr6) == (f"10.{K}.254.2", f"fd00:{K}:254::2")
    assert (plan.mpserver_addr, plan.mpserver_addr6) == (f"10.{K}.252.2", f"fd00:{K}:252::2")


def test_plan_round_trips_through_json(plan):
    assert LabPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_a_basic_state_file_without_the_new_fields_still_loads():
    data = plan_lab("old", [PathSpec()]).to_dict()
    for key in ("roles", "links", "mpserver_addr", "mpserver_addr6"):
        del data[key]
    for path in data["paths"]:
        del path["gateway"]
    plan = LabPlan.from_dict(data)
    assert plan == plan_lab("old", [PathSpec()])


def test_unknown_roles_in_state_are_refused(plan):
    data = plan.to_dict()
    data["roles"] = ["client", "nosuch"]
    with pytest.raises(LabError, match="malformed"):
        LabPlan.from_dict(data)


@pytest.mark.parametrize("count", [1, 3])
def test_operator_has_exactly_two_paths(count):
    with pytest.raises(LabError, match="cellular, Wi-Fi"):
        plan_lab("x", [PathSpec()] * count, "operator")


def test_links(plan):
    assert render_links(plan) == [
        "link add name path0 index 10 netns mpx-golden-c type veth "
        "peer name path0 index 20 netns mpx-golden-p",
        "link add name path1 index 11 netns mpx-golden-c type veth "
        "peer name path1 index 21 netns mpx-golden-w",
        "link add name uplink index 30 netns mpx-golden-p type veth "
        "peer name proxy index 50 netns mpx-golden-w",
        "link add name srvlink index 51 netns mpx-golden-w type veth "
        "peer name srvlink index 40 netns mpx-golden-s",
        "link add name mpsrvlink index 52 netns mpx-golden-w type veth "
        "peer name srvlink index 60 netns mpx-golden-m",
    ]


def test_client_joins_from_every_path(plan):
    lines, lines6 = render_node(plan, "client")
    assert lines[-4:] == [
        f"mptcp endpoint add 10.{K}.0.1 dev path0 subflow fullmesh",
        f"mptcp endpoint add fd00:{K}::1 dev path0 subflow fullmesh",
        f"mptcp endpoint add 10.{K}.1.1 dev path1 subflow fullmesh",
        f"mptcp endpoint add fd00:{K}:1::1 dev path1 subflow fullmesh",
    ]
    assert f"route add default via 10.{K}.1.2 dev path1 table 101" in lines
    assert f"route add default via 10.{K}.0.2 dev path0 metric 10" in lines
    assert lines6 == [f"rule add from fd00:{K}::1 table 100 pref 1000",
                      f"rule add from fd00:{K}:1::1 table 101 pref 1001"]


def test_proxy_is_the_cellular_gateway_with_a_public_uplink(plan):
    assert render_node(plan, "proxy") == ([
        "link set lo up",
        f"addr add 10.{K}.0.2/24 dev path0", f"addr add fd00:{K}::2/64 dev path0 nodad",
        "link set path0 up",
        f"addr add 10.{K}.253.1/24 dev uplink", f"addr add fd00:{K}:253::1/64 dev uplink nodad",
        "link set uplink up",
        f"route add default via 10.{K}.253.2 dev uplink",
        f"route add ::/0 via fd00:{K}:253::2 dev uplink",
        "mptcp limits set subflows 8 add_addr_accepted 8",
    ], [])


def test_wifi_router_reaches_the_cellular_subnet_through_the_proxy(plan):
    lines, _ = render_node(plan, "wifi")
    assert lines[-2:] == [f"route add 10.{K}.0.0/24 via 10.{K}.253.1 dev proxy",
                          f"route add fd00:{K}::/64 via fd00:{K}:253::1 dev proxy"]
    for ifname in ("path1", "proxy", "srvlink", "mpsrvlink"):
        assert f"link set {ifname} up" in lines
    assert not any("path0" in line for line in lines)


@pytest.mark.parametrize("role, link, gw", [("server", "254", "254.1"),
                                            ("mpserver", "252", "252.1")])
def test_servers_route_through_the_router(plan, role, link, gw):
    lines, _ = render_node(plan, role)
    assert f"addr add 10.{K}.{link}.2/24 dev srvlink" in lines
    assert f"route add default via 10.{K}.{gw} dev srvlink" in lines


def test_shaping_at_both_ends_of_each_access_path(plan):
    assert render_shaping(plan, "client") == [
        "qdisc replace dev path0 root tbf rate 20000000bit burst 16384 limit 81920",
        "qdisc replace dev path1 root tbf rate 30000000bit burst 16384 limit 81920"]
    assert render_shaping(plan, "proxy") == [render_shaping(plan, "client")[0]]
    assert render_shaping(plan, "wifi") == [render_shaping(plan, "client")[1]]
    assert render_shaping(plan, "server") == render_shaping(plan, "mpserver") == []


def test_sysctls_plain_tcp_server_and_two_routers():
    assert ("net.mptcp.enabled", 0) in node_sysctls("server", "operator")
    assert ("net.mptcp.enabled", 0) not in node_sysctls("mpserver", "operator")
    assert ("net.mptcp.enabled", 0) not in node_sysctls("server")  # basic: unchanged
    for role in ("proxy", "wifi"):
        assert ("net.ipv4.ip_forward", 1) in node_sysctls(role, "operator")


def test_unknown_role_is_refused(plan):
    with pytest.raises(LabError, match="unknown role"):
        render_node(plan, "router")


def test_lab_cli_offers_the_operator_topology_and_its_nodes():
    parser = argparse_parser()
    args = parser.parse_args(["lab", "up", "--topology", "operator"])
    assert args.topology == "operator"
    args = parser.parse_args(["lab", "exec", "x", "mpserver", "--", "true"])
    assert args.role == "mpserver"


def argparse_parser():
    import argparse
    p = argparse.ArgumentParser(prog="mptcp-proxy")
    lab_cmd.register(p.add_subparsers(dest="command"))
    return p
