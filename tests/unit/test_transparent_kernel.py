"""The transparent proxy's kernel commands, rendered without running them. Pure, no root."""

from __future__ import annotations

import pytest

from mptcp_proxy.errors import KernelError
from mptcp_proxy.kernel.pm import (
    MAX_ENDPOINT_ID,
    PmEndpoint,
    PmLimits,
    endpoint_add_argv,
    free_ids,
    parse_limits,
)
from mptcp_proxy.kernel.routing import RT_PROTO, TproxyRoute


def test_tproxy_route_commands_for_both_families():
    route = TproxyRoute(mark=0x4D50, table=19792)
    assert route.add_commands() == [
        ["-4", "rule", "add", "fwmark", "0x4d50", "lookup", "19792", "pref", "100",
         "protocol", "203"],
        ["-4", "route", "add", "local", "default", "dev", "lo", "table", "19792",
         "proto", "203"],
        ["-6", "rule", "add", "fwmark", "0x4d50", "lookup", "19792", "pref", "100",
         "protocol", "203"],
        ["-6", "route", "add", "local", "default", "dev", "lo", "table", "19792",
         "proto", "203"],
    ]
    assert RT_PROTO == 203


def test_tproxy_route_deletes_exactly_what_it_adds_in_reverse():
    route = TproxyRoute(mark=1, table=100, pref=50, families=("-4",))
    added = route.add_commands()
    deleted = route.delete_commands()
    assert [a[2] for a in added] == ["add", "add"]
    assert [d[2] for d in deleted] == ["del", "del"]
    assert [d[1] for d in deleted] == ["route", "rule"]
    assert [[x for x in d if x != "del"] for d in deleted] == \
        [[x for x in a if x != "add"] for a in reversed(added)]


@pytest.mark.parametrize("kwargs", [
    {"mark": 0, "table": 100}, {"mark": 1 << 32, "table": 100},
    {"mark": 1, "table": 254}, {"mark": 1, "table": 255}, {"mark": 1, "table": 0},
    {"mark": 1, "table": 100, "pref": 0}, {"mark": 1, "table": 100, "pref": 32766},
    {"mark": 1, "table": 100, "families": ("-5",)},
])
def test_tproxy_route_refuses_what_would_break_routing(kwargs):
    with pytest.raises(KernelError):
        TproxyRoute(**kwargs)


def test_signal_endpoint_with_port_and_explicit_id():
    ep = PmEndpoint(255, "10.0.0.1", 7002, None, ("signal",))
    assert endpoint_add_argv(ep) == ["mptcp", "endpoint", "add", "10.0.0.1", "id", "255",
                                     "port", "7002", "signal"]
    ep6 = PmEndpoint(9, "fd00::1", 0, "eth0", ("subflow", "fullmesh"))
    assert endpoint_add_argv(ep6) == ["mptcp", "endpoint", "add", "fd00::1", "id", "9",
                                      "dev", "eth0", "subflow", "fullmesh"]


@pytest.mark.parametrize("endpoint", [
    PmEndpoint(1, "10.0.0.1; reboot", 1, None, ("signal",)),
    PmEndpoint(1, "10.0.0.1", 1, None, ("signal", "laminar-ish")),
])
def test_endpoint_argv_refuses_nonsense(endpoint):
    with pytest.raises((ValueError, KernelError)):
        endpoint_add_argv(endpoint)


def test_endpoints_parse_from_ip_json():
    ep = PmEndpoint.from_json({"address": "10.9.9.9", "port": 7002, "id": 7, "signal": True,
                               "dev": "uplink"})
    assert ep == PmEndpoint(7, "10.9.9.9", 7002, "uplink", ("signal",))
    assert PmEndpoint.from_json({"address": "::1", "id": 1, "subflow": True,
                                 "fullmesh": True}).flags == ("subflow", "fullmesh")
    with pytest.raises(KernelError):
        PmEndpoint.from_json({"address": "::1"})


@pytest.mark.parametrize("text, limits", [
    ("add_addr_accepted 0 subflows 2 \n", PmLimits(2, 0)),
    ("subflows 8\nadd_addr_accepted 8\n", PmLimits(8, 8)),
])
def test_limits_parse_from_ip_text(text, limits):
    assert parse_limits(text) == limits


@pytest.mark.parametrize("text", ["", "subflows 2", "garbage"])
def test_unreadable_limits_are_kernel_errors(text):
    with pytest.raises(KernelError):
        parse_limits(text)


def test_free_ids_come_from_the_top_and_skip_taken_ones():
    assert free_ids([], 2) == [MAX_ENDPOINT_ID, MAX_ENDPOINT_ID - 1]
    assert free_ids([255, 253], 2) == [254, 252]
    with pytest.raises(KernelError):
        free_ids(range(1, 256), 1)
