"""Lab planning: names, address plan, state round trip. Pure, no root."""

from __future__ import annotations

import ipaddress
import json
import re

import pytest

from mptcp_proxy.errors import LabError
from mptcp_proxy.lab import LabPlan, PathSpec, plan_lab
from mptcp_proxy.lab.topology import (
    MAX_PATHS,
    canonical_name,
    new_name,
    subnet_octet,
)


def test_new_names_are_prefixed_unique_and_valid():
    names = {new_name() for _ in range(200)}
    assert len(names) == 200
    for name in names:
        assert re.fullmatch(r"mpx-[0-9a-f]{6}", name)
        assert canonical_name(name) == name


@pytest.mark.parametrize("raw, expected", [
    ("demo", "mpx-demo"), ("mpx-demo", "mpx-demo"), ("a", "mpx-a"), ("x_1-2", "mpx-x_1-2"),
])
def test_canonical_name_adds_the_prefix_once(raw, expected):
    assert canonical_name(raw) == expected


@pytest.mark.parametrize("raw", ["", "mpx-", "Demo", "a b", "a/b", "../x", "-x", "x" * 25])
def test_canonical_name_refuses_what_is_not_a_safe_file_name(raw):
    with pytest.raises(LabError, match="invalid lab name"):
        canonical_name(raw)


def test_subnet_octet_is_stable_and_in_range():
    assert subnet_octet("mpx-abc") == subnet_octet("mpx-abc")
    octets = {subnet_octet(new_name()) for _ in range(500)}
    assert min(octets) >= 16 and max(octets) <= 239
    assert len(octets) > 100  # spread, so parallel labs rarely look alike


def test_plan_addresses_mirror_ipv4_in_ipv6():
    plan = plan_lab("golden", [PathSpec(rate_mbit=20), PathSpec()])
    k = subnet_octet("mpx-golden")
    assert plan.name == "mpx-golden"
    assert plan.namespaces == ("mpx-golden-c", "mpx-golden-p", "mpx-golden-s")
    p0, p1 = plan.paths
    assert (p0.client_addr, p0.proxy_addr) == (f"10.{k}.0.1", f"10.{k}.0.2")
    assert (p1.client_addr, p1.proxy_addr) == (f"10.{k}.1.1", f"10.{k}.1.2")
    assert (p0.client_addr6, p1.proxy_addr6) == (f"fd00:{k}::1", f"fd00:{k}:1::2")
    assert (p0.client_if, p0.proxy_if, p1.client_if) == ("path0", "path0", "path1")
    assert (p0.table, p1.table) == (100, 101)
    assert (p0.rate_mbit, p1.rate_mbit) == (20, None)
    assert plan.server_addr == f"10.{k}.254.2"
    assert plan.proxy_server_side_addr == f"10.{k}.254.1"
    assert plan.server_addr6 == f"fd00:{k}:254::2"
    assert plan.proxy_server_side_addr6 == f"fd00:{k}:254::1"


def test_plan_addresses_are_canonical_and_subnets_disjoint():
    plan = plan_lab("x", [PathSpec()] * MAX_PATHS)
    nets = []
    for a in plan.paths:
        for addr, plen in ((a.client_addr, a.prefix_len), (a.client_addr6, a.prefix_len6)):
            assert str(ipaddress.ip_address(addr)) == addr
            nets.append(ipaddress.ip_interface(f"{addr}/{plen}").network)
        assert ipaddress.ip_interface(f"{a.proxy_addr}/{a.prefix_len}").network == \
            ipaddress.ip_interface(f"{a.client_addr}/{a.prefix_len}").network
    nets.append(ipaddress.ip_interface(f"{plan.server_addr}/24").network)
    nets.append(ipaddress.ip_interface(f"{plan.server_addr6}/64").network)
    assert len(set(nets)) == len(nets)


@pytest.mark.parametrize("count", [0, MAX_PATHS + 1])
def test_plan_refuses_path_counts_the_kernel_cannot_use(count):
    with pytest.raises(LabError, match="paths"):
        plan_lab("x", [PathSpec()] * count)


def test_plan_refuses_unknown_topology():
    with pytest.raises(LabError, match="unknown topology 'mesh'"):
        plan_lab("x", [PathSpec()], topology="mesh")


@pytest.mark.parametrize("rate", [0, -1, 0.001, 1e6])
def test_path_spec_refuses_absurd_rates(rate):
    with pytest.raises(LabError, match="out of range"):
        PathSpec(rate_mbit=rate)


def test_plan_round_trips_through_json():
    plan = plan_lab("rt", [PathSpec(rate_mbit=12.5), PathSpec(), PathSpec(rate_mbit=1000)])
    again = LabPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan


def test_malformed_state_is_a_lab_error():
    data = plan_lab("rt", [PathSpec()]).to_dict()
    del data["paths"][0]["client_addr"]
    with pytest.raises(LabError, match="malformed lab state"):
        LabPlan.from_dict(data)
