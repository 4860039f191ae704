"""`mptcp-proxy lab` argument handling. Pure, no root: nothing is built here."""

from __future__ import annotations

import argparse

import pytest

from mptcp_proxy.cli import lab_cmd
from mptcp_proxy.errors import ConfigError
from mptcp_proxy.lab import PathSpec


@pytest.fixture
def parser():
    p = argparse.ArgumentParser(prog="mptcp-proxy")
    lab_cmd.register(p.add_subparsers(dest="command"))
    return p


def test_up_defaults(parser):
    args = parser.parse_args(["lab", "up"])
    assert (args.name, args.paths, args.rate, args.topology) == (None, None, None, "basic")
    assert args.func is lab_cmd.cmd_up


def test_up_topology_choices_leave_room_for_more(parser):
    with pytest.raises(SystemExit):
        parser.parse_args(["lab", "up", "--topology", "nonsense"])


@pytest.mark.parametrize("paths, rates, expected", [
    (None, None, [None, None]),
    (3, None, [None, None, None]),
    (None, [20], [20, 20]),
    (3, [20], [20, 20, 20]),
    (None, [20, 30, 40], [20, 30, 40]),
    (2, [20, 30], [20, 30]),
])
def test_path_specs(paths, rates, expected):
    assert lab_cmd.path_specs(paths, rates) == [PathSpec(rate_mbit=r) for r in expected]


@pytest.mark.parametrize("paths, rates, key", [
    (0, None, "--paths"), (5, None, "--paths"), (3, [20, 30], "--rate"), (None, [0], "--rate"),
])
def test_path_specs_errors_name_the_option(paths, rates, key):
    with pytest.raises(ConfigError) as info:
        lab_cmd.path_specs(paths, rates)
    assert info.value.key == key


def test_exec_keeps_the_command_verbatim(parser):
    args = parser.parse_args(["lab", "exec", "demo", "server", "--", "ip", "-br", "-6", "a"])
    assert (args.name, args.role, args.argv) == ("demo", "server", ["ip", "-br", "-6", "a"])


def test_exec_refuses_unknown_nodes(parser):
    with pytest.raises(SystemExit):
        parser.parse_args(["lab", "exec", "demo", "router", "--", "true"])


def test_exec_without_a_command_is_a_usage_error(parser):
    args = parser.parse_args(["lab", "exec", "demo", "client"])
    with pytest.raises(ConfigError, match="CMD"):
        args.func(args)


@pytest.mark.parametrize("argv", [["lab", "down"], ["lab", "down", "x", "--all"]])
def test_down_needs_names_or_all_but_not_both(parser, argv):
    with pytest.raises(SystemExit):
        parser.parse_args(argv)


def test_down_names_and_all(parser):
    assert parser.parse_args(["lab", "down", "a", "b"]).names == ["a", "b"]
    assert parser.parse_args(["lab", "down", "--all"]).all is True
